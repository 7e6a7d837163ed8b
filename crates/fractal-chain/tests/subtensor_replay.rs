//! The subtensor backend's online read path (WebSocket, JSON-RPC, runtime
//! metadata, runtime API calls, storage) against a loopback node that
//! answers with what a real subtensor node answered the reference SDK
//! (fixtures/subtensor/golden.json): connect, block, hyperparameters,
//! metagraph and balance must come out as the SDK decoded them; and the
//! write path (sign, submit and watch, find the extrinsic in its block, read
//! its events) for registration and commit-reveal weights.
#![cfg(feature = "subtensor")]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::routing::get;
use fractal_chain::subtensor::timelock::{self, WeightsPayload};
use fractal_chain::subtensor::{calls, commit_hash, SubtensorChain};
use fractal_chain::{Chain, ChainError, Rao};
use fractal_protocol::{Hotkey, Keypair};
use serde_json::{json, Value as Json};
use subxt::ext::codec::{Decode, Encode};

mod subtensor_fixtures;
use subtensor_fixtures::{crv4, golden, metadata_bytes, offline_client, runtime_call, unhex};

struct Node {
    golden: Json,
    /// `Metadata_metadata_at_version(15)`'s answer: Some(opaque metadata).
    metadata_v15: String,
    /// Methods the node was asked for and does not know.
    unknown: Mutex<BTreeSet<String>>,
    /// Extrinsics submitted, in order.
    submitted: Mutex<Vec<Vec<u8>>>,
    /// Serve the recorded neuron with this hotkey instead of its own, and
    /// only once something was submitted (the registration).
    neuron_hotkey: Option<[u8; 32]>,
    /// Storage values served beyond the recorded ones, by key.
    storage: Vec<(Json, String)>,
}

fn hexs(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

impl Node {
    fn neurons(&self, recorded: &Json) -> Json {
        let Some(key) = self.neuron_hotkey else {
            return recorded.clone();
        };
        if self.submitted.lock().unwrap().is_empty() {
            return json!(hexs(&Vec::<u8>::new().encode()));
        }
        // One neuron: compact length 1, then its hotkey first.
        let mut raw = hex::decode(&recorded.as_str().unwrap()[2..]).unwrap();
        assert_eq!(raw[0], 0x04);
        raw[1..33].copy_from_slice(&key);
        json!(hexs(&raw))
    }

    /// The JSON-RPC result, and subscription notifications to send after it.
    fn answer(&self, method: &str, params: &Json) -> Result<(Json, Vec<Json>), String> {
        let g = &self.golden;
        let head = g["block"]["block_hash"].clone();
        Ok((
            match method {
                "rpc_methods" => json!({"methods": [
                "rpc_methods", "chain_getBlockHash", "chain_getHeader", "chain_getFinalizedHead",
                "chain_getBlock", "state_call", "state_getStorage", "state_getRuntimeVersion",
                "system_chain", "author_submitAndWatchExtrinsic", "author_unwatchExtrinsic"]}),
                "author_submitAndWatchExtrinsic" => {
                    let tx = hex::decode(&params[0].as_str().unwrap_or("0x")[2..]).unwrap();
                    self.submitted.lock().unwrap().push(tx);
                    let sub = json!("tx-1");
                    let note = |status: Json| {
                        json!({"jsonrpc": "2.0", "method": "author_extrinsicUpdate",
                           "params": {"subscription": sub, "result": status}})
                    };
                    return Ok((
                        sub.clone(),
                        vec![
                            note(json!("ready")),
                            note(json!({"inBlock": head})),
                            note(json!({"finalized": head})),
                        ],
                    ));
                }
                "author_unwatchExtrinsic" => json!(true),
                // The recorded block, with the last submitted extrinsic in place
                // of its third, whose success the recorded events report.
                "chain_getBlock" => {
                    let mut xts = g["block"]["extrinsics"].as_array().unwrap().clone();
                    if let Some(tx) = self.submitted.lock().unwrap().last() {
                        xts[2] = json!(hexs(tx));
                    }
                    json!({"block": {"header": g["block"]["header"], "extrinsics": xts},
                       "justifications": null})
                }
                "chain_getBlockHash" => match params[0].as_u64() {
                    Some(0) => g["network"]["genesis_hash"].clone(),
                    Some(67) | None => head,
                    Some(_) => Json::Null,
                },
                "chain_getFinalizedHead" => head,
                "chain_getHeader" => g["block"]["header"].clone(),
                "state_getRuntimeVersion" => json!({
                    "specName": "node-subtensor", "implName": "node-subtensor", "authoringVersion": 1,
                    "specVersion": g["network"]["spec_version"], "implVersion": 1, "apis": [],
                    "transactionVersion": g["network"]["transaction_version"], "stateVersion": 1,
                }),
                "system_chain" => json!("Bittensor"),
                "state_call" => {
                    let (name, args) = (
                        params[0].as_str().unwrap_or(""),
                        params[1].as_str().unwrap_or(""),
                    );
                    match name {
                        "Metadata_metadata_at_version" => json!(self.metadata_v15),
                        "Metadata_metadata_versions" => json!(hexs(&vec![14u32, 15].encode())),
                        // sp_version::RuntimeVersion: names, authoring, spec and impl
                        // versions, runtime APIs, transaction version, state version.
                        "Core_version" => {
                            let spec = g["network"]["spec_version"].as_u64().unwrap() as u32;
                            let tx = g["network"]["transaction_version"].as_u64().unwrap() as u32;
                            let apis: Vec<([u8; 8], u32)> = Vec::new();
                            let v = (
                                "node-subtensor",
                                "node-subtensor",
                                1u32,
                                spec,
                                1u32,
                                apis,
                                tx,
                                1u8,
                            );
                            json!(hexs(&v.encode()))
                        }
                        _ => {
                            let api = name.split('_').next().unwrap_or("");
                            let method = name.split_once('_').map(|(_, m)| m).unwrap_or("");
                            let call = g["runtime_calls"].as_array().unwrap().iter().find(|c| {
                                c["api"] == api
                                    && c["method"] == method
                                    && format!("0x{}", c["encoded_params_hex"].as_str().unwrap())
                                        == args
                            });
                            match call {
                                Some(c) if method == "get_neurons_lite" => {
                                    self.neurons(&c["raw_hex"])
                                }
                                Some(c) => c["raw_hex"].clone(),
                                // A new account: nonce 0.
                                None if name == "AccountNonceApi_account_nonce" => {
                                    json!(hexs(&0u32.encode()))
                                }
                                // No such subnet: `None`.
                                None if name == "SubnetInfoRuntimeApi_get_subnet_hyperparams" => {
                                    json!("0x00")
                                }
                                None => return Err(format!("state_call {name} {args}")),
                            }
                        }
                    }
                }
                "state_getStorage" if params[0] == g["events"]["key_hex"] => {
                    g["events"]["raw_hex"].clone()
                }
                "state_getStorage" => {
                    let key = params[0].as_str().unwrap_or("");
                    if let Some((_, v)) = self.storage.iter().find(|(k, _)| *k == params[0]) {
                        return Ok((json!(v), vec![]));
                    }
                    g["storage_values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|v| v["key_hex"] == key)
                        .map(|v| v["raw_hex"].clone())
                        // Everything else is unset, as on a young localnet.
                        .unwrap_or(Json::Null)
                }
                other => return Err(other.to_string()),
            },
            vec![],
        ))
    }
}

async fn serve_socket(node: Arc<Node>, mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let Message::Text(text) = msg else { continue };
        let Ok(req) = serde_json::from_str::<Json>(&text) else {
            continue;
        };
        let method = req["method"].as_str().unwrap_or("");
        let (reply, notes) = match node.answer(method, &req["params"]) {
            Ok((result, notes)) => (
                json!({"jsonrpc": "2.0", "id": req["id"], "result": result}),
                notes,
            ),
            Err(what) => {
                node.unknown.lock().unwrap().insert(what);
                let error = json!({"jsonrpc": "2.0", "id": req["id"],
                    "error": {"code": -32601, "message": "Method not found"}});
                (error, vec![])
            }
        };
        for frame in std::iter::once(reply).chain(notes) {
            if socket
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Storage to serve: `(item, SCALE value)` under the SDK's key for it
/// (fixtures/subtensor/crv4.json).
fn served(values: &[(&str, Vec<u8>)]) -> Vec<(Json, String)> {
    let v = crv4();
    values
        .iter()
        .map(|(item, value)| (v["storage"][item]["key_hex"].clone(), hexs(value)))
        .collect()
}

async fn start_node(
    neuron_hotkey: Option<[u8; 32]>,
    storage: Vec<(Json, String)>,
) -> (String, Arc<Node>) {
    let node = Arc::new(Node {
        golden: golden(),
        metadata_v15: hexs(&Some(metadata_bytes()).encode()),
        unknown: Mutex::new(BTreeSet::new()),
        submitted: Mutex::new(Vec::new()),
        neuron_hotkey,
        storage,
    });
    let app = axum::Router::new()
        .route(
            "/",
            get(
                |State(node): State<Arc<Node>>, ws: WebSocketUpgrade| async move {
                    ws.on_upgrade(move |socket| serve_socket(node, socket))
                },
            ),
        )
        .with_state(node.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_come_out_as_the_sdk_decoded_them() {
    let (url, node) = start_node(None, vec![]).await;
    let g = node.golden.clone();
    let state = tempfile::tempdir().unwrap();
    let chain = match SubtensorChain::connect(&url, 1, state.path()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "connect: {e}; unknown calls: {:?}",
            node.unknown.lock().unwrap()
        ),
    };
    let unknown = || format!("{:?}", node.unknown.lock().unwrap());

    assert_eq!(chain.block().await.unwrap(), 67, "{}", unknown());
    assert_eq!(chain.spec_version().await.unwrap(), 461);

    let want = &runtime_call(&g, "get_subnet_hyperparams")["decoded"];
    let p = chain
        .hyperparams()
        .await
        .unwrap_or_else(|e| panic!("{e}; {}", unknown()));
    assert_eq!(p.netuid, 1);
    assert_eq!(p.tempo, want["tempo"].as_u64().unwrap());
    assert_eq!(p.immunity_period, want["immunity_period"].as_u64().unwrap());
    assert_eq!(
        p.weights_rate_limit,
        want["weights_rate_limit"].as_u64().unwrap()
    );
    assert_eq!(
        p.max_validators as u64,
        want["max_validators"].as_u64().unwrap()
    );
    assert_eq!(p.kappa, want["kappa"].as_u64().unwrap() as f64 / 65535.0);
    // Storage the node leaves unset falls back to subtensor's defaults.
    assert_eq!(p.max_uids, 256);

    let mg = chain
        .metagraph()
        .await
        .unwrap_or_else(|e| panic!("{e}; {}", unknown()));
    assert_eq!(mg.block, 67);
    assert_eq!(mg.netuid, 1);
    let neurons = runtime_call(&g, "get_neurons_lite")["decoded"].clone();
    assert_eq!(mg.neurons.len(), neurons.as_array().unwrap().len());
    assert_eq!(
        mg.neurons[0].hotkey.to_ss58(),
        neurons[0]["hotkey"].as_str().unwrap()
    );

    let account = g["storage_values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["storage_function"] == "Account" && v["params"].as_array().unwrap().len() == 1)
        .unwrap();
    let who = Hotkey::from_ss58(account["params"][0].as_str().unwrap()).unwrap();
    assert_eq!(
        chain.balance(&who).await.unwrap(),
        Rao(account["decoded"]["data"]["free"].as_u64().unwrap())
    );
    assert_eq!(chain.balance(&Hotkey([9; 32])).await.unwrap(), Rao(0));
    assert!(node.unknown.lock().unwrap().is_empty(), "{}", unknown());

    // A subnet the node does not have is refused at connect time.
    let err = SubtensorChain::connect(&url, 9, state.path())
        .await
        .err()
        .expect("netuid 9 does not exist");
    assert!(err.to_string().contains("subnet 9"), "{err}");
}

/// Registers a fresh hotkey through the node (checking the extrinsic), and
/// returns the chain, the node and the hotkey.
async fn registered(
    storage: Vec<(Json, String)>,
) -> (
    SubtensorChain,
    Arc<Node>,
    Keypair,
    String,
    tempfile::TempDir,
) {
    let coldkey = Keypair::from_suri("//Alice").unwrap();
    let hotkey = Keypair::from_suri("//Fractal//replay").unwrap();
    let (url, node) = start_node(Some(hotkey.hotkey().0), storage).await;
    let state = tempfile::tempdir().unwrap();
    let chain = SubtensorChain::connect(&url, 1, state.path())
        .await
        .unwrap();
    let unknown = || format!("{:?}", node.unknown.lock().unwrap());
    let offline = offline_client();
    let at = offline.at_block(1u64).unwrap();

    let uid = chain
        .register(&coldkey, &hotkey.hotkey())
        .await
        .unwrap_or_else(|e| panic!("register: {e}; {}", unknown()));
    assert_eq!(uid, 0);
    let tx = node.submitted.lock().unwrap()[0].clone();
    let call = at
        .tx()
        .call_data(&calls::burned_register(1, &hotkey.hotkey()))
        .unwrap();
    assert!(
        tx.ends_with(&call),
        "the extrinsic carries burned_register(1, hotkey)"
    );
    assert!(
        tx.windows(32).any(|w| w == coldkey.hotkey().0),
        "signed by the coldkey"
    );
    // Registered now: a second registration is refused before anything is sent.
    assert!(matches!(
        chain.register(&coldkey, &hotkey.hotkey()).await,
        Err(ChainError::AlreadyRegistered(_, 0))
    ));
    assert_eq!(node.submitted.lock().unwrap().len(), 1);
    (chain, node, hotkey, url, state)
}

/// The commit bytes of the `commit_timelocked` call (starting with `prefix`)
/// that ends `tx`.
fn timelocked_commit<'t>(tx: &'t [u8], prefix: &[u8]) -> &'t [u8] {
    (0..tx.len())
        .rev()
        .find_map(|i| {
            let mut rest = tx[i..].strip_prefix(prefix)?;
            let n = subxt::ext::codec::Compact::<u32>::decode(&mut rest).ok()?.0 as usize;
            (rest.len() == n + 10).then(|| &rest[..n])
        })
        .expect("a commit_timelocked call ends the extrinsic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_reveal_version_4_sends_a_timelocked_commit_the_chain_can_open() {
    // The subnet's epoch state of the SDK's recorded commit (head 67, tempo
    // 10, last epoch at 60, 0.25 s blocks as this node's Aura declares),
    // with the clock at the SDK's: its commit went to drand round 1000,
    // whose pulse is public, so the commit we send can be opened here.
    let v = crv4();
    let c = &v["sdk_commit"];
    assert_eq!(c["state"]["current_block"], 67, "the recorded head");
    let st = |k: &str| c["state"][k].as_u64().unwrap();
    let storage = served(&[
        ("Tempo", (st("tempo") as u16).encode()),
        ("LastEpochBlock", st("last_epoch_block").encode()),
        ("PendingEpochAt", st("pending_epoch_at").encode()),
        ("SubnetEpochIndex", st("subnet_epoch_index").encode()),
        ("BlocksSinceLastStep", st("blocks_since_last_step").encode()),
        (
            "RevealPeriodEpochs",
            c["reveal_period"].as_u64().unwrap().encode(),
        ),
    ]);
    let (mut chain, node, hotkey, _url, _state) = registered(storage).await;
    let now = c["now"].as_f64().unwrap();
    chain.set_clock(Arc::new(move || now));
    let unknown = || format!("{:?}", node.unknown.lock().unwrap());

    chain
        .set_weights(&hotkey, &[(0, 300)], 0)
        .await
        .unwrap_or_else(|e| panic!("set_weights: {e}; {}", unknown()));
    assert!(
        chain.pending_commits().is_empty(),
        "nothing to reveal ourselves"
    );
    let tx = node.submitted.lock().unwrap()[1].clone();
    // The call's tail: commit (compact length + bytes), reveal round, version.
    let (round, version) = (&tx[tx.len() - 10..tx.len() - 2], &tx[tx.len() - 2..]);
    assert_eq!(u64::from_le_bytes(round.try_into().unwrap()), 1000);
    assert_eq!(version, &4u16.to_le_bytes());
    let at = offline_client().at_block(1u64).unwrap();
    let head = at
        .tx()
        .call_data(&calls::commit_timelocked(1, &[], 1000, 4))
        .unwrap();
    // Pallet and call index, netuid, mecid: then the commit's compact length.
    let commit = timelocked_commit(&tx, &head[..5]);
    let sig = unhex(v["quicknet_round_1000_signature"].as_str().unwrap());
    let opened = timelock::decrypt(commit, &sig).expect("opens with round 1000");
    assert_eq!(
        WeightsPayload::decode(&opened),
        Some(WeightsPayload {
            hotkey: hotkey.hotkey().0.to_vec(),
            uids: vec![0],
            values: vec![65535],
            version_key: 0,
        })
    );
    let expected = at
        .tx()
        .call_data(&calls::commit_timelocked(1, commit, 1000, 4))
        .unwrap();
    assert!(
        tx.ends_with(&expected),
        "the extrinsic carries commit_timelocked_mechanism_weights(1, 0, commit, 1000, 4)"
    );
    assert!(
        tx.windows(32).any(|w| w == hotkey.hotkey().0),
        "signed by the hotkey"
    );
    assert!(node.unknown.lock().unwrap().is_empty(), "{}", unknown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_commit_reveal_version_falls_back_to_a_hash_commit() {
    let storage = served(&[("CommitRevealWeightsVersion", 3u16.encode())]);
    let (chain, node, hotkey, url, state) = registered(storage).await;
    let unknown = || format!("{:?}", node.unknown.lock().unwrap());
    let at = offline_client().at_block(1u64).unwrap();

    // Weights go out as a hash commit, kept (with its salt) for the reveal.
    chain
        .set_weights(&hotkey, &[(0, 300)], 0)
        .await
        .unwrap_or_else(|e| panic!("set_weights: {e}; {}", unknown()));
    let pending = chain.pending_commits();
    assert_eq!(pending.len(), 1);
    let c = &pending[0];
    assert_eq!(
        (c.uids.as_slice(), c.values.as_slice()),
        (&[0u16][..], &[65535u16][..])
    );
    let hash = commit_hash(&hotkey.hotkey(), 1, &c.uids, &c.values, &c.salt, 0);
    assert_eq!(c.hash, hex::encode(hash));
    let tx = node.submitted.lock().unwrap()[1].clone();
    let call = at.tx().call_data(&calls::commit_weights(1, hash)).unwrap();
    assert!(
        tx.ends_with(&call),
        "the extrinsic carries commit_weights(1, hash)"
    );
    assert!(node.unknown.lock().unwrap().is_empty(), "{}", unknown());

    // The commit outlives the process.
    drop(chain);
    let chain = SubtensorChain::connect(&url, 1, state.path())
        .await
        .unwrap();
    assert_eq!(chain.pending_commits(), pending);
}
