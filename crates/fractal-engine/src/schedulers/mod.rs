//! Noise schedulers, matching diffusers' configs and step math.
//!
//! Scalars are computed in f64 and applied to f32 latents; every step is a
//! pure function of (model output, timestep, sample), so a verifier can
//! recompute any single-step scheduler's step (DDIM, flow-matching Euler)
//! from the revealed latents, and a multistep one's from the history it opens.

use candle_core::{Result, Tensor};
use fractal_protocol::manifest::SchedulerSpec;

mod ddim;
mod dpm_solver;
pub mod flow_match;
pub mod unipc;

pub use ddim::{alphas_cumprod, modelscope_ddim, modelscope_schedule, timesteps, Ddim};
pub use dpm_solver::{dpm_timesteps, DpmSolverPP};
pub use flow_match::FlowMatchEuler;
pub use unipc::UniPc;

use fractal_protocol::manifest::{
    BetaSchedule, DdpmSchedule, FlowSchedule, PredictionType, SchedulerKind, TimestepSpacing,
};

/// The schedulers a manifest can name, set up for one generation.
#[derive(Clone, Debug)]
pub enum Scheduler {
    Ddim(Ddim),
    DpmSolverPP(DpmSolverPP),
    FlowMatchEuler(FlowMatchEuler),
    UniPc(UniPc),
}

impl Scheduler {
    pub fn new(spec: &SchedulerSpec, steps: usize) -> Self {
        match spec {
            SchedulerSpec::Ddim(d) => Scheduler::Ddim(Ddim::new(d, steps)),
            SchedulerSpec::DpmSolverMultistep(d) => {
                Scheduler::DpmSolverPP(DpmSolverPP::new(d, steps))
            }
            SchedulerSpec::FlowMatchEuler(f) => Scheduler::FlowMatchEuler(FlowMatchEuler::new(
                f.num_train_timesteps,
                f.shift,
                steps,
            )),
            SchedulerSpec::UniPcMultistep(f) => {
                Scheduler::UniPc(UniPc::new(f.num_train_timesteps, f.shift, steps))
            }
        }
    }

    /// Steps in the schedule.
    pub fn len(&self) -> usize {
        match self {
            Scheduler::Ddim(s) => s.timesteps().len(),
            Scheduler::DpmSolverPP(s) => s.timesteps().len(),
            Scheduler::FlowMatchEuler(s) => s.timesteps().len(),
            Scheduler::UniPc(s) => s.timesteps().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The timestep the denoiser is told at step `index` (DDPM schedulers'
    /// are integers, flow schedulers' `σ·T`).
    pub fn timestep(&self, index: usize) -> Option<f64> {
        match self {
            Scheduler::Ddim(s) => s.timesteps().get(index).map(|&t| t as f64),
            Scheduler::DpmSolverPP(s) => s.timesteps().get(index).map(|&t| t as f64),
            Scheduler::FlowMatchEuler(s) => s.timesteps().get(index).map(|&t| t as f64),
            Scheduler::UniPc(s) => s.timesteps().get(index).map(|&t| t as f64),
        }
    }

    /// Sets a fresh schedule up to take step `index` from `sample` as if
    /// it had taken the steps before, from the latents and model outputs
    /// of the `SchedulerKind::audit_history` steps before `index` (oldest
    /// first): how a verifier recomputes one step of a multistep solver
    /// from a trace's openings.
    pub fn resume(
        &mut self,
        index: usize,
        history: &[(Tensor, Tensor)],
        sample: &Tensor,
    ) -> Result<()> {
        match (self, history) {
            (Scheduler::Ddim(_) | Scheduler::FlowMatchEuler(_), []) => Ok(()),
            (Scheduler::DpmSolverPP(_), []) if index == 0 => Ok(()),
            // The update only keeps the previous data prediction.
            (Scheduler::DpmSolverPP(s), [(x, out)]) if index > 0 => {
                s.step(out, index - 1, x).map(|_| ())
            }
            (Scheduler::UniPc(s), history) => s.resume(index, history, sample),
            (_, history) => candle_core::bail!(
                "step {index} resumes from {} earlier steps, which this scheduler does not take",
                history.len()
            ),
        }
    }

    /// Step `index` of the schedule (at `timestep(index)`).
    pub fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        match self {
            Scheduler::Ddim(s) => {
                let Some(&t) = s.timesteps().get(index) else {
                    candle_core::bail!(
                        "step {index} is outside a {}-step schedule",
                        s.timesteps().len()
                    );
                };
                s.step(model_output, t, sample)
            }
            Scheduler::DpmSolverPP(s) => s.step(model_output, index, sample),
            Scheduler::FlowMatchEuler(s) => s.step(model_output, index, sample),
            Scheduler::UniPc(s) => s.step(model_output, index, sample),
        }
    }
}

/// The schedule for `steps` steps, or a clear error if `spec` has fewer
/// training timesteps.
pub fn for_steps(
    spec: &SchedulerSpec,
    steps: usize,
) -> std::result::Result<Scheduler, crate::EngineError> {
    let train = spec.num_train_timesteps() as usize;
    if steps == 0 || steps > train {
        return Err(crate::EngineError::BadInput(format!(
            "steps must be 1..={train}"
        )));
    }
    Ok(Scheduler::new(spec, steps))
}

/// diffusers' `scheduler_config.json` for a manifest's scheduler.
pub fn diffusers_scheduler_config(s: &SchedulerSpec) -> serde_json::Value {
    fn json(v: impl serde::Serialize) -> serde_json::Value {
        serde_json::to_value(v).expect("json")
    }
    match s {
        SchedulerSpec::Ddim(d) | SchedulerSpec::DpmSolverMultistep(d) => {
            let mut v = serde_json::json!({
                "_class_name": if s.kind() == SchedulerKind::Ddim { "DDIMScheduler" } else { "DPMSolverMultistepScheduler" },
                "num_train_timesteps": d.num_train_timesteps,
                "beta_start": d.beta_start,
                "beta_end": d.beta_end,
                "beta_schedule": json(d.beta_schedule),
                "prediction_type": json(d.prediction_type),
                "steps_offset": d.steps_offset,
                "timestep_spacing": json(d.timestep_spacing),
            });
            if s.kind() == SchedulerKind::Ddim {
                v["clip_sample"] = d.clip_sample.into();
                v["set_alpha_to_one"] = d.set_alpha_to_one.into();
            }
            v
        }
        SchedulerSpec::FlowMatchEuler(f) => serde_json::json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": f.num_train_timesteps,
            "shift": f.shift,
            "use_dynamic_shifting": false,
        }),
        // What Wan's folders configure (see `unipc`): every key this
        // implementation depends on, at the value it implements.
        SchedulerSpec::UniPcMultistep(f) => serde_json::json!({
            "_class_name": "UniPCMultistepScheduler",
            "num_train_timesteps": f.num_train_timesteps,
            "flow_shift": f.shift,
            "use_flow_sigmas": true,
            "prediction_type": "flow_prediction",
            "predict_x0": true,
            "solver_order": 2,
            "solver_type": "bh2",
            "lower_order_final": true,
            "final_sigmas_type": "zero",
            "timestep_spacing": "linspace",
            "disable_corrector": [],
            "thresholding": false,
        }),
    }
}

/// A diffusers `scheduler/scheduler_config.json` as a manifest scheduler spec
/// (diffusers' defaults for absent keys). Settings this engine does not
/// implement are refused, not ignored.
pub fn spec_from_folder(
    dir: &std::path::Path,
) -> std::result::Result<SchedulerSpec, crate::EngineError> {
    let v: serde_json::Value = crate::io::read_json(dir, "scheduler/scheduler_config.json")?;
    let path = dir.join("scheduler/scheduler_config.json");
    let bad = |m: String| crate::EngineError::Config {
        path: path.clone(),
        message: m,
    };
    let num_train_timesteps = v["num_train_timesteps"].as_u64().unwrap_or(1000) as u32;
    // A key that must be absent or hold the one value implemented here.
    let require =
        |key: &str, want: serde_json::Value| -> std::result::Result<(), crate::EngineError> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(()),
                Some(got) if *got == want => Ok(()),
                Some(got) => Err(bad(format!("{key} = {got} is not supported (only {want})"))),
            }
        };
    let class = v["_class_name"].as_str().unwrap_or("DDIMScheduler");
    match class {
        "DDIMScheduler" | "DPMSolverMultistepScheduler" => {
            let enum_of = |key: &str, default: &str| -> serde_json::Value {
                v.get(key).cloned().unwrap_or_else(|| default.into())
            };
            let d = DdpmSchedule {
                num_train_timesteps,
                beta_start: v["beta_start"].as_f64().unwrap_or(0.0001),
                beta_end: v["beta_end"].as_f64().unwrap_or(0.02),
                beta_schedule: serde_json::from_value::<BetaSchedule>(enum_of(
                    "beta_schedule",
                    "linear",
                ))
                .map_err(|e| bad(e.to_string()))?,
                prediction_type: serde_json::from_value::<PredictionType>(enum_of(
                    "prediction_type",
                    "epsilon",
                ))
                .map_err(|e| bad(e.to_string()))?,
                clip_sample: v["clip_sample"].as_bool().unwrap_or(true),
                set_alpha_to_one: v["set_alpha_to_one"].as_bool().unwrap_or(true),
                steps_offset: v["steps_offset"].as_u64().unwrap_or(0) as u32,
                timestep_spacing: serde_json::from_value::<TimestepSpacing>(enum_of(
                    "timestep_spacing",
                    "leading",
                ))
                .map_err(|e| bad(e.to_string()))?,
            };
            Ok(if class == "DDIMScheduler" {
                SchedulerSpec::Ddim(d)
            } else {
                SchedulerSpec::DpmSolverMultistep(d)
            })
        }
        "FlowMatchEulerDiscreteScheduler" => {
            for key in [
                "use_dynamic_shifting",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "invert_sigmas",
                "stochastic_sampling",
            ] {
                require(key, false.into())?;
            }
            require("shift_terminal", serde_json::Value::Null)?;
            Ok(SchedulerSpec::FlowMatchEuler(FlowSchedule {
                num_train_timesteps,
                shift: v["shift"].as_f64().unwrap_or(1.0),
            }))
        }
        "UniPCMultistepScheduler" => {
            if v.get("use_flow_sigmas") != Some(&true.into()) {
                return Err(bad(
                    "UniPC without use_flow_sigmas (on DDPM betas) is not supported".into(),
                ));
            }
            require("prediction_type", "flow_prediction".into())?;
            require("predict_x0", true.into())?;
            require("solver_order", 2.into())?;
            require("solver_type", "bh2".into())?;
            require("lower_order_final", true.into())?;
            require("final_sigmas_type", "zero".into())?;
            require("thresholding", false.into())?;
            require("use_karras_sigmas", false.into())?;
            require("use_exponential_sigmas", false.into())?;
            require("use_beta_sigmas", false.into())?;
            require("solver_p", serde_json::Value::Null)?;
            if v.get("disable_corrector")
                .and_then(|d| d.as_array())
                .is_some_and(|d| !d.is_empty())
            {
                return Err(bad("disable_corrector is not supported".into()));
            }
            Ok(SchedulerSpec::UniPcMultistep(FlowSchedule {
                num_train_timesteps,
                shift: v["flow_shift"].as_f64().unwrap_or(1.0),
            }))
        }
        other => Err(bad(format!("scheduler {other} is not supported"))),
    }
}
