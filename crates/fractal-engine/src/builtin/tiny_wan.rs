//! The built-in Wan models: Wan 2.1's architecture at tiny widths
//! (`tiny-wan-v1`, what tests and `fractal grid --tiny tiny-wan-v1` run),
//! and at Wan2.1-T2V-1.3B's shapes (`wan-1.3b-shape`, for speed and memory
//! measurements). Weights are derived from parameter names exactly as
//! `tiny-v1`'s are ([`TinyWeights`]); the tokenizer is a small SentencePiece
//! unigram model in umT5's format, built into the binary.

use std::path::{Path, PathBuf};

use candle_core::{Device, Shape};

use crate::builtin::tiny::TinyWeights;
use crate::builtin::{save_tensors, write_json};
use crate::models::autoencoder_kl_wan::WanVaeConfig;
use crate::models::t5::T5Config;
use crate::models::t5_tokenizer::T5Tokenizer;
use crate::models::wan_transformer::WanTransformerConfig;
use crate::pipelines::wan::model::{
    Model, ModelConfigs, TEXT_WEIGHTS, TRANSFORMER_WEIGHTS, VAE_WEIGHTS,
};
use crate::pipelines::LoadOptions;
use crate::EngineError;

/// A unigram tokenizer of 70 pieces in umT5's `tokenizer.json` format (made
/// by `tools/parity/make_wan_fixtures.py`), so prompts tokenize as a real
/// Wan folder's do, only coarser.
const TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/t5-unigram-tokenizer.json");

/// Which built-in Wan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WanVariant {
    /// umT5, transformer and VAE at tiny widths: the Wan grid model.
    Tiny,
    /// Wan2.1-T2V-1.3B's transformer and VAE shapes with seeded random
    /// weights (1.4B parameters, 5.7 GB in f32), and a smaller umT5 (the
    /// real umT5-XXL is 5.7B parameters, 23 GB in f32, more than a 24 GiB
    /// machine holds beside the rest): for speed and memory measurements.
    Wan13bShape,
}

impl WanVariant {
    pub fn name(self) -> &'static str {
        match self {
            WanVariant::Tiny => "tiny-wan-v1",
            WanVariant::Wan13bShape => "wan-1.3b-shape",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [WanVariant::Tiny, WanVariant::Wan13bShape]
            .into_iter()
            .find(|v| v.name() == name)
    }
}

/// Wan 2.1's latent normalisation (every released Wan 2.1 VAE's config).
const LATENTS_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
const LATENTS_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.916,
];

pub fn configs(variant: WanVariant) -> ModelConfigs {
    let tiny = ModelConfigs {
        text: T5Config {
            model_type: "umt5".into(),
            // The built-in tokenizer's pieces.
            vocab_size: 70,
            d_model: 32,
            d_kv: 8,
            d_ff: 64,
            num_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        },
        transformer: WanTransformerConfig {
            patch_size: [1, 2, 2],
            num_attention_heads: 2,
            attention_head_dim: 16,
            in_channels: 16,
            out_channels: Some(16),
            text_dim: 32,
            freq_dim: 64,
            ffn_dim: 64,
            num_layers: 2,
            cross_attn_norm: true,
            eps: 1e-6,
            rope_max_seq_len: 64,
            image_dim: None,
            added_kv_proj_dim: None,
            qk_norm: Some("rms_norm_across_heads".into()),
        },
        vae: WanVaeConfig {
            base_dim: 8,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 2, 2],
            num_res_blocks: 1,
            temperal_downsample: vec![false, true, true],
            latents_mean: LATENTS_MEAN.to_vec(),
            latents_std: LATENTS_STD.to_vec(),
            out_channels: 3,
            is_residual: false,
            patch_size: None,
        },
    };
    match variant {
        WanVariant::Tiny => tiny,
        // Wan2.1-T2V-1.3B-Diffusers' transformer and VAE configs; umT5-XXL's
        // widths with 2 of its 24 layers.
        WanVariant::Wan13bShape => ModelConfigs {
            text: T5Config {
                d_model: 4096,
                d_kv: 64,
                d_ff: 10240,
                num_heads: 64,
                ..tiny.text
            },
            transformer: WanTransformerConfig {
                num_attention_heads: 12,
                attention_head_dim: 128,
                text_dim: 4096,
                freq_dim: 256,
                ffn_dim: 8960,
                num_layers: 30,
                rope_max_seq_len: 1024,
                ..tiny.transformer
            },
            vae: WanVaeConfig {
                base_dim: 96,
                dim_mult: vec![1, 2, 4, 4],
                num_res_blocks: 2,
                ..tiny.vae
            },
        },
    }
}

pub fn tokenizer() -> Result<T5Tokenizer, EngineError> {
    T5Tokenizer::from_json(
        TOKENIZER_JSON,
        Path::new("<built-in t5-unigram-tokenizer.json>"),
    )
}

impl Model {
    /// A built-in Wan (weights derived from parameter names).
    pub fn tiny(variant: WanVariant, device: &Device) -> Result<Self, EngineError> {
        Ok(Self::tiny_from(variant, TinyWeights::default(), device)?.0)
    }

    /// A built-in Wan in `options.dtype`, its weights changed by
    /// `options.degradation` (the cheating provers of the verifier's tests).
    pub fn tiny_with(
        variant: WanVariant,
        options: LoadOptions,
        device: &Device,
    ) -> Result<Self, EngineError> {
        Ok(Self::tiny_from(variant, TinyWeights::new(options), device)?.0)
    }

    fn tiny_from(
        variant: WanVariant,
        w: TinyWeights,
        device: &Device,
    ) -> Result<(Self, TinyWeights), EngineError> {
        let model = Model::assemble(
            configs(variant),
            tokenizer()?,
            Path::new(variant.name()),
            device,
            w.dtype(),
            |(component, _)| Ok(w.var_builder(&format!("{component}."), device)),
        )?;
        Ok((model, w))
    }

    /// Writes a built-in Wan as a diffusers `WanPipeline` folder that
    /// diffusers and [`Model::load`] both read (the VAE with its encoder,
    /// which diffusers loads and this engine does not run). Returns the
    /// weight files written.
    pub fn write_tiny_folder(
        variant: WanVariant,
        dir: &Path,
        scheduler: &fractal_protocol::manifest::SchedulerSpec,
    ) -> Result<Vec<PathBuf>, EngineError> {
        let (model, weights) = Self::tiny_from(variant, TinyWeights::default(), &Device::Cpu)?;
        let c = &model.configs;
        for (name, shape) in vae_encoder_parameters(&c.vae) {
            weights
                .var_builder("vae.", &Device::Cpu)
                .get(Shape::from_dims(&shape), &name)?;
        }
        let scheduler_class =
            crate::schedulers::diffusers_scheduler_config(scheduler)["_class_name"].clone();
        let json = |rel: &str, v: serde_json::Value| write_json(dir, rel, &v);
        json(
            "model_index.json",
            serde_json::json!({
                "_class_name": "WanPipeline",
                "_diffusers_version": "0.42.1",
                "scheduler": ["diffusers", scheduler_class],
                "text_encoder": ["transformers", "UMT5EncoderModel"],
                "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "WanTransformer3DModel"],
                "vae": ["diffusers", "AutoencoderKLWan"],
            }),
        )?;
        let mut transformer = serde_json::to_value(&c.transformer).expect("json");
        transformer["_class_name"] = "WanTransformer3DModel".into();
        json("transformer/config.json", transformer)?;
        let mut vae = serde_json::to_value(&c.vae).expect("json");
        vae["_class_name"] = "AutoencoderKLWan".into();
        vae["attn_scales"] = serde_json::json!([]);
        vae["dropout"] = 0.0.into();
        json("vae/config.json", vae)?;
        let mut text = serde_json::to_value(&c.text).expect("json");
        text["architectures"] = serde_json::json!(["UMT5EncoderModel"]);
        text["is_encoder_decoder"] = true.into();
        text["num_decoder_layers"] = c.text.num_layers.into();
        text["pad_token_id"] = 0.into();
        text["eos_token_id"] = 1.into();
        text["decoder_start_token_id"] = 0.into();
        text["dense_act_fn"] = "gelu_new".into();
        text["is_gated_act"] = true.into();
        text["tie_word_embeddings"] = false.into();
        json("text_encoder/config.json", text)?;
        json(
            "scheduler/scheduler_config.json",
            crate::schedulers::diffusers_scheduler_config(scheduler),
        )?;
        let tokenizer_json = dir.join("tokenizer/tokenizer.json");
        std::fs::create_dir_all(dir.join("tokenizer"))
            .and_then(|_| std::fs::write(&tokenizer_json, TOKENIZER_JSON))
            .map_err(|source| EngineError::Io {
                path: tokenizer_json.clone(),
                source,
            })?;
        json(
            "tokenizer/tokenizer_config.json",
            serde_json::json!({
                "tokenizer_class": "T5TokenizerFast",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 512,
                "extra_ids": 0,
            }),
        )?;
        let mut written = Vec::new();
        for (prefix, (component, stem)) in [
            ("text_encoder.", TEXT_WEIGHTS),
            ("transformer.", TRANSFORMER_WEIGHTS),
            ("vae.", VAE_WEIGHTS),
        ] {
            let path = dir.join(component).join(format!("{stem}.safetensors"));
            save_tensors(weights.take(prefix), &path)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// The parameters of `AutoencoderKLWan`'s encoder half (`encoder.*`,
/// `quant_conv`) for `c`, named and shaped as diffusers makes them: a
/// folder must hold them for diffusers to load it.
fn vae_encoder_parameters(c: &WanVaeConfig) -> Vec<(String, Vec<usize>)> {
    let mut p = Params(Vec::new());
    let dims: Vec<usize> = std::iter::once(1)
        .chain(c.dim_mult.iter().copied())
        .map(|m| c.base_dim * m)
        .collect();
    p.conv("encoder.conv_in", vec![dims[0], 3, 3, 3, 3]);
    let mut k = 0;
    let levels = c.dim_mult.len();
    for i in 0..levels {
        let (mut d_in, d_out) = (dims[i], dims[i + 1]);
        for _ in 0..c.num_res_blocks {
            p.residual(&format!("encoder.down_blocks.{k}"), d_in, d_out);
            d_in = d_out;
            k += 1;
        }
        if i != levels - 1 {
            let name = format!("encoder.down_blocks.{k}");
            p.conv(&format!("{name}.resample.1"), vec![d_out, d_out, 3, 3]);
            if c.temperal_downsample[i] {
                p.conv(&format!("{name}.time_conv"), vec![d_out, d_out, 3, 1, 1]);
            }
            k += 1;
        }
    }
    let top = dims[levels];
    let mid = "encoder.mid_block";
    p.residual(&format!("{mid}.resnets.0"), top, top);
    p.push(&format!("{mid}.attentions.0.norm.gamma"), vec![top, 1, 1]);
    p.conv(
        &format!("{mid}.attentions.0.to_qkv"),
        vec![3 * top, top, 1, 1],
    );
    p.conv(&format!("{mid}.attentions.0.proj"), vec![top, top, 1, 1]);
    p.residual(&format!("{mid}.resnets.1"), top, top);
    p.push("encoder.norm_out.gamma", vec![top, 1, 1, 1]);
    let z2 = 2 * c.z_dim;
    p.conv("encoder.conv_out", vec![z2, top, 3, 3, 3]);
    p.conv("quant_conv", vec![z2, z2, 1, 1, 1]);
    p.0
}

/// Parameter names and shapes, as diffusers' modules register them.
struct Params(Vec<(String, Vec<usize>)>);

impl Params {
    fn push(&mut self, name: &str, shape: Vec<usize>) {
        self.0.push((name.to_string(), shape));
    }

    /// A convolution's weight and bias.
    fn conv(&mut self, name: &str, shape: Vec<usize>) {
        self.push(&format!("{name}.bias"), vec![shape[0]]);
        self.push(&format!("{name}.weight"), shape);
    }

    /// `WanResidualBlock(i, o)`.
    fn residual(&mut self, name: &str, i: usize, o: usize) {
        self.push(&format!("{name}.norm1.gamma"), vec![i, 1, 1, 1]);
        self.conv(&format!("{name}.conv1"), vec![o, i, 3, 3, 3]);
        self.push(&format!("{name}.norm2.gamma"), vec![o, 1, 1, 1]);
        self.conv(&format!("{name}.conv2"), vec![o, o, 3, 3, 3]);
        if i != o {
            self.conv(&format!("{name}.conv_shortcut"), vec![o, i, 1, 1, 1]);
        }
    }
}

/// The manifest of a built-in Wan: what `fractal grid --tiny tiny-wan-v1`
/// and the tests pin. Flow-matching Euler (shift 3, as Wan's 480p folders
/// shift): single-step, so an audited step opens no history.
pub fn manifest(variant: WanVariant) -> fractal_protocol::ModelManifest {
    use fractal_protocol::manifest::*;
    let c = configs(variant);
    let size = |width, height| Size { width, height };
    let (defaults, sizes) = match variant {
        WanVariant::Tiny => (
            GenerationDefaults {
                size: size(64, 64),
                frames: 9,
                steps: 10,
                guidance_scale: 5.0,
                fps: 8,
            },
            vec![size(64, 64), size(32, 32), size(96, 64), size(128, 128)],
        ),
        WanVariant::Wan13bShape => (
            GenerationDefaults {
                size: size(832, 480),
                frames: 81,
                steps: 50,
                guidance_scale: 5.0,
                fps: 16,
            },
            vec![
                size(832, 480),
                size(480, 832),
                size(256, 256),
                size(128, 128),
            ],
        ),
    };
    ModelManifest {
        manifest_version: MANIFEST_VERSION,
        name: format!("fractal-{}", variant.name()),
        architecture: Architecture::Wan(WanSpec {
            text_length: match variant {
                WanVariant::Tiny => 32,
                WanVariant::Wan13bShape => 512,
            },
            patch_size: c.transformer.patch_size.map(|p| p as u32),
            vae_scale_temporal: c.vae.temporal_scale() as u32,
            vae_scale_spatial: c.vae.spatial_scale() as u32,
        }),
        dtype: DType::F32,
        weights: Weights::Builtin(variant.name().to_string()),
        scheduler: SchedulerSpec::FlowMatchEuler(FlowSchedule {
            num_train_timesteps: 1000,
            shift: 3.0,
        }),
        defaults,
        limits: Limits {
            sizes,
            max_frames: 81,
            max_steps: 50,
            max_prompt_bytes: 1000,
        },
        verification: Verification::with_defaults(30.0),
    }
}
