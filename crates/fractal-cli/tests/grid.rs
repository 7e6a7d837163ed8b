//! `fractal grid`: one command brings up chain, provers and verifier;
//! provers earn; SIGTERM stops everything cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn grid_comes_up_rewards_honest_provers_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fractal"))
        .args([
            "grid",
            "--provers",
            "2",
            "--block-time-ms",
            "100",
            "--tempo",
            "10",
            "--frames",
            "2",
            "--steps",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("grid exited before it was ready")
            .unwrap();
        if let Some(rest) = line.split("grid ready: chain ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    let start = Instant::now();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_fractal"))
            .args(["chain", "metagraph", "--json", "--chain", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let inc: Vec<f64> = mg["neurons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["incentive"].as_f64().unwrap())
            .collect();
        if inc.len() == 3 && inc[1] > 0.0 && inc[2] > 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "provers never earned: {inc:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let log = log.lock().unwrap();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("grid stopped at block"), "{log}");
}
