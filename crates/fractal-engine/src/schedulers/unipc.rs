//! diffusers' `UniPCMultistepScheduler` as Wan's folders configure it: flow
//! prediction on flow sigmas (`use_flow_sigmas`, `flow_shift`), data
//! prediction (`predict_x0`), second order, the `bh2` variant,
//! `lower_order_final`, a final sigma of zero.
//!
//! Each step turns the model's velocity into a data prediction
//! `x0 = x − σ·v`, corrects the current latents with it (UniC, from the
//! second step on, at the previous step's order), and predicts the next
//! latents (UniP: order 1, then 2, order 1 again on the last step). The
//! schedule is built in f64 and rounded to f32; every per-step scalar is
//! f32, each transcendental rounded from f64.

use candle_core::{Result, Tensor};

use super::flow_match::linspace;

#[derive(Clone, Debug)]
pub struct UniPc {
    /// `steps + 1` sigmas, the last 0.
    sigmas: Vec<f32>,
    /// Integer timesteps the denoiser is told (`⌊1000·σ⌋` of the f64 sigma).
    timesteps: Vec<f32>,
    /// Data predictions of the last two steps, oldest first.
    history: [Option<Tensor>; 2],
    /// The (corrected) latents the last prediction started from.
    last_sample: Option<Tensor>,
    /// The order of the last prediction (the next correction uses it).
    last_order: usize,
    lower_order_nums: usize,
    /// The step the next call must be.
    next: usize,
}

const SOLVER_ORDER: usize = 2;

fn ln(x: f32) -> f32 {
    (x as f64).ln() as f32
}

/// `λ(σ) = ln(1 − σ) − ln σ`, the half log-SNR of a flow sigma (+∞ at 0).
fn lambda(s: f32) -> f32 {
    ln(1.0 - s) - ln(s)
}

/// A step's `h = λ(s_t) − λ(s_0)` and `α_t·φ₁(h)`, from `σ = s_0` to `s_t`.
fn coefficients(s_t: f32, s_0: f32) -> (f32, f32) {
    let h = lambda(s_t) - lambda(s_0);
    (h, (1.0 - s_t) * expm1(-h))
}

fn expm1(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}

fn scalar(x: f32, like: &Tensor) -> Result<Tensor> {
    Tensor::new(x, like.device())
}

impl UniPc {
    pub fn new(num_train_timesteps: u32, flow_shift: f64, steps: usize) -> Self {
        let t = num_train_timesteps as f64;
        let mut s: Vec<f64> = linspace(1.0, 1.0 / t, steps + 1);
        s.pop();
        for v in &mut s {
            *v = flow_shift * *v / (1.0 + (flow_shift - 1.0) * *v);
        }
        if (s[0] - 1.0).abs() < 1e-6 {
            s[0] -= 1e-6;
        }
        let timesteps = s.iter().map(|&v| (v * t).trunc() as f32).collect();
        let mut sigmas: Vec<f32> = s.iter().map(|&v| v as f32).collect();
        sigmas.push(0.0);
        UniPc {
            sigmas,
            timesteps,
            history: [None, None],
            last_sample: None,
            last_order: 1,
            lower_order_nums: 0,
            next: 0,
        }
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Step `index` (the schedule's next one: the solver carries history)
    /// from `sample` with the model's velocity `model_output`.
    pub fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let steps = self.timesteps.len();
        if index != self.next || index >= steps {
            candle_core::bail!(
                "UniPC step {index} out of order (expected step {} of {steps})",
                self.next
            );
        }
        let sigma = self.sigmas[index];
        let x0 = (sample - (model_output * sigma as f64)?)?;
        let sample = match &self.last_sample {
            Some(last) if index > 0 => self.correct(&x0, last, index)?,
            _ => sample.clone(),
        };
        self.history = [self.history[1].take(), Some(x0)];
        let order = SOLVER_ORDER
            .min(steps - index)
            .min(self.lower_order_nums + 1);
        self.last_order = order;
        self.last_sample = Some(sample.clone());
        let prev = self.predict(&sample, index, order)?;
        if self.lower_order_nums < SOLVER_ORDER {
            self.lower_order_nums += 1;
        }
        self.next += 1;
        Ok(prev)
    }

    /// The data prediction `x − σ_i·v` of step `index` from its sample and
    /// the model's velocity there.
    pub fn data_prediction(
        &self,
        index: usize,
        sample: &Tensor,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        sample - (model_output * self.sigmas[index] as f64)?
    }

    /// Sets the solver up to take step `index` from `sample` as it would
    /// have after the steps before it, from what a trace commits: the
    /// latents and model outputs of up to two earlier steps (`history`,
    /// oldest first, ending at step `index − 1`).
    ///
    /// The corrector needs the corrected latents the last prediction
    /// started from, which the trace does not hold; the prediction is an
    /// affine map of them with the nonzero factor `σ_index / σ_{index−1}`,
    /// so they are recovered by inverting it from `sample`.
    pub fn resume(
        &mut self,
        index: usize,
        history: &[(Tensor, Tensor)],
        sample: &Tensor,
    ) -> Result<()> {
        let steps = self.timesteps.len();
        let want = index.min(SOLVER_ORDER);
        if index >= steps || history.len() != want {
            candle_core::bail!(
                "UniPC resumes step {index} of {steps} from {want} earlier steps, got {}",
                history.len()
            );
        }
        let first = index - want;
        let predictions = history
            .iter()
            .enumerate()
            .map(|(j, (x, v))| self.data_prediction(first + j, x, v))
            .collect::<Result<Vec<_>>>()?;
        self.history = match predictions.as_slice() {
            [] => [None, None],
            [m] => [None, Some(m.clone())],
            [older, newer] => [Some(older.clone()), Some(newer.clone())],
            _ => unreachable!("at most two"),
        };
        self.lower_order_nums = index.min(SOLVER_ORDER);
        self.next = index;
        if index == 0 {
            self.last_sample = None;
            return Ok(());
        }
        // The order step `index − 1` predicted with (as `step` chose it).
        let prev = index - 1;
        let order = SOLVER_ORDER
            .min(steps - prev)
            .min(prev.min(SOLVER_ORDER) + 1);
        self.last_order = order;
        self.last_sample = Some(self.unpredict(sample, prev, order)?);
        Ok(())
    }

    /// The inverse of [`UniPc::predict`] from step `i` at `order`: the
    /// (corrected) latents at `σ[i]` that predict `x` at `σ[i+1]`, given the
    /// history as it was then (newest prediction `m_i`).
    fn unpredict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let (s_t, s_0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (m0, _) = self.predictions();
        let (h, alpha_b) = coefficients(s_t, s_0);
        let mut before = (x + (m0 * alpha_b as f64)?)?;
        if order == 2 {
            before = (before + self.second_order_term(i, h, alpha_b)?)?;
        }
        before.broadcast_div(&scalar(s_t / s_0, x)?)
    }

    /// The history's data predictions: `(newest, previous)`.
    fn predictions(&self) -> (&Tensor, Option<&Tensor>) {
        (
            self.history[1].as_ref().expect("a prediction was stored"),
            self.history[0].as_ref(),
        )
    }

    /// The first-order (DDIM-like) move of `x` from `σ = s_0` to `s_t` along
    /// the data prediction `m0`, and the step's `h = λ(s_t) − λ(s_0)`,
    /// `α_t·φ₁(h)` (which is also `α_t·B(h)`: bh2 takes `B(h) = e^{−h} − 1`).
    fn first_order(x: &Tensor, m0: &Tensor, s_t: f32, s_0: f32) -> Result<(Tensor, f32, f32)> {
        let (h, alpha_phi) = coefficients(s_t, s_0);
        let moved = ((x * (s_t / s_0) as f64)? - (m0 * alpha_phi as f64)?)?;
        Ok((moved, h, alpha_phi))
    }

    /// `(m1 − m0) / r` with `r = (λ(s_1) − λ(s_0)) / h`: the scaled
    /// difference of two data predictions, and `r`.
    fn difference(m1: &Tensor, m0: &Tensor, s_1: f32, s_0: f32, h: f32) -> Result<(Tensor, f32)> {
        let r = (lambda(s_1) - lambda(s_0)) / h;
        Ok(((m1 - m0)?.broadcast_div(&scalar(r, m0)?)?, r))
    }

    /// UniP: the latents at `σ[i+1]` from `x` at `σ[i]`.
    fn predict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let (s_t, s_0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (m0, _) = self.predictions();
        let (x_t, h, alpha_b) = Self::first_order(x, m0, s_t, s_0)?;
        if order == 1 {
            return Ok(x_t);
        }
        x_t - self.second_order_term(i, h, alpha_b)?
    }

    /// UniP's second-order term from step `i` (ρ = 0.5): `0.5·D1·α_t·B(h)`,
    /// which the predictor subtracts and [`UniPc::unpredict`] adds back.
    fn second_order_term(&self, i: usize, h: f32, alpha_b: f32) -> Result<Tensor> {
        let (m0, m1) = self.predictions();
        let m1 = m1.expect("order 2 has a previous prediction");
        let (d1, _) = Self::difference(m1, m0, self.sigmas[i - 1], self.sigmas[i], h)?;
        (d1 * 0.5)? * alpha_b as f64
    }

    /// UniC: the latents at `σ[i]`, predicted again from `x` (where the last
    /// prediction started) with the data prediction `model_t` that the model
    /// made from the predicted ones: the corrector replaces them.
    fn correct(&self, model_t: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let order = self.last_order;
        let (s_t, s_0) = (self.sigmas[i], self.sigmas[i - 1]);
        let (m0, m1) = self.predictions();
        let (base, h, alpha_b) = Self::first_order(x, m0, s_t, s_0)?;
        let d1_t = (model_t - m0)?;
        let (corr, rho_t) = if order == 1 {
            (None, 0.5f32)
        } else {
            let m1 = m1.expect("order 2 has an older prediction");
            let (d1, r) = Self::difference(m1, m0, self.sigmas[i - 2], s_0, h)?;
            // b_k = h·φ_{k+1}(h)·k! / B(h); ρ solves [[1, 1], [r, 1]] ρ = b.
            let hh = -h;
            let b_h = expm1(hh);
            let h_phi_2 = b_h / hh - 1.0;
            let b0 = h_phi_2 / b_h;
            let h_phi_3 = h_phi_2 / hh - 0.5;
            let b1 = h_phi_3 * 2.0 / b_h;
            let rho1 = (b1 - r * b0) * (1.0 / (1.0 - r));
            let rho0 = b0 - rho1;
            (Some((d1 * rho0 as f64)?), rho1)
        };
        let res = match corr {
            Some(c) => (c + (d1_t * rho_t as f64)?)?,
            None => (d1_t * rho_t as f64)?,
        };
        base - (res * alpha_b as f64)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_equals_diffusers() {
        // diffusers 0.42.1, flow_shift 3, 4 steps.
        let s = UniPc::new(1000, 3.0, 4);
        assert_eq!(s.timesteps(), &[999.0, 900.0, 750.0, 500.0]);
        assert_eq!(
            s.sigmas(),
            &[0.999_999, 0.900_119_96, 0.750_374_8, 0.500_999, 0.0]
        );
        let ten = UniPc::new(1000, 3.0, 10);
        assert_eq!(
            ten.timesteps(),
            &[999.0, 964.0, 923.0, 875.0, 818.0, 750.0, 667.0, 563.0, 429.0, 251.0]
        );
    }

    /// A step resumed from two earlier steps' latents and velocities (as an
    /// audit opens them) lands where the uninterrupted run did.
    #[test]
    fn a_resumed_step_lands_where_the_run_did() {
        use candle_core::Device;
        let steps = 8;
        let noise = |seed: u64| {
            let mut v = vec![0f32; 2 * 3 * 4];
            fractal_protocol::noise::fill_gaussian(
                fractal_protocol::Seed(seed),
                fractal_protocol::noise::Stream::InitialLatents,
                &mut v,
            );
            Tensor::from_vec(v, (2, 3, 4), &Device::Cpu).unwrap()
        };
        let mut run = UniPc::new(1000, 3.0, steps);
        let mut xs = vec![noise(0)];
        let mut vs = Vec::new();
        for i in 0..steps {
            // A velocity that depends on the sample, as a model's does.
            let v = ((&xs[i] * 0.7).unwrap() + noise(i as u64 + 1)).unwrap();
            xs.push(run.step(&v, i, &xs[i]).unwrap());
            vs.push(v);
        }
        for k in 0..steps {
            let mut fresh = UniPc::new(1000, 3.0, steps);
            let history: Vec<(Tensor, Tensor)> = (k.saturating_sub(2)..k)
                .map(|j| (xs[j].clone(), vs[j].clone()))
                .collect();
            fresh.resume(k, &history, &xs[k]).unwrap();
            let next = fresh.step(&vs[k], k, &xs[k]).unwrap();
            let err = (next - &xs[k + 1])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-5, "step {k}: {err}");
        }
        let mut fresh = UniPc::new(1000, 3.0, steps);
        assert!(
            fresh.resume(3, &[], &xs[3]).is_err(),
            "step 3 needs two earlier steps"
        );
    }
}
