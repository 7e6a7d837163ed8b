//! The components of a Wan 2.1 pipeline (T5/umT5 tokenizer and encoder,
//! `WanTransformer3DModel`, `AutoencoderKLWan`'s decoder), loaded from a
//! diffusers folder (`model_index.json` naming `WanPipeline`, per-component
//! `config.json`, single or sharded safetensors, `tokenizer/tokenizer.json`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::io::read_json;
use crate::models::autoencoder_kl_wan::{WanVaeConfig, WanVaeDecoder};
use crate::models::t5::{T5Config, T5Encoder};
use crate::models::t5_tokenizer::T5Tokenizer;
use crate::models::wan_transformer::{PreparedText, WanTransformer, WanTransformerConfig};
use crate::{profile, EngineError};

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfigs {
    pub text: T5Config,
    pub transformer: WanTransformerConfig,
    pub vae: WanVaeConfig,
}

/// Tokenizer, text encoder, transformer and VAE decoder, ready to run.
pub struct Model {
    pub tokenizer: T5Tokenizer,
    pub text_encoder: T5Encoder,
    pub transformer: WanTransformer,
    pub vae: WanVaeDecoder,
    pub configs: ModelConfigs,
    pub device: Device,
    /// What the networks compute in (see [`crate::precision`]).
    pub dtype: DType,
    /// The prompts' prepared texts: every step of a generation (and the
    /// unconditional pass) reuses them.
    prepared: PreparedTexts,
}

/// Component folder and file stem of each weight file (single, or shards
/// beside `{stem}.safetensors.index.json`).
pub(crate) const TEXT_WEIGHTS: (&str, &str) = ("text_encoder", "model");
pub(crate) const TRANSFORMER_WEIGHTS: (&str, &str) = ("transformer", "diffusion_pytorch_model");
pub(crate) const VAE_WEIGHTS: (&str, &str) = ("vae", "diffusion_pytorch_model");

impl Model {
    /// Loads a diffusers-layout `WanPipeline` folder in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EngineError> {
        Self::load_in(dir, DType::F32, device)
    }

    /// [`Model::load`] computing in `dtype`.
    pub fn load_in(dir: &Path, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let class = crate::io::pipeline_class(dir)?;
        if class != "WanPipeline" {
            return Err(EngineError::Config {
                path: dir.join("model_index.json"),
                message: format!("pipeline {class} is not WanPipeline"),
            });
        }
        let configs = ModelConfigs {
            text: read_json(dir, "text_encoder/config.json")?,
            transformer: read_json(dir, "transformer/config.json")?,
            vae: read_json(dir, "vae/config.json")?,
        };
        let unsupported = |rel: &str, why: Option<String>| match why {
            Some(message) => Err(EngineError::Config {
                path: dir.join(rel),
                message,
            }),
            None => Ok(()),
        };
        unsupported("transformer/config.json", configs.transformer.unsupported())?;
        unsupported("vae/config.json", configs.vae.unsupported())?;
        let tokenizer = T5Tokenizer::from_file(&dir.join("tokenizer/tokenizer.json"))?;
        Self::assemble(
            configs,
            tokenizer,
            dir,
            device,
            dtype,
            |(component, stem)| {
                crate::io::weights::component_weights(&dir.join(component), stem, dtype, device)
            },
        )
    }

    /// The models from `configs` and each component's weights (`weights`
    /// of a `(folder, file stem)`, given in `dtype`), checked to fit each
    /// other; `origin` names the folder (or built-in model) in errors.
    pub(crate) fn assemble(
        configs: ModelConfigs,
        tokenizer: T5Tokenizer,
        origin: &Path,
        device: &Device,
        dtype: DType,
        weights: impl Fn((&str, &str)) -> Result<VarBuilder<'static>, EngineError>,
    ) -> Result<Self, EngineError> {
        let build = |(component, _): (&str, &str), e: candle_core::Error| EngineError::Weights {
            path: origin.join(component),
            message: e.to_string(),
        };
        let text_encoder = T5Encoder::new(weights(TEXT_WEIGHTS)?, configs.text.clone())
            .map_err(|e| build(TEXT_WEIGHTS, e))?;
        let transformer =
            WanTransformer::new(weights(TRANSFORMER_WEIGHTS)?, configs.transformer.clone())
                .map_err(|e| build(TRANSFORMER_WEIGHTS, e))?;
        let vae = WanVaeDecoder::new(weights(VAE_WEIGHTS)?, configs.vae.clone())
            .map_err(|e| build(VAE_WEIGHTS, e))?;
        Self::check_consistent(&configs, &tokenizer, origin)?;
        Ok(Self::new(
            tokenizer,
            text_encoder,
            transformer,
            vae,
            configs,
            device,
            dtype,
        ))
    }

    /// A model of components built elsewhere (unchecked), whose weights are
    /// `dtype`.
    pub fn new(
        tokenizer: T5Tokenizer,
        text_encoder: T5Encoder,
        transformer: WanTransformer,
        vae: WanVaeDecoder,
        configs: ModelConfigs,
        device: &Device,
        dtype: DType,
    ) -> Self {
        Model {
            tokenizer,
            text_encoder,
            transformer,
            vae,
            configs,
            device: device.clone(),
            dtype,
            prepared: PreparedTexts::default(),
        }
    }

    /// The components must fit each other: text width, latent channels, and
    /// a vocabulary the encoder can embed.
    fn check_consistent(
        c: &ModelConfigs,
        tokenizer: &T5Tokenizer,
        dir: &Path,
    ) -> Result<(), EngineError> {
        let bad = |message: String| EngineError::Config {
            path: dir.to_path_buf(),
            message,
        };
        if c.transformer.text_dim != c.text.d_model {
            return Err(bad(format!(
                "the transformer's text_dim {} is not the text encoder's d_model {}",
                c.transformer.text_dim, c.text.d_model
            )));
        }
        if c.transformer.in_channels != c.vae.z_dim || c.transformer.out_channels() != c.vae.z_dim {
            return Err(bad(format!(
                "the transformer's channels ({} in, {} out) are not the VAE's z_dim {}",
                c.transformer.in_channels,
                c.transformer.out_channels(),
                c.vae.z_dim
            )));
        }
        if tokenizer.vocab_size() > c.text.vocab_size {
            return Err(bad(format!(
                "the tokenizer has {} tokens, the text encoder embeds {}",
                tokenizer.vocab_size(),
                c.text.vocab_size
            )));
        }
        Ok(())
    }

    /// The conditioning for one prompt's token ids (padded to the text
    /// length the model is run with), of which the first `valid` are the
    /// prompt: `[1, len, d_model]`, the padding rows exactly zero, as
    /// WanPipeline pads the encoder's states.
    pub fn encode_ids(&self, ids: &[u32], valid: usize) -> Result<Tensor, EngineError> {
        if valid == 0 || valid > ids.len() {
            return Err(EngineError::BadInput(format!(
                "{valid} prompt tokens of {} ids",
                ids.len()
            )));
        }
        // WanPipeline runs the encoder over all `ids.len()` positions and
        // zeroes the padding rows after. The padding keys are masked out
        // (their weights underflow to exactly 0), so the prompt's rows only
        // depend on the prompt's tokens: encoding those alone gives the same
        // rows (within rounding) for a fraction of the work, 512 positions
        // against a prompt's few dozen.
        let t = Tensor::new(&ids[..valid], &self.device)?.unsqueeze(0)?;
        let states = profile::time("umt5", || self.text_encoder.forward(&t, &[valid]))?;
        Ok(states
            .to_dtype(DType::F32)?
            .pad_with_zeros(1, 0, ids.len() - valid)?)
    }

    /// The guided velocity at `timestep` for `latents` `[1, C, F, h, w]`:
    /// the conditional pass, and with `guidance > 1` the unconditional one
    /// (`uncond`) combined as `uncond + g·(cond − uncond)`; two passes, as
    /// WanPipeline runs them.
    pub fn velocity(
        &self,
        latents: &Tensor,
        timestep: f32,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        guidance: f64,
    ) -> Result<Tensor, EngineError> {
        // The transformer runs in the model's dtype; its velocity is widened
        // back, and guidance combines it in f32 (see `crate::precision`).
        let latents = latents.to_dtype(self.dtype)?;
        let forward = |text: &Tensor| -> Result<Tensor, EngineError> {
            let text = self.prepared.get(text, |t| {
                self.transformer.prepare_text(&t.to_dtype(self.dtype)?)
            })?;
            Ok(self
                .transformer
                .forward_prepared(&latents, &[timestep], &text)?
                .to_dtype(DType::F32)?)
        };
        let c = forward(cond)?;
        match uncond {
            Some(u) if guidance > 1.0 => {
                let u = forward(u)?;
                Ok((&u + ((c - &u)? * guidance)?)?)
            }
            _ => Ok(c),
        }
    }

    /// Final latents `[1, z, f, h, w]` to frames `[1 + t(f−1), 3, H, W]`
    /// in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        // Rounded to the model's dtype first, then denormalised in it, as
        // WanPipeline does.
        let z = self.vae.denormalize(&latents.to_dtype(self.dtype)?)?;
        let video = self.vae.decode(&z)?.to_dtype(DType::F32)?;
        let frames = video.squeeze(0)?.permute((1, 0, 2, 3))?;
        Ok(((frames * 0.5)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}

/// The last prompts' [`PreparedText`]s, found by the exact bits of the text
/// encoder's states they were made from (so a reused one is what preparing
/// again would give). Two: a guided generation's prompt and negative prompt.
#[derive(Default)]
struct PreparedTexts(Mutex<Vec<(TextKey, Arc<PreparedText>)>>);

#[derive(PartialEq)]
struct TextKey {
    dims: Vec<usize>,
    bits: Vec<u32>,
}

impl PreparedTexts {
    const KEPT: usize = 2;

    fn get(
        &self,
        text: &Tensor,
        prepare: impl FnOnce(&Tensor) -> candle_core::Result<PreparedText>,
    ) -> Result<Arc<PreparedText>, EngineError> {
        let key = TextKey {
            dims: text.dims().to_vec(),
            bits: text
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect(),
        };
        let lock = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = lock().iter().find(|(k, _)| *k == key) {
            return Ok(p.clone());
        }
        // Prepared outside the lock: concurrent jobs do not wait on each other.
        let prepared = Arc::new(prepare(text)?);
        let mut kept = lock();
        kept.push((key, prepared.clone()));
        if kept.len() > Self::KEPT {
            kept.remove(0);
        }
        Ok(prepared)
    }
}
