//! Causal 3D convolution (the Wan VAE's), as a patch matrix per output
//! frame and strip of rows, times the weights in torch's own layout.
//!
//! Stacking each output frame's `kt` input frames along channels and
//! calling the 2D convolution copied the activations four times per call
//! (the past joined on, frames moved to the batch, the windows stacked, the
//! output moved back) and needed the weights permuted at load. Here the
//! patch rows are read straight from `past` and `x`, in the order of the
//! `[co, ci, kt, kh, kw]` weights, and the product lands in the output frame.

use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::*;

/// Patch-matrix elements (f32, 32 MiB) one strip may use; a frame larger
/// than that is done in strips of output rows.
const STRIP_COL_BUDGET: usize = 8 << 20;

thread_local! {
    static COL3: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `x` `[b, ci, t, h, w]` after `past` `[b, ci, tp, h, w]` (its last `kt − 1`
/// frames are used, zeros stand in for missing ones), weights `[co, ci, kt,
/// kh, kw]`, bias `[co]`, stride 1, zero padding `pad` on both sides in
/// space. Output frame `i` sees sequence frames `i .. i + kt`.
pub(crate) fn causal_conv3d(
    x: &Tensor,
    past: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    (pad_h, pad_w): (usize, usize),
) -> Result<Tensor> {
    let (b, ci, t, h, w) = x.dims5()?;
    let (co, wci, kt, kh, kw) = weight.dims5()?;
    if wci != ci {
        candle_core::bail!("conv3d: input has {ci} channels, weight expects {wci}");
    }
    let oh = (h + 2 * pad_h).checked_sub(kh).map(|v| v + 1);
    let ow = (w + 2 * pad_w).checked_sub(kw).map(|v| v + 1);
    let (Some(oh), Some(ow)) = (oh, ow) else {
        candle_core::bail!("conv3d: kernel larger than the padded input");
    };
    let past = match past {
        Some(p) => {
            let (pb, pc, tp, ph, pw) = p.dims5()?;
            if (pb, pc, ph, pw) != (b, ci, h, w) {
                candle_core::bail!(
                    "conv3d: past frames {:?} do not fit the input {:?}",
                    p.dims(),
                    x.dims()
                );
            }
            let have = tp.min(kt - 1);
            Some(p.narrow(2, tp - have, have)?)
        }
        None => None,
    };
    let have = past.as_ref().map_or(Ok(0), |p| p.dim(2))?;
    let bias = bias.to_vec1::<f32>()?;
    let geo = Geometry {
        ci,
        t,
        have,
        zeros: kt - 1 - have,
        h,
        w,
        kt,
        kh,
        kw,
        pad_h,
        pad_w,
        oh,
        ow,
    };
    let run = |ps: &[f32]| {
        with_slice(weight, |wt| {
            with_slice(x, |xs| geo.convolve(xs, ps, wt, &bias, b, co))
        })
    };
    let out = match &past {
        Some(p) => with_slice(p, |ps| run(ps))???,
        None => run(&[])??,
    };
    tensor(out, (b, co, t, oh, ow))
}

#[derive(Clone, Copy)]
struct Geometry {
    ci: usize,
    t: usize,
    /// Past frames given, and zero frames before them.
    have: usize,
    zeros: usize,
    h: usize,
    w: usize,
    kt: usize,
    kh: usize,
    kw: usize,
    pad_h: usize,
    pad_w: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// Frame `s` of the sequence (zeros, past, x) of channel `c` in batch
    /// `n`, or None for a zero frame.
    fn frame<'a>(
        &self,
        xs: &'a [f32],
        ps: &'a [f32],
        n: usize,
        c: usize,
        s: usize,
    ) -> Option<&'a [f32]> {
        let hw = self.h * self.w;
        if s < self.zeros {
            None
        } else if s < self.zeros + self.have {
            let f = s - self.zeros;
            Some(&ps[((n * self.ci + c) * self.have + f) * hw..][..hw])
        } else {
            let f = s - self.zeros - self.have;
            Some(&xs[((n * self.ci + c) * self.t + f) * hw..][..hw])
        }
    }

    fn convolve(
        &self,
        xs: &[f32],
        ps: &[f32],
        wt: &[f32],
        bias: &[f32],
        b: usize,
        co: usize,
    ) -> Vec<f32> {
        let g = *self;
        let taps = g.kt * g.kh * g.kw;
        let k = g.ci * taps;
        let plane = g.oh * g.ow;
        let rows_per_strip = (STRIP_COL_BUDGET / (k * g.ow).max(1)).clamp(1, g.oh);
        let len = b * co * g.t * plane;
        let mut col = COL3.take();
        // SAFETY: every (batch, channel, frame) plane is written below: its
        // strips tile it, each filled with the bias, then accumulated into
        // by a GEMM with k > 0 (a convolution has at least one tap).
        let out = unsafe {
            written_output(len, |out| {
                let dst = SharedMut(out.as_mut_ptr().cast::<f32>());
                for n in 0..b {
                    for i in 0..g.t {
                        for y0 in (0..g.oh).step_by(rows_per_strip) {
                            let y1 = (y0 + rows_per_strip).min(g.oh);
                            let cols = (y1 - y0) * g.ow;
                            col.resize(k * cols, 0.0);
                            col.par_chunks_mut(taps * cols)
                                .enumerate()
                                .for_each(|(c, rows)| {
                                    for d in 0..g.kt {
                                        let src = g.frame(xs, ps, n, c, i + d);
                                        let rows = &mut rows[d * g.kh * g.kw * cols..]
                                            [..g.kh * g.kw * cols];
                                        g.strip_rows(src, rows, y0, y1);
                                    }
                                });
                            let base = (n * co * g.t + i) * plane + y0 * g.ow;
                            let stride = g.t * plane;
                            for (c, &bv) in bias.iter().enumerate() {
                                // SAFETY: row c of this strip lies inside the output.
                                let row = std::slice::from_raw_parts_mut(
                                    dst.0.add(base + c * stride),
                                    cols,
                                );
                                row.fill(bv);
                            }
                            // SAFETY: dst rows are co x cols at row stride
                            // t*plane inside the output; the weights co x k
                            // (row stride k); col k x cols (row stride cols).
                            matmul(
                                co,
                                cols,
                                k,
                                (dst.0.add(base), stride, 1),
                                true,
                                (wt.as_ptr(), k, 1),
                                (col.as_ptr(), cols, 1),
                                1.0,
                                Parallelism::Rayon(threads()),
                            );
                        }
                    }
                }
            })
        };
        if col.len() <= STRIP_COL_BUDGET {
            COL3.set(col);
        }
        out
    }

    /// The kh*kw patch rows (each `(y1 - y0) * ow` long, output rows y0..y1)
    /// of one input frame plane, or zeros for a zero frame.
    fn strip_rows(&self, src: Option<&[f32]>, rows: &mut [f32], y0: usize, y1: usize) {
        let g = *self;
        let Some(src) = src else {
            rows.fill(0.0);
            return;
        };
        let cols = (y1 - y0) * g.ow;
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let dst = &mut rows[(ky * g.kw + kx) * cols..][..cols];
                // Output columns whose input column lies inside the frame.
                let first = g.pad_w.saturating_sub(kx).min(g.ow);
                let last = (g.w + g.pad_w).saturating_sub(kx).min(g.ow).max(first);
                for (oy, dst_row) in (y0..y1).zip(dst.chunks_exact_mut(g.ow)) {
                    let iy = (oy + ky) as isize - g.pad_h as isize;
                    if iy < 0 || iy >= g.h as isize {
                        dst_row.fill(0.0);
                        continue;
                    }
                    let src_row = &src[iy as usize * g.w..][..g.w];
                    dst_row[..first].fill(0.0);
                    dst_row[last..].fill(0.0);
                    let ix0 = first + kx - g.pad_w;
                    dst_row[first..last].copy_from_slice(&src_row[ix0..ix0 + (last - first)]);
                }
            }
        }
    }
}
