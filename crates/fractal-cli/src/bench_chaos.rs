//! `fractal bench chaos`: a whole grid as separate processes on loopback
//! (chain, provers, verifier, gateway) under a steady stream of jobs,
//! while components are killed with SIGKILL at random moments and
//! restarted, and some provers sit behind a faulty link (slow, dropped
//! connections, truncated responses). Afterwards every accepted job must be
//! completed or failed with a reason — none lost, none duplicated — every
//! SQLite store must pass `PRAGMA integrity_check`, every video must
//! decode, and the verifier must set weights again.
//!
//! The fault schedule comes from `--seed`, so a failing run can be
//! replayed (process timing still varies).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use fractal_chain::{Chain, RemoteChain};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Args)]
pub struct ChaosBench {
    /// Seconds of job stream with faults injected.
    #[arg(long, default_value_t = 240)]
    duration_s: u64,
    /// Provers with a clean link.
    #[arg(long, default_value_t = 2)]
    provers: usize,
    /// Provers behind a faulty link: added delay, dropped connections,
    /// truncated responses.
    #[arg(long, default_value_t = 1)]
    flaky: usize,
    /// Mean seconds between two kills (exponentially distributed).
    #[arg(long, default_value_t = 8.0)]
    kill_every_s: f64,
    /// Seconds between two job submissions.
    #[arg(long, default_value_t = 2.0)]
    submit_every_s: f64,
    /// Denoising steps per job (small keeps jobs short on two cores).
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Seconds allowed after the faults stop for every job to finish.
    #[arg(long, default_value_t = 300)]
    drain_s: u64,
    /// Seeds the fault schedule and the faulty links.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the run's folder (logs, stores, videos) here instead of a
    /// temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// What the run found; `passed` is false when anything was lost or
/// duplicated, a store is corrupt, a video is bad or weights did not resume.
#[derive(Serialize)]
struct Report {
    duration_s: u64,
    provers: usize,
    flaky: usize,
    kills: BTreeMap<String, u32>,
    submissions: u64,
    accepted: usize,
    rejected: BTreeMap<String, u32>,
    completed: usize,
    failed: BTreeMap<String, u32>,
    lost: Vec<String>,
    duplicated: Vec<String>,
    bad_videos: Vec<String>,
    completed_by: BTreeMap<String, u32>,
    link_faults: BTreeMap<String, u64>,
    stores: BTreeMap<String, String>,
    weights_resumed_at_block: Option<u64>,
    passed: bool,
}

/// One long-running `fractal` process that can be killed and restarted on
/// the same address.
struct Component {
    name: String,
    args: Vec<OsString>,
    env: Vec<(String, OsString)>,
    /// A stderr line containing this means "ready".
    marker: &'static str,
    log: PathBuf,
    child: Option<Child>,
}

impl Component {
    fn new(
        name: impl Into<String>,
        args: Vec<OsString>,
        marker: &'static str,
        logs: &Path,
    ) -> Self {
        let name = name.into();
        Component {
            log: logs.join(format!("{name}.log")),
            name,
            args,
            env: Vec::new(),
            marker,
            child: None,
        }
    }

    /// Starts the process and waits for its ready line; returns that line.
    /// A process that exits first (say, the chain it needs is down) is
    /// started again, up to a deadline.
    fn start(&mut self) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match self.try_start() {
                Ok(line) => return Ok(line),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(component = %self.name, error = %e, "start failed; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.context(format!("starting {}", self.name))),
            }
        }
    }

    fn try_start(&mut self) -> anyhow::Result<String> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stderr = child.stderr.take().expect("piped");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(log, "---- start ----")?;
        let (tx, rx) = mpsc::channel();
        let marker = self.marker;
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if line.contains(marker) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                self.child = Some(child);
                Ok(line)
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("no {:?} line (see {})", self.marker, self.log.display())
            }
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (at the end of the run, before the stores are checked).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, which has not been reaped
            // yet, so the pid cannot have been reused.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Runs a one-shot `fractal` command (wallets, registration); must succeed.
fn fractal(env: &[(String, OsString)], args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "fractal {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Counts of what the faulty links did.
#[derive(Default)]
struct LinkFaults {
    connections: AtomicU64,
    dropped: AtomicU64,
    truncated: AtomicU64,
    delayed: AtomicU64,
}

/// A TCP proxy in front of a prover: per connection it either drops the
/// connection after the request arrives, cuts the response short, or
/// forwards everything after a delay.
async fn faulty_link(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    seed: u64,
    faults: Arc<LinkFaults>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        faults.connections.fetch_add(1, Ordering::Relaxed);
        let roll: f64 = rng.gen();
        let delay = Duration::from_millis(rng.gen_range(20..300));
        let cut_after = rng.gen_range(1..400usize);
        let faults = faults.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            if roll < 0.1 {
                // Read the request, then hang up without an answer.
                faults.dropped.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 4096];
                let _ = cr.read(&mut buf).await;
                return;
            }
            let truncate = roll < 0.2;
            if truncate {
                faults.truncated.fetch_add(1, Ordering::Relaxed);
            } else {
                faults.delayed.fetch_add(1, Ordering::Relaxed);
            }
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            });
            tokio::time::sleep(delay).await;
            let mut sent = 0usize;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let n = if truncate { n.min(cut_after - sent) } else { n };
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                sent += n;
                if truncate && sent >= cut_after {
                    break;
                }
            }
            let _ = cw.shutdown().await;
            up.abort();
        });
    }
}

struct Submitted {
    /// Submission number -> the job id the gateway answered.
    accepted: BTreeMap<u64, String>,
    rejected: BTreeMap<String, u32>,
    submissions: u64,
}

/// Submits one job every `every` until `stop`; each submission carries its
/// own Idempotency-Key and is retried through gateway outages until it is
/// answered, so a create the gateway stored but never answered is not made
/// twice.
async fn submit_stream(
    http: reqwest::Client,
    base: String,
    key: String,
    every: Duration,
    steps: u32,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Submitted {
    let mut out = Submitted {
        accepted: BTreeMap::new(),
        rejected: BTreeMap::new(),
        submissions: 0,
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let next = tokio::time::Instant::now() + every;
        n += 1;
        out.submissions = n;
        let body = json!({
            "prompt": format!("chaos job {n}"),
            "steps": steps,
            "seed": n,
        });
        let idem = format!("chaos-{seed}-{n}");
        loop {
            let resp = http
                .post(format!("{base}/v1/videos"))
                .bearer_auth(&key)
                .header("Idempotency-Key", &idem)
                .json(&body)
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                    Ok(v) => {
                        let id = v["id"].as_str().unwrap_or_default().to_string();
                        out.accepted.insert(n, id);
                        break;
                    }
                    // The gateway died mid-answer: ask again.
                    Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                },
                Ok(r) if r.status().as_u16() == 429 || r.status().as_u16() == 503 => {
                    let wait = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(1)
                        .min(5);
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap_or_default();
                    let code = v["error"]["code"].as_str().unwrap_or("?").to_string();
                    *out.rejected.entry(format!("{status} {code}")).or_default() += 1;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        tokio::time::sleep_until(next).await;
    }
    out
}

pub fn run(b: ChaosBench) -> anyhow::Result<()> {
    if b.provers + b.flaky == 0 {
        bail!("--provers plus --flaky must be at least 1");
    }
    let temp;
    let dir = match &b.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let rt = crate::chain_cmd::runtime()?;
    let mut rng = StdRng::seed_from_u64(b.seed);
    let say = |msg: String| {
        if !b.json {
            eprintln!("{msg}");
        }
    };

    // The chain first: everything else needs its URL.
    let chain_addr = free_addr()?;
    let mut chain = Component::new(
        "chain",
        vec![
            "chain".into(),
            "serve".into(),
            "--listen".into(),
            chain_addr.to_string().into(),
            "--block-time-ms".into(),
            "200".into(),
            "--tempo".into(),
            "10".into(),
            "--db".into(),
            dir.join("chain.sqlite").into(),
        ],
        "local chain at",
        &logs,
    );
    chain.start()?;
    let url = format!("http://{chain_addr}");
    let env: Vec<(String, OsString)> = vec![
        ("BT_WALLET_PATH".into(), dir.join("wallets").into()),
        ("FRACTAL_CHAIN".into(), url.clone().into()),
        // One engine thread per node: the nodes share the machine's cores.
        ("RAYON_NUM_THREADS".into(), "1".into()),
    ];
    chain.env = env.clone();
    let prover_names: Vec<String> = (0..b.provers + b.flaky).map(|i| format!("p{i}")).collect();
    for w in std::iter::once("val").chain(prover_names.iter().map(String::as_str)) {
        fractal(&env, &["wallet", "create", "-w", w, "--no-password"])?;
        fractal(&env, &["register", "-w", w])?;
    }
    fractal(&env, &["stake", "-w", "val", "--amount", "100"])?;

    let link_faults = Arc::new(LinkFaults::default());
    let mut components = vec![chain];
    for (i, name) in prover_names.iter().enumerate() {
        let listen = free_addr()?;
        let mut args = os(&["prover", "-w", name, "--listen"]);
        args.push(listen.to_string().into());
        let label = if i >= b.provers {
            // Validators and the gateway reach this one through the faulty link.
            let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            args.push("--announce".into());
            args.push(listener.local_addr()?.to_string().into());
            rt.spawn(faulty_link(
                listener,
                listen,
                b.seed ^ (i as u64 + 1),
                link_faults.clone(),
            ));
            format!("prover-{name}-flaky")
        } else {
            format!("prover-{name}")
        };
        let mut c = Component::new(label, args, "serving", &logs);
        c.env = env.clone();
        components.push(c);
    }
    let mut verifier = Component::new(
        "verifier",
        vec![
            "verifier".into(),
            "-w".into(),
            "val".into(),
            "--pause-s".into(),
            "3".into(),
            "--db".into(),
            dir.join("verifier.sqlite").into(),
        ],
        "running",
        &logs,
    );
    verifier.env = env.clone();
    components.push(verifier);
    let gateway_dir = dir.join("gateway");
    let key = fractal(
        &env,
        &[
            "gateway",
            "keys",
            "create",
            "--name",
            "chaos",
            "--max-active",
            "1000",
            "--creates-per-min",
            "600",
            "--dir",
            gateway_dir.to_str().context("non-UTF-8 folder")?,
        ],
    )?;
    let gateway_addr = free_addr()?;
    let mut gateway = Component::new(
        "gateway",
        vec![
            "gateway".into(),
            "-w".into(),
            "val".into(),
            "--listen".into(),
            gateway_addr.to_string().into(),
            "--dir".into(),
            gateway_dir.clone().into(),
        ],
        "gateway at",
        &logs,
    );
    gateway.env = env.clone();
    components.push(gateway);
    for c in components.iter_mut().skip(1) {
        c.start()?;
    }
    let base = format!("http://{gateway_addr}");
    say(format!(
        "chaos: {} provers ({} behind a faulty link), verifier, gateway and chain up; logs in {}",
        b.provers + b.flaky,
        b.flaky,
        logs.display()
    ));

    // The job stream runs on the runtime while this thread kills.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stream = rt.spawn(submit_stream(
        http.clone(),
        base.clone(),
        key.clone(),
        Duration::from_secs_f64(b.submit_every_s.max(0.05)),
        b.steps,
        b.seed,
        stop.clone(),
    ));
    let start = Instant::now();
    let end = start + Duration::from_secs(b.duration_s);
    let mut kills: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        let gap = -b.kill_every_s.max(0.1) * (1.0 - rng.gen::<f64>()).ln();
        let at = Instant::now() + Duration::from_secs_f64(gap);
        if at >= end {
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            break;
        }
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let victim = rng.gen_range(0..components.len());
        let down = Duration::from_millis(rng.gen_range(100..3000));
        let c = &mut components[victim];
        say(format!(
            "t={:>5.1}s  kill -9 {} (down {:.1} s)",
            start.elapsed().as_secs_f64(),
            c.name,
            down.as_secs_f64()
        ));
        c.kill();
        *kills.entry(c.name.clone()).or_default() += 1;
        std::thread::sleep(down);
        c.start()?;
    }
    stop.store(true, Ordering::Relaxed);
    let submitted = rt.block_on(stream)?;
    let fault_block = rt.block_on(async {
        RemoteChain::connect(&url)
            .await?
            .block()
            .await
            .map_err(anyhow::Error::from)
    })?;
    say(format!(
        "faults stopped after {} s: {} submitted, {} accepted; waiting up to {} s for every job to finish",
        b.duration_s,
        submitted.submissions,
        submitted.accepted.len(),
        b.drain_s
    ));

    // Drain: every accepted job must reach completed or failed.
    let report = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(b.drain_s);
        let mut open: BTreeSet<String> = submitted.accepted.values().cloned().collect();
        let mut jobs: BTreeMap<String, Value> = BTreeMap::new();
        while !open.is_empty() && tokio::time::Instant::now() < deadline {
            for id in open.clone() {
                let Ok(r) = http
                    .get(format!("{base}/v1/videos/{id}"))
                    .bearer_auth(&key)
                    .send()
                    .await
                else {
                    continue;
                };
                if r.status().as_u16() == 404 {
                    // Lost: the gateway does not know a job it accepted.
                    open.remove(&id);
                    continue;
                }
                let Ok(v) = r.json::<Value>().await else {
                    continue;
                };
                if v["status"] == "completed" || v["status"] == "failed" {
                    open.remove(&id);
                    jobs.insert(id, v);
                }
            }
            if !open.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // Everything the gateway holds for this key, to find duplicates.
        let mut listed: Vec<Value> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut req = http
                .get(format!("{base}/v1/videos"))
                .bearer_auth(&key)
                .query(&[("limit", "100"), ("order", "asc")]);
            if let Some(a) = &after {
                req = req.query(&[("after", a)]);
            }
            let page: Value = req.send().await?.error_for_status()?.json().await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            after = data
                .last()
                .and_then(|v| v["id"].as_str())
                .map(str::to_string);
            listed.extend(data);
            if page["has_more"] != true {
                break;
            }
        }
        let accepted_ids: BTreeSet<&String> = submitted.accepted.values().collect();
        let mut per_prompt: BTreeMap<String, u32> = BTreeMap::new();
        let mut duplicated = Vec::new();
        for v in &listed {
            let prompt = v["prompt"].as_str().unwrap_or_default().to_string();
            let id = v["id"].as_str().unwrap_or_default().to_string();
            *per_prompt.entry(prompt.clone()).or_default() += 1;
            if !accepted_ids.contains(&id) || per_prompt[&prompt] > 1 {
                duplicated.push(format!("{id} ({prompt})"));
            }
        }
        let lost: Vec<String> = submitted
            .accepted
            .values()
            .filter(|id| !jobs.contains_key(*id))
            .cloned()
            .collect();
        let mut failed: BTreeMap<String, u32> = BTreeMap::new();
        let mut completed_by: BTreeMap<String, u32> = BTreeMap::new();
        let mut bad_videos = Vec::new();
        let mut completed = 0;
        for (id, v) in &jobs {
            if v["status"] == "failed" {
                let reason = format!(
                    "{}: {}",
                    v["error"]["code"].as_str().unwrap_or("?"),
                    v["error"]["message"].as_str().unwrap_or("?")
                );
                *failed.entry(reason).or_default() += 1;
                continue;
            }
            completed += 1;
            let prover = v["prover"].as_str().unwrap_or("?");
            *completed_by
                .entry(prover.chars().take(8).collect())
                .or_default() += 1;
            let frames = v["frames"].as_u64().unwrap_or(0) as usize;
            let bytes = http
                .get(format!("{base}/v1/videos/{id}/content"))
                .bearer_auth(&key)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            match fractal_engine::io::video::decode_mp4(&bytes, 1024) {
                Ok(d) if d.frames.len() == frames => {}
                Ok(d) => bad_videos.push(format!("{id}: {} frames, want {frames}", d.frames.len())),
                Err(e) => bad_videos.push(format!("{id}: {e}")),
            }
        }
        // Weights resume: the verifier sets weights after the last fault.
        let chain = RemoteChain::connect(&url).await?;
        let mut weights_resumed_at_block = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while tokio::time::Instant::now() < deadline {
            let mg = chain.metagraph().await?;
            let validator = mg.neurons.iter().max_by_key(|n| n.stake.0);
            if let Some(v) = validator.filter(|v| v.last_update > fault_block) {
                weights_resumed_at_block = Some(v.last_update);
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let link_faults = BTreeMap::from([
            (
                "connections".to_string(),
                link_faults.connections.load(Ordering::Relaxed),
            ),
            (
                "dropped".to_string(),
                link_faults.dropped.load(Ordering::Relaxed),
            ),
            (
                "truncated".to_string(),
                link_faults.truncated.load(Ordering::Relaxed),
            ),
            (
                "delayed".to_string(),
                link_faults.delayed.load(Ordering::Relaxed),
            ),
        ]);
        anyhow::Ok(Report {
            duration_s: b.duration_s,
            provers: b.provers + b.flaky,
            flaky: b.flaky,
            kills,
            submissions: submitted.submissions,
            accepted: submitted.accepted.len(),
            rejected: submitted.rejected,
            completed,
            failed,
            lost,
            duplicated,
            bad_videos,
            completed_by,
            link_faults,
            stores: BTreeMap::new(),
            weights_resumed_at_block,
            passed: false,
        })
    })?;
    let mut report = report;

    // Stop everything cleanly, then check every SQLite store on disk.
    for c in components.iter_mut().rev() {
        c.stop();
    }
    for path in sqlite_files(&dir)? {
        let name = path
            .strip_prefix(&dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        report.stores.insert(name, integrity(&path));
    }
    report.passed = report.lost.is_empty()
        && report.duplicated.is_empty()
        && report.bad_videos.is_empty()
        && report.stores.values().all(|s| s == "ok")
        && report.weights_resumed_at_block.is_some()
        && report.accepted > 0;

    if b.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    if !report.passed {
        bail!("chaos run failed (logs and stores in {})", dir.display());
    }
    Ok(())
}

fn sqlite_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "sqlite") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn integrity(path: &Path) -> String {
    let check = || -> rusqlite::Result<String> {
        let conn = rusqlite::Connection::open(path)?;
        conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
    };
    check().unwrap_or_else(|e| e.to_string())
}

fn print_report(r: &Report) {
    let kills: u32 = r.kills.values().sum();
    println!(
        "chaos run: {} s, {} provers ({} behind a faulty link), {kills} kills:",
        r.duration_s, r.provers, r.flaky
    );
    for (who, n) in &r.kills {
        println!("  kill -9 {who:<22} {n}");
    }
    println!(
        "faulty links: {} connections, {} dropped, {} truncated, {} delayed",
        r.link_faults["connections"],
        r.link_faults["dropped"],
        r.link_faults["truncated"],
        r.link_faults["delayed"]
    );
    println!(
        "jobs: submitted {}, accepted {}, completed {}, failed {}, lost {}, duplicated {}",
        r.submissions,
        r.accepted,
        r.completed,
        r.failed.values().sum::<u32>(),
        r.lost.len(),
        r.duplicated.len()
    );
    for (why, n) in &r.rejected {
        println!("  rejected {n}x: {why}");
    }
    for (why, n) in &r.failed {
        println!("  failed {n}x: {why}");
    }
    for id in r.lost.iter().chain(&r.duplicated).chain(&r.bad_videos) {
        println!("  !! {id}");
    }
    let by: Vec<String> = r
        .completed_by
        .iter()
        .map(|(p, n)| format!("{p}… {n}"))
        .collect();
    println!("completed by prover: {}", by.join(", "));
    println!(
        "videos: {} decoded with the right frame count, {} bad",
        r.completed - r.bad_videos.len(),
        r.bad_videos.len()
    );
    for (store, state) in &r.stores {
        println!("store {store}: integrity {state}");
    }
    match r.weights_resumed_at_block {
        Some(b) => println!("weights: set again at block {b}, after the faults"),
        None => println!("weights: NOT set again after the faults"),
    }
    println!("{}", if r.passed { "PASSED" } else { "FAILED" });
}
