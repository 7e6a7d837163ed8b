//! Noise schedulers, matching diffusers' configs and step math.
//!
//! Scalars are computed in f64 and applied to f32 latents; every step is a
//! pure function of (model output, timestep, sample), so a verifier can
//! recompute any single DDIM step from the revealed latents.

use candle_core::{Result, Tensor};
use fractal_protocol::manifest::SchedulerSpec;

mod ddim;
mod dpm_solver;
pub mod flow_match;
pub mod unipc;

pub use ddim::{alphas_cumprod, modelscope_ddim, timesteps, Ddim};
pub use dpm_solver::{dpm_timesteps, DpmSolverPP};
pub use flow_match::FlowMatchEuler;
pub use unipc::UniPc;

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
