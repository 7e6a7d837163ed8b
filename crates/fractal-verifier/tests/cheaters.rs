//! A local chain, honest and cheating provers on loopback, one verifier:
//! every cheater ends with zero weight and incentive, honest provers earn.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fractal_chain::{Chain, Hyperparams, Rao};
use fractal_engine::builtin::{tiny, tiny_wan};
use fractal_engine::pipelines::text_to_video_sd::Model;
use fractal_engine::{Degradation, PinnedModel, TinyVariant, WanVariant};
use fractal_protocol::manifest::{ModelManifest, Size};
use fractal_protocol::Keypair;
use fractal_prover::Strategy;
use fractal_verifier::audit::Check;
use fractal_verifier::store::Store;
use fractal_verifier::{Verifier, VerifierConfig};

mod common;
use common::{local_grid, pinned, start_prover};

/// Steps of the schedule the cheaters are challenged at (real schedules
/// are 25-50 steps; below 20 the late-step cheats are easy to catch).
const STEPS: u32 = 20;

/// Rounds after the first in which still-uncaught cheaters are challenged
/// again. A cheat on 2 of 20 steps escapes one audit of 2 pairs with
/// probability 153/190, so 80 audits miss it with probability < 3e-8.
const EXTRA_ROUNDS: usize = 80;

/// One architecture's suite: the manifest every prover claims (honest
/// ones run its built-in model, cheaters its weights degraded) and, where
/// there is one, another built-in model claiming it.
struct Suite {
    manifest: ModelManifest,
    other_model: Option<PinnedModel>,
}

fn sd_suite() -> Suite {
    let manifest = tiny::manifest(TinyVariant::Base);
    let wide = Model::tiny(TinyVariant::Wide, &Device::Cpu).unwrap();
    Suite {
        other_model: Some(PinnedModel::from_parts(manifest.clone(), wide).unwrap()),
        manifest,
    }
}

fn wan_suite() -> Suite {
    // No second Wan built in: the degraded weights stand for it.
    Suite {
        manifest: tiny_wan::manifest(WanVariant::Tiny),
        other_model: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_cheater_is_caught_and_honest_provers_earn() {
    cheat_suite(sd_suite()).await;
}

/// The same cheats against a Wan 2.1 prover (flow-matching steps, the
/// causal VAE's frames).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_cheater_on_wan_is_caught_and_honest_provers_earn() {
    cheat_suite(wan_suite()).await;
}

async fn cheat_suite(suite: Suite) {
    let params = Hyperparams {
        tempo: 5,
        weights_rate_limit: 1,
        ..Hyperparams::default()
    };
    let (chain, vkey, auth) = local_grid(params, 100).await;

    let degraded = |d| PinnedModel::load_builtin(suite.manifest.clone(), d, &Device::Cpu).unwrap();
    let base = || degraded(Degradation::None);
    let deadline = Duration::from_secs(30);
    let mut provers: Vec<(&str, Keypair)> = Vec::new();
    for name in ["honest-a", "honest-b", "honest-c"] {
        provers.push((
            name,
            start_prover(&chain, name, base(), Strategy::Honest, auth.clone()).await,
        ));
    }
    // Each cheat with the checks allowed to catch it.
    let tenth = (STEPS / 10) as usize;
    let mut cheats: Vec<(&str, PinnedModel, Strategy, &[Check])> = vec![
        (
            "fewer-steps",
            base(),
            Strategy::FewerSteps,
            &[Check::Step, Check::ModelOutput],
        ),
        (
            "repeat-tail",
            base(),
            Strategy::RepeatTail(tenth),
            &[Check::Step],
        ),
        (
            "repeat-middle",
            base(),
            Strategy::RepeatMiddle(tenth),
            &[Check::Step],
        ),
        (
            "reuse-second-half",
            base(),
            Strategy::ReuseSecondHalf,
            &[Check::ModelOutput],
        ),
        (
            "reuse-alternate",
            base(),
            Strategy::ReuseAlternate,
            &[Check::ModelOutput],
        ),
        (
            "jump-from-half",
            base(),
            Strategy::JumpFromHalf,
            &[Check::Step, Check::ModelOutput],
        ),
        (
            "no-guidance",
            base(),
            Strategy::NoGuidance,
            &[Check::ModelOutput],
        ),
        (
            "guidance-alternate",
            base(),
            Strategy::GuidanceAlternate,
            &[Check::ModelOutput],
        ),
        (
            "half-frames",
            base(),
            Strategy::HalfFrames,
            &[Check::ModelOutput],
        ),
        (
            "output-bf16",
            base(),
            Strategy::OutputBf16,
            &[Check::ModelOutput],
        ),
        (
            "cached-prompt",
            base(),
            Strategy::CachedPrompt,
            &[Check::ModelOutput],
        ),
        (
            "weights-f16",
            degraded(Degradation::RoundedF16),
            Strategy::Honest,
            &[Check::ModelOutput],
        ),
        (
            "weights-bf16",
            degraded(Degradation::RoundedBf16),
            Strategy::Honest,
            &[Check::ModelOutput],
        ),
        (
            "weights-noise-0.1pct",
            degraded(Degradation::Perturbed(0.001)),
            Strategy::Honest,
            &[Check::ModelOutput],
        ),
        (
            "random-latents",
            base(),
            Strategy::RandomLatents,
            &[Check::InitialNoise],
        ),
        (
            "replay-cached",
            base(),
            Strategy::ReplayCached,
            &[Check::InitialNoise],
        ),
        (
            "inconsistent-audit",
            base(),
            Strategy::InconsistentAudit,
            &[Check::Commitment],
        ),
        (
            "fabricated-audit",
            base(),
            Strategy::FabricatedAudit,
            &[Check::Commitment],
        ),
        (
            "late",
            base(),
            Strategy::Late(deadline + Duration::from_secs(2)),
            &[Check::Late],
        ),
    ];
    if let Some(other) = suite.other_model {
        cheats.push((
            "other-model",
            other,
            Strategy::Honest,
            &[Check::ModelOutput],
        ));
    }
    let mut allowed: BTreeMap<&str, &[Check]> = BTreeMap::new();
    for (name, model, strategy, checks) in cheats {
        allowed.insert(name, checks);
        provers.push((
            name,
            start_prover(&chain, name, model, strategy, auth.clone()).await,
        ));
    }
    chain.produce_blocks(1).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let manifest = &suite.manifest;
    let config = VerifierConfig {
        size: Size {
            width: 32,
            height: 32,
        },
        frames: manifest.frames_at_least(4),
        steps: STEPS,
        deadline,
        ..VerifierConfig::from_manifest(manifest)
    };
    let model = Arc::new(base());
    let verifier = Verifier::new(
        vkey.clone(),
        chain.clone(),
        model,
        Store::open(&dir.path().join("verifier.sqlite")).unwrap(),
        config,
    )
    .unwrap();

    // Every prover twice (the honest ones need passed audits to earn),
    // then only the cheaters that have not been caught yet; no blocks are
    // produced meanwhile, so every failure falls in this epoch.
    let name_of =
        |h: &fractal_protocol::Hotkey| provers.iter().find(|p| p.1.hotkey() == *h).unwrap().0;
    let mut caught: BTreeMap<String, Vec<Check>> = BTreeMap::new();
    let note = |r: fractal_verifier::JobResult, caught: &mut BTreeMap<String, Vec<Check>>| {
        let name = name_of(&r.hotkey);
        if let Some(f) = r.failed {
            eprintln!("{name}: {f}");
            caught.entry(name.to_string()).or_default().push(f.check);
        }
    };
    for _ in 0..2 {
        for r in verifier.round().await.unwrap() {
            note(r, &mut caught);
        }
    }
    let mg = chain.metagraph().await.unwrap();
    let epoch = mg.block / 5;
    for round in 0..EXTRA_ROUNDS {
        let left: Vec<_> = verifier
            .provers(&mg)
            .into_iter()
            .filter(|n| {
                let name = name_of(&n.hotkey);
                !name.starts_with("honest") && !caught.contains_key(name)
            })
            .collect();
        if left.is_empty() {
            eprintln!("every cheater caught after {} extra rounds", round);
            break;
        }
        let model = verifier.models()[0];
        let results = futures_util::future::join_all(
            left.iter().map(|n| verifier.challenge(n, epoch, &model)),
        )
        .await;
        for r in results {
            note(r.unwrap(), &mut caught);
        }
    }
    for (name, _) in &provers {
        if name.starts_with("honest") {
            assert!(
                !caught.contains_key(*name),
                "{name} flagged: {:?}",
                caught.get(*name)
            );
        } else {
            let checks = caught
                .get(*name)
                .unwrap_or_else(|| panic!("{name} was never caught"));
            // Caught by a check meant for it.
            assert!(
                checks.iter().all(|c| allowed[name].contains(c)),
                "{name} caught by {checks:?}, expected one of {:?}",
                allowed[name]
            );
        }
    }

    let set = verifier.set_weights().await.unwrap().expect("weights set");
    assert_eq!(set.len(), 3, "only honest provers get weight: {set:?}");
    chain.produce_blocks(5).unwrap();
    let mg = chain.metagraph().await.unwrap();
    for (name, hot) in &provers {
        let n = mg.neuron(&hot.hotkey()).unwrap();
        if name.starts_with("honest") {
            assert!(n.incentive > 0.2, "{name}: incentive {}", n.incentive);
        } else {
            assert_eq!(n.incentive, 0.0, "{name}");
            assert_eq!(n.emission, Rao(0), "{name}");
        }
    }
    assert!(mg.neuron(&vkey.hotkey()).unwrap().dividends > 0.99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_regeneration_mode_and_audits_of_routed_jobs() {
    let params = Hyperparams {
        tempo: 5,
        ..Hyperparams::default()
    };
    let (chain, vkey, auth) = local_grid(params, 1).await;
    let cpu = Device::Cpu;
    let base = || Model::tiny(TinyVariant::Base, &cpu).unwrap();
    let honest = start_prover(
        &chain,
        "honest",
        pinned(base()),
        Strategy::Honest,
        auth.clone(),
    )
    .await;
    let fewer = start_prover(
        &chain,
        "fewer",
        pinned(base()),
        Strategy::FewerSteps,
        auth.clone(),
    )
    .await;
    let random = start_prover(
        &chain,
        "random",
        pinned(base()),
        Strategy::RandomLatents,
        auth.clone(),
    )
    .await;
    let manifest = tiny::manifest(TinyVariant::Base);
    let config = VerifierConfig {
        size: Size {
            width: 32,
            height: 32,
        },
        frames: 3,
        steps: 4,
        mode: fractal_verifier::AuditMode::Full,
        audit_sample: 1.0,
        ..VerifierConfig::from_manifest(&manifest)
    };
    let verifier = Verifier::new(
        vkey,
        chain.clone(),
        Arc::new(pinned(base())),
        Store::in_memory().unwrap(),
        config,
    )
    .unwrap();
    let results = verifier.round().await.unwrap();
    let failed = |k: &Keypair| {
        results
            .iter()
            .find(|r| r.hotkey == k.hotkey())
            .unwrap()
            .failed
            .clone()
    };
    assert_eq!(failed(&honest), None);
    assert_eq!(failed(&fewer).map(|f| f.check), Some(Check::Frame));
    assert_eq!(failed(&random).map(|f| f.check), Some(Check::Frame));

    // An app's job routed to the random-latents prover is audited too.
    let mg = chain.metagraph().await.unwrap();
    let neuron = mg.neuron(&random.hotkey()).unwrap().clone();
    let before = verifier
        .scores()
        .unwrap()
        .into_iter()
        .find(|s| s.hotkey == random.hotkey())
        .unwrap()
        .failed;
    verifier
        .forward(&neuron, verifier.synthetic_request(), &mut |_| {})
        .await
        .unwrap();
    let mut caught = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = verifier
            .scores()
            .unwrap()
            .into_iter()
            .find(|s| s.hotkey == random.hotkey())
            .unwrap();
        if s.failed > before {
            caught = true;
            break;
        }
    }
    assert!(caught, "the routed job was not audited");
}
