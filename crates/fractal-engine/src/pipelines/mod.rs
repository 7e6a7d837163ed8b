//! Pipelines: how an architecture's models are called to turn a prompt and
//! a seed into a clip, one folder per architecture, behind the one
//! interface the roles use ([`Pipeline`]).
//!
//! Every architecture runs the same loop: conditioning from the prompt,
//! seeded initial latents (`fractal/noise/v1`), a schedule of denoising
//! steps (each a model output with CFG, then a scheduler update: what an
//! audit recomputes), then the decoder. Deterministic: the only randomness
//! is the seeded initial noise.

use candle_core::{DType, Device, Tensor};
use fractal_protocol::merkle::TraceDigests;
use fractal_protocol::noise::{fill_gaussian, Stream};
use fractal_protocol::Seed;

use crate::schedulers::Scheduler;
use crate::{Degradation, EngineError};

pub mod text_to_video_sd;
pub mod wan;

use fractal_protocol::manifest::{Architecture, ModelManifest};
use text_to_video_sd::TextToVideoSd;
use wan::Wan;

/// What to generate. The prompts are text: each architecture tokenizes
/// them its own way.
#[derive(Clone, Debug)]
pub struct GenerateSpec {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: Seed,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance_scale: f64,
}

/// Reported after the initial noise (`index` 0) and after every step.
pub struct StepEvent<'a> {
    pub index: usize,
    pub total: usize,
    /// The model output the step to `index` was computed from (the guided
    /// noise prediction, or velocity for flow models, `[1, C, F, h, w]`);
    /// `None` for the initial noise.
    pub output: Option<&'a Tensor>,
    /// `[1, C, F, h, w]`, f32.
    pub latents: &'a Tensor,
}

impl StepEvent<'_> {
    /// Adds this event's trace leaves (the step's model output, then the
    /// latent after it) to `trace`, as every role commits them.
    fn commit_to(&self, trace: &mut TraceDigests) -> Result<(), EngineError> {
        if let Some(output) = self.output {
            trace.push(&values(output)?);
        }
        trace.push(&values(self.latents)?);
        Ok(())
    }
}

/// A tensor's f32 values in logical order.
pub fn values(t: &Tensor) -> Result<Vec<f32>, EngineError> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// One denoising step: what the model predicted and where the scheduler
/// went from it. Traces commit both (`fractal_protocol::merkle`).
pub struct Step {
    /// The model output fed to the scheduler (after CFG).
    pub output: Tensor,
    /// The latents after the step.
    pub latents: Tensor,
}

/// A generated clip: RGB frames in `[0, 1]` and the final latents.
pub struct Generated {
    /// `[F, 3, H, W]`, f32 in `[0, 1]`.
    pub frames: Tensor,
    pub final_latents: Tensor,
}

impl Generated {
    /// Frames as RGB8, `frames x height x width x 3`, rounded to nearest.
    pub fn rgb8(&self) -> Result<Vec<u8>, EngineError> {
        crate::io::video::rgb8(&self.frames)
    }
}

/// Largest absolute element difference of two same-shaped tensors (parity
/// checks, and a verifier comparing a recomputed step).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, EngineError> {
    if a.dims() != b.dims() {
        return Err(EngineError::BadInput(format!(
            "shapes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// How a model's weights are read: the dtype its networks compute in (the
/// manifest's, see [`crate::precision`]) and, for the cheating provers of
/// the tests and `fractal bench verify`, how they differ from the real ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadOptions {
    pub dtype: DType,
    pub degradation: Degradation,
}

impl Default for LoadOptions {
    /// The real weights, in f32.
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            degradation: Degradation::None,
        }
    }
}

impl LoadOptions {
    /// The real weights in `dtype`.
    pub fn in_dtype(dtype: DType) -> Self {
        LoadOptions {
            dtype,
            ..Self::default()
        }
    }
}

/// The loaded models of one architecture: with a manifest they make its
/// [`Pipeline`].
pub trait Components {
    /// The manifest architecture these models are, by name.
    fn architecture_name(&self) -> &'static str;
    /// The dtype the networks compute in.
    fn dtype(&self) -> DType;
    /// The pipeline the manifest runs them as; the manifest must be of
    /// this architecture (checked by [`crate::PinnedModel::from_parts`]).
    fn into_pipeline(self, manifest: &ModelManifest) -> Result<Pipeline, EngineError>;
}

impl Components for text_to_video_sd::Model {
    fn architecture_name(&self) -> &'static str {
        Architecture::TextToVideoSd.name()
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn into_pipeline(self, manifest: &ModelManifest) -> Result<Pipeline, EngineError> {
        Ok(TextToVideoSd::new(self, manifest.scheduler.clone()).into())
    }
}

impl Components for wan::Model {
    fn architecture_name(&self) -> &'static str {
        "wan"
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn into_pipeline(self, manifest: &ModelManifest) -> Result<Pipeline, EngineError> {
        let Architecture::Wan(spec) = manifest.architecture else {
            return Err(EngineError::BadInput(format!(
                "manifest {} is not for Wan",
                manifest.name
            )));
        };
        Ok(Wan::new(self, manifest.scheduler.clone(), spec)?.into())
    }
}

/// The interface every role uses, whatever the architecture: one variant
/// per architecture, chosen from `manifest.architecture` (boxed: the
/// pipelines' sizes differ and one is made per model).
pub enum Pipeline {
    TextToVideoSd(Box<TextToVideoSd>),
    Wan(Box<Wan>),
}

impl From<TextToVideoSd> for Pipeline {
    fn from(p: TextToVideoSd) -> Self {
        Pipeline::TextToVideoSd(Box::new(p))
    }
}

impl From<Wan> for Pipeline {
    fn from(p: Wan) -> Self {
        Pipeline::Wan(Box::new(p))
    }
}

/// Calls the same method on whichever pipeline this is.
macro_rules! each_pipeline {
    ($self:expr, $p:ident => $call:expr) => {
        match $self {
            Pipeline::TextToVideoSd($p) => $call,
            Pipeline::Wan($p) => $call,
        }
    };
}

impl Pipeline {
    pub fn device(&self) -> &Device {
        each_pipeline!(self, p => &p.model.device)
    }

    /// The dtype the networks compute in (latents and traces stay f32).
    pub fn dtype(&self) -> DType {
        each_pipeline!(self, p => p.model.dtype)
    }

    /// Latent shape `[1, C, F, h, w]` for a request, or why it is invalid.
    pub fn latent_shape(
        &self,
        frames: usize,
        height: usize,
        width: usize,
    ) -> Result<(usize, usize, usize, usize, usize), EngineError> {
        each_pipeline!(self, p => p.latent_shape(frames, height, width))
    }

    /// The conditioning the denoiser sees: `[uncond; cond]` with CFG, else
    /// `cond`.
    pub fn context(&self, spec: &GenerateSpec) -> Result<Tensor, EngineError> {
        each_pipeline!(self, p => p.context(spec))
    }

    /// The seeded initial latents x_T.
    pub fn initial_latents(&self, spec: &GenerateSpec) -> Result<Tensor, EngineError> {
        let shape = self.latent_shape(spec.frames, spec.height, spec.width)?;
        let n = shape.0 * shape.1 * shape.2 * shape.3 * shape.4;
        let mut v = vec![0f32; n];
        fill_gaussian(spec.seed, Stream::InitialLatents, &mut v);
        Ok(Tensor::from_vec(v, shape, self.device())?)
    }

    /// The schedule for `steps` steps, fresh (multistep schedulers keep
    /// their history in it).
    pub fn scheduler_for(&self, steps: usize) -> Result<Scheduler, EngineError> {
        each_pipeline!(self, p => p.scheduler_for(steps))
    }

    /// The model output at step `index` with CFG `guidance` over `context`:
    /// the costly half of a step, and what a verifier recomputes to audit one.
    pub fn model_output(
        &self,
        scheduler: &Scheduler,
        index: usize,
        latents: &Tensor,
        context: &Tensor,
        guidance: f64,
    ) -> Result<Tensor, EngineError> {
        each_pipeline!(self, p => p.model_output(scheduler, index, latents, context, guidance))
    }

    /// One denoising step (`index` into the schedule): model output, then
    /// the scheduler.
    pub fn denoise_step(
        &self,
        scheduler: &mut Scheduler,
        index: usize,
        latents: &Tensor,
        context: &Tensor,
        guidance: f64,
    ) -> Result<Step, EngineError> {
        let output = self.model_output(scheduler, index, latents, context, guidance)?;
        let latents = scheduler.step(&output, index, latents)?;
        Ok(Step { output, latents })
    }

    /// Decodes `[1, C, F, h, w]` latents to `[F, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        each_pipeline!(self, p => p.decode(latents))
    }

    /// Decodes one frame (`[1, 3, H, W]` in `[0, 1]`), as a verifier does to
    /// compare with the returned video.
    pub fn decode_frame(&self, latents: &Tensor, frame: usize) -> Result<Tensor, EngineError> {
        each_pipeline!(self, p => p.decode_frame(latents, frame))
    }

    /// Runs the whole pipeline, calling `on_step` with every latent of the trace.
    pub fn generate(
        &self,
        spec: &GenerateSpec,
        on_step: &mut dyn FnMut(StepEvent<'_>),
    ) -> Result<Generated, EngineError> {
        self.generate_from(spec, &self.context(spec)?, on_step)
    }

    /// [`Pipeline::generate`] from a conditioning the caller computed (the
    /// parity tests encode token ids directly).
    pub fn generate_from(
        &self,
        spec: &GenerateSpec,
        context: &Tensor,
        on_step: &mut dyn FnMut(StepEvent<'_>),
    ) -> Result<Generated, EngineError> {
        self.run(spec, context, &mut |e| {
            on_step(e);
            Ok(())
        })
    }

    /// Runs the whole pipeline and commits its trace as provers do (every
    /// step's model output and latent, see `fractal_protocol::merkle`);
    /// `on_step` sees every event too.
    pub fn generate_traced(
        &self,
        spec: &GenerateSpec,
        on_step: &mut dyn FnMut(&StepEvent<'_>),
    ) -> Result<(Generated, TraceDigests), EngineError> {
        let mut trace = TraceDigests::new();
        let generated = self.run(spec, &self.context(spec)?, &mut |e| {
            e.commit_to(&mut trace)?;
            on_step(&e);
            Ok(())
        })?;
        Ok((generated, trace))
    }

    fn run(
        &self,
        spec: &GenerateSpec,
        context: &Tensor,
        on_step: &mut dyn FnMut(StepEvent<'_>) -> Result<(), EngineError>,
    ) -> Result<Generated, EngineError> {
        let mut scheduler = self.scheduler_for(spec.steps)?;
        let mut latents = self.initial_latents(spec)?;
        let total = spec.steps;
        on_step(StepEvent {
            index: 0,
            total,
            output: None,
            latents: &latents,
        })?;
        for i in 0..spec.steps {
            let step =
                self.denoise_step(&mut scheduler, i, &latents, context, spec.guidance_scale)?;
            latents = step.latents;
            on_step(StepEvent {
                index: i + 1,
                total,
                output: Some(&step.output),
                latents: &latents,
            })?;
        }
        let frames = self.decode(&latents)?;
        Ok(Generated {
            frames,
            final_latents: latents,
        })
    }
}

/// Opens `m`'s limits for an unpinned folder: every `i·s x j·s` size for
/// `i, j` in `1..=16` (256x256 by default where it is one), 50 steps by
/// default and up to 1000.
pub(crate) fn open_limits(m: &mut ModelManifest, s: u32) {
    m.limits.sizes = size_grid(s);
    let preferred = fractal_protocol::manifest::Size {
        width: 256,
        height: 256,
    };
    m.defaults.size = if m.limits.sizes.contains(&preferred) {
        preferred
    } else {
        m.limits.sizes[0]
    };
    m.defaults.steps = 50;
    m.limits.max_steps = 1000;
}

/// Every `i·s x j·s` for `i, j` in `1..=16`.
fn size_grid(s: u32) -> Vec<fractal_protocol::manifest::Size> {
    (1..=16)
        .flat_map(|i| {
            (1..=16).map(move |j| fractal_protocol::manifest::Size {
                width: i * s,
                height: j * s,
            })
        })
        .collect()
}
