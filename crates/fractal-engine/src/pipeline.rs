//! TextToVideoSD: prompt → CLIP embeddings → denoising loop with CFG → VAE
//! decode per frame. Deterministic: the only randomness is the seeded initial
//! noise (`fractal/noise/v1`); DDIM (eta = 0) and DPM-Solver++ add none.

use candle_core::Tensor;
use fractal_protocol::manifest::{SchedulerKind, SchedulerSpec};
use fractal_protocol::merkle::TraceDigests;
use fractal_protocol::noise::{fill_gaussian, Stream};
use fractal_protocol::Seed;

use crate::model::Model;
use crate::scheduler::Scheduler;
use crate::EngineError;

/// What to generate, with the prompt already tokenized (77 ids each).
#[derive(Clone, Debug)]
pub struct GenerateSpec {
    pub prompt_ids: Vec<u32>,
    pub negative_ids: Vec<u32>,
    pub seed: Seed,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance_scale: f64,
}

/// Reported after the initial noise (`index` 0) and after every step.
pub struct StepEvent<'a> {
    pub index: usize,
    pub total: usize,
    /// The model output the step to `index` was computed from (the guided
    /// noise prediction, `[1, C, F, h, w]`); `None` for the initial noise.
    pub output: Option<&'a Tensor>,
    /// `[1, C, F, h, w]`, f32.
    pub latents: &'a Tensor,
}

impl StepEvent<'_> {
    /// Adds this event's trace leaves (the step's model output, then the
    /// latent after it) to `trace`, as every role commits them.
    fn commit_to(&self, trace: &mut TraceDigests) -> Result<(), EngineError> {
        if let Some(output) = self.output {
            trace.push(&values(output)?);
        }
        trace.push(&values(self.latents)?);
        Ok(())
    }
}

/// A tensor's f32 values in logical order.
pub fn values(t: &Tensor) -> Result<Vec<f32>, EngineError> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// One denoising step: what the model predicted and where the scheduler
/// went from it. Traces commit both (`fractal_protocol::merkle`).
pub struct Step {
    /// The model output fed to the scheduler (after CFG).
    pub output: Tensor,
    /// The latents after the step.
    pub latents: Tensor,
}

/// A generated clip: RGB frames in `[0, 1]` and the final latents.
pub struct Generated {
    /// `[F, 3, H, W]`, f32 in `[0, 1]`.
    pub frames: Tensor,
    pub final_latents: Tensor,
}

impl Generated {
    /// Frames as RGB8, `frames x height x width x 3`, rounded to nearest.
    pub fn rgb8(&self) -> Result<Vec<u8>, EngineError> {
        crate::pinned::rgb8(&self.frames)
    }
}

/// Largest absolute element difference of two same-shaped tensors (parity
/// checks, and a verifier comparing a recomputed step).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, EngineError> {
    if a.dims() != b.dims() {
        return Err(EngineError::BadInput(format!(
            "shapes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// diffusers' `scheduler_config.json` for a manifest's scheduler.
pub fn diffusers_scheduler_config(s: &SchedulerSpec) -> serde_json::Value {
    let class = match s.kind {
        SchedulerKind::Ddim => "DDIMScheduler",
        SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
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
    if s.kind == SchedulerKind::Ddim {
        v["clip_sample"] = s.clip_sample.into();
        v["set_alpha_to_one"] = s.set_alpha_to_one.into();
    }
    v
}

pub struct Pipeline {
    pub model: Model,
    pub scheduler: SchedulerSpec,
}

impl Pipeline {
    pub fn new(model: Model, scheduler: SchedulerSpec) -> Result<Self, EngineError> {
        Ok(Pipeline { model, scheduler })
    }

    /// Latent shape `[1, C, F, h, w]` for a request, or why it is invalid.
    pub fn latent_shape(
        &self,
        frames: usize,
        height: usize,
        width: usize,
    ) -> Result<(usize, usize, usize, usize, usize), EngineError> {
        let s = self.model.configs.vae.scale_factor();
        if frames == 0
            || height == 0
            || width == 0
            || !height.is_multiple_of(s)
            || !width.is_multiple_of(s)
        {
            return Err(EngineError::BadInput(format!("{frames} frames of {width}x{height}: need at least one frame and sides that are multiples of {s}")));
        }
        Ok((
            1,
            self.model.configs.unet.in_channels,
            frames,
            height / s,
            width / s,
        ))
    }

    /// `[1, tokens]` ids to `[1, tokens, hidden]` embeddings.
    pub fn encode_prompt(&self, ids: &[u32]) -> Result<Tensor, EngineError> {
        let t = Tensor::new(ids, &self.model.device)?.unsqueeze(0)?;
        Ok(self.model.text_encoder.forward(&t)?)
    }

    /// The conditioning the UNet sees: `[uncond; cond]` with CFG, else `cond`.
    pub fn context(&self, spec: &GenerateSpec) -> Result<Tensor, EngineError> {
        if spec.guidance_scale <= 1.0 {
            return self.encode_prompt(&spec.prompt_ids);
        }
        if spec.negative_ids.len() == spec.prompt_ids.len() {
            // One pass over both prompts: the text encoder's weights (1.4 GB
            // in ModelScope's) are read once instead of twice.
            let ids: Vec<u32> = [&spec.negative_ids[..], &spec.prompt_ids[..]].concat();
            let ids = Tensor::from_vec(ids, (2, spec.prompt_ids.len()), &self.model.device)?;
            return Ok(self.model.text_encoder.forward(&ids)?);
        }
        let cond = self.encode_prompt(&spec.prompt_ids)?;
        let uncond = self.encode_prompt(&spec.negative_ids)?;
        Ok(Tensor::cat(&[&uncond, &cond], 0)?)
    }

    /// The seeded initial latents x_T.
    pub fn initial_latents(&self, spec: &GenerateSpec) -> Result<Tensor, EngineError> {
        let shape = self.latent_shape(spec.frames, spec.height, spec.width)?;
        let n = shape.0 * shape.1 * shape.2 * shape.3 * shape.4;
        let mut v = vec![0f32; n];
        fill_gaussian(spec.seed, Stream::InitialLatents, &mut v);
        Ok(Tensor::from_vec(v, shape, &self.model.device)?)
    }

    /// One denoising step (`index` into the schedule): UNet with CFG, then the
    /// scheduler.
    pub fn denoise_step(
        &self,
        scheduler: &mut Scheduler,
        index: usize,
        latents: &Tensor,
        context: &Tensor,
        guidance: f64,
    ) -> Result<Step, EngineError> {
        let output = self.model_output(scheduler, index, latents, context, guidance)?;
        let latents = scheduler.step(&output, index, latents)?;
        Ok(Step { output, latents })
    }

    /// The model output at step `index` (UNet, then CFG with `guidance`
    /// over `context` = `[uncond; cond]`): the costly half of a step, and
    /// what a verifier recomputes to audit one.
    pub fn model_output(
        &self,
        scheduler: &Scheduler,
        index: usize,
        latents: &Tensor,
        context: &Tensor,
        guidance: f64,
    ) -> Result<Tensor, EngineError> {
        let timestep = *scheduler.timesteps().get(index).ok_or_else(|| {
            EngineError::BadInput(format!(
                "step {index} is outside a {}-step schedule",
                scheduler.timesteps().len()
            ))
        })?;
        let cfg = guidance > 1.0;
        let input = if cfg {
            Tensor::cat(&[latents, latents], 0)?
        } else {
            latents.clone()
        };
        let eps = self.model.unet.forward(&input, timestep as f64, context)?;
        Ok(if cfg {
            let (u, c) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
            (&u + ((c - &u)? * guidance)?)?
        } else {
            eps
        })
    }

    pub fn scheduler_for(&self, steps: usize) -> Result<Scheduler, EngineError> {
        if steps == 0 || steps > self.scheduler.num_train_timesteps as usize {
            return Err(EngineError::BadInput(format!(
                "steps must be 1..={}",
                self.scheduler.num_train_timesteps
            )));
        }
        Ok(Scheduler::new(&self.scheduler, steps))
    }

    /// Runs the whole pipeline, calling `on_step` with every latent of the trace.
    pub fn generate(
        &self,
        spec: &GenerateSpec,
        on_step: &mut dyn FnMut(StepEvent<'_>),
    ) -> Result<Generated, EngineError> {
        self.run(spec, &mut |e| {
            on_step(e);
            Ok(())
        })
    }

    /// Runs the whole pipeline and commits its trace as provers do (every
    /// step's model output and latent, see `fractal_protocol::merkle`);
    /// `on_step` sees every event too.
    pub fn generate_traced(
        &self,
        spec: &GenerateSpec,
        on_step: &mut dyn FnMut(&StepEvent<'_>),
    ) -> Result<(Generated, TraceDigests), EngineError> {
        let mut trace = TraceDigests::new();
        let generated = self.run(spec, &mut |e| {
            e.commit_to(&mut trace)?;
            on_step(&e);
            Ok(())
        })?;
        Ok((generated, trace))
    }

    fn run(
        &self,
        spec: &GenerateSpec,
        on_step: &mut dyn FnMut(StepEvent<'_>) -> Result<(), EngineError>,
    ) -> Result<Generated, EngineError> {
        let mut scheduler = self.scheduler_for(spec.steps)?;
        let mut latents = self.initial_latents(spec)?;
        let context = self.context(spec)?;
        let total = spec.steps;
        on_step(StepEvent {
            index: 0,
            total,
            output: None,
            latents: &latents,
        })?;
        for i in 0..spec.steps {
            let step =
                self.denoise_step(&mut scheduler, i, &latents, &context, spec.guidance_scale)?;
            latents = step.latents;
            on_step(StepEvent {
                index: i + 1,
                total,
                output: Some(&step.output),
                latents: &latents,
            })?;
        }
        let frames = self.decode(&latents)?;
        Ok(Generated {
            frames,
            final_latents: latents,
        })
    }

    /// Decodes `[1, C, F, h, w]` latents frame by frame to `[F, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        let (_, _, f, _, _) = latents.dims5()?;
        let scaled = (latents / self.model.configs.vae.scaling_factor)?;
        let mut out = Vec::with_capacity(f);
        for i in 0..f {
            out.push(self.decode_frame_scaled(&scaled, i)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Decodes one frame (`[1, 3, H, W]` in `[0, 1]`), as a verifier does to
    /// compare with the returned video.
    pub fn decode_frame(&self, latents: &Tensor, frame: usize) -> Result<Tensor, EngineError> {
        // Scale only the frame being decoded, not the whole clip.
        let one = (latents.narrow(2, frame, 1)? / self.model.configs.vae.scaling_factor)?;
        self.decode_frame_scaled(&one, 0)
    }

    fn decode_frame_scaled(&self, scaled: &Tensor, frame: usize) -> Result<Tensor, EngineError> {
        let z = scaled.narrow(2, frame, 1)?.squeeze(2)?;
        let img = self.model.vae.decode(&z)?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}
