//! `fractal bench quality`: how well a model draws the toy world of
//! `fractal_world`. Each prompt's clip is read back by the world's
//! deterministic analyser (background, shape colour, shape, direction of
//! motion) and scored against the scene the prompt describes, next to
//! chance (an untrained model through the same analyser) and the ceiling
//! (the renderer's own clips). Held-out scenes are combinations of colour,
//! shape and motion the training script never showed.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use fractal_engine::PinnedModel;
use fractal_protocol::manifest::{DType, GenerationDefaults};
use fractal_protocol::wire::GenerateRequest;
use fractal_protocol::Seed;
use fractal_world::{analyse, render, Clip, Scene, Split};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Args)]
pub struct QualityBench {
    /// The built-in model scored.
    #[arg(long, default_value = fractal_engine::builtin::world::WORLD_NAME)]
    model: String,
    /// Score this diffusers folder instead (a training run's output before
    /// it is pinned), at `--model`'s defaults (frames, size, steps,
    /// guidance); its scheduler comes from the folder.
    #[arg(long, value_name = "DIR")]
    model_dir: Option<PathBuf>,
    /// The built-in model that stands for chance (untrained weights).
    #[arg(long, default_value = "tiny-v1")]
    chance: String,
    /// Training-split scenes scored beside every held-out one (evenly
    /// spaced through the list of scenes).
    #[arg(long, default_value_t = 48)]
    trained: usize,
    /// Clips per prompt, from seeds 0, 1, ...
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Denoising steps (the model's default when not given).
    #[arg(long)]
    steps: Option<u32>,
    /// Guidance scale (the model's default when not given).
    #[arg(long)]
    guidance: Option<f64>,
    /// Contact sheet: for the first held-out prompts, the renderer's clip
    /// above the model's, frame by frame.
    #[arg(long, default_value = "quality.png")]
    sheet: PathBuf,
    /// Prompts on the contact sheet.
    #[arg(long, default_value_t = 6)]
    sheet_prompts: usize,
    /// Also write the scores as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Clips whose analysis got each attribute right.
#[derive(Clone, Copy, Default, Serialize)]
struct Tally {
    clips: usize,
    background: usize,
    colour: usize,
    shape: usize,
    motion: usize,
    all: usize,
}

impl Tally {
    fn add(&mut self, scene: &Scene, clip: &Clip) {
        let a = analyse(clip);
        let right = [
            a.background == scene.background,
            a.colour == Some(scene.colour),
            a.shape == Some(scene.shape),
            a.motion == Some(scene.motion),
        ];
        self.clips += 1;
        self.background += right[0] as usize;
        self.colour += right[1] as usize;
        self.shape += right[2] as usize;
        self.motion += right[3] as usize;
        self.all += right.iter().all(|&r| r) as usize;
    }

    fn percent(&self, n: usize) -> f64 {
        100.0 * n as f64 / self.clips.max(1) as f64
    }

    fn row(&self) -> String {
        [
            self.background,
            self.colour,
            self.shape,
            self.motion,
            self.all,
        ]
        .map(|n| format!("{:6.1}", self.percent(n)))
        .join(" ")
    }
}

#[derive(Default, Serialize)]
struct Scores {
    held_out: Tally,
    trained: Tally,
}

impl Scores {
    fn of(&mut self, split: Split) -> &mut Tally {
        match split {
            Split::HeldOut => &mut self.held_out,
            Split::Train => &mut self.trained,
        }
    }
}

#[derive(Serialize)]
struct Report {
    model: String,
    chance_model: String,
    steps: u32,
    guidance_scale: f64,
    seeds: u64,
    model_scores: Scores,
    chance: Scores,
    ceiling: Scores,
    targets_met: bool,
}

/// Held-out scenes, then `trained` evenly spaced training scenes.
fn scenes(trained: usize) -> Vec<(Scene, Split)> {
    let all = Scene::all();
    let held: Vec<Scene> = all
        .iter()
        .copied()
        .filter(|s| s.split() == Split::HeldOut)
        .collect();
    let train: Vec<Scene> = all
        .into_iter()
        .filter(|s| s.split() == Split::Train)
        .collect();
    let stride = (train.len() / trained.max(1)).max(1);
    held.into_iter()
        .map(|s| (s, Split::HeldOut))
        .chain(
            train
                .into_iter()
                .step_by(stride)
                .take(trained)
                .map(|s| (s, Split::Train)),
        )
        .collect()
}

/// A model's clip for `scene`, as the world's clips are laid out.
fn generate(
    model: &PinnedModel,
    defaults: &GenerationDefaults,
    scene: &Scene,
    seed: u64,
    steps: Option<u32>,
    guidance: Option<f64>,
) -> anyhow::Result<Clip> {
    let mut req = GenerateRequest::with_defaults(&model.manifest, scene.caption(), Seed(seed));
    req.size = defaults.size;
    req.frames = defaults.frames;
    req.steps = steps.unwrap_or(defaults.steps);
    req.guidance_scale = guidance.unwrap_or(defaults.guidance_scale);
    let spec = model.spec(&req)?;
    let rgb = model.pipeline.generate(&spec, &mut |_| {})?.rgb8()?;
    let frame = spec.width * spec.height * 3;
    Ok(Clip {
        width: spec.width,
        height: spec.height,
        frames: rgb.chunks_exact(frame).map(<[u8]>::to_vec).collect(),
    })
}

/// Rows of clips, each frame beside the next, 2-pixel gaps, as one PNG.
fn contact_sheet(rows: &[Clip]) -> anyhow::Result<Vec<u8>> {
    const GAP: usize = 2;
    let (w, h) = (rows[0].width, rows[0].height);
    let cols = rows.iter().map(|c| c.frames.len()).max().unwrap_or(0);
    let (sw, sh) = (cols * (w + GAP) + GAP, rows.len() * (h + GAP) + GAP);
    let mut sheet = vec![255u8; sw * sh * 3];
    for (r, clip) in rows.iter().enumerate() {
        for (c, frame) in clip.frames.iter().enumerate() {
            let (x0, y0) = (GAP + c * (w + GAP), GAP + r * (h + GAP));
            for y in 0..h {
                let src = &frame[y * w * 3..(y + 1) * w * 3];
                let at = ((y0 + y) * sw + x0) * 3;
                sheet[at..at + w * 3].copy_from_slice(src);
            }
        }
    }
    Ok(fractal_engine::io::video::encode_png(&sheet, sw, sh)?)
}

pub fn run(b: QualityBench) -> anyhow::Result<()> {
    let load = |name: &str| -> anyhow::Result<PinnedModel> {
        let m = fractal_engine::builtin::manifest_or_err(name)?;
        PinnedModel::load(m, None, &Device::Cpu).with_context(|| format!("loading {name}"))
    };
    // A folder runs at the built-in model's defaults: its own unpinned
    // manifest only knows the architecture's.
    let defaults = fractal_engine::builtin::manifest_or_err(&b.model)?.defaults;
    let model = match &b.model_dir {
        Some(dir) => PinnedModel::unpinned_folder(dir, &Device::Cpu, None, DType::F32)
            .with_context(|| format!("loading {}", dir.display()))?,
        None => load(&b.model)?,
    };
    let name = match &b.model_dir {
        Some(dir) => dir.display().to_string(),
        None => b.model.clone(),
    };
    let chance = load(&b.chance)?;
    let d = &defaults;
    let (frames, size) = (d.frames as usize, d.size.width as usize);
    let steps = b.steps.unwrap_or(d.steps);
    let guidance = b.guidance.unwrap_or(d.guidance_scale);
    let scenes = scenes(b.trained);
    let held = scenes.iter().filter(|(_, s)| *s == Split::HeldOut).count();
    println!(
        "{name}: {held} held-out and {} trained prompts x {} seed(s), {steps} steps, guidance {guidance}",
        scenes.len() - held,
        b.seeds
    );
    let bar = ProgressBar::new(2 * scenes.len() as u64 * b.seeds);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} clips [{bar:30}] {pos}/{len} {elapsed} (eta {eta})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let (mut ours, mut theirs, mut ceiling) =
        (Scores::default(), Scores::default(), Scores::default());
    let mut sheet = Vec::new();
    for (i, (scene, split)) in scenes.iter().enumerate() {
        for seed in 0..b.seeds {
            let reference = render(scene, seed, frames, size);
            let drawn = generate(&model, &defaults, scene, seed, b.steps, b.guidance)?;
            bar.inc(1);
            let noise = generate(&chance, &defaults, scene, seed, b.steps, b.guidance)?;
            bar.inc(1);
            ceiling.of(*split).add(scene, &reference);
            ours.of(*split).add(scene, &drawn);
            theirs.of(*split).add(scene, &noise);
            if seed == 0 && i < b.sheet_prompts {
                sheet.push((scene.caption(), reference, drawn));
            }
        }
    }
    bar.finish_and_clear();
    println!(
        "\n{:<28} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "", "bg", "colour", "shape", "motion", "all"
    );
    for (label, split) in [("held-out", Split::HeldOut), ("trained", Split::Train)] {
        let of = |s: &Scores| match split {
            Split::HeldOut => s.held_out,
            Split::Train => s.trained,
        };
        println!("{label} ({} clips)", of(&ours).clips);
        println!("  {:<26} {}", name, of(&ours).row());
        println!(
            "  {:<26} {}",
            format!("chance ({})", b.chance),
            of(&theirs).row()
        );
        println!("  {:<26} {}", "ceiling (renderer)", of(&ceiling).row());
    }
    let h = &ours.held_out;
    let targets = [
        ("colour", h.percent(h.colour), 95.0),
        ("direction", h.percent(h.motion), 90.0),
        ("shape", h.percent(h.shape), 80.0),
    ];
    let met = targets.iter().all(|(_, got, want)| got >= want);
    for (what, got, want) in targets {
        let verdict = if got >= want { "met" } else { "NOT met" };
        println!("target held-out {what} >= {want}%: {got:.1}% {verdict}");
    }
    let mut rows = Vec::new();
    for (n, (caption, reference, drawn)) in sheet.into_iter().enumerate() {
        println!(
            "sheet rows {}-{}: {caption} (renderer, then {})",
            2 * n + 1,
            2 * n + 2,
            name
        );
        rows.push(reference);
        rows.push(drawn);
    }
    if !rows.is_empty() {
        std::fs::write(&b.sheet, contact_sheet(&rows)?)
            .with_context(|| format!("writing {}", b.sheet.display()))?;
        println!("wrote {}", b.sheet.display());
    }
    if let Some(path) = &b.json {
        let report = Report {
            model: name.clone(),
            chance_model: b.chance.clone(),
            steps,
            guidance_scale: guidance,
            seeds: b.seeds,
            model_scores: ours,
            chance: theirs,
            ceiling,
            targets_met: met,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
