//! A real headless Chromium driven over WebDriver, for the gateway's page.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Proc;

/// Minimal W3C WebDriver client over chromedriver's HTTP API.
pub struct Browser {
    pub http: reqwest::blocking::Client,
    pub url: String,
    _driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start(chromedriver: &str, chromium: &str) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Proc(
            Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let profile = tempfile::tempdir().unwrap();
        let http = reqwest::blocking::Client::new();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--no-first-run", "--window-size=1280,1000", "--autoplay-policy=no-user-gesture-required",
                     format!("--user-data-dir={}", profile.path().display())]}}}});
        let start = Instant::now();
        let session = loop {
            match http
                .post(format!("http://127.0.0.1:{port}/session"))
                .json(&caps)
                .send()
            {
                Ok(r) => {
                    let v: Value = r.json().unwrap();
                    break v["value"]["sessionId"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{v}"))
                        .to_string();
                }
                Err(_) if start.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("chromedriver did not start: {e}"),
            }
        };
        Browser {
            http,
            url: format!("http://127.0.0.1:{port}/session/{session}"),
            _driver: driver,
            _profile: profile,
        }
    }
    pub fn cmd(&self, path: &str, body: Value) -> Value {
        let v: Value = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        // WebDriver errors come as {"value": {"error", "message", …}}.
        assert!(v["value"].get("stacktrace").is_none(), "{path}: {v}");
        v["value"].clone()
    }
    pub fn js(&self, script: &str) -> Value {
        self.cmd("/execute/sync", json!({"script": script, "args": []}))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.url).send();
    }
}

impl Browser {
    /// Opens the gateway's web page at `page`, asks it for a 32x32 clip of
    /// 0.5 s at `steps` steps, and waits until the video plays and the map
    /// shows `provers` nodes; returns the page's state then.
    pub fn make_video_on_page(&self, page: &str, prompt: &str, steps: u32, provers: u64) -> Value {
        self.cmd("/url", json!({"url": page}));
        self.js(&format!(
            "document.getElementById('prompt').value = {prompt};
              document.getElementById('size').value = '32x32';
              document.getElementById('seconds').value = '0.5';
              document.getElementById('steps').value = '{steps}';
              document.getElementById('go').click();",
            prompt = json!(prompt)
        ));
        let start = Instant::now();
        loop {
            let s = self.js("const v = document.getElementById('player');
                return { progress: document.getElementById('progress').value,
                         status: document.getElementById('status').textContent,
                         page_error: document.getElementById('error').textContent,
                         ready: v.readyState, time: v.currentTime, width: v.videoWidth, paused: v.paused,
                         gif: !document.getElementById('gif').hidden,
                         nodes: document.querySelectorAll('#map circle.node').length,
                         rows: document.querySelectorAll('#nodes tbody tr').length,
                         history: document.querySelectorAll('#history li').length };");
            if s["progress"] == 100
                && s["ready"].as_u64() >= Some(2)
                && s["time"].as_f64() > Some(0.0)
                && s["nodes"] == provers
            {
                return s;
            }
            assert!(
                s["page_error"].as_str().unwrap_or("").is_empty(),
                "page error: {s}"
            );
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "page never finished: {s}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
