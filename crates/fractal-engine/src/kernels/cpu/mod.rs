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

use candle_core::{Device, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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

/// Whether the fused kernels apply: a CPU tensor of f32, kernels enabled.
pub(crate) fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && enabled()
}

/// Runs `f` on the f32 elements of a CPU tensor, in logical (contiguous) order.
pub(crate) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("cpu kernel called on a {:?} tensor", t.device().location())
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .expect("contiguous() returns a contiguous layout");
    Ok(f(&data[start..end]))
}

fn tensor(data: Vec<f32>, shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
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

/// A `len`-element output that `fill` writes completely before anything
/// reads it. Not zeroing it first saves a whole pass over memory: a zeroed
/// 4 MB output cost 160 us next to the 260 us GEMM that overwrites it.
///
/// # Safety
/// `fill` must initialise every element of the slice it is given.
unsafe fn written_output(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the caller's fill initialised all `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// A fresh output of `images` blocks of `block` elements, each written by
/// `one(image, block, parallelism for its GEMM)`. With at least as many
/// images as threads the images run in parallel, each GEMM on one thread;
/// with fewer they run in turn, each GEMM on every thread.
///
/// # Safety
/// `one` must initialise every element of the block it is given.
unsafe fn per_image_output(
    images: usize,
    block: usize,
    one: impl Fn(usize, &mut [MaybeUninit<f32>], Parallelism) + Sync,
) -> Vec<f32> {
    let inner = if images >= threads() {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads())
    };
    // SAFETY: forwarded: one writes each block whole, and the blocks tile
    // the output.
    unsafe {
        written_output(images * block, |out| {
            if matches!(inner, Parallelism::None) {
                out.par_chunks_mut(block.max(1))
                    .enumerate()
                    .for_each(|(i, o)| one(i, o, inner));
            } else {
                out.chunks_mut(block.max(1))
                    .enumerate()
                    .for_each(|(i, o)| one(i, o, inner));
            }
        })
    }
}

/// Fills each `row_len`-long row of `out` with its value from `values`.
fn fill_rows(out: &mut [MaybeUninit<f32>], row_len: usize, values: &[f32]) {
    for (row, &v) in out.chunks_mut(row_len.max(1)).zip(values) {
        row.fill(MaybeUninit::new(v));
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// A pointer that may be shared by tasks writing disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every use writes element ranges that no other task touches.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

#[cfg(test)]
thread_local! {
    static FORCE_BASELINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests run the baseline build on this thread to compare it with the wide ones.
#[inline(always)]
fn baseline_forced() -> bool {
    #[cfg(test)]
    return FORCE_BASELINE.with(|f| f.get());
    #[cfg(not(test))]
    false
}

/// Defines `fn name(args)` whose body is compiled three times: for the
/// baseline target, with AVX2 and with AVX-512F enabled, picked at run time.
/// Rust never contracts `a * b + c` into an FMA, and every reduction here runs
/// in explicit lanes, so all versions give bit-identical results: the wider
/// instruction sets only widen the vectors.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if !baseline_forced() {
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

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`,
/// for `lhs` m x k and `rhs` k x n: one call of the `gemm` crate. Each
/// operand is (pointer, row stride, column stride).
///
/// # Safety
/// Every operand must hold the elements its strides reach, and no other
/// thread may touch the written part of `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, usize, usize),
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    scale: f32,
    parallelism: Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2 as isize,
            dst.1 as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

// ---------------------------------------------------------------- math

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// e^x for the kernels (Cephes' expf polynomial; relative error < 2e-7).
/// Inputs above 88 give e^88. Below -64 the result is 0: such weights only
/// ever meet numbers of order one (softmax rows that sum to at least 1,
/// erf's `1 - tail`), where they change nothing, but their products with
/// small values are denormals, which x86 computes ~100x slower. Real
/// attention scores spread that far: the spatial attention ran 3x slower.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let negligible = x < -64.0;
    let x = x.clamp(-87.3, 88.0);
    // Round to nearest with the 1.5 * 2^23 trick (vectorises where round()
    // does not): the sum's low mantissa bits hold n as a two's-complement int.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n built from n's bits: integer ops only, so the loop stays vectorised.
    let biased = shifted
        .to_bits()
        .wrapping_sub(MAGIC.to_bits())
        .wrapping_add(127);
    let y = y * f32::from_bits(biased << 23);
    if negligible {
        0.0
    } else {
        y
    }
}

/// x * sigmoid(x).
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// erf (Abramowitz and Stegun 7.1.26; absolute error < 1e-6 in f32).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4;
    let p = p * t - 1.453_152_1;
    let p = p * t + 1.421_413_8;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp(-a * a);
    y.copysign(x)
}

/// GELU with the exact (erf) form, as `torch.nn.functional.gelu`.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

// ---------------------------------------------------------------- GroupNorm

/// `torch.nn.GroupNorm` (+ SiLU when `silu`) over `x` of shape
/// `[n, c, spatial...]`, with mean and biased variance per (sample, group) in
/// two passes, f64 accumulation across lanes.
pub(crate) fn group_norm(
    x: &Tensor,
    groups: usize,
    eps: f64,
    gamma: &Tensor,
    beta: &Tensor,
    silu_after: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group_norm: shape {dims:?} with {groups} groups");
    }
    let c = dims[1];
    let spatial: usize = dims[2..].iter().product();
    let cg = c / groups;
    let gamma = gamma.to_vec1::<f32>()?;
    let beta = beta.to_vec1::<f32>()?;
    let group_len = cg * spatial;
    if group_len == 0 {
        return Ok(x.clone());
    }
    // SAFETY: the groups of out pair up with those of x, and every channel
    // row of a group is normalised into out whole.
    let out = with_slice(x, |xs| unsafe {
        written_output(xs.len(), |out| {
            out.par_chunks_mut(group_len)
                .zip(xs.par_chunks(group_len))
                .enumerate()
                .for_each(|(ng, (o, xg))| {
                    let g = ng % groups;
                    let mean = sum_f64(xg) / group_len as f64;
                    let m = mean as f32;
                    let var = sum_sq_dev(xg, m) / group_len as f64;
                    let inv = (1.0 / (var + eps).sqrt()) as f32;
                    for ch in 0..cg {
                        let ci = g * cg + ch;
                        normalize(
                            &xg[ch * spatial..(ch + 1) * spatial],
                            &mut o[ch * spatial..(ch + 1) * spatial],
                            m,
                            inv * gamma[ci],
                            beta[ci],
                            silu_after,
                        );
                    }
                });
        })
    })?;
    tensor(out, dims)
}

simd_dispatch! {
    fn normalize(
        src: &[f32],
        dst: &mut [MaybeUninit<f32>],
        mean: f32,
        scale: f32,
        shift: f32,
        silu_after: bool,
    ) {
        if silu_after {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(silu((s - mean) * scale + shift));
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write((s - mean) * scale + shift);
            }
        }
    }
}

simd_dispatch! {
    /// Sum in eight f32 lanes per block of 1024, blocks summed in f64: fast
    /// and accurate to ~1e-7 relative for the group sizes of a UNet.
    fn sum_f64(xs: &[f32]) -> f64 {
        xs.chunks(1024).map(|b| lanes_sum(b, |v| v) as f64).sum()
    }
}

simd_dispatch! {
    fn sum_sq_dev(xs: &[f32], mean: f32) -> f64 {
        xs.chunks(1024)
            .map(|b| {
                lanes_sum(b, |v| {
                    let d = v - mean;
                    d * d
                }) as f64
            })
            .sum()
    }
}

#[inline(always)]
fn lanes_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..8 {
            acc[i] += f(ch[i]);
        }
    }
    let mut s = fold_lanes(acc);
    for &v in rest {
        s += f(v);
    }
    s
}

/// The fixed reduction tree of eight lane sums.
#[inline(always)]
fn fold_lanes(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

// ---------------------------------------------------------------- Conv2d

/// 2D convolution (NCHW, weights `[co, ci, kh, kw]`, optional bias) as one
/// im2col + GEMM per image. The weight tensor is already the `[co, ci*kh*kw]`
/// matrix, so nothing is repacked per call. Images are spread over the
/// threads; a batch smaller than the thread count parallelises inside GEMM.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    (pad_h, pad_w): (usize, usize),
) -> Result<Tensor> {
    let (n, ci, h, w) = x.dims4()?;
    let (co, wci, kh, kw) = weight.dims4()?;
    if wci != ci {
        candle_core::bail!("conv2d: input has {ci} channels, weight expects {wci}");
    }
    let oh = (h + 2 * pad_h).checked_sub(kh).map(|v| v / stride + 1);
    let ow = (w + 2 * pad_w).checked_sub(kw).map(|v| v / stride + 1);
    let (Some(oh), Some(ow)) = (oh, ow) else {
        candle_core::bail!("conv2d: kernel larger than the padded input");
    };
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    let geo = ConvGeometry {
        ci,
        h,
        w,
        kh,
        kw,
        stride,
        pad_h,
        pad_w,
        oh,
        ow,
    };
    let k = ci * kh * kw;
    let plane = oh * ow;
    // Large weights on small images (the deep levels of a real UNet) use one
    // GEMM for several images, so the weights stream from memory once per
    // group instead of once per image. Small weights stay in cache, and one
    // image per thread parallelises better.
    let group = (GROUP_COL_BUDGET / (k * plane).max(1)).clamp(1, n.max(1));
    if group > 1 && co * k >= GROUP_MIN_WEIGHTS {
        let out = with_slice(weight, |wt| {
            with_slice(x, |xs| {
                conv2d_grouped(xs, wt, bias.as_deref(), &geo, n, co, group)
            })
        })??;
        return tensor(out, (n, co, oh, ow));
    }
    let plane = oh * ow;
    let out = with_slice(weight, |wt| {
        with_slice(x, |xs| {
            // Each image's block is written whole: by the bias, or else by
            // the product (k > 0: a convolution has at least one tap).
            let one_image = |img: usize, o: &mut [MaybeUninit<f32>], inner| {
                let src = &xs[img * ci * h * w..(img + 1) * ci * h * w];
                if let Some(b) = &bias {
                    fill_rows(o, plane, b);
                } else if k == 0 {
                    o.fill(MaybeUninit::new(0.0));
                }
                let pointwise = kh == 1 && kw == 1 && stride == 1 && pad_h == 0 && pad_w == 0;
                let dst = o.as_mut_ptr().cast::<f32>();
                let product = |col: &[f32]| {
                    // SAFETY: dst is co x plane (row stride `plane`), lhs co x k
                    // (row stride k), rhs k x plane (row stride plane); all
                    // three slices are exactly that long.
                    unsafe {
                        matmul(
                            co,
                            plane,
                            k,
                            (dst, plane, 1),
                            bias.is_some(),
                            (wt.as_ptr(), k, 1),
                            (col.as_ptr(), plane, 1),
                            1.0,
                            inner,
                        )
                    }
                };
                if pointwise {
                    product(src);
                } else {
                    // Taken out of the cell, not borrowed: a parallel GEMM
                    // may run another convolution on this thread meanwhile.
                    let mut col = COL.take();
                    geo.im2col(src, &mut col);
                    product(&col);
                    if col.len() <= COL_KEEP_MAX {
                        COL.set(col);
                    }
                }
            };
            // SAFETY: one_image writes every element of its block (above).
            unsafe { per_image_output(n, co * plane, one_image) }
        })
    })??;
    tensor(out, (n, co, oh, ow))
}

/// Patch-matrix elements (f32) a grouped convolution may build at once.
const GROUP_COL_BUDGET: usize = 4 << 20;
/// Weight elements (f32, 1 MiB) from which convolutions group images.
const GROUP_MIN_WEIGHTS: usize = 1 << 18;

/// Convolution of `n` images, `group` at a time: one patch matrix
/// `[ci*kh*kw, group*oh*ow]` and one GEMM per group, then the `[co, image,
/// pixel]` product is laid out as `[image, co, pixel]` with the bias added.
fn conv2d_grouped(
    xs: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    geo: &ConvGeometry,
    n: usize,
    co: usize,
    group: usize,
) -> Vec<f32> {
    let (ci, taps, plane) = (geo.ci, geo.kh * geo.kw, geo.oh * geo.ow);
    let k = ci * taps;
    let image = ci * geo.h * geo.w;
    let mut out = vec![0f32; n * co * plane];
    for first in (0..n).step_by(group) {
        let g = group.min(n - first);
        let cols = g * plane;
        let mut col = vec![0f32; k * cols];
        col.par_chunks_mut(taps * cols)
            .enumerate()
            .for_each(|(c, rows)| {
                for i in 0..g {
                    let src = &xs[(first + i) * image + c * geo.h * geo.w..][..geo.h * geo.w];
                    geo.channel_rows(src, rows, cols, i * plane);
                }
            });
        let mut prod = vec![0f32; co * cols];
        if cols <= SKINNY_MAX_ROWS {
            // A few output pixels in all: stream each weight row once against
            // the transposed patch matrix instead of packing the weights.
            let mut col_t = vec![0f32; cols * k];
            for (kk, row) in col.chunks(cols).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    col_t[c * k + kk] = v;
                }
            }
            let patches: Vec<&[f32]> = col_t.chunks(k).collect();
            skinny_gemm(
                wt,
                k,
                &patches,
                SharedMut(prod.as_mut_ptr()),
                cols,
                1,
                false,
            );
        } else {
            // SAFETY: prod is co x cols (row stride cols), wt co x k (row stride
            // k), col k x cols (row stride cols); each slice is exactly that long.
            unsafe {
                matmul(
                    co,
                    cols,
                    k,
                    (prod.as_mut_ptr(), cols, 1),
                    false,
                    (wt.as_ptr(), k, 1),
                    (col.as_ptr(), cols, 1),
                    1.0,
                    Parallelism::Rayon(threads()),
                )
            }
        }
        out[first * co * plane..(first + g) * co * plane]
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(idx, dst)| {
                let (i, c) = (idx / co, idx % co);
                let src = &prod[c * cols + i * plane..][..plane];
                let b = bias.map_or(0.0, |b| b[c]);
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = v + b;
                }
            });
    }
    out
}

#[derive(Clone, Copy)]
struct ConvGeometry {
    ci: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad_h: usize,
    pad_w: usize,
    oh: usize,
    ow: usize,
}

impl ConvGeometry {
    /// The `[ci*kh*kw, oh*ow]` patch matrix of one image into `col` (resized
    /// to fit), rows in the weight's (ci, kh, kw) order; padding reads as zero.
    fn im2col(&self, src: &[f32], col: &mut Vec<f32>) {
        let g = *self;
        let plane = g.oh * g.ow;
        let taps = g.kh * g.kw;
        // Only grown, never cleared: channel_rows writes every element.
        col.resize(g.ci * taps * plane, 0.0);
        for (c, rows) in col.chunks_mut(taps * plane).enumerate() {
            self.channel_rows(&src[c * g.h * g.w..(c + 1) * g.h * g.w], rows, plane, 0);
        }
    }

    /// Writes the kh*kw patch rows of one input channel `chan` into `rows`
    /// (row r at `r * row_stride + offset`, `oh*ow` long), padding as zeros:
    /// every element of those rows is written, so `rows` may hold anything.
    fn channel_rows(&self, chan: &[f32], rows: &mut [f32], row_stride: usize, offset: usize) {
        let g = *self;
        let plane = g.oh * g.ow;
        let mut row = 0;
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let start = row * row_stride + offset;
                let dst = &mut rows[start..start + plane];
                row += 1;
                // Output columns whose input column lies inside the image.
                let first = g.pad_w.saturating_sub(kx).div_ceil(g.stride);
                let last = ((g.w + g.pad_w).saturating_sub(kx).div_ceil(g.stride)).min(g.ow);
                if first >= last {
                    dst.fill(0.0);
                    continue;
                }
                if g.stride == 1 && g.ow == g.w {
                    self.shifted_plane(chan, dst, ky, kx, first, last);
                    continue;
                }
                for oy in 0..g.oh {
                    let iy = (oy * g.stride + ky) as isize - g.pad_h as isize;
                    let dst_row = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                    if iy < 0 || iy >= g.h as isize {
                        dst_row.fill(0.0);
                        continue;
                    }
                    dst_row[..first].fill(0.0);
                    dst_row[last..].fill(0.0);
                    let src_row = &chan[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if g.stride == 1 {
                        let ix0 = first + kx - g.pad_w;
                        dst_row[first..last].copy_from_slice(&src_row[ix0..ix0 + (last - first)]);
                    } else {
                        for (ox, d) in dst_row[first..last].iter_mut().enumerate() {
                            *d = src_row[(first + ox) * g.stride + kx - g.pad_w];
                        }
                    }
                }
            }
        }
    }
}

impl ConvGeometry {
    /// One patch row of a stride-1 convolution whose output is as wide as
    /// its input: the tap (ky, kx) reads the input shifted by a constant
    /// offset, so the whole plane is one copy, then the columns and rows
    /// that fall in the padding are zeroed. Row by row, small images made a
    /// memcpy call per 16 floats.
    fn shifted_plane(
        &self,
        chan: &[f32],
        dst: &mut [f32],
        ky: usize,
        kx: usize,
        first: usize,
        last: usize,
    ) {
        let g = *self;
        let w = g.w;
        // Output rows whose input row lies inside the image.
        let oy0 = g.pad_h.saturating_sub(ky).min(g.oh);
        let oy1 = (g.h + g.pad_h).saturating_sub(ky).min(g.oh).max(oy0);
        dst[..oy0 * w].fill(0.0);
        dst[oy1 * w..].fill(0.0);
        if oy0 == oy1 {
            return;
        }
        let delta = (ky as isize - g.pad_h as isize) * w as isize + kx as isize - g.pad_w as isize;
        // Clipped to the channel; what is clipped lies in padding columns
        // of the first or last row, which are zeroed below.
        let lo = ((oy0 * w) as isize).max(-delta) as usize;
        let hi = ((oy1 * w) as isize).min(chan.len() as isize - delta) as usize;
        if lo < hi {
            let from = (lo as isize + delta) as usize;
            dst[lo..hi].copy_from_slice(&chan[from..from + (hi - lo)]);
        }
        for row in dst[oy0 * w..oy1 * w].chunks_exact_mut(w) {
            for v in &mut row[..first] {
                *v = 0.0;
            }
            for v in &mut row[last..] {
                *v = 0.0;
            }
        }
    }
}

// ---------------------------------------------------------------- Skinny products

/// Rows (pixels, tokens) up to which a product with a weight matrix streams
/// the weights once instead of packing them for GEMM: the deep UNet levels at
/// small sizes, where weights of up to 59 MB meet a handful of pixels.
/// Measured on 2 threads: 8 rows run 1.6-2x faster than GEMM, 16 break even.
const SKINNY_MAX_ROWS: usize = 12;
/// Weight rows per task.
const SKINNY_BLOCK: usize = 16;

/// `out[i * out_a + j * out_b] (+)= a[i] . b[j]` for `a` `[ma, k]` (row-major,
/// contiguous: the weights) and up to [`SKINNY_MAX_ROWS`] rows `b[j]` of `k`
/// elements. Each row of `a` is read once, tasks split the rows of `a`, and
/// every element is one dot product in fixed lanes, whatever the threads.
/// The index map must be one-to-one (each task writes only its rows of `a`).
fn skinny_gemm(
    a: &[f32],
    k: usize,
    b: &[&[f32]],
    out: SharedMut,
    out_a: usize,
    out_b: usize,
    accumulate: bool,
) {
    a.par_chunks(k * SKINNY_BLOCK)
        .enumerate()
        .for_each(|(blk, rows)| {
            for (ii, ar) in rows.chunks(k).enumerate() {
                let i = blk * SKINNY_BLOCK + ii;
                for (g, group) in b.chunks(4).enumerate() {
                    let dots = dot_rows(ar, group);
                    for (q, &v) in dots[..group.len()].iter().enumerate() {
                        // SAFETY: (i, j) maps to a distinct element of out,
                        // and only this task handles row i of a.
                        unsafe {
                            let p = { out }.0.add(i * out_a + (g * 4 + q) * out_b);
                            *p = if accumulate { *p + v } else { v };
                        }
                    }
                }
            }
        });
}

simd_dispatch! {
    /// Dot products of `a` with up to four rows, each summed in eight fixed
    /// lanes (the same arithmetic for every row, however many come along).
    fn dot_rows(a: &[f32], rows: &[&[f32]]) -> [f32; 4] {
        let mut acc = [[0f32; 8]; 4];
        let full = a.len() / 8 * 8;
        let lanes = |v: &[f32], c: usize| -> [f32; 8] {
            v[c..c + 8].try_into().expect("8 lanes")
        };
        if let [r0, r1, r2, r3] = rows {
            // Four rows at once: each 8-lane slice of `a` is loaded once.
            let (mut s0, mut s1, mut s2, mut s3) = ([0f32; 8], [0f32; 8], [0f32; 8], [0f32; 8]);
            for c in (0..full).step_by(8) {
                let av = lanes(a, c);
                let (b0, b1, b2, b3) = (lanes(r0, c), lanes(r1, c), lanes(r2, c), lanes(r3, c));
                for l in 0..8 {
                    s0[l] += av[l] * b0[l];
                    s1[l] += av[l] * b1[l];
                    s2[l] += av[l] * b2[l];
                    s3[l] += av[l] * b3[l];
                }
            }
            acc = [s0, s1, s2, s3];
        } else {
            for (q, r) in rows.iter().enumerate() {
                let mut sq = [0f32; 8];
                for c in (0..full).step_by(8) {
                    let (av, bv) = (lanes(a, c), lanes(r, c));
                    for l in 0..8 {
                        sq[l] += av[l] * bv[l];
                    }
                }
                acc[q] = sq;
            }
        }
        let mut dots = [0f32; 4];
        for (q, r) in rows.iter().enumerate() {
            let mut s = fold_lanes(acc[q]);
            for (&x, &y) in a[full..].iter().zip(&r[full..]) {
                s += x * y;
            }
            dots[q] = s;
        }
        dots
    }
}

// ---------------------------------------------------------------- Attention

/// Query rows per task: a 64 x M score block stays in L2 for M up to ~4096.
const QUERY_BLOCK: usize = 64;

/// softmax(q k^T * scale) v for q `[b, n, h*d]`, k and v `[b, m, h*d]` (heads
/// side by side, as the projections produce them), returning `[b, n, h*d]`.
/// Scores exist only one block of query rows at a time.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    attention_in(q, Layout::Tokens, k, v, Layout::Tokens, heads, scale)
}

/// How a `[batch, tokens, channels]` operand is stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Layout {
    /// `[batch, tokens, channels]`: a token's channels side by side.
    Tokens,
    /// `[batch, channels, tokens]`: the UNet's `[n, c, h*w]` pixels.
    ChannelsFirst,
}

impl Layout {
    /// (tokens, channels) of a rank-3 tensor in this layout.
    fn dims(self, t: &Tensor) -> Result<(usize, usize, usize)> {
        let (b, x, y) = t.dims3()?;
        Ok(match self {
            Layout::Tokens => (b, x, y),
            Layout::ChannelsFirst => (b, y, x),
        })
    }

    /// (token stride, channel stride) for `tokens` x `channels`.
    fn strides(self, tokens: usize, channels: usize) -> (usize, usize) {
        match self {
            Layout::Tokens => (channels, 1),
            Layout::ChannelsFirst => (1, tokens),
        }
    }
}

/// [`attention`] with q (and the output) in `q_layout`, k and v in
/// `kv_layout`: channels-first pixels can attend to token-major text.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_in(
    q: &Tensor,
    q_layout: Layout,
    k: &Tensor,
    v: &Tensor,
    kv_layout: Layout,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let (b, n, hd) = q_layout.dims(q)?;
    let (kb, m, khd) = kv_layout.dims(k)?;
    if kb != b || khd != hd || kv_layout.dims(v)? != (b, m, hd) || hd % heads != 0 {
        candle_core::bail!(
            "attention: q {:?} k {:?} v {:?} with {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (qt, qc) = q_layout.strides(n, hd);
    let (kt, kc) = kv_layout.strides(m, hd);
    if m == 0 {
        candle_core::bail!("attention: no keys to attend to");
    }
    let d = hd / heads;
    let blocks = n.div_ceil(QUERY_BLOCK);
    // Written whole below: every (row, head) window by exactly one task.
    let mut out = Vec::<f32>::with_capacity(b * n * hd);
    let dst = SharedMut(out.as_mut_ptr());
    with_slice(q, |qs| {
        with_slice(k, |ks| {
            with_slice(v, |vs| {
                // Short sequences (the temporal attention) make thousands of
                // tiny tasks: hand them out in batches of about 32K products.
                let per_task = QUERY_BLOCK.min(n) * m * d;
                let min_len = ((1 << 15) / per_task.max(1)).max(1);
                (0..b * heads * blocks)
                    .into_par_iter()
                    .with_min_len(min_len)
                    .for_each(|task| {
                        let blk = task % blocks;
                        let bh = task / blocks;
                        let (bi, hi) = (bh / heads, bh % heads);
                        let r0 = blk * QUERY_BLOCK;
                        let rows = QUERY_BLOCK.min(n - r0);
                        let q0 = bi * n * hd + r0 * qt + hi * d * qc;
                        let kv0 = bi * m * hd + hi * d * kc;
                        if qc == 1 && kc == 1 && direct_applies(m, d) {
                            attend_direct(
                                &qs[q0..],
                                &ks[kv0..],
                                &vs[kv0..],
                                // SAFETY: q0 is inside the output, as inside q.
                                SharedMut(unsafe { { dst }.0.add(q0) }),
                                rows,
                                m,
                                d,
                                hd,
                                scale,
                            );
                            return;
                        }
                        SCORES.with(|s| {
                            let mut s = s.borrow_mut();
                            // Only grown: both products overwrite their part.
                            let need = rows * m + rows * d;
                            if s.len() < need {
                                s.resize(need, 0.0);
                            }
                            let (s, pv) = s[..need].split_at_mut(rows * m);
                            // SAFETY: strides and extents stay inside q/k/v and the
                            // score block; this task alone writes its rows x d
                            // window of the output (head hi, rows r0..r0+rows).
                            unsafe {
                                // Scores column-major (query rows along
                                // the lanes): the softmax below then runs
                                // down the columns with no horizontal sums.
                                matmul(
                                    rows,
                                    m,
                                    d,
                                    (s.as_mut_ptr(), 1, rows),
                                    false,
                                    (qs.as_ptr().add(q0), qt, qc),
                                    (ks.as_ptr().add(kv0), kc, kt),
                                    scale,
                                    Parallelism::None,
                                );
                            }
                            // Unnormalised probabilities: each output row is
                            // divided by its sum after the product instead.
                            let mut inv = [0f32; QUERY_BLOCK];
                            exp_columns(s, rows, &mut inv[..rows]);
                            // P V into a column-major block too: with a
                            // row-major destination GEMM computes the
                            // transpose, d rows high, and a head of 8 fills
                            // half its kernel.
                            unsafe {
                                matmul(
                                    rows,
                                    d,
                                    m,
                                    (pv.as_mut_ptr(), 1, rows),
                                    false,
                                    (s.as_ptr(), 1, rows),
                                    (vs.as_ptr().add(kv0), kt, kc),
                                    1.0,
                                    Parallelism::None,
                                );
                            }
                            for c in 0..d {
                                // SAFETY: this head's channels of rows
                                // r0..r0+rows are written by this task alone.
                                let out = unsafe { { dst }.0.add(q0 + c * qc) };
                                let col = &pv[c * rows..(c + 1) * rows];
                                for (r, (&x, &f)) in col.iter().zip(&inv[..rows]).enumerate() {
                                    unsafe { out.add(r * qt).write(x * f) };
                                }
                            }
                        });
                    })
            })
        })
    })???;
    // SAFETY: the tasks cover every query row of every head, and each writes
    // its rows' d-wide windows whole (directly, or as GEMM's overwritten dst).
    unsafe { out.set_len(b * n * hd) };
    tensor(out, q.dims())
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A convolution's patch matrix, kept between calls: a fresh one per
    /// image was allocated and zeroed only to be overwritten.
    static COL: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest patch matrix (f32 elements, 64 MiB) kept between calls.
const COL_KEEP_MAX: usize = 16 << 20;

/// Heads for [`attend_direct`]: short key sequences (the temporal attention's
/// frames), where GEMM's packing costs more than the product, and head
/// widths in whole lanes of 8. (Narrow heads over a few hundred pixels ran
/// slower this way than through GEMM: 5.5 against 4.7 ms at 256 keys.)
fn direct_applies(m: usize, d: usize) -> bool {
    m <= DIRECT_MAX_KEYS && d <= DIRECT_MAX_DIM && d.is_multiple_of(8)
}

/// Most keys the direct path takes (the scores of one row live on the stack).
const DIRECT_MAX_KEYS: usize = 32;
/// Head widths the direct path takes (one output row lives on the stack).
const DIRECT_MAX_DIM: usize = 128;
/// Elements of the transposed key tile, `d` x `m` rounded up to 8 (16 KB).
const DIRECT_TILE: usize = DIRECT_MAX_KEYS * DIRECT_MAX_DIM;

simd_dispatch! {
    /// Attention for `rows` query rows of one head against `m` keys (see
    /// [`direct_applies`]) without GEMM: `q`, `k`, `v` and `out` start at the
    /// first row of the head and step `stride` per row.
    #[allow(clippy::too_many_arguments)]
    fn attend_direct(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: SharedMut,
        rows: usize,
        m: usize,
        d: usize,
        stride: usize,
        scale: f32,
    ) {
        // K as [d, m8] (m padded to whole lanes with zeros): a query's scores
        // are then d sweeps over m8-wide rows, summed in registers, instead
        // of m horizontal dot products. Left uninitialised and then written
        // whole: zeroing the full tile cost more than the attention itself
        // at 8 frames and 8 dims.
        let m8 = m.next_multiple_of(8);
        let mut tile = [std::mem::MaybeUninit::<f32>::uninit(); DIRECT_TILE];
        let tile = &mut tile[..d * m8];
        for c in 0..d {
            for j in 0..m8 {
                let kv = if j < m { k[j * stride + c] } else { 0.0 };
                tile[c * m8 + j].write(kv);
            }
        }
        // SAFETY: every element of tile[..d * m8] was written just above.
        let kt = unsafe { &*(tile as *const [std::mem::MaybeUninit<f32>] as *const [f32]) };
        let mut scores = [0f32; DIRECT_MAX_KEYS];
        let mut acc = [0f32; DIRECT_MAX_DIM];
        let acc = &mut acc[..d];
        for r in 0..rows {
            let qr = &q[r * stride..r * stride + d];
            for j0 in (0..m8).step_by(8) {
                let mut lanes = [0f32; 8];
                for (c, &qv) in qr.iter().enumerate() {
                    let kr = &kt[c * m8 + j0..c * m8 + j0 + 8];
                    for i in 0..8 {
                        lanes[i] += qv * kr[i];
                    }
                }
                for i in 0..8 {
                    scores[j0 + i] = lanes[i] * scale;
                }
            }
            // Softmax in whole lanes of 8 (padding lanes at -inf), so that a
            // few keys still run vectorised instead of in scalar tails;
            // unnormalised: the d outputs are scaled instead of the m scores.
            scores[m..m8].fill(f32::NEG_INFINITY);
            let mut top = [f32::NEG_INFINITY; 8];
            for ch in scores[..m8].chunks_exact(8) {
                for i in 0..8 {
                    top[i] = if ch[i] > top[i] { ch[i] } else { top[i] };
                }
            }
            let max = top.into_iter().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
            for ch in scores[..m8].chunks_exact_mut(8) {
                for v in ch {
                    *v = exp(*v - max);
                }
            }
            let scores = &scores[..m];
            let inv = 1.0 / lanes_sum(scores, |v| v);
            let v_lanes = |j: usize, d0: usize| -> &[f32; 8] {
                v[j * stride + d0..j * stride + d0 + 8].try_into().expect("8 lanes")
            };
            for d0 in (0..d).step_by(8) {
                // Four partial sums over the keys, so that long rows are not
                // one chain of dependent additions; combined in a fixed order.
                let mut lanes = [[0f32; 8]; 4];
                let whole = m - m % 4;
                for j in (0..whole).step_by(4) {
                    for (u, part) in lanes.iter_mut().enumerate() {
                        let p = scores[j + u];
                        let vr = v_lanes(j + u, d0);
                        for i in 0..8 {
                            part[i] += p * vr[i];
                        }
                    }
                }
                for (j, &p) in scores.iter().enumerate().skip(whole) {
                    let vr = v_lanes(j, d0);
                    for i in 0..8 {
                        lanes[0][i] += p * vr[i];
                    }
                }
                for i in 0..8 {
                    acc[d0 + i] =
                        ((lanes[0][i] + lanes[1][i]) + (lanes[2][i] + lanes[3][i])) * inv;
                }
            }
            // SAFETY: row r of this head (d elements at r * stride, maybe not
            // yet initialised) is written by this task alone.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.0.add(r * stride), d) };
        }
    }
}

simd_dispatch! {
    /// Softmax numerators of a column-major score block, one query row per
    /// lane (`rows` of them, at most [`QUERY_BLOCK`]): each score becomes
    /// exp(score - its row's max) in place, and `inv` gets the reciprocal of
    /// each row's sum. Sums run over the keys in order, per lane.
    fn exp_columns(scores: &mut [f32], rows: usize, inv: &mut [f32]) {
        let mut max = [f32::NEG_INFINITY; QUERY_BLOCK];
        let max = &mut max[..rows];
        for col in scores.chunks_exact(rows) {
            for (mx, &v) in max.iter_mut().zip(col) {
                // Not f32::max: its NaN handling costs a compare per lane.
                *mx = if v > *mx { v } else { *mx };
            }
        }
        let mut sum = [0f32; QUERY_BLOCK];
        let sum = &mut sum[..rows];
        for col in scores.chunks_exact_mut(rows) {
            for ((v, &mx), s) in col.iter_mut().zip(&*max).zip(sum.iter_mut()) {
                *v = exp(*v - mx);
                *s += *v;
            }
        }
        for (i, &s) in inv.iter_mut().zip(&*sum) {
            *i = 1.0 / s;
        }
    }
}

// ---------------------------------------------------------------- Linear

/// `x W^T + bias (+ residual)` over the last axis of `x` (`[.., k]`, strided
/// views read in place), with `weight` `[n, k]`. The bias and the residual go
/// into the output before the product is accumulated onto it, so the whole
/// layer is one pass besides the GEMM. The output is contiguous `[.., n]`.
pub(crate) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        candle_core::bail!("linear: input {dims:?} against weight [{n}, {k}]");
    }
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("rank >= 1") = n;
    if let Some(r) = residual {
        if r.dims() != out_dims.as_slice() {
            candle_core::bail!("linear: residual {:?}, output {out_dims:?}", r.dims());
        }
    }
    // Rows as (batches, m) with a stride for each; a strided input whose rows
    // do not form one such grid is copied first.
    let rank3 = match dims.len() {
        0 => unreachable!("dims.last() is k"),
        1 => x.reshape((1, 1, k))?,
        2 => x.unsqueeze(0)?,
        3 => x.clone(),
        _ => x.reshape(((), dims[dims.len() - 2], k))?,
    };
    let (batches, m, _) = rank3.dims3()?;
    let rows = batches * m;
    // Written whole below: by the residual and bias, or by the bias, or else
    // by the product alone (which overwrites when there is nothing to add).
    let mut out = Vec::<f32>::with_capacity(rows * n);
    let start = &mut out.spare_capacity_mut()[..rows * n];
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    // Whole blocks of rows per task: one task per row costs more than the copy.
    let block = n * 64;
    match (residual, &bias) {
        (Some(r), _) => with_slice(r, |rs| {
            start
                .par_chunks_mut(block)
                .zip(rs.par_chunks(block))
                .for_each(|(o, r)| add_bias_rows(o, r, bias.as_deref()));
        })?,
        (None, Some(b)) => start.par_chunks_mut(block).for_each(|o| {
            for row in o.chunks_mut(n) {
                for (d, &v) in row.iter_mut().zip(b) {
                    d.write(v);
                }
            }
        }),
        // No inputs at all: the product is zero and GEMM may not write it.
        (None, None) if k == 0 => start.fill(MaybeUninit::new(0.0)),
        (None, None) => {}
    }
    let read_dst = residual.is_some() || bias.is_some();
    let (storage, layout) = rank3.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("cpu kernel called on a {:?} tensor", x.device().location())
    };
    let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..];
    let (sb, sm, sk) = match *layout.stride() {
        [sb, sm, sk] => (sb, sm, sk),
        _ => unreachable!("rank 3"),
    };
    if rows <= SKINNY_MAX_ROWS && sk == 1 && k > 0 {
        let x_rows: Vec<&[f32]> = (0..batches)
            .flat_map(|bi| (0..m).map(move |r| bi * sb + r * sm))
            .map(|at| &xs[at..at + k])
            .collect();
        let dst = SharedMut(out.as_mut_ptr());
        with_slice(weight, |wt| {
            skinny_gemm(wt, k, &x_rows, dst, 1, n, read_dst)
        })?;
        drop(x_rows);
        drop(storage);
        // SAFETY: every element was written: prefilled, or (k > 0 here) set
        // by its dot product.
        unsafe { out.set_len(rows * n) };
        return tensor(out, out_dims);
    }
    // One GEMM over every row when the batches stack evenly.
    let (calls, call_rows, call_sb) = if batches == 1 || sb == m * sm {
        (1, rows, 0)
    } else {
        (batches, m, sb)
    };
    let inner = if calls >= threads() {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads())
    };
    let dst = SharedMut(out.as_mut_ptr());
    with_slice(weight, |wt| {
        let one_call = |c: usize| {
            // SAFETY: call c reads rows c*call_rows.. of x through the tensor's
            // own strides (inside its storage) and writes only its rows of
            // out (row stride n); the weight is n x k, read transposed.
            unsafe {
                matmul(
                    call_rows,
                    n,
                    k,
                    ({ dst }.0.add(c * call_rows * n), n, 1),
                    read_dst,
                    (xs.as_ptr().add(c * call_sb), sm, sk),
                    (wt.as_ptr(), 1, k),
                    1.0,
                    inner,
                )
            }
        };
        if matches!(inner, Parallelism::None) {
            (0..calls).into_par_iter().for_each(one_call);
        } else {
            (0..calls).for_each(one_call);
        }
    })?;
    drop(storage);
    // SAFETY: every element was written: prefilled above, or overwritten by
    // the product (k > 0; k == 0 was zero-filled).
    unsafe { out.set_len(rows * n) };
    tensor(out, out_dims)
}

simd_dispatch! {
    /// `out = residual + bias` for whole rows (`bias` as wide as one row).
    fn add_bias_rows(out: &mut [MaybeUninit<f32>], residual: &[f32], bias: Option<&[f32]>) {
        match bias {
            Some(b) => {
                for (o, r) in out.chunks_mut(b.len()).zip(residual.chunks(b.len())) {
                    for ((o, &r), &b) in o.iter_mut().zip(r).zip(b) {
                        o.write(r + b);
                    }
                }
            }
            None => {
                for (o, &r) in out.iter_mut().zip(residual) {
                    o.write(r);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- Channels-first temporal layers
//
// The temporal transformer sees each pixel's frames as a sequence. Token-major
// it needs three permuted copies of the clip and an attention of 8 keys per
// (pixel, head), with its softmax across lanes. Channels-first (the UNet's
// own `[b * frames, c, pixels]` layout) its linear layers are per-frame
// products, its layer norms and attention run with pixels along the lanes,
// and nothing is permuted.

/// GroupNorm of clips stored frame by frame, `x` `[b * frames, c, spatial..]`:
/// statistics per (clip, group) over all of the clip's frames, as diffusers'
/// temporal layers compute them on `[b, c, frames, h, w]`.
pub(crate) fn group_norm_frames(
    x: &Tensor,
    frames: usize,
    groups: usize,
    eps: f64,
    gamma: &Tensor,
    beta: &Tensor,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2
        || frames == 0
        || !dims[0].is_multiple_of(frames)
        || !dims[1].is_multiple_of(groups)
    {
        candle_core::bail!("group_norm_frames: shape {dims:?}, {frames} frames, {groups} groups");
    }
    let (c, spatial) = (dims[1], dims[2..].iter().product::<usize>());
    let (clips, cg) = (dims[0] / frames, c / groups);
    let span = cg * spatial;
    if span == 0 {
        return Ok(x.clone());
    }
    let gamma = gamma.to_vec1::<f32>()?;
    let beta = beta.to_vec1::<f32>()?;
    let out = with_slice(x, |xs| {
        let mut out = Vec::<f32>::with_capacity(xs.len());
        let dst = SharedMut(out.as_mut_ptr());
        (0..clips * groups).into_par_iter().for_each(|task| {
            let (clip, g) = (task / groups, task % groups);
            let at = |f: usize| ((clip * frames + f) * c + g * cg) * spatial;
            let count = (frames * span) as f64;
            let mean = (0..frames)
                .map(|f| sum_f64(&xs[at(f)..at(f) + span]))
                .sum::<f64>()
                / count;
            let m = mean as f32;
            let var = (0..frames)
                .map(|f| sum_sq_dev(&xs[at(f)..at(f) + span], m))
                .sum::<f64>()
                / count;
            let inv = (1.0 / (var + eps).sqrt()) as f32;
            for f in 0..frames {
                for ch in 0..cg {
                    let ci = g * cg + ch;
                    let off = at(f) + ch * spatial;
                    // SAFETY: (clip, group) owns these channel rows of every
                    // frame; no other task writes them.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(
                            { dst }.0.add(off).cast::<MaybeUninit<f32>>(),
                            spatial,
                        )
                    };
                    normalize(
                        &xs[off..off + spatial],
                        o,
                        m,
                        inv * gamma[ci],
                        beta[ci],
                        false,
                    );
                }
            }
        });
        // SAFETY: the tasks cover every (clip, group), hence every element.
        unsafe { out.set_len(xs.len()) };
        out
    })?;
    tensor(out, dims)
}

/// `weight x (+ bias) (+ residual)` per image of `x` `[n, k, spatial..]`
/// with `weight` `[m, k]`: a linear layer applied to channels-first pixels
/// (a 1x1 convolution), output `[n, m, spatial..]`.
pub(crate) fn pointwise(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (m, k) = weight.dims2()?;
    if dims.len() < 2 || dims[1] != k {
        candle_core::bail!("pointwise: input {dims:?} against weight [{m}, {k}]");
    }
    let (n, spatial) = (dims[0], dims[2..].iter().product::<usize>());
    let mut out_dims = dims.clone();
    out_dims[1] = m;
    if let Some(r) = residual {
        if r.dims() != out_dims.as_slice() {
            candle_core::bail!("pointwise: residual {:?}, output {out_dims:?}", r.dims());
        }
    }
    if spatial < POINTWISE_MIN_PIXELS {
        // A handful of pixels per image (the deep levels of a real UNet):
        // one product per image would pack the weights once per image, so
        // the pixels go through the token-major layer as one batch instead.
        let tokens =
            |t: &Tensor, c: usize| t.reshape((n, c, spatial))?.transpose(1, 2)?.contiguous();
        let residual = residual.map(|r| tokens(r, m)).transpose()?;
        let out = linear(&tokens(x, k)?, weight, bias, residual.as_ref())?;
        return out.transpose(1, 2)?.contiguous()?.reshape(out_dims);
    }
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    let plane = m * spatial;
    let run = |wt: &[f32], xs: &[f32], rs: Option<&[f32]>| {
        let one = |img: usize, o: &mut [MaybeUninit<f32>], inner| {
            let prefilled = match (&rs, &bias) {
                (Some(r), b) => {
                    add_bias_rows_cf(o, &r[img * plane..(img + 1) * plane], b.as_deref(), spatial);
                    true
                }
                (None, Some(b)) => {
                    fill_rows(o, spatial, b);
                    true
                }
                (None, None) => {
                    if k == 0 {
                        o.fill(MaybeUninit::new(0.0));
                    }
                    false
                }
            };
            // SAFETY: o is m x spatial (row stride spatial), the weight
            // m x k, this image's x k x spatial; all exactly that long.
            unsafe {
                matmul(
                    m,
                    spatial,
                    k,
                    (o.as_mut_ptr().cast::<f32>(), spatial, 1),
                    prefilled,
                    (wt.as_ptr(), k, 1),
                    (xs.as_ptr().add(img * k * spatial), spatial, 1),
                    1.0,
                    inner,
                )
            }
        };
        // SAFETY: each image's block is prefilled or overwritten whole.
        unsafe { per_image_output(n, plane, one) }
    };
    let out = with_slice(weight, |wt| {
        with_slice(x, |xs| match &residual {
            Some(r) => with_slice(r, |rs| run(wt, xs, Some(rs))),
            None => Ok(run(wt, xs, None)),
        })
    })???;
    tensor(out, out_dims)
}

/// Pixels per image below which [`pointwise`] runs token-major.
const POINTWISE_MIN_PIXELS: usize = 64;

simd_dispatch! {
    /// `out = residual + bias[row]` for channel rows of `spatial` elements.
    fn add_bias_rows_cf(
        out: &mut [MaybeUninit<f32>],
        residual: &[f32],
        bias: Option<&[f32]>,
        spatial: usize,
    ) {
        let rows = out.chunks_mut(spatial.max(1)).zip(residual.chunks(spatial.max(1)));
        for (ch, (o, r)) in rows.enumerate() {
            let b = bias.map_or(0.0, |b| b[ch]);
            for (o, &r) in o.iter_mut().zip(r) {
                o.write(r + b);
            }
        }
    }
}

/// Pixels per task of the channels-first kernels (lanes of their loops).
const CF_BLOCK: usize = 64;

/// `torch.nn.LayerNorm` over the channels of `x` `[n, c, spatial..]`, each
/// pixel on its own (pixels run along the lanes; sums over channels in order).
pub(crate) fn layer_norm_channels(
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || gamma.dims() != [dims[1]] {
        candle_core::bail!(
            "layer_norm_channels: shape {dims:?}, weight {:?}",
            gamma.dims()
        );
    }
    let (n, c, spatial) = (dims[0], dims[1], dims[2..].iter().product::<usize>());
    if n * c * spatial == 0 {
        return Ok(x.clone());
    }
    let gamma = gamma.to_vec1::<f32>()?;
    let beta = match beta {
        Some(b) => b.to_vec1::<f32>()?,
        None => vec![0f32; c],
    };
    let blocks = spatial.div_ceil(CF_BLOCK);
    let out = with_slice(x, |xs| {
        let mut out = Vec::<f32>::with_capacity(xs.len());
        let dst = SharedMut(out.as_mut_ptr());
        (0..n * blocks).into_par_iter().for_each(|task| {
            let (img, blk) = (task / blocks, task % blocks);
            let p0 = blk * CF_BLOCK;
            let w = CF_BLOCK.min(spatial - p0);
            let base = img * c * spatial + p0;
            // SAFETY: this task alone writes pixels p0..p0+w of image img.
            let o = SharedMut(unsafe { { dst }.0.add(base) });
            layer_norm_block(&xs[base..], o, c, spatial, w, &gamma, &beta, eps as f32);
        });
        // SAFETY: the tasks cover every pixel of every image, all channels.
        unsafe { out.set_len(xs.len()) };
        out
    })?;
    tensor(out, dims)
}

simd_dispatch! {
    /// One block of `w` pixels: `x` and `out` at channel 0, channel stride
    /// `stride`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_block(
        x: &[f32],
        out: SharedMut,
        c: usize,
        stride: usize,
        w: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let mut mean = [0f32; CF_BLOCK];
        let mean = &mut mean[..w];
        for ch in 0..c {
            for (m, &v) in mean.iter_mut().zip(&x[ch * stride..ch * stride + w]) {
                *m += v;
            }
        }
        let inv_c = 1.0 / c as f32;
        mean.iter_mut().for_each(|m| *m *= inv_c);
        let mut var = [0f32; CF_BLOCK];
        let var = &mut var[..w];
        for ch in 0..c {
            for ((s, &v), &m) in var.iter_mut().zip(&x[ch * stride..ch * stride + w]).zip(&*mean) {
                let d = v - m;
                *s += d * d;
            }
        }
        var.iter_mut().for_each(|s| *s = 1.0 / (*s * inv_c + eps).sqrt());
        for ch in 0..c {
            let (g, b) = (gamma[ch], beta[ch]);
            let src = &x[ch * stride..ch * stride + w];
            for (i, ((&v, &m), &r)) in src.iter().zip(&*mean).zip(&*var).enumerate() {
                // SAFETY: the caller's task alone writes these pixels.
                unsafe { out.0.add(ch * stride + i).write((v - m) * r * g + b) };
            }
        }
    }
}

/// `a * gelu(g)` with `x` `[n, 2c, spatial..]` split along the channels into
/// `[a, g]` (GEGLU, channels-first), output `[n, c, spatial..]`.
pub(crate) fn geglu_channels(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || !dims[1].is_multiple_of(2) {
        candle_core::bail!("geglu_channels: shape {dims:?}");
    }
    let half = dims[1] / 2 * dims[2..].iter().product::<usize>();
    let out = with_slice(x, |xs| {
        // SAFETY: each image's half-block is written whole by gated_gelu.
        unsafe {
            written_output(xs.len() / 2, |out| {
                out.par_chunks_mut(half.max(1))
                    .zip(xs.par_chunks(2 * half.max(1)))
                    .for_each(|(o, img)| {
                        let (a, g) = img.split_at(half);
                        gated_gelu(o, a, g);
                    });
            })
        }
    })?;
    let mut shape = dims;
    shape[1] /= 2;
    tensor(out, shape)
}

simd_dispatch! {
    fn gated_gelu(out: &mut [MaybeUninit<f32>], a: &[f32], g: &[f32]) {
        for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
            o.write(a * gelu_erf(g));
        }
    }
}

/// Self-attention across the frames of each pixel, channels-first: `q`, `k`,
/// `v` `[b * frames, heads * d, spatial..]`, output the same. Pixels run along
/// the lanes, so the softmax over a pixel's frames is lane-wise.
pub(crate) fn temporal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    frames: usize,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let dims = q.dims().to_vec();
    if dims.len() < 2
        || k.dims() != dims.as_slice()
        || v.dims() != dims.as_slice()
        || frames == 0
        || !dims[0].is_multiple_of(frames)
        || !dims[1].is_multiple_of(heads)
    {
        candle_core::bail!(
            "temporal_attention: q {dims:?} k {:?} v {:?}, {frames} frames, {heads} heads",
            k.dims(),
            v.dims()
        );
    }
    let (inner, spatial) = (dims[1], dims[2..].iter().product::<usize>());
    let (clips, d) = (dims[0] / frames, inner / heads);
    let blocks = spatial.div_ceil(CF_BLOCK);
    let len = dims[0] * inner * spatial;
    if len == 0 {
        return Ok(q.clone());
    }
    let out = with_slice(q, |qs| {
        with_slice(k, |ks| {
            with_slice(v, |vs| {
                let mut out = Vec::<f32>::with_capacity(len);
                let dst = SharedMut(out.as_mut_ptr());
                (0..clips * heads * blocks)
                    .into_par_iter()
                    .for_each(|task| {
                        let blk = task % blocks;
                        let (clip, h) = (task / blocks / heads, task / blocks % heads);
                        let p0 = blk * CF_BLOCK;
                        let geo = CfHead {
                            w: CF_BLOCK.min(spatial - p0),
                            frames,
                            d,
                            frame_stride: inner * spatial,
                            chan_stride: spatial,
                            scale,
                        };
                        let at = (clip * frames * inner + h * d) * spatial + p0;
                        // SAFETY: this task alone writes head h's channels of
                        // pixels p0..p0+w in every frame of the clip.
                        let o = SharedMut(unsafe { { dst }.0.add(at) });
                        attend_frames(&qs[at..], &ks[at..], &vs[at..], o, geo);
                    });
                // SAFETY: the tasks cover every (clip, head, pixel block).
                unsafe { out.set_len(len) };
                out
            })
        })
    })???;
    tensor(out, dims)
}

/// Frames up to which [`temporal_attention`]'s scores live on the stack.
const CF_STACK_FRAMES: usize = 32;

#[derive(Clone, Copy)]
struct CfHead {
    w: usize,
    frames: usize,
    d: usize,
    frame_stride: usize,
    chan_stride: usize,
    scale: f32,
}

simd_dispatch! {
    /// One (clip, head, pixel block): `q`, `k`, `v`, `out` at frame 0,
    /// channel 0 of the head, pixel p0.
    fn attend_frames(q: &[f32], k: &[f32], v: &[f32], out: SharedMut, g: CfHead) {
        let CfHead { w, frames, d, frame_stride, chan_stride, scale } = g;
        // Pixels p0..p0+w of channel c of frame f.
        let row = |f: usize, c: usize| {
            let at = f * frame_stride + c * chan_stride;
            at..at + w
        };
        let mut on_stack = [[0f32; CF_BLOCK]; CF_STACK_FRAMES];
        let mut on_heap = Vec::new();
        let scores: &mut [[f32; CF_BLOCK]] = if frames <= CF_STACK_FRAMES {
            &mut on_stack[..frames]
        } else {
            on_heap.resize(frames, [0f32; CF_BLOCK]);
            &mut on_heap
        };
        for r in 0..frames {
            for (j, s) in scores.iter_mut().enumerate() {
                let s = &mut s[..w];
                s.fill(0.0);
                for c in 0..d {
                    for ((s, &a), &b) in s.iter_mut().zip(&q[row(r, c)]).zip(&k[row(j, c)]) {
                        *s += a * b;
                    }
                }
            }
            let mut max = [f32::NEG_INFINITY; CF_BLOCK];
            for s in scores.iter() {
                for (m, &v) in max[..w].iter_mut().zip(&s[..w]) {
                    *m = if v > *m { v } else { *m };
                }
            }
            let mut sum = [0f32; CF_BLOCK];
            for s in scores.iter_mut() {
                for ((v, &m), t) in s[..w].iter_mut().zip(&max[..w]).zip(sum[..w].iter_mut()) {
                    *v = exp((*v - m) * scale);
                    *t += *v;
                }
            }
            for t in sum[..w].iter_mut() {
                *t = 1.0 / *t;
            }
            for c in 0..d {
                let mut acc = [0f32; CF_BLOCK];
                for (j, s) in scores.iter().enumerate() {
                    for ((a, &p), &x) in acc[..w].iter_mut().zip(&s[..w]).zip(&v[row(j, c)]) {
                        *a += p * x;
                    }
                }
                let at = r * frame_stride + c * chan_stride;
                for (i, (&a, &t)) in acc[..w].iter().zip(&sum[..w]).enumerate() {
                    // SAFETY: the caller's task alone writes these pixels.
                    unsafe { out.0.add(at + i).write(a * t) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Module;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // A fixed, seeded pattern: the kernels are checked against candle's ops on it.
        let len: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst_exp = 0f32;
        let mut worst_erf = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.3e-4;
            if x >= -64.0 {
                let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs() as f32;
                worst_exp = worst_exp.max(rel);
            } else {
                assert_eq!(exp(x), 0.0, "{x}: below e^-64 is flushed");
            }
            let x = i as f32 * 1.75e-5;
            worst_erf = worst_erf.max((erf(x) as f64 - erf_series(x as f64)).abs() as f32);
        }
        assert!(worst_exp < 2e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 1e-6, "erf absolute error {worst_erf}");
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(
            exp(-64.0) > 1e-28,
            "the smallest kept value is a normal number"
        );
        assert_eq!(exp(1e9), exp(88.0));
        assert!(exp(f32::NAN).is_nan());
        assert!(silu(-1e6).abs() < 1e-30 && silu(1e6) == 1e6);
    }

    /// erf in f64 by its Taylor series; exact to ~1e-11 for |x| <= 3.5.
    fn erf_series(x: f64) -> f64 {
        let (mut sum, mut term, mut k) = (0.0, x, 0.0);
        while term.abs() > 1e-20 {
            sum += term / (2.0 * k + 1.0);
            k += 1.0;
            term *= -x * x / k;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn group_norm_matches_candle() {
        for (shape, groups, silu_after) in [
            (vec![2, 8, 5, 7], 4, false),
            (vec![3, 16, 4, 6, 6], 8, true),
            (vec![1, 32, 1, 1], 32, true),
        ] {
            let c = shape[1];
            let x = (randn(&shape, 1) * 3.0).unwrap().affine(1.0, 0.7).unwrap();
            let gamma = randn(&[c], 2);
            let beta = randn(&[c], 3);
            let reference = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-6)
                .unwrap()
                .forward(&x)
                .unwrap();
            let reference = if silu_after {
                candle_nn::ops::silu(&reference).unwrap()
            } else {
                reference
            };
            let ours = group_norm(&x, groups, 1e-6, &gamma, &beta, silu_after).unwrap();
            assert!(max_diff(&ours, &reference) < 2e-5, "{shape:?}");
        }
    }

    #[test]
    fn linear_matches_candle() {
        let w = randn(&[24, 40], 7);
        let b = randn(&[24], 8);
        let contiguous = randn(&[3, 17, 40], 9);
        // A permuted view, read in place: rows of the first axis stride 1.
        let strided = randn(&[3, 40, 17], 10).transpose(1, 2).unwrap();
        // Batches that do not stack into one row grid.
        let gapped = randn(&[3, 20, 40], 11).narrow(1, 2, 17).unwrap();
        let rank4 = randn(&[2, 3, 5, 40], 12);
        let matrix = randn(&[7, 40], 13);
        for x in [contiguous, strided, gapped, rank4, matrix] {
            for bias in [None, Some(&b)] {
                // candle 0.11's batched matmul misreads a transposed input
                // with more than one batch, so the reference gets a copy.
                let reference = candle_nn::Linear::new(w.clone(), bias.cloned())
                    .forward(&x.contiguous().unwrap())
                    .unwrap();
                let residual = randn(reference.dims(), 14);
                let ours = linear(&x, &w, bias, None).unwrap();
                assert_eq!(ours.dims(), reference.dims());
                assert!(max_diff(&ours, &reference) < 1e-5, "{:?}", x.dims());
                let ours = linear(&x, &w, bias, Some(&residual)).unwrap();
                let reference = (&reference + &residual).unwrap();
                assert!(max_diff(&ours, &reference) < 1e-5, "{:?}", x.dims());
            }
        }
        // Few rows (the skinny product), K not a whole number of lanes, and
        // batches with gaps between them.
        let w = randn(&[24, 45], 15);
        for x in [
            randn(&[2, 3, 45], 16),
            randn(&[3, 20, 45], 17).narrow(1, 2, 4).unwrap(),
        ] {
            let reference = candle_nn::Linear::new(w.clone(), Some(b.clone()))
                .forward(&x.contiguous().unwrap())
                .unwrap();
            let residual = randn(reference.dims(), 18);
            let ours = linear(&x, &w, Some(&b), Some(&residual)).unwrap();
            let reference = (&reference + &residual).unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "{:?}", x.dims());
        }
        // No inputs at all: the output is the bias (no panic on a bad config).
        let empty = linear(&randn(&[2, 0], 19), &randn(&[24, 0], 20), Some(&b), None).unwrap();
        assert_eq!(
            max_diff(&empty, &b.unsqueeze(0).unwrap().repeat((2, 1)).unwrap()),
            0.0
        );
        let x = randn(&[3, 17, 39], 9);
        assert!(linear(&x, &w, None, None).is_err());
        let x = randn(&[3, 17, 45], 9);
        assert!(linear(&x, &w, None, Some(&randn(&[3, 17, 23], 1))).is_err());
    }

    #[test]
    fn conv2d_matches_candle() {
        for (n, ci, co, h, w, k, stride, pad) in [
            (3, 4, 6, 9, 7, 3, 1, 1),
            (2, 5, 3, 8, 8, 3, 2, 1),
            (1, 3, 2, 7, 9, 3, 2, 0),
            (4, 6, 5, 5, 5, 1, 1, 0),
            (2, 2, 2, 4, 6, 3, 1, 0),
            (33, 7, 5, 4, 3, 3, 1, 1),
            // Output as wide as the input (one shifted copy per tap), with
            // taps reaching past whole rows or the whole image.
            (2, 3, 4, 1, 1, 3, 1, 1),
            (2, 3, 4, 2, 3, 5, 1, 2),
            (1, 2, 3, 6, 1, 3, 1, 1),
            (1, 2, 3, 3, 2, 7, 1, 3),
            // Weights of GROUP_MIN_WEIGHTS: images grouped into one GEMM.
            (5, 128, 228, 3, 4, 3, 1, 1),
            // Grouped, and few enough pixels in all for the skinny product
            // (K = 1161, not a whole number of lanes).
            (3, 129, 300, 2, 2, 3, 1, 1),
            // Over GROUP_COL_BUDGET: one image at a time.
            (2, 48, 8, 100, 100, 3, 1, 1),
        ] {
            let x = randn(&[n, ci, h, w], 4);
            let wt = randn(&[co, ci, k, k], 5);
            let b = randn(&[co], 6);
            let reference = x
                .conv2d(&wt, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let ours = conv2d(&x, &wt, Some(&b), stride, (pad, pad)).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            // Sums of up to 432 products of values in [-2, 2]: relative to the
            // output's scale, f32 summation order differences stay below 1e-6.
            let scale = reference
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
            let err = max_diff(&ours, &reference) / scale;
            assert!(
                err < 1e-6,
                "{n} {ci} {co} {h} {w} {k} {stride} {pad}: {err}"
            );
            let no_bias = conv2d(&x, &wt, None, stride, (pad, pad)).unwrap();
            let reference = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
            assert!(max_diff(&no_bias, &reference) / scale < 1e-6);
        }
    }

    /// The temporal convolution's (3, 1) kernel with padding only along frames.
    #[test]
    fn conv2d_pads_each_axis_on_its_own() {
        let x = randn(&[2, 3, 5, 11], 13);
        let wt = randn(&[4, 3, 3, 1], 14);
        let reference = x
            .pad_with_zeros(2, 1, 1)
            .unwrap()
            .conv2d(&wt, 0, 1, 1, 1)
            .unwrap();
        let ours = conv2d(&x, &wt, None, 1, (1, 0)).unwrap();
        assert_eq!(ours.dims(), &[2, 4, 5, 11]);
        assert!(max_diff(&ours, &reference) < 1e-5);
    }

    #[test]
    fn attention_matches_softmax_attention() {
        for (b, n, m, heads, d) in [
            (2, 70, 77, 3, 8),
            (5, 8, 8, 2, 16),
            (1, 130, 130, 1, 4),
            (2, 70, 20, 2, 13),
            (3, 16, 32, 4, 64),
            // Direct path with keys that are not whole groups of four.
            (2, 5, 7, 2, 8),
            // Short keys but heads wider than the direct path takes.
            (1, 9, 5, 1, 130),
        ] {
            let q = randn(&[b, n, heads * d], 7);
            let k = randn(&[b, m, heads * d], 8);
            let v = randn(&[b, m, heads * d], 9);
            let scale = 1.0 / (d as f32).sqrt();
            let split = |t: &Tensor, len| {
                t.reshape((b, len, heads, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (qh, kh, vh) = (split(&q, n), split(&k, m), split(&v, m));
            let att = candle_nn::ops::softmax_last_dim(
                &(qh.matmul(&kh.t().unwrap()).unwrap() * scale as f64).unwrap(),
            )
            .unwrap();
            let reference = att
                .matmul(&vh)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, n, heads * d))
                .unwrap();
            let ours = attention(&q, &k, &v, heads, scale).unwrap();
            assert!(
                max_diff(&ours, &reference) < 1e-5,
                "{b} {n} {m} {heads} {d}"
            );
        }
    }

    /// `[b * frames, c, h, w]` to the token-major `[b * h * w, frames, c]`
    /// the temporal transformer used before it went channels-first.
    fn frames_to_tokens(x: &Tensor, frames: usize) -> Tensor {
        let (bf, c, h, w) = x.dims4().unwrap();
        x.reshape((bf / frames, frames, c, h, w))
            .unwrap()
            .permute((0, 3, 4, 1, 2))
            .unwrap()
            .reshape((bf / frames * h * w, frames, c))
            .unwrap()
    }

    /// Attention across the frames of each pixel as the token-major kernel
    /// computes it on permuted copies, permuted back.
    fn temporal_reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        frames: usize,
        heads: usize,
    ) -> Tensor {
        let (bf, c, h, w) = q.dims4().unwrap();
        let tokens = |t: &Tensor| frames_to_tokens(t, frames).contiguous().unwrap();
        attention(&tokens(q), &tokens(k), &tokens(v), heads, 0.4)
            .unwrap()
            .reshape((bf / frames, h, w, frames, c))
            .unwrap()
            .permute((0, 3, 4, 1, 2))
            .unwrap()
            .reshape((bf, c, h, w))
            .unwrap()
    }

    #[test]
    fn temporal_attention_takes_clips_longer_than_its_stack_scores() {
        let frames = CF_STACK_FRAMES + 3;
        let (q, k, v) = (
            randn(&[frames, 16, 2, 5], 41),
            randn(&[frames, 16, 2, 5], 42),
            randn(&[frames, 16, 2, 5], 43),
        );
        let ours = temporal_attention(&q, &k, &v, frames, 2, 0.4).unwrap();
        assert!(max_diff(&ours, &temporal_reference(&q, &k, &v, frames, 2)) < 1e-5);
    }

    #[test]
    fn channels_first_kernels_match_the_token_major_ones() {
        let (b, frames, c, h, w) = (2, 5, 12, 3, 7);
        let x = randn(&[b * frames, c, h, w], 31);
        let (gamma, beta) = (randn(&[c], 32), randn(&[c], 33));

        // GroupNorm over each clip's frames = GroupNorm of [b, c, frames, h, w].
        let clips = x
            .reshape((b, frames, c, h, w))
            .unwrap()
            .permute((0, 2, 1, 3, 4))
            .unwrap()
            .contiguous()
            .unwrap();
        let reference = group_norm(&clips, 4, 1e-6, &gamma, &beta, false)
            .unwrap()
            .permute((0, 2, 1, 3, 4))
            .unwrap()
            .reshape((b * frames, c, h, w))
            .unwrap();
        let ours = group_norm_frames(&x, frames, 4, 1e-6, &gamma, &beta).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);

        // Per-pixel linear layer, with bias and residual.
        let wt = randn(&[6, c], 34);
        let bias = randn(&[6], 35);
        let residual = randn(&[b * frames, 6, h, w], 36);
        // The layer on each pixel's channels, through candle's ops.
        let per_pixel = |x: &Tensor| {
            x.permute((0, 2, 3, 1))
                .unwrap()
                .contiguous()
                .unwrap()
                .broadcast_matmul(&wt.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
        };
        let reference = per_pixel(&x).add(&residual).unwrap();
        let ours = pointwise(&x, &wt, Some(&bias), Some(&residual)).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-4);
        // Enough pixels for the per-image products (the above has 21).
        let wide = randn(&[3, c, 9, 9], 39);
        let reference = per_pixel(&wide);
        let ours = pointwise(&wide, &wt, Some(&bias), None).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-4);
        assert!(pointwise(&x, &randn(&[6, c + 1], 1), None, None).is_err());

        // Layer norm over the channels of each pixel.
        let ln = candle_nn::LayerNorm::new(gamma.clone(), beta.clone(), 1e-5);
        let reference = ln
            .forward(&x.permute((0, 2, 3, 1)).unwrap())
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        let ours = layer_norm_channels(&x, &gamma, Some(&beta), 1e-5).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);

        // GEGLU over channel halves.
        let h2 = x.chunk(2, 1).unwrap();
        let reference = (&h2[0] * h2[1].gelu_erf().unwrap()).unwrap();
        assert!(max_diff(&geglu_channels(&x).unwrap(), &reference) < 1e-5);

        // Attention across each pixel's frames.
        let (q, k, v) = (
            x.clone(),
            randn(&[b * frames, c, h, w], 37),
            randn(&[b * frames, c, h, w], 38),
        );
        let reference = temporal_reference(&q, &k, &v, frames, 3);
        let ours = temporal_attention(&q, &k, &v, frames, 3, 0.4).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        assert!(
            temporal_attention(&q, &k, &v, 3, 3, 0.4).is_err(),
            "frames must divide the batch"
        );

        // Empty shapes are empty results, not panics.
        let empty = randn(&[4, 0, 3], 1);
        assert_eq!(
            temporal_attention(&empty, &empty, &empty, 2, 1, 0.4)
                .unwrap()
                .dims(),
            [4, 0, 3]
        );
        let ln = layer_norm_channels(&empty, &randn(&[0], 1), None, 1e-5).unwrap();
        assert_eq!(ln.dims(), [4, 0, 3]);
        assert_eq!(
            group_norm_frames(&empty, 2, 1, 1e-5, &randn(&[0], 1), &randn(&[0], 1))
                .unwrap()
                .dims(),
            [4, 0, 3]
        );
        assert_eq!(
            pointwise(&empty, &randn(&[2, 0], 1), None, None)
                .unwrap()
                .dims(),
            [4, 2, 3]
        );
        assert_eq!(geglu_channels(&empty).unwrap().dims(), [4, 0, 3]);
    }

    #[test]
    fn kernels_are_deterministic_across_thread_counts() {
        let x = randn(&[4, 8, 12, 12], 11);
        let wt = randn(&[8, 8, 3, 3], 12);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = conv2d(&x, &wt, None, 1, (1, 1)).unwrap();
                let y = group_norm(&y, 4, 1e-5, &randn(&[8], 1), &randn(&[8], 2), true).unwrap();
                let t = y.reshape((4, 144, 8)).unwrap();
                let a = attention(&t, &t, &t, 2, 0.5).unwrap();
                // The channels-first temporal chain, 2 clips of 2 frames.
                let g =
                    group_norm_frames(&y, 2, 4, 1e-5, &randn(&[8], 3), &randn(&[8], 4)).unwrap();
                let g = layer_norm_channels(&g, &randn(&[8], 5), None, 1e-5).unwrap();
                let g = pointwise(&g, &randn(&[8, 8], 6), None, Some(&y)).unwrap();
                let g = temporal_attention(&g, &g, &y, 2, 2, 0.5).unwrap();
                Tensor::cat(&[a.flatten_all().unwrap(), g.flatten_all().unwrap()], 0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn simd_builds_give_the_baseline_bits() {
        let x = randn(&[2, 8, 12, 12], 21);
        let run = |baseline| {
            FORCE_BASELINE.with(|f| f.set(baseline));
            // One thread: the flag is per thread.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let out = pool.install(|| {
                FORCE_BASELINE.with(|f| f.set(baseline));
                let y = group_norm(&x, 4, 1e-5, &randn(&[8], 1), &randn(&[8], 2), true).unwrap();
                let long = y.reshape((2, 144, 8)).unwrap();
                // 8 keys, one head of 8: the direct path.
                let short = y.reshape((2 * 18, 8, 8)).unwrap();
                let w = randn(&[8, 8], 3);
                let lin = linear(&long, &w, Some(&randn(&[8], 4)), Some(&long)).unwrap();
                [
                    y.clone(),
                    attention(&long, &long, &long, 2, 0.5).unwrap(),
                    attention(&short, &short, &short, 1, 0.5).unwrap(),
                    lin,
                    // Few rows: the skinny product.
                    linear(&long.narrow(1, 0, 4).unwrap(), &w, None, None).unwrap(),
                    group_norm_frames(&x, 2, 4, 1e-5, &randn(&[8], 1), &randn(&[8], 2)).unwrap(),
                    layer_norm_channels(&y, &randn(&[8], 6), Some(&randn(&[8], 7)), 1e-5).unwrap(),
                    geglu_channels(&y).unwrap(),
                    temporal_attention(&y, &x, &y, 2, 2, 0.5).unwrap(),
                    pointwise(&y, &w, Some(&randn(&[8], 8)), Some(&x)).unwrap(),
                ]
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            });
            FORCE_BASELINE.with(|f| f.set(false));
            out
        };
        let (wide, base) = (run(false), run(true));
        for (w, b) in wide.iter().zip(&base) {
            assert!(w.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
