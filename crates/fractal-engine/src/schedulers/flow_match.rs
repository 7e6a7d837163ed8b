//! diffusers' `FlowMatchEulerDiscreteScheduler` (static shift): Euler steps
//! of a flow-matching ODE, `x ← x + (σ_next − σ) · v`, over sigmas shifted by
//! `shift·σ / (1 + (shift − 1)·σ)`.
//!
//! The schedule is built as diffusers builds it, including its rounding: the
//! smallest training sigma is shifted in f32 at construction, the linspace
//! between it and 1 runs in f64 and is shifted again, then rounded to f32.

use candle_core::{Result, Tensor};

/// numpy's `linspace` with the endpoint: `start + i·step`, the last value
/// exactly `stop`.
pub(crate) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

#[derive(Clone, Debug)]
pub struct FlowMatchEuler {
    /// `steps + 1` sigmas, the last 0.
    sigmas: Vec<f32>,
    /// What the denoiser is told at each step: `σ · num_train_timesteps`.
    timesteps: Vec<f32>,
}

impl FlowMatchEuler {
    pub fn new(num_train_timesteps: u32, shift: f64, steps: usize) -> Self {
        let t = num_train_timesteps as f64;
        // The smallest training sigma, 1/T, shifted in f32 as the
        // constructor does.
        let s = 1.0f32 / num_train_timesteps as f32;
        let sigma_min = (shift as f32 * s) / (1.0f32 + (shift - 1.0) as f32 * s);
        let sigma_max = 1.0f64;
        let sigmas: Vec<f32> = linspace(sigma_max * t, sigma_min as f64 * t, steps)
            .into_iter()
            .map(|ts| {
                let s = ts / t;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps = sigmas
            .iter()
            .map(|&s| s * num_train_timesteps as f32)
            .collect();
        let mut sigmas = sigmas;
        sigmas.push(0.0);
        FlowMatchEuler { sigmas, timesteps }
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The Euler step `index` from `sample` along the predicted velocity.
    pub fn step(&self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let (Some(&sigma), Some(&next)) = (self.sigmas.get(index), self.sigmas.get(index + 1))
        else {
            candle_core::bail!(
                "step {index} is outside a {}-step schedule",
                self.timesteps.len()
            );
        };
        let dt = next - sigma;
        sample + (model_output * dt as f64)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_equals_diffusers() {
        // diffusers 0.42.1, shift 3, 4 steps.
        let s = FlowMatchEuler::new(1000, 3.0, 4);
        assert_eq!(s.timesteps(), &[1000.0, 857.692_3, 602.150_6, 8.928_572]);
        assert_eq!(
            s.sigmas(),
            &[1.0, 0.857_692_3, 0.602_150_56, 0.008_928_572, 0.0]
        );
        assert_eq!(
            FlowMatchEuler::new(1000, 1.0, 4).timesteps(),
            &[1000.0, 667.0, 334.0, 1.0]
        );
        assert_eq!(FlowMatchEuler::new(1000, 3.0, 1).timesteps(), &[1000.0]);
    }
}
