//! The dtype a pipeline computes in, from the manifest's `dtype`, and
//! whether a device can run it.
//!
//! A manifest's dtype is what its networks compute in: their weights are
//! held in it and every layer runs in it, with the reductions that lose
//! precision in half (matmul accumulation, softmax, group/layer/RMS norms)
//! done in f32. What an audit compares stays f32 whatever the dtype: the
//! seeded initial latents, the scheduler and its latents, the guidance
//! combination and the decoded frames, so a trace is the same kind of
//! object for every manifest and the scheduler never rounds to half.
//!
//! On the CPU every dtype runs: f32 through the fused kernels of
//! [`crate::kernels::cpu`], f16 and bf16 through candle's own ops (slower:
//! what a CPU verifier needs to recompute a half-precision prover's steps
//! in the manifest's own dtype). On CUDA a dtype needs the arithmetic of its
//! compute capability; a device without it is refused when the model loads,
//! never run in another dtype.

use candle_core::{DType, Device};
use fractal_protocol::manifest;

use crate::EngineError;

/// The candle dtype of a manifest dtype.
pub fn compute_dtype(dtype: manifest::DType) -> DType {
    match dtype {
        manifest::DType::F32 => DType::F32,
        manifest::DType::F16 => DType::F16,
        manifest::DType::Bf16 => DType::BF16,
    }
}

/// The manifest's spelling of a compute dtype (`f32`, `f16`, `bf16`).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        other => other.as_str(),
    }
}

/// What decides whether a device runs a dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceClass {
    Cpu,
    /// A CUDA device of compute capability `major.minor`.
    Cuda {
        major: u32,
        minor: u32,
    },
}

impl DeviceClass {
    /// `device`'s class (a CUDA device is asked for its compute capability).
    pub fn of(device: &Device) -> Result<Self, EngineError> {
        match device {
            Device::Cpu => Ok(DeviceClass::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let (major, minor) =
                    cuda.cuda_stream()
                        .context()
                        .compute_capability()
                        .map_err(|e| {
                            EngineError::Unsupported(format!(
                                "cannot read the CUDA device's compute capability: {e}"
                            ))
                        })?;
                Ok(DeviceClass::Cuda {
                    major: major as u32,
                    minor: minor as u32,
                })
            }
            #[allow(unreachable_patterns)]
            other => Err(EngineError::Unsupported(format!(
                "device {other:?}: only the CPU and CUDA run models"
            ))),
        }
    }

    /// Why this device cannot compute in `dtype`, if it cannot. candle's
    /// CUDA kernels do half arithmetic with the `__half` intrinsics of
    /// compute capability 5.3 and `__nv_bfloat16` ones of 8.0 (Ampere);
    /// below those the kernels are not built for the device.
    pub fn refuses(self, dtype: DType) -> Option<String> {
        let (need, what) = match (self, dtype) {
            (_, DType::F32) | (DeviceClass::Cpu, DType::F16 | DType::BF16) => return None,
            (DeviceClass::Cuda { .. }, DType::F16) => ((5, 3), "f16"),
            (DeviceClass::Cuda { .. }, DType::BF16) => ((8, 0), "bf16"),
            (_, other) => return Some(format!("{} is not a compute dtype", other.as_str())),
        };
        let DeviceClass::Cuda { major, minor } = self else {
            unreachable!("the CPU runs every compute dtype")
        };
        ((major, minor) < need).then(|| {
            format!(
                "a CUDA device of compute capability {major}.{minor} cannot compute in {what} \
                 (needs {}.{} or newer); run this manifest on another device",
                need.0, need.1
            )
        })
    }
}

/// Checks that `device` runs `dtype`: a clear [`EngineError::Unsupported`]
/// naming the model, the dtype and the device if not.
pub fn check(model: &str, dtype: manifest::DType, device: &Device) -> Result<(), EngineError> {
    let dtype = compute_dtype(dtype);
    match DeviceClass::of(device)?.refuses(dtype) {
        None => Ok(()),
        Some(why) => Err(EngineError::Unsupported(format!(
            "model {model} computes in {}: {why}",
            dtype_name(dtype)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_runs_every_manifest_dtype() {
        for d in [
            manifest::DType::F32,
            manifest::DType::F16,
            manifest::DType::Bf16,
        ] {
            check("m", d, &Device::Cpu).unwrap();
        }
    }

    #[test]
    fn cuda_devices_need_the_dtypes_arithmetic() {
        let turing = DeviceClass::Cuda { major: 7, minor: 5 };
        let hopper = DeviceClass::Cuda { major: 9, minor: 0 };
        let maxwell = DeviceClass::Cuda { major: 5, minor: 2 };
        assert_eq!(turing.refuses(DType::F32), None);
        assert_eq!(turing.refuses(DType::F16), None);
        let why = turing.refuses(DType::BF16).unwrap();
        assert!(
            why.contains("7.5") && why.contains("bf16") && why.contains("8.0"),
            "{why}"
        );
        assert_eq!(hopper.refuses(DType::BF16), None);
        assert!(maxwell.refuses(DType::F16).unwrap().contains("5.3"));
        assert!(DeviceClass::Cpu.refuses(DType::U8).is_some());
    }
}
