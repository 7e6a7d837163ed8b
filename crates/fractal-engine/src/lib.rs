//! Fractal's text-to-video engine: the diffusers `TextToVideoSDPipeline`
//! (ModelScope / Zeroscope UNet3D) on candle, deterministic from the seed.
//!
//! * [`model`]: load a diffusers folder or build the tiny model;
//! * [`unet3d`], [`clip`]: the networks candle does not ship in this form;
//! * [`scheduler`]: DDIM as diffusers defines it;
//! * [`pipeline`]: CFG denoising loop with a per-step hook, VAE decode.

pub mod clip;
pub mod model;
pub mod pinned;
pub mod pipeline;
pub mod scheduler;
pub mod tiny;
pub mod tokenizer;
pub mod unet3d;
pub mod video;
pub mod weights;

use std::path::PathBuf;

pub use model::Model;
pub use pinned::PinnedModel;
pub use pipeline::{GenerateSpec, Generated, Pipeline, StepEvent};
pub use tiny::TinyVariant;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("missing model file {0}")]
    MissingFile(PathBuf),
    #[error("{path}: cannot load weights: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: SHA-256 {got} does not match the manifest's {expected}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        got: String,
    },
    #[error("invalid input: {0}")]
    BadInput(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}
