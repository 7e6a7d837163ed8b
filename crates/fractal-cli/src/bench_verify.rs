//! `fractal bench verify` (builds with `--features cheats`): what a spot-check
//! costs next to the generation it checks, how often each cheat is caught
//! per audit and per epoch at two schedule lengths, how often an honest
//! prover on another thread count or kernel path is wrongly flagged, and
//! the distribution of honest errors the tolerances are chosen from.

use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use fractal_engine::pipelines::text_to_video_sd;
use fractal_engine::{kernels::cpu, precision, Degradation, LoadOptions, PinnedModel, TinyVariant};
use fractal_protocol::manifest::{self, Architecture, ModelManifest, SchedulerKind, Size};
use fractal_protocol::merkle::TraceLeaf;
use fractal_protocol::wire::{Base64Bytes, GenerateRequest, GenerateResponse, PROTOCOL_VERSION};
use fractal_prover::job::{self, StrategyState};
use fractal_prover::Strategy;
use fractal_verifier::audit::{AuditReport, Auditor, Check};
use fractal_verifier::challenges::ChallengeMix;
use rand::{Rng, SeedableRng};

#[derive(Args)]
pub struct VerifyBench {
    /// Honest jobs audited for false positives (spread over the prover
    /// configurations: 1 and 2 threads, fused kernels and candle's ops).
    #[arg(long, default_value_t = 10_000)]
    honest: usize,
    /// Audited jobs per cheating strategy and schedule length.
    #[arg(long, default_value_t = 100)]
    per_cheat: usize,
    /// Schedule lengths the detection table is measured at.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10u32, 50])]
    steps: Vec<u32>,
    /// Schedule lengths of the honest jobs, in turn.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10u32])]
    honest_steps: Vec<u32>,
    /// Frames of the honest jobs (fewer than the detection jobs': the
    /// per-step errors do not depend on it, and 10,000 jobs must fit).
    #[arg(long, default_value_t = 2)]
    honest_frames: u32,
    /// Shape of the detection and false-positive jobs.
    #[arg(long, default_value_t = 4)]
    frames: u32,
    #[arg(long, default_value_t = 32)]
    size: u32,
    /// Shape of the cost measurement (ModelScope's: 16 frames, 50 steps).
    #[arg(long, default_value_t = 16)]
    cost_frames: u32,
    #[arg(long, default_value_t = 64)]
    cost_size: u32,
    #[arg(long, default_value_t = 50)]
    cost_steps: u32,
    #[arg(long, default_value_t = 3)]
    cost_jobs: usize,
    /// Seed of the bench's own randomness (requests, audit plans).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The built-in model audited: world-v1 or tiny-v1 (TextToVideoSD), or
    /// tiny-wan-v1 (Wan 2.1). Frame counts are rounded up to ones it makes.
    #[arg(long, default_value = "tiny-v1")]
    model: String,
    /// Where job prompts come from: `challenge` (the verifier's challenge
    /// generator, as app traffic looks) or `world` (the toy world's
    /// captions, which world-v1 was trained on, so its conditioning
    /// matters). Default: world for world-v1, challenge otherwise.
    #[arg(long, value_parser = ["challenge", "world"])]
    prompts: Option<String>,
    /// Run the model's manifest with another scheduler of its family
    /// (ddim, dpm-solver; flow-euler, unipc).
    #[arg(long)]
    scheduler: Option<String>,
    /// Run the model's manifest in this dtype (f32, f16, bf16): the networks
    /// compute in it and the model-output tolerance is raised to its floor.
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    dtype: Option<String>,
}

/// The audited model's manifest and the models provers run under it.
struct Models {
    manifest: ModelManifest,
}

impl Models {
    fn new(name: &str, scheduler: Option<&str>, dtype: Option<&str>) -> anyhow::Result<Self> {
        let mut manifest = fractal_engine::builtin::manifest_or_err(name)?;
        if let Some(d) = dtype {
            manifest = manifest.in_dtype(d.parse().map_err(anyhow::Error::msg)?);
        }
        if let Some(s) = scheduler {
            let kind = match s {
                "ddim" => SchedulerKind::Ddim,
                "dpm-solver" => SchedulerKind::DpmSolverMultistep,
                "flow-euler" => SchedulerKind::FlowMatchEuler,
                "unipc" => SchedulerKind::UniPcMultistep,
                other => anyhow::bail!("unknown scheduler {other:?}"),
            };
            manifest.scheduler = manifest
                .scheduler
                .with_kind(kind)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(Models { manifest })
    }

    fn honest(&self) -> anyhow::Result<PinnedModel> {
        Ok(PinnedModel::load(
            self.manifest.clone(),
            None,
            &Device::Cpu,
        )?)
    }

    /// The model's weights degraded, claiming its manifest.
    fn degraded(&self, d: Degradation) -> anyhow::Result<PinnedModel> {
        Ok(PinnedModel::load_builtin(
            self.manifest.clone(),
            d,
            &Device::Cpu,
        )?)
    }

    /// The pinned model computing in `dtype` instead of the manifest's,
    /// claiming the manifest.
    fn in_dtype(&self, dtype: manifest::DType) -> anyhow::Result<PinnedModel> {
        let mut m = PinnedModel::load(self.manifest.clone().in_dtype(dtype), None, &Device::Cpu)?;
        m.manifest = self.manifest.clone();
        m.manifest_id = self.manifest.id();
        Ok(m)
    }

    /// Another built-in model of the same architecture claiming the
    /// manifest, where there is one (tiny-wide-v1 for tiny-v1).
    fn other(&self) -> anyhow::Result<Option<PinnedModel>> {
        if self.manifest.architecture != Architecture::TextToVideoSd {
            return Ok(None);
        }
        let options = LoadOptions::in_dtype(precision::compute_dtype(self.manifest.dtype));
        let wide = text_to_video_sd::Model::tiny_with(TinyVariant::Wide, options, &Device::Cpu)?;
        Ok(Some(PinnedModel::from_parts(self.manifest.clone(), wide)?))
    }

    /// What a cheat's prover runs.
    fn for_cheat(&self, model: &CheatModel) -> anyhow::Result<Option<PinnedModel>> {
        match model {
            CheatModel::Weights(d) => self.degraded(*d).map(Some),
            CheatModel::Dtype(d) => self.in_dtype(*d).map(Some),
            CheatModel::Other => self.other(),
        }
    }
}

/// Prompts for the bench's jobs: the challenge generator's, or one of
/// `captions` (with the generator's negative prompt) where given.
struct Prompts {
    mix: ChallengeMix,
    captions: Vec<String>,
}

impl Prompts {
    fn draw(&self, rng: &mut impl Rng) -> GenerateRequest {
        let mut req = self.mix.draw(rng);
        if !self.captions.is_empty() {
            req.prompt = self.captions[rng.gen_range(0..self.captions.len())].clone();
        }
        req
    }
}

/// A job as app traffic looks (prompt and negative prompt from `prompts`),
/// at the bench's shape.
fn request(
    model: &PinnedModel,
    prompts: &Prompts,
    rng: &mut impl Rng,
    frames: u32,
    size: u32,
    steps: u32,
) -> GenerateRequest {
    let mut req = prompts.draw(rng);
    req.size = Size {
        width: size,
        height: size,
    };
    req.frames = frames;
    req.steps = steps;
    req.manifest_id = model.manifest_id;
    req
}

/// How a prover runs: its thread count and whether it uses the fused
/// kernels (candle's plain ops otherwise: another summation order).
#[derive(Clone, Copy)]
struct ProverSetup {
    threads: usize,
    fused: bool,
}

impl ProverSetup {
    fn name(&self) -> String {
        format!(
            "{} thread{}, {}",
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            if self.fused {
                "fused kernels"
            } else {
                "candle ops"
            }
        )
    }
}

struct Audited {
    failed: Option<(Check, String, Option<f64>)>,
    report: Option<AuditReport>,
    gen_s: f64,
    verify_s: f64,
}

/// Runs one job as `strategy` on `prover` (in `pool`, with `setup`'s
/// kernels), then audits it on this thread.
#[allow(clippy::too_many_arguments)]
fn one(
    prover: &PinnedModel,
    strategy: &Strategy,
    state: &StrategyState,
    auditor: &Auditor,
    req: &GenerateRequest,
    pool: &rayon::ThreadPool,
    setup: ProverSetup,
    rng: &mut impl Rng,
) -> anyhow::Result<Audited> {
    let spec = prover.spec(req)?;
    let t = Instant::now();
    let produced = pool
        .install(|| {
            cpu::set_enabled(Some(setup.fused));
            let r = job::run(prover, req, &spec, strategy, state, &mut |_| true);
            cpu::set_enabled(None);
            r
        })
        .context("generation")?;
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
    let (failed, report) = match produced.audit_trace.open(&plan.challenge) {
        Ok(answer) => match auditor.check(req, &resp, &plan, &answer) {
            Ok(r) => (None, Some(r)),
            Err(f) => (Some((f.check, f.detail, f.measured)), None),
        },
        Err(e) => (Some((Check::Commitment, e.to_string(), None)), None),
    };
    Ok(Audited {
        failed,
        report,
        gen_s,
        verify_s: t.elapsed().as_secs_f64(),
    })
}

/// Quantile `q` of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Probability that one audit's uniformly drawn pairs hit at least one of
/// `faked` steps out of `n` (the plan's own arithmetic).
fn hit_probability(n: u32, faked: u32, pairs: u32) -> f64 {
    let mut miss = 1.0;
    for i in 0..pairs.min(n) {
        miss *= (n.saturating_sub(faked).saturating_sub(i)) as f64 / (n - i) as f64;
    }
    1.0 - miss
}

/// A cheat to measure: a name, the model its prover runs, its strategy,
/// and how many of `n` steps it fakes (`None`: every step).
struct Cheat {
    name: String,
    model: CheatModel,
    strategy: Strategy,
    faked_steps: Option<u32>,
}

/// What a cheating prover runs instead of the pinned model.
#[derive(Clone, Copy, PartialEq)]
enum CheatModel {
    /// The pinned model's weights changed (`Degradation::None`: the real ones).
    Weights(Degradation),
    /// The pinned model computing in a cheaper dtype than the manifest's.
    Dtype(manifest::DType),
    /// Another model of the architecture (tiny-wide-v1).
    Other,
}

fn cheats(n: u32, dtype: manifest::DType) -> Vec<Cheat> {
    let tenth = (n / 10).max(1);
    let half = n - n / 2 - 1;
    let mut v = vec![
        Cheat {
            name: format!("repeat-tail:{tenth} (last 10% of steps)"),
            model: CheatModel::Weights(Degradation::None),
            strategy: Strategy::RepeatTail(tenth as usize),
            faked_steps: Some(tenth),
        },
        Cheat {
            name: format!("repeat-middle:{tenth} (10% mid-schedule)"),
            model: CheatModel::Weights(Degradation::None),
            strategy: Strategy::RepeatMiddle(tenth as usize),
            faked_steps: Some(tenth),
        },
        Cheat {
            name: "reuse-second-half".into(),
            model: CheatModel::Weights(Degradation::None),
            strategy: Strategy::ReuseSecondHalf,
            faked_steps: Some(half),
        },
        Cheat {
            name: "reuse-alternate".into(),
            model: CheatModel::Weights(Degradation::None),
            strategy: Strategy::ReuseAlternate,
            faked_steps: Some(n / 2),
        },
        Cheat {
            name: "jump-from-half".into(),
            model: CheatModel::Weights(Degradation::None),
            strategy: Strategy::JumpFromHalf,
            // From the middle step on, every update lands off the scheduler.
            faked_steps: Some(n - n / 2),
        },
        Cheat {
            name: "guidance-alternate".into(),
            model: CheatModel::Weights(Degradation::None),
            strategy: Strategy::GuidanceAlternate,
            faked_steps: Some(n / 2),
        },
        Cheat {
            name: "fewer-steps (half, stretched)".into(),
            model: CheatModel::Weights(Degradation::None),
            strategy: Strategy::FewerSteps,
            faked_steps: None,
        },
    ];
    // The rest of the cheat suite touches every step (or the whole trace).
    for (name, strategy) in Strategy::CHEATS {
        if v.iter().any(|c| c.strategy == *strategy) {
            continue;
        }
        v.push(Cheat {
            name: (*name).into(),
            model: CheatModel::Weights(Degradation::None),
            strategy: strategy.clone(),
            faked_steps: None,
        });
    }
    for (name, model) in [
        ("weights-f16", Degradation::RoundedF16),
        ("weights-bf16", Degradation::RoundedBf16),
        ("weights-noise-0.1%", Degradation::Perturbed(0.001)),
        ("weights-noise-1%", Degradation::Perturbed(0.01)),
    ] {
        v.push(Cheat {
            name: name.into(),
            model: CheatModel::Weights(model),
            strategy: Strategy::Honest,
            faked_steps: None,
        });
    }
    // Computing in a cheaper dtype than the manifest's (half the memory
    // traffic, and tensor cores, on a GPU).
    let cheaper: &[manifest::DType] = match dtype {
        manifest::DType::F32 => &[manifest::DType::F16, manifest::DType::Bf16],
        manifest::DType::F16 => &[manifest::DType::Bf16],
        manifest::DType::Bf16 => &[],
    };
    for &d in cheaper {
        v.push(Cheat {
            name: format!("compute-{}", d.name()),
            model: CheatModel::Dtype(d),
            strategy: Strategy::Honest,
            faked_steps: None,
        });
    }
    v.push(Cheat {
        name: "other-model (tiny-wide)".into(),
        model: CheatModel::Other,
        strategy: Strategy::Honest,
        faked_steps: None,
    });
    v
}

pub fn run(b: VerifyBench) -> anyhow::Result<()> {
    let models = Models::new(&b.model, b.scheduler.as_deref(), b.dtype.as_deref())?;
    let honest = models.honest()?;
    let auditor = Auditor::new(std::sync::Arc::new(models.honest()?));
    // Frame counts the model makes (Wan: 1 + 4k).
    let frames = |n: u32| honest.manifest.frames_at_least(n);
    let b = VerifyBench {
        frames: frames(b.frames),
        honest_frames: frames(b.honest_frames),
        cost_frames: frames(b.cost_frames),
        ..b
    };
    let plan = honest.manifest.verification.clone();
    let world = match b.prompts.as_deref() {
        Some(p) => p == "world",
        None => b.model == fractal_engine::builtin::world::WORLD_NAME,
    };
    let prompts = Prompts {
        mix: ChallengeMix::new(&honest.manifest, honest.manifest_id),
        captions: if world {
            fractal_world::Scene::all()
                .iter()
                .map(|s| s.caption())
                .collect()
        } else {
            Vec::new()
        },
    };
    println!(
        "prompts: {}",
        if world {
            "the toy world's captions"
        } else {
            "the challenge generator's"
        }
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(b.seed);
    let pools: Vec<rayon::ThreadPool> = [1, 2]
        .iter()
        .map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build())
        .collect::<Result<_, _>>()?;
    let pool_for = |threads: usize| &pools[threads - 1];
    let verifier_setup = ProverSetup {
        threads: 2,
        fused: true,
    };
    let state = StrategyState::default();
    println!(
        "audit plan ({} manifest in {}, {:?}): {} step pairs per audit, {} audits per prover per epoch; \
         tolerances: model output {:.0e}, update {:.0e} (relative L2)",
        b.model,
        honest.manifest.dtype.name(),
        honest.manifest.scheduler.kind(),
        plan.pairs_per_audit,
        plan.audits_per_epoch,
        plan.output_rel_l2,
        plan.update_rel_l2
    );

    // Cost: full generation (all steps, all frames, encode) vs one audit.
    let (mut gen, mut ver) = (0.0, 0.0);
    let mut ratios = Vec::new();
    for _ in 0..b.cost_jobs {
        let req = request(
            &honest,
            &prompts,
            &mut rng,
            b.cost_frames,
            b.cost_size,
            b.cost_steps,
        );
        let a = one(
            &honest,
            &Strategy::Honest,
            &state,
            &auditor,
            &req,
            pool_for(2),
            verifier_setup,
            &mut rng,
        )?;
        anyhow::ensure!(
            a.failed.is_none(),
            "an honest job failed its audit: {:?}",
            a.failed
        );
        gen += a.gen_s;
        ver += a.verify_s;
        ratios.push(a.verify_s / a.gen_s);
    }
    if b.cost_jobs > 0 {
        ratios.sort_by(f64::total_cmp);
        println!(
            "spot-check cost ({} frames {s}x{s}, {} steps, {}, 2 threads, {} jobs): generate {:.3} s, verify {:.3} s, ratio {:.1}% (jobs {:.1}-{:.1}%)",
            b.cost_frames,
            b.cost_steps,
            b.model,
            b.cost_jobs,
            gen / b.cost_jobs as f64,
            ver / b.cost_jobs as f64,
            100.0 * ver / gen,
            100.0 * ratios[0],
            100.0 * ratios[ratios.len() - 1],
            s = b.cost_size,
        );
    }
    // Trace and audit sizes at ModelScope's real shape: 16 frames of
    // 256x256 are latents of 4 x 16 x 32 x 32 f32.
    let leaf_bytes = 4 * 16 * 32 * 32 * 4;
    let leaves = TraceLeaf::count(50) as usize;
    let opened = 2 + honest.manifest.scheduler.kind().max_leaves_per_pair() as usize
        * plan.pairs_per_audit as usize;
    println!(
        "trace at ModelScope size (16 frames 256x256, 50 steps): {} leaves of {} KiB = {:.1} MiB kept per job for the audit window; \
         an audit opens at most {} leaves = {:.2} MiB ({:.2} MiB as base64 JSON)",
        leaves,
        leaf_bytes / 1024,
        (leaves * leaf_bytes) as f64 / (1 << 20) as f64,
        opened,
        (opened * leaf_bytes) as f64 / (1 << 20) as f64,
        (opened * leaf_bytes) as f64 * 4.0 / 3.0 / (1 << 20) as f64,
    );

    // Honest jobs on every prover setup: false positives and the error
    // distribution the tolerances are chosen from.
    let setups = [
        ProverSetup {
            threads: 1,
            fused: true,
        },
        ProverSetup {
            threads: 2,
            fused: true,
        },
        ProverSetup {
            threads: 1,
            fused: false,
        },
        ProverSetup {
            threads: 2,
            fused: false,
        },
    ];
    // Candle's ops are several times slower than the fused kernels: one
    // job in eight runs on them (1 and 2 threads in turn), the rest on the
    // fused kernels at 1 and 2 threads.
    let cycle = [0, 1, 0, 1, 0, 1, 0, 2, 1, 0, 1, 0, 1, 0, 1, 3];
    let t = Instant::now();
    let mut flagged = 0;
    let mut errors: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); setups.len()];
    for i in 0..b.honest {
        let which = cycle[i % cycle.len()];
        let setup = setups[which];
        let steps = b.honest_steps[(i / cycle.len()) % b.honest_steps.len()];
        let req = request(&honest, &prompts, &mut rng, b.honest_frames, b.size, steps);
        let a = one(
            &honest,
            &Strategy::Honest,
            &state,
            &auditor,
            &req,
            pool_for(setup.threads),
            setup,
            &mut rng,
        )?;
        match (a.failed, a.report) {
            (Some((check, detail, _)), _) => {
                flagged += 1;
                eprintln!(
                    "honest job {i} ({}) flagged: {} {detail}",
                    setup.name(),
                    check.as_str()
                );
            }
            (None, Some(r)) => {
                errors[which].0.push(r.output_rel_l2);
                errors[which].1.push(r.update_rel_l2);
            }
            (None, None) => unreachable!("a passed audit has a report"),
        }
        if (i + 1) % 1000 == 0 {
            eprintln!(
                "  {} honest jobs audited ({:.0} s)",
                i + 1,
                t.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "honest: {flagged} of {} jobs flagged ({} frames {s}x{s}, steps {:?}, verifier on 2 threads with fused kernels; {:.0} s)",
        b.honest,
        b.honest_frames,
        b.honest_steps,
        t.elapsed().as_secs_f64(),
        s = b.size,
    );
    if b.honest > 0 {
        println!(
            "{:<28} {:>6} {:>12} {:>12} {:>12} {:>12}",
            "honest prover", "jobs", "output p50", "output max", "update p50", "update max"
        );
    }
    for (setup, (out, upd)) in setups
        .iter()
        .zip(&mut errors)
        .filter(|(_, e)| !e.0.is_empty())
    {
        out.sort_by(f64::total_cmp);
        upd.sort_by(f64::total_cmp);
        println!(
            "{:<28} {:>6} {:>12.2e} {:>12.2e} {:>12.2e} {:>12.2e}",
            setup.name(),
            out.len(),
            quantile(out, 0.5),
            quantile(out, 1.0),
            quantile(upd, 0.5),
            quantile(upd, 1.0),
        );
    }

    if b.per_cheat == 0 {
        return Ok(());
    }
    println!(
        "\n{:<38} {:>5} {:>7} {:>9} {:>9} {:>11} {:>10}  checks",
        "cheat", "steps", "audits", "caught", "expected", "per epoch", "min error"
    );
    for &n in &b.steps {
        for cheat in cheats(n, models.manifest.dtype) {
            let Some(model) = models.for_cheat(&cheat.model)? else {
                continue;
            };
            let state = StrategyState::default();
            let mut caught = 0;
            let mut min_error = f64::INFINITY;
            let mut checks = std::collections::BTreeMap::<&str, usize>::new();
            for _ in 0..b.per_cheat {
                let req = request(&model, &prompts, &mut rng, b.frames, b.size, n);
                let a = one(
                    &model,
                    &cheat.strategy,
                    &state,
                    &auditor,
                    &req,
                    pool_for(2),
                    verifier_setup,
                    &mut rng,
                )?;
                if let Some((check, _, measured)) = a.failed {
                    caught += 1;
                    *checks.entry(check.as_str()).or_default() += 1;
                    if let Some(e) = measured {
                        min_error = min_error.min(e);
                    }
                }
            }
            let p = caught as f64 / b.per_cheat as f64;
            let epoch = 1.0 - (1.0 - p).powi(plan.audits_per_epoch as i32);
            let expected = cheat
                .faked_steps
                .map(|m| hit_probability(n, m, plan.pairs_per_audit))
                .unwrap_or(1.0);
            let checks: Vec<String> = checks.iter().map(|(c, k)| format!("{c}:{k}")).collect();
            println!(
                "{:<38} {:>5} {:>7} {:>8.1}% {:>8.1}% {:>10.3}% {:>10}  {}",
                cheat.name,
                n,
                b.per_cheat,
                100.0 * p,
                100.0 * expected,
                100.0 * epoch,
                if min_error.is_finite() {
                    format!("{min_error:.1e}")
                } else {
                    "-".into()
                },
                checks.join(" ")
            );
        }
    }
    println!(
        "per epoch: 1 - (1 - caught)^{} ({} audits per prover per epoch, the manifest's plan); \
         expected: the plan's chance of drawing a faked step; min error: the smallest relative L2 a failed numeric check measured",
        plan.audits_per_epoch, plan.audits_per_epoch
    );
    println!("late answers: failed by the verifier's deadline (see the cheaters end-to-end test)");
    Ok(())
}
