//! `fractal bench verify` (builds with `--features cheats`): what a spot-check
//! costs next to the generation it checks, how often each cheat is caught,
//! and how often an honest prover is wrongly flagged.

use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use fractal_engine::tokenizer::ClipTokenizer;
use fractal_engine::{tiny, Model, PinnedModel, TinyVariant};
use fractal_protocol::manifest::Size;
use fractal_protocol::wire::{
    Base64Bytes, GenerateRequest, GenerateResponse, OutputFormat, PROTOCOL_VERSION,
};
use fractal_protocol::{JobId, Seed};
use fractal_prover::job::{self, StrategyState};
use fractal_prover::Strategy;
use fractal_verifier::audit::Auditor;
use rand::Rng;

#[derive(Args)]
pub struct VerifyBench {
    /// Honest jobs audited for false positives.
    #[arg(long, default_value_t = 1000)]
    honest: usize,
    /// Audited jobs per cheating strategy.
    #[arg(long, default_value_t = 100)]
    per_cheat: usize,
    /// Audits a verifier runs per prover per epoch (for the per-epoch rate).
    #[arg(long, default_value_t = 5)]
    audits_per_epoch: u32,
    /// Shape of the detection/false-positive jobs.
    #[arg(long, default_value_t = 4)]
    frames: u32,
    #[arg(long, default_value_t = 32)]
    size: u32,
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Shape of the cost measurement (ModelScope's defaults: 16 frames, 50 steps).
    #[arg(long, default_value_t = 16)]
    cost_frames: u32,
    #[arg(long, default_value_t = 50)]
    cost_steps: u32,
    #[arg(long, default_value_t = 3)]
    cost_jobs: usize,
}

fn pinned(model: Model) -> anyhow::Result<PinnedModel> {
    Ok(PinnedModel::from_parts(
        tiny::manifest(TinyVariant::Base),
        model,
        ClipTokenizer::builtin()?,
    )?)
}

fn request(
    model: &PinnedModel,
    rng: &mut impl Rng,
    frames: u32,
    size: u32,
    steps: u32,
) -> GenerateRequest {
    GenerateRequest {
        version: PROTOCOL_VERSION,
        job_id: JobId::random(),
        manifest_id: model.manifest_id,
        prompt: fractal_verifier::synthetic_prompt(rng),
        negative_prompt: String::new(),
        seed: Seed(rng.gen()),
        size: Size {
            width: size,
            height: size,
        },
        frames,
        steps,
        guidance_scale: model.manifest.defaults.guidance_scale,
        output: OutputFormat::Mp4,
    }
}

/// Runs one job as `strategy` on `prover`, audits it; returns
/// (caught, generate seconds, verify seconds).
fn one(
    prover: &PinnedModel,
    strategy: &Strategy,
    state: &StrategyState,
    auditor: &Auditor,
    req: &GenerateRequest,
    rng: &mut impl Rng,
) -> anyhow::Result<(bool, f64, f64)> {
    let spec = prover.spec(req)?;
    let t = Instant::now();
    let produced =
        job::run(prover, req, &spec, strategy, state, &mut |_| true).context("generation")?;
    let gen_s = t.elapsed().as_secs_f64();
    let resp = GenerateResponse {
        version: PROTOCOL_VERSION,
        job_id: req.job_id,
        manifest_id: prover.manifest_id,
        trace_root: produced.root,
        trace_len: produced.trace_len,
        output: req.output,
        content: Base64Bytes(produced.content),
        timing: produced.timing,
    };
    let t = Instant::now();
    let plan = auditor.plan(req, rng);
    let caught = match produced.audit_trace.open(&plan.challenge) {
        Ok(answer) => auditor.check(req, &resp, &plan, &answer).is_err(),
        Err(_) => true,
    };
    Ok((caught, gen_s, t.elapsed().as_secs_f64()))
}

pub fn run(b: VerifyBench) -> anyhow::Result<()> {
    let cpu = Device::Cpu;
    let honest = pinned(Model::tiny(TinyVariant::Base, &cpu)?)?;
    let auditor = Auditor::new(std::sync::Arc::new(pinned(Model::tiny(
        TinyVariant::Base,
        &cpu,
    )?)?));
    let mut rng = rand::rngs::OsRng;
    let state = StrategyState::default();

    // Cost: full generation (all steps, all frames, encode) vs one audit.
    let (mut gen, mut ver) = (0.0, 0.0);
    for _ in 0..b.cost_jobs {
        let req = request(&honest, &mut rng, b.cost_frames, 64, b.cost_steps);
        let (caught, g, v) = one(&honest, &Strategy::Honest, &state, &auditor, &req, &mut rng)?;
        anyhow::ensure!(!caught, "an honest job failed its audit");
        gen += g;
        ver += v;
    }
    println!(
        "spot-check cost ({} frames 64x64, {} steps, tiny-v1): generate {:.3} s, verify {:.3} s, ratio {:.1}%",
        b.cost_frames,
        b.cost_steps,
        gen / b.cost_jobs as f64,
        ver / b.cost_jobs as f64,
        100.0 * ver / gen
    );

    let mut flagged = 0;
    let t = Instant::now();
    for i in 0..b.honest {
        let req = request(&honest, &mut rng, b.frames, b.size, b.steps);
        if one(&honest, &Strategy::Honest, &state, &auditor, &req, &mut rng)?.0 {
            flagged += 1;
            eprintln!("honest job {i} flagged");
        }
    }
    println!(
        "honest: {flagged} of {} jobs flagged ({} frames {}x{}, {} steps; {:.0} s)",
        b.honest,
        b.frames,
        b.size,
        b.size,
        b.steps,
        t.elapsed().as_secs_f64()
    );

    let cheats: Vec<(&str, PinnedModel, Strategy)> = vec![
        (
            "fewer-steps",
            pinned(Model::tiny(TinyVariant::Base, &cpu)?)?,
            Strategy::FewerSteps,
        ),
        (
            "perturbed-weights-1%",
            pinned(Model::tiny_perturbed(TinyVariant::Base, 0.01, &cpu)?)?,
            Strategy::Honest,
        ),
        (
            "other-model",
            pinned(Model::tiny(TinyVariant::Wide, &cpu)?)?,
            Strategy::Honest,
        ),
        (
            "random-latents",
            pinned(Model::tiny(TinyVariant::Base, &cpu)?)?,
            Strategy::RandomLatents,
        ),
        (
            "replay-cached",
            pinned(Model::tiny(TinyVariant::Base, &cpu)?)?,
            Strategy::ReplayCached,
        ),
        (
            "inconsistent-audit",
            pinned(Model::tiny(TinyVariant::Base, &cpu)?)?,
            Strategy::InconsistentAudit,
        ),
        (
            "fabricated-audit",
            pinned(Model::tiny(TinyVariant::Base, &cpu)?)?,
            Strategy::FabricatedAudit,
        ),
    ];
    println!(
        "{:<22} {:>8} {:>10} {:>16}",
        "strategy", "audits", "caught", "per epoch (est.)"
    );
    for (name, model, strategy) in cheats {
        let state = StrategyState::default();
        let mut caught = 0;
        for _ in 0..b.per_cheat {
            let req = request(&model, &mut rng, b.frames, b.size, b.steps);
            caught += one(&model, &strategy, &state, &auditor, &req, &mut rng)?.0 as usize;
        }
        let p = caught as f64 / b.per_cheat as f64;
        let epoch = 1.0 - (1.0 - p).powi(b.audits_per_epoch as i32);
        println!(
            "{name:<22} {:>8} {:>9.1}% {:>15.3}%",
            b.per_cheat,
            100.0 * p,
            100.0 * epoch
        );
    }
    println!("late answers: failed by the verifier's deadline (see the cheaters end-to-end test)");
    Ok(())
}
