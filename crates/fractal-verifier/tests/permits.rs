//! A verifier without a validator permit waits: it challenges nobody and
//! holds nothing against provers, including the refusals of provers that
//! have not yet seen the permit it was just granted.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fractal_chain::{Chain, Hyperparams, LocalChain, Rao};
use fractal_engine::{pipelines::text_to_video_sd::Model, TinyVariant};
use fractal_prover::{Strategy, ValidatorAuthorizer};
use fractal_verifier::Permit;

mod common;
use common::{key, pinned, start_prover, tiny_verifier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_permit_the_verifier_waits_and_holds_nothing_against_provers() {
    let tempo = 5;
    let params = Hyperparams {
        tempo,
        ..Hyperparams::default()
    };
    let chain = Arc::new(LocalChain::in_memory(params, key("owner").hotkey()).unwrap());
    let vkey = key("verifier");
    chain.register(&key("vcold"), &vkey.hotkey()).await.unwrap();
    chain
        .add_stake(&key("vcold"), &vkey.hotkey(), Rao(Rao::PER_TAO))
        .await
        .unwrap();
    // Provers admit validators with a permit, and nobody has one before
    // the first epoch.
    let auth = ValidatorAuthorizer::new([]);
    auth.update(&chain.metagraph().await.unwrap());
    let base = Model::tiny(TinyVariant::Base, &Device::Cpu).unwrap();
    start_prover(
        &chain,
        "prover",
        pinned(base),
        Strategy::Honest,
        auth.clone(),
    )
    .await;

    let verifier = tiny_verifier(vkey, chain.clone(), Duration::from_secs(5));

    let block = chain.block().await.unwrap();
    assert_eq!(
        verifier.permit_now().await.unwrap(),
        Permit::Missing {
            next_epoch_block: (block / tempo + 1) * tempo
        }
    );
    assert!(verifier.round().await.unwrap().is_empty(), "no challenges");
    assert!(verifier.scores().unwrap().is_empty(), "nothing recorded");

    // The chain grants the permit; the prover has not read it yet and
    // refuses: that is not held against it.
    chain.produce_blocks(tempo).unwrap();
    assert_eq!(verifier.permit_now().await.unwrap(), Permit::Held);
    let results = verifier.round().await.unwrap();
    assert_eq!(results.len(), 1);
    assert!(
        results[0].failed.is_none() && results[0].service_ms.is_none(),
        "{results:?}"
    );
    assert!(verifier.scores().unwrap().is_empty(), "nothing recorded");

    // Once it knows, the prover is challenged and passes, unblemished.
    auth.update(&chain.metagraph().await.unwrap());
    let results = verifier.round().await.unwrap();
    assert!(
        results[0].failed.is_none() && results[0].service_ms.is_some(),
        "{results:?}"
    );
    let scores = verifier.scores().unwrap();
    assert_eq!(scores.len(), 1);
    assert_eq!(
        (scores[0].passed, scores[0].failed, scores[0].unavailable),
        (1, 0, 0)
    );
}
