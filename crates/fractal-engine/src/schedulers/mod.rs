//! Noise schedulers, matching diffusers' configs and step math.
//!
//! Scalars are computed in f64 and applied to f32 latents; every step is a
//! pure function of (model output, timestep, sample), so a verifier can
//! recompute any single DDIM step from the revealed latents.

use candle_core::{Result, Tensor};
use fractal_protocol::manifest::{BetaSchedule, PredictionType, SchedulerSpec, TimestepSpacing};

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
pub fn alphas_cumprod(spec: &SchedulerSpec) -> Vec<f64> {
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
    SchedulerSpec {
        kind: fractal_protocol::manifest::SchedulerKind::Ddim,
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
fn trailing(train: usize, steps: usize) -> Vec<usize> {
    let ratio = train as f64 / steps as f64;
    (0..steps)
        .map(|i| ((train as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
        .collect()
}

/// The inference timesteps, highest first, as diffusers' `set_timesteps`.
pub fn timesteps(spec: &SchedulerSpec, steps: usize) -> Vec<usize> {
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
    pub fn new(spec: &SchedulerSpec, steps: usize) -> Self {
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

    fn ms_spec() -> SchedulerSpec {
        modelscope_ddim()
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
pub fn dpm_timesteps(spec: &SchedulerSpec, steps: usize) -> Vec<usize> {
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
    pub fn new(spec: &SchedulerSpec, steps: usize) -> Self {
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

/// The schedulers a manifest can name.
#[derive(Clone, Debug)]
pub enum Scheduler {
    Ddim(Ddim),
    DpmSolverPP(DpmSolverPP),
}

impl Scheduler {
    pub fn new(spec: &SchedulerSpec, steps: usize) -> Self {
        match spec.kind {
            fractal_protocol::manifest::SchedulerKind::Ddim => {
                Scheduler::Ddim(Ddim::new(spec, steps))
            }
            fractal_protocol::manifest::SchedulerKind::DpmSolverMultistep => {
                Scheduler::DpmSolverPP(DpmSolverPP::new(spec, steps))
            }
        }
    }

    pub fn timesteps(&self) -> &[usize] {
        match self {
            Scheduler::Ddim(s) => s.timesteps(),
            Scheduler::DpmSolverPP(s) => s.timesteps(),
        }
    }

    /// Step `index` of the schedule (at `timesteps()[index]`).
    pub fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        match self {
            Scheduler::Ddim(s) => {
                let t = s.timesteps()[index];
                s.step(model_output, t, sample)
            }
            Scheduler::DpmSolverPP(s) => s.step(model_output, index, sample),
        }
    }
}

/// diffusers' `scheduler_config.json` for a manifest's scheduler.
pub fn diffusers_scheduler_config(
    s: &fractal_protocol::manifest::SchedulerSpec,
) -> serde_json::Value {
    let class = match s.kind {
        fractal_protocol::manifest::SchedulerKind::Ddim => "DDIMScheduler",
        fractal_protocol::manifest::SchedulerKind::DpmSolverMultistep => {
            "DPMSolverMultistepScheduler"
        }
    };
    let mut v = serde_json::json!({
        "_class_name": class,
        "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": serde_json::to_value(s.beta_schedule).expect("json"),
        "prediction_type": serde_json::to_value(s.prediction_type).expect("json"),
        "steps_offset": s.steps_offset,
        "timestep_spacing": serde_json::to_value(s.timestep_spacing).expect("json"),
    });
    if s.kind == fractal_protocol::manifest::SchedulerKind::Ddim {
        v["clip_sample"] = s.clip_sample.into();
        v["set_alpha_to_one"] = s.set_alpha_to_one.into();
    }
    v
}

/// A diffusers `scheduler/scheduler_config.json` as a manifest scheduler spec
/// (diffusers' defaults for absent keys).
pub fn spec_from_folder(
    dir: &std::path::Path,
) -> std::result::Result<fractal_protocol::manifest::SchedulerSpec, crate::EngineError> {
    use fractal_protocol::manifest::*;
    let v: serde_json::Value = crate::io::read_json(dir, "scheduler/scheduler_config.json")?;
    let path = dir.join("scheduler/scheduler_config.json");
    let bad = |m: String| crate::EngineError::Config {
        path: path.clone(),
        message: m,
    };
    let kind = match v["_class_name"].as_str().unwrap_or("DDIMScheduler") {
        "DDIMScheduler" => SchedulerKind::Ddim,
        "DPMSolverMultistepScheduler" => SchedulerKind::DpmSolverMultistep,
        other => return Err(bad(format!("scheduler {other} is not supported"))),
    };
    let enum_of =
        |key: &str, default: &str| -> std::result::Result<serde_json::Value, crate::EngineError> {
            Ok(v.get(key).cloned().unwrap_or_else(|| default.into()))
        };
    let spec = SchedulerSpec {
        kind,
        num_train_timesteps: v["num_train_timesteps"].as_u64().unwrap_or(1000) as u32,
        beta_start: v["beta_start"].as_f64().unwrap_or(0.0001),
        beta_end: v["beta_end"].as_f64().unwrap_or(0.02),
        beta_schedule: serde_json::from_value(enum_of("beta_schedule", "linear")?)
            .map_err(|e| bad(e.to_string()))?,
        prediction_type: serde_json::from_value(enum_of("prediction_type", "epsilon")?)
            .map_err(|e| bad(e.to_string()))?,
        clip_sample: v["clip_sample"].as_bool().unwrap_or(true),
        set_alpha_to_one: v["set_alpha_to_one"].as_bool().unwrap_or(true),
        steps_offset: v["steps_offset"].as_u64().unwrap_or(0) as u32,
        timestep_spacing: serde_json::from_value(enum_of("timestep_spacing", "leading")?)
            .map_err(|e| bad(e.to_string()))?,
    };
    Ok(spec)
}
