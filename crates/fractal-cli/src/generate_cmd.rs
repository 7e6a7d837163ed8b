//! `fractal generate`: one clip on this machine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use fractal_engine::io::video::{self, Frames};
use fractal_engine::PinnedModel;
use fractal_protocol::manifest::{DType, ModelManifest, SchedulerKind, Size};
use fractal_protocol::wire::{GenerateRequest, OutputFormat};
use fractal_protocol::{JobId, Seed};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct GenerateArgs {
    /// What to show.
    #[arg(long)]
    prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Same seed, same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A diffusers folder: TextToVideoSD (ModelScope / Zeroscope layout) or
    /// WanPipeline (Wan 2.1 layout, sharded weights included).
    #[arg(long, conflicts_with = "tiny")]
    model: Option<PathBuf>,
    /// Check the folder's files against this manifest before loading.
    #[arg(long, requires = "model")]
    manifest: Option<PathBuf>,
    /// Use a built-in model: tiny-v1 (untrained; the default when no
    /// --model is given), tiny-wide-v1, ms-1.7b-shape, tiny-wan-v1,
    /// wan-1.3b-shape, or world-v1 (trained on the toy world).
    #[arg(long, visible_alias = "builtin", num_args = 0..=1, default_missing_value = fractal_engine::builtin::DEFAULT_NAME)]
    tiny: Option<String>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    frames: Option<u32>,
    /// WIDTHxHEIGHT, e.g. 64x64.
    #[arg(long)]
    size: Option<String>,
    /// Classifier-free guidance scale (1 disables guidance).
    #[arg(long)]
    guidance: Option<f64>,
    /// Override the model's scheduler, within its family: ddim or dpm-solver
    /// (DPM-Solver++ 2M) for TextToVideoSD, flow-euler or unipc for Wan.
    /// Changes the manifest id; not allowed with --manifest.
    #[arg(long)]
    scheduler: Option<String>,
    /// What the networks compute in: f32, f16 or bf16 (default: the
    /// model's manifest's, f32 for a folder). Changes the manifest id; not
    /// allowed with --manifest.
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    dtype: Option<String>,
    #[arg(long)]
    fps: Option<u32>,
    /// Where to run: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output file: .mp4, .gif or .png (the middle frame).
    #[arg(short, long)]
    output: PathBuf,
    /// Also write an animated GIF here.
    #[arg(long)]
    gif: Option<PathBuf>,
    /// Also write a PNG thumbnail here.
    #[arg(long)]
    thumbnail: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub(crate) fn parse_size(s: &str) -> anyhow::Result<Size> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .context("--size must look like 64x64")?;
    Ok(Size {
        width: w.trim().parse().context("--size width")?,
        height: h.trim().parse().context("--size height")?,
    })
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    if let Some(t) = a.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let scheduler_override = match a.scheduler.as_deref() {
        None => None,
        Some("ddim") => Some(SchedulerKind::Ddim),
        Some("dpm-solver") => Some(SchedulerKind::DpmSolverMultistep),
        Some("flow-euler") => Some(SchedulerKind::FlowMatchEuler),
        Some("unipc") => Some(SchedulerKind::UniPcMultistep),
        Some(other) => bail!("unknown scheduler {other:?} (ddim, dpm-solver, flow-euler, unipc)"),
    };
    if scheduler_override.is_some() && a.manifest.is_some() {
        bail!("--scheduler cannot override a pinned manifest's scheduler");
    }
    let dtype_override: Option<DType> = a
        .dtype
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if dtype_override.is_some() && a.manifest.is_some() {
        bail!("--dtype cannot override a pinned manifest's dtype");
    }
    let ext = a
        .output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let format = match ext.as_deref() {
        Some("mp4") => OutputFormat::Mp4,
        Some("gif") => OutputFormat::Gif,
        Some("png") => OutputFormat::Latents,
        _ => bail!("--output must end in .mp4, .gif or .png"),
    };
    let device = fractal_engine::device_from_name(&a.device)?;
    let load_start = Instant::now();
    let overridden = |mut m: ModelManifest| -> anyhow::Result<ModelManifest> {
        if let Some(kind) = scheduler_override {
            m.scheduler = m.scheduler.with_kind(kind).map_err(anyhow::Error::msg)?;
        }
        if let Some(d) = dtype_override {
            m = m.in_dtype(d);
        }
        Ok(m)
    };
    let pinned = match (&a.model, &a.manifest) {
        (Some(dir), Some(mpath)) => {
            let text = std::fs::read_to_string(mpath)
                .with_context(|| format!("reading {}", mpath.display()))?;
            let m = ModelManifest::parse(&text)?;
            PinnedModel::load(m, Some(dir), &device).context("loading the pinned folder")?
        }
        (Some(dir), None) => PinnedModel::unpinned_folder(
            dir,
            &device,
            scheduler_override,
            dtype_override.unwrap_or(DType::F32),
        )?,
        (None, _) => {
            let name = a
                .tiny
                .as_deref()
                .unwrap_or(fractal_engine::builtin::DEFAULT_NAME);
            let m = overridden(fractal_engine::builtin::manifest_or_err(name)?)?;
            PinnedModel::load(m, None, &device)?
        }
    };
    let manifest_id = pinned.manifest_id;
    let mut req = GenerateRequest::with_defaults(&pinned.manifest, a.prompt.clone(), Seed(a.seed));
    req.job_id = JobId([0; 16]);
    req.negative_prompt = a.negative_prompt.clone();
    if let Some(s) = &a.size {
        req.size = parse_size(s)?;
    }
    req.frames = a.frames.unwrap_or(req.frames);
    req.steps = a.steps.unwrap_or(req.steps);
    req.guidance_scale = a.guidance.unwrap_or(req.guidance_scale);
    req.output = format;
    let fps = a.fps.unwrap_or(pinned.manifest.defaults.fps);
    // Validated exactly as a prover would.
    let spec = pinned.spec(&req)?;
    let pipeline = &pinned.pipeline;

    tracing::info!(manifest = %manifest_id, load_ms = load_start.elapsed().as_millis() as u64, "model ready");
    let bar = ProgressBar::new(spec.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising [{bar:30}] {pos}/{len} steps  {elapsed} (eta {eta})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let start = Instant::now();
    let (generated, trace) =
        pipeline.generate_traced(&spec, &mut |e| bar.set_position(e.index as u64))?;
    bar.finish_and_clear();
    let denoise = start.elapsed();
    let rgb = generated.rgb8()?;
    let frames = Frames {
        rgb: &rgb,
        width: spec.width,
        height: spec.height,
        count: spec.frames,
        fps,
    };
    let bytes = match format {
        OutputFormat::Mp4 => video::encode_mp4(frames)?,
        OutputFormat::Gif => video::encode_gif(frames)?,
        OutputFormat::Latents => video::thumbnail_png(frames)?,
    };
    write(&a.output, &bytes)?;
    if let Some(p) = &a.gif {
        write(p, &video::encode_gif(frames)?)?;
    }
    if let Some(p) = &a.thumbnail {
        write(p, &video::thumbnail_png(frames)?)?;
    }
    let root = trace.tree()?.root();
    println!(
        "wrote {} ({} frames, {}x{}, {} steps, seed {}) in {:.2}s",
        a.output.display(),
        spec.frames,
        spec.width,
        spec.height,
        spec.steps,
        spec.seed,
        denoise.as_secs_f64()
    );
    println!("manifest {manifest_id} ({})", pinned.manifest.dtype.name());
    println!("trace root {root}");
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Write then rename, so a crash never leaves a half-written video behind.
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
