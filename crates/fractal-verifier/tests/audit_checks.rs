//! The spot-check itself, without the network: honest traces pass with
//! either scheduler and on another kernel path, and each half of a step
//! (model output, scheduler update) is checked on its own.

use std::sync::Arc;

use candle_core::Device;
use fractal_engine::builtin::{tiny, tiny_wan};
use fractal_engine::{kernels::cpu, PinnedModel, TinyVariant, WanVariant};
use fractal_protocol::manifest::{ModelManifest, SchedulerKind, Size};
use fractal_protocol::merkle::{f32_le_bytes, TraceLeaf};
use fractal_protocol::wire::{Base64Bytes, GenerateRequest, GenerateResponse, PROTOCOL_VERSION};
use fractal_protocol::Seed;
use fractal_prover::job::{self, StrategyState};
use fractal_prover::Strategy;
use fractal_verifier::audit::{Auditor, Check};
use rand::SeedableRng;

fn pinned(manifest: &ModelManifest) -> PinnedModel {
    PinnedModel::load(manifest.clone(), None, &Device::Cpu).unwrap()
}

fn dpm_manifest() -> ModelManifest {
    let mut m = tiny::manifest(TinyVariant::Base);
    m.scheduler = m
        .scheduler
        .with_kind(SchedulerKind::DpmSolverMultistep)
        .unwrap();
    m
}

fn request(model: &PinnedModel, seed: u64, steps: u32) -> GenerateRequest {
    let mut r =
        GenerateRequest::with_defaults(&model.manifest, "a red fox in the snow", Seed(seed));
    r.negative_prompt = "blurry".into();
    r.size = Size {
        width: 32,
        height: 32,
    };
    r.frames = 2;
    r.steps = steps;
    r
}

/// Runs `req` as `strategy`: the audit trace and the answer a client gets.
fn produce(
    model: &PinnedModel,
    req: &GenerateRequest,
    strategy: &Strategy,
) -> (fractal_prover::traces::Trace, GenerateResponse) {
    let spec = model.spec(req).unwrap();
    let produced = job::run(
        model,
        req,
        &spec,
        strategy,
        &StrategyState::default(),
        &mut |_| true,
    )
    .unwrap();
    let resp = GenerateResponse {
        version: PROTOCOL_VERSION,
        job_id: req.job_id,
        manifest_id: model.manifest_id,
        trace_root: produced.root,
        trace_len: produced.trace_len,
        output: req.output,
        content: Base64Bytes(produced.content),
        timing: produced.timing,
    };
    (produced.audit_trace, resp)
}

/// Runs `req` as `strategy`, lets `tamper` change the audit trace's leaves,
/// and audits it with the plans of `rounds` seeds.
fn audit(
    model: &PinnedModel,
    req: &GenerateRequest,
    strategy: Strategy,
    tamper: impl Fn(&mut Vec<Vec<u8>>),
    rounds: u64,
) -> Vec<Result<(), Check>> {
    let (mut trace, resp) = produce(model, req, &strategy);
    tamper(&mut trace.leaves);
    let auditor = Auditor::new(Arc::new(pinned(&model.manifest)));
    (0..rounds)
        .map(|i| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i);
            let plan = auditor.plan(req, &mut rng);
            let answer = trace.open(&plan.challenge).unwrap();
            auditor
                .check(req, &resp, &plan, &answer)
                .map(|_| ())
                .map_err(|f| f.check)
        })
        .collect()
}

#[test]
fn honest_traces_pass_with_both_schedulers() {
    for manifest in [tiny::manifest(TinyVariant::Base), dpm_manifest()] {
        let model = pinned(&manifest);
        let req = request(&model, 3, 6);
        for r in audit(&model, &req, Strategy::Honest, |_| {}, 12) {
            assert_eq!(r, Ok(()), "{:?}", manifest.scheduler.kind());
        }
    }
}

#[test]
fn an_honest_prover_on_candle_ops_passes_a_fused_verifier() {
    let model = pinned(&tiny::manifest(TinyVariant::Base));
    let req = request(&model, 4, 6);
    cpu::set_enabled(Some(false));
    let (trace, resp) = produce(&model, &req, &Strategy::Honest);
    cpu::set_enabled(None);
    let auditor = Auditor::new(Arc::new(pinned(&model.manifest)));
    for i in 0..6 {
        let plan = auditor.plan(&req, &mut rand::rngs::StdRng::seed_from_u64(i));
        let answer = trace.open(&plan.challenge).unwrap();
        let report = auditor.check(&req, &resp, &plan, &answer).unwrap();
        // Another summation order: not bit-identical, far inside the tolerance.
        assert!(report.output_rel_l2 < model.manifest.verification.output_rel_l2 / 10.0);
    }
}

/// Wan's flow-matching steps audit as the UNet's do, with either
/// scheduler: honest traces pass whether the prover ran the fused kernels
/// or candle's ops, far inside the tolerances. UniPC's steps are
/// recomputed from two earlier steps' openings and its predictor inverted.
#[test]
fn honest_wan_traces_pass_with_both_flow_schedulers_on_either_kernel_path() {
    let euler = tiny_wan::manifest(WanVariant::Tiny);
    let mut unipc = euler.clone();
    unipc.scheduler = unipc
        .scheduler
        .with_kind(SchedulerKind::UniPcMultistep)
        .unwrap();
    for manifest in [euler, unipc] {
        let model = pinned(&manifest);
        let mut req = request(&model, 6, 20);
        req.frames = 5;
        let auditor = Auditor::new(Arc::new(pinned(&manifest)));
        for fused in [true, false] {
            cpu::set_enabled(Some(fused));
            let (trace, resp) = produce(&model, &req, &Strategy::Honest);
            cpu::set_enabled(None);
            let mut worst = (0f64, 0f64);
            for i in 0..30 {
                let plan = auditor.plan(&req, &mut rand::rngs::StdRng::seed_from_u64(i));
                let answer = trace.open(&plan.challenge).unwrap();
                let report = auditor.check(&req, &resp, &plan, &answer).unwrap();
                worst = (
                    worst.0.max(report.output_rel_l2),
                    worst.1.max(report.update_rel_l2),
                );
            }
            let kind = manifest.scheduler.kind();
            eprintln!(
                "wan {kind:?}, fused kernels {fused}: worst output {:.1e}, update {:.1e}",
                worst.0, worst.1
            );
            let v = &manifest.verification;
            assert!(
                worst.0 < v.output_rel_l2 / 10.0 && worst.1 < v.update_rel_l2 / 10.0,
                "{kind:?}: {worst:?}"
            );
        }
    }
}

/// Cheats on UniPC's multistep history are caught by the check meant for
/// them, as on DPM-Solver++.
#[test]
fn cheats_on_a_unipc_schedule_are_caught() {
    let mut manifest = tiny_wan::manifest(WanVariant::Tiny);
    manifest.scheduler = manifest
        .scheduler
        .with_kind(SchedulerKind::UniPcMultistep)
        .unwrap();
    let model = pinned(&manifest);
    let mut req = request(&model, 7, 10);
    req.frames = 5;
    for (strategy, allowed) in [
        (Strategy::RepeatTail(1), &[Check::Step][..]),
        (Strategy::ReuseAlternate, &[Check::ModelOutput][..]),
        (Strategy::FewerSteps, &[Check::Step, Check::ModelOutput][..]),
        (
            Strategy::JumpFromHalf,
            &[Check::Step, Check::ModelOutput][..],
        ),
    ] {
        let results = audit(&model, &req, strategy.clone(), |_| {}, 30);
        let failed: Vec<Check> = results.iter().filter_map(|r| r.err()).collect();
        assert!(!failed.is_empty(), "{strategy:?} never caught");
        assert!(
            failed.iter().all(|c| allowed.contains(c)),
            "{strategy:?} caught by {failed:?}"
        );
    }
}

#[test]
fn a_wrong_model_output_at_the_last_step_is_caught() {
    // Reusing outputs is a model-output failure at any step, the last included.
    let model = pinned(&dpm_manifest());
    let req = request(&model, 5, 6);
    let results = audit(&model, &req, Strategy::ReuseAlternate, |_| {}, 40);
    assert!(results.contains(&Err(Check::ModelOutput)));
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(()) | Err(Check::ModelOutput))));
}

#[test]
fn a_repeated_last_step_is_caught_by_the_update_check() {
    // The last latent repeated: it differs from the honest one by far less
    // than f16 rounding of the whole latent, but its update is zero.
    let model = pinned(&tiny::manifest(TinyVariant::Base));
    let req = request(&model, 6, 6);
    let results = audit(&model, &req, Strategy::RepeatTail(1), |_| {}, 40);
    assert!(results.contains(&Err(Check::Step)));
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(()) | Err(Check::Step))));
}

#[test]
fn openings_that_differ_from_the_commitment_are_caught() {
    let model = pinned(&tiny::manifest(TinyVariant::Base));
    let steps = 6;
    let req = request(&model, 7, steps);
    let last = TraceLeaf::Latent(steps).index() as usize;
    let nudge = |leaves: &mut Vec<Vec<u8>>| {
        let v = fractal_protocol::merkle::f32_from_le_bytes(&leaves[last]).unwrap();
        leaves[last] = f32_le_bytes(&v.iter().map(|x| x * 1.001).collect::<Vec<_>>());
    };
    let results = audit(&model, &req, Strategy::Honest, nudge, 4);
    assert!(results.iter().all(|r| *r == Err(Check::Commitment)));
}

#[test]
fn a_repeated_step_is_caught_exactly_when_it_is_drawn() {
    // Steps after the repeat are honest steps from the repeated latent, so
    // only the repeated step itself can fail.
    let model = pinned(&tiny::manifest(TinyVariant::Base));
    let steps = 6;
    let req = request(&model, 8, steps);
    let (trace, resp) = produce(&model, &req, &Strategy::RepeatMiddle(1));
    let auditor = Auditor::new(Arc::new(pinned(&model.manifest)));
    for i in 0..30 {
        let plan = auditor.plan(&req, &mut rand::rngs::StdRng::seed_from_u64(i));
        let answer = trace.open(&plan.challenge).unwrap();
        let verdict = auditor
            .check(&req, &resp, &plan, &answer)
            .map_err(|f| f.check);
        let repeated = steps / 2;
        assert_eq!(
            verdict.is_err(),
            plan.ks.contains(&repeated),
            "steps {:?}: {verdict:?}",
            plan.ks
        );
    }
}

/// A half-precision manifest is audited by recomputing in its own dtype
/// (on the CPU too): an honest f16 prover passes (bit for bit on one
/// machine), and a prover computing in bf16 while claiming f16 is caught
/// on the model output, above the f16 tolerance floor.
#[test]
fn a_half_precision_manifest_is_audited_in_its_dtype() {
    use fractal_protocol::manifest::DType;
    let manifest = tiny::manifest(TinyVariant::Base).in_dtype(DType::F16);
    let model = pinned(&manifest);
    assert_eq!(model.pipeline.dtype(), candle_core::DType::F16);
    let req = request(&model, 8, 6);
    for report in audit(&model, &req, Strategy::Honest, |_| {}, 6) {
        assert_eq!(report, Ok(()));
    }
    let mut cheaper = pinned(&manifest.clone().in_dtype(DType::Bf16));
    cheaper.manifest = manifest.clone();
    cheaper.manifest_id = manifest.id();
    let (trace, resp) = produce(&cheaper, &req, &Strategy::Honest);
    let auditor = Auditor::new(Arc::new(model));
    for i in 0..6 {
        let plan = auditor.plan(&req, &mut rand::rngs::StdRng::seed_from_u64(i));
        let answer = trace.open(&plan.challenge).unwrap();
        let failed = auditor.check(&req, &resp, &plan, &answer).unwrap_err();
        assert_eq!(failed.check, Check::ModelOutput, "round {i}");
    }
}
