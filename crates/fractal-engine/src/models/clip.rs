//! The CLIP text encoder of diffusers pipelines (transformers `CLIPTextModel`),
//! configurable from `text_encoder/config.json`. Returns `last_hidden_state`
//! (after the final layer norm), which is what TextToVideoSD conditions on.

use candle_core::{Device, Module, Result, Tensor, D};
use candle_nn::{self as nn, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::models::layers::{softmax_last_dim, Linear};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

#[derive(Clone, Copy, Debug)]
enum Act {
    Gelu,
    QuickGelu,
}

impl Act {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Act::Gelu => xs.gelu_erf(),
            Act::QuickGelu => xs * nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}

#[derive(Debug)]
struct Layer {
    ln1: nn::LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: nn::LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<Layer>,
    final_layer_norm: nn::LayerNorm,
    heads: usize,
    act: Act,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, config: ClipTextConfig) -> Result<Self> {
        let act = match config.hidden_act.as_str() {
            "gelu" => Act::Gelu,
            "quick_gelu" => Act::QuickGelu,
            other => candle_core::bail!("text encoder: unsupported hidden_act {other:?}"),
        };
        let c = &config;
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            candle_core::bail!("text encoder: hidden_size must divide by num_attention_heads");
        }
        let vb = vb.pp("text_model");
        let e = vb.pp("embeddings");
        let token_embedding = nn::embedding(c.vocab_size, c.hidden_size, e.pp("token_embedding"))?;
        let position_embedding = nn::embedding(
            c.max_position_embeddings,
            c.hidden_size,
            e.pp("position_embedding"),
        )?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vb.pp(format!("encoder.layers.{i}"));
            let (h, m) = (c.hidden_size, c.intermediate_size);
            layers.push(Layer {
                ln1: nn::layer_norm(h, c.layer_norm_eps, l.pp("layer_norm1"))?,
                q: Linear::new(l.pp("self_attn.q_proj"), h, h)?,
                k: Linear::new(l.pp("self_attn.k_proj"), h, h)?,
                v: Linear::new(l.pp("self_attn.v_proj"), h, h)?,
                o: Linear::new(l.pp("self_attn.out_proj"), h, h)?,
                ln2: nn::layer_norm(h, c.layer_norm_eps, l.pp("layer_norm2"))?,
                fc1: Linear::new(l.pp("mlp.fc1"), h, m)?,
                fc2: Linear::new(l.pp("mlp.fc2"), m, h)?,
            });
        }
        let final_layer_norm =
            nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            heads: c.num_attention_heads,
            act,
            config,
        })
    }

    fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (len, len), device)
    }

    /// `input_ids` `[batch, tokens]` (u32) to `[batch, tokens, hidden]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        crate::kernels::cpu::on_workers(|| self.forward_on_workers(input_ids))
    }

    fn forward_on_workers(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        if n > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder: {n} tokens exceed {}",
                self.config.max_position_embeddings
            );
        }
        let positions = Tensor::arange(0u32, n as u32, input_ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(n, input_ids.device())?.to_dtype(xs.dtype())?;
        let h = self.config.hidden_size;
        let hd = h / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let x = l.ln1.forward(&xs)?;
            let split = |t: Tensor| {
                t.reshape((b, n, self.heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = split((l.q.forward(&x)? * scale)?)?;
            let k = split(l.k.forward(&x)?)?;
            let v = split(l.v.forward(&x)?)?;
            let att = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
            let att = softmax_last_dim(&att)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h))?;
            xs = l.o.forward_add(&y, &xs)?;
            let hidden = self.act.apply(&l.fc1.forward(&l.ln2.forward(&xs)?)?)?;
            xs = l.fc2.forward_add(&hidden, &xs)?;
        }
        self.final_layer_norm
            .forward(&xs)?
            .contiguous()
            .and_then(|t| t.squeeze(D::Minus1).or(Ok(t)))
    }
}
