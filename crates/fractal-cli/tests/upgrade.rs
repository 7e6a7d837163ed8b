//! A model upgrade on a running grid, as separate processes on loopback:
//! the owner schedules tiny-v1 → tiny-wide-v1 while an app keeps creating
//! videos; two provers restart one at a time on the new model, one is left
//! on the old one. Nothing is lost or failed, each video is made by the
//! model it was accepted for, and once the grace period is over the prover
//! left behind earns nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{create_api_key, fractal, hotkey_in, run, spawn_until, start_chain, Proc};

const TEMPO: u64 = 10;

fn block(http: &reqwest::blocking::Client, chain: &str) -> u64 {
    let v: Value = http
        .get(format!("{chain}/v1/chain/block"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    v["block"]
        .as_u64()
        .or_else(|| v.as_u64())
        .unwrap_or_else(|| panic!("{v}"))
}

fn wait_for_block(http: &reqwest::blocking::Client, chain: &str, target: u64) {
    let start = Instant::now();
    while block(http, chain) < target {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "block {target} never came"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Incentive of each hotkey, from the chain's metagraph.
fn incentives(http: &reqwest::blocking::Client, chain: &str) -> BTreeMap<String, f64> {
    let mg: Value = http
        .get(format!("{chain}/v1/chain/metagraph"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    mg["neurons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["hotkey"].as_str().unwrap().to_string(),
                n["incentive"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// `GET /v1/models` as (id, state, manifest id), polled for up to 10 s
/// until it reads `want` (the gateway reads the schedule at each probe).
fn offered_within(
    http: &reqwest::blocking::Client,
    base: &str,
    key: &str,
    want: &[(String, String, String)],
) -> Vec<(String, String, String)> {
    let start = Instant::now();
    loop {
        let models: Value = http
            .get(format!("{base}/v1/models"))
            .bearer_auth(key)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let got: Vec<(String, String, String)> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let s = |k: &str| m[k].as_str().unwrap().to_string();
                (s("id"), s("state"), s("manifest_id"))
            })
            .collect();
        if got == want || start.elapsed() > Duration::from_secs(10) {
            return got;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn start_prover(wallets: &Path, chain: &str, wallet: &str, model: &str) -> (Proc, String) {
    let mut c = fractal();
    c.args([
        "prover",
        "-w",
        wallet,
        "--listen",
        "127.0.0.1:0",
        "--tiny",
        model,
    ])
    .env("BT_WALLET_PATH", wallets)
    .env("FRACTAL_CHAIN", chain)
    .env("RAYON_NUM_THREADS", "1");
    let (p, line, _) = spawn_until(c, "serving");
    assert!(line.contains(&format!("fractal-{model}")), "{line}");
    (p, hotkey_in(&line))
}

/// Stops a prover the way an operator does (SIGTERM: it finishes nothing
/// new and exits), then reaps it.
fn stop(mut p: Proc) {
    let pid = p.0.id().to_string();
    let _ = std::process::Command::new("kill").arg(&pid).status();
    let start = Instant::now();
    while p.0.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_rolling_upgrade_under_a_job_stream_loses_nothing_and_weights_follow_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let wallets = dir.path().join("wallets");
    let (_chain, url) = start_chain(dir.path(), 200, TEMPO as u32);
    let http = reqwest::blocking::Client::new();
    for w in ["val", "m1", "m2", "m3"] {
        run(
            &wallets,
            &url,
            &["wallet", "create", "-w", w, "--no-password"],
        );
        run(&wallets, &url, &["register", "-w", w]);
    }
    run(&wallets, &url, &["stake", "-w", "val", "--amount", "100"]);
    let owner = ["--owner-suri", "//Alice"];
    let owner_run = |args: &[&str]| {
        let out = run(&wallets, &url, &[args, &owner[..]].concat());
        String::from_utf8(out.stdout).unwrap()
    };
    let mut ids = BTreeMap::new();
    for m in ["tiny-v1", "tiny-wide-v1"] {
        let out = owner_run(&["manifest", "publish", m]);
        // "published NAME as ID"
        ids.insert(m, out.split(" as ").nth(1).unwrap().trim().to_string());
    }
    let (a_id, b_id) = (ids["tiny-v1"].clone(), ids["tiny-wide-v1"].clone());
    // The owner first pins the model the grid runs, then moves it on.
    owner_run(&[
        "manifest",
        "schedule",
        "tiny-v1",
        "--in-blocks",
        "1",
        "--grace-blocks",
        "1",
    ]);

    let mut provers: BTreeMap<&str, (Proc, String)> = BTreeMap::new();
    for w in ["m1", "m2", "m3"] {
        provers.insert(w, start_prover(&wallets, &url, w, "tiny-v1"));
    }
    let hotkey = |w: &str, provers: &BTreeMap<&str, (Proc, String)>| provers[w].1.clone();
    let (m1, m2, m3) = (
        hotkey("m1", &provers),
        hotkey("m2", &provers),
        hotkey("m3", &provers),
    );

    let mut v = fractal();
    v.args([
        "verifier",
        "-w",
        "val",
        "--also-audit",
        "tiny-wide-v1",
        "--pause-s",
        "1",
        "--frames",
        "4",
        "--steps",
        "2",
        "--size",
        "32x32",
        "--db",
    ])
    .arg(dir.path().join("verifier.sqlite"))
    .env("BT_WALLET_PATH", &wallets)
    .env("FRACTAL_CHAIN", &url);
    let (_verifier, _, _) = spawn_until(v, "running");

    // The gateway is not told of the new model: it audits every tiny-v1 job
    // it routes and none of the others, yet offers and routes tiny-wide-v1
    // (read from the chain) and keeps routing to provers it has audits of
    // only under the retired model.
    let gw_dir = dir.path().join("gateway");
    let key = create_api_key(&gw_dir, "upgrade");
    let mut g = fractal();
    g.args([
        "gateway",
        "-w",
        "val",
        "--listen",
        "127.0.0.1:0",
        "--audit-sample",
        "1",
        "--dir",
    ])
    .arg(&gw_dir)
    .env("BT_WALLET_PATH", &wallets)
    .env("FRACTAL_CHAIN", &url);
    let (_gateway, line, _) = spawn_until(g, "gateway at ");
    let base = common::addr_after(&line, "gateway at ");

    // The upgrade: B from 30 blocks on (6 s), A served 60 blocks more.
    let at = block(&http, &url) + 30;
    let grace = 60;
    owner_run(&[
        "manifest",
        "schedule",
        "tiny-wide-v1",
        "--at-block",
        &at.to_string(),
        "--grace-blocks",
        &grace.to_string(),
    ]);

    // The app: a video every 700 ms, no model named (the default is the
    // newest active one), each create must be accepted.
    let accepted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let streaming = Arc::new(AtomicBool::new(true));
    let app = {
        let (accepted, streaming, base, key) = (
            accepted.clone(),
            streaming.clone(),
            base.clone(),
            key.clone(),
        );
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            let mut i = 0;
            while streaming.load(Ordering::Relaxed) {
                let r = http
                    .post(format!("{base}/v1/videos"))
                    .bearer_auth(&key)
                    .json(&json!({"prompt": format!("a red fox, take {i}"), "size": "32x32", "seconds": "0.5", "steps": 3}))
                    .send()
                    .unwrap();
                assert!(
                    r.status().is_success(),
                    "create {i} refused: {}",
                    r.text().unwrap()
                );
                let v: Value = r.json().unwrap();
                accepted.lock().unwrap().push((
                    v["id"].as_str().unwrap().to_string(),
                    v["manifest_id"].as_str().unwrap().to_string(),
                ));
                i += 1;
                std::thread::sleep(Duration::from_millis(700));
            }
        })
    };

    // Before the switch every prover earns; from it both models are
    // offered, the new one first (the default).
    wait_for_block(&http, &url, at);
    let both = [
        (
            "fractal-tiny-wide-v1".to_string(),
            "active".to_string(),
            b_id.clone(),
        ),
        (
            "fractal-tiny-v1".to_string(),
            "retiring".to_string(),
            a_id.clone(),
        ),
    ];
    assert_eq!(
        offered_within(&http, &base, &key, &both),
        both,
        "during the grace period"
    );
    let before = incentives(&http, &url);
    for h in [&m1, &m2, &m3] {
        assert!(before[h] > 0.0, "{h} earns before the upgrade: {before:?}");
    }
    // Rolling: m1, then m2, restart on the new model; m3 stays behind.
    for w in ["m1", "m2"] {
        let (p, _) = provers.remove(w).unwrap();
        stop(p);
        provers.insert(w, start_prover(&wallets, &url, w, "tiny-wide-v1"));
        std::thread::sleep(Duration::from_secs(3));
    }
    // After the grace period: only B is offered, A is refused by name.
    wait_for_block(&http, &url, at + grace + 2);
    let only_b = [(
        "fractal-tiny-wide-v1".to_string(),
        "active".to_string(),
        b_id.clone(),
    )];
    assert_eq!(offered_within(&http, &base, &key, &only_b), only_b);
    let r = http
        .post(format!("{base}/v1/videos"))
        .bearer_auth(&key)
        .json(&json!({"prompt": "x", "model": "fractal-tiny-v1"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    streaming.store(false, Ordering::Relaxed);
    app.join().unwrap();

    // Every accepted video completes, made by the model it was accepted for.
    let accepted = accepted.lock().unwrap().clone();
    let start = Instant::now();
    let mut by_model = BTreeMap::<String, usize>::new();
    for (id, manifest) in &accepted {
        let v = loop {
            let v: Value = http
                .get(format!("{base}/v1/videos/{id}"))
                .bearer_auth(&key)
                .send()
                .unwrap()
                .json()
                .unwrap();
            assert_ne!(v["status"], "failed", "{v}");
            if v["status"] == "completed" {
                break v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "{id} never completed: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(v["manifest_id"], manifest.as_str(), "{v}");
        let mp4 = http
            .get(format!("{base}/v1/videos/{id}/content"))
            .bearer_auth(&key)
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        let c =
            fractal_credentials::read(&mp4, fractal_credentials::MediaFormat::Mp4, None).unwrap();
        assert_eq!(
            c.fractal
                .expect("a Fractal assertion")
                .generation
                .manifest_id,
            *manifest,
            "{id} was made by the model it was accepted for"
        );
        *by_model.entry(manifest.clone()).or_default() += 1;
    }
    assert!(
        by_model.get(&a_id).is_some_and(|&n| n > 0) && by_model.get(&b_id).is_some_and(|&n| n > 0),
        "jobs under both models: {by_model:?}"
    );

    // Weights follow the schedule: once the verifier's weights after the
    // grace period reach an epoch (seconds here; longer on a loaded
    // machine, where a round takes a while), the prover left on the
    // retired model earns nothing, the others do.
    let start = Instant::now();
    let after = loop {
        let now = incentives(&http, &url);
        if now[&m3] == 0.0 || start.elapsed() > Duration::from_secs(120) {
            break now;
        }
        let b = block(&http, &url);
        wait_for_block(&http, &url, b + TEMPO);
    };
    assert_eq!(after[&m3], 0.0, "left on the retired model: {after:?}");
    assert!(after[&m1] > 0.0 && after[&m2] > 0.0, "{after:?}");
    eprintln!("{} videos: {by_model:?}", accepted.len());
}
