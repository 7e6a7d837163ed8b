//! Fractal's text-to-video engine: diffusers pipelines on candle,
//! deterministic from the seed. Laid out as diffusers and
//! candle-transformers are, so each part is found by name and a new
//! architecture is a new folder:
//!
//! * [`pinned`]: the model a node serves (manifest + pipeline) and the
//!   request → spec → output conversions every role shares;
//! * [`pipelines`]: the interface the roles use without knowing the
//!   architecture ([`Pipeline`]), and one folder per architecture
//!   ([`pipelines::text_to_video_sd`]: diffusers' `TextToVideoSDPipeline`,
//!   ModelScope / Zeroscope; [`pipelines::wan`]: `WanPipeline`, Wan 2.1);
//! * [`models`]: the networks (UNet3D, CLIP text encoder and tokenizer, the
//!   KL autoencoder's decoder; the Wan transformer, T5/umT5 and its
//!   tokenizer, the Wan VAE's causal decoder) and their shared layers;
//! * [`precision`]: the dtype the networks compute in (the manifest's) and
//!   which devices run it;
//! * [`schedulers`]: DDIM, DPM-Solver++, flow-matching Euler and UniPC as
//!   diffusers defines them;
//! * [`kernels`]: fused f32 CPU kernels for the hot stages, by op family;
//! * [`builtin`]: models built into the binary (weights derived from names);
//! * [`io`]: video files (MP4/GIF/PNG) and safetensors weights;
//! * [`profile`]: where the time goes (`FRACTAL_PROFILE=1`).
//!
//! Dependencies point one way: `pinned` → `pipelines` → `models` /
//! `schedulers` → `kernels`; `builtin` builds on the pipelines' loaders,
//! never the reverse; `io` depends on nothing above it.

pub mod builtin;
pub mod degradation;
pub mod io;
pub mod kernels;
pub mod models;
pub mod pinned;
pub mod pipelines;
pub mod precision;
pub mod profile;
pub mod schedulers;

use std::path::PathBuf;

pub use builtin::tiny::TinyVariant;
pub use builtin::tiny_wan::WanVariant;
pub use degradation::Degradation;
pub use pinned::PinnedModel;
pub use pipelines::{GenerateSpec, Generated, LoadOptions, Pipeline, Step, StepEvent};

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

/// The device named `cpu`, `cuda` or `cuda:N`. CUDA needs the `cuda` cargo
/// feature; without it the name is refused with a message saying so.
pub fn device_from_name(name: &str) -> Result<candle_core::Device, EngineError> {
    let cuda_ordinal = match name {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(EngineError::BadInput(format!(
                    "unknown device {other:?} (cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(EngineError::Unsupported(format!(
            "device {name:?}: this build has no CUDA support (build with --features cuda)"
        )));
    }
    Ok(candle_core::Device::new_cuda(cuda_ordinal)?)
}

/// Process settings for a binary that runs the model. Call it first thing in
/// `main`, before any other thread starts (it sets an environment variable).
///
/// * glibc's malloc keeps freed memory for reuse. It hands blocks above its
///   mmap threshold (128 KiB at first, adapting up to 32 MiB) straight back
///   to the kernel when freed, and trims the top of the heap. A UNet pass
///   allocates and frees hundreds of 0.1-4 MB activations, so every one of
///   them was faulted in and zeroed afresh: ~40k page faults and ~8% of a
///   tiny-model generation. The peak is unchanged (the same tensors are alive
///   at once); what changes is that the process keeps that peak between jobs.
/// * candle's own elementwise thread pool gets no threads
///   (`CANDLE_NUM_THREADS=1` unless set). Its workers spin for a while after
///   every large elementwise op, on cores that the engine's rayon workers
///   need: 7% of a generation's CPU samples were that spinning. The few
///   candle elementwise ops left on the path then run on the calling worker.
pub fn prepare_process() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; valid at any time.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts; bigger blocks
        // (whole-clip activations at real sizes) still come from mmap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_names() {
        assert!(super::device_from_name("cpu").unwrap().is_cpu());
        assert!(super::device_from_name("gpu").is_err());
        assert!(super::device_from_name("cuda:x").is_err());
        if !cfg!(feature = "cuda") {
            let e = super::device_from_name("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
