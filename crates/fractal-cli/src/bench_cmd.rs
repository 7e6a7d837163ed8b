//! `fractal bench engine`: our engine against Python diffusers on the same
//! pipeline config, thread count and steps, in one run. Each side runs in its
//! own process so peak RSS (from `wait4`) is its own.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fractal_engine::{GenerateSpec, PinnedModel};
use fractal_protocol::Seed;
use serde::{Deserialize, Serialize};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Time the engine against diffusers (PyTorch CPU) on the same built-in
    /// pipeline (TextToVideoSD or Wan), exported as a diffusers folder.
    Engine(EngineBench),
    /// One side of the engine benchmark (run by `bench engine`).
    #[command(hide = true)]
    EngineWorker(Workload),
    /// The grid under faults: kill -9 and restart every role, faulty links;
    /// nothing accepted may be lost or duplicated.
    Chaos(crate::bench_chaos::ChaosBench),
    /// The gateway under concurrent apps: throughput, latency, memory, back-pressure.
    Load(crate::bench_load::LoadBench),
    /// Routing policies on a simulated 256-prover grid, against an oracle.
    Routing(crate::bench_routing::RoutingBench),
    /// How well a model draws the toy world: per-attribute accuracy on
    /// held-out and trained prompts next to chance and the renderer.
    Quality(crate::bench_quality::QualityBench),
    /// Spot-check cost, detection rate per cheat, honest false positives.
    #[cfg(feature = "cheats")]
    Verify(crate::bench_verify::VerifyBench),
}

#[derive(Args, Clone, Serialize)]
pub struct Workload {
    /// A diffusers folder of either architecture (the benchmark exports a
    /// built-in model into one).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "a red fox running in the snow")]
    prompt: String,
    #[arg(long, default_value_t = 8)]
    frames: usize,
    #[arg(long, default_value_t = 64)]
    height: usize,
    #[arg(long, default_value_t = 64)]
    width: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 9.0)]
    guidance: f64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// cpu or cuda (both sides run there).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// What both sides compute in: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
}

#[derive(Args)]
pub struct EngineBench {
    /// Built-in model to benchmark (exported to a temporary diffusers folder).
    #[arg(long, default_value = "tiny-v1")]
    variant: String,
    #[arg(long, default_value_t = 8)]
    frames: usize,
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// cpu, or cuda for both engines on the first GPU (needs a `--features
    /// cuda` build and a CUDA PyTorch).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// What both engines compute in: f32, f16 or bf16 (diffusers loads the
    /// folder with that `torch_dtype`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
    /// Python with torch + diffusers (tools/parity/make_fixtures.sh creates it).
    #[arg(long, default_value = "tools/parity/.venv/bin/python")]
    python: PathBuf,
}

#[derive(Serialize, Deserialize, Debug)]
struct Timing {
    load_s: f64,
    runs_s: Vec<f64>,
}

struct Measured {
    timing: Timing,
    peak_rss_kib: i64,
}

/// Runs a child to completion and returns its stdout and peak RSS.
fn run_measured(mut cmd: Command) -> anyhow::Result<(String, i64)> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting benchmark worker")?;
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).map(|_| s)
    });
    let mut status = 0;
    // SAFETY: plain FFI; `usage` is a valid, zeroed rusage for the kernel to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let out = reader.join().expect("reader thread")?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("benchmark worker failed (status {status})");
    }
    Ok((out, usage.ru_maxrss))
}

fn worker(w: Workload) -> anyhow::Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", w.threads.to_string());
    let t = Instant::now();
    let device = fractal_engine::device_from_name(&w.device)?;
    let dtype = w.dtype.parse().map_err(anyhow::Error::msg)?;
    let pinned = PinnedModel::unpinned_folder(&w.model, &device, None, dtype)?;
    let pipeline = &pinned.pipeline;
    let load_s = t.elapsed().as_secs_f64();
    let mut runs_s = Vec::new();
    for i in 0..w.repeats {
        let t = Instant::now();
        let spec = GenerateSpec {
            prompt: w.prompt.clone(),
            negative_prompt: String::new(),
            seed: Seed(i as u64),
            frames: w.frames,
            height: w.height,
            width: w.width,
            steps: w.steps,
            guidance_scale: w.guidance,
        };
        let out = pipeline.generate(&spec, &mut |_| {})?;
        out.rgb8()?;
        runs_s.push(t.elapsed().as_secs_f64());
    }
    // FRACTAL_PROFILE=1: per-stage UNet time over all runs, to stderr.
    if let Some(report) = fractal_engine::profile::take_report() {
        eprintln!("{report}");
    }
    println!("{}", serde_json::to_string(&Timing { load_s, runs_s })?);
    Ok(())
}

fn args_of(w: &Workload) -> Vec<String> {
    vec![
        "--prompt".into(),
        w.prompt.clone(),
        "--frames".into(),
        w.frames.to_string(),
        "--height".into(),
        w.height.to_string(),
        "--width".into(),
        w.width.to_string(),
        "--steps".into(),
        w.steps.to_string(),
        "--guidance".into(),
        w.guidance.to_string(),
        "--threads".into(),
        w.threads.to_string(),
        "--repeats".into(),
        w.repeats.to_string(),
        "--device".into(),
        w.device.clone(),
        "--dtype".into(),
        w.dtype.clone(),
    ]
}

fn measure(cmd: Command) -> anyhow::Result<Measured> {
    let (out, rss) = run_measured(cmd)?;
    let line = out.lines().last().context("worker printed nothing")?;
    Ok(Measured {
        timing: serde_json::from_str(line).with_context(|| format!("worker output {line:?}"))?,
        peak_rss_kib: rss,
    })
}

fn engine(b: EngineBench) -> anyhow::Result<()> {
    let manifest = fractal_engine::builtin::manifest_or_err(&b.variant)?;
    // A count the model makes (Wan: 1 + 4k), and its own guidance scale.
    let frames = manifest.frames_at_least(b.frames as u32) as usize;
    let guidance = manifest.defaults.guidance_scale;
    if !b.python.exists() {
        bail!("{} not found: run tools/parity/make_fixtures.sh once (it creates the diffusers venv) or pass --python", b.python.display());
    }
    let dir = std::env::temp_dir().join(format!("fractal-bench-{}", std::process::id()));
    // Export in a child process: Linux carries a process's peak RSS across
    // fork and exec, so the workers must be spawned by a parent that never
    // held the weights, or they would inherit its high-water mark.
    let status = Command::new(std::env::current_exe()?)
        .args(["model", "export-tiny", "--variant", &b.variant])
        .arg(&dir)
        .env("FRACTAL_LOG", "warn")
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("exporting {} failed", b.variant);
    }
    let w = Workload {
        model: dir.clone(),
        prompt: "a red fox running in the snow".into(),
        frames,
        height: b.size,
        width: b.size,
        steps: b.steps,
        guidance,
        threads: b.threads,
        repeats: b.repeats,
        device: b.device.clone(),
        dtype: b.dtype.clone(),
    };
    let worker = PathBuf::from("tools/bench/diffusers_worker.py");
    if !worker.exists() {
        bail!(
            "run from the repository root ({} not found)",
            worker.display()
        );
    }
    let mut ours = Command::new(std::env::current_exe()?);
    ours.args(["bench", "engine-worker", "--model"])
        .arg(&dir)
        .args(args_of(&w))
        .env("FRACTAL_LOG", "warn");
    let mut theirs = Command::new(&b.python);
    theirs
        .arg(worker)
        .arg(&dir)
        .args(args_of(&w))
        .env("OMP_NUM_THREADS", b.threads.to_string());
    eprintln!(
        "benchmarking {} ({frames} frames {}x{}, {} steps, CFG {guidance}, {} threads, {} in {}, best of {})...",
        b.variant, b.size, b.size, b.steps, b.threads, b.device, b.dtype, b.repeats
    );
    let rust = measure(ours)?;
    let py = measure(theirs)?;
    let _ = std::fs::remove_dir_all(&dir);
    let best = |m: &Measured| {
        m.timing
            .runs_s
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    };
    let (r, p) = (best(&rust), best(&py));
    println!(
        "{:<10} {:>10} {:>12} {:>10} {:>14}",
        "engine", "best (s)", "per step ms", "load (s)", "peak RSS MiB"
    );
    for (name, m, t) in [("fractal", &rust, r), ("diffusers", &py, p)] {
        println!(
            "{:<10} {:>10.3} {:>12.1} {:>10.3} {:>14.1}",
            name,
            t,
            1000.0 * t / b.steps as f64,
            m.timing.load_s,
            m.peak_rss_kib as f64 / 1024.0
        );
    }
    println!(
        "speed ratio (diffusers time / fractal time): {:.2}x (target >= 1.5x)",
        p / r
    );
    println!(
        "peak RSS ratio (fractal / diffusers): {:.2} (target <= 1.0)",
        rust.peak_rss_kib as f64 / py.peak_rss_kib as f64
    );
    Ok(())
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Engine(b) => engine(b),
        BenchCmd::Routing(b) => crate::bench_routing::run(b),
        BenchCmd::Load(b) => crate::bench_load::run(b),
        BenchCmd::Chaos(b) => crate::bench_chaos::run(b),
        BenchCmd::Quality(b) => crate::bench_quality::run(b),
        BenchCmd::EngineWorker(w) => worker(w),
        #[cfg(feature = "cheats")]
        BenchCmd::Verify(b) => crate::bench_verify::run(b),
    }
}
