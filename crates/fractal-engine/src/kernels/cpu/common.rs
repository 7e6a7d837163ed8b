//! Helpers every kernel family uses: tensor access, uninitialised outputs,
//! the thread count, the GEMM call, and the baseline switch the SIMD
//! dispatch reads.

use candle_core::{Device, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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

pub(super) fn tensor(data: Vec<f32>, shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// A `len`-element output that `fill` writes completely before anything
/// reads it. Not zeroing it first saves a whole pass over memory: a zeroed
/// 4 MB output cost 160 us next to the 260 us GEMM that overwrites it.
///
/// # Safety
/// `fill` must initialise every element of the slice it is given.
pub(super) unsafe fn written_output(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
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
pub(super) unsafe fn per_image_output(
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
pub(super) fn fill_rows(out: &mut [MaybeUninit<f32>], row_len: usize, values: &[f32]) {
    for (row, &v) in out.chunks_mut(row_len.max(1)).zip(values) {
        row.fill(MaybeUninit::new(v));
    }
}

pub(super) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// A pointer that may be shared by tasks writing disjoint elements.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub(super) *mut f32);
// SAFETY: every use writes element ranges that no other task touches.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

#[cfg(test)]
thread_local! {
    pub(super) static FORCE_BASELINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests run the baseline build on this thread to compare it with the wide ones.
#[inline(always)]
pub(super) fn baseline_forced() -> bool {
    #[cfg(test)]
    return FORCE_BASELINE.with(|f| f.get());
    #[cfg(not(test))]
    false
}

/// `dst = scale * lhs rhs`, or `dst += scale * lhs rhs` when `accumulate`,
/// for `lhs` m x k and `rhs` k x n: one call of the `gemm` crate. Each
/// operand is (pointer, row stride, column stride).
///
/// # Safety
/// Every operand must hold the elements its strides reach, and no other
/// thread may touch the written part of `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
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
