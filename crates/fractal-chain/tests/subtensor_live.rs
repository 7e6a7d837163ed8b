//! The subtensor backend against a real node; runs only when
//! `FRACTAL_SUBTENSOR_URL` is set (e.g. `ws://127.0.0.1:9944` for a
//! subtensor localnet), on subnet `FRACTAL_SUBTENSOR_NETUID` (default 1).
//! Reads only, unless `FRACTAL_SUBTENSOR_COLDKEY_URI` names a funded coldkey
//! (`//Alice` on a localnet): then it also registers a fresh hotkey, serves
//! an axon and stakes to it.
#![cfg(feature = "subtensor")]

use std::time::Duration;

use fractal_chain::subtensor::SubtensorChain;
use fractal_chain::{AxonInfo, Chain, Rao};
use fractal_protocol::Keypair;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::test]
async fn live_subtensor() {
    let Some(url) = env("FRACTAL_SUBTENSOR_URL") else {
        eprintln!("FRACTAL_SUBTENSOR_URL is not set: live subtensor test skipped");
        return;
    };
    let netuid: u16 = env("FRACTAL_SUBTENSOR_NETUID")
        .map(|n| n.parse().expect("FRACTAL_SUBTENSOR_NETUID"))
        .unwrap_or(1);
    let state = tempfile::tempdir().unwrap();
    let chain = SubtensorChain::connect(&url, netuid, state.path())
        .await
        .expect("connect");
    let block = chain.block().await.unwrap();
    assert!(block > 0);
    let p = chain.hyperparams().await.unwrap();
    assert_eq!(p.netuid, netuid);
    assert!(p.tempo > 0 && p.max_uids > 0);
    let mg = chain.metagraph().await.unwrap();
    assert!(mg.block >= block);
    assert!(mg.neurons.len() <= p.max_uids as usize);
    let next = chain
        .wait_for_block_after(block, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(next > block, "no new block within a minute");
    eprintln!(
        "{url} netuid {netuid}: block {next}, spec {}, {} neurons, rules {p:?}",
        chain.spec_version().await.unwrap(),
        mg.neurons.len()
    );

    let Some(coldkey_uri) = env("FRACTAL_SUBTENSOR_COLDKEY_URI") else {
        return;
    };
    let coldkey = Keypair::from_suri(&coldkey_uri).unwrap();
    let hotkey = Keypair::from_suri(&format!("//Fractal//live//{next}")).unwrap();
    let before = chain.balance(&coldkey.hotkey()).await.unwrap();
    let uid = chain.register(&coldkey, &hotkey.hotkey()).await.unwrap();
    assert!(chain.balance(&coldkey.hotkey()).await.unwrap() < before);
    let axon = AxonInfo {
        ip: "10.0.0.1".parse().unwrap(),
        port: 8091,
        version: 1,
    };
    chain.serve_axon(&hotkey, axon.clone()).await.unwrap();
    chain
        .add_stake(&coldkey, &hotkey.hotkey(), Rao(Rao::PER_TAO))
        .await
        .unwrap();
    let mg = chain.metagraph().await.unwrap();
    let n = mg.by_uid(uid).expect("registered neuron");
    assert_eq!(n.hotkey, hotkey.hotkey());
    assert_eq!(n.axon.as_ref(), Some(&axon));
    assert!(n.stake.0 > 0);
}
