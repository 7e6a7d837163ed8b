//! diffusers' `WanPipeline` (Wan 2.1 text-to-video), its pieces: the prompt
//! through umT5 (rows past the prompt's length zeroed, as the pipeline
//! pads them), the transformer's velocity with classifier-free guidance
//! (two passes, `uncond + g·(cond − uncond)`), and the VAE decode of the
//! denormalised latents to frames in `[0, 1]`.
//!
//! Not yet behind [`crate::Pipeline`]: the manifest has no Wan
//! architecture, tokenizer or built-in model so far; the parity tests drive
//! these pieces with diffusers' scheduler loop.

use candle_core::{Device, Tensor};

use crate::models::autoencoder_kl_wan::WanVaeDecoder;
use crate::models::t5::T5Encoder;
use crate::models::wan_transformer::WanTransformer;
use crate::EngineError;

/// Text encoder, transformer and VAE decoder of a Wan 2.1 folder.
pub struct Wan {
    pub text_encoder: T5Encoder,
    pub transformer: WanTransformer,
    pub vae: WanVaeDecoder,
    pub device: Device,
}

impl Wan {
    /// The conditioning for one prompt's token ids (padded to the text
    /// length the model is run with), of which the first `valid` are the
    /// prompt: `[1, len, d_model]`, the padding rows exactly zero.
    pub fn encode_ids(&self, ids: &[u32], valid: usize) -> Result<Tensor, EngineError> {
        if valid == 0 || valid > ids.len() {
            return Err(EngineError::BadInput(format!(
                "{valid} prompt tokens of {} ids",
                ids.len()
            )));
        }
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let states = self.text_encoder.forward(&t, &[valid])?;
        let keep: Vec<f32> = (0..ids.len()).map(|i| (i < valid) as u8 as f32).collect();
        let keep = Tensor::from_vec(keep, (1, ids.len(), 1), &self.device)?;
        Ok(states.broadcast_mul(&keep)?)
    }

    /// The guided velocity at `timestep` for `latents` `[1, C, F, h, w]`:
    /// the conditional pass, and with `guidance > 1` the unconditional one
    /// (`uncond`) combined as `uncond + g·(cond − uncond)`.
    pub fn model_output(
        &self,
        latents: &Tensor,
        timestep: f32,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        guidance: f64,
    ) -> Result<Tensor, EngineError> {
        let c = self.transformer.forward(latents, &[timestep], cond)?;
        match uncond {
            Some(u) if guidance > 1.0 => {
                let u = self.transformer.forward(latents, &[timestep], u)?;
                Ok((&u + ((c - &u)? * guidance)?)?)
            }
            _ => Ok(c),
        }
    }

    /// Final latents `[1, z, f, h, w]` to frames `[1 + 4(f−1), 3, 8h, 8w]`
    /// in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        let z = self.vae.denormalize(latents)?;
        let video = self.vae.decode(&z)?;
        let frames = video.squeeze(0)?.permute((1, 0, 2, 3))?;
        Ok(((frames * 0.5)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}
