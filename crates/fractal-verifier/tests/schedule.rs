//! A verifier of two models following the chain's model schedule: it
//! challenges each prover under each served model the prover claims,
//! catches a prover claiming a model it does not run, and once the old
//! model is retired gives nothing to a prover left on it.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fractal_chain::{Chain, Hyperparams, LocalChain};
use fractal_engine::{builtin::tiny, pipelines::text_to_video_sd::Model, PinnedModel, TinyVariant};
use fractal_protocol::manifest::Size;
use fractal_protocol::{Keypair, Upgrade};
use fractal_prover::{Prover, ProverConfig, ValidatorAuthorizer};
use fractal_verifier::audit::Check;
use fractal_verifier::client::CallError;
use fractal_verifier::store::Store;
use fractal_verifier::{Verifier, VerifierConfig};

mod common;
use common::{key, local_grid};

fn model(v: TinyVariant) -> PinnedModel {
    PinnedModel::from_parts(tiny::manifest(v), Model::tiny(v, &Device::Cpu).unwrap()).unwrap()
}

/// Registers, serves and announces a prover of `models`.
async fn prover_of(
    chain: &Arc<LocalChain>,
    name: &str,
    models: Vec<PinnedModel>,
    auth: Arc<ValidatorAuthorizer>,
) -> Keypair {
    let hot = key(name);
    chain
        .register(&key(&format!("c{name}")), &hot.hotkey())
        .await
        .unwrap();
    let prover = Prover::serving(hot.clone(), models, ProverConfig::default()).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenges_and_weights_follow_the_schedule() {
    let tempo = 100;
    let (chain, vkey, auth) = local_grid(
        Hyperparams {
            tempo,
            ..Hyperparams::default()
        },
        10,
    )
    .await;
    let (a, b) = (model(TinyVariant::Base), model(TinyVariant::Wide));
    let (a_id, b_id) = (a.manifest_id, b.manifest_id);
    let stays = prover_of(
        &chain,
        "stays",
        vec![model(TinyVariant::Base)],
        auth.clone(),
    )
    .await;
    let moves = prover_of(
        &chain,
        "moves",
        vec![model(TinyVariant::Wide), model(TinyVariant::Base)],
        auth.clone(),
    )
    .await;
    // Claims the new model, runs the old one's weights.
    let liar = prover_of(
        &chain,
        "liar",
        vec![PinnedModel::from_parts(
            tiny::manifest(TinyVariant::Wide),
            Model::tiny(TinyVariant::Base, &Device::Cpu).unwrap(),
        )
        .unwrap()],
        auth,
    )
    .await;
    let config = VerifierConfig {
        size: Size {
            width: 32,
            height: 32,
        },
        frames: 2,
        steps: 3,
        ..VerifierConfig::from_manifest(&a.manifest)
    };
    let verifier = Verifier::auditing(
        vkey,
        chain.clone(),
        vec![Arc::new(a), Arc::new(b)],
        Store::in_memory().unwrap(),
        config,
    )
    .unwrap();

    let owner = key("owner").hotkey();
    for v in [TinyVariant::Base, TinyVariant::Wide] {
        chain
            .publish_manifest_signed_by(&owner, &tiny::manifest(v))
            .unwrap();
    }
    let now = chain.block().await.unwrap();
    chain
        .schedule_upgrade_signed_by(
            &owner,
            Upgrade {
                manifest: a_id,
                at_block: now + 1,
                grace_blocks: 1,
            },
        )
        .unwrap();
    chain
        .schedule_upgrade_signed_by(
            &owner,
            Upgrade {
                manifest: b_id,
                at_block: now + 3,
                grace_blocks: 3,
            },
        )
        .unwrap();
    let by = |results: &[fractal_verifier::JobResult], k: &Keypair| {
        results.iter().filter(|r| r.hotkey == k.hotkey()).count()
    };

    // Only A served: the liar claims nothing served and is left alone.
    chain.produce_blocks(1).unwrap();
    assert_eq!(verifier.audited_models(now + 1).await, [a_id]);
    let r = verifier.round().await.unwrap();
    assert_eq!((by(&r, &stays), by(&r, &moves), by(&r, &liar)), (1, 1, 0));
    assert!(r.iter().all(|r| r.failed.is_none()), "{r:?}");

    // The grace period: B and A. The prover of both is challenged under
    // each; the liar is caught under B.
    chain.produce_blocks(2).unwrap();
    assert_eq!(verifier.audited_models(now + 3).await, [b_id, a_id]);
    let r = verifier.round().await.unwrap();
    assert_eq!((by(&r, &stays), by(&r, &moves), by(&r, &liar)), (1, 2, 1));
    let caught = r.iter().find(|r| r.hotkey == liar.hotkey()).unwrap();
    assert!(
        matches!(
            caught.failed.as_ref().map(|f| f.check),
            Some(Check::ModelOutput | Check::Step | Check::Frame)
        ),
        "{caught:?}"
    );
    let uids = |w: &[(u16, u16)]| w.iter().map(|(u, _)| *u).collect::<Vec<_>>();
    let mg = chain.metagraph().await.unwrap();
    let uid = |k: &Keypair| mg.neuron(&k.hotkey()).unwrap().uid;
    let w = uids(&verifier.weights().await.unwrap());
    assert!(
        w.contains(&uid(&stays)) && w.contains(&uid(&moves)) && !w.contains(&uid(&liar)),
        "{w:?}"
    );

    // After the grace: B alone. The prover left on A is not challenged and
    // earns nothing; the one that moved does.
    chain.produce_blocks(3).unwrap();
    assert_eq!(verifier.audited_models(now + 6).await, [b_id]);
    let r = verifier.round().await.unwrap();
    assert_eq!((by(&r, &stays), by(&r, &moves)), (0, 1));
    let w = uids(&verifier.weights().await.unwrap());
    assert_eq!(w, [uid(&moves)], "only the prover serving B earns");

    // Manifest documents come from the provers that serve them, checked
    // against their ids.
    let mg = chain.metagraph().await.unwrap();
    let url = |k: &Keypair| fractal_verifier::axon_url(mg.neuron(&k.hotkey()).unwrap());
    let client = verifier.client();
    let doc = client
        .manifest(&url(&moves), &moves.hotkey(), &b_id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(doc.id(), b_id);
    let refused = client
        .manifest(&url(&stays), &stays.hotkey(), &b_id, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, CallError::Refused { status: 404, .. }),
        "{refused}"
    );
}
