//! diffusers' `WanTransformer3DModel` (Wan 2.1 text-to-video): a diffusion
//! transformer over 3D patches of the latent clip, conditioned on the text
//! by cross-attention and on the timestep by a shared modulation table.
//!
//! Per block: `x += gate · SelfAttn(LN(x)·(1+scale)+shift)` with RMS-normed
//! q/k and 3D rotary embeddings, `x += CrossAttn(LN_affine(x), text)`, and
//! `x += c_gate · FFN(LN(x)·(1+c_scale)+c_shift)` with a tanh-GELU MLP; the
//! six modulation vectors are the block's table plus the projected timestep
//! embedding. Parameter names are diffusers'.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{self as nn, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::kernels::cpu;
use crate::models::layers::{softmax_last_dim, Linear};
use crate::profile;

/// `transformer/config.json` (the keys text-to-video uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WanTransformerConfig {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    #[serde(default = "yes")]
    pub cross_attn_norm: bool,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_rope_len")]
    pub rope_max_seq_len: usize,
    /// Image conditioning (Wan image-to-video): refused, text-to-video only.
    #[serde(default)]
    pub image_dim: Option<usize>,
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    /// How q and k are normalised: `rms_norm_across_heads` (diffusers'
    /// default, what every released Wan 2.1 uses, and all this implements);
    /// `null` would mean none.
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-6
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn default_rope_len() -> usize {
    1024
}

impl WanTransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Why this config cannot run here, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        if self.image_dim.is_some() || self.added_kv_proj_dim.is_some() {
            return Some("image conditioning (Wan image-to-video) is not supported".into());
        }
        if self.qk_norm.as_deref() != Some("rms_norm_across_heads") {
            return Some(format!(
                "qk_norm {:?} is not supported (only rms_norm_across_heads)",
                self.qk_norm
            ));
        }
        if !self.attention_head_dim.is_multiple_of(2) || !self.freq_dim.is_multiple_of(2) {
            return Some("attention_head_dim and freq_dim must be even".into());
        }
        None
    }
}

/// Softmax attention over heads laid side by side (`[b, n, h*d]`), fused on
/// the CPU, plain elsewhere.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, hd) = q.dims3()?;
    let m = k.dim(1)?;
    let d = hd / heads;
    let scale = 1.0 / (d as f64).sqrt();
    if cpu::applies(q) {
        return cpu::attention(q, k, v, heads, scale as f32);
    }
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let att = softmax_last_dim(&(q * scale)?.matmul(&k.t()?)?)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, hd))
}

/// LayerNorm over the last axis without parameters (diffusers'
/// `FP32LayerNorm(elementwise_affine=False)`).
fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let _s = profile::stage("wan.layer_norm");
    let n = x.dim(D::Minus1)?;
    let ones = Tensor::ones(n, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(n, x.dtype(), x.device())?;
    nn::ops::layer_norm(x, &ones, &zeros, eps as f32)
}

/// `x · (1 + scale) + shift`, the modulation every norm here is followed by.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let _s = profile::stage("wan.modulate");
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// The timestep sinusoid as diffusers computes it (`Timesteps` with
/// `flip_sin_to_cos`, shift 0): cos then sin of `t · 10000^(-k/half)`, in
/// f32 steps (the exponent and the product in f32, each function rounded
/// from f64).
pub fn timestep_sinusoid(t: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|k| {
            let exponent = ln * k as f32 / half as f32;
            (exponent as f64).exp() as f32
        })
        .collect();
    let mut v = Vec::with_capacity(t.len() * dim);
    for &t in t {
        let args: Vec<f32> = freqs.iter().map(|&f| t * f).collect();
        v.extend(args.iter().map(|&a| (a as f64).cos() as f32));
        v.extend(args.iter().map(|&a| (a as f64).sin() as f32));
    }
    Tensor::from_vec(v, (t.len(), dim), device)
}

/// The 3D rotary embedding: the head dimension split into frame, height and
/// width parts, each pair of adjacent channels rotated by `pos · ω_j`
/// (θ = 10000), angles in f64, cos/sin rounded to f32.
#[derive(Debug)]
struct Rope {
    /// Channel pairs given to frames, heights and widths.
    pairs: [usize; 3],
}

impl Rope {
    fn new(head_dim: usize) -> Self {
        let hw = 2 * (head_dim / 6);
        let t = head_dim - 2 * hw;
        Rope {
            pairs: [t / 2, hw / 2, hw / 2],
        }
    }

    /// `(cos, sin)`, each `[S, d/2]`, for the `f × h × w` token grid.
    fn tables(&self, grid: [usize; 3], device: &Device) -> Result<(Tensor, Tensor)> {
        let half: usize = self.pairs.iter().sum();
        let tokens = grid.iter().product::<usize>();
        let (mut cos, mut sin) = (
            Vec::with_capacity(tokens * half),
            Vec::with_capacity(tokens * half),
        );
        for f in 0..grid[0] {
            for h in 0..grid[1] {
                for w in 0..grid[2] {
                    for (axis, pos) in [f, h, w].into_iter().enumerate() {
                        let m = 2 * self.pairs[axis];
                        for j in 0..self.pairs[axis] {
                            let omega = 1.0 / 10000f64.powf((2 * j) as f64 / m as f64);
                            let angle = pos as f64 * omega;
                            cos.push(angle.cos() as f32);
                            sin.push(angle.sin() as f32);
                        }
                    }
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (tokens, half), device)?,
            Tensor::from_vec(sin, (tokens, half), device)?,
        ))
    }

    /// Rotates `x` `[b, S, heads·d]` pairwise: `(a, b) → (a·c − b·s, a·s + b·c)`.
    fn apply(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let _s = profile::stage("wan.rope");
        // In f32 whatever the dtype, rounded back after (diffusers keeps
        // the rope in f32 and rotates against it).
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let (b, s, hd) = x.dims3()?;
        let half = hd / heads / 2;
        let x = x.reshape((b, s, heads, half, 2))?;
        let (x0, x1) = (
            x.narrow(4, 0, 1)?.squeeze(4)?,
            x.narrow(4, 1, 1)?.squeeze(4)?,
        );
        let c = cos.reshape((1, s, 1, half))?;
        let sn = sin.reshape((1, s, 1, half))?;
        let r0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&sn)?)?;
        let r1 = (x0.broadcast_mul(&sn)? + x1.broadcast_mul(&c)?)?;
        Tensor::stack(&[r0, r1], 4)?
            .reshape((b, s, hd))?
            .to_dtype(dtype)
    }
}

/// diffusers' `WanAttention` for text-to-video: biased q/k/v/out
/// projections, RMSNorm over all heads on q and k.
#[derive(Debug)]
struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    heads: usize,
    eps: f64,
}

impl WanAttention {
    fn new(vb: VarBuilder, dim: usize, heads: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), dim, dim)?,
            to_k: Linear::new(vb.pp("to_k"), dim, dim)?,
            to_v: Linear::new(vb.pp("to_v"), dim, dim)?,
            to_out: Linear::new(vb.pp("to_out.0"), dim, dim)?,
            norm_q: vb.pp("norm_q").get(dim, "weight")?,
            norm_k: vb.pp("norm_k").get(dim, "weight")?,
            heads,
            eps,
        })
    }

    /// The keys and values `x` attends to in `context`.
    fn keys_values(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = nn::ops::rms_norm(&self.to_k.forward(context)?, &self.norm_k, self.eps as f32)?;
        Ok((k, self.to_v.forward(context)?))
    }

    /// Attention of `x` to keys `k` and values `v` (rotated with `x`'s
    /// queries when `rope` is given: self-attention).
    fn attend(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let mut q = nn::ops::rms_norm(&self.to_q.forward(x)?, &self.norm_q, self.eps as f32)?;
        let rotated;
        let k = match rope {
            Some((cos, sin)) => {
                q = Rope::apply(&q, self.heads, cos, sin)?;
                rotated = Rope::apply(k, self.heads, cos, sin)?;
                &rotated
            }
            None => k,
        };
        let out = profile::time("wan.attention", || attention(&q, k, v, self.heads))?;
        self.to_out.forward(&out)
    }
}

#[derive(Debug)]
struct WanBlock {
    scale_shift_table: Tensor,
    attn1: WanAttention,
    norm2: Option<(Tensor, Tensor)>,
    attn2: WanAttention,
    ffn_in: Linear,
    ffn_out: Linear,
    eps: f64,
}

impl WanBlock {
    fn new(vb: VarBuilder, c: &WanTransformerConfig) -> Result<Self> {
        let dim = c.inner_dim();
        let heads = c.num_attention_heads;
        // What diffusers keeps in f32 whatever the dtype
        // (`_keep_in_fp32_modules`): the modulation table and the norms.
        let kept = vb.to_dtype(DType::F32);
        let norm2 = if c.cross_attn_norm {
            let n = kept.pp("norm2");
            Some((n.get(dim, "weight")?, n.get(dim, "bias")?))
        } else {
            None
        };
        Ok(Self {
            scale_shift_table: kept.get((1, 6, dim), "scale_shift_table")?,
            attn1: WanAttention::new(vb.pp("attn1"), dim, heads, c.eps)?,
            norm2,
            attn2: WanAttention::new(vb.pp("attn2"), dim, heads, c.eps)?,
            ffn_in: Linear::new(vb.pp("ffn.net.0.proj"), dim, c.ffn_dim)?,
            ffn_out: Linear::new(vb.pp("ffn.net.2"), c.ffn_dim, dim)?,
            eps: c.eps,
        })
    }

    /// `timestep_proj` is `[b, 6, dim]`, `text_kv` the cross-attention's
    /// keys and values of the embedded text.
    fn forward(
        &self,
        x: &Tensor,
        text_kv: &(Tensor, Tensor),
        timestep_proj: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        // As diffusers' block runs in half precision: the modulation, the
        // norms and the gated residual adds in f32, each rounded back to the
        // stream's dtype; attention and feed-forward in that dtype (all of
        // it f32, the casts no-ops, for an f32 model).
        let dtype = x.dtype();
        let wide = |t: &Tensor| t.to_dtype(DType::F32);
        let m = self
            .scale_shift_table
            .broadcast_add(&wide(timestep_proj)?)?;
        let slot = |i: usize| m.narrow(1, i, 1);
        let (shift, scale, gate) = (slot(0)?, slot(1)?, slot(2)?);
        let (c_shift, c_scale, c_gate) = (slot(3)?, slot(4)?, slot(5)?);

        let n = modulate(&layer_norm(&wide(x)?, self.eps)?, &shift, &scale)?.to_dtype(dtype)?;
        let (k, v) = self.attn1.keys_values(&n)?;
        let a = self.attn1.attend(&n, &k, &v, Some(rope))?;
        let x = (wide(x)? + wide(&a)?.broadcast_mul(&gate)?)?.to_dtype(dtype)?;

        let n2 = match &self.norm2 {
            Some((w, b)) => {
                nn::ops::layer_norm(&wide(&x)?, w, b, self.eps as f32)?.to_dtype(dtype)?
            }
            None => x.clone(),
        };
        let x = (&x + self.attn2.attend(&n2, &text_kv.0, &text_kv.1, None)?)?;

        let n3 =
            modulate(&layer_norm(&wide(&x)?, self.eps)?, &c_shift, &c_scale)?.to_dtype(dtype)?;
        let h = self.ffn_in.forward(&n3)?;
        let h = if cpu::applies(&h) {
            profile::time("wan.gelu", || cpu::gelu_tanh(&h))?
        } else {
            h.gelu()?
        };
        let f = self.ffn_out.forward(&h)?;
        (wide(&x)? + wide(&f)?.broadcast_mul(&c_gate)?)?.to_dtype(dtype)
    }
}

/// The embedded text (`[b, L, dim]`) and each block's cross-attention keys
/// and values of it: [`WanTransformer::prepare_text`].
#[derive(Debug)]
pub struct PreparedText {
    embedded: Tensor,
    kv: Vec<(Tensor, Tensor)>,
}

/// `WanTransformer3DModel`, text-to-video.
#[derive(Debug)]
pub struct WanTransformer {
    patch_embedding: Linear,
    time_1: Linear,
    time_2: Linear,
    time_proj: Linear,
    text_1: Linear,
    text_2: Linear,
    blocks: Vec<WanBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
    rope: Rope,
    config: WanTransformerConfig,
}

impl WanTransformer {
    pub fn new(vb: VarBuilder, config: WanTransformerConfig) -> Result<Self> {
        if let Some(why) = config.unsupported() {
            candle_core::bail!("WanTransformer3DModel: {why}");
        }
        let c = &config;
        let dim = c.inner_dim();
        let [pt, ph, pw] = c.patch_size;
        let patch = c.in_channels * pt * ph * pw;
        // The patch embedding is a Conv3d whose kernel is its stride: a
        // linear map of each patch, flattened (channel, frame, row, column).
        let pe = vb.pp("patch_embedding");
        let w = pe.get((dim, c.in_channels, pt, ph, pw), "weight")?;
        let patch_embedding =
            Linear::from_weights(w.reshape((dim, patch))?, Some(pe.get(dim, "bias")?));
        let ce = vb.pp("condition_embedder");
        // Kept in f32 whatever the dtype, as diffusers does
        // (`_keep_in_fp32_modules`): the time embedder and the output's
        // modulation table.
        let kept = vb.to_dtype(DType::F32);
        let blocks = (0..c.num_layers)
            .map(|i| WanBlock::new(vb.pp(format!("blocks.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding,
            time_1: Linear::new(
                kept.pp("condition_embedder.time_embedder.linear_1"),
                c.freq_dim,
                dim,
            )?,
            time_2: Linear::new(
                kept.pp("condition_embedder.time_embedder.linear_2"),
                dim,
                dim,
            )?,
            time_proj: Linear::new(ce.pp("time_proj"), dim, 6 * dim)?,
            text_1: Linear::new(ce.pp("text_embedder.linear_1"), c.text_dim, dim)?,
            text_2: Linear::new(ce.pp("text_embedder.linear_2"), dim, dim)?,
            blocks,
            scale_shift_table: kept.get((1, 2, dim), "scale_shift_table")?,
            proj_out: Linear::new(vb.pp("proj_out"), dim, c.out_channels() * pt * ph * pw)?,
            rope: Rope::new(c.attention_head_dim),
            config,
        })
    }

    pub fn config(&self) -> &WanTransformerConfig {
        &self.config
    }

    /// The denoiser's prediction for latents `x` `[b, C, F, H, W]` at
    /// timestep `t` (one per batch row) given the text encoder's states
    /// `text` `[b, L, text_dim]`; `[b, C_out, F, H, W]`.
    pub fn forward(&self, x: &Tensor, t: &[f32], text: &Tensor) -> Result<Tensor> {
        self.forward_stages(x, t, text, &mut |_, _| {})
    }

    /// The part of a forward pass that depends on the text alone: a
    /// pipeline runs it once per prompt instead of once per step, for the
    /// same bits.
    pub fn prepare_text(&self, text: &Tensor) -> Result<PreparedText> {
        cpu::on_workers(|| {
            let _s = profile::stage("wan.prepare_text");
            let embedded = self.text_2.forward(&self.text_1.forward(text)?.gelu()?)?;
            let kv = self
                .blocks
                .iter()
                .map(|b| b.attn2.keys_values(&embedded))
                .collect::<Result<_>>()?;
            Ok(PreparedText { embedded, kv })
        })
    }

    /// [`WanTransformer::forward`] with the text already prepared.
    pub fn forward_prepared(&self, x: &Tensor, t: &[f32], text: &PreparedText) -> Result<Tensor> {
        cpu::on_workers(|| self.forward_on_workers(x, t, text, &mut |_, _| {}))
    }

    /// [`WanTransformer::forward`], showing `on_stage` each intermediate as
    /// diffusers names it: `temb`, `timestep_proj` (`[b, 6·dim]`), `text`
    /// (embedded), `block.N`, `out`.
    pub fn forward_stages(
        &self,
        x: &Tensor,
        t: &[f32],
        text: &Tensor,
        on_stage: &mut (dyn FnMut(&str, &Tensor) + Send),
    ) -> Result<Tensor> {
        let text = self.prepare_text(text)?;
        cpu::on_workers(|| self.forward_on_workers(x, t, &text, on_stage))
    }

    fn forward_on_workers(
        &self,
        x: &Tensor,
        t: &[f32],
        text: &PreparedText,
        on_stage: &mut (dyn FnMut(&str, &Tensor) + Send),
    ) -> Result<Tensor> {
        let _s = profile::stage("wan.transformer");
        let c = &self.config;
        let (b, ch, f, h, w) = x.dims5()?;
        let [pt, ph, pw] = c.patch_size;
        if f % pt != 0 || h % ph != 0 || w % pw != 0 {
            candle_core::bail!("latents {f}x{h}x{w} are not whole {pt}x{ph}x{pw} patches");
        }
        let grid = [f / pt, h / ph, w / pw];
        if grid.iter().any(|&n| n > c.rope_max_seq_len) {
            candle_core::bail!(
                "latent grid {grid:?} exceeds rope_max_seq_len {}",
                c.rope_max_seq_len
            );
        }
        if t.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", t.len());
        }
        let tokens = grid.iter().product::<usize>();
        let dim = c.inner_dim();

        // Patches in token order (frame, row, column), each flattened
        // (channel, frame, row, column).
        let patches = x
            .reshape(vec![b, ch, grid[0], pt, grid[1], ph, grid[2], pw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b, tokens, ch * pt * ph * pw))?;
        let mut hidden = self.patch_embedding.forward(&patches)?;

        let sinusoid = timestep_sinusoid(t, c.freq_dim, x.device())?;
        // The time embedder runs in f32; its output is rounded to the
        // model's dtype before the projection (diffusers' `type_as`).
        let temb = self
            .time_2
            .forward(&nn::ops::silu(&self.time_1.forward(&sinusoid)?)?)?
            .to_dtype(hidden.dtype())?;
        let timestep_proj = self.time_proj.forward(&nn::ops::silu(&temb)?)?;
        on_stage("temb", &temb);
        on_stage("timestep_proj", &timestep_proj);
        let timestep_proj = timestep_proj.reshape((b, 6, dim))?;
        on_stage("text", &text.embedded);
        if text.embedded.dim(0)? != b {
            candle_core::bail!("text for {} rows, latents for {b}", text.embedded.dim(0)?);
        }
        let rope = self.rope.tables(grid, x.device())?;

        for (i, block) in self.blocks.iter().enumerate() {
            hidden = block.forward(&hidden, &text.kv[i], &timestep_proj, &rope)?;
            on_stage(&format!("block.{i}"), &hidden);
        }

        let m = self
            .scale_shift_table
            .broadcast_add(&temb.to_dtype(DType::F32)?.unsqueeze(1)?)?;
        let (shift, scale) = (m.narrow(1, 0, 1)?, m.narrow(1, 1, 1)?);
        let normed = modulate(
            &layer_norm(&hidden.to_dtype(DType::F32)?, c.eps)?,
            &shift,
            &scale,
        )?
        .to_dtype(hidden.dtype())?;
        let out = self.proj_out.forward(&normed)?;
        // Each token's features are (frame, row, column, channel) of its patch.
        let co = c.out_channels();
        let out = out
            .reshape(vec![b, grid[0], grid[1], grid[2], pt, ph, pw, co])?
            .permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape((b, co, f, h, w))?;
        on_stage("out", &out);
        Ok(out)
    }
}
