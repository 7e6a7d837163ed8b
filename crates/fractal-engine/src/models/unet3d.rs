//! `UNet3DConditionModel` of diffusers (ModelScope text-to-video, Zeroscope).
//!
//! Layout and parameter names follow diffusers 0.42 exactly, so real
//! checkpoints load unchanged. Video tensors are `[batch, channels, frames,
//! height, width]`; inside the network frames are folded into the batch
//! (`[batch*frames, C, H, W]`) and the temporal layers unfold them again.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{self as nn, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::kernels::cpu;
use crate::models::layers::{softmax_last_dim, Conv2d, GroupNorm, Linear, ResnetBlock};
use crate::profile;

/// `unet/config.json` of a diffusers UNet3D folder (only the keys that matter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unet3dConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub layers_per_block: usize,
    /// ModelScope quirk: this is used as the number of heads when
    /// `num_attention_heads` is absent (diffusers does the same).
    pub attention_head_dim: usize,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    #[serde(default = "one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
}

fn one_usize() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn silu() -> String {
    "silu".into()
}

impl Unet3dConfig {
    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!("unet config: block_out_channels, down_block_types and up_block_types must have the same non-zero length");
        }
        if self.act_fn != "silu" {
            candle_core::bail!(
                "unet config: act_fn {:?} is not supported (only silu)",
                self.act_fn
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock3D" && t != "DownBlock3D" {
                candle_core::bail!("unet config: unsupported down block {t:?}");
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock3D" && t != "UpBlock3D" {
                candle_core::bail!("unet config: unsupported up block {t:?}");
            }
        }
        let heads = self.heads();
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 || c % heads != 0 {
                candle_core::bail!(
                    "unet config: channels {c} must divide by norm_num_groups and the head count"
                );
            }
        }
        Ok(())
    }

    fn heads(&self) -> usize {
        self.num_attention_heads.unwrap_or(self.attention_head_dim)
    }
}

/// Feed-forward with GEGLU and the exact (erf) GELU, as diffusers' `FeedForward`.
#[derive(Debug)]
struct GegluFeedForward {
    proj: Linear,
    out: Linear,
}

impl GegluFeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, inner * 2)?,
            out: Linear::new(vb.pp("net.2"), inner, dim)?,
        })
    }

    /// `FeedForward(xs) + residual` on token-major `xs` (devices other than
    /// the CPU; there the transformers run channels-first).
    fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?.chunk(2, D::Minus1)?;
        let gated = profile::time("ff.geglu", || &h[0] * h[1].gelu_erf()?)?;
        self.out.forward_add(&gated, residual)
    }
}

/// diffusers `Attention` (no q/k/v bias, biased output projection).
///
/// On the CPU the transformers run it channels-first through the fused
/// kernels (which compute softmax(q k^T) v one block of query rows at a time,
/// so the score matrix, about 8.6 GB per layer at 256x256 and 16 frames,
/// never exists whole); [`Attention::forward_add`] is the token-major form
/// other devices run, plain softmax attention.
#[derive(Debug)]
pub(crate) struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    /// Profile stage name of the attention core.
    stage: &'static str,
    /// Keys and values come from the text context.
    cross: bool,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        stage: &'static str,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: Linear::no_bias(vb.pp("to_q"), query_dim, inner)?,
            to_k: Linear::no_bias(vb.pp("to_k"), ctx, inner)?,
            to_v: Linear::no_bias(vb.pp("to_v"), ctx, inner)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, query_dim)?,
            heads,
            head_dim,
            stage,
            cross: context_dim.is_some(),
        })
    }

    /// `Attention(xs, context) + residual` on token-major `xs`.
    fn forward_add(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let (b, n, _) = xs.dims3()?;
        let ctx = context.unwrap_or(xs);
        let m = ctx.dim(1)?;
        let (h, d) = (self.heads, self.head_dim);
        let (q, k, v) = (
            self.to_q.forward(xs)?,
            self.to_k.forward(ctx)?,
            self.to_v.forward(ctx)?,
        );
        let scale = 1.0 / (d as f64).sqrt();
        let out = profile::time(self.stage, || {
            let split = |t: &Tensor, len: usize| -> Result<Tensor> {
                t.reshape((b, len, h, d))?.transpose(1, 2)?.contiguous()
            };
            let (q, k, v) = (split(&q, n)?, split(&k, m)?, split(&v, m)?);
            // Scaling q (S x D) is cheaper than scaling the S x M scores.
            let att = (q * scale)?.matmul(&k.t()?)?;
            let att = softmax_last_dim(&att)?;
            att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h * d))
        })?;
        self.to_out.forward_add(&out, residual)
    }
}

/// diffusers `BasicTransformerBlock` (layer norms, two attentions, GEGLU).
/// `attn2` attends to the text context, or to itself when `context_dim` is None
/// (`double_self_attention` in the temporal transformer).
#[derive(Debug)]
struct TransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: GegluFeedForward,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: Option<usize>,
    ) -> Result<Self> {
        Ok(Self {
            norm1: nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(
                vb.pp("attn1"),
                dim,
                None,
                heads,
                head_dim,
                if context_dim.is_some() {
                    "attn.spatial"
                } else {
                    "attn.temporal"
                },
            )?,
            norm2: nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                context_dim,
                heads,
                head_dim,
                if context_dim.is_some() {
                    "attn.cross"
                } else {
                    "attn.temporal"
                },
            )?,
            norm3: nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: GegluFeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ln =
            |norm: &nn::LayerNorm, xs: &Tensor| profile::time("layer_norm", || norm.forward(xs));
        let xs = self.attn1.forward_add(&ln(&self.norm1, xs)?, None, xs)?;
        let xs = self
            .attn2
            .forward_add(&ln(&self.norm2, &xs)?, context, &xs)?;
        self.ff.forward_add(&ln(&self.norm3, &xs)?, &xs)
    }
}

/// GroupNorm, linear projection in, one transformer block, projection out,
/// residual: the shared shape of diffusers' `Transformer2DModel` (with
/// `use_linear_projection=True`, always the case in UNet3D) and
/// `TransformerTemporalModel`. They differ in which axis the tokens run along.
#[derive(Debug)]
struct ProjectedTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    block: TransformerBlock,
    proj_out: Linear,
}

impl ProjectedTransformer {
    /// `context_dim`: Some for the spatial (text cross-attention) variant,
    /// None for the temporal one (`double_self_attention`).
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        head_dim: usize,
        groups: usize,
        context_dim: Option<usize>,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Linear::new(vb.pp("proj_in"), channels, inner)?,
            block: TransformerBlock::new(
                vb.pp("transformer_blocks.0"),
                inner,
                heads,
                head_dim,
                context_dim,
            )?,
            proj_out: Linear::new(vb.pp("proj_out"), inner, channels)?,
        })
    }

    fn project(&self, tokens: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let hs = self.proj_in.forward(tokens)?;
        let hs = self.block.forward(&hs, context)?;
        self.proj_out.forward(&hs)
    }

    /// Attention over the pixels of each frame, conditioned on the text.
    fn forward_spatial(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        if cpu::applies(xs) {
            return self.forward_spatial_channels_first(xs, context);
        }
        let (n, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let tokens = profile::time("layout", || {
            normed.permute((0, 2, 3, 1))?.reshape((n, h * w, c))
        })?;
        let hs = self.project(&tokens, Some(context))?;
        profile::time("layout", || {
            hs.reshape((n, h, w, c))?.permute((0, 3, 1, 2))? + xs
        })
    }

    /// Self-attention across the frames at each pixel.
    fn forward_temporal(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        if cpu::applies(xs) {
            return self.forward_temporal_channels_first(xs, frames);
        }
        let (bf, c, h, w) = xs.dims4()?;
        let b = bf / frames;
        let hs = profile::time("layout", || {
            xs.reshape((b, frames, c, h, w))?
                .permute((0, 2, 1, 3, 4))?
                .contiguous()
        })?;
        let normed = self.norm.forward(&hs)?;
        let tokens = profile::time("layout", || {
            normed
                .permute((0, 3, 4, 2, 1))?
                .reshape((b * h * w, frames, c))
        })?;
        let hs = self.project(&tokens, None)?;
        profile::time("layout", || {
            hs.reshape((b, h, w, frames, c))?
                .permute((0, 3, 4, 1, 2))?
                .reshape((bf, c, h, w))?
                + xs
        })
    }
}

/// A linear layer over the channels of `[n, c, h, w]` pixels (CPU kernels).
fn pointwise(l: &Linear, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    let _s = profile::stage("linear");
    cpu::pointwise(x, l.weight(), l.bias(), residual)
}

/// Layer norm over the channels of `[n, c, h, w]` pixels (CPU kernels).
fn layer_norm_channels(norm: &nn::LayerNorm, x: &Tensor) -> Result<Tensor> {
    profile::time("layer_norm", || {
        cpu::layer_norm_channels(x, norm.weight(), norm.bias(), norm.eps())
    })
}

impl ProjectedTransformer {
    /// The transformer block on channels-first pixels `hs` (CPU kernels);
    /// `attend(attention, normed pixels)` is the core of its two attentions.
    fn block_channels_first(
        &self,
        hs: Tensor,
        attend: impl Fn(&Attention, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let b = &self.block;
        let a = attend(&b.attn1, &layer_norm_channels(&b.norm1, &hs)?)?;
        let hs = pointwise(&b.attn1.to_out, &a, Some(&hs))?;
        let a = attend(&b.attn2, &layer_norm_channels(&b.norm2, &hs)?)?;
        let hs = pointwise(&b.attn2.to_out, &a, Some(&hs))?;
        let proj = pointwise(&b.ff.proj, &layer_norm_channels(&b.norm3, &hs)?, None)?;
        let gated = profile::time("ff.geglu", || cpu::geglu_channels(&proj))?;
        pointwise(&b.ff.out, &gated, Some(&hs))
    }

    /// [`Self::forward_spatial`] on the CPU kernels, in the frames' own
    /// `[n, c, h, w]` layout: linear layers are per-frame products over the
    /// channels, the attention reads the pixels channels-first (and the text
    /// token-major), and nothing is permuted.
    fn forward_spatial_channels_first(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let hs = pointwise(&self.proj_in, &normed, None)?;
        let inner = hs.dim(1)?;
        let attend = |a: &Attention, x: &Tensor| -> Result<Tensor> {
            let q = pointwise(&a.to_q, x, None)?.reshape((n, inner, h * w))?;
            let (k, v, kv_layout) = if a.cross {
                let k = a.to_k.forward(context)?;
                (k, a.to_v.forward(context)?, cpu::Layout::Tokens)
            } else {
                let k = pointwise(&a.to_k, x, None)?.reshape((n, inner, h * w))?;
                let v = pointwise(&a.to_v, x, None)?.reshape((n, inner, h * w))?;
                (k, v, cpu::Layout::ChannelsFirst)
            };
            let scale = 1.0 / (a.head_dim as f64).sqrt();
            let out = profile::time(a.stage, || {
                cpu::attention_in(
                    &q,
                    cpu::Layout::ChannelsFirst,
                    &k,
                    &v,
                    kv_layout,
                    a.heads,
                    scale as f32,
                )
            })?;
            out.reshape((n, inner, h, w))
        };
        let hs = self.block_channels_first(hs, attend)?;
        pointwise(&self.proj_out, &hs, Some(xs))
    }

    /// [`Self::forward_temporal`] on the CPU kernels, in the clip's own
    /// `[b * frames, c, h, w]` layout: every linear layer is a per-frame
    /// product over the channels, layer norms and the attention run with the
    /// pixels along the lanes, and nothing is permuted.
    fn forward_temporal_channels_first(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        let normed = profile::time("group_norm", || {
            cpu::group_norm_frames(
                xs,
                frames,
                self.norm.groups(),
                self.norm.eps(),
                self.norm.weight(),
                self.norm.bias(),
            )
        })?;
        let hs = pointwise(&self.proj_in, &normed, None)?;
        let attend = |a: &Attention, x: &Tensor| -> Result<Tensor> {
            let q = pointwise(&a.to_q, x, None)?;
            let k = pointwise(&a.to_k, x, None)?;
            let v = pointwise(&a.to_v, x, None)?;
            let scale = 1.0 / (a.head_dim as f64).sqrt();
            profile::time(a.stage, || {
                cpu::temporal_attention(&q, &k, &v, frames, a.heads, scale as f32)
            })
        };
        let hs = self.block_channels_first(hs, attend)?;
        pointwise(&self.proj_out, &hs, Some(xs))
    }
}

/// diffusers `TemporalConvLayer`: four (GroupNorm, SiLU, Conv3d (3,1,1)) stages
/// with a residual. The (3,1,1) kernel mixes neighbouring frames only, so with
/// the pixels of a frame flattened into one axis it is a 2D convolution with
/// a (3, 1) kernel padded along frames.
#[derive(Debug)]
struct TemporalConv {
    /// Norm, weight `[C, C, 3, 1]`, bias `[C]`.
    stages: Vec<(GroupNorm, Tensor, Tensor)>,
}

impl TemporalConv {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let mut stages = Vec::with_capacity(4);
        for (i, conv_idx) in [(1, 2), (2, 3), (3, 3), (4, 3)] {
            let s = vb.pp(format!("conv{i}"));
            let norm = GroupNorm::new(s.pp("0"), groups, channels, 1e-5)?;
            let c = s.pp(conv_idx.to_string());
            let w = c
                .get((channels, channels, 3, 1, 1), "weight")?
                .reshape((channels, channels, 3, 1))?;
            stages.push((norm, w, c.get(channels, "bias")?));
        }
        Ok(Self { stages })
    }

    fn forward(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        let (bf, c, h, w) = xs.dims4()?;
        let b = bf / frames;
        let identity = profile::time("layout", || {
            xs.reshape((b, frames, c, h, w))?
                .permute((0, 2, 1, 3, 4))?
                .contiguous()
        })?;
        let mut hs = identity.clone();
        for (norm, weight, bias) in &self.stages {
            let act = norm.forward_silu(&hs)?.reshape((b, c, frames, h * w))?;
            let _s = profile::stage("temporal_conv");
            let y = if cpu::applies(&act) {
                cpu::conv2d(&act, weight, Some(bias), 1, (1, 0))?
            } else if cpu::is_half(&act) {
                cpu::conv2d_half(&act, weight, Some(bias), 1, (1, 0))?
            } else {
                act.pad_with_zeros(2, 1, 1)?
                    .conv2d(weight, 0, 1, 1, 1)?
                    .broadcast_add(&bias.reshape((1, c, 1, 1))?)?
            };
            hs = y.reshape((b, c, frames, h, w))?;
        }
        profile::time("layout", || {
            (identity + hs)?
                .permute((0, 2, 1, 3, 4))?
                .reshape((bf, c, h, w))
        })
    }
}

/// One level of the encoder or decoder: resnets with temporal convs, and
/// (for the cross-attention variants) spatial and temporal transformers.
#[derive(Debug)]
struct Block3D {
    resnets: Vec<ResnetBlock>,
    temp_convs: Vec<TemporalConv>,
    attentions: Vec<ProjectedTransformer>,
    temp_attentions: Vec<ProjectedTransformer>,
    downsample: Option<Conv2d>,
    upsample: Option<Conv2d>,
}

struct BlockSpec<'a> {
    cfg: &'a Unet3dConfig,
    temb: usize,
    cross_attention: bool,
    heads_per_channel: usize,
}

impl BlockSpec<'_> {
    fn resnet(&self, vb: VarBuilder, cin: usize, cout: usize, scale: f64) -> Result<ResnetBlock> {
        let cfg = self.cfg;
        ResnetBlock::new(
            vb,
            cin,
            cout,
            Some(self.temb),
            cfg.norm_num_groups,
            cfg.norm_eps,
            scale,
        )
    }

    /// Adds the i-th (temporal conv, spatial + temporal attention) layers.
    fn layers(&self, vb: &VarBuilder, i: usize, c: usize, block: &mut Block3D) -> Result<()> {
        let groups = self.cfg.norm_num_groups;
        block.temp_convs.push(TemporalConv::new(
            vb.pp(format!("temp_convs.{i}")),
            c,
            groups,
        )?);
        if self.cross_attention {
            // diffusers builds both transformers with heads = C / n and head_dim = n.
            let (heads, head_dim) = (c / self.heads_per_channel, self.heads_per_channel);
            block.attentions.push(ProjectedTransformer::new(
                vb.pp(format!("attentions.{i}")),
                c,
                heads,
                head_dim,
                groups,
                Some(self.cfg.cross_attention_dim),
            )?);
            block.temp_attentions.push(ProjectedTransformer::new(
                vb.pp(format!("temp_attentions.{i}")),
                c,
                heads,
                head_dim,
                groups,
                None,
            )?);
        }
        Ok(())
    }
}

impl Block3D {
    fn empty() -> Self {
        Block3D {
            resnets: vec![],
            temp_convs: vec![],
            attentions: vec![],
            temp_attentions: vec![],
            downsample: None,
            upsample: None,
        }
    }

    fn down(
        vb: VarBuilder,
        spec: &BlockSpec,
        cin: usize,
        cout: usize,
        add_downsample: bool,
    ) -> Result<Self> {
        let mut block = Block3D::empty();
        for i in 0..spec.cfg.layers_per_block {
            let c_in = if i == 0 { cin } else { cout };
            block
                .resnets
                .push(spec.resnet(vb.pp(format!("resnets.{i}")), c_in, cout, 1.0)?);
            spec.layers(&vb, i, cout, &mut block)?;
        }
        if add_downsample {
            block.downsample = Some(Conv2d::new(
                vb.pp("downsamplers.0.conv"),
                cout,
                cout,
                3,
                2,
                spec.cfg.downsample_padding,
            )?);
        }
        Ok(block)
    }

    fn up(
        vb: VarBuilder,
        spec: &BlockSpec,
        cin: usize,
        cout: usize,
        prev: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut block = Block3D::empty();
        let n = spec.cfg.layers_per_block + 1;
        for i in 0..n {
            let skip = if i == n - 1 { cin } else { cout };
            let c_in = if i == 0 { prev } else { cout };
            block.resnets.push(spec.resnet(
                vb.pp(format!("resnets.{i}")),
                c_in + skip,
                cout,
                1.0,
            )?);
            spec.layers(&vb, i, cout, &mut block)?;
        }
        if add_upsample {
            block.upsample = Some(Conv2d::new(
                vb.pp("upsamplers.0.conv"),
                cout,
                cout,
                3,
                1,
                1,
            )?);
        }
        Ok(block)
    }

    fn mid(vb: VarBuilder, spec: &BlockSpec, c: usize) -> Result<Self> {
        let mut block = Block3D::empty();
        let scale = spec.cfg.mid_block_scale_factor;
        block
            .resnets
            .push(spec.resnet(vb.pp("resnets.0"), c, c, scale)?);
        block.temp_convs.push(TemporalConv::new(
            vb.pp("temp_convs.0"),
            c,
            spec.cfg.norm_num_groups,
        )?);
        let (heads, head_dim) = (c / spec.heads_per_channel, spec.heads_per_channel);
        let groups = spec.cfg.norm_num_groups;
        block.attentions.push(ProjectedTransformer::new(
            vb.pp("attentions.0"),
            c,
            heads,
            head_dim,
            groups,
            Some(spec.cfg.cross_attention_dim),
        )?);
        block.temp_attentions.push(ProjectedTransformer::new(
            vb.pp("temp_attentions.0"),
            c,
            heads,
            head_dim,
            groups,
            None,
        )?);
        block
            .resnets
            .push(spec.resnet(vb.pp("resnets.1"), c, c, scale)?);
        block
            .temp_convs
            .push(TemporalConv::new(vb.pp("temp_convs.1"), c, groups)?);
        Ok(block)
    }

    /// Resnet i, temporal conv i, then the attentions if this block has them.
    fn layer(
        &self,
        i: usize,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
    ) -> Result<Tensor> {
        let xs = self.resnets[i].forward(xs, Some(temb))?;
        let mut xs = self.temp_convs[i].forward(&xs, frames)?;
        if let (Some(a), Some(t)) = (self.attentions.get(i), self.temp_attentions.get(i)) {
            xs = a.forward_spatial(&xs, ctx)?;
            xs = t.forward_temporal(&xs, frames)?;
        }
        Ok(xs)
    }

    fn forward_down(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut outs = Vec::with_capacity(self.resnets.len() + 1);
        for i in 0..self.resnets.len() {
            xs = self.layer(i, &xs, temb, ctx, frames)?;
            outs.push(xs.clone());
        }
        if let Some(d) = &self.downsample {
            xs = d.forward(&xs)?;
            outs.push(xs.clone());
        }
        Ok((xs, outs))
    }

    fn forward_up(
        &self,
        xs: &Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for i in 0..self.resnets.len() {
            let skip = skips.pop().expect("one skip per resnet");
            xs = profile::time("layout", || Tensor::cat(&[&xs, &skip], 1))?;
            xs = self.layer(i, &xs, temb, ctx, frames)?;
        }
        if let Some(conv) = &self.upsample {
            let (_, _, h, w) = xs.dims4()?;
            let (h2, w2) = size.unwrap_or((2 * h, 2 * w));
            let up = profile::time("upsample", || xs.upsample_nearest2d(h2, w2))?;
            xs = conv.forward(&up)?;
        }
        Ok(xs)
    }

    fn forward_mid(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        frames: usize,
    ) -> Result<Tensor> {
        let xs = self.resnets[0].forward(xs, Some(temb))?;
        let xs = self.temp_convs[0].forward(&xs, frames)?;
        let xs = self.attentions[0].forward_spatial(&xs, ctx)?;
        let xs = self.temp_attentions[0].forward_temporal(&xs, frames)?;
        let xs = self.resnets[1].forward(&xs, Some(temb))?;
        self.temp_convs[1].forward(&xs, frames)
    }
}

/// diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`
/// of one timestep: cos then sin of `t · exp(−ln(10000) · k / half)`, every
/// operation rounded to f32 in this order (the order the engine has always
/// computed it in, so that generated bits stay put).
fn timestep_sinusoid(t: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let ln = -(10000f64.ln()) as f32;
    let inv_half = (1.0 / half as f64) as f32;
    let args: Vec<f32> = (0..half)
        .map(|k| t * (k as f32 * ln * inv_half).exp())
        .collect();
    let mut v: Vec<f32> = args.iter().map(|a| a.cos()).collect();
    v.extend(args.iter().map(|a| a.sin()));
    v.resize(dim, 0.0);
    v
}

/// The denoising network.
#[derive(Debug)]
pub struct Unet3d {
    conv_in: Conv2d,
    /// `time_embedding.linear_1` and `linear_2` (SiLU between).
    time_embedding: (nn::Linear, nn::Linear),
    transformer_in: ProjectedTransformer,
    down: Vec<Block3D>,
    mid: Block3D,
    up: Vec<Block3D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: Unet3dConfig,
}

impl Unet3d {
    pub fn new(vb: VarBuilder, config: Unet3dConfig) -> Result<Self> {
        config.validate()?;
        let cfg = &config;
        let ch = &cfg.block_out_channels;
        let temb = ch[0] * 4;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let te = vb.pp("time_embedding");
        let time_embedding = (
            nn::linear(ch[0], temb, te.pp("linear_1"))?,
            nn::linear(temb, temb, te.pp("linear_2"))?,
        );
        let transformer_in = ProjectedTransformer::new(
            vb.pp("transformer_in"),
            ch[0],
            8,
            cfg.attention_head_dim,
            cfg.norm_num_groups,
            None,
        )?;
        let heads = cfg.heads();
        let n = ch.len();
        let mut down = Vec::with_capacity(n);
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let spec = BlockSpec {
                cfg,
                temb,
                cross_attention: kind == "CrossAttnDownBlock3D",
                heads_per_channel: heads,
            };
            down.push(Block3D::down(
                vb.pp(format!("down_blocks.{i}")),
                &spec,
                cin,
                ch[i],
                i + 1 < n,
            )?);
        }
        let mid_spec = BlockSpec {
            cfg,
            temb,
            cross_attention: true,
            heads_per_channel: heads,
        };
        let mid = Block3D::mid(vb.pp("mid_block"), &mid_spec, ch[n - 1])?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev = out_c;
            out_c = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            let spec = BlockSpec {
                cfg,
                temb,
                cross_attention: kind == "CrossAttnUpBlock3D",
                heads_per_channel: heads,
            };
            up.push(Block3D::up(
                vb.pp(format!("up_blocks.{i}")),
                &spec,
                cin,
                out_c,
                prev,
                i + 1 < n,
            )?);
        }
        let conv_norm_out = GroupNorm::new(
            vb.pp("conv_norm_out"),
            cfg.norm_num_groups,
            ch[0],
            cfg.norm_eps,
        )?;
        let conv_out = Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?;
        Ok(Self {
            conv_in,
            time_embedding,
            transformer_in,
            down,
            mid,
            up,
            conv_norm_out,
            conv_out,
            config,
        })
    }

    /// Predicts noise for `sample` `[B, C, F, H, W]` at `timestep`, conditioned
    /// on `context` `[B, tokens, cross_attention_dim]`.
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        crate::kernels::cpu::on_workers(|| self.forward_on_workers(sample, timestep, context))
    }

    fn forward_on_workers(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
    ) -> Result<Tensor> {
        let (b, c, f, h, w) = sample.dims5()?;
        let dim = self.config.block_out_channels[0];
        let sinusoid = timestep_sinusoid(timestep as f32, dim);
        let t = Tensor::from_vec(sinusoid, (1, dim), sample.device())?
            .broadcast_as((b, dim))?
            .contiguous()?
            .to_dtype(sample.dtype())?;
        let (linear_1, linear_2) = &self.time_embedding;
        let emb = linear_2.forward(&nn::ops::silu(&linear_1.forward(&t)?)?)?;
        let temb_dim = emb.dim(1)?;
        // Every resnet applies SiLU to the time embedding first: do it once.
        let emb = nn::ops::silu(&emb)?;
        // repeat_interleave over frames: [B, T] -> [B*F, T]
        let emb = emb
            .unsqueeze(1)?
            .broadcast_as((b, f, temb_dim))?
            .reshape((b * f, temb_dim))?;
        let (_, tokens, d) = context.dims3()?;
        let ctx = context
            .unsqueeze(1)?
            .broadcast_as((b, f, tokens, d))?
            .reshape((b * f, tokens, d))?;

        let xs = sample.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, h, w))?;
        let xs = self.conv_in.forward(&xs)?;
        let mut xs = self.transformer_in.forward_temporal(&xs, f)?;

        let up_factor = 1usize << (self.up.len() - 1);
        let forward_upsample_size = h % up_factor != 0 || w % up_factor != 0;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            let (next, outs) = block.forward_down(&xs, &emb, &ctx, f)?;
            xs = next;
            skips.extend(outs);
        }
        xs = self.mid.forward_mid(&xs, &emb, &ctx, f)?;
        let last = self.up.len() - 1;
        for (i, block) in self.up.iter().enumerate() {
            let mine = skips.split_off(skips.len() - block.resnets.len());
            let size = match skips.last() {
                Some(s) if i < last && forward_upsample_size => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            xs = block.forward_up(&xs, mine, &emb, &ctx, f, size)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        let xs = self.conv_out.forward(&xs)?;
        let oc = self.config.out_channels;
        xs.reshape((b, f, oc, h, w))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()
    }
}
