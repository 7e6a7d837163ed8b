//! The model a node serves: a manifest with its loaded pipeline and
//! tokenizer, and the request → spec → output conversions every role
//! (prover, verifier, `fractal generate`) must do identically.

use std::path::Path;

use candle_core::{Device, Tensor};
use fractal_protocol::manifest::{self, Architecture, ModelManifest, SchedulerKind, Weights};
use fractal_protocol::wire::{GenerateRequest, OutputFormat};
use fractal_protocol::ManifestId;

use crate::builtin::{self, tiny_wan::WanVariant};
use crate::io::video::{self, rgb8, Frames};
use crate::pipelines::{text_to_video_sd, wan, Components, LoadOptions};
use crate::{io, precision, Degradation, EngineError, GenerateSpec, Pipeline, TinyVariant};

pub struct PinnedModel {
    pub manifest: ModelManifest,
    pub manifest_id: ManifestId,
    pub pipeline: Pipeline,
}

impl PinnedModel {
    /// Loads what `manifest` pins: a built-in model by name, or a diffusers
    /// folder (`folder`) whose weight files must match the manifest's hashes;
    /// without a folder, the one the binary carries for it (`world-v1`).
    /// The networks compute in the manifest's dtype; a device that cannot
    /// is refused ([`precision::check`]).
    pub fn load(
        manifest: ModelManifest,
        folder: Option<&Path>,
        device: &Device,
    ) -> Result<Self, EngineError> {
        manifest
            .validate()
            .map_err(|e| EngineError::BadInput(e.to_string()))?;
        precision::check(&manifest.name, manifest.dtype, device)?;
        let dtype = precision::compute_dtype(manifest.dtype);
        let dir = match (&manifest.weights, folder) {
            (Weights::Builtin(_), _) => {
                return Self::load_builtin(manifest, Degradation::None, device)
            }
            (Weights::Files(_), Some(dir)) => dir,
            // Files the binary carries (world-v1), or a clear error.
            (Weights::Files(_), None) => {
                return Self::load_builtin(manifest, Degradation::None, device)
            }
        };
        io::weights::verify_weights(dir, &manifest)?;
        match manifest.architecture {
            Architecture::TextToVideoSd => {
                let model =
                    text_to_video_sd::Model::load_with(dir, LoadOptions::in_dtype(dtype), device)?;
                Self::from_parts(manifest, model)
            }
            Architecture::Wan(_) => {
                let model = wan::Model::load_in(dir, dtype, device)?;
                Self::from_parts(manifest, model)
            }
        }
    }

    /// The built-in model `manifest` pins (by name, or files the binary
    /// carries), its weights changed by
    /// `degradation` (`Degradation::None` for the real ones: what cheating
    /// provers run in the tests and `fractal bench verify`), claiming it.
    pub fn load_builtin(
        manifest: ModelManifest,
        degradation: Degradation,
        device: &Device,
    ) -> Result<Self, EngineError> {
        precision::check(&manifest.name, manifest.dtype, device)?;
        let options = LoadOptions {
            dtype: precision::compute_dtype(manifest.dtype),
            degradation,
        };
        let name = match &manifest.weights {
            Weights::Builtin(name) => name,
            Weights::Files(_) => {
                let dir = builtin::world::folder_for(&manifest)?.ok_or_else(|| {
                    EngineError::BadInput(format!(
                        "manifest {} pins weight files the binary does not carry: give the model folder",
                        manifest.name
                    ))
                })?;
                io::weights::verify_weights(&dir, &manifest)?;
                let model = text_to_video_sd::Model::load_with(&dir, options, device)?;
                return Self::from_parts(manifest, model);
            }
        };
        match manifest.architecture {
            Architecture::TextToVideoSd => {
                let variant = TinyVariant::parse(name).ok_or_else(|| {
                    EngineError::BadInput(format!("no built-in TextToVideoSD model named {name:?}"))
                })?;
                let model = text_to_video_sd::Model::tiny_with(variant, options, device)?;
                Self::from_parts(manifest, model)
            }
            Architecture::Wan(_) => {
                let variant = WanVariant::parse(name).ok_or_else(|| {
                    EngineError::BadInput(format!("no built-in Wan model named {name:?}"))
                })?;
                let model = wan::Model::tiny_with(variant, options, device)?;
                Self::from_parts(manifest, model)
            }
        }
    }

    /// A manifest with models the caller built (tests, benchmarks, and the
    /// cheating provers that claim a manifest they do not run); they must be
    /// of the manifest's architecture and compute in its dtype.
    pub fn from_parts(
        manifest: ModelManifest,
        models: impl Components,
    ) -> Result<Self, EngineError> {
        if models.architecture_name() != manifest.architecture.name() {
            return Err(EngineError::BadInput(format!(
                "manifest {} is for {}, the models are {}",
                manifest.name,
                manifest.architecture.name(),
                models.architecture_name()
            )));
        }
        let dtype = precision::compute_dtype(manifest.dtype);
        if models.dtype() != dtype {
            return Err(EngineError::BadInput(format!(
                "manifest {} computes in {}, the models in {}",
                manifest.name,
                precision::dtype_name(dtype),
                precision::dtype_name(models.dtype())
            )));
        }
        let pipeline = models.into_pipeline(&manifest)?;
        Ok(PinnedModel {
            manifest_id: manifest.id(),
            manifest,
            pipeline,
        })
    }

    /// A diffusers folder of any architecture, not pinned: a manifest made
    /// from its own configs and scheduler (run by `scheduler` instead, if
    /// given) with permissive limits, computing in `dtype`, for running a
    /// folder locally.
    pub fn unpinned_folder(
        dir: &Path,
        device: &Device,
        scheduler: Option<SchedulerKind>,
        dtype: manifest::DType,
    ) -> Result<Self, EngineError> {
        precision::check(&dir.display().to_string(), dtype, device)?;
        let class = io::pipeline_class(dir)?;
        let compute = precision::compute_dtype(dtype);
        let with_scheduler = |m: ModelManifest| -> Result<ModelManifest, EngineError> {
            let mut m = m.in_dtype(dtype);
            if let Some(kind) = scheduler {
                m.scheduler = m
                    .scheduler
                    .with_kind(kind)
                    .map_err(|e| EngineError::BadInput(format!("scheduler: {e}")))?;
            }
            Ok(m)
        };
        match class.as_str() {
            "TextToVideoSDPipeline" => {
                let model = text_to_video_sd::Model::load_with(
                    dir,
                    LoadOptions::in_dtype(compute),
                    device,
                )?;
                let m = with_scheduler(text_to_video_sd::unpinned_manifest(dir, &model)?)?;
                Self::from_parts(m, model)
            }
            "WanPipeline" => {
                let model = wan::Model::load_in(dir, compute, device)?;
                let m = with_scheduler(wan::unpinned_manifest(dir, &model)?)?;
                Self::from_parts(m, model)
            }
            other => Err(EngineError::Config {
                path: dir.join("model_index.json"),
                message: format!(
                    "pipeline {other} is not supported (TextToVideoSDPipeline, WanPipeline)"
                ),
            }),
        }
    }

    /// Validates `req` against the manifest.
    pub fn spec(&self, req: &GenerateRequest) -> Result<GenerateSpec, EngineError> {
        req.validate(&self.manifest, &self.manifest_id)
            .map_err(|e| EngineError::BadInput(e.to_string()))?;
        Ok(GenerateSpec {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            seed: req.seed,
            frames: req.frames as usize,
            height: req.size.height as usize,
            width: req.size.width as usize,
            steps: req.steps as usize,
            guidance_scale: req.guidance_scale,
        })
    }

    /// Encodes decoded frames (`[F, 3, H, W]` in `[0, 1]`) or final latents
    /// as the requested output.
    pub fn render(
        &self,
        format: OutputFormat,
        frames: &Tensor,
        final_latents: &Tensor,
    ) -> Result<Vec<u8>, EngineError> {
        if format == OutputFormat::Latents {
            let v = final_latents.flatten_all()?.to_vec1::<f32>()?;
            return Ok(fractal_protocol::wire::latents_f16_bytes(&v));
        }
        let (count, _, height, width) = frames.dims4()?;
        let rgb = rgb8(frames)?;
        let f = Frames {
            rgb: &rgb,
            width,
            height,
            count,
            fps: self.manifest.defaults.fps,
        };
        let bytes = match format {
            OutputFormat::Mp4 => video::encode_mp4(f),
            OutputFormat::Gif => video::encode_gif(f),
            OutputFormat::Latents => unreachable!("handled above"),
        }
        .map_err(|e| EngineError::BadInput(e.to_string()))?;
        Ok(bytes)
    }
}
