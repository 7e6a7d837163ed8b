//! DDIM (eta = 0), diffusers' `DDIMScheduler`, and the beta schedule and
//! timestep spacing the DDPM-family schedulers share.

use candle_core::{Result, Tensor};
use fractal_protocol::manifest::{
    BetaSchedule, DdpmSchedule, PredictionType, SchedulerSpec, TimestepSpacing,
};

/// DDIM (eta = 0), diffusers `DDIMScheduler`.
#[derive(Clone, Debug)]
pub struct Ddim {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<usize>,
    step_ratio: usize,
    prediction: PredictionType,
    clip_sample: bool,
}

/// diffusers' `betas`, then the running product of `1 - beta`.
pub fn alphas_cumprod(spec: &DdpmSchedule) -> Vec<f64> {
    let n = spec.num_train_timesteps as usize;
    let lin = |a: f64, b: f64, i: usize| {
        if n == 1 {
            a
        } else {
            a + (b - a) * i as f64 / (n - 1) as f64
        }
    };
    let mut acc = 1.0;
    (0..n)
        .map(|i| {
            let beta = match spec.beta_schedule {
                BetaSchedule::Linear => lin(spec.beta_start, spec.beta_end, i),
                BetaSchedule::ScaledLinear => {
                    lin(spec.beta_start.sqrt(), spec.beta_end.sqrt(), i).powi(2)
                }
            };
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

/// ModelScope text-to-video's scheduler config (diffusers' DDIM defaults for
/// Stable Diffusion): what the tiny model pins too.
pub fn modelscope_ddim() -> SchedulerSpec {
    SchedulerSpec::Ddim(modelscope_schedule())
}

/// The DDPM schedule of [`modelscope_ddim`].
pub fn modelscope_schedule() -> DdpmSchedule {
    DdpmSchedule {
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: BetaSchedule::ScaledLinear,
        prediction_type: PredictionType::Epsilon,
        clip_sample: false,
        set_alpha_to_one: false,
        steps_offset: 1,
        timestep_spacing: TimestepSpacing::Leading,
    }
}

/// "trailing" spacing, the same for DDIM and DPM-Solver.
pub(super) fn trailing(train: usize, steps: usize) -> Vec<usize> {
    let ratio = train as f64 / steps as f64;
    (0..steps)
        .map(|i| ((train as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
        .collect()
}

/// The inference timesteps, highest first, as diffusers' `set_timesteps`.
pub fn timesteps(spec: &DdpmSchedule, steps: usize) -> Vec<usize> {
    let train = spec.num_train_timesteps as usize;
    match spec.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|i| i * ratio + spec.steps_offset as usize)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(train, steps),
        TimestepSpacing::Linspace => {
            let last = (train - 1) as f64;
            (0..steps)
                .rev()
                .map(|i| {
                    if steps == 1 {
                        0
                    } else {
                        (last * i as f64 / (steps - 1) as f64).round() as usize
                    }
                })
                .collect()
        }
    }
}

impl Ddim {
    pub fn new(spec: &DdpmSchedule, steps: usize) -> Self {
        let alphas_cumprod = alphas_cumprod(spec);
        let final_alpha_cumprod = if spec.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ddim {
            timesteps: timesteps(spec, steps),
            step_ratio: spec.num_train_timesteps as usize / steps,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction: spec.prediction_type,
            clip_sample: spec.clip_sample,
        }
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// One denoising step from `timestep` to the previous one.
    pub fn step(&self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> Result<Tensor> {
        let a_t = self.alphas_cumprod[timestep.min(self.alphas_cumprod.len() - 1)];
        let a_prev = match timestep.checked_sub(self.step_ratio) {
            Some(p) => self.alphas_cumprod[p],
            None => self.final_alpha_cumprod,
        };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                ((sample - (model_output * b_t.sqrt())?)? * (1.0 / a_t.sqrt()))?,
                model_output.clone(),
            ),
            PredictionType::VPrediction => (
                ((sample * a_t.sqrt())? - (model_output * b_t.sqrt())?)?,
                ((model_output * a_t.sqrt())? + (sample * b_t.sqrt())?)?,
            ),
            PredictionType::Sample => (
                model_output.clone(),
                ((sample - (model_output * a_t.sqrt())?)? * (1.0 / b_t.sqrt()))?,
            ),
        };
        let x0 = if self.clip_sample {
            x0.clamp(-1f32, 1f32)?
        } else {
            x0
        };
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_spec() -> DdpmSchedule {
        modelscope_schedule()
    }

    #[test]
    fn timesteps_match_diffusers() {
        let mut s = ms_spec();
        // diffusers DDIMScheduler(...).set_timesteps(10).timesteps
        assert_eq!(
            timesteps(&s, 10),
            vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        s.timestep_spacing = TimestepSpacing::Trailing;
        assert_eq!(timesteps(&s, 4), vec![999, 749, 499, 249]);
        s.timestep_spacing = TimestepSpacing::Linspace;
        assert_eq!(timesteps(&s, 4), vec![999, 666, 333, 0]);
    }

    #[test]
    fn alphas_cumprod_matches_known_values() {
        let a = alphas_cumprod(&ms_spec());
        // torch: DDIMScheduler(beta_schedule="scaled_linear", ...).alphas_cumprod[[0, 999]]
        assert!((a[0] - 0.99915).abs() < 1e-7, "{}", a[0]);
        assert!((a[999] - 0.004660).abs() < 1e-5, "{}", a[999]);
    }
}
