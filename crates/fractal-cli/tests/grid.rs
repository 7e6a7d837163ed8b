//! `fractal grid`: one command brings up chain, provers and verifier;
//! provers earn; SIGTERM stops everything cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::browser::Browser;
use common::tool;

#[test]
fn grid_comes_up_rewards_honest_provers_and_stops_cleanly() {
    run_grid(&[], |_| {});
}

/// The same grid on the built-in Wan 2.1: challenges of 1 + 4k frames,
/// audited flow-matching steps, and an app's video through the gateway's
/// API and through its web page in a real browser.
#[test]
fn grid_on_tiny_wan_rewards_provers_and_serves_an_app_video() {
    run_grid(&["--tiny", "tiny-wan-v1"], |ready| {
        let http = reqwest::blocking::Client::new();
        let auth = format!("Bearer {}", ready.api_key);
        let job: serde_json::Value = http
            .post(format!("{}/v1/videos", ready.gateway))
            .header("Authorization", &auth)
            .json(&serde_json::json!({"prompt": "a red circle moving left", "size": "32x32", "seconds": "0.5", "steps": 3}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let id = job["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{job}"))
            .to_string();
        assert_eq!(
            job["frames"], 5,
            "0.5 s at 8 fps rounds up to 1 + 4k frames: {job}"
        );
        let start = Instant::now();
        loop {
            let v: serde_json::Value = http
                .get(format!("{}/v1/videos/{id}", ready.gateway))
                .header("Authorization", &auth)
                .send()
                .unwrap()
                .json()
                .unwrap();
            match v["status"].as_str() {
                Some("completed") => break,
                Some("failed") => panic!("{v}"),
                _ => {}
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "never completed: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let mp4 = http
            .get(format!("{}/v1/videos/{id}/content", ready.gateway))
            .header("Authorization", &auth)
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        assert_eq!(&mp4[4..8], b"ftyp", "an MP4");

        // The web page in a real browser, on the Wan grid too.
        let (Some(driver), Some(chromium)) =
            (tool("FRACTAL_CHROMEDRIVER"), tool("FRACTAL_CHROMIUM"))
        else {
            return;
        };
        let b = Browser::start(&driver, &chromium);
        let page = format!("{}/#key={}", ready.gateway, ready.api_key);
        let state = b.make_video_on_page(&page, "a blue square moving up", 3, 2);
        assert_eq!(state["width"], 32, "{state}");
        assert!(
            state["status"].as_str().unwrap().contains("completed"),
            "{state}"
        );
        assert_eq!(state["gif"], true, "GIF download offered: {state}");
    });
}

/// What the grid printed when it came up.
struct Ready {
    gateway: String,
    api_key: String,
}

/// Runs `fractal grid` with `extra` arguments until both provers earn,
/// calls `while_up`, then stops it with SIGTERM and checks it stopped cleanly.
fn run_grid(extra: &[&str], while_up: impl FnOnce(&Ready)) {
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
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next = || {
        lines
            .next()
            .expect("grid exited before it was ready")
            .unwrap()
    };
    let url = loop {
        if let Some(rest) = next().split("grid ready: chain ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let page = next();
    let gateway = page
        .split("web page: ")
        .nth(1)
        .and_then(|p| p.split("/#key=").next())
        .unwrap_or_else(|| panic!("no page line: {page}"))
        .to_string();
    let key_line = next();
    let api_key = key_line
        .split("API key:")
        .nth(1)
        .unwrap_or_else(|| panic!("no key line: {key_line}"))
        .trim()
        .to_string();
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
    while_up(&Ready { gateway, api_key });
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let log = log.lock().unwrap();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("grid stopped at block"), "{log}");
}
