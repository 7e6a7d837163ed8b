//! 2D convolution as im2col + GEMM: per image, or a group of images per
//! GEMM when the weights are large and the images small.

use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::*;

thread_local! {
    /// A convolution's patch matrix, kept between calls: a fresh one per
    /// image was allocated and zeroed only to be overwritten.
    static COL: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest patch matrix (f32 elements, 64 MiB) kept between calls.
const COL_KEEP_MAX: usize = 16 << 20;

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
pub(super) const GROUP_COL_BUDGET: usize = 4 << 20;
/// Weight elements (f32, 1 MiB) from which convolutions group images.
pub(super) const GROUP_MIN_WEIGHTS: usize = 1 << 18;

/// Convolution of `n` images, `group` at a time: one patch matrix
/// `[ci*kh*kw, group*oh*ow]` and one GEMM per group, then the `[co, image,
/// pixel]` product is laid out as `[image, co, pixel]` with the bias added.
pub(super) fn conv2d_grouped(
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
pub(super) struct ConvGeometry {
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
