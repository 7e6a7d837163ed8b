//! DPM-Solver++ (2M), diffusers' `DPMSolverMultistepScheduler`.

use candle_core::{Result, Tensor};
use fractal_protocol::manifest::{DdpmSchedule, PredictionType, TimestepSpacing};

use super::ddim::{alphas_cumprod, trailing};

/// DPM-Solver++ (2M): diffusers `DPMSolverMultistepScheduler` with its
/// defaults (`algorithm_type="dpmsolver++"`, `solver_order=2`,
/// `solver_type="midpoint"`, `lower_order_final=True`, `final_sigmas_type="zero"`).
/// Multistep: each update uses the previous step's data prediction, which this
/// struct carries between calls.
#[derive(Clone, Debug)]
pub struct DpmSolverPP {
    timesteps: Vec<usize>,
    /// sigma per inference step, plus the final 0.
    sigmas: Vec<f64>,
    prediction: PredictionType,
    previous_x0: Option<Tensor>,
}

/// DPM-Solver's own timestep spacing (its "leading" differs from DDIM's).
pub fn dpm_timesteps(spec: &DdpmSchedule, steps: usize) -> Vec<usize> {
    let train = spec.num_train_timesteps as usize;
    match spec.timestep_spacing {
        TimestepSpacing::Linspace => {
            let last = (train - 1) as f64;
            (0..steps)
                .map(|i| (last * (steps - i) as f64 / steps as f64).round() as usize)
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = train / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| i * ratio + spec.steps_offset as usize)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(train, steps),
    }
}

impl DpmSolverPP {
    pub fn new(spec: &DdpmSchedule, steps: usize) -> Self {
        let alphas_cumprod = alphas_cumprod(spec);
        let timesteps = dpm_timesteps(spec, steps);
        // diffusers stores the sigmas as float32.
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| (((1.0 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt() as f32) as f64)
            .collect();
        sigmas.push(0.0);
        DpmSolverPP {
            timesteps,
            sigmas,
            prediction: spec.prediction_type,
            previous_x0: None,
        }
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn alpha_sigma(sigma: f64) -> (f64, f64) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    fn lambda(sigma: f64) -> f64 {
        let (a, s) = Self::alpha_sigma(sigma);
        a.ln() - s.ln()
    }

    /// Step `index` (0-based) from `sample` given the model output there.
    pub fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let n = self.timesteps.len();
        let sigma_s0 = self.sigmas[index];
        let (alpha_s0, sigma_s0_t) = Self::alpha_sigma(sigma_s0);
        // Data prediction x0.
        let x0 = match self.prediction {
            PredictionType::Epsilon => {
                ((sample - (model_output * sigma_s0_t)?)? * (1.0 / alpha_s0))?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => ((sample * alpha_s0)? - (model_output * sigma_s0_t)?)?,
        };
        let sigma_t = self.sigmas[index + 1];
        // diffusers (order 2): first order for the first step and, with
        // final_sigmas_type="zero", the last one; second order otherwise.
        let second_order = self.previous_x0.as_ref().filter(|_| index + 1 < n);
        let out = if sigma_t == 0.0 {
            // Final step to sigma 0: exp(-h) = 0 and the update is x0 itself.
            x0.clone()
        } else {
            let (alpha_t, sigma_t_t) = Self::alpha_sigma(sigma_t);
            let h = Self::lambda(sigma_t) - Self::lambda(sigma_s0);
            let coef = alpha_t * ((-h).exp() - 1.0);
            let base = ((sample * (sigma_t_t / sigma_s0_t))? - (&x0 * coef)?)?;
            match second_order {
                Some(m1) => {
                    let sigma_s1 = self.sigmas[index - 1];
                    let h0 = Self::lambda(sigma_s0) - Self::lambda(sigma_s1);
                    let r0 = h0 / h;
                    let d1 = ((&x0 - m1)? * (1.0 / r0))?;
                    (base - (d1 * (0.5 * coef))?)?
                }
                None => base,
            }
        };
        self.previous_x0 = Some(x0);
        Ok(out)
    }
}
