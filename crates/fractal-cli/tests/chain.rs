//! `fractal chain serve` as a separate process, driven by the CLI.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the chain on an OS-chosen loopback port; returns it and its URL.
fn serve(db: &Path) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fractal"))
        .args([
            "chain",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--block-time-ms",
            "50",
            "--db",
        ])
        .arg(db)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("chain exited before listening")
            .unwrap();
        if let Some(rest) = line.split("local chain at ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Server(child), url)
}

fn fractal(wallets: &Path, url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fractal"))
        .args(args)
        .env("BT_WALLET_PATH", wallets)
        .env("FRACTAL_CHAIN", url)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn register_stake_and_metagraph_survive_a_chain_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wallets = dir.path().join("wallets");
    let db = dir.path().join("chain.sqlite");
    let (server, url) = serve(&db);
    for w in ["alice", "bob"] {
        ok(fractal(
            &wallets,
            &url,
            &["wallet", "create", "-w", w, "--no-password"],
        ));
    }
    let out = ok(fractal(&wallets, &url, &["register", "-w", "alice"]));
    assert!(out.contains("as uid 0"), "{out}");
    ok(fractal(&wallets, &url, &["register", "-w", "bob"]));
    let out = ok(fractal(
        &wallets,
        &url,
        &["stake", "-w", "alice", "--amount", "12.5"],
    ));
    assert!(out.contains("τ12.5000"), "{out}");

    // Clear errors, non-zero exit.
    let again = fractal(&wallets, &url, &["register", "-w", "alice"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already registered (uid 0)"));
    let bad = fractal(&wallets, &url, &["stake", "-w", "bob", "--amount", "5000"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("insufficient balance"));
    let down = fractal(&wallets, "http://127.0.0.1:9", &["chain", "metagraph"]);
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach the chain"));

    let table = ok(fractal(&wallets, &url, &["chain", "metagraph"]));
    assert!(table.contains("neurons 2"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&ok(fractal(
        &wallets,
        &url,
        &["chain", "metagraph", "--json"],
    )))
    .unwrap();
    assert_eq!(json["neurons"][0]["stake"], 12_500_000_000u64);
    let block_before = json["block"].as_u64().unwrap();
    drop(server);

    // kill -9 and restart on the same file: state and block height are kept.
    let (_server, url) = serve(&db);
    let json: serde_json::Value = serde_json::from_str(&ok(fractal(
        &wallets,
        &url,
        &["chain", "metagraph", "--json"],
    )))
    .unwrap();
    assert_eq!(json["neurons"].as_array().unwrap().len(), 2);
    assert!(json["block"].as_u64().unwrap() >= block_before);
    assert!(json["neurons"][0]["stake"].as_u64().unwrap() >= 12_500_000_000);
    let status = ok(fractal(&wallets, &url, &["chain", "status"]));
    assert!(status.contains("neurons   2 of 256"), "{status}");
}

#[test]
fn the_owner_publishes_and_schedules_models_from_the_cli_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wallets = dir.path().join("wallets");
    let (_server, url) = serve(&dir.path().join("chain.sqlite"));
    let examples = format!("{}/../../examples", env!("CARGO_MANIFEST_DIR"));
    let a = format!("{examples}/manifest-tiny.toml");
    let b = format!("{examples}/manifest-tiny-wan.toml");
    let owner = ["--owner-suri", "//Alice"];
    let run = |args: &[&str]| fractal(&wallets, &url, args);

    let out = ok(run(&["manifest", "show"]));
    assert!(out.contains("nothing scheduled"), "{out}");
    // Not the owner: refused, saying who is.
    let out = run(&["manifest", "publish", &a, "--owner-suri", "//Bob"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only the subnet owner"), "{err}");
    // Unpublished: refused.
    let out = run(&[
        &["manifest", "schedule", &a, "--in-blocks", "3"][..],
        &owner,
    ]
    .concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not published"));

    let a_id = ok(run(&["manifest", "id", &a])).trim().to_string();
    let b_id = ok(run(&["manifest", "id", &b])).trim().to_string();
    for m in [&a, &b] {
        let out = ok(run(&[&["manifest", "publish", m][..], &owner].concat()));
        assert!(out.contains("published"), "{out}");
    }
    ok(run(&[
        &["manifest", "schedule", &a, "--in-blocks", "2"][..],
        &owner,
    ]
    .concat()));
    // A grace of 0 and a block in the past are refused by name.
    let out = run(&[
        &[
            "manifest",
            "schedule",
            &b_id,
            "--in-blocks",
            "500",
            "--grace-blocks",
            "0",
        ][..],
        &owner,
    ]
    .concat());
    assert!(String::from_utf8_lossy(&out.stderr).contains("grace period of 0"));
    let out = run(&[
        &["manifest", "schedule", &b_id, "--at-block", "1"][..],
        &owner,
    ]
    .concat());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the future"));
    let out = ok(run(&[
        &[
            "manifest",
            "schedule",
            &b_id,
            "--in-blocks",
            "500",
            "--grace-blocks",
            "40",
        ][..],
        &owner,
    ]
    .concat()));
    assert!(out.contains(&b_id) && out.contains("pending"), "{out}");
    let out = ok(run(&["manifest", "show"]));
    // A is pending or active by now, depending on how fast blocks come.
    assert!(out.contains(&a_id) && out.contains(&b_id), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(run(&["manifest", "show", "--json"]))).unwrap();
    assert_eq!(json["entries"].as_array().unwrap().len(), 2);
    assert_eq!(json["entries"][1]["manifest"], b_id.as_str());
}
