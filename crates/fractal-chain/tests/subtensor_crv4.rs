//! Timelocked commit-reveal (CRv4) against the reference implementations'
//! vectors (fixtures/subtensor/crv4.json, made by
//! tools/interop/drand_vectors.sh from bittensor 11.3.0 and bittensor-drand
//! 2.0.0): the drand round a commit is encrypted to, the ciphertexts both
//! ways through quicknet's public round-1000 pulse, and the call data.
#![cfg(feature = "subtensor")]

use fractal_chain::subtensor::calls;
use fractal_chain::subtensor::epoch::EpochState;
use fractal_chain::subtensor::timelock::{self, WeightsPayload};
use serde_json::Value as Json;

mod subtensor_fixtures;
use subtensor_fixtures::{crv4, offline_client, unhex};

fn state(c: &Json) -> EpochState {
    let s = &c["state"];
    let n = |k: &str| s[k].as_u64().unwrap();
    EpochState {
        block: n("current_block"),
        tempo: n("tempo") as u16,
        last_epoch_block: n("last_epoch_block"),
        pending_epoch_at: n("pending_epoch_at"),
        epoch_index: n("subnet_epoch_index"),
        blocks_since_last_step: n("blocks_since_last_step"),
    }
}

/// Our round for a recorded case: reveal block replayed, then timed.
fn our_round(c: &Json) -> u64 {
    let s = state(c);
    let reveal_block = s
        .first_reveal_block(c["reveal_period"].as_u64().unwrap())
        .unwrap();
    timelock::reveal_round(
        reveal_block,
        s.block,
        c["block_time"].as_f64().unwrap(),
        c["now"].as_f64().unwrap(),
    )
}

fn round_1000_signature() -> Vec<u8> {
    unhex(crv4()["quicknet_round_1000_signature"].as_str().unwrap())
}

#[test]
fn reveal_rounds_equal_the_sdks() {
    let v = crv4();
    let cases = v["reveal_rounds"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        assert_eq!(
            our_round(c),
            c["reveal_round"].as_u64().unwrap(),
            "{}",
            c["name"]
        );
    }
}

#[test]
fn the_recorded_signature_is_quicknets_round_1000_pulse() {
    let sig = round_1000_signature();
    assert!(timelock::is_quicknet_pulse(1000, &sig));
    assert!(!timelock::is_quicknet_pulse(999, &sig));
}

#[test]
fn the_sdks_commit_opens_to_our_payload_encoding() {
    let v = crv4();
    let c = &v["sdk_commit"];
    assert_eq!(our_round(c), 1000);
    let payload = WeightsPayload {
        hotkey: unhex(c["hotkey"].as_str().unwrap()),
        uids: serde_json::from_value(c["uids"].clone()).unwrap(),
        values: serde_json::from_value(c["values"].clone()).unwrap(),
        version_key: c["version_key"].as_u64().unwrap(),
    };
    assert_eq!(
        hex::encode(payload.encode()),
        c["payload"].as_str().unwrap()
    );
    for key in ["ciphertext", "drand_ciphertext"] {
        let ct = unhex(c[key].as_str().unwrap());
        let opened = timelock::decrypt(&ct, &round_1000_signature()).unwrap();
        assert_eq!(
            WeightsPayload::decode(&opened).as_ref(),
            Some(&payload),
            "{key}"
        );
    }
}

#[test]
fn their_ciphertexts_open_with_ours_and_ours_opened_with_theirs() {
    let v = crv4();
    let sig = round_1000_signature();
    let theirs = v["theirs_at_1000"].as_array().unwrap();
    assert!(!theirs.is_empty());
    for t in theirs {
        let opened = timelock::decrypt(&unhex(t["ciphertext"].as_str().unwrap()), &sig).unwrap();
        assert_eq!(
            hex::encode(opened),
            t["plaintext"].as_str().unwrap(),
            "{}",
            t["by"]
        );
    }
    // What our encoder wrote when the fixtures were made, opened there by
    // both references; it still opens here, and a fresh encryption of the
    // same plaintext opens too (and differs: the key is random).
    for o in v["ours_at_1000"].as_array().unwrap() {
        assert_eq!(o["decrypted_by"].as_array().unwrap().len(), 2);
        let recorded = unhex(o["ciphertext"].as_str().unwrap());
        let plaintext = unhex(o["plaintext"].as_str().unwrap());
        assert_eq!(timelock::decrypt(&recorded, &sig).unwrap(), plaintext);
        let fresh = timelock::encrypt(&plaintext, 1000);
        assert_ne!(fresh, recorded);
        assert_eq!(fresh.len(), recorded.len());
        assert_eq!(timelock::decrypt(&fresh, &sig).unwrap(), plaintext);
    }
}

#[test]
fn commit_call_data_equals_the_sdks() {
    let v = crv4();
    let c = &v["call"];
    let commit = unhex(v["sdk_commit"]["ciphertext"].as_str().unwrap());
    let offline = offline_client();
    let at = offline.at_block(1u64).unwrap();
    let ours = at
        .tx()
        .call_data(&calls::commit_timelocked(
            c["netuid"].as_u64().unwrap() as u16,
            &commit,
            c["reveal_round"].as_u64().unwrap(),
            c["commit_reveal_version"].as_u64().unwrap() as u16,
        ))
        .unwrap();
    assert_eq!(
        format!("0x{}", hex::encode(ours)),
        c["data_hex"].as_str().unwrap()
    );
}

#[test]
fn the_runtime_defaults_to_version_4() {
    let v = crv4();
    assert_eq!(
        v["storage"]["CommitRevealWeightsVersion"]["default_hex"],
        format!(
            "0x{}",
            hex::encode(timelock::COMMIT_REVEAL_VERSION.to_le_bytes())
        )
    );
}
