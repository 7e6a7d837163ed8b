//! The subtensor backend's online read path (WebSocket, JSON-RPC, runtime
//! metadata, runtime API calls, storage) against a loopback node that
//! answers with what a real subtensor node answered the reference SDK
//! (fixtures/subtensor/golden.json): connect, block, hyperparameters,
//! metagraph and balance must come out as the SDK decoded them.
#![cfg(feature = "subtensor")]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::routing::get;
use fractal_chain::subtensor::SubtensorChain;
use fractal_chain::{Chain, Rao};
use fractal_protocol::Hotkey;
use serde_json::{json, Value as Json};
use subxt::ext::codec::Encode;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/subtensor/");

struct Node {
    golden: Json,
    /// `Metadata_metadata_at_version(15)`'s answer: Some(opaque metadata).
    metadata_v15: String,
    /// Methods the node was asked for and does not know.
    unknown: Mutex<BTreeSet<String>>,
}

fn hexs(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

impl Node {
    fn answer(&self, method: &str, params: &Json) -> Result<Json, String> {
        let g = &self.golden;
        let head = g["block"]["block_hash"].clone();
        Ok(match method {
            "rpc_methods" => json!({"methods": [
                "rpc_methods", "chain_getBlockHash", "chain_getHeader", "chain_getFinalizedHead",
                "state_call", "state_getStorage", "state_getRuntimeVersion", "system_chain"]}),
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
                            Some(c) => c["raw_hex"].clone(),
                            // No such subnet: `None`.
                            None if name == "SubnetInfoRuntimeApi_get_subnet_hyperparams" => {
                                json!("0x00")
                            }
                            None => return Err(format!("state_call {name} {args}")),
                        }
                    }
                }
            }
            "state_getStorage" => {
                let key = params[0].as_str().unwrap_or("");
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
        })
    }
}

async fn serve_socket(node: Arc<Node>, mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let Message::Text(text) = msg else { continue };
        let Ok(req) = serde_json::from_str::<Json>(&text) else {
            continue;
        };
        let method = req["method"].as_str().unwrap_or("");
        let reply = match node.answer(method, &req["params"]) {
            Ok(result) => json!({"jsonrpc": "2.0", "id": req["id"], "result": result}),
            Err(what) => {
                node.unknown.lock().unwrap().insert(what);
                json!({"jsonrpc": "2.0", "id": req["id"],
                       "error": {"code": -32601, "message": "Method not found"}})
            }
        };
        if socket
            .send(Message::Text(reply.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
}

async fn start_node() -> (String, Arc<Node>) {
    let golden: Json =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}golden.json")).unwrap())
            .unwrap();
    let metadata = std::fs::read(format!("{DIR}metadata-spec461.scale")).unwrap();
    let node = Arc::new(Node {
        golden,
        metadata_v15: hexs(&Some(metadata).encode()),
        unknown: Mutex::new(BTreeSet::new()),
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
    let (url, node) = start_node().await;
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

    let hp_call = g["runtime_calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["method"] == "get_subnet_hyperparams")
        .unwrap();
    let want = &hp_call["decoded"];
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
    let neurons = g["runtime_calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["method"] == "get_neurons_lite")
        .unwrap()["decoded"]
        .clone();
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
