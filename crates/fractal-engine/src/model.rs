//! The three networks of a TextToVideoSD pipeline, loaded from a diffusers
//! folder (`model_index.json`, `*/config.json`, `*.safetensors`) or built in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::{Deserialize, Serialize};

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::tiny::{self, Degradation, TinyVariant, TinyWeights};
use crate::unet3d::{Unet3d, Unet3dConfig};
use crate::vae::VaeDecoder;
use crate::EngineError;

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

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfigs {
    pub text: ClipTextConfig,
    pub unet: Unet3dConfig,
    pub vae: VaeConfig,
}

/// Text encoder, denoiser and decoder, ready to run.
pub struct Model {
    pub text_encoder: ClipTextModel,
    pub unet: Unet3d,
    pub vae: VaeDecoder,
    pub configs: ModelConfigs,
    pub device: Device,
}

const TEXT_WEIGHTS: &str = "text_encoder/model.safetensors";
const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";

/// The weight files a diffusers TextToVideoSD folder must have.
pub const WEIGHT_FILES: [&str; 3] = [TEXT_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS];
/// Every file whose content defines the model: a manifest pins all that exist.
pub const PINNED_FILES: [&str; 10] = [
    "model_index.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    TEXT_WEIGHTS,
    UNET_WEIGHTS,
    VAE_WEIGHTS,
];

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, rel: &str) -> Result<T, EngineError> {
    let path = dir.join(rel);
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::Io {
        path: path.clone(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path,
        message: e.to_string(),
    })
}

/// The config of candle's full `AutoEncoderKL`. The engine decodes with
/// [`VaeDecoder`]; the full model is only built when a tiny folder is written,
/// so that the folder also holds the encoder weights diffusers needs to load.
fn vae_candle_config(v: &VaeConfig) -> AutoEncoderKLConfig {
    AutoEncoderKLConfig {
        block_out_channels: v.block_out_channels.clone(),
        layers_per_block: v.layers_per_block,
        latent_channels: v.latent_channels,
        norm_num_groups: v.norm_num_groups,
        use_quant_conv: true,
        use_post_quant_conv: true,
    }
}

impl Model {
    /// Loads a diffusers-layout folder, one tensor at a time (see [`crate::weights`]).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EngineError> {
        #[derive(Deserialize)]
        struct Index {
            #[serde(rename = "_class_name")]
            class: String,
        }
        let index: Index = read_json(dir, "model_index.json")?;
        if index.class != "TextToVideoSDPipeline" {
            return Err(EngineError::Config {
                path: dir.join("model_index.json"),
                message: format!("pipeline {} is not TextToVideoSDPipeline", index.class),
            });
        }
        let configs = ModelConfigs {
            text: read_json(dir, "text_encoder/config.json")?,
            unet: read_json(dir, "unet/config.json")?,
            vae: read_json(dir, "vae/config.json")?,
        };
        let vb = |rel: &str| -> Result<VarBuilder<'static>, EngineError> {
            let path = dir.join(rel);
            if !path.is_file() {
                return Err(EngineError::MissingFile(path));
            }
            crate::weights::SafetensorsFile::open(&path)
                .map(|f| f.var_builder(DType::F32, device))
                .map_err(|e| EngineError::Weights {
                    path,
                    message: e.to_string(),
                })
        };
        let build = |rel: &str, e: candle_core::Error| EngineError::Weights {
            path: dir.join(rel),
            message: e.to_string(),
        };
        let text_encoder = ClipTextModel::new(vb(TEXT_WEIGHTS)?, configs.text.clone())
            .map_err(|e| build(TEXT_WEIGHTS, e))?;
        let unet = Unet3d::new(vb(UNET_WEIGHTS)?, configs.unet.clone())
            .map_err(|e| build(UNET_WEIGHTS, e))?;
        let vae =
            VaeDecoder::new(vb(VAE_WEIGHTS)?, &configs.vae).map_err(|e| build(VAE_WEIGHTS, e))?;
        Ok(Model {
            text_encoder,
            unet,
            vae,
            configs,
            device: device.clone(),
        })
    }

    /// The built-in tiny model (weights derived from parameter names).
    pub fn tiny(variant: TinyVariant, device: &Device) -> Result<Self, EngineError> {
        Ok(Self::tiny_with_weights(variant, device)?.0)
    }

    /// The tiny model with cheaper or slightly wrong weights: a stand-in for
    /// "almost the pinned weights" in the cheating-prover tests.
    pub fn tiny_degraded(
        variant: TinyVariant,
        degradation: Degradation,
        device: &Device,
    ) -> Result<Self, EngineError> {
        Ok(Self::tiny_from(variant, TinyWeights::degraded(degradation), device)?.0)
    }

    fn tiny_with_weights(
        variant: TinyVariant,
        device: &Device,
    ) -> Result<(Self, TinyWeights), EngineError> {
        Self::tiny_from(variant, TinyWeights::default(), device)
    }

    fn tiny_from(
        variant: TinyVariant,
        w: TinyWeights,
        device: &Device,
    ) -> Result<(Self, TinyWeights), EngineError> {
        let configs = tiny::configs(variant);
        let text_encoder =
            ClipTextModel::new(w.var_builder("text_encoder.", device), configs.text.clone())?;
        let unet = Unet3d::new(w.var_builder("unet.", device), configs.unet.clone())?;
        let vae = VaeDecoder::new(w.var_builder("vae.", device), &configs.vae)?;
        Ok((
            Model {
                text_encoder,
                unet,
                vae,
                configs,
                device: device.clone(),
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
    ) -> Result<Vec<PathBuf>, EngineError> {
        let (model, weights) = Self::tiny_with_weights(variant, &Device::Cpu)?;
        let c = &model.configs;
        AutoEncoderKL::new(
            weights.var_builder("vae.", &Device::Cpu),
            c.vae.in_channels,
            c.vae.out_channels,
            vae_candle_config(&c.vae),
        )?;
        let io = |path: PathBuf| move |e: std::io::Error| EngineError::Io { path, source: e };
        let write_json = |rel: &str, v: serde_json::Value| -> Result<(), EngineError> {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().expect("has parent"))
                .map_err(io(path.clone()))?;
            std::fs::write(
                &path,
                serde_json::to_string_pretty(&v).expect("json") + "\n",
            )
            .map_err(io(path))
        };
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
            crate::pipeline::diffusers_scheduler_config(scheduler),
        )?;
        crate::tokenizer::ClipTokenizer::builtin()?.write_folder(&dir.join("tokenizer"))?;
        let mut written = Vec::new();
        for (prefix, rel) in [
            ("text_encoder.", TEXT_WEIGHTS),
            ("unet.", UNET_WEIGHTS),
            ("vae.", VAE_WEIGHTS),
        ] {
            let tensors: HashMap<String, Tensor> = weights.take(prefix).into_iter().collect();
            let path = dir.join(rel);
            candle_core::safetensors::save(&tensors, &path).map_err(|e| EngineError::Weights {
                path: path.clone(),
                message: e.to_string(),
            })?;
            written.push(path);
        }
        Ok(written)
    }
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<fractal_protocol::Digest32, EngineError> {
    use sha2::Digest as _;
    use std::io::Read;
    let io = |e| EngineError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(fractal_protocol::Digest32(h.finalize().into()))
}

/// Checks that a folder holds exactly the weights a manifest pins; a prover
/// refuses to start otherwise.
pub fn verify_weights(
    dir: &Path,
    manifest: &fractal_protocol::ModelManifest,
) -> Result<(), EngineError> {
    use fractal_protocol::manifest::Weights;
    let Weights::Files(files) = &manifest.weights else {
        return Err(EngineError::BadInput(format!(
            "manifest {} pins built-in weights, not a folder",
            manifest.name
        )));
    };
    for (rel, want) in files {
        let path = dir.join(rel);
        if !path.is_file() {
            return Err(EngineError::MissingFile(path));
        }
        let got = sha256_file(&path)?;
        if got != *want {
            return Err(EngineError::HashMismatch {
                path,
                expected: want.to_string(),
                got: got.to_string(),
            });
        }
    }
    Ok(())
}

/// A diffusers `scheduler/scheduler_config.json` as a manifest scheduler spec
/// (diffusers' defaults for absent keys).
pub fn scheduler_spec_from_folder(
    dir: &Path,
) -> Result<fractal_protocol::manifest::SchedulerSpec, EngineError> {
    use fractal_protocol::manifest::*;
    let v: serde_json::Value = read_json(dir, "scheduler/scheduler_config.json")?;
    let path = dir.join("scheduler/scheduler_config.json");
    let bad = |m: String| EngineError::Config {
        path: path.clone(),
        message: m,
    };
    let kind = match v["_class_name"].as_str().unwrap_or("DDIMScheduler") {
        "DDIMScheduler" => SchedulerKind::Ddim,
        "DPMSolverMultistepScheduler" => SchedulerKind::DpmSolverMultistep,
        other => return Err(bad(format!("scheduler {other} is not supported"))),
    };
    let enum_of = |key: &str, default: &str| -> Result<serde_json::Value, EngineError> {
        Ok(v.get(key).cloned().unwrap_or_else(|| default.into()))
    };
    let spec = SchedulerSpec {
        kind,
        num_train_timesteps: v["num_train_timesteps"].as_u64().unwrap_or(1000) as u32,
        beta_start: v["beta_start"].as_f64().unwrap_or(0.0001),
        beta_end: v["beta_end"].as_f64().unwrap_or(0.02),
        beta_schedule: serde_json::from_value(enum_of("beta_schedule", "linear")?)
            .map_err(|e| bad(e.to_string()))?,
        prediction_type: serde_json::from_value(enum_of("prediction_type", "epsilon")?)
            .map_err(|e| bad(e.to_string()))?,
        clip_sample: v["clip_sample"].as_bool().unwrap_or(true),
        set_alpha_to_one: v["set_alpha_to_one"].as_bool().unwrap_or(true),
        steps_offset: v["steps_offset"].as_u64().unwrap_or(0) as u32,
        timestep_spacing: serde_json::from_value(enum_of("timestep_spacing", "leading")?)
            .map_err(|e| bad(e.to_string()))?,
    };
    Ok(spec)
}
