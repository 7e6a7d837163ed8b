//! diffusers' `TextToVideoSDPipeline` (ModelScope text-to-video, Zeroscope):
//! prompt → CLIP embeddings → UNet3D denoising with CFG → VAE decode per
//! frame. DDIM (eta = 0) and DPM-Solver++ add no randomness.

use candle_core::{DType, Tensor};
use fractal_protocol::manifest::SchedulerSpec;

use crate::pipelines::GenerateSpec;
use crate::schedulers::Scheduler;
use crate::EngineError;

pub mod model;

pub use model::Model;

/// diffusers' `TextToVideoSDPipeline` on its [`Model`].
pub struct TextToVideoSd {
    pub model: Model,
    pub scheduler: SchedulerSpec,
}

impl TextToVideoSd {
    pub fn new(model: Model, scheduler: SchedulerSpec) -> Self {
        TextToVideoSd { model, scheduler }
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

    /// `[1, tokens]` ids to `[1, tokens, hidden]` embeddings (computed in
    /// the model's dtype, given as f32 like every tensor the roles see).
    pub fn encode_prompt(&self, ids: &[u32]) -> Result<Tensor, EngineError> {
        let t = Tensor::new(ids, &self.model.device)?.unsqueeze(0)?;
        self.encode(&t)
    }

    fn encode(&self, ids: &Tensor) -> Result<Tensor, EngineError> {
        Ok(self.model.text_encoder.forward(ids)?.to_dtype(DType::F32)?)
    }

    /// The conditioning the UNet sees: `[uncond; cond]` with CFG, else `cond`.
    pub fn context(&self, spec: &GenerateSpec) -> Result<Tensor, EngineError> {
        let prompt = self.model.tokenizer.encode(&spec.prompt)?;
        if spec.guidance_scale <= 1.0 {
            return self.encode_prompt(&prompt);
        }
        let negative = self.model.tokenizer.encode(&spec.negative_prompt)?;
        self.encode_prompts(&negative, &prompt)
    }

    /// `[uncond; cond]` embeddings from token ids.
    pub fn encode_prompts(&self, negative: &[u32], prompt: &[u32]) -> Result<Tensor, EngineError> {
        if negative.len() == prompt.len() {
            // One pass over both prompts: the text encoder's weights (1.4 GB
            // in ModelScope's) are read once instead of twice.
            let ids: Vec<u32> = [negative, prompt].concat();
            let ids = Tensor::from_vec(ids, (2, prompt.len()), &self.model.device)?;
            return self.encode(&ids);
        }
        let cond = self.encode_prompt(prompt)?;
        let uncond = self.encode_prompt(negative)?;
        Ok(Tensor::cat(&[&uncond, &cond], 0)?)
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
        let timestep = scheduler.timestep(index).ok_or_else(|| {
            EngineError::BadInput(format!(
                "step {index} is outside a {}-step schedule",
                scheduler.len()
            ))
        })?;
        let cfg = guidance > 1.0;
        // The UNet runs in the model's dtype; its prediction is widened
        // back, and guidance combines it in f32 (see `crate::precision`).
        let latents = latents.to_dtype(self.model.dtype)?;
        let input = if cfg {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents
        };
        let eps = self
            .model
            .unet
            .forward(&input, timestep, &context.to_dtype(self.model.dtype)?)?
            .to_dtype(DType::F32)?;
        Ok(if cfg {
            let (u, c) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
            (&u + ((c - &u)? * guidance)?)?
        } else {
            eps
        })
    }

    pub fn scheduler_for(&self, steps: usize) -> Result<Scheduler, EngineError> {
        crate::schedulers::for_steps(&self.scheduler, steps)
    }

    /// Decodes `[1, C, F, h, w]` latents frame by frame to `[F, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        let (_, _, f, _, _) = latents.dims5()?;
        // Rounded to the model's dtype, then scaled in it (as diffusers'
        // pipeline holds its latents in the model's dtype).
        let scaled = (latents.to_dtype(self.model.dtype)? / self.model.configs.vae.scaling_factor)?;
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
        let one = (latents.narrow(2, frame, 1)?.to_dtype(self.model.dtype)?
            / self.model.configs.vae.scaling_factor)?;
        self.decode_frame_scaled(&one, 0)
    }

    fn decode_frame_scaled(&self, scaled: &Tensor, frame: usize) -> Result<Tensor, EngineError> {
        let z = scaled.narrow(2, frame, 1)?.squeeze(2)?;
        let img = self.model.vae.decode(&z)?.to_dtype(DType::F32)?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}

/// A manifest for an unpinned TextToVideoSD folder: the tiny model's, with
/// the folder's scheduler and sizes in steps of 64 pixels up to 1024.
pub fn unpinned_manifest(
    dir: &std::path::Path,
    model: &Model,
) -> Result<fractal_protocol::ModelManifest, EngineError> {
    let mut m = crate::builtin::tiny::manifest(crate::TinyVariant::Base);
    m.name = dir.display().to_string();
    m.scheduler = crate::schedulers::spec_from_folder(dir)?;
    crate::pipelines::open_limits(&mut m, model.configs.vae.scale_factor() as u32 * 8);
    m.limits.max_frames = 64;
    m.defaults.frames = 16;
    Ok(m)
}
