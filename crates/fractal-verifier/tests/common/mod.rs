//! What the verifier's end-to-end tests share: keys, the tiny model, a
//! local chain with a staked validator, provers on loopback.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fractal_chain::{Chain, Hyperparams, LocalChain, Rao};
use fractal_engine::{builtin::tiny, pipelines::text_to_video_sd::Model, PinnedModel, TinyVariant};
use fractal_protocol::manifest::Size;
use fractal_protocol::Keypair;
use fractal_prover::{Prover, ProverConfig, Strategy, ValidatorAuthorizer};
use fractal_verifier::store::Store;
use fractal_verifier::{Verifier, VerifierConfig};

pub fn key(tag: &str) -> Keypair {
    let mut seed = [7u8; 32];
    seed[..tag.len()].copy_from_slice(tag.as_bytes());
    Keypair::from_seed(&seed)
}

/// `model` claiming the tiny model's manifest (cheaters run other weights).
pub fn pinned(model: Model) -> PinnedModel {
    PinnedModel::from_parts(tiny::manifest(TinyVariant::Base), model).unwrap()
}

/// A local chain (epochs of `tempo` blocks) with the verifier registered
/// and staked `stake_tao`, past its first epoch so it holds a permit; and
/// the authorizer provers admit it with.
pub async fn local_grid(
    params: Hyperparams,
    stake_tao: u64,
) -> (Arc<LocalChain>, Keypair, Arc<ValidatorAuthorizer>) {
    let tempo = params.tempo;
    let chain = Arc::new(LocalChain::in_memory(params, key("owner").hotkey()).unwrap());
    let vkey = key("verifier");
    chain.register(&key("vcold"), &vkey.hotkey()).await.unwrap();
    chain
        .add_stake(&key("vcold"), &vkey.hotkey(), Rao(stake_tao * Rao::PER_TAO))
        .await
        .unwrap();
    chain.produce_blocks(tempo).unwrap();
    let auth = ValidatorAuthorizer::new([]);
    auth.update(&chain.metagraph().await.unwrap());
    (chain, vkey, auth)
}

/// Registers `name`'s hotkey, serves `model` (which claims a manifest it
/// may not run) as `strategy` on loopback and
/// announces `announce(addr)` (the prover's own address, or a link in
/// front of it).
pub async fn start_prover(
    chain: &Arc<LocalChain>,
    name: &str,
    model: PinnedModel,
    strategy: Strategy,
    auth: Arc<ValidatorAuthorizer>,
) -> Keypair {
    let (hot, addr) = serve_prover(chain, name, model, strategy, auth).await;
    fractal_prover::announce(chain.as_ref(), &hot, addr)
        .await
        .unwrap();
    hot
}

/// Registers and serves a prover without announcing it.
pub async fn serve_prover(
    chain: &Arc<LocalChain>,
    name: &str,
    model: PinnedModel,
    strategy: Strategy,
    auth: Arc<ValidatorAuthorizer>,
) -> (Keypair, std::net::SocketAddr) {
    let hot = key(name);
    chain
        .register(&key(&format!("c{name}")), &hot.hotkey())
        .await
        .unwrap();
    let prover = Prover::new(
        hot.clone(),
        model,
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
    (hot, addr)
}

/// A verifier on the tiny model that challenges with small jobs (32x32, 2
/// frames, 3 steps), keeping its store in memory.
pub fn tiny_verifier(
    vkey: Keypair,
    chain: Arc<LocalChain>,
    audit_deadline: Duration,
) -> Arc<Verifier> {
    let manifest = tiny::manifest(TinyVariant::Base);
    let config = VerifierConfig {
        size: Size {
            width: 32,
            height: 32,
        },
        frames: 2,
        steps: 3,
        audit_deadline,
        ..VerifierConfig::from_manifest(&manifest)
    };
    Verifier::new(
        vkey,
        chain,
        Arc::new(pinned(
            Model::tiny(TinyVariant::Base, &Device::Cpu).unwrap(),
        )),
        Store::in_memory().unwrap(),
        config,
    )
    .unwrap()
}
