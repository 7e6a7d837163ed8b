//! The local chain's subnet rules, persistence and HTTP API, end to end.

use std::sync::Arc;
use std::time::Duration;

use fractal_chain::{AxonInfo, Chain, ChainError, Hyperparams, LocalChain, Rao, RemoteChain};
use fractal_protocol::Keypair;

fn key(tag: &str, i: u32) -> Keypair {
    let mut seed = [0u8; 32];
    let t = tag.as_bytes();
    seed[..t.len()].copy_from_slice(t);
    seed[28..].copy_from_slice(&i.to_le_bytes());
    Keypair::from_seed(&seed)
}

fn params() -> Hyperparams {
    Hyperparams {
        tempo: 10,
        immunity_period: 20,
        weights_rate_limit: 5,
        ..Hyperparams::default()
    }
}

/// Owner coldkey, one validator (uid 0, staked) and `miners` miners.
async fn subnet(chain: &LocalChain, miners: u32) -> (Keypair, Keypair, Vec<Keypair>) {
    let cold = key("cold", 0);
    let validator = key("val", 0);
    assert_eq!(chain.register(&cold, &validator.hotkey()).await.unwrap(), 0);
    chain
        .add_stake(&cold, &validator.hotkey(), Rao(100 * Rao::PER_TAO))
        .await
        .unwrap();
    let mut ms = Vec::new();
    for i in 0..miners {
        let m = key("miner", i);
        chain.register(&key("mcold", i), &m.hotkey()).await.unwrap();
        ms.push(m);
    }
    (cold, validator, ms)
}

#[tokio::test]
async fn validator_gets_a_permit_at_the_first_epoch_and_weights_drive_incentive() {
    let owner = key("owner", 0);
    let chain = LocalChain::in_memory(params(), owner.hotkey()).unwrap();
    let (_, validator, miners) = subnet(&chain, 3).await;
    // No permit before an epoch has run.
    assert_eq!(
        chain.set_weights(&validator, &[(1, 1)], 1).await,
        Err(ChainError::NoValidatorPermit(validator.hotkey()))
    );
    chain.produce_blocks(10).unwrap();
    let mg = chain.metagraph().await.unwrap();
    assert!(mg.by_uid(0).unwrap().validator_permit);
    assert!(
        !mg.by_uid(1).unwrap().validator_permit,
        "zero stake gets no permit"
    );

    chain
        .set_weights(&validator, &[(1, 3), (2, 1)], 1)
        .await
        .unwrap();
    assert_eq!(chain.weights_of(0).unwrap(), vec![(1, 65535), (2, 21845)]);
    chain.produce_blocks(10).unwrap();
    let mg = chain.metagraph().await.unwrap();
    let inc: Vec<f64> = mg.neurons.iter().map(|n| n.incentive).collect();
    assert!(
        (inc[1] - 0.75).abs() < 1e-6 && (inc[2] - 0.25).abs() < 1e-6,
        "{inc:?}"
    );
    assert_eq!(inc[3], 0.0);
    assert!((mg.by_uid(0).unwrap().dividends - 1.0).abs() < 1e-9);
    // 10 blocks × 1 TAO: 18% owner, 41% validator, 41% miners by incentive.
    let emission: Vec<u64> = mg.neurons.iter().map(|n| n.emission.0).collect();
    assert_eq!(emission[0], 4_100_000_000);
    assert_eq!(emission[1] + emission[2], 4_100_000_000);
    assert_eq!(emission[1], 3_075_000_000);
    assert_eq!(
        mg.by_uid(1).unwrap().stake,
        Rao(3_075_000_000),
        "emission is staked"
    );
    let _ = miners;
}

#[tokio::test]
async fn weights_rate_limit_version_key_and_bad_weights_are_refused() {
    let chain = LocalChain::in_memory(params(), key("owner", 0).hotkey()).unwrap();
    let (_, validator, _) = subnet(&chain, 2).await;
    chain.produce_blocks(10).unwrap();
    assert_eq!(
        chain.set_weights(&validator, &[(1, 1)], 0).await,
        Err(ChainError::VersionKeyTooOld { got: 0, need: 1 })
    );
    assert_eq!(
        chain.set_weights(&validator, &[(7, 1)], 1).await,
        Err(ChainError::UnknownUid(7))
    );
    chain.set_weights(&validator, &[(1, 1)], 1).await.unwrap();
    chain.produce_blocks(2).unwrap();
    assert_eq!(
        chain.set_weights(&validator, &[(2, 1)], 1).await,
        Err(ChainError::WeightsRateLimited { last: 10, next: 15 })
    );
    chain.produce_blocks(3).unwrap();
    chain.set_weights(&validator, &[(2, 1)], 1).await.unwrap();
    let stranger = key("stranger", 0);
    assert_eq!(
        chain.set_weights(&stranger, &[(1, 1)], 1).await,
        Err(ChainError::NotRegistered(stranger.hotkey()))
    );
}

#[tokio::test]
async fn registering_past_max_uids_prunes_the_lowest_scoring_non_immune_neuron() {
    let p = Hyperparams {
        max_uids: 256,
        immunity_period: 30,
        ..params()
    };
    let chain = LocalChain::in_memory(p, key("owner", 0).hotkey()).unwrap();
    let (_, validator, _) = subnet(&chain, 255).await;
    assert_eq!(chain.metagraph().await.unwrap().neurons.len(), 256);
    // Everyone is immune: the 257th registration is refused, clearly.
    let late = key("late", 0);
    assert_eq!(
        chain.register(&key("latecold", 0), &late.hotkey()).await,
        Err(ChainError::SubnetFull { retry_at: 30 })
    );
    // The validator rewards every miner except uid 200 and uid 7.
    chain.produce_blocks(10).unwrap();
    let weights: Vec<(u16, u16)> = (1..256)
        .filter(|u| *u != 200 && *u != 7)
        .map(|u| (u, 1))
        .collect();
    chain.set_weights(&validator, &weights, 1).await.unwrap();
    chain.produce_blocks(30).unwrap();
    let mg = chain.metagraph().await.unwrap();
    assert_eq!(mg.by_uid(7).unwrap().emission, Rao(0));
    assert!(mg.by_uid(8).unwrap().emission.0 > 0);
    // Two zero-emission neurons: the earlier registered (uid 7) goes first.
    let uid = chain
        .register(&key("latecold", 0), &late.hotkey())
        .await
        .unwrap();
    assert_eq!(uid, 7);
    let second = key("late", 1);
    assert_eq!(
        chain
            .register(&key("latecold", 1), &second.hotkey())
            .await
            .unwrap(),
        200
    );
    let mg = chain.metagraph().await.unwrap();
    assert_eq!(mg.neurons.len(), 256);
    assert_eq!(mg.by_uid(7).unwrap().hotkey, late.hotkey());
    assert_eq!(mg.by_uid(7).unwrap().registered_at, 40);
    assert!(
        mg.neuron(&key("miner", 6).hotkey()).is_none(),
        "uid 7's old hotkey is gone"
    );
    // The new neuron is immune now, so the next prune takes someone else.
    let third = key("late", 2);
    let uid = chain
        .register(&key("latecold", 2), &third.hotkey())
        .await
        .unwrap();
    assert!(uid != 7 && uid != 200 && uid != 0, "pruned uid {uid}");
}

#[tokio::test]
async fn registration_rules() {
    let p = Hyperparams {
        burn: Rao(600 * Rao::PER_TAO),
        ..params()
    };
    let chain = LocalChain::in_memory(p, key("owner", 0).hotkey()).unwrap();
    let cold = key("cold", 0);
    let hot = key("hot", 0);
    chain.register(&cold, &hot.hotkey()).await.unwrap();
    assert_eq!(
        chain.balance(&cold.hotkey()).await.unwrap(),
        Rao(400 * Rao::PER_TAO)
    );
    assert_eq!(
        chain.register(&cold, &hot.hotkey()).await,
        Err(ChainError::AlreadyRegistered(hot.hotkey(), 0))
    );
    assert_eq!(
        chain.register(&cold, &key("hot", 1).hotkey()).await,
        Err(ChainError::InsufficientBalance {
            need: Rao(600 * Rao::PER_TAO),
            have: Rao(400 * Rao::PER_TAO)
        })
    );
    // Stake only from the hotkey's own coldkey.
    let thief = key("thief", 0);
    assert!(matches!(
        chain.add_stake(&thief, &hot.hotkey(), Rao(1)).await,
        Err(ChainError::NotOwner { .. })
    ));
    assert!(matches!(
        chain
            .add_stake(&cold, &hot.hotkey(), Rao(401 * Rao::PER_TAO))
            .await,
        Err(ChainError::InsufficientBalance { .. })
    ));
}

/// The same weights and axon on either chain of the restart test.
async fn weights_and_axon(chain: &LocalChain, validator: &Keypair) {
    chain
        .set_weights(validator, &[(1, 1), (2, 2)], 1)
        .await
        .unwrap();
    let axon = AxonInfo {
        ip: "127.0.0.1".parse().unwrap(),
        port: 8091,
        version: 3,
    };
    chain.serve_axon(validator, axon).await.unwrap();
}

#[tokio::test]
async fn restart_keeps_state_and_bonds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.sqlite");
    let owner = key("owner", 0).hotkey();
    let before = {
        let chain = LocalChain::open(&path, params(), owner).unwrap();
        let (_, validator, _) = subnet(&chain, 2).await;
        chain.produce_blocks(10).unwrap();
        weights_and_axon(&chain, &validator).await;
        chain.produce_blocks(13).unwrap();
        chain.integrity_check().unwrap();
        chain.metagraph().await.unwrap()
    };
    // Other parameters on reopen are ignored: the file's own rules stand.
    let other = Hyperparams {
        tempo: 99,
        ..params()
    };
    let chain = LocalChain::open(&path, other, key("other", 0).hotkey()).unwrap();
    assert_eq!(chain.metagraph().await.unwrap(), before);
    assert_eq!(chain.hyperparams().await.unwrap().tempo, 10);
    assert_eq!(chain.owner().unwrap(), owner);
    assert_eq!(chain.weights_of(0).unwrap(), vec![(1, 32768), (2, 65535)]);
    // The next epoch continues from the stored bonds exactly as an
    // uninterrupted chain would.
    let uninterrupted = LocalChain::in_memory(params(), owner).unwrap();
    let (_, v2, _) = subnet(&uninterrupted, 2).await;
    uninterrupted.produce_blocks(10).unwrap();
    weights_and_axon(&uninterrupted, &v2).await;
    uninterrupted.produce_blocks(20).unwrap();
    chain.produce_blocks(7).unwrap();
    assert_eq!(
        chain.metagraph().await.unwrap(),
        uninterrupted.metagraph().await.unwrap()
    );
}

async fn serve(chain: Arc<LocalChain>) -> (String, Keypair) {
    let node = key("node", 0);
    let app = fractal_chain::server::router(chain, node.hotkey());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, node)
}

#[tokio::test]
async fn remote_chain_speaks_the_same_rules_over_signed_http() {
    let chain = Arc::new(LocalChain::in_memory(params(), key("owner", 0).hotkey()).unwrap());
    let (url, node) = serve(chain.clone()).await;
    let remote = RemoteChain::connect(&url).await.unwrap();
    assert_eq!(remote.info().await.unwrap().node, node.hotkey());

    let cold = key("cold", 0);
    let val = key("val", 0);
    assert_eq!(remote.register(&cold, &val.hotkey()).await.unwrap(), 0);
    remote
        .add_stake(&cold, &val.hotkey(), Rao(5 * Rao::PER_TAO))
        .await
        .unwrap();
    remote
        .register(&key("mcold", 0), &key("miner", 0).hotkey())
        .await
        .unwrap();
    let axon = AxonInfo {
        ip: "127.0.0.1".parse().unwrap(),
        port: 9000,
        version: 1,
    };
    remote
        .serve_axon(&key("miner", 0), axon.clone())
        .await
        .unwrap();

    // Structured errors survive the trip.
    assert_eq!(
        remote.set_weights(&val, &[(1, 1)], 1).await,
        Err(ChainError::NoValidatorPermit(val.hotkey()))
    );
    assert!(matches!(
        remote
            .add_stake(&key("thief", 0), &val.hotkey(), Rao(1))
            .await,
        Err(ChainError::NotOwner { .. })
    ));

    // Block following: a long poll returns as soon as the block is produced.
    let c2 = chain.clone();
    let producer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::task::spawn_blocking(move || c2.produce_blocks(10).unwrap())
            .await
            .unwrap();
    });
    let b = remote
        .wait_for_block_after(0, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(b >= 1);
    producer.await.unwrap();
    remote.set_weights(&val, &[(1, 1)], 1).await.unwrap();
    assert!(matches!(
        remote.set_weights(&val, &[(1, 1)], 1).await,
        Err(ChainError::WeightsRateLimited { .. })
    ));
    let mg = remote.metagraph().await.unwrap();
    assert_eq!(mg, chain.metagraph().await.unwrap());
    assert_eq!(mg.by_uid(1).unwrap().axon, Some(axon));
    assert_eq!(
        remote.balance(&cold.hotkey()).await.unwrap(),
        Rao(1000 * Rao::PER_TAO - Rao::PER_TAO - 5 * Rao::PER_TAO)
    );
}

#[tokio::test]
async fn unsigned_forged_and_malformed_writes_get_4xx_and_the_chain_keeps_serving() {
    let chain = Arc::new(LocalChain::in_memory(params(), key("owner", 0).hotkey()).unwrap());
    let (url, node) = serve(chain.clone()).await;
    let http = reqwest::Client::new();
    let body = format!(r#"{{"hotkey":"{}"}}"#, key("hot", 0).hotkey());

    let r = http
        .post(format!("{url}/v1/chain/register"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "unsigned");

    let signer = fractal_http::SignedClient::new(http.clone(), Arc::new(key("cold", 0)));
    let u = |p: &str| reqwest::Url::parse(&format!("{url}{p}")).unwrap();
    // Addressed to another node.
    let r = signer
        .request(
            reqwest::Method::POST,
            u("/v1/chain/register"),
            &key("elsewhere", 0).hotkey(),
            body.clone().into(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Replayed: the same signed request twice.
    let req = signer
        .request(
            reqwest::Method::POST,
            u("/v1/chain/register"),
            &node.hotkey(),
            body.clone().into(),
        )
        .build()
        .unwrap();
    let again = req.try_clone().unwrap();
    assert_eq!(http.execute(req).await.unwrap().status(), 201);
    assert_eq!(http.execute(again).await.unwrap().status(), 401);
    // Malformed JSON, unknown fields, oversized bodies.
    for bad in [
        &b"{not json"[..],
        br#"{"hotkey":"nope"}"#,
        br#"{"hotkey":"x","extra":1}"#,
    ] {
        let r = signer
            .request(
                reqwest::Method::POST,
                u("/v1/chain/register"),
                &node.hotkey(),
                bad.to_vec(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "malformed_json");
    }
    let big = vec![b' '; 100 * 1024];
    let r = signer
        .request(
            reqwest::Method::POST,
            u("/v1/chain/set_weights"),
            &node.hotkey(),
            big,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Rule violations have their own status and code.
    let r = signer
        .post_json(
            u("/v1/chain/set_weights"),
            &node.hotkey(),
            &serde_json::json!({"weights": [[0, 1]], "version_key": 1}),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_registered");
    let r = http
        .get(format!("{url}/v1/chain/balance/garbage"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http.get(format!("{url}/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Still serving.
    let mg = RemoteChain::connect(&url)
        .await
        .unwrap()
        .metagraph()
        .await
        .unwrap();
    assert_eq!(mg.neurons.len(), 1);
}

#[test]
fn node_key_is_created_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.sqlite");
    let owner = key("owner", 0).hotkey();
    let first = LocalChain::open(&path, params(), owner)
        .unwrap()
        .node_key()
        .unwrap();
    let chain = LocalChain::open(&path, params(), owner).unwrap();
    assert_eq!(chain.node_key().unwrap().hotkey(), first.hotkey());
    assert_eq!(chain.node_key().unwrap().hotkey(), first.hotkey());
    let other = LocalChain::in_memory(params(), owner)
        .unwrap()
        .node_key()
        .unwrap();
    assert_ne!(other.hotkey(), first.hotkey());
}

fn example_manifest(file: &str) -> fractal_protocol::ModelManifest {
    let path = format!("{}/../../examples/{file}", env!("CARGO_MANIFEST_DIR"));
    fractal_protocol::ModelManifest::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn the_owner_schedules_model_upgrades_that_survive_a_restart_and_others_cannot() {
    use fractal_protocol::schedule::ScheduleError;
    use fractal_protocol::{ModelState, Upgrade};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.sqlite");
    let owner = key("owner", 0);
    let a = example_manifest("manifest-tiny.toml");
    let b = example_manifest("manifest-tiny-wan.toml");
    let (a_id, b_id) = (a.id(), b.id());
    {
        let chain = Arc::new(LocalChain::open(&path, params(), owner.hotkey()).unwrap());
        let (url, _) = serve(chain.clone()).await;
        let remote = RemoteChain::connect(&url).await.unwrap();
        assert!(remote.model_schedule().await.unwrap().entries.is_empty());
        assert_eq!(remote.manifest(&a_id).await.unwrap(), None);

        // Nobody but the owner publishes or schedules.
        let intruder = key("cold", 7);
        assert_eq!(
            remote.publish_manifest(&intruder, &a).await,
            Err(ChainError::NotSubnetOwner {
                signer: intruder.hotkey(),
                owner: owner.hotkey()
            })
        );
        let up_a = Upgrade {
            manifest: a_id,
            at_block: 2,
            grace_blocks: 5,
        };
        assert!(matches!(
            remote.schedule_upgrade(&intruder, up_a).await,
            Err(ChainError::NotSubnetOwner { .. })
        ));
        // Only published manifests can be scheduled.
        assert_eq!(
            remote.schedule_upgrade(&owner, up_a).await,
            Err(ChainError::UnknownManifest(a_id))
        );
        assert_eq!(remote.publish_manifest(&owner, &a).await.unwrap(), a_id);
        assert_eq!(remote.publish_manifest(&owner, &a).await.unwrap(), a_id);
        assert_eq!(remote.publish_manifest(&owner, &b).await.unwrap(), b_id);
        assert_eq!(remote.manifest(&a_id).await.unwrap(), Some(a.clone()));

        remote.schedule_upgrade(&owner, up_a).await.unwrap();
        chain.produce_blocks(3).unwrap();
        // A past block, and one inside a pending upgrade, are refused.
        let up_b = Upgrade {
            manifest: b_id,
            at_block: 3,
            grace_blocks: 4,
        };
        assert_eq!(
            remote.schedule_upgrade(&owner, up_b).await,
            Err(ChainError::Schedule(ScheduleError::Past { at: 3, now: 3 }))
        );
        let up_b = Upgrade {
            at_block: 10,
            ..up_b
        };
        let s = remote.schedule_upgrade(&owner, up_b).await.unwrap();
        assert_eq!(
            remote.schedule_upgrade(&owner, up_b).await,
            Err(ChainError::Schedule(ScheduleError::AlreadyScheduled(b_id)))
        );
        assert_eq!(
            s.served_at(10),
            vec![(b_id, ModelState::Active), (a_id, ModelState::Retiring)]
        );
        assert_eq!(remote.model_schedule().await.unwrap(), s);
        // The chain keeps serving after all that.
        assert_eq!(remote.block().await.unwrap(), 3);
    }
    // Durable: the schedule and the documents are in the chain file.
    let chain = LocalChain::open(&path, params(), owner.hotkey()).unwrap();
    let s = chain.model_schedule().await.unwrap();
    assert_eq!(s.active_at(14), Some(b_id));
    assert_eq!(s.state(&a_id, 14), Some(ModelState::Retired));
    assert_eq!(chain.manifest(&b_id).await.unwrap(), Some(b));
}
