//! The models' linear, convolution, normalisation and ResNet layers, with
//! diffusers' parameter names. On the CPU in f32 they run the fused kernels of
//! [`crate::kernels::cpu`]; elsewhere (CUDA, other dtypes) candle's ops.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{self as nn, VarBuilder};

use crate::kernels::cpu;
use crate::profile;

/// Softmax over the last axis, accumulated in f32 whatever the dtype (as
/// diffusers and transformers upcast half-precision scores), given back in
/// the input's dtype.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return nn::ops::softmax_last_dim(x);
    }
    nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

/// `torch.nn.GroupNorm`, optionally followed by SiLU (fused on the CPU).
#[derive(Debug)]
pub(crate) struct GroupNorm {
    inner: nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self {
            inner: nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
            weight,
            bias,
            groups,
            eps,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, false)
    }

    pub(crate) fn groups(&self) -> usize {
        self.groups
    }

    pub(crate) fn eps(&self) -> f64 {
        self.eps
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub(crate) fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, true)
    }

    fn apply(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let _s = profile::stage(if silu {
            "group_norm+silu"
        } else {
            "group_norm"
        });
        if cpu::applies(xs) {
            return cpu::group_norm(xs, self.groups, self.eps, &self.weight, &self.bias, silu);
        }
        let ys = self.inner.forward(xs)?;
        if silu {
            nn::ops::silu(&ys)
        } else {
            Ok(ys)
        }
    }
}

/// `torch.nn.Linear`; on the CPU one GEMM over all rows with the bias (and
/// an optional residual) folded into its output.
#[derive(Debug)]
pub(crate) struct Linear {
    inner: nn::Linear,
}

impl Linear {
    pub(crate) fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            inner: nn::linear(cin, cout, vb)?,
        })
    }

    /// A linear layer over given weights (`[cout, cin]`), e.g. a convolution
    /// whose kernel is its stride, reshaped.
    pub(crate) fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: nn::Linear::new(weight, bias),
        }
    }

    pub(crate) fn no_bias(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            inner: nn::linear_no_bias(cin, cout, vb)?,
        })
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    pub(crate) fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// `forward(xs) + residual`.
    pub(crate) fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let _s = profile::stage("linear");
        if cpu::applies(xs) {
            return cpu::linear(xs, self.inner.weight(), self.inner.bias(), Some(residual));
        }
        self.forward(xs)? + residual
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _s = profile::stage("linear");
        if cpu::applies(xs) {
            return cpu::linear(xs, self.inner.weight(), self.inner.bias(), None);
        }
        // candle 0.11's batched matmul misreads transposed inputs with more
        // than one batch (seen on the CPU); a contiguous copy avoids it.
        self.inner.forward(&xs.contiguous()?)
    }
}

/// `torch.nn.Conv2d` (groups 1, dilation 1), im2col + GEMM on the CPU.
#[derive(Debug)]
pub(crate) struct Conv2d {
    inner: nn::Conv2d,
}

impl Conv2d {
    pub(crate) fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = nn::Conv2dConfig {
            stride,
            padding,
            ..Default::default()
        };
        Ok(Self {
            inner: nn::conv2d(cin, cout, kernel, cfg, vb)?,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _s = profile::stage("conv2d");
        let cfg = self.inner.config();
        let pad = (cfg.padding, cfg.padding);
        if cpu::applies(xs) {
            return cpu::conv2d(xs, self.inner.weight(), self.inner.bias(), cfg.stride, pad);
        }
        if cpu::is_half(xs) {
            return cpu::conv2d_half(xs, self.inner.weight(), self.inner.bias(), cfg.stride, pad);
        }
        self.inner.forward(xs)
    }
}

/// diffusers `ResnetBlock2D` (SiLU; the time embedding, where the block has
/// one, added after conv1).
#[derive(Debug)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock {
    /// `temb`: the time embedding's width, None for blocks without one (VAE).
    pub(crate) fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: temb
                .map(|t| Linear::new(vb.pp("time_emb_proj"), t, cout))
                .transpose()?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, cout, eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    /// `temb_silu`: the time embedding `[N, temb]`, already through SiLU
    /// (None for blocks without one).
    pub(crate) fn forward(&self, xs: &Tensor, temb_silu: Option<&Tensor>) -> Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let hs = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let hs = match (&self.time_emb_proj, temb_silu) {
            (Some(proj), Some(temb)) => {
                let t = proj
                    .forward(temb)?
                    .unsqueeze(D::Minus1)?
                    .unsqueeze(D::Minus1)?;
                profile::time("resnet.add_temb", || hs.broadcast_add(&t))?
            }
            (None, None) => hs,
            _ => candle_core::bail!(
                "resnet: time embedding given to a block without one, or missing"
            ),
        };
        let hs = self.conv2.forward(&self.norm2.forward_silu(&hs)?)?;
        profile::time("resnet.residual", || {
            let out = (shortcut + hs)?;
            if self.output_scale_factor == 1.0 {
                Ok(out)
            } else {
                out / self.output_scale_factor
            }
        })
    }
}
