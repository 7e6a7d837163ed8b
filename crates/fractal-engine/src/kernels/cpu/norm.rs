//! GroupNorm and the Wan VAE's channel RMS norm (each optionally fused
//! with SiLU) over `[n, c, spatial..]`.

use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::*;

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

/// Pixels normalised together: one block's squared sums stay in L1 while
/// the channels stream past.
const RMS_BLOCK: usize = 512;

/// diffusers' `WanRMS_norm` (+ SiLU when `silu_after`) over `x` of shape
/// `[n, c, spatial...]`: each pixel's channel vector divided by its L2 norm
/// (at least 1e-12, as `F.normalize`), times `weight[c]` (γ·√c). Squares
/// are summed over the channels in order, per pixel, so the result does
/// not depend on the thread count; parallel over blocks of pixels.
pub(crate) fn channel_rms_norm(x: &Tensor, weight: &[f32], silu_after: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || dims[1] != weight.len() {
        candle_core::bail!(
            "channel_rms_norm: shape {dims:?} with {} weights",
            weight.len()
        );
    }
    let (n, c) = (dims[0], dims[1]);
    let spatial: usize = dims[2..].iter().product();
    if n * c * spatial == 0 {
        return Ok(x.clone());
    }
    let blocks = spatial.div_ceil(RMS_BLOCK);
    // SAFETY: each (sample, block) task writes every channel row of its
    // pixel block, and the tasks' blocks tile the output.
    let out = with_slice(x, |xs| unsafe {
        written_output(xs.len(), |out| {
            let out = SharedOut(out.as_mut_ptr());
            (0..n * blocks).into_par_iter().for_each(|task| {
                let (b, blk) = (task / blocks, task % blocks);
                let p0 = blk * RMS_BLOCK;
                let len = RMS_BLOCK.min(spatial - p0);
                let sample = b * c * spatial;
                let mut norm = [0f32; RMS_BLOCK];
                let norm = &mut norm[..len];
                for ch in 0..c {
                    let row = &xs[sample + ch * spatial + p0..][..len];
                    add_squares(norm, row);
                }
                for v in norm.iter_mut() {
                    *v = v.sqrt().max(1e-12);
                }
                for (ch, &w) in weight.iter().enumerate() {
                    let at = sample + ch * spatial + p0;
                    let dst = std::slice::from_raw_parts_mut(out.at(at), len);
                    scale_by_norm(&xs[at..at + len], dst, norm, w, silu_after);
                }
            });
        })
    })?;
    tensor(out, dims)
}

/// The output pointer shared by tasks that write disjoint ranges.
#[derive(Clone, Copy)]
struct SharedOut(*mut MaybeUninit<f32>);
// SAFETY: the tasks of `channel_rms_norm` write disjoint ranges.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// SAFETY: `i` is within the output and no other task writes it.
    unsafe fn at(self, i: usize) -> *mut MaybeUninit<f32> {
        self.0.add(i)
    }
}

simd_dispatch! {
    fn add_squares(acc: &mut [f32], row: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v * v;
        }
    }
}

simd_dispatch! {
    fn scale_by_norm(
        src: &[f32],
        dst: &mut [MaybeUninit<f32>],
        norm: &[f32],
        weight: f32,
        silu_after: bool,
    ) {
        if silu_after {
            for ((d, &s), &n) in dst.iter_mut().zip(src).zip(norm) {
                d.write(silu(s / n * weight));
            }
        } else {
            for ((d, &s), &n) in dst.iter_mut().zip(src).zip(norm) {
                d.write(s / n * weight);
            }
        }
    }
}

simd_dispatch! {
    pub(super) fn normalize(
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
    pub(super) fn sum_f64(xs: &[f32]) -> f64 {
        xs.chunks(1024).map(|b| lanes_sum(b, |v| v) as f64).sum()
    }
}

simd_dispatch! {
    pub(super) fn sum_sq_dev(xs: &[f32], mean: f32) -> f64 {
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
pub(super) fn lanes_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
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
pub(super) fn fold_lanes(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}
