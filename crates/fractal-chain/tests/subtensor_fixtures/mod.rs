//! fixtures/subtensor, shared by the subtensor tests: a node's runtime
//! metadata (spec 461) and the reference SDK's vectors against that node.
#![allow(dead_code)] // each test crate uses its own subset

use serde_json::Value as Json;
use subxt::config::SubstrateConfig;

pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/subtensor/");

pub fn golden() -> Json {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}golden.json")).unwrap()).unwrap()
}

/// Timelocked commit-reveal vectors (tools/interop/drand_vectors.sh).
pub fn crv4() -> Json {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}crv4.json")).unwrap()).unwrap()
}

pub fn metadata_bytes() -> Vec<u8> {
    std::fs::read(format!("{DIR}metadata-spec461.scale")).unwrap()
}

pub fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.trim_start_matches("0x")).unwrap()
}

/// The recorded runtime-API call `method` (with its params, raw answer and
/// the SDK's decoding).
pub fn runtime_call<'g>(g: &'g Json, method: &str) -> &'g Json {
    g["runtime_calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["method"] == method)
        .unwrap_or_else(|| panic!("no recorded {method}"))
}

/// A client for the recorded chain (genesis, versions, metadata), offline.
pub fn offline_client() -> subxt::OfflineClient<SubstrateConfig> {
    let g = golden();
    let net = &g["network"];
    fractal_chain::subtensor::offline_client(
        &metadata_bytes(),
        unhex(net["genesis_hash"].as_str().unwrap())
            .try_into()
            .unwrap(),
        net["spec_version"].as_u64().unwrap() as u32,
        net["transaction_version"].as_u64().unwrap() as u32,
    )
    .unwrap()
}
