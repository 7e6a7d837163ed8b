//! Scaled dot-product attention without materialising the full score
//! matrix (query blocks), and a direct path for few keys.

use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::*;

/// Query rows per task: a 64 x M score block stays in L2 for M up to ~4096.
pub(super) const QUERY_BLOCK: usize = 64;

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
}

/// Heads for [`attend_direct`]: short key sequences (the temporal attention's
/// frames), where GEMM's packing costs more than the product, and head
/// widths in whole lanes of 8. (Narrow heads over a few hundred pixels ran
/// slower this way than through GEMM: 5.5 against 4.7 ms at 256 keys.)
pub(super) fn direct_applies(m: usize, d: usize) -> bool {
    m <= DIRECT_MAX_KEYS && d <= DIRECT_MAX_DIM && d.is_multiple_of(8)
}

/// Most keys the direct path takes (the scores of one row live on the stack).
pub(super) const DIRECT_MAX_KEYS: usize = 32;
/// Head widths the direct path takes (one output row lives on the stack).
pub(super) const DIRECT_MAX_DIM: usize = 128;
/// Elements of the transposed key tile, `d` x `m` rounded up to 8 (16 KB).
pub(super) const DIRECT_TILE: usize = DIRECT_MAX_KEYS * DIRECT_MAX_DIM;

simd_dispatch! {
    /// Attention for `rows` query rows of one head against `m` keys (see
    /// [`direct_applies`]) without GEMM: `q`, `k`, `v` and `out` start at the
    /// first row of the head and step `stride` per row.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_direct(
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
    pub(super) fn exp_columns(scores: &mut [f32], rows: usize, inv: &mut [f32]) {
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
