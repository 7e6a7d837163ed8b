//! A local chain, honest and cheating provers on loopback, one verifier:
//! every cheater ends with zero weight and incentive, honest provers earn.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fractal_chain::{Chain, Hyperparams, LocalChain, Rao};
use fractal_engine::tokenizer::ClipTokenizer;
use fractal_engine::{tiny, Model, PinnedModel, TinyVariant};
use fractal_protocol::manifest::Size;
use fractal_protocol::Keypair;
use fractal_prover::{Prover, ProverConfig, Strategy, ValidatorAuthorizer};
use fractal_verifier::audit::Check;
use fractal_verifier::store::Store;
use fractal_verifier::{Verifier, VerifierConfig};

fn key(tag: &str) -> Keypair {
    let mut seed = [7u8; 32];
    seed[..tag.len()].copy_from_slice(tag.as_bytes());
    Keypair::from_seed(&seed)
}

fn pinned(model: Model) -> PinnedModel {
    PinnedModel::from_parts(
        tiny::manifest(TinyVariant::Base),
        model,
        ClipTokenizer::builtin().unwrap(),
    )
    .unwrap()
}

async fn start_prover(
    chain: &Arc<LocalChain>,
    name: &str,
    model: Model,
    strategy: Strategy,
    auth: Arc<ValidatorAuthorizer>,
) -> Keypair {
    let hot = key(name);
    chain
        .register(&key(&format!("c{name}")), &hot.hotkey())
        .await
        .unwrap();
    let prover = Prover::new(
        hot.clone(),
        pinned(model),
        ProverConfig {
            strategy,
            ..ProverConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(fractal_prover::serve(
        listener,
        prover,
        auth,
        std::future::pending(),
    ));
    fractal_prover::announce(chain.as_ref(), &hot, addr)
        .await
        .unwrap();
    hot
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_cheater_is_caught_and_honest_provers_earn() {
    let params = Hyperparams {
        tempo: 5,
        weights_rate_limit: 1,
        ..Hyperparams::default()
    };
    let chain = Arc::new(LocalChain::in_memory(params, key("owner").hotkey()).unwrap());
    let vkey = key("verifier");
    let vcold = key("vcold");
    chain.register(&vcold, &vkey.hotkey()).await.unwrap();
    chain
        .add_stake(&vcold, &vkey.hotkey(), Rao(100 * Rao::PER_TAO))
        .await
        .unwrap();
    chain.produce_blocks(5).unwrap();
    let auth = ValidatorAuthorizer::new([]);
    auth.update(&chain.metagraph().await.unwrap());

    let cpu = Device::Cpu;
    let base = || Model::tiny(TinyVariant::Base, &cpu).unwrap();
    let deadline = Duration::from_secs(20);
    let mut provers: Vec<(&str, Keypair)> = Vec::new();
    for name in ["honest-a", "honest-b", "honest-c"] {
        provers.push((
            name,
            start_prover(&chain, name, base(), Strategy::Honest, auth.clone()).await,
        ));
    }
    let cheats: Vec<(&str, Model, Strategy)> = vec![
        ("fewer-steps", base(), Strategy::FewerSteps),
        (
            "perturbed-1pct",
            Model::tiny_degraded(TinyVariant::Base, fractal_engine::Degradation::Perturbed(0.01), &cpu).unwrap(),
            Strategy::Honest,
        ),
        (
            "other-model",
            Model::tiny(TinyVariant::Wide, &cpu).unwrap(),
            Strategy::Honest,
        ),
        ("random-latents", base(), Strategy::RandomLatents),
        ("replay-cached", base(), Strategy::ReplayCached),
        ("inconsistent-audit", base(), Strategy::InconsistentAudit),
        ("fabricated-audit", base(), Strategy::FabricatedAudit),
        (
            "late",
            base(),
            Strategy::Late(deadline + Duration::from_secs(2)),
        ),
    ];
    for (name, model, strategy) in cheats {
        provers.push((
            name,
            start_prover(&chain, name, model, strategy, auth.clone()).await,
        ));
    }
    chain.produce_blocks(1).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let manifest = tiny::manifest(TinyVariant::Base);
    let config = VerifierConfig {
        size: Size {
            width: 32,
            height: 32,
        },
        frames: 4,
        steps: 4,
        deadline,
        ..VerifierConfig::from_manifest(&manifest)
    };
    let model = Arc::new(pinned(base()));
    let verifier = Verifier::new(
        vkey.clone(),
        chain.clone(),
        model,
        Store::open(&dir.path().join("verifier.sqlite")).unwrap(),
        config,
    )
    .unwrap();

    let mut caught: BTreeMap<String, Vec<Check>> = BTreeMap::new();
    for _round in 0..2 {
        for r in verifier.round().await.unwrap() {
            let name = provers.iter().find(|p| p.1.hotkey() == r.hotkey).unwrap().0;
            if let Some(f) = r.failed {
                eprintln!("{name}: {f}");
                caught.entry(name.to_string()).or_default().push(f.check);
            }
        }
        chain.produce_blocks(1).unwrap();
    }
    for (name, _) in &provers {
        if name.starts_with("honest") {
            assert!(
                !caught.contains_key(*name),
                "{name} flagged: {:?}",
                caught.get(*name)
            );
        } else {
            assert!(caught.contains_key(*name), "{name} was never caught");
        }
    }
    // Each cheat is caught by the check meant for it.
    assert!(caught["random-latents"].contains(&Check::InitialNoise));
    assert!(caught["replay-cached"].contains(&Check::InitialNoise));
    assert!(caught["fewer-steps"].contains(&Check::Step));
    assert!(caught["perturbed-1pct"].contains(&Check::Step));
    assert!(caught["other-model"].contains(&Check::Step));
    assert!(caught["inconsistent-audit"].contains(&Check::Commitment));
    assert!(caught["fabricated-audit"].contains(&Check::Commitment));
    assert!(caught["late"].contains(&Check::Late));

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
    let chain = Arc::new(
        LocalChain::in_memory(
            Hyperparams {
                tempo: 5,
                ..Hyperparams::default()
            },
            key("owner").hotkey(),
        )
        .unwrap(),
    );
    let vkey = key("verifier");
    chain.register(&key("vcold"), &vkey.hotkey()).await.unwrap();
    chain
        .add_stake(&key("vcold"), &vkey.hotkey(), Rao(Rao::PER_TAO))
        .await
        .unwrap();
    chain.produce_blocks(5).unwrap();
    let auth = ValidatorAuthorizer::new([]);
    auth.update(&chain.metagraph().await.unwrap());
    let cpu = Device::Cpu;
    let base = || Model::tiny(TinyVariant::Base, &cpu).unwrap();
    let honest = start_prover(&chain, "honest", base(), Strategy::Honest, auth.clone()).await;
    let fewer = start_prover(&chain, "fewer", base(), Strategy::FewerSteps, auth.clone()).await;
    let random = start_prover(
        &chain,
        "random",
        base(),
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
