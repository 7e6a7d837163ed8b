//! Matrix products: skinny GEMMs for few rows, and `linear` with bias
//! and residual fused.

use candle_core::{Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::*;

// ---------------------------------------------------------------- Skinny products

/// Rows (pixels, tokens) up to which a product with a weight matrix streams
/// the weights once instead of packing them for GEMM: the deep UNet levels at
/// small sizes, where weights of up to 59 MB meet a handful of pixels.
/// Measured on 2 threads: 8 rows run 1.6-2x faster than GEMM, 16 break even.
pub(super) const SKINNY_MAX_ROWS: usize = 12;
/// Weight rows per task.
pub(super) const SKINNY_BLOCK: usize = 16;

/// `out[i * out_a + j * out_b] (+)= a[i] . b[j]` for `a` `[ma, k]` (row-major,
/// contiguous: the weights) and up to [`SKINNY_MAX_ROWS`] rows `b[j]` of `k`
/// elements. Each row of `a` is read once, tasks split the rows of `a`, and
/// every element is one dot product in fixed lanes, whatever the threads.
/// The index map must be one-to-one (each task writes only its rows of `a`).
pub(super) fn skinny_gemm(
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
    pub(super) fn dot_rows(a: &[f32], rows: &[&[f32]]) -> [f32; 4] {
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
    pub(super) fn add_bias_rows(out: &mut [MaybeUninit<f32>], residual: &[f32], bias: Option<&[f32]>) {
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
