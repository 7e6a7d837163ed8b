//! The gateway end to end, as separate processes on loopback:
//! * the prover serving a job is killed: the job completes on another;
//! * the gateway is killed mid-job and restarted: the job still completes;
//! * `fractal grid` driven by the unmodified `openai` Python SDK and by a
//!   real headless Chromium on the web page.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::browser::Browser;
use common::{
    create_api_key, fractal, hotkey_in, run, spawn_until, start_chain, start_gateway, tool,
};

struct Api {
    base: String,
    key: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn create(&self, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}/v1/videos", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
        r.json().unwrap()
    }
    fn get(&self, id: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/v1/videos/{id}", self.base))
            .bearer_auth(&self.key)
            .send()
            .ok()?;
        r.json().ok()
    }
    /// Polls until `pred` holds (the gateway may be restarting meanwhile).
    fn wait(&self, id: &str, what: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.get(id) {
                assert_ne!(v["status"], "failed", "{what}: {v}");
                if pred(&v) {
                    return v;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    fn content(&self, id: &str, variant: &str) -> Vec<u8> {
        let r = self
            .http
            .get(format!(
                "{}/v1/videos/{id}/content?variant={variant}",
                self.base
            ))
            .bearer_auth(&self.key)
            .send()
            .unwrap();
        assert!(r.status().is_success());
        r.bytes().unwrap().to_vec()
    }
}

/// The Fractal assertion of a video the gateway served, which must carry
/// valid content credentials.
fn credentials(mp4: &[u8]) -> fractal_credentials::FractalAssertion {
    let c = fractal_credentials::read(mp4, fractal_credentials::MediaFormat::Mp4, None).unwrap();
    assert!(c.valid_apart_from_trust(), "{} {:?}", c.state, c.failures);
    assert!(c.binding.is_ok(), "{:?}", c.binding);
    c.fractal.expect("a Fractal assertion")
}

fn assert_valid_mp4(bytes: &[u8], frames: usize, size: usize) {
    let v = fractal_engine::io::video::decode_mp4(bytes, 64).expect("the MP4 decodes");
    assert_eq!((v.frames.len(), v.width, v.height), (frames, size, size));
}

#[test]
fn jobs_survive_a_killed_prover_and_a_restarted_gateway() {
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
    for w in ["m1", "m2"] {
        let mut c = fractal();
        c.args(["prover", "-w", w, "--listen", "127.0.0.1:0"])
            .env("BT_WALLET_PATH", &wallets)
            .env("FRACTAL_CHAIN", &url)
            .env("RAYON_NUM_THREADS", "1");
        let (p, line, _) = spawn_until(c, "serving");
        // "prover uid N (HOTKEY) serving …"
        let hotkey = hotkey_in(&line);
        provers.push(Some((p, hotkey)));
    }
    let gw_dir = dir.path().join("gateway");
    let key = create_api_key(&gw_dir, "e2e");
    let (gateway, base) = start_gateway(&wallets, &url, &gw_dir, "val");
    let api = Api {
        base,
        key,
        http: reqwest::blocking::Client::new(),
    };
    // Long enough to kill mid-way on two cores: 8 frames, 64x64, 24 steps.
    let job = json!({"prompt": "a red fox running through snow", "size": "64x64", "seconds": "1", "steps": 24, "seed": 5});

    // 1. Kill -9 the prover serving a job: it completes on the other one.
    let first = api.create(job.clone());
    let id = first["id"].as_str().unwrap().to_string();
    let running = api.wait(&id, "the job to start", 120, |v| {
        v["status"] == "in_progress"
            && v["progress"].as_u64().unwrap_or(0) >= 5
            && v["prover"].is_string()
    });
    let victim = running["prover"].as_str().unwrap().to_string();
    let slot = provers
        .iter_mut()
        .position(|p| p.as_ref().is_some_and(|(_, hk)| *hk == victim))
        .expect("the serving prover is one of ours");
    let (mut proc, _) = provers[slot].take().unwrap();
    proc.0.kill().unwrap();
    let done = api.wait(&id, "failover", 180, |v| v["status"] == "completed");
    assert_ne!(done["prover"], victim, "completed elsewhere: {done}");
    let video = api.content(&id, "video");
    assert_valid_mp4(&video, 8, 64);

    // 2. Kill -9 the gateway mid-job, start it again: the job completes,
    //    once, with the same seed (so the very same video).
    let second = api.create(job);
    let id2 = second["id"].as_str().unwrap().to_string();
    api.wait(&id2, "the second job to start", 120, |v| {
        v["status"] == "in_progress" && v["progress"].as_u64().unwrap_or(0) >= 5
    });
    drop(gateway);
    let (_gateway, base) = start_gateway(&wallets, &url, &gw_dir, "val");
    let api = Api { base, ..api };
    api.wait(&id2, "the resumed job", 180, |v| v["status"] == "completed");
    // Same prompt and seed on the same build: the same video. Each download
    // is wrapped in its own signed C2PA manifest (another video id), so
    // compare what the credentials commit to: the prover's trace root (over
    // every latent) and the decoded frames.
    let again = api.content(&id2, "video");
    assert_eq!(
        credentials(&again).generation.trace_root,
        credentials(&video).generation.trace_root,
        "same prompt and seed on the same build: the same generation"
    );
    assert_eq!(
        fractal_engine::io::video::decode_mp4(&again, 64)
            .unwrap()
            .frames,
        fractal_engine::io::video::decode_mp4(&video, 64)
            .unwrap()
            .frames
    );
    let list: Value = api
        .http
        .get(format!("{}/v1/videos", api.base))
        .bearer_auth(&api.key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [id2.as_str(), id.as_str()],
        "nothing lost, nothing duplicated"
    );
}

#[test]
fn openai_sdk_and_browser_on_fractal_grid() {
    let Some(python) = tool("FRACTAL_PYTHON") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = fractal();
    c.args([
        "grid",
        "--provers",
        "3",
        "--block-time-ms",
        "100",
        "--tempo",
        "10",
        "--listen",
        "127.0.0.1:0",
        "--dir",
    ])
    .arg(dir.path())
    .stdout(Stdio::null());
    let (_grid, _, log) = spawn_until(c, "Ctrl-C stops");
    let text = log.lock().unwrap().join("\n");
    let page = text
        .split("web page: ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let base = page.split("/#key=").next().unwrap().to_string();
    let key = page.split("/#key=").nth(1).unwrap().to_string();

    // The openai SDK, unchanged (create_and_poll, download_content, list, retrieve, delete, errors).
    let mp4 = dir.path().join("sdk.mp4");
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tools/sdk/e2e.py"
        ))
        .args([&base, &key])
        .arg(&mp4)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai SDK run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["size"], "32x32");
    assert_eq!(
        seen["models"],
        json!(["fractal-tiny-v1"]),
        "client.models.list()"
    );
    assert_valid_mp4(&std::fs::read(&mp4).unwrap(), 4, 32);

    // Its content credentials, as `fractal verify-credentials` reports them,
    // checked against the job and the chain.
    let chain = text
        .split("grid ready: chain ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let out = fractal()
        .arg("verify-credentials")
        .arg(&mp4)
        .args(["--json", "--chain", chain])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify-credentials failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["state"], "valid", "{report}");
    let g = &report["fractal"];
    assert_eq!(g["video_id"], seen["id"]);
    assert_eq!(g["seed"], 1234);
    assert_eq!(g["steps"], 4);
    assert_eq!((&g["width"], &g["frames"]), (&json!(32), &json!(4)));
    assert_eq!(
        g["prompt_sha256"],
        fractal_credentials::Generation::sha256_hex(
            "a lighthouse at dusk, waves crashing on rocks"
        )
    );
    assert_eq!(report["binding"]["verified"], true, "{report}");
    assert_eq!(report["binding"]["hotkey"], g["validator"], "{report}");
    assert_eq!(report["on_chain"]["validator_permit"], true, "{report}");
    // An edited manifest (one hex digit of the binding's signature) fails.
    let mut forged = std::fs::read(&mp4).unwrap();
    let sig = g["certificate_binding"]["signature"].as_str().unwrap();
    let at = forged
        .windows(sig.len())
        .position(|w| w == sig.as_bytes())
        .expect("the binding's signature is in the file");
    forged[at] = if forged[at] == b'0' { b'1' } else { b'0' };
    let forged_path = dir.path().join("forged.mp4");
    std::fs::write(&forged_path, &forged).unwrap();
    let out = fractal()
        .arg("verify-credentials")
        .arg(&forged_path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "an edited manifest verified");

    // An independent reader: the C2PA SDK's Python bindings read the
    // manifest and find nothing wrong but that no trust list knows the signer.
    {
        let out = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tools/sdk/c2pa_read.py"
            ))
            .arg(&mp4)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "c2pa_read.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let store: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(store["validation_state"], "Valid", "{store}");
        let failures = &store["validation_results"]["activeManifest"]["failure"];
        let codes: Vec<&str> = failures
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["code"].as_str().unwrap())
            .collect();
        assert_eq!(codes, ["signingCredential.untrusted"], "{store}");
        let active = &store["manifests"][store["active_manifest"].as_str().unwrap()];
        let labels: Vec<&str> = active["assertions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["label"].as_str().unwrap())
            .collect();
        assert!(labels.contains(&"io.fractal.generation"), "{labels:?}");
        assert!(
            labels.iter().any(|l| l.starts_with("c2pa.actions")),
            "{labels:?}"
        );
    }

    // A real browser on the web page.
    let (Some(driver), Some(chromium)) = (tool("FRACTAL_CHROMEDRIVER"), tool("FRACTAL_CHROMIUM"))
    else {
        return;
    };
    let b = Browser::start(&driver, &chromium);
    let state = b.make_video_on_page(&page, "a cat playing piano in space", 4, 3);
    assert_eq!(state["width"], 32, "{state}");
    assert!(
        state["status"].as_str().unwrap().contains("completed"),
        "{state}"
    );
    assert_eq!(state["gif"], true, "GIF download offered: {state}");
    assert_eq!(
        state["rows"], 3,
        "latency table lists every prover: {state}"
    );
    let shot = b
        .http
        .get(format!("{}/screenshot", b.url))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    let png = base64_decode(shot["value"].as_str().unwrap());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("gateway-page.png"), png).unwrap();
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
