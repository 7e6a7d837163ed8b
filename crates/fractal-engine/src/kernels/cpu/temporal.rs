//! Channels-first layers of the temporal blocks (frames as the sequence):
//! GroupNorm per frame, pointwise convs, LayerNorm over channels, GEGLU and
//! temporal attention.

use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::*;

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
pub(super) const POINTWISE_MIN_PIXELS: usize = 64;

simd_dispatch! {
    /// `out = residual + bias[row]` for channel rows of `spatial` elements.
    pub(super) fn add_bias_rows_cf(
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
pub(super) const CF_BLOCK: usize = 64;

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
    pub(super) fn layer_norm_block(
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
    pub(super) fn gated_gelu(out: &mut [MaybeUninit<f32>], a: &[f32], g: &[f32]) {
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
pub(super) const CF_STACK_FRAMES: usize = 32;

#[derive(Clone, Copy)]
pub(super) struct CfHead {
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
    pub(super) fn attend_frames(q: &[f32], k: &[f32], v: &[f32], out: SharedMut, g: CfHead) {
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
