//! The decoder of diffusers' `AutoencoderKLWan` (Wan 2.1's video VAE):
//! causal 3D convolutions, RMS norms over channels, a single-head spatial
//! attention in the middle, nearest ×2 spatial upsampling and causal ×2
//! temporal upsampling, 8× spatial and 4× temporal overall (`4k+1` frames
//! from `k+1` latent frames).
//!
//! Like diffusers, it decodes one latent frame at a time: every causal
//! convolution keeps the last two frames it was given (its receptive field
//! in time) between chunks, so a clip of any length decodes with the memory
//! of one chunk. The first frame is special: the temporal upsamplers pass it
//! through instead of doubling it (a causal model's first frame has no
//! past), which is why clips have `4k+1` frames.
//!
//! candle has no 3D convolution: on the CPU a fused kernel
//! ([`cpu::causal_conv3d`]) builds the patch matrix straight from the cached
//! past and the chunk; elsewhere a causal one is a 2D convolution over the
//! `kt` frames it sees, stacked along channels.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::kernels::cpu;
use crate::profile;

/// `vae/config.json` (the keys the decoder uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WanVaeConfig {
    #[serde(default = "default_base_dim")]
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "default_z_dim")]
    pub z_dim: usize,
    #[serde(default = "default_dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "default_res_blocks")]
    pub num_res_blocks: usize,
    #[serde(default = "default_temporal")]
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f32>,
    pub latents_std: Vec<f32>,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    /// Wan 2.2's residual VAE: not this decoder.
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default)]
    pub patch_size: Option<usize>,
}

fn default_base_dim() -> usize {
    96
}
fn default_z_dim() -> usize {
    16
}
fn default_dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn default_res_blocks() -> usize {
    2
}
fn default_temporal() -> Vec<bool> {
    vec![false, true, true]
}
fn default_channels() -> usize {
    3
}

impl WanVaeConfig {
    /// Pixels per latent cell along each spatial axis.
    pub fn spatial_scale(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Frames per latent frame after the first.
    pub fn temporal_scale(&self) -> usize {
        1 << self.temperal_downsample.iter().filter(|&&t| t).count()
    }

    /// Why this config cannot be decoded here, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        if self.is_residual || self.patch_size.is_some() {
            return Some("the residual, patchified VAE (Wan 2.2) is not supported".into());
        }
        if self.dim_mult.len() != self.temperal_downsample.len() + 1 {
            return Some("temperal_downsample needs one entry per level but the last".into());
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            return Some(format!(
                "latents_mean and latents_std need {} entries",
                self.z_dim
            ));
        }
        None
    }
}

/// What a causal convolution remembers between chunks.
#[derive(Clone)]
enum Slot {
    /// Nothing decoded yet.
    Empty,
    /// A temporal upsampler that passed the first frame through: its past
    /// is zeros.
    Passed,
    /// The last (up to two) frames it was given.
    Frames(Tensor),
}

/// Per-decode state: one slot per causal convolution, in call order.
struct Cache {
    slots: Vec<Slot>,
    next: usize,
}

impl Cache {
    fn take(&mut self) -> usize {
        if self.next == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.next += 1;
        self.next - 1
    }
}

/// The last two frames of `x`, topped up from what the slot held when the
/// chunk has one frame (diffusers' `CACHE_T = 2`).
fn remember(x: &Tensor, held: &Slot) -> Result<Tensor> {
    let t = x.dim(2)?;
    let tail = x.narrow(2, t.saturating_sub(2), t.min(2))?;
    match held {
        Slot::Frames(prev) if tail.dim(2)? < 2 => {
            let last = prev.narrow(2, prev.dim(2)? - 1, 1)?;
            Tensor::cat(&[&last, &tail], 2)
        }
        _ => Ok(tail),
    }
}

/// `torch.nn.Conv3d` made causal in time: `2·pad_t` frames of past
/// (cached, else zeros) in front, spatial zero padding on both sides.
#[derive(Debug)]
struct CausalConv3d {
    /// `[co, ci, kt, kh, kw]`, as torch stores it (and the CPU kernel reads it).
    weight: Tensor,
    /// Off the CPU path: `[co, kt·ci, kh, kw]`, the kernel's frames side by
    /// side in channels, made on first use.
    stacked: std::sync::OnceLock<Tensor>,
    bias: Tensor,
    kt: usize,
    pad: (usize, usize),
}

impl CausalConv3d {
    fn new(
        vb: VarBuilder,
        ci: usize,
        co: usize,
        k: (usize, usize, usize),
        pad: (usize, usize, usize),
    ) -> Result<Self> {
        let (kt, kh, kw) = k;
        if pad.0 * 2 + 1 != kt && !(kt == 1 && pad.0 == 0) {
            candle_core::bail!("causal conv: time kernel {kt} with padding {}", pad.0);
        }
        Ok(Self {
            weight: vb.get((co, ci, kt, kh, kw), "weight")?,
            stacked: std::sync::OnceLock::new(),
            bias: vb.get(co, "bias")?,
            kt,
            pad: (pad.1, pad.2),
        })
    }

    /// `x` `[b, c, t, h, w]` with `past` frames before it (fewer than
    /// `kt − 1`: zeros make up the rest).
    fn forward(&self, x: &Tensor, past: Option<&Tensor>) -> Result<Tensor> {
        let _s = profile::stage("wan_vae.conv3d");
        if cpu::applies(x) {
            return cpu::causal_conv3d(x, past, &self.weight, &self.bias, self.pad);
        }
        let (b, c, t, h, w) = x.dims5()?;
        let need = self.kt - 1;
        let mut parts = Vec::new();
        let have = past.map(|p| p.dim(2)).transpose()?.unwrap_or(0).min(need);
        if have < need {
            parts.push(Tensor::zeros(
                (b, c, need - have, h, w),
                x.dtype(),
                x.device(),
            )?);
        }
        if let Some(p) = past.filter(|_| have > 0) {
            parts.push(p.narrow(2, p.dim(2)? - have, have)?);
        }
        parts.push(x.clone());
        let seq = Tensor::cat(&parts, 2)?;
        // Frames as the batch; each output frame sees its `kt` inputs
        // stacked along channels, oldest first.
        let frames = seq.permute((0, 2, 1, 3, 4))?.contiguous()?;
        let windows = (0..t)
            .map(|i| {
                frames
                    .narrow(1, i, self.kt)?
                    .reshape((b, self.kt * c, h, w))
            })
            .collect::<Result<Vec<_>>>()?;
        let stacked = Tensor::stack(&windows, 1)?.reshape((b * t, self.kt * c, h, w))?;
        let weight = match self.stacked.get() {
            Some(wt) => wt,
            None => {
                let (co, ci, kt, kh, kw) = self.weight.dims5()?;
                let wt = self
                    .weight
                    .permute((0, 2, 1, 3, 4))?
                    .reshape((co, kt * ci, kh, kw))?;
                self.stacked.get_or_init(|| wt)
            }
        };
        let out = conv2d(&stacked, weight, &self.bias, self.pad)?;
        let (_, co, oh, ow) = out.dims4()?;
        out.reshape((b, t, co, oh, ow))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()
    }

    /// [`CausalConv3d::forward`] with its cache slot: the past comes from
    /// the slot, and the slot keeps this chunk's tail.
    fn forward_cached(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let i = cache.take();
        let held = cache.slots[i].clone();
        let keep = remember(x, &held)?;
        let past = match &held {
            Slot::Frames(p) => Some(p),
            _ => None,
        };
        let out = self.forward(x, past)?;
        cache.slots[i] = Slot::Frames(keep);
        Ok(out)
    }
}

fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, pad: (usize, usize)) -> Result<Tensor> {
    if cpu::applies(x) {
        return cpu::conv2d(x, weight, Some(bias), 1, pad);
    }
    if cpu::is_half(x) {
        return cpu::conv2d_half(x, weight, Some(bias), 1, pad);
    }
    if pad.0 != pad.1 {
        candle_core::bail!("conv2d: unequal padding {pad:?} off the CPU path");
    }
    x.conv2d(weight, pad.0, 1, 1, 1)?
        .broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)
}

/// diffusers' `WanRMS_norm`: `x / ‖x‖₂ · √dim · γ` over the channel axis
/// (axis 1), no bias.
#[derive(Debug)]
struct RmsNorm {
    gamma: Tensor,
    scale: f64,
    /// `γ·√dim` on the host (the fused kernel's per-channel factor).
    weight: Vec<f32>,
}

impl RmsNorm {
    fn new(vb: VarBuilder, dim: usize, images: bool) -> Result<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?
        };
        let gamma = gamma.flatten_all()?;
        let scale = (dim as f64).sqrt();
        // γ·√dim as the candle path computes it, for the fused kernel.
        let weight = (&gamma * scale)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(Self {
            gamma,
            scale,
            weight,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, false)
    }

    /// The norm, then SiLU when `silu_after` (one fused pass on the CPU).
    fn forward_then(&self, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        let _t = profile::stage("wan_vae.rms_norm");
        if cpu::applies(x) {
            return cpu::channel_rms_norm(x, &self.weight, silu_after);
        }
        let dims = x.dims().to_vec();
        let mut shape = vec![1; dims.len()];
        shape[1] = dims[1];
        // The sum of squares in f32 whatever the dtype (F.normalize on a
        // half tensor accumulates in f32 too).
        let xf = x.to_dtype(candle_core::DType::F32)?;
        let norm = xf.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
        let gamma = (self.gamma.reshape(shape)? * self.scale)?;
        let y = xf
            .broadcast_div(&norm)?
            .to_dtype(x.dtype())?
            .broadcast_mul(&gamma)?;
        if silu_after {
            silu(&y)
        } else {
            Ok(y)
        }
    }
}

fn silu(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(x)
}

#[derive(Debug)]
struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    fn new(vb: VarBuilder, ci: usize, co: usize) -> Result<Self> {
        Ok(Self {
            norm1: RmsNorm::new(vb.pp("norm1"), ci, false)?,
            conv1: CausalConv3d::new(vb.pp("conv1"), ci, co, (3, 3, 3), (1, 1, 1))?,
            norm2: RmsNorm::new(vb.pp("norm2"), co, false)?,
            conv2: CausalConv3d::new(vb.pp("conv2"), co, co, (3, 3, 3), (1, 1, 1))?,
            shortcut: if ci != co {
                Some(CausalConv3d::new(
                    vb.pp("conv_shortcut"),
                    ci,
                    co,
                    (1, 1, 1),
                    (0, 0, 0),
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = self.norm1.forward_then(x, true)?;
        let y = self.conv1.forward_cached(&y, cache)?;
        let y = self.norm2.forward_then(&y, true)?;
        let y = self.conv2.forward_cached(&y, cache)?;
        y + h
    }
}

/// Single-head self-attention over each frame's pixels.
#[derive(Debug)]
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: (Tensor, Tensor),
    proj: (Tensor, Tensor),
}

impl AttentionBlock {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let conv1x1 = |name: &str, co: usize| -> Result<(Tensor, Tensor)> {
            let v = vb.pp(name);
            Ok((v.get((co, dim, 1, 1), "weight")?, v.get(co, "bias")?))
        };
        Ok(Self {
            norm: RmsNorm::new(vb.pp("norm"), dim, true)?,
            to_qkv: conv1x1("to_qkv", 3 * dim)?,
            proj: conv1x1("proj", dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let frames = x.permute((0, 2, 1, 3, 4))?.reshape((b * t, c, h, w))?;
        let n = self.norm.forward(&frames)?;
        let qkv = conv2d(&n, &self.to_qkv.0, &self.to_qkv.1, (0, 0))?;
        // [bt, 3c, hw] → pixels as tokens, q | k | v along channels.
        let qkv = qkv
            .reshape((b * t, 3 * c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            qkv.narrow(2, 0, c)?,
            qkv.narrow(2, c, c)?,
            qkv.narrow(2, 2 * c, c)?,
        );
        let out = if cpu::applies(&q) {
            cpu::attention(
                &q.contiguous()?,
                &k.contiguous()?,
                &v.contiguous()?,
                1,
                1.0 / (c as f32).sqrt(),
            )?
        } else {
            let s = (q.matmul(&k.t()?)? / (c as f64).sqrt())?;
            crate::models::layers::softmax_last_dim(&s)?.matmul(&v)?
        };
        let out = out.transpose(1, 2)?.reshape((b * t, c, h, w))?;
        let out = conv2d(&out, &self.proj.0, &self.proj.1, (0, 0))?;
        out.reshape((b, t, c, h, w))?.permute((0, 2, 1, 3, 4))? + x
    }
}

/// ×2 upsampling: nearest in space then a 3×3 convolution halving the
/// channels, and for `temporal` first a causal time convolution doubling
/// every frame but the clip's first.
#[derive(Debug)]
struct Upsample {
    time_conv: Option<CausalConv3d>,
    conv: (Tensor, Tensor),
}

impl Upsample {
    fn new(vb: VarBuilder, dim: usize, temporal: bool) -> Result<Self> {
        let r = vb.pp("resample.1");
        Ok(Self {
            time_conv: if temporal {
                Some(CausalConv3d::new(
                    vb.pp("time_conv"),
                    dim,
                    2 * dim,
                    (3, 1, 1),
                    (1, 0, 0),
                )?)
            } else {
                None
            },
            conv: (
                r.get((dim / 2, dim, 3, 3), "weight")?,
                r.get(dim / 2, "bias")?,
            ),
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(tc) = &self.time_conv {
            let i = cache.take();
            let held = cache.slots[i].clone();
            match held {
                // The clip's first frame: passed through.
                Slot::Empty => cache.slots[i] = Slot::Passed,
                held => {
                    let (b, c, t, h, w) = x.dims5()?;
                    let mut keep = remember(&x, &held)?;
                    let past = match &held {
                        Slot::Frames(p) => Some(p.clone()),
                        _ => None,
                    };
                    if matches!(held, Slot::Passed) && keep.dim(2)? < 2 {
                        keep = Tensor::cat(&[&keep.zeros_like()?, &keep], 2)?;
                    }
                    let y = tc.forward(&x, past.as_ref())?;
                    cache.slots[i] = Slot::Frames(keep);
                    // Channels [0, c) are each frame's first half, [c, 2c)
                    // its second: interleave them in time.
                    x = y
                        .reshape((b, 2, c, t, h, w))?
                        .permute((0, 2, 3, 1, 4, 5))?
                        .reshape((b, c, 2 * t, h, w))?;
                }
            }
        }
        let (b, c, t, h, w) = x.dims5()?;
        let frames = x.permute((0, 2, 1, 3, 4))?.reshape((b * t, c, h, w))?;
        let up = frames.upsample_nearest2d(2 * h, 2 * w)?;
        let y = conv2d(&up, &self.conv.0, &self.conv.1, (1, 1))?;
        let co = y.dim(1)?;
        y.reshape((b, t, co, 2 * h, 2 * w))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()
    }
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsample: Option<Upsample>,
}

/// The decoder half of `AutoencoderKLWan`.
#[derive(Debug)]
pub struct WanVaeDecoder {
    post_quant_conv: CausalConv3d,
    conv_in: CausalConv3d,
    mid: (ResidualBlock, AttentionBlock, ResidualBlock),
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
    config: WanVaeConfig,
}

impl WanVaeDecoder {
    /// `vb` at the VAE's root (`post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, config: WanVaeConfig) -> Result<Self> {
        if let Some(why) = config.unsupported() {
            candle_core::bail!("AutoencoderKLWan: {why}");
        }
        let c = &config;
        let base = c.decoder_base_dim.unwrap_or(c.base_dim);
        let mult = &c.dim_mult;
        let dims: Vec<usize> = std::iter::once(mult[mult.len() - 1])
            .chain(mult.iter().rev().copied())
            .map(|m| base * m)
            .collect();
        let temporal_up: Vec<bool> = c.temperal_downsample.iter().rev().copied().collect();
        let d = vb.pp("decoder");
        let mid = d.pp("mid_block");
        let mut up_blocks = Vec::new();
        for i in 0..mult.len() {
            let (mut ci, co) = (dims[i], dims[i + 1]);
            if i > 0 {
                // Each upsampler halves the channels it hands on.
                ci /= 2;
            }
            let u = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=c.num_res_blocks)
                .map(|j| {
                    ResidualBlock::new(
                        u.pp(format!("resnets.{j}")),
                        if j == 0 { ci } else { co },
                        co,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i != mult.len() - 1 {
                Some(Upsample::new(u.pp("upsamplers.0"), co, temporal_up[i])?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
        }
        let last = dims[dims.len() - 1];
        Ok(Self {
            post_quant_conv: CausalConv3d::new(
                vb.pp("post_quant_conv"),
                c.z_dim,
                c.z_dim,
                (1, 1, 1),
                (0, 0, 0),
            )?,
            conv_in: CausalConv3d::new(d.pp("conv_in"), c.z_dim, dims[0], (3, 3, 3), (1, 1, 1))?,
            mid: (
                ResidualBlock::new(mid.pp("resnets.0"), dims[0], dims[0])?,
                AttentionBlock::new(mid.pp("attentions.0"), dims[0])?,
                ResidualBlock::new(mid.pp("resnets.1"), dims[0], dims[0])?,
            ),
            up_blocks,
            norm_out: RmsNorm::new(d.pp("norm_out"), last, false)?,
            conv_out: CausalConv3d::new(
                d.pp("conv_out"),
                last,
                c.out_channels,
                (3, 3, 3),
                (1, 1, 1),
            )?,
            config,
        })
    }

    pub fn config(&self) -> &WanVaeConfig {
        &self.config
    }

    /// Latents as the denoiser made them (`[b, z, f, h, w]`, normalised) to
    /// the pipeline's: `x / (1/std) + mean`, per channel, as WanPipeline
    /// computes it.
    pub fn denormalize(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.config.z_dim;
        let dev = latents.device();
        let inv_std: Vec<f32> = self.config.latents_std.iter().map(|s| 1.0 / s).collect();
        let inv_std = Tensor::from_vec(inv_std, (1, z, 1, 1, 1), dev)?.to_dtype(latents.dtype())?;
        let mean = Tensor::from_vec(self.config.latents_mean.clone(), (1, z, 1, 1, 1), dev)?
            .to_dtype(latents.dtype())?;
        latents.broadcast_div(&inv_std)?.broadcast_add(&mean)
    }

    /// Decodes denormalised latents `[b, z, f, h, w]` one latent frame at a
    /// time to `[b, 3, 1 + 4(f−1), 8h, 8w]` in `[−1, 1]`, handing each
    /// chunk's frames to `on_frames` as soon as they exist.
    pub fn decode_chunks(
        &self,
        z: &Tensor,
        on_frames: &mut (dyn FnMut(Tensor) -> Result<()> + Send),
    ) -> Result<()> {
        cpu::on_workers(|| {
            let _s = profile::stage("wan_vae.decode");
            let x = self.post_quant_conv.forward(z, None)?;
            let mut cache = Cache {
                slots: Vec::new(),
                next: 0,
            };
            for i in 0..x.dim(2)? {
                cache.next = 0;
                let chunk = self.decode_chunk(&x.narrow(2, i, 1)?, &mut cache)?;
                on_frames(chunk.clamp(-1f32, 1f32)?)?;
            }
            Ok(())
        })
    }

    /// [`WanVaeDecoder::decode_chunks`], concatenated.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut parts = Vec::new();
        self.decode_chunks(z, &mut |f| {
            parts.push(f);
            Ok(())
        })?;
        Tensor::cat(&parts, 2)
    }

    fn decode_chunk(&self, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let mut x = self.conv_in.forward_cached(x, cache)?;
        x = self.mid.0.forward(&x, cache)?;
        x = self.mid.1.forward(&x)?;
        x = self.mid.2.forward(&x, cache)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x, cache)?;
            }
            if let Some(u) = &block.upsample {
                x = u.forward(&x, cache)?;
            }
        }
        let x = self.norm_out.forward_then(&x, true)?;
        self.conv_out.forward_cached(&x, cache)
    }
}
