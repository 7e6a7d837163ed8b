//! Slightly wrong copies of a model's weights: what a cheating prover runs
//! in the verifier's tests and `fractal bench verify`, for the built-in
//! models whose weights are derived from names and for loaded folders alike.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use fractal_protocol::noise::{fill_gaussian, Stream};
use fractal_protocol::Seed;
use sha2::{Digest, Sha256};

/// How a copy of the weights differs from the pinned ones.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Degradation {
    /// The real weights.
    #[default]
    None,
    /// Every weight multiplied by `1 + relative·N(0,1)`.
    Perturbed(f32),
    /// Every weight rounded to IEEE half precision (and computed in f32).
    RoundedF16,
    /// Every weight rounded to bfloat16 (and computed in f32).
    RoundedBf16,
}

/// The seed of everything drawn for parameter `name` (its full dotted
/// name, component prefix included): SHA-256(`"fractal/tiny-v1/"` || name).
/// The tiny models' weights and every perturbation share it.
pub(crate) fn seed_for(name: &str) -> Seed {
    let d = Sha256::new()
        .chain_update(b"fractal/tiny-v1/")
        .chain_update(name.as_bytes())
        .finalize();
    Seed(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")))
}

impl Degradation {
    /// Changes the values of parameter `name` (its full dotted name).
    pub(crate) fn apply(self, name: &str, values: &mut [f32]) {
        match self {
            Degradation::None => {}
            Degradation::Perturbed(relative) => {
                let mut noise = vec![0f32; values.len()];
                fill_gaussian(
                    seed_for(&format!("perturb/{name}")),
                    Stream::InitialLatents,
                    &mut noise,
                );
                for (v, n) in values.iter_mut().zip(noise) {
                    *v *= 1.0 + relative * n;
                }
            }
            Degradation::RoundedF16 => {
                for v in values {
                    *v = half::f16::from_f32(*v).to_f32();
                }
            }
            Degradation::RoundedBf16 => {
                for v in values {
                    *v = half::bf16::from_f32(*v).to_f32();
                }
            }
        }
    }

    /// `backend`'s tensors (named under `prefix`, e.g. `"unet."`) with this
    /// degradation applied as each is read; `backend` itself when there is none.
    pub(crate) fn wrap(
        self,
        backend: Box<dyn SimpleBackend>,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = match self {
            Degradation::None => backend,
            _ => Box::new(Degraded {
                inner: backend,
                prefix: prefix.to_string(),
                degradation: self,
            }),
        };
        VarBuilder::from_backend(backend, dtype, device.clone())
    }
}

struct Degraded {
    inner: Box<dyn SimpleBackend>,
    prefix: String,
    degradation: Degradation,
}

impl Degraded {
    fn degrade(&self, name: &str, t: Tensor, dtype: DType, dev: &Device) -> Result<Tensor> {
        let dims = t.dims().to_vec();
        let mut values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.degradation
            .apply(&format!("{}{name}", self.prefix), &mut values);
        Tensor::from_vec(values, dims, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }
}

impl SimpleBackend for Degraded {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self
            .inner
            .get(shape, name, init, DType::F32, &Device::Cpu)?;
        self.degrade(name, t, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.inner.get_unchecked(name, DType::F32, &Device::Cpu)?;
        self.degrade(name, t, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}
