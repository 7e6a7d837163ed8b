//! Helpers shared by the process-level tests.
#![allow(dead_code)]

pub mod browser;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn fractal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fractal"))
}

/// Spawns `cmd`, waits for a stderr line containing `marker`, returns that
/// line; the rest of stderr is collected into the returned log.
pub fn spawn_until(mut cmd: Command, marker: &str) -> (Proc, String, Arc<Mutex<Vec<String>>>) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = Arc::new(Mutex::new(Vec::new()));
    let line = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("exited before {marker:?}: {:?}", log.lock().unwrap()))
            .unwrap();
        log.lock().unwrap().push(line.clone());
        if line.contains(marker) {
            break line;
        }
    };
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    (Proc(child), line, log)
}

/// Runs a `fractal` command with the given wallets and chain; must succeed.
pub fn run(wallets: &Path, chain: &str, args: &[&str]) -> Output {
    let out = fractal()
        .args(args)
        .env("BT_WALLET_PATH", wallets)
        .env("FRACTAL_CHAIN", chain)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The address a ready line names after `marker`, e.g. the URL in
/// "local chain at http://127.0.0.1:9944 (…)".
pub fn addr_after(line: &str, marker: &str) -> String {
    line.split(marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address after {marker:?} in {line:?}"))
        .trim_end_matches('/')
        .to_string()
}

/// The hotkey in a prover's "prover uid N (HOTKEY) serving …" line.
pub fn hotkey_in(serving_line: &str) -> String {
    serving_line
        .split('(')
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no hotkey in {serving_line:?}"))
        .to_string()
}

/// Starts `fractal chain serve` on a free loopback port; returns it and its URL.
pub fn start_chain(dir: &Path, block_time_ms: u32, tempo: u32) -> (Proc, String) {
    start_chain_on(dir, "127.0.0.1", block_time_ms, tempo)
}

/// Starts `fractal chain serve` on a free port of `ip`.
pub fn start_chain_on(dir: &Path, ip: &str, block_time_ms: u32, tempo: u32) -> (Proc, String) {
    let mut c = fractal();
    c.args([
        "chain",
        "serve",
        "--listen",
        &format!("{ip}:0"),
        "--block-time-ms",
        &block_time_ms.to_string(),
        "--tempo",
        &tempo.to_string(),
        "--db",
    ])
    .arg(dir.join("chain.sqlite"));
    let (proc, line, _) = spawn_until(c, "local chain at");
    (proc, addr_after(&line, "local chain at "))
}

/// Creates a gateway API key in `dir`; returns its secret.
pub fn create_api_key(dir: &Path, name: &str) -> String {
    let out = fractal()
        .args(["gateway", "keys", "create", "--name", name, "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Starts `fractal gateway` on a free loopback port, signing with `wallet`;
/// returns it and its base URL.
pub fn start_gateway(wallets: &Path, chain: &str, dir: &Path, wallet: &str) -> (Proc, String) {
    let mut c = fractal();
    c.args(["gateway", "-w", wallet, "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .env("BT_WALLET_PATH", wallets)
        .env("FRACTAL_CHAIN", chain);
    let (p, line, _) = spawn_until(c, "gateway at ");
    (p, addr_after(&line, "gateway at "))
}

/// An external tool the test needs: from `var` (set by
/// scripts/setup-test-deps). Missing is a failure under CI, a skip otherwise.
pub fn tool(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if Path::new(&v).exists() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set: run the tests through ./scripts/test (it runs scripts/setup-test-deps)")
        }
        _ => {
            eprintln!("skipping: {var} is not set (./scripts/test sets it up)");
            None
        }
    }
}
