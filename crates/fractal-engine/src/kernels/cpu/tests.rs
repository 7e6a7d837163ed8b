//! Each kernel against candle's own ops, and the SIMD builds against the
//! baseline.

use candle_core::{Device, Tensor};
use candle_nn::Module;

use super::*;

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
fn temporal_reference(q: &Tensor, k: &Tensor, v: &Tensor, frames: usize, heads: usize) -> Tensor {
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
            let g = group_norm_frames(&y, 2, 4, 1e-5, &randn(&[8], 3), &randn(&[8], 4)).unwrap();
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

/// The Wan VAE's channel RMS norm (+ SiLU) against candle's ops, over a
/// pixel count that is not a whole number of blocks, and the same bits on
/// one thread and two.
#[test]
fn channel_rms_norm_matches_candle_and_ignores_thread_count() {
    for (shape, silu_after) in [
        (vec![1, 5, 3, 17, 19], true),
        (vec![2, 12, 1, 40, 30], false),
    ] {
        let x = randn(&shape, 11);
        let c = shape[1];
        let weight: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.1).collect();
        let norm = x
            .sqr()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .maximum(1e-12)
            .unwrap();
        let mut wshape = vec![1; shape.len()];
        wshape[1] = c;
        let w = Tensor::from_vec(weight.clone(), wshape, &Device::Cpu).unwrap();
        let mut want = x.broadcast_div(&norm).unwrap().broadcast_mul(&w).unwrap();
        if silu_after {
            want = candle_nn::ops::silu(&want).unwrap();
        }
        let ours = channel_rms_norm(&x, &weight, silu_after).unwrap();
        assert!(max_diff(&ours, &want) < 1e-5, "{shape:?}");
        let on = |n: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
                .install(|| channel_rms_norm(&x, &weight, silu_after).unwrap())
        };
        assert_eq!(max_diff(&on(1), &on(2)), 0.0, "{shape:?}");
    }
}

/// The causal 3D convolution against candle's 2D convolutions summed over
/// the time taps, with no past, part of one and all of it, a 1x1x1 kernel,
/// a frame done in strips of rows, and the same bits on one thread and two.
#[test]
fn causal_conv3d_matches_summed_2d_convolutions() {
    let reference =
        |x: &Tensor, past: Option<&Tensor>, w: &Tensor, b: &Tensor, pad: (usize, usize)| {
            let (n, c, t, h, wd) = x.dims5().unwrap();
            let kt = w.dim(2).unwrap();
            let mut parts = Vec::new();
            let have = past.map_or(0, |p| p.dim(2).unwrap().min(kt - 1));
            if have < kt - 1 {
                parts.push(
                    Tensor::zeros(
                        (n, c, kt - 1 - have, h, wd),
                        candle_core::DType::F32,
                        &Device::Cpu,
                    )
                    .unwrap(),
                );
            }
            if let Some(p) = past.filter(|_| have > 0) {
                parts.push(p.narrow(2, p.dim(2).unwrap() - have, have).unwrap());
            }
            parts.push(x.clone());
            let seq = Tensor::cat(&parts, 2).unwrap();
            let frames = (0..t)
                .map(|i| {
                    let mut acc: Option<Tensor> = None;
                    for d in 0..kt {
                        let frame = seq
                            .narrow(2, i + d, 1)
                            .unwrap()
                            .squeeze(2)
                            .unwrap()
                            .contiguous()
                            .unwrap();
                        let tap = w
                            .narrow(2, d, 1)
                            .unwrap()
                            .squeeze(2)
                            .unwrap()
                            .contiguous()
                            .unwrap();
                        let y = frame.conv2d(&tap, pad.0, 1, 1, 1).unwrap();
                        acc = Some(match acc {
                            Some(a) => (a + y).unwrap(),
                            None => y,
                        });
                    }
                    acc.unwrap()
                        .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                        .unwrap()
                })
                .collect::<Vec<_>>();
            Tensor::stack(&frames, 2).unwrap()
        };
    // (x shape, past frames, co, kernel, padding)
    for (shape, past_frames, co, (kt, k), pad) in [
        ([1, 3, 2, 9, 7], None, 4, (3, 3), 1),
        ([2, 4, 3, 6, 5], Some(1), 5, (3, 3), 1),
        ([1, 4, 1, 6, 5], Some(4), 3, (3, 3), 1),
        ([1, 6, 2, 5, 4], Some(2), 7, (1, 1), 0),
        ([1, 5, 2, 5, 4], None, 2, (3, 1), 0),
        // k * ow * oh = 864 * 96 * 128 patch elements: two strips.
        ([1, 32, 1, 128, 96], Some(2), 8, (3, 3), 1),
    ] {
        let x = randn(&shape, 3);
        let past = past_frames.map(|p| randn(&[shape[0], shape[1], p, shape[3], shape[4]], 5));
        let w = (randn(&[co, shape[1], kt, k, k], 7) * 0.2).unwrap();
        let b = randn(&[co], 9);
        let want = reference(&x, past.as_ref(), &w, &b, (pad, pad));
        let on = |n: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
                .install(|| causal_conv3d(&x, past.as_ref(), &w, &b, (pad, pad)).unwrap())
        };
        let ours = on(2);
        assert_eq!(ours.dims(), want.dims(), "{shape:?}");
        assert!(
            max_diff(&ours, &want) < 1e-4,
            "{shape:?}: {}",
            max_diff(&ours, &want)
        );
        assert_eq!(max_diff(&on(1), &ours), 0.0, "{shape:?}");
    }
}

#[test]
fn gelu_tanh_matches_candle_on_every_thread_count() {
    // Three parallel chunks and a ragged one, over [-12, 12).
    let rows = (3 * 16 * 1024 + 77) / 7;
    let n = rows * 7;
    let v: Vec<f32> = (0..n).map(|i| (i as f32 / n as f32 - 0.5) * 24.0).collect();
    let x = Tensor::from_vec(v, (rows, 7), &Device::Cpu).unwrap();
    let reference = x.gelu().unwrap();
    let ours = gelu_tanh(&x).unwrap();
    assert_eq!(ours.dims(), x.dims());
    let err = crate::pipelines::max_abs_diff(&ours, &reference).unwrap();
    assert!(err < 2e-6, "max abs error {err}");
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let single = one.install(|| gelu_tanh(&x).unwrap());
    assert_eq!(
        single.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        ours.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}
