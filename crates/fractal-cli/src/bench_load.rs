//! `fractal bench load`: the gateway under many concurrent apps on
//! loopback — creation and status-poll throughput and latency, memory over
//! a soak, and back-pressure (429 + Retry-After) instead of unbounded
//! queues. The gateway runs in this process on a chain with no provers, so
//! what is measured is the gateway's own cost, which is what it adds to
//! every request routed through it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use fractal_chain::{Chain, Hyperparams, LocalChain};
use fractal_gateway::db::KeyLimits;
use fractal_gateway::{Gateway, GatewayConfig};
use fractal_protocol::Keypair;
use fractal_verifier::store::Store;
use fractal_verifier::{Verifier, VerifierConfig};

use crate::node_cmd::ModelArgs;

#[derive(Args)]
pub struct LoadBench {
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of status polling while memory is sampled (0: no soak).
    #[arg(long, default_value_t = 0)]
    soak_s: u64,
    #[command(flatten)]
    model: ModelArgs,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

struct Phase {
    name: &'static str,
    ok: usize,
    refused: usize,
    other: usize,
    latencies_us: Vec<u64>,
    elapsed: Duration,
}

impl Phase {
    fn report(&mut self) {
        self.latencies_us.sort_unstable();
        let pct = |q: f64| {
            let v = &self.latencies_us;
            if v.is_empty() {
                return 0.0;
            }
            v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0
        };
        println!(
            "| {} | {:.0}/s | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} | {} |",
            self.name,
            (self.ok + self.refused) as f64 / self.elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.99),
            pct(0.999),
            self.ok,
            self.refused,
            self.other
        );
    }
}

/// Builds the `i`-th request of a phase.
type MakeRequest = Arc<dyn Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync>;

/// `connections` clients sending `make(i)` back to back for `secs`.
async fn hammer(name: &'static str, connections: usize, secs: u64, make: MakeRequest) -> Phase {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (client, stop, make) = (client.clone(), stop.clone(), make.clone());
            tokio::spawn(async move {
                let (mut ok, mut refused, mut other, mut lat) = (0, 0, 0, Vec::new());
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match make(&client, i).send().await {
                        Ok(r) => {
                            let status = r.status();
                            let _ = r.bytes().await;
                            lat.push(t.elapsed().as_micros() as u64);
                            if status.is_success() {
                                ok += 1;
                            } else if status.as_u16() == 429 || status.as_u16() == 503 {
                                refused += 1;
                            } else {
                                other += 1;
                            }
                        }
                        Err(_) => other += 1,
                    }
                    i += connections;
                }
                (ok, refused, other, lat)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut phase = Phase {
        name,
        ok: 0,
        refused: 0,
        other: 0,
        latencies_us: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (ok, refused, other, lat) = t.await.expect("client task");
        phase.ok += ok;
        phase.refused += refused;
        phase.other += other;
        phase.latencies_us.extend(lat);
    }
    phase.elapsed = start.elapsed();
    phase
}

pub fn run(b: LoadBench) -> anyhow::Result<()> {
    let model = Arc::new(b.model.load()?);
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let key = Keypair::from_seed(&[9; 32]);
        let chain: Arc<dyn Chain> = Arc::new(LocalChain::in_memory(Hyperparams::default(), key.hotkey())?);
        chain.register(&Keypair::from_seed(&[8; 32]), &key.hotkey()).await?;
        let verifier = Verifier::new(
            key,
            chain,
            model.clone(),
            Store::in_memory()?,
            VerifierConfig::from_manifest(&model.manifest),
        )?;
        let gw = Gateway::open(GatewayConfig::new(dir.path().to_path_buf()), verifier, model)?;
        let unlimited = KeyLimits {
            requests_per_min: u32::MAX / 2,
            creates_per_min: u32::MAX / 2,
            max_active: u32::MAX / 2,
            daily_quota: u32::MAX / 2,
        };
        let (_, secret) = gw.db.create_key("load", unlimited)?;
        let (_, small) = gw.db.create_key(
            "small",
            KeyLimits {
                max_active: 8,
                ..KeyLimits::default()
            },
        )?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(fractal_gateway::serve(listener, gw.clone(), async {
            let _ = stop_rx.await;
        }));
        eprintln!(
            "gateway on {base}, {} connections, {} s per phase, {} worker threads",
            b.connections,
            b.seconds,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("| phase | throughput | p50 | p99 | p99.9 | ok | 429/503 | other |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        let body = serde_json::json!({"prompt": "a red fox running through snow", "size": "32x32", "seconds": "0.5", "steps": 4});
        let create_url = format!("{base}/v1/videos");
        let (s, bd) = (secret.clone(), body.clone());
        let mut p = hammer(
            "create (durable insert)",
            b.connections,
            b.seconds,
            Arc::new(move |c, _| c.post(&create_url).bearer_auth(&s).json(&bd)),
        )
        .await;
        p.report();
        let ids: Arc<Vec<String>> = Arc::new(
            gw.db
                .list_jobs(&gw.db.key_by_secret(&secret)?.expect("key").id, None, 100, false)?
                .into_iter()
                .map(|j| j.id)
                .collect(),
        );
        anyhow::ensure!(!ids.is_empty(), "no job was created");
        let poll = {
            let (base, s, ids) = (base.clone(), secret.clone(), ids.clone());
            Arc::new(move |c: &reqwest::Client, i: usize| {
                c.get(format!("{base}/v1/videos/{}", ids[i % ids.len()])).bearer_auth(&s)
            })
        };
        let rss_before = rss_kib();
        let mut p = hammer("status poll", b.connections, b.seconds, poll.clone()).await;
        p.report();
        let small_url = format!("{base}/v1/videos");
        let mut p = hammer(
            "create over a key's limits",
            b.connections.min(8),
            b.seconds.min(3),
            Arc::new(move |c, _| c.post(&small_url).bearer_auth(&small).json(&body)),
        )
        .await;
        p.report();
        anyhow::ensure!(p.refused > 0, "no back-pressure seen");
        if b.soak_s > 0 {
            let mut samples = vec![(0u64, rss_kib())];
            let start = Instant::now();
            let mut polls = 0;
            while start.elapsed().as_secs() < b.soak_s {
                let p = hammer("soak", b.connections, 10, poll.clone()).await;
                polls += p.ok;
                samples.push((start.elapsed().as_secs(), rss_kib()));
            }
            let first = samples[1.min(samples.len() - 1)].1;
            let last = samples.last().expect("samples").1;
            let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
            // Growth over the second half tells a leak (steady growth) from
            // caches filling up once (growth early, flat after).
            let mid = samples
                .iter()
                .find(|s| s.0 >= b.soak_s / 2)
                .map_or(first, |s| s.1);
            println!(
                "\nsoak: {polls} status polls over {} s; RSS before polling {rss_before} KiB, after the first 10 s {first} KiB, at the end {last} KiB, max {max} KiB ({:+.1}% from the first sample, {:+.1}% over the second half)",
                b.soak_s,
                (last as f64 - first as f64) / first.max(1) as f64 * 100.0,
                (last as f64 - mid as f64) / mid.max(1) as f64 * 100.0
            );
            let per_minute: Vec<String> = samples
                .iter()
                .filter(|s| s.0 % 60 < 10)
                .map(|s| format!("{}s {} MiB", s.0, s.1 / 1024))
                .collect();
            println!("RSS over the soak: {}", per_minute.join(", "));
        }
        let _ = stop_tx.send(());
        server.await??;
        anyhow::Ok(())
    })
}
