//! The UNet's convolution, normalisation and ResNet layers, with diffusers'
//! parameter names. On the CPU in f32 they run the fused kernels of
//! [`crate::cpu_kernels`]; elsewhere (CUDA, other dtypes) candle's ops.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{self as nn, VarBuilder};

use crate::cpu_kernels;
use crate::profile;

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

    pub(crate) fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, true)
    }

    fn apply(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let _s = profile::stage(if silu {
            "group_norm+silu"
        } else {
            "group_norm"
        });
        if cpu_kernels::applies(xs) {
            return cpu_kernels::group_norm(
                xs,
                self.groups,
                self.eps,
                &self.weight,
                &self.bias,
                silu,
            );
        }
        let ys = self.inner.forward(xs)?;
        if silu {
            nn::ops::silu(&ys)
        } else {
            Ok(ys)
        }
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
        if cpu_kernels::applies(xs) {
            let cfg = self.inner.config();
            return cpu_kernels::conv2d(
                xs,
                self.inner.weight(),
                self.inner.bias(),
                cfg.stride,
                (cfg.padding, cfg.padding),
            );
        }
        self.inner.forward(xs)
    }
}

/// diffusers `ResnetBlock2D` (SiLU, time embedding added after conv1).
#[derive(Debug)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: nn::Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, cin, eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: nn::linear(temb, cout, vb.pp("time_emb_proj"))?,
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

    /// `temb`: the time embedding `[N, temb]`, already through SiLU.
    pub(crate) fn forward(&self, xs: &Tensor, temb_silu: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let hs = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let t = self
            .time_emb_proj
            .forward(temb_silu)?
            .unsqueeze(D::Minus1)?
            .unsqueeze(D::Minus1)?;
        let hs = profile::time("resnet.add_temb", || hs.broadcast_add(&t))?;
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
