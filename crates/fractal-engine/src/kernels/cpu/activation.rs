//! Activations over whole tensors, where candle's are one pass on one
//! thread around libm.

use std::mem::MaybeUninit;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::common::{tensor, with_slice, written_output};
use super::elementwise::gelu_tanh_f32;

/// Elements per parallel chunk: large enough that a chunk outweighs its
/// scheduling, small enough to split a transformer's hidden state.
const CHUNK: usize = 16 * 1024;

/// `GELU(approximate="tanh")` of every element (Wan's feed-forward).
pub(crate) fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let out = with_slice(x, |xs| {
        // SAFETY: the chunks tile the output and each is written whole.
        unsafe {
            written_output(xs.len(), |out| {
                out.par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK))
                    .for_each(|(o, x)| gelu_tanh_chunk(o, x));
            })
        }
    })?;
    tensor(out, x.dims())
}

simd_dispatch! {
    fn gelu_tanh_chunk(out: &mut [MaybeUninit<f32>], x: &[f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            o.write(gelu_tanh_f32(x));
        }
    }
}
