//! The T5 encoder as transformers defines it (`T5EncoderModel`,
//! `UMT5EncoderModel`): Wan's text encoder is umT5-XXL, diffusers' tiny Wan
//! tests use plain T5.
//!
//! Pre-norm blocks (RMS layer norm without bias or mean), self-attention
//! with a learned relative-position bias added to unscaled scores, and a
//! ReLU or gated tanh-GELU feed-forward. T5 learns the bias in its first
//! block and reuses it in every block; umT5 learns one per block (the
//! difference candle-transformers' T5 does not model).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{self as nn, VarBuilder};
use serde::{Deserialize, Serialize};

/// `text_encoder/config.json` (the encoder's keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    /// `t5` or `umt5`.
    pub model_type: String,
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu` or `gated-gelu`.
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

impl T5Config {
    fn bias_per_block(&self) -> bool {
        self.model_type == "umt5"
    }
}

/// What transformers' T5 and UMT5 blocks do to f16 hidden states after
/// each residual add: T5's activations can outgrow f16, and an infinite
/// one is clamped to f16's largest value less 1000 (the whole tensor is
/// clamped then, finite values beyond that bound included).
fn clamp_f16_overflow(x: Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x);
    }
    let largest = x
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if largest.is_finite() {
        return Ok(x);
    }
    let bound = half::f16::MAX.to_f32() - 1000.0;
    x.clamp(-bound, bound)
}

/// T5's layer norm: `w · x / sqrt(mean(x²) + eps)`, accumulated in f32
/// and given in the weight's dtype (the residual stream may be wider).
fn t5_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let wide = |t: &Tensor| t.to_dtype(DType::F32);
    nn::ops::rms_norm(&wide(x)?, &wide(weight)?, eps as f32)?.to_dtype(weight.dtype())
}

/// `a + b`, in the wider dtype of the two (as torch promotes).
fn add_promoted(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == b.dtype() {
        return a + b;
    }
    a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?
}

/// `gelu_new`: the tanh approximation.
fn gelu_new(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// The bucket of `memory − query` for a bidirectional encoder, computed in
/// f32 as transformers does (the log ratio is truncated toward zero).
fn bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let max_exact = half / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        let ratio = (distance as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        large.min(half - 1)
    };
    bucket as u32
}

struct SelfAttention {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    relative_bias: Option<nn::Embedding>,
    heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, c: &T5Config, has_bias: bool) -> Result<Self> {
        let inner = c.num_heads * c.d_kv;
        Ok(Self {
            q: nn::linear_no_bias(c.d_model, inner, vb.pp("q"))?,
            k: nn::linear_no_bias(c.d_model, inner, vb.pp("k"))?,
            v: nn::linear_no_bias(c.d_model, inner, vb.pp("v"))?,
            o: nn::linear_no_bias(inner, c.d_model, vb.pp("o"))?,
            relative_bias: if has_bias {
                Some(nn::embedding(
                    c.relative_attention_num_buckets,
                    c.num_heads,
                    vb.pp("relative_attention_bias"),
                )?)
            } else {
                None
            },
            heads: c.num_heads,
            d_kv: c.d_kv,
        })
    }

    /// The learned bias `[1, heads, n, n]` for `n` tokens.
    fn position_bias(&self, n: usize, c: &T5Config, device: &Device) -> Result<Option<Tensor>> {
        let Some(table) = &self.relative_bias else {
            return Ok(None);
        };
        let ids: Vec<u32> = (0..n as i64)
            .flat_map(|q| {
                (0..n as i64).map(move |k| {
                    bucket(
                        k - q,
                        c.relative_attention_num_buckets,
                        c.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let ids = Tensor::from_vec(ids, (n, n), device)?;
        Ok(Some(table.forward(&ids)?.permute((2, 0, 1))?.unsqueeze(0)?))
    }

    /// `bias` already holds the position bias and the padding mask.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // T5 does not scale the scores: the bias is learned on this scale.
        // Scores plus bias and mask, and their softmax, in f32 whatever the
        // dtype (transformers upcasts the softmax; the mask is f32's lowest).
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(bias)?;
        let weights = nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

enum FeedForward {
    Relu {
        wi: nn::Linear,
        wo: nn::Linear,
    },
    GatedGelu {
        wi_0: nn::Linear,
        wi_1: nn::Linear,
        wo: nn::Linear,
    },
}

impl FeedForward {
    fn new(vb: VarBuilder, c: &T5Config) -> Result<Self> {
        let (d, ff) = (c.d_model, c.d_ff);
        // transformers keeps `wo` in f32 for an f16 model
        // (`_keep_in_fp32_modules`, applied for f16 only): its input is
        // widened, and the residual stream it adds to becomes f32.
        let wo_vb = if vb.dtype() == DType::F16 {
            vb.to_dtype(DType::F32)
        } else {
            vb.clone()
        };
        match c.feed_forward_proj.as_str() {
            "relu" => Ok(FeedForward::Relu {
                wi: nn::linear_no_bias(d, ff, vb.pp("wi"))?,
                wo: nn::linear_no_bias(ff, d, wo_vb.pp("wo"))?,
            }),
            "gated-gelu" => Ok(FeedForward::GatedGelu {
                wi_0: nn::linear_no_bias(d, ff, vb.pp("wi_0"))?,
                wi_1: nn::linear_no_bias(d, ff, vb.pp("wi_1"))?,
                wo: nn::linear_no_bias(ff, d, wo_vb.pp("wo"))?,
            }),
            other => candle_core::bail!(
                "T5 feed_forward_proj {other:?} is not supported (relu, gated-gelu)"
            ),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = |wo: &nn::Linear, h: Tensor| wo.forward(&h.to_dtype(wo.weight().dtype())?);
        match self {
            FeedForward::Relu { wi, wo } => out(wo, wi.forward(x)?.relu()?),
            FeedForward::GatedGelu { wi_0, wi_1, wo } => {
                out(wo, (gelu_new(&wi_0.forward(x)?)? * wi_1.forward(x)?)?)
            }
        }
    }
}

struct Block {
    attention_norm: Tensor,
    attention: SelfAttention,
    ff_norm: Tensor,
    ff: FeedForward,
}

/// The encoder stack of `T5EncoderModel` / `UMT5EncoderModel`.
pub struct T5Encoder {
    embed: nn::Embedding,
    blocks: Vec<Block>,
    final_norm: Tensor,
    config: T5Config,
}

impl T5Encoder {
    pub fn new(vb: VarBuilder, config: T5Config) -> Result<Self> {
        let c = &config;
        if c.model_type != "t5" && c.model_type != "umt5" {
            candle_core::bail!("text encoder {:?} is not T5 or umT5", c.model_type);
        }
        // The embedding is shared with the (absent) decoder; files store it
        // as `shared.weight`, some also as `encoder.embed_tokens.weight`.
        let embed = if vb.contains_tensor("shared.weight") {
            nn::embedding(c.vocab_size, c.d_model, vb.pp("shared"))?
        } else {
            nn::embedding(c.vocab_size, c.d_model, vb.pp("encoder.embed_tokens"))?
        };
        let enc = vb.pp("encoder");
        let blocks = (0..c.num_layers)
            .map(|i| {
                let b = enc.pp(format!("block.{i}"));
                let has_bias = i == 0 || c.bias_per_block();
                Ok(Block {
                    attention_norm: b.pp("layer.0.layer_norm").get(c.d_model, "weight")?,
                    attention: SelfAttention::new(b.pp("layer.0.SelfAttention"), c, has_bias)?,
                    ff_norm: b.pp("layer.1.layer_norm").get(c.d_model, "weight")?,
                    // transformers names the gated variant DenseReluDense too.
                    ff: FeedForward::new(b.pp("layer.1.DenseReluDense"), c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed,
            blocks,
            final_norm: enc.pp("final_layer_norm").get(c.d_model, "weight")?,
            config,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// Hidden states `[b, n, d_model]` for token ids `[b, n]`, of which the
    /// first `valid[i]` of row `i` are the prompt and the rest padding that
    /// no token attends to.
    pub fn forward(&self, ids: &Tensor, valid: &[usize]) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if valid.len() != b || valid.iter().any(|&v| v == 0 || v > n) {
            candle_core::bail!("valid lengths {valid:?} for {b} rows of {n} tokens");
        }
        let c = &self.config;
        let device = ids.device();
        // Padding keys get the lowest f32, as transformers' mask does.
        let mask: Vec<f32> = valid
            .iter()
            .flat_map(|&v| (0..n).map(move |j| if j < v { 0.0 } else { f32::MIN }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, n), device)?;
        let mut x = self.embed.forward(ids)?;
        let mut shared_bias: Option<Tensor> = None;
        for block in &self.blocks {
            let bias = match block.attention.position_bias(n, c, device)? {
                Some(own) => own,
                None => shared_bias.clone().unwrap_or(Tensor::zeros(
                    (1, c.num_heads, n, n),
                    DType::F32,
                    device,
                )?),
            };
            if !c.bias_per_block() && shared_bias.is_none() {
                shared_bias = Some(bias.clone());
            }
            let bias = bias.to_dtype(DType::F32)?.broadcast_add(&mask)?;
            let normed = t5_norm(&x, &block.attention_norm, c.layer_norm_epsilon)?;
            x = clamp_f16_overflow(add_promoted(&x, &block.attention.forward(&normed, &bias)?)?)?;
            let normed = t5_norm(&x, &block.ff_norm, c.layer_norm_epsilon)?;
            x = clamp_f16_overflow(add_promoted(&x, &block.ff.forward(&normed)?)?)?;
        }
        t5_norm(&x, &self.final_norm, c.layer_norm_epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_are_exact_near_and_logarithmic_far() {
        // 32 buckets, max distance 128: 0..8 exact per side, then log bins.
        assert_eq!(bucket(0, 32, 128), 0);
        assert_eq!(bucket(-3, 32, 128), 3);
        assert_eq!(bucket(3, 32, 128), 19);
        assert_eq!(bucket(-7, 32, 128), 7);
        assert_eq!(bucket(-8, 32, 128), 8);
        assert_eq!(bucket(-200, 32, 128), 15);
        assert_eq!(bucket(200, 32, 128), 31);
    }
}
