//! The subtensor backend's encoding and decoding, offline, against the
//! reference SDK: fixtures/subtensor holds a subtensor node's runtime
//! metadata (spec 461) and what bittensor 11.3.0 encoded and decoded against
//! that node (cut by tools/interop/subtensor_vectors.sh).
#![cfg(feature = "subtensor")]

use fractal_chain::subtensor::{self, calls, commit_hash};
use fractal_chain::{AxonInfo, Rao};
use fractal_protocol::Hotkey;
use serde_json::Value as Json;
use subxt::config::SubstrateConfig;
use subxt::config::SubstrateExtrinsicParamsBuilder as Params;
use subxt::utils::{AccountId32, MultiSignature};

mod subtensor_fixtures;
use subtensor_fixtures::{golden, metadata_bytes, offline_client, runtime_call, unhex};

fn hotkey(ss58: &str) -> Hotkey {
    Hotkey::from_ss58(ss58).unwrap()
}

fn golden_call(g: &Json, function: &str) -> (Json, Vec<u8>) {
    let c = g["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["function"] == function)
        .unwrap_or_else(|| panic!("no golden {function}"));
    (c["params"].clone(), unhex(c["data_hex"].as_str().unwrap()))
}

#[test]
fn call_data_matches_the_sdk() {
    let g = golden();
    let at = offline_client().at_block(1u64).unwrap();
    let tx = at.tx();

    let (p, want) = golden_call(&g, "set_weights");
    let u16s = |k: &str| -> Vec<u16> {
        p[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u16)
            .collect()
    };
    let got = tx
        .call_data(&calls::set_weights(
            p["netuid"].as_u64().unwrap() as u16,
            &u16s("dests"),
            &u16s("weights"),
            p["version_key"].as_u64().unwrap(),
        ))
        .unwrap();
    assert_eq!(hex::encode(got), hex::encode(want), "set_weights");

    let (p, want) = golden_call(&g, "burned_register");
    let got = tx
        .call_data(&calls::burned_register(
            p["netuid"].as_u64().unwrap() as u16,
            &hotkey(p["hotkey"].as_str().unwrap()),
        ))
        .unwrap();
    assert_eq!(hex::encode(got), hex::encode(want), "burned_register");

    let (p, want) = golden_call(&g, "add_stake");
    let got = tx
        .call_data(&calls::add_stake(
            p["netuid"].as_u64().unwrap() as u16,
            &hotkey(p["hotkey"].as_str().unwrap()),
            Rao(p["amount_staked"].as_u64().unwrap()),
        ))
        .unwrap();
    assert_eq!(hex::encode(got), hex::encode(want), "add_stake");
}

#[test]
fn our_other_calls_fit_the_runtime() {
    // No SDK vectors for these: check the node's metadata accepts them and
    // the bytes are the pallet/call index followed by the fields in order.
    let at = offline_client().at_block(1u64).unwrap();
    let tx = at.tx();
    let axon = AxonInfo {
        ip: "10.1.2.3".parse().unwrap(),
        port: 8091,
        version: 7,
    };
    let data = tx.call_data(&calls::serve_axon(3, &axon)).unwrap();
    let mut fields = vec![];
    fields.extend(3u16.to_le_bytes());
    fields.extend(7u32.to_le_bytes());
    fields.extend(u128::from(u32::from_be_bytes([10, 1, 2, 3])).to_le_bytes());
    fields.extend(8091u16.to_le_bytes());
    fields.extend([4u8, 0, 0, 0]);
    assert_eq!(data[0], 7, "SubtensorModule's pallet index");
    assert_eq!(&data[2..], &fields[..]);

    let hash = [0xab; 32];
    let data = tx.call_data(&calls::commit_weights(1, hash)).unwrap();
    assert_eq!(
        &data[2..],
        &[&1u16.to_le_bytes()[..], &hash[..]].concat()[..]
    );

    let c = subtensor::PendingCommit {
        hotkey: Hotkey([1; 32]),
        netuid: 1,
        hash: hex::encode(hash),
        uids: vec![0, 1],
        values: vec![65535, 100],
        salt: vec![9; 8],
        version_key: 5,
        commit_block: 10,
    };
    let data = tx.call_data(&calls::reveal_weights(&c)).unwrap();
    let mut want = 1u16.to_le_bytes().to_vec();
    want.extend([0x08, 0, 0, 1, 0]); // uids: compact len 2, then u16s
    want.extend([0x08, 0xff, 0xff, 100, 0]);
    want.push(0x20); // salt: compact len 8
    want.extend([9, 0].repeat(8));
    want.extend(5u64.to_le_bytes());
    assert_eq!(&data[2..], &want[..]);
}

#[test]
fn signer_payloads_and_signed_extrinsics_match_the_sdk() {
    let g = golden();
    let at = offline_client().at_block(1u64).unwrap();
    let tx = at.tx();
    // The SDK's vectors sign a Balances transfer; the extensions (nonce,
    // era, tip, spec and tx versions, genesis, metadata hash) are what
    // every call of ours carries too.
    let call_bytes = unhex(
        g["signature_payloads"][0]["call_data_hex"]
            .as_str()
            .unwrap(),
    );
    let dest = &call_bytes[3..35];
    let value = 12345u128;
    let call = subxt::dynamic::transaction(
        "Balances",
        "transfer_keep_alive",
        vec![
            subxt::dynamic::Value::unnamed_variant(
                "Id",
                vec![subxt::dynamic::Value::from_bytes(dest)],
            ),
            subxt::dynamic::Value::u128(value),
        ],
    );
    assert_eq!(tx.call_data(&call).unwrap(), call_bytes);

    let immortal = &g["signature_payloads"][0];
    let params = Params::<SubstrateConfig>::new()
        .nonce(immortal["nonce"].as_u64().unwrap())
        .tip(0)
        .immortal()
        .build();
    let signable = tx.create_signable_offline(&call, params).unwrap();
    assert_eq!(
        hex::encode(signable.signer_payload().unwrap()),
        hex::encode(unhex(immortal["payload_hex"].as_str().unwrap()))
    );

    let x = &g["extrinsics"][0];
    assert_eq!(x["era"], "00");
    let params = Params::<SubstrateConfig>::new()
        .nonce(x["nonce"].as_u64().unwrap())
        .tip(0)
        .immortal()
        .build();
    let mut signable = tx.create_signable_offline(&call, params).unwrap();
    let who = AccountId32(
        unhex(x["public_key_hex"].as_str().unwrap())
            .try_into()
            .unwrap(),
    );
    let sig = MultiSignature::Sr25519(
        unhex(x["signature_hex"].as_str().unwrap())
            .try_into()
            .unwrap(),
    );
    let signed = signable
        .sign_with_account_and_signature(&who, &sig)
        .unwrap();
    assert_eq!(
        hex::encode(signed.encoded()),
        hex::encode(unhex(x["extrinsic_hex"].as_str().unwrap()))
    );
}

#[test]
fn a_wallet_key_signs_verifiably() {
    // A real signature from one of our keys over the signer payload, checked
    // the way the runtime checks it (sr25519, substrate context).
    let at = offline_client().at_block(1u64).unwrap();
    let kp = fractal_protocol::Keypair::from_suri("//Alice").unwrap();
    let call = calls::set_weights(1, &[0, 1], &[65535, 30000], 0);
    let mut signable = at
        .tx()
        .create_signable_offline(&call, Params::<SubstrateConfig>::new().nonce(3).build())
        .unwrap();
    let payload = signable.signer_payload().unwrap();
    let sig = kp.sign(&payload);
    assert!(kp.hotkey().verify(&payload, &sig));
    let who = AccountId32(kp.hotkey().0);
    let signed = signable
        .sign_with_account_and_signature(&who, &MultiSignature::Sr25519(sig))
        .unwrap();
    // Signed v4 extrinsic: 0x84, then MultiAddress::Id(Alice), then the sr25519 signature.
    let bytes = signed.encoded();
    let start = bytes.iter().position(|&b| b == 0x84).unwrap();
    assert_eq!(bytes[start + 1], 0);
    assert_eq!(&bytes[start + 2..start + 34], &kp.hotkey().0);
    assert_eq!(bytes[start + 34], 1, "MultiSignature::Sr25519");
    assert_eq!(&bytes[start + 35..start + 99], &sig);
}

#[test]
fn neurons_lite_decode_like_the_sdk() {
    let g = golden();
    let md = subtensor::metadata_from_bytes(&metadata_bytes()).unwrap();
    let call = runtime_call(&g, "get_neurons_lite");
    let neurons =
        subtensor::decode_neurons_lite(&md, &unhex(call["raw_hex"].as_str().unwrap())).unwrap();
    let want = call["decoded"].as_array().unwrap();
    assert_eq!(neurons.len(), want.len());
    for (n, w) in neurons.iter().zip(want) {
        assert_eq!(n.uid as u64, w["uid"].as_u64().unwrap());
        assert_eq!(n.hotkey.to_ss58(), w["hotkey"].as_str().unwrap());
        assert_eq!(n.coldkey.to_ss58(), w["coldkey"].as_str().unwrap());
        let stake: u64 = w["stake"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[1].as_u64().unwrap())
            .sum();
        assert_eq!(n.stake, Rao(stake));
        assert_eq!(n.validator_permit, w["validator_permit"].as_bool().unwrap());
        assert_eq!(n.last_update, w["last_update"].as_u64().unwrap());
        assert_eq!(n.emission, Rao(w["emission"].as_u64().unwrap()));
        assert_eq!(n.trust, w["trust"].as_u64().unwrap() as f64 / 65535.0);
        assert_eq!(n.axon.is_some(), w["axon_info"]["ip"].as_u64() != Some(0));
    }
}

#[test]
fn hyperparams_decode_like_the_sdk() {
    let g = golden();
    let md = subtensor::metadata_from_bytes(&metadata_bytes()).unwrap();
    let call = runtime_call(&g, "get_subnet_hyperparams");
    let h = subtensor::decode_hyperparams(&md, &unhex(call["raw_hex"].as_str().unwrap()))
        .unwrap()
        .expect("subnet 1 exists");
    let w = &call["decoded"];
    let u = |k: &str| w[k].as_u64().unwrap();
    assert_eq!(h.kappa as u64, u("kappa"));
    assert_eq!(h.tempo as u64, u("tempo"));
    assert_eq!(h.immunity_period as u64, u("immunity_period"));
    assert_eq!(h.min_allowed_weights as u64, u("min_allowed_weights"));
    assert_eq!(h.weights_version, u("weights_version"));
    assert_eq!(h.weights_rate_limit, u("weights_rate_limit"));
    assert_eq!(h.activity_cutoff as u64, u("activity_cutoff"));
    assert_eq!(h.bonds_moving_avg, u("bonds_moving_avg"));
    assert_eq!(h.max_validators as u64, u("max_validators"));
    assert_eq!(h.commit_reveal_period, u("commit_reveal_period"));
    assert_eq!(
        h.commit_reveal_weights_enabled,
        w["commit_reveal_weights_enabled"].as_bool().unwrap()
    );
    // A subnet that does not exist answers None.
    assert_eq!(subtensor::decode_hyperparams(&md, &[0]).unwrap(), None);
    // Garbage is an error, not a panic; so is a real answer with bytes after it.
    assert!(subtensor::decode_hyperparams(&md, &[1, 2]).is_err());
    let mut long = unhex(call["raw_hex"].as_str().unwrap());
    long.push(0);
    assert!(subtensor::decode_hyperparams(&md, &long).is_err());
    assert!(subtensor::decode_neurons_lite(&md, &[0x04, 1, 2, 3]).is_err());
}

#[test]
fn commit_hash_is_blake2_256_of_the_scale_tuple() {
    // Preimage: hotkey (32 bytes), netuid u16 LE, then three compact-length
    // u16 vectors and the version key as u64 LE; digest by Python's
    // hashlib.blake2b(preimage, digest_size=32).
    let h = commit_hash(&Hotkey([7; 32]), 1, &[0, 2], &[65535, 1000], &[1, 2, 3], 9);
    assert_eq!(
        hex::encode(h),
        "212b410e81e8c3bae40c56a3837d4d03d67a20dd4b1491efb31ac0126d2cda0e"
    );
    // Any change to what is committed changes the hash.
    assert_ne!(
        h,
        commit_hash(&Hotkey([7; 32]), 1, &[0, 2], &[65535, 1000], &[1, 2, 4], 9)
    );
    assert_ne!(
        h,
        commit_hash(&Hotkey([7; 32]), 2, &[0, 2], &[65535, 1000], &[1, 2, 3], 9)
    );
}

#[test]
fn pending_commits_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("commits-1.json");
    let store = subtensor::CommitStore::open(&path).unwrap();
    assert!(store.pending().is_empty());
    let c = subtensor::PendingCommit {
        hotkey: Hotkey([1; 32]),
        netuid: 1,
        hash: "aa".into(),
        uids: vec![0],
        values: vec![65535],
        salt: vec![1; 8],
        version_key: 1,
        commit_block: 5,
    };
    store.add(c.clone()).unwrap();
    store
        .add(subtensor::PendingCommit {
            hash: "bb".into(),
            ..c.clone()
        })
        .unwrap();
    drop(store);
    let store = subtensor::CommitStore::open(&path).unwrap();
    assert_eq!(store.pending().len(), 2);
    store.remove("bb").unwrap();
    let store = subtensor::CommitStore::open(&path).unwrap();
    assert_eq!(store.pending(), vec![c]);
    std::fs::write(&path, b"{not json").unwrap();
    assert!(subtensor::CommitStore::open(&path).is_err());
}

#[test]
fn reveals_happen_in_the_reveal_epoch_only() {
    use subtensor::{reveal_timing, RevealTiming::*};
    // Committed in epoch 10 with a reveal period of 2: reveal in epoch 12.
    assert_eq!(reveal_timing(Some(10), 10, 2), NotYet);
    assert_eq!(reveal_timing(Some(10), 11, 2), NotYet);
    assert_eq!(reveal_timing(Some(10), 12, 2), Due);
    assert_eq!(reveal_timing(Some(10), 13, 2), Expired);
    assert_eq!(reveal_timing(None, 12, 2), NotOnChain);
    assert_eq!(reveal_timing(Some(u64::MAX), 0, 2), NotYet);
}

#[test]
fn weight_commits_storage_decodes() {
    // WeightCommits(netuid, hotkey) -> VecDeque<(H256, u64, u64, u64)>, as
    // the reveal task reads it, decoded against the runtime's own type.
    use scale_decode::DecodeAsType;
    let md = subtensor::metadata_from_bytes(&metadata_bytes()).unwrap();
    let entry = md
        .pallet_by_name("SubtensorModule")
        .unwrap()
        .storage()
        .unwrap()
        .entry_by_name("WeightCommits")
        .unwrap();
    let mut bytes = vec![0x04]; // one commit
    bytes.extend([0xcd; 32]);
    for x in [7u64, 1234, 0] {
        bytes.extend(x.to_le_bytes());
    }
    let got = Vec::<(subxt::utils::H256, u64, u64, u64)>::decode_as_type(
        &mut &bytes[..],
        entry.value_ty(),
        md.types(),
    )
    .unwrap();
    assert_eq!(got, vec![(subxt::utils::H256([0xcd; 32]), 7, 1234, 0)]);
}

fn metadata() -> &'static subxt::Metadata {
    static MD: std::sync::OnceLock<subxt::Metadata> = std::sync::OnceLock::new();
    MD.get_or_init(|| subtensor::metadata_from_bytes(&metadata_bytes()).unwrap())
}

proptest::proptest! {
    // A node's answers are input like any other: whatever bytes a node (or
    // something posing as one) sends, decoding answers Ok or Err, never panics.
    #[test]
    fn node_answers_never_panic_the_decoders(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
        let _ = subtensor::decode_neurons_lite(metadata(), &bytes);
        let _ = subtensor::decode_hyperparams(metadata(), &bytes);
    }

    #[test]
    fn truncated_real_answers_are_errors(cut in 0usize..183) {
        let g = golden();
        let raw = runtime_call(&g, "get_neurons_lite")["raw_hex"].as_str().unwrap().to_string();
        let bytes = unhex(&raw);
        let cut = cut.min(bytes.len() - 1);
        proptest::prop_assert!(subtensor::decode_neurons_lite(metadata(), &bytes[..cut]).is_err());
    }
}

#[test]
fn the_model_schedule_commitment_fits_the_runtime() {
    use fractal_chain::subtensor::commitment;
    use fractal_protocol::{Digest32, ManifestId, ModelSchedule, Upgrade};
    use subxt::ext::scale_decode::DecodeAsType;

    let md = subtensor::metadata_from_bytes(&metadata_bytes()).unwrap();
    let pallet = md
        .pallet_by_name("Commitments")
        .expect("the Commitments pallet");
    let max_fields = pallet.constant_by_name("MaxFields").unwrap().value();
    assert_eq!(
        max_fields,
        &(commitment::MAX_FIELDS as u32).to_le_bytes()[..]
    );
    let schedule = ModelSchedule::default()
        .with_upgrade(
            Upgrade {
                manifest: ManifestId(Digest32([7; 32])),
                at_block: 100,
                grace_blocks: 50,
            },
            1,
        )
        .unwrap();
    let ours = commitment::encode_schedule(&schedule);
    assert_eq!(ours.len(), 52);

    // A Registration as the chain stores it: deposit (u64), block (u32),
    // then the fields: someone else's Raw4 and our Raw52.
    let mut stored = 0u64.to_le_bytes().to_vec();
    stored.extend(1234u32.to_le_bytes());
    stored.push(0x08); // compact 2 fields
    stored.push(5); // Raw4 (None is 0, Raw0 is 1)
    stored.extend(b"abcd");
    stored.push(1 + ours.len() as u8);
    stored.extend(&ours);
    let ty = md
        .types()
        .types
        .iter()
        .find(|t| t.ty.path.segments == ["pallet_commitments", "types", "Registration"])
        .expect("the Registration type")
        .id;
    let mut rest = &stored[..];
    let value = subxt::dynamic::Value::decode_as_type(&mut rest, ty, md.types()).unwrap();
    assert!(rest.is_empty());
    let fields = commitment::registration_fields(&value).unwrap();
    assert_eq!(commitment::schedule_in(&fields).unwrap(), schedule);

    // Rewritten for the next schedule, their field stays first, unchanged.
    let next = schedule
        .with_upgrade(
            Upgrade {
                manifest: ManifestId(Digest32([8; 32])),
                at_block: 200,
                grace_blocks: 10,
            },
            120,
        )
        .unwrap();
    let at = offline_client().at_block(1u64).unwrap();
    let data = at
        .tx()
        .call_data(&commitment::set_commitment(
            9,
            commitment::fields_with(&fields, &next).unwrap(),
        ))
        .unwrap();
    let ours = commitment::encode_schedule(&next);
    let mut want = vec![pallet.call_index()];
    want.push(0); // set_commitment
    want.extend(9u16.to_le_bytes());
    want.extend([0x08, 5]);
    want.extend(b"abcd");
    want.push(1 + ours.len() as u8);
    want.extend(&ours);
    assert_eq!(hex::encode(&data), hex::encode(&want));
}
