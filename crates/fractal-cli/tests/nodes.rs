//! The node binaries as operators run them: a chain, two honest provers on
//! different thread counts and a verifier, each its own process on loopback.
//! The verifier must never flag either prover, and both must earn.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{fractal, run, spawn_until, start_chain, Proc};

#[test]
fn honest_provers_on_different_thread_counts_pass_every_audit_and_earn() {
    let dir = tempfile::tempdir().unwrap();
    let wallets = dir.path().join("wallets");
    let (_chain, url) = start_chain(dir.path(), 200, 10);
    for w in ["val", "m1", "m2"] {
        run(
            &wallets,
            &url,
            &["wallet", "create", "-w", w, "--no-password"],
        );
        run(&wallets, &url, &["register", "-w", w]);
    }
    run(&wallets, &url, &["stake", "-w", "val", "--amount", "100"]);

    let mut provers = Vec::new();
    for (w, threads) in [("m1", "1"), ("m2", "2")] {
        let mut c = fractal();
        c.args(["prover", "-w", w, "--listen", "127.0.0.1:0"])
            .env("BT_WALLET_PATH", &wallets)
            .env("FRACTAL_CHAIN", &url)
            .env("RAYON_NUM_THREADS", threads);
        provers.push(spawn_until(c, "serving").0);
    }
    let mut c = fractal();
    c.args([
        "verifier",
        "-w",
        "val",
        "--frames",
        "2",
        "--size",
        "32x32",
        "--steps",
        "3",
        "--pause-s",
        "0",
        "--db",
    ])
    .arg(dir.path().join("verifier.sqlite"))
    .env("BT_WALLET_PATH", &wallets)
    .env("FRACTAL_CHAIN", &url)
    .env("FRACTAL_LOG", "info");
    let mut verifier = c.stderr(Stdio::piped()).spawn().unwrap();
    let lines = BufReader::new(verifier.stderr.take().unwrap()).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let _verifier = Proc(verifier);

    let start = Instant::now();
    let earned = loop {
        let out = run(&wallets, &url, &["chain", "metagraph", "--json"]);
        let mg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let incentive: Vec<f64> = mg["neurons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["incentive"].as_f64().unwrap())
            .collect();
        if incentive[1] > 0.0 && incentive[2] > 0.0 {
            break incentive;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "provers never earned: {incentive:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(earned[1] > 0.2 && earned[2] > 0.2, "{earned:?}");
    // Before its permit the verifier is refused (unavailable); no honest
    // prover may ever fail a correctness check.
    let log = log.lock().unwrap();
    for l in log.iter().filter(|l| l.contains("challenge failed")) {
        assert!(l.contains("unavailable"), "honest prover flagged: {l}");
    }
}
