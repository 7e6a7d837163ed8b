//! The decoder half of diffusers' `AutoencoderKL` (`post_quant_conv` and
//! `decoder.*`), on the engine's own layers: the pipeline only ever decodes,
//! so the encoder's weights are never loaded.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::kernels::cpu;
use crate::models::layers::{softmax_last_dim, Conv2d, GroupNorm, Linear, ResnetBlock};
use crate::profile;

const EPS: f64 = 1e-6;

/// `vae/config.json` (the keys that matter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
}

fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Pixels per latent cell along each axis.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

#[derive(Debug)]
pub struct VaeDecoder {
    post_quant_conv: Conv2d,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SelfAttention,
    /// Deepest level first, as diffusers' `up_blocks`.
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    /// Nearest-neighbour 2x, then this convolution.
    upsample: Option<Conv2d>,
}

impl VaeDecoder {
    /// `vb` at the root of `vae/diffusion_pytorch_model.safetensors`.
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let ch = &config.block_out_channels;
        let (Some(&deepest), Some(&shallowest)) = (ch.last(), ch.first()) else {
            candle_core::bail!("vae: block_out_channels is empty");
        };
        let groups = config.norm_num_groups;
        let latent = config.latent_channels;
        let d = vb.pp("decoder");
        let resnet =
            |vb: VarBuilder, cin, cout| ResnetBlock::new(vb, cin, cout, None, groups, EPS, 1.0);
        let mid = d.pp("mid_block");
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut cin = deepest;
        for (i, &cout) in ch.iter().rev().enumerate() {
            let b = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    resnet(
                        b.pp(format!("resnets.{j}")),
                        if j == 0 { cin } else { cout },
                        cout,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < ch.len() {
                Some(Conv2d::new(b.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            cin = cout;
        }
        Ok(Self {
            post_quant_conv: Conv2d::new(vb.pp("post_quant_conv"), latent, latent, 1, 1, 0)?,
            conv_in: Conv2d::new(d.pp("conv_in"), latent, deepest, 3, 1, 1)?,
            mid_resnets: [
                resnet(mid.pp("resnets.0"), deepest, deepest)?,
                resnet(mid.pp("resnets.1"), deepest, deepest)?,
            ],
            mid_attention: SelfAttention::new(mid.pp("attentions.0"), deepest, groups)?,
            up_blocks,
            norm_out: GroupNorm::new(d.pp("conv_norm_out"), groups, shallowest, EPS)?,
            conv_out: Conv2d::new(d.pp("conv_out"), shallowest, config.out_channels, 3, 1, 1)?,
        })
    }

    /// Latents `[N, latent, h, w]` (already divided by the scaling factor)
    /// to images `[N, out, h * s, w * s]` in about `[-1, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        crate::kernels::cpu::on_workers(|| self.decode_on_workers(latents))
    }

    fn decode_on_workers(&self, latents: &Tensor) -> Result<Tensor> {
        let xs = self.post_quant_conv.forward(latents)?;
        let xs = self.conv_in.forward(&xs)?;
        let xs = self.mid_resnets[0].forward(&xs, None)?;
        let xs = self.mid_attention.forward(&xs)?;
        let mut xs = self.mid_resnets[1].forward(&xs, None)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(conv) = &block.upsample {
                let (_, _, h, w) = xs.dims4()?;
                let up = profile::time("upsample", || xs.upsample_nearest2d(2 * h, 2 * w))?;
                xs = conv.forward(&up)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

/// diffusers `Attention` as the VAE's mid block uses it: one head over the
/// pixels, GroupNorm before, residual after.
#[derive(Debug)]
struct SelfAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // Checkpoints saved before diffusers 0.14 use the older names.
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let linear = |name: &str| Linear::new(vb.pp(name), channels, channels);
        Ok(Self {
            norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, EPS)?,
            to_q: linear(names[0])?,
            to_k: linear(names[1])?,
            to_v: linear(names[2])?,
            to_out: linear(names[3])?,
            channels,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xs.dims4()?;
        // Pixels as tokens: `[N, h*w, C]` views, read in place by the linears.
        let tokens = |t: &Tensor| t.reshape((n, c, h * w))?.transpose(1, 2);
        let normed = tokens(&self.norm.forward(xs)?)?;
        let q = self.to_q.forward(&normed)?;
        let k = self.to_k.forward(&normed)?;
        let v = self.to_v.forward(&normed)?;
        let scale = 1.0 / (self.channels as f64).sqrt();
        let attended = {
            let _s = profile::stage("attn.vae");
            if cpu::applies(&q) {
                cpu::attention(&q, &k, &v, 1, scale as f32)?
            } else {
                let scores = (q * scale)?.matmul(&k.t()?)?;
                softmax_last_dim(&scores)?.matmul(&v)?
            }
        };
        let out = self.to_out.forward_add(&attended, &tokens(xs)?)?;
        profile::time("layout", || out.transpose(1, 2)?.reshape((n, c, h, w)))
    }
}
