//! Scalar math the kernels vectorise: `exp`, SiLU, `erf`, GELU (erf and tanh forms).

pub(super) const LOG2E: f32 = std::f32::consts::LOG2_E;

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
pub(super) fn erf(x: f32) -> f32 {
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
pub(super) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU with the tanh approximation, as `GELU(approximate="tanh")`:
/// `0.5·x·(1 + tanh(u))`, `u = √(2/π)·(x + 0.044715·x³)`, with
/// `tanh(u) = 1 − 2/(e^{2u} + 1)` on the vectorised `exp` (absolute error
/// below 1e-6; libm's tanh does not vectorise).
#[inline(always)]
pub(super) fn gelu_tanh_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + tanh)
}
