//! A deterministic discrete-event simulator of a large grid, to compare
//! routing policies on identical traces (`fractal bench routing`).
//!
//! The world: provers in a few regions (RTT from the gateway 5-300 ms),
//! speeds spread 10x, one job at a time each, FIFO queues; nodes fail and
//! recover; jobs arrive in bursts with a mix of shapes. Every random draw
//! is made up front from one seed, so every policy sees the same arrivals,
//! the same failures and the same service time for a given (job, node).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use fractal_protocol::Hotkey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::map::{percentile, Failure, GridMap, RouterConfig, Ticket, Work};

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub provers: usize,
    /// Simulated seconds of arrivals.
    pub duration_s: f64,
    /// Jobs arriving in the first seconds are not counted (every policy
    /// starts cold; ours has to learn speeds first).
    pub warmup_s: f64,
    /// Mean offered load as a fraction of the fleet's capacity (bursts
    /// reach twice this).
    pub load: f64,
    /// Base RTT of each region, ms.
    pub region_rtt_ms: Vec<f64>,
    /// Slowest / fastest prover.
    pub speed_spread: f64,
    /// ms per frame·step at 64x64 on the fastest prover.
    pub fastest_ms_per_frame_step: f64,
    /// Mean time a prover stays up, seconds (exponential).
    pub mean_up_s: f64,
    /// Down periods last uniformly between these, seconds.
    pub down_s: (f64, f64),
    /// Attempts per job before it is reported failed.
    pub max_attempts: u32,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            provers: 256,
            duration_s: 1200.0,
            warmup_s: 60.0,
            load: 0.5,
            region_rtt_ms: vec![5.0, 30.0, 80.0, 150.0, 300.0],
            speed_spread: 10.0,
            fastest_ms_per_frame_step: 20.0,
            mean_up_s: 1800.0,
            down_s: (30.0, 120.0),
            max_attempts: 4,
            seed: 42,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    Random,
    RoundRobin,
    /// Fewest outstanding requests (ties at random); blind to speed and RTT.
    LeastLoaded,
    /// Knows every node's true backlog, speed, RTT and up/down state.
    Oracle,
    /// [`GridMap`]: learned RTT, speed and queues, hedging, breakers.
    Fractal,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::Random,
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::Oracle,
        Policy::Fractal,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Policy::Random => "random",
            Policy::RoundRobin => "round-robin",
            Policy::LeastLoaded => "least-loaded",
            Policy::Oracle => "oracle",
            Policy::Fractal => "fractal",
        }
    }
}

#[derive(Clone, Serialize)]
pub struct SimResult {
    pub policy: Policy,
    pub jobs: usize,
    pub completed: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub retries: u64,
    pub hedges: u64,
    /// Sorted latencies of counted jobs (for plots).
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

struct Node {
    rtt_ms: f64,
    ms_per_frame_step: f64,
    /// (down_at, up_at) periods in ms, sorted.
    outages: Vec<(f64, f64)>,
}

impl Node {
    fn down_at(&self, t: f64) -> bool {
        self.outages.iter().any(|&(a, b)| t >= a && t < b)
    }
    /// The end of the outage covering `t`.
    fn up_again(&self, t: f64) -> f64 {
        self.outages
            .iter()
            .find(|&&(a, b)| t >= a && t < b)
            .map_or(t, |o| o.1)
    }
}

struct JobSpec {
    arrival: f64,
    work: Work,
}

/// The world every policy is run against.
pub struct Trace {
    nodes: Vec<Node>,
    jobs: Vec<JobSpec>,
    cfg: SimConfig,
}

const SHAPES: [(Work, f64); 3] = [
    (
        Work {
            width: 32,
            height: 32,
            frames: 4,
            steps: 4,
        },
        0.3,
    ),
    (
        Work {
            width: 64,
            height: 64,
            frames: 8,
            steps: 10,
        },
        0.5,
    ),
    (
        Work {
            width: 128,
            height: 128,
            frames: 8,
            steps: 10,
        },
        0.2,
    ),
];

fn units(w: &Work) -> f64 {
    (w.width as f64 * w.height as f64) / 4096.0 * w.frames as f64 * w.steps as f64
}

/// Multiplicative service-time noise for (job, node), identical for every
/// policy: log-normal-ish with ~10% spread, from a hash, not an RNG stream.
fn noise(seed: u64, job: usize, node: usize) -> f64 {
    let mut x = seed ^ (job as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (node as u64) << 32;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    let u = (x >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    (0.2 * (u - 0.5)).exp()
}

impl Trace {
    pub fn generate(cfg: &SimConfig) -> Trace {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let horizon = cfg.duration_s * 3.0;
        let nodes: Vec<Node> = (0..cfg.provers)
            .map(|_| {
                let region = rng.gen_range(0..cfg.region_rtt_ms.len());
                let rtt_ms = cfg.region_rtt_ms[region] * rng.gen_range(0.8..1.2);
                // Log-uniform speeds across the spread.
                let ms =
                    cfg.fastest_ms_per_frame_step * cfg.speed_spread.powf(rng.gen_range(0.0..1.0));
                let mut outages = Vec::new();
                let mut t = 0.0;
                loop {
                    let up: f64 = -cfg.mean_up_s * (1.0 - rng.gen::<f64>()).ln();
                    t += up;
                    if t > horizon {
                        break;
                    }
                    let down = rng.gen_range(cfg.down_s.0..=cfg.down_s.1);
                    outages.push((t * 1000.0, (t + down) * 1000.0));
                    t += down;
                }
                Node {
                    rtt_ms,
                    ms_per_frame_step: ms,
                    outages,
                }
            })
            .collect();
        // Capacity in jobs/s for the average shape.
        let mean_units: f64 = SHAPES.iter().map(|(w, p)| units(w) * p).sum();
        let capacity: f64 = nodes
            .iter()
            .map(|n| 1000.0 / (mean_units * n.ms_per_frame_step))
            .sum();
        let mean_rate = cfg.load * capacity;
        // Bursts: each 30 s window is busy (2x) with probability 0.3, else
        // quiet, keeping the mean at `load`.
        let (busy, quiet) = (2.0, (1.0 - 0.3 * 2.0) / 0.7);
        let mut jobs = Vec::new();
        let mut window_end = 0.0;
        let mut rate = mean_rate;
        let mut t = 0.0;
        loop {
            if t >= window_end {
                window_end += 30.0;
                rate = mean_rate * if rng.gen_bool(0.3) { busy } else { quiet };
            }
            t += -(1.0 - rng.gen::<f64>()).ln() / rate;
            if t > cfg.duration_s {
                break;
            }
            let mut pick = rng.gen::<f64>();
            let mut work = SHAPES[0].0;
            for (w, p) in SHAPES {
                work = w;
                if pick < p {
                    break;
                }
                pick -= p;
            }
            jobs.push(JobSpec {
                arrival: t * 1000.0,
                work,
            });
        }
        Trace {
            nodes,
            jobs,
            cfg: cfg.clone(),
        }
    }

    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    fn service_ms(&self, job: usize, node: usize) -> f64 {
        units(&self.jobs[job].work)
            * self.nodes[node].ms_per_frame_step
            * noise(self.cfg.seed, job, node)
    }
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Arrive(usize),
    /// Request (job, attempt) reaches node.
    Deliver(usize, usize, u32),
    /// Node finishes what it is running.
    Finish(usize),
    /// The gateway learns the outcome of (job, node, attempt).
    Answer(usize, usize, u32, Option<f64>),
    /// Time to consider hedging job's attempt.
    Hedge(usize, u32),
    /// Cancellation reaches node.
    Cancel(usize, usize),
    NodeDown(usize),
    Probe,
}

struct Timed(f64, u64, Ev);
impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, sequence).
        o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
    }
}

#[derive(Default)]
struct ProverSim {
    queue: VecDeque<(usize, u32)>,
    /// (job, attempt, started, ends)
    running: Option<(usize, u32, f64, f64)>,
}

#[derive(Default)]
struct JobSim {
    done: bool,
    failed: bool,
    attempts: u32,
    /// Nodes holding a live copy.
    live: Vec<(usize, u32)>,
    tried: Vec<usize>,
}

struct World<'t> {
    trace: &'t Trace,
    policy: Policy,
    heap: BinaryHeap<Timed>,
    seq: u64,
    provers: Vec<ProverSim>,
    jobs: Vec<JobSim>,
    /// Outstanding requests per node, as the gateway counts them.
    outstanding: Vec<u32>,
    rng: StdRng,
    rr: usize,
    map: GridMap,
    keys: Vec<Hotkey>,
    /// (job, node, attempt) → the router's ticket (ours only) and send time.
    sent: BTreeMap<(usize, usize, u32), (Option<Ticket>, f64)>,
    latencies: Vec<f64>,
    retries: u64,
    hedges: u64,
    probe_next: usize,
}

fn key(i: usize) -> Hotkey {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Hotkey(b)
}

impl<'t> World<'t> {
    fn at(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Timed(t, self.seq, ev));
    }

    fn choose(&mut self, job: usize, now: f64) -> Option<(usize, Option<Ticket>)> {
        let n = self.trace.nodes.len();
        let tried = self.jobs[job].tried.clone();
        let open: Vec<usize> = (0..n).filter(|i| !tried.contains(i)).collect();
        if open.is_empty() {
            return None;
        }
        let mut ticket = None;
        let pick = match self.policy {
            Policy::Random => open[self.rng.gen_range(0..open.len())],
            Policy::RoundRobin => {
                let mut i = self.rr;
                while tried.contains(&(i % n)) {
                    i += 1;
                }
                self.rr = i + 1;
                i % n
            }
            Policy::LeastLoaded => {
                let min = open.iter().map(|&i| self.outstanding[i]).min()?;
                let least: Vec<usize> = open
                    .into_iter()
                    .filter(|&i| self.outstanding[i] == min)
                    .collect();
                least[self.rng.gen_range(0..least.len())]
            }
            Policy::Oracle => {
                let mut best = (f64::INFINITY, usize::MAX);
                for &i in &open {
                    let node = &self.trace.nodes[i];
                    let arrive = now + node.rtt_ms / 2.0;
                    if node.down_at(arrive) {
                        continue;
                    }
                    let p = &self.provers[i];
                    let mut free = arrive;
                    if let Some((_, _, _, ends)) = p.running {
                        free = free.max(ends);
                    }
                    let backlog: f64 = p
                        .queue
                        .iter()
                        .map(|&(j, _)| self.trace.service_ms(j, i))
                        .sum();
                    let done = free + backlog + self.trace.service_ms(job, i) + node.rtt_ms / 2.0;
                    if done < best.0 {
                        best = (done, i);
                    }
                }
                if best.1 == usize::MAX {
                    // Everything is down: wait for the first node back.
                    open.into_iter().min_by(|&a, &b| {
                        self.trace.nodes[a]
                            .up_again(now)
                            .total_cmp(&self.trace.nodes[b].up_again(now))
                    })?
                } else {
                    best.1
                }
            }
            Policy::Fractal => {
                let exclude: Vec<Hotkey> = tried.iter().map(|&i| self.keys[i]).collect();
                let t = self.map.choose(&self.trace.jobs[job].work, now, &exclude)?;
                ticket = Some(t);
                usize::from_le_bytes(t.node.0[..8].try_into().expect("8 bytes"))
            }
        };
        Some((pick, ticket))
    }

    fn send(&mut self, job: usize, now: f64) -> bool {
        let Some((node, ticket)) = self.choose(job, now) else {
            return false;
        };
        let j = &mut self.jobs[job];
        j.attempts += 1;
        let attempt = j.attempts;
        j.tried.push(node);
        j.live.push((node, attempt));
        self.outstanding[node] += 1;
        let rtt = self.trace.nodes[node].rtt_ms;
        self.at(now + rtt / 2.0, Ev::Deliver(job, node, attempt));
        if let Some(t) = &ticket {
            let after = self.map.hedge_after_ms(t);
            self.at(now + after, Ev::Hedge(job, attempt));
        }
        self.sent.insert((job, node, attempt), (ticket, now));
        true
    }

    fn start_next(&mut self, node: usize, now: f64) {
        let p = &mut self.provers[node];
        if p.running.is_some() {
            return;
        }
        if let Some((job, attempt)) = p.queue.pop_front() {
            let ends = now + self.trace.service_ms(job, node);
            p.running = Some((job, attempt, now, ends));
            self.at(ends, Ev::Finish(node));
        }
    }

    fn finish_job(&mut self, job: usize, now: f64, winner: usize) {
        let j = &mut self.jobs[job];
        j.done = true;
        let arrival = self.trace.jobs[job].arrival;
        if arrival >= self.trace.cfg.warmup_s * 1000.0 {
            self.latencies.push(now - arrival);
        }
        // Cancel the losing copies (hedges).
        let losers: Vec<(usize, u32)> = j.live.drain(..).filter(|&(n, _)| n != winner).collect();
        for (n, attempt) in losers {
            self.outstanding[n] = self.outstanding[n].saturating_sub(1);
            if let Some((Some(t), _)) = self.sent.remove(&(job, n, attempt)) {
                self.map.cancelled(&t);
            }
            let rtt = self.trace.nodes[n].rtt_ms;
            self.at(now + rtt / 2.0, Ev::Cancel(job, n));
        }
    }

    fn run(mut self) -> SimResult {
        for (i, j) in self.trace.jobs.iter().enumerate() {
            self.heap.push(Timed(j.arrival, i as u64, Ev::Arrive(i)));
        }
        self.seq = self.trace.jobs.len() as u64;
        for (i, node) in self.trace.nodes.iter().enumerate() {
            for &(down, _) in &node.outages {
                self.seq += 1;
                self.heap.push(Timed(down, self.seq, Ev::NodeDown(i)));
            }
        }
        if self.policy == Policy::Fractal {
            self.at(0.0, Ev::Probe);
        }
        let end = self.trace.cfg.duration_s * 1000.0 * 3.0;
        while let Some(Timed(now, _, ev)) = self.heap.pop() {
            if now > end {
                break;
            }
            match ev {
                Ev::Arrive(job) => {
                    if !self.send(job, now) {
                        self.jobs[job].failed = true;
                    }
                }
                Ev::Deliver(job, node, attempt) => {
                    if self.jobs[job].done || !self.jobs[job].live.contains(&(node, attempt)) {
                        continue;
                    }
                    let n = &self.trace.nodes[node];
                    if n.down_at(now) {
                        // Connection refused: the gateway hears it an RTT/2 later.
                        self.at(now + n.rtt_ms / 2.0, Ev::Answer(job, node, attempt, None));
                        continue;
                    }
                    self.provers[node].queue.push_back((job, attempt));
                    self.start_next(node, now);
                }
                Ev::Finish(node) => {
                    let Some((job, attempt, started, ends)) = self.provers[node].running else {
                        continue;
                    };
                    if (ends - now).abs() > 1e-9 {
                        continue; // a stale event of an aborted run
                    }
                    self.provers[node].running = None;
                    let rtt = self.trace.nodes[node].rtt_ms;
                    self.at(
                        now + rtt / 2.0,
                        Ev::Answer(job, node, attempt, Some(now - started)),
                    );
                    self.start_next(node, now);
                }
                Ev::NodeDown(node) => {
                    let rtt = self.trace.nodes[node].rtt_ms;
                    let p = &mut self.provers[node];
                    let mut lost: Vec<(usize, u32)> = p.queue.drain(..).collect();
                    if let Some((job, attempt, _, _)) = p.running.take() {
                        lost.push((job, attempt));
                    }
                    for (job, attempt) in lost {
                        self.at(now + rtt / 2.0, Ev::Answer(job, node, attempt, None));
                    }
                }
                Ev::Cancel(job, node) => {
                    let p = &mut self.provers[node];
                    p.queue.retain(|&(j, _)| j != job);
                    if p.running.is_some_and(|r| r.0 == job) {
                        p.running = None;
                        self.start_next(node, now);
                    }
                }
                Ev::Answer(job, node, attempt, service) => {
                    if !self.jobs[job].live.contains(&(node, attempt)) {
                        continue; // already cancelled
                    }
                    self.jobs[job].live.retain(|&l| l != (node, attempt));
                    self.outstanding[node] = self.outstanding[node].saturating_sub(1);
                    let work = self.trace.jobs[job].work;
                    let (ticket, sent_at) = self
                        .sent
                        .remove(&(job, node, attempt))
                        .expect("every live copy was sent");
                    match service {
                        Some(service) => {
                            if let Some(t) = &ticket {
                                self.map.completed(t, &work, service, now - sent_at, now);
                            }
                            if !self.jobs[job].done {
                                self.finish_job(job, now, node);
                            }
                        }
                        None => {
                            if let Some(t) = &ticket {
                                self.map.failed(t, Failure::Error, now);
                            }
                            let j = &self.jobs[job];
                            if j.done || !j.live.is_empty() {
                                continue; // a hedge copy is still running
                            }
                            if j.attempts >= self.trace.cfg.max_attempts || !self.send(job, now) {
                                self.jobs[job].failed = true;
                            } else {
                                self.retries += 1;
                            }
                        }
                    }
                }
                Ev::Hedge(job, attempt) => {
                    let j = &self.jobs[job];
                    if j.done || j.attempts != attempt || j.live.len() != 1 {
                        continue;
                    }
                    if j.attempts < self.trace.cfg.max_attempts && self.send(job, now) {
                        self.hedges += 1;
                    }
                }
                Ev::Probe => {
                    // The gateway probes a few nodes every second (RTT with
                    // 5% jitter, plus the queue depth the node reports).
                    for _ in 0..8 {
                        let i = self.probe_next % self.keys.len();
                        self.probe_next += 1;
                        let node = &self.trace.nodes[i];
                        if node.down_at(now) {
                            self.map.unreachable(&self.keys[i], now);
                            continue;
                        }
                        let rtt = node.rtt_ms * self.rng.gen_range(0.95..1.05);
                        let p = &self.provers[i];
                        let q = p.queue.len() as u32 + p.running.is_some() as u32;
                        self.map.observe_rtt(&self.keys[i], rtt, Some((q, 1)), now);
                    }
                    if now < self.trace.cfg.duration_s * 1000.0 {
                        self.at(now + 1000.0, Ev::Probe);
                    }
                }
            }
        }
        let counted: Vec<usize> = (0..self.trace.jobs.len())
            .filter(|&i| self.trace.jobs[i].arrival >= self.trace.cfg.warmup_s * 1000.0)
            .collect();
        let failed = counted.iter().filter(|&&i| !self.jobs[i].done).count();
        let mut lat = self.latencies;
        lat.sort_by(f64::total_cmp);
        let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
        SimResult {
            policy: self.policy,
            jobs: counted.len(),
            completed: lat.len(),
            failed,
            p50_ms: percentile(lat.clone(), 0.5).unwrap_or(f64::NAN),
            p95_ms: percentile(lat.clone(), 0.95).unwrap_or(f64::NAN),
            p99_ms: percentile(lat.clone(), 0.99).unwrap_or(f64::NAN),
            mean_ms: mean,
            retries: self.retries,
            hedges: self.hedges,
            latencies_ms: lat,
        }
    }
}

impl SimResult {
    /// One table row: policy, p50/p95/p99, failures, retries, hedges.
    pub fn summary(&self) -> String {
        format!(
            "{:<13} p50 {:>8} p95 {:>8} p99 {:>8} mean {:>8}  jobs {} failed {} retries {} hedges {}",
            self.policy.name(),
            human_ms(self.p50_ms),
            human_ms(self.p95_ms),
            human_ms(self.p99_ms),
            human_ms(self.mean_ms),
            self.jobs,
            self.failed,
            self.retries,
            self.hedges
        )
    }
}

/// Runs one policy on `trace`.
pub fn simulate(trace: &Trace, policy: Policy, router: RouterConfig) -> SimResult {
    let n = trace.nodes.len();
    let keys: Vec<Hotkey> = (0..n).map(key).collect();
    let mut map = GridMap::new(router, trace.cfg.seed);
    map.sync(keys.iter().map(|k| (*k, None)));
    World {
        trace,
        policy,
        heap: BinaryHeap::new(),
        seq: 0,
        provers: (0..n).map(|_| ProverSim::default()).collect(),
        jobs: (0..trace.jobs.len()).map(|_| JobSim::default()).collect(),
        outstanding: vec![0; n],
        rng: StdRng::seed_from_u64(trace.cfg.seed ^ 0x5eed),
        rr: 0,
        map,
        keys,
        sent: BTreeMap::new(),
        latencies: Vec::new(),
        retries: 0,
        hedges: 0,
        probe_next: 0,
    }
    .run()
}

/// An SVG plot: latency CDFs (log-scaled x) of every policy.
pub fn cdf_svg(results: &[SimResult]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 440.0, 70.0, 50.0, 30.0, 160.0);
    let all = results.iter().flat_map(|r| r.latencies_ms.iter().copied());
    let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = (lo.max(1.0).log10().floor(), hi.max(10.0).log10().ceil());
    let x = |ms: f64| left + (ms.max(1.0).log10() - lo) / (hi - lo) * (w - left - right);
    let y = |q: f64| top + (1.0 - q) * (h - top - bottom);
    let colors = ["#999999", "#e69f00", "#56b4e9", "#009e73", "#d62728"];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">Job latency CDF by routing policy (simulated grid)</text>
"#,
        (w - right + left) / 2.0
    );
    let mut decade = lo;
    while decade <= hi {
        let xv = x(10f64.powf(decade));
        s += &format!(
            "<line x1=\"{xv:.1}\" y1=\"{top}\" x2=\"{xv:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            h - bottom,
            h - bottom + 16.0,
            human_ms(10f64.powf(decade))
        );
        decade += 1.0;
    }
    for q in [0.0, 0.5, 0.95, 1.0] {
        s += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{q}</text>\n",
            y(q),
            w - right,
            left - 6.0,
            y(q) + 4.0
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">latency (log scale)</text>\n",
        (w - right + left) / 2.0,
        h - 12.0
    );
    for (i, r) in results.iter().enumerate() {
        let n = r.latencies_ms.len().max(1) as f64;
        let step = (r.latencies_ms.len() / 400).max(1);
        let pts: Vec<String> = r
            .latencies_ms
            .iter()
            .enumerate()
            .filter(|(k, _)| k % step == 0 || *k + 1 == r.latencies_ms.len())
            .map(|(k, &v)| format!("{:.1},{:.1}", x(v), y((k + 1) as f64 / n)))
            .collect();
        let c = colors[i % colors.len()];
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{} p95 {}</text>\n",
            pts.join(" "),
            w - right + 10.0,
            top + 20.0 + 18.0 * i as f64,
            r.policy.name(),
            human_ms(r.p95_ms)
        );
    }
    s + "</svg>\n"
}

pub fn human_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// Per-node true speeds (for tests and reports).
pub fn true_speeds(trace: &Trace) -> BTreeMap<usize, f64> {
    trace
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i, n.ms_per_frame_step))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            provers: 48,
            duration_s: 300.0,
            warmup_s: 30.0,
            ..SimConfig::default()
        }
    }

    #[test]
    fn runs_are_deterministic() {
        let t = Trace::generate(&small());
        let a = simulate(&t, Policy::Fractal, RouterConfig::default());
        let b = simulate(&t, Policy::Fractal, RouterConfig::default());
        assert_eq!(a.latencies_ms, b.latencies_ms);
        assert!(a.completed > 100, "{}", a.summary());
    }

    #[test]
    fn learned_routing_beats_blind_policies_and_nears_the_oracle() {
        let t = Trace::generate(&small());
        let r = |p| simulate(&t, p, RouterConfig::default());
        let all: Vec<SimResult> = Policy::ALL.iter().map(|&p| r(p)).collect();
        let table: String = all.iter().map(|r| r.summary() + "\n").collect();
        eprintln!("{table}");
        let get = |p| all.iter().find(|r| r.policy == p).unwrap();
        let (random, oracle, ours) = (
            get(Policy::Random),
            get(Policy::Oracle),
            get(Policy::Fractal),
        );
        assert!(ours.p95_ms * 3.0 <= random.p95_ms, "{table}");
        // A short run on a small grid pays for learning; `fractal bench
        // routing` measures the target on the full-size grid.
        assert!(ours.p95_ms <= oracle.p95_ms * 1.5, "{table}");
        assert_eq!(
            ours.failed, 0,
            "failover and breakers keep every job: {table}"
        );
    }

    #[test]
    fn svg_has_a_curve_per_policy() {
        let t = Trace::generate(&SimConfig {
            provers: 8,
            duration_s: 60.0,
            warmup_s: 0.0,
            ..SimConfig::default()
        });
        let rs: Vec<SimResult> = [Policy::Random, Policy::Fractal]
            .iter()
            .map(|&p| simulate(&t, p, RouterConfig::default()))
            .collect();
        let svg = cdf_svg(&rs);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("fractal p95"));
    }
}
