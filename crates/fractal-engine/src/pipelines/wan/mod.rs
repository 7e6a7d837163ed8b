//! diffusers' `WanPipeline` (Wan 2.1 text-to-video): the prompt cleaned and
//! tokenized to the manifest's text length, through umT5 (rows past the
//! prompt zeroed, as the pipeline pads them); the transformer's velocity
//! with classifier-free guidance (two passes, `uncond + g·(cond − uncond)`)
//! stepped by a flow scheduler; the VAE decode of the denormalised latents,
//! causal in time, to `1 + t·k` frames in `[0, 1]`.

use candle_core::Tensor;
use fractal_protocol::manifest::{SchedulerSpec, Size, WanSpec};

use crate::pipelines::GenerateSpec;
use crate::schedulers::Scheduler;
use crate::EngineError;

pub mod model;

pub use model::Model;

/// diffusers' `WanPipeline` on its [`Model`], run as the manifest says.
pub struct Wan {
    pub model: Model,
    pub scheduler: SchedulerSpec,
    pub spec: WanSpec,
}

/// WanPipeline's `prompt_clean`: HTML entities decoded (twice, as it does),
/// runs of whitespace made one space, the ends trimmed. (It also runs ftfy
/// when installed, which repairs mis-decoded text; prompts that arrive as
/// valid UTF-8 JSON strings have none to repair.)
pub fn clean_prompt(text: &str) -> String {
    let once = htmlize::unescape(text);
    let twice = htmlize::unescape(once.as_ref());
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Wan {
    /// The manifest's shape constants must be the folder's.
    pub fn new(model: Model, scheduler: SchedulerSpec, spec: WanSpec) -> Result<Self, EngineError> {
        let c = &model.configs;
        let patch = c.transformer.patch_size.map(|p| p as u32);
        let (t, s) = (c.vae.temporal_scale() as u32, c.vae.spatial_scale() as u32);
        if patch != spec.patch_size || t != spec.vae_scale_temporal || s != spec.vae_scale_spatial {
            return Err(EngineError::BadInput(format!(
                "the manifest says patch {:?} and VAE scales {}x{}, the model has patch {patch:?} and VAE scales {t}x{s}",
                spec.patch_size, spec.vae_scale_temporal, spec.vae_scale_spatial
            )));
        }
        Ok(Wan {
            model,
            scheduler,
            spec,
        })
    }

    /// Latent shape `[1, z, 1 + (F − 1)/t, H/s, W/s]`, or why the request
    /// cannot be made.
    pub fn latent_shape(
        &self,
        frames: usize,
        height: usize,
        width: usize,
    ) -> Result<(usize, usize, usize, usize, usize), EngineError> {
        let size = Size {
            width: u32::try_from(width).unwrap_or(u32::MAX),
            height: u32::try_from(height).unwrap_or(u32::MAX),
        };
        if frames == 0 || height == 0 || width == 0 {
            return Err(EngineError::BadInput(format!(
                "{frames} frames of {size}: need at least one frame and a size"
            )));
        }
        self.spec
            .check_shape(u32::try_from(frames).unwrap_or(u32::MAX), size)
            .map_err(EngineError::BadInput)?;
        let (t, s) = (
            self.spec.vae_scale_temporal as usize,
            self.spec.vae_scale_spatial as usize,
        );
        Ok((
            1,
            self.model.configs.transformer.in_channels,
            (frames - 1) / t + 1,
            height / s,
            width / s,
        ))
    }

    /// One prompt's conditioning `[1, text_length, d_model]`.
    pub fn encode_prompt(&self, text: &str) -> Result<Tensor, EngineError> {
        let tokens = self
            .model
            .tokenizer
            .encode(&clean_prompt(text), self.spec.text_length as usize)?;
        self.model.encode_ids(&tokens.ids, tokens.valid)
    }

    /// `[uncond; cond]` with CFG, else `cond`.
    pub fn context(&self, spec: &GenerateSpec) -> Result<Tensor, EngineError> {
        let cond = self.encode_prompt(&spec.prompt)?;
        if spec.guidance_scale <= 1.0 {
            return Ok(cond);
        }
        let uncond = self.encode_prompt(&spec.negative_prompt)?;
        Ok(Tensor::cat(&[&uncond, &cond], 0)?)
    }

    /// The guided velocity at step `index`: what a verifier recomputes.
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
        let rows = context.dim(0)?;
        let cond = context.narrow(0, rows - 1, 1)?;
        let uncond = if rows == 2 {
            Some(context.narrow(0, 0, 1)?)
        } else {
            None
        };
        self.model
            .velocity(latents, timestep as f32, &cond, uncond.as_ref(), guidance)
    }

    pub fn scheduler_for(&self, steps: usize) -> Result<Scheduler, EngineError> {
        crate::schedulers::for_steps(&self.scheduler, steps)
    }

    /// Decodes `[1, z, f, h, w]` latents to `[F, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        self.model.decode(latents)
    }

    /// Decodes output frame `frame` (`[1, 3, H, W]` in `[0, 1]`). The VAE
    /// is causal in time, so decoding the latent frames up to the one that
    /// makes it gives exactly the whole clip's frame.
    pub fn decode_frame(&self, latents: &Tensor, frame: usize) -> Result<Tensor, EngineError> {
        let t = self.spec.vae_scale_temporal as usize;
        let latent = if frame == 0 { 0 } else { (frame - 1) / t + 1 };
        let have = latents.dim(2)?;
        if latent >= have {
            return Err(EngineError::BadInput(format!(
                "frame {frame} is past the clip's {} frames",
                1 + t * (have - 1)
            )));
        }
        let frames = self.model.decode(&latents.narrow(2, 0, latent + 1)?)?;
        Ok(frames.narrow(0, frame, 1)?)
    }
}

/// A manifest for an unpinned Wan folder: the folder's scheduler and shape
/// constants, the released models' 512-token text, sizes in steps of four
/// patches' pixels (64 for Wan 2.1) up to 1024, up to 81 frames.
pub fn unpinned_manifest(
    dir: &std::path::Path,
    model: &Model,
) -> Result<fractal_protocol::ModelManifest, EngineError> {
    use crate::builtin::tiny_wan::{manifest, WanVariant};
    use fractal_protocol::manifest::Architecture;
    let c = &model.configs;
    let mut m = manifest(WanVariant::Tiny);
    m.name = dir.display().to_string();
    m.scheduler = crate::schedulers::spec_from_folder(dir)?;
    let spec = WanSpec {
        text_length: 512,
        patch_size: c.transformer.patch_size.map(|p| p as u32),
        vae_scale_temporal: c.vae.temporal_scale() as u32,
        vae_scale_spatial: c.vae.spatial_scale() as u32,
    };
    m.architecture = Architecture::Wan(spec);
    let s = spec.vae_scale_spatial * spec.patch_size[1].max(spec.patch_size[2]) * 4;
    crate::pipelines::open_limits(&mut m, s);
    m.defaults.frames = m.frames_at_least(17);
    m.limits.max_frames = m.frames_at_least(81);
    m.validate()
        .map_err(|e| EngineError::BadInput(format!("{}: {e}", dir.display())))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    #[test]
    fn prompts_are_cleaned_as_wan_pipeline_does() {
        use super::clean_prompt;
        assert_eq!(clean_prompt("  a\tred \n\n fox  "), "a red fox");
        assert_eq!(clean_prompt("cats &amp; dogs"), "cats & dogs");
        // Unescaped twice: an escaped entity becomes the character.
        assert_eq!(clean_prompt("&amp;lt;3"), "<3");
        assert_eq!(clean_prompt("caf&eacute; &#233;"), "café é");
        assert_eq!(clean_prompt(""), "");
    }
}
