//! Fused f32 CPU kernels for the UNet's hot stages.
//!
//! candle runs each op as its own pass over memory with a fresh allocation:
//! a GroupNorm is about ten passes, attention materialises and rescales the
//! full score matrix, and its 3x3 convolution re-flattens the weights and
//! transposes the input on one thread at every call. These kernels do each
//! stage in one or two passes, in parallel (rayon, the pool candle uses), and
//! call the same `gemm` crate candle uses for the matrix products.
//!
//! Determinism: every output element is reduced in a fixed order that does not
//! depend on the thread count or scheduling (work is split over independent
//! outputs only), so results are bit-identical run to run on one build and
//! machine. `exp` and `erf` are polynomial approximations (relative error
//! below 2e-7 and absolute below 1e-6 respectively), inside the engine's 1e-4
//! parity budget against PyTorch; they are written so the compiler vectorises
//! them, unlike libm's.
//!
//! One file per op family; [`common`] holds what they share.

use candle_core::Tensor;

thread_local! {
    /// Per-thread override of `FRACTAL_CPU_KERNELS`.
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Turns the fused CPU kernels on or off for work started on this thread
/// (`None`: back to `FRACTAL_CPU_KERNELS`, on unless it is `0`). Off, the CPU
/// runs candle's own ops, the path every other device takes: for A/B timings
/// and for tests of that path on machines without a GPU.
pub fn set_enabled(on: Option<bool>) {
    OVERRIDE.with(|o| o.set(on));
}

fn enabled() -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    OVERRIDE.with(|o| o.get()).unwrap_or_else(|| {
        *FROM_ENV.get_or_init(|| std::env::var("FRACTAL_CPU_KERNELS").map_or(true, |v| v != "0"))
    })
}

/// Whether `t` is a half-precision (f16 or bf16) tensor on the CPU, whose
/// convolutions run as [`conv2d_half`].
pub(crate) fn is_half(t: &Tensor) -> bool {
    t.device().is_cpu()
        && matches!(
            t.dtype(),
            candle_core::DType::F16 | candle_core::DType::BF16
        )
}

/// A convolution of half-precision CPU tensors (candle has none for bf16
/// on the CPU): operands widened to f32, the f32 convolution, the result
/// rounded to the input's dtype. That is what a GPU's half convolution
/// computes too: half operands, f32 accumulation, a rounded output.
pub(crate) fn conv2d_half(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: (usize, usize),
) -> candle_core::Result<Tensor> {
    let wide = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
    let bias = bias.map(wide).transpose()?;
    conv2d(&wide(x)?, &wide(weight)?, bias.as_ref(), stride, pad)?.to_dtype(x.dtype())
}

/// Whether the fused kernels apply: a CPU tensor of f32, kernels enabled.
pub(crate) fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && enabled()
}

/// Runs `f` on one of rayon's worker threads (directly if already on one).
///
/// The kernels fork and join several times per layer. From a worker thread a
/// join is a push onto its own deque; from any other thread every one of them
/// injects a job and puts the caller to sleep until a worker wakes it. On the
/// tiny model that was ~10k context switches per generation and ~20% of its
/// time, so each model entry point (UNet, VAE, text encoder) hops onto the
/// pool once instead.
///
/// The caller's [`set_enabled`] choice goes along, and the worker's own is
/// restored afterwards (a worker may run other callers' passes in between).
pub(crate) fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let choice = OVERRIDE.get();
    rayon::scope(|_| {
        let before = OVERRIDE.replace(choice);
        let r = f();
        OVERRIDE.set(before);
        r
    })
}

/// Defines `fn name(args)` whose body is compiled three times: for the
/// baseline target, with AVX2 and with AVX-512F enabled, picked at run time.
/// Rust never contracts `a * b + c` into an FMA, and every reduction here runs
/// in explicit lanes, so all versions give bit-identical results: the wider
/// instruction sets only widen the vectors.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if !$crate::kernels::cpu::common::baseline_forced() {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU reports AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU reports AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

mod activation;
mod attention;
pub(crate) mod common;
mod conv;
mod conv3d;
mod elementwise;
mod linear;
mod norm;
mod temporal;
#[cfg(test)]
mod tests;

pub(crate) use activation::*;
pub(crate) use attention::*;
pub(crate) use common::*;
pub(crate) use conv::*;
pub(crate) use conv3d::*;
pub(crate) use elementwise::*;
pub(crate) use linear::*;
pub(crate) use norm::*;
pub(crate) use temporal::*;
