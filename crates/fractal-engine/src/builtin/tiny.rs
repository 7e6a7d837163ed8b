//! The built-in tiny model: the real architecture at tiny widths, with weights
//! derived deterministically from each parameter's name.
//!
//! Weights are drawn with the normative `fractal/noise/v1` generator, seeded by
//! SHA-256(`"fractal/tiny-v1/"` || parameter name), so every build on every
//! platform gets bit-identical weights without shipping a file. They can be
//! exported as a diffusers folder (`write_diffusers_folder`) for the Python
//! parity scripts and to exercise the real loader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};

use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use fractal_protocol::noise::{fill_gaussian, Stream};

use crate::degradation::{seed_for, Degradation};
use crate::models::autoencoder_kl::{VaeConfig, VaeDecoder};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::unet3d::{Unet3d, Unet3dConfig};
use crate::pipelines::text_to_video_sd::model::{
    Model, ModelConfigs, TEXT_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS,
};
use crate::pipelines::LoadOptions;
use crate::EngineError;

pub const TINY_NAME: &str = "tiny-v1";

/// Which tiny variant (the parity fixtures cover each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyVariant {
    /// Two levels, one cross-attention level: the default grid model.
    Base,
    /// Three levels, two layers per block, more heads: exercises more of the graph.
    Wide,
    /// ModelScope text-to-video 1.7B's exact shapes with seeded random weights
    /// (about 1.8B parameters, 7 GB in f32): for speed and memory measurements
    /// at real size, never for pictures.
    ModelScopeShape,
}

impl TinyVariant {
    pub fn name(self) -> &'static str {
        match self {
            TinyVariant::Base => "tiny-v1",
            TinyVariant::Wide => "tiny-wide-v1",
            TinyVariant::ModelScopeShape => "ms-1.7b-shape",
        }
    }
    pub fn parse(name: &str) -> Option<Self> {
        [
            TinyVariant::Base,
            TinyVariant::Wide,
            TinyVariant::ModelScopeShape,
        ]
        .into_iter()
        .find(|v| v.name() == name)
    }
}

pub fn configs(variant: TinyVariant) -> ModelConfigs {
    if variant == TinyVariant::ModelScopeShape {
        return modelscope_shape();
    }
    let text = ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-5,
    };
    let base = Unet3dConfig {
        in_channels: 4,
        out_channels: 4,
        block_out_channels: vec![32, 64],
        down_block_types: vec!["CrossAttnDownBlock3D".into(), "DownBlock3D".into()],
        up_block_types: vec!["UpBlock3D".into(), "CrossAttnUpBlock3D".into()],
        layers_per_block: 1,
        attention_head_dim: 8,
        num_attention_heads: None,
        cross_attention_dim: 32,
        norm_num_groups: 8,
        norm_eps: 1e-5,
        downsample_padding: 1,
        mid_block_scale_factor: 1.0,
        act_fn: "silu".into(),
    };
    let unet = match variant {
        TinyVariant::Wide => Unet3dConfig {
            block_out_channels: vec![32, 48, 64],
            down_block_types: vec![
                "CrossAttnDownBlock3D".into(),
                "CrossAttnDownBlock3D".into(),
                "DownBlock3D".into(),
            ],
            up_block_types: vec![
                "UpBlock3D".into(),
                "CrossAttnUpBlock3D".into(),
                "CrossAttnUpBlock3D".into(),
            ],
            layers_per_block: 2,
            attention_head_dim: 16,
            norm_num_groups: 16,
            ..base
        },
        // ModelScopeShape returned above.
        _ => base,
    };
    let vae = VaeConfig {
        in_channels: 3,
        out_channels: 3,
        latent_channels: 4,
        block_out_channels: vec![16, 32, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        scaling_factor: 0.18215,
    };
    ModelConfigs { text, unet, vae }
}

/// damo-vilab/text-to-video-ms-1.7b's configs (text encoder = OpenCLIP ViT-H
/// text tower, UNet3D, SD VAE).
fn modelscope_shape() -> ModelConfigs {
    ModelConfigs {
        text: ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            max_position_embeddings: 77,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        },
        unet: Unet3dConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_block_types: vec![
                "CrossAttnDownBlock3D".into(),
                "CrossAttnDownBlock3D".into(),
                "CrossAttnDownBlock3D".into(),
                "DownBlock3D".into(),
            ],
            up_block_types: vec![
                "UpBlock3D".into(),
                "CrossAttnUpBlock3D".into(),
                "CrossAttnUpBlock3D".into(),
                "CrossAttnUpBlock3D".into(),
            ],
            layers_per_block: 2,
            attention_head_dim: 64,
            num_attention_heads: None,
            cross_attention_dim: 1024,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
        },
        vae: VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
        },
    }
}

/// A `VarBuilder` backend that makes each requested parameter from its name,
/// and remembers what it made (for export).
#[derive(Default, Clone)]
pub struct TinyWeights {
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
    /// The dtype they are given in, and how they differ from the real
    /// tiny model's.
    options: LoadOptions,
}

impl TinyWeights {
    pub fn new(options: LoadOptions) -> Self {
        TinyWeights {
            made: Default::default(),
            options,
        }
    }

    pub fn var_builder(&self, prefix: &str, device: &Device) -> VarBuilder<'static> {
        let backend = TinyBackend {
            prefix: prefix.to_string(),
            made: self.made.clone(),
            degradation: self.options.degradation,
        };
        VarBuilder::from_backend(Box::new(backend), self.options.dtype, device.clone())
    }

    /// The dtype the weights are given in.
    pub fn dtype(&self) -> DType {
        self.options.dtype
    }

    /// Parameters made so far under `prefix` (names without the prefix).
    pub fn take(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let made = self.made.lock().expect("tiny weights lock");
        made.iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    }
}

struct TinyBackend {
    prefix: String,
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
    degradation: Degradation,
}

impl SimpleBackend for TinyBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hint: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let full = format!("{}{}", self.prefix, name);
        if let Some(t) = self.made.lock().expect("tiny weights lock").get(&full) {
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let dims = shape.dims().to_vec();
        let mut values = vec![0f32; shape.elem_count()];
        fill_gaussian(seed_for(&full), Stream::InitialLatents, &mut values);
        let is_bias = name.ends_with("bias");
        // RMS norms of the Wan VAE call theirs `gamma`, shaped `[C, 1, 1(, 1)]`.
        let is_norm_weight = (dims.len() == 1 && !is_bias) || name.ends_with("gamma");
        // Norm weights around 1, biases small, matrices scaled by 1/sqrt(fan_in).
        let scale = if is_bias || is_norm_weight {
            0.1
        } else {
            let fan_in: usize = dims[1..].iter().product();
            1.0 / (fan_in.max(1) as f32).sqrt()
        };
        let offset = if is_norm_weight { 1.0 } else { 0.0 };
        for v in &mut values {
            *v = offset + scale * *v;
        }
        self.degradation.apply(&full, &mut values);
        let t = Tensor::from_vec(values, dims, &Device::Cpu)?;
        self.made
            .lock()
            .expect("tiny weights lock")
            .insert(full, t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("tiny weights need a shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // The VAE probes for the current diffusers attention names, T5 for
        // the name transformers stores its embedding under.
        name.ends_with("to_q.weight") || name == "shared.weight"
    }
}

/// The tiny model as a TextToVideoSD [`Model`]: built in memory, or written
/// out as a diffusers folder.
impl Model {
    /// The built-in tiny model (weights derived from parameter names).
    pub fn tiny(variant: TinyVariant, device: &Device) -> std::result::Result<Self, EngineError> {
        Ok(Self::tiny_with_weights(variant, device)?.0)
    }

    /// The tiny model in `options.dtype`, its weights changed by
    /// `options.degradation` (a stand-in for "almost the pinned weights" in
    /// the cheating-prover tests).
    pub fn tiny_with(
        variant: TinyVariant,
        options: LoadOptions,
        device: &Device,
    ) -> std::result::Result<Self, EngineError> {
        Ok(Self::tiny_from(variant, TinyWeights::new(options), device)?.0)
    }

    fn tiny_with_weights(
        variant: TinyVariant,
        device: &Device,
    ) -> std::result::Result<(Self, TinyWeights), EngineError> {
        Self::tiny_from(variant, TinyWeights::default(), device)
    }

    fn tiny_from(
        variant: TinyVariant,
        w: TinyWeights,
        device: &Device,
    ) -> std::result::Result<(Self, TinyWeights), EngineError> {
        let configs = configs(variant);
        let text_encoder =
            ClipTextModel::new(w.var_builder("text_encoder.", device), configs.text.clone())?;
        let unet = Unet3d::new(w.var_builder("unet.", device), configs.unet.clone())?;
        let vae = VaeDecoder::new(w.var_builder("vae.", device), &configs.vae)?;
        Ok((
            Model {
                tokenizer: ClipTokenizer::builtin()?,
                text_encoder,
                unet,
                vae,
                configs,
                device: device.clone(),
                dtype: w.options.dtype,
            },
            w,
        ))
    }

    /// Writes the tiny model as a diffusers folder that diffusers and
    /// [`Model::load`] both read. Returns the weight files written.
    pub fn write_tiny_folder(
        variant: TinyVariant,
        dir: &Path,
        scheduler: &fractal_protocol::manifest::SchedulerSpec,
    ) -> std::result::Result<Vec<PathBuf>, EngineError> {
        let (model, weights) = Self::tiny_with_weights(variant, &Device::Cpu)?;
        let c = &model.configs;
        make_vae_encoder(&weights.var_builder("vae.", &Device::Cpu), &c.vae)?;
        let write_json = |rel: &str, v: serde_json::Value| super::write_json(dir, rel, &v);
        write_json(
            "model_index.json",
            serde_json::json!({
                "_class_name": "TextToVideoSDPipeline",
                "_diffusers_version": "0.42.1",
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet3DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }),
        )?;
        let mut unet = serde_json::to_value(&c.unet).expect("json");
        unet["_class_name"] = "UNet3DConditionModel".into();
        write_json("unet/config.json", unet)?;
        let n = c.vae.block_out_channels.len();
        let mut vae = serde_json::to_value(&c.vae).expect("json");
        vae["_class_name"] = "AutoencoderKL".into();
        vae["down_block_types"] = serde_json::json!(vec!["DownEncoderBlock2D"; n]);
        vae["up_block_types"] = serde_json::json!(vec!["UpDecoderBlock2D"; n]);
        vae["act_fn"] = "silu".into();
        write_json("vae/config.json", vae)?;
        let mut text = serde_json::to_value(&c.text).expect("json");
        text["architectures"] = serde_json::json!(["CLIPTextModel"]);
        text["model_type"] = "clip_text_model".into();
        text["projection_dim"] = 32.into();
        text["bos_token_id"] = 49406.into();
        text["eos_token_id"] = 49407.into();
        text["pad_token_id"] = 1.into();
        write_json("text_encoder/config.json", text)?;
        write_json(
            "scheduler/scheduler_config.json",
            crate::schedulers::diffusers_scheduler_config(scheduler),
        )?;
        ClipTokenizer::builtin()?.write_folder(&dir.join("tokenizer"))?;
        let mut written = Vec::new();
        for (prefix, rel) in [
            ("text_encoder.", TEXT_WEIGHTS),
            ("unet.", UNET_WEIGHTS),
            ("vae.", VAE_WEIGHTS),
        ] {
            let path = dir.join(rel);
            super::save_tensors(weights.take(prefix), &path)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Makes the parameters of the half of diffusers' `AutoencoderKL` the engine
/// never runs (`encoder.*`, `quant_conv`), so that a written folder holds
/// the whole model diffusers loads: diffusers' `Encoder` with
/// `DownEncoderBlock2D`s, a mid block with one attention, `double_z`.
fn make_vae_encoder(vb: &VarBuilder, v: &VaeConfig) -> candle_core::Result<()> {
    let affine = |vb: VarBuilder, shape: &[usize]| -> candle_core::Result<()> {
        vb.get(shape, "weight")?;
        vb.get(shape[0], "bias")?;
        Ok(())
    };
    let conv = |vb: VarBuilder, cin: usize, cout: usize, k: usize| affine(vb, &[cout, cin, k, k]);
    let norm = |vb: VarBuilder, c: usize| affine(vb, &[c]);
    let resnet = |vb: VarBuilder, cin: usize, cout: usize| -> candle_core::Result<()> {
        norm(vb.pp("norm1"), cin)?;
        conv(vb.pp("conv1"), cin, cout, 3)?;
        norm(vb.pp("norm2"), cout)?;
        conv(vb.pp("conv2"), cout, cout, 3)?;
        if cin != cout {
            conv(vb.pp("conv_shortcut"), cin, cout, 1)?;
        }
        Ok(())
    };
    let e = vb.pp("encoder");
    let channels = &v.block_out_channels;
    conv(e.pp("conv_in"), v.in_channels, channels[0], 3)?;
    let mut cin = channels[0];
    for (i, &cout) in channels.iter().enumerate() {
        let block = e.pp(format!("down_blocks.{i}"));
        for j in 0..v.layers_per_block {
            resnet(block.pp(format!("resnets.{j}")), cin, cout)?;
            cin = cout;
        }
        if i + 1 < channels.len() {
            conv(block.pp("downsamplers.0.conv"), cout, cout, 3)?;
        }
    }
    let mid = e.pp("mid_block");
    resnet(mid.pp("resnets.0"), cin, cin)?;
    let attention = mid.pp("attentions.0");
    norm(attention.pp("group_norm"), cin)?;
    for projection in ["to_q", "to_k", "to_v", "to_out.0"] {
        affine(attention.pp(projection), &[cin, cin])?;
    }
    resnet(mid.pp("resnets.1"), cin, cin)?;
    norm(e.pp("conv_norm_out"), cin)?;
    let moments = 2 * v.latent_channels;
    conv(e.pp("conv_out"), cin, moments, 3)?;
    conv(vb.pp("quant_conv"), moments, moments, 1)
}

/// The manifest of the built-in tiny model: what `fractal grid` and the tests pin.
pub fn manifest(variant: TinyVariant) -> fractal_protocol::ModelManifest {
    use fractal_protocol::manifest::*;
    ModelManifest {
        manifest_version: MANIFEST_VERSION,
        name: format!("fractal-{}", variant.name()),
        architecture: Architecture::TextToVideoSd,
        dtype: DType::F32,
        weights: Weights::Builtin(variant.name().to_string()),
        scheduler: crate::schedulers::modelscope_ddim(),
        defaults: GenerationDefaults {
            size: Size {
                width: 64,
                height: 64,
            },
            frames: 8,
            steps: 10,
            guidance_scale: 9.0,
            fps: 8,
        },
        limits: Limits {
            sizes: vec![
                Size {
                    width: 64,
                    height: 64,
                },
                Size {
                    width: 32,
                    height: 32,
                },
                Size {
                    width: 128,
                    height: 128,
                },
            ],
            max_frames: 24,
            max_steps: 50,
            max_prompt_bytes: 1000,
        },
        verification: Verification::with_defaults(30.0),
    }
}
