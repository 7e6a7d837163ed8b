//! A deterministic discrete-event simulator of a large grid, to compare
//! routing policies on identical traces (`fractal bench routing`).
//!
//! The world is what a subnet has: provers in a few regions, speeds spread
//! 10x, each running one job at a time with a bounded queue (past it they
//! answer busy, as `fractal prove` does); nodes fail and recover. Several
//! gateways (one per validator) share those provers without coordinating:
//! each sits in a region of its own, probes every prover on its own clock
//! (the answer is as old as half the RTT when it lands), keeps its own map,
//! and gets its own bursty stream of app jobs. Provers report their job
//! count and their own backlog estimate (at their mean speed: they know
//! the jobs' shapes, not how each run will go), and refuse a request whose
//! queueing bound their backlog exceeds. Every random draw of the
//! world is made up front from one seed, so every policy sees the same
//! arrivals, the same failures and the same service time for a given
//! (job, node).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use fractal_protocol::Hotkey;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::map::{percentile, Admission, Failure, GridMap, Load, RouterConfig, Ticket, Work};

#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    pub provers: usize,
    /// Independent gateways sharing the provers, each with its own map,
    /// probes and app traffic (an equal share of the load each).
    pub gateways: usize,
    /// Simulated seconds of arrivals.
    pub duration_s: f64,
    /// Jobs arriving in the first seconds are not counted (every policy
    /// starts cold; ours has to learn speeds first).
    pub warmup_s: f64,
    /// Mean offered load as a fraction of the fleet's capacity (bursts
    /// reach twice this).
    pub load: f64,
    /// RTT between two regions `d` apart (regions on a line), ms; a
    /// gateway in region 0 sees the provers of region `d` this far away.
    pub region_rtt_ms: Vec<f64>,
    /// Slowest / fastest prover.
    pub speed_spread: f64,
    /// ms per frame·step at 64x64 on the fastest prover.
    pub fastest_ms_per_frame_step: f64,
    /// Jobs a prover holds at once, running or waiting (`fractal prove`'s
    /// `max_concurrent + max_queued`: 1 + 8); past it the answer is busy.
    pub prover_capacity: u32,
    /// Mean time a prover stays up, seconds (exponential).
    pub mean_up_s: f64,
    /// Down periods last uniformly between these, seconds.
    pub down_s: (f64, f64),
    /// Every gateway probes every prover this often (as `fractal gateway`).
    pub probe_every_s: f64,
    /// Failed attempts per job before it is reported failed (busy answers
    /// do not count: the job was not run).
    pub max_attempts: u32,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            provers: 256,
            gateways: 1,
            duration_s: 1200.0,
            warmup_s: 60.0,
            load: 0.5,
            region_rtt_ms: vec![5.0, 30.0, 80.0, 150.0, 300.0],
            speed_spread: 10.0,
            fastest_ms_per_frame_step: 20.0,
            prover_capacity: 9,
            mean_up_s: 1800.0,
            down_s: (30.0, 120.0),
            probe_every_s: 2.0,
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
    /// Fewest outstanding requests of this gateway (ties at random); blind
    /// to speed, RTT and other gateways.
    LeastLoaded,
    /// Knows every node's true backlog (every gateway's jobs), speed, RTT
    /// and up/down state, and holds a job at the gateway rather than send
    /// it to a full node.
    Oracle,
    /// Like the oracle, except that it does not know how long a job will
    /// take on a node beyond that node's speed: the world's per-run noise
    /// (±10%) is dice it cannot see, as no router can. The gap between the
    /// two is what clairvoyance alone is worth.
    Informed,
    /// [`GridMap`]: learned RTT, speed and queues, admission, hedging,
    /// breakers, shedding.
    Fractal,
}

impl Policy {
    pub const ALL: [Policy; 6] = [
        Policy::Random,
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::Oracle,
        Policy::Informed,
        Policy::Fractal,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Policy::Random => "random",
            Policy::RoundRobin => "round-robin",
            Policy::LeastLoaded => "least-loaded",
            Policy::Oracle => "oracle",
            Policy::Informed => "informed",
            Policy::Fractal => "fractal",
        }
    }
}

#[derive(Clone, Serialize)]
pub struct SimResult {
    pub policy: Policy,
    pub gateways: usize,
    pub load: f64,
    /// Jobs counted (arrived after the warm-up).
    pub jobs: usize,
    pub completed: usize,
    /// Counted jobs that were accepted and never completed.
    pub failed: usize,
    /// Counted jobs refused at admission (429 with `Retry-After`).
    pub shed: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub retries: u64,
    pub hedges: u64,
    /// Busy answers from full provers.
    pub busy: u64,
    /// Refusals from provers that held more work than the request
    /// allowed to wait behind.
    pub late: u64,
    /// Sorted latencies of counted, completed jobs (for plots).
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
    /// (job size in frame·steps at 64x64, latency) of every counted,
    /// completed job, in completion order.
    #[serde(skip)]
    pub by_size: Vec<(f64, f64)>,
}

struct Node {
    region: usize,
    /// This node's own distance factor on top of its region's.
    rtt_scale: f64,
    ms_per_frame_step: f64,
    /// (down_at, up_at) periods in ms, sorted.
    outages: Vec<(f64, f64)>,
}

impl Node {
    fn down_at(&self, t: f64) -> bool {
        self.outages.iter().any(|&(a, b)| t >= a && t < b)
    }
}

struct JobSpec {
    arrival: f64,
    work: Work,
    gateway: usize,
}

/// The world every policy is run against.
pub struct Trace {
    nodes: Vec<Node>,
    /// Region of each gateway.
    gateways: Vec<usize>,
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

/// Arrivals come in windows this long, `BUSY_SHARE` of them at twice the
/// mean rate.
const BURST_WINDOW_S: f64 = 30.0;
const BUSY_SHARE: f64 = 0.3;

fn units(w: &Work) -> f64 {
    (w.width as f64 * w.height as f64) / 4096.0 * w.frames as f64 * w.steps as f64
}

/// A 64-bit mix of `x` (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Multiplicative service-time noise for (job, node), identical for every
/// policy: ~10% spread, from a hash, not an RNG stream.
fn noise(seed: u64, job: usize, node: usize) -> f64 {
    let x = mix(seed ^ (job as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (node as u64) << 32);
    let u = (x >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    (0.2 * (u - 0.5)).exp()
}

impl Trace {
    pub fn generate(cfg: &SimConfig) -> Trace {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let horizon = cfg.duration_s * 3.0;
        let regions = cfg.region_rtt_ms.len().max(1);
        let nodes: Vec<Node> = (0..cfg.provers)
            .map(|_| {
                let region = rng.gen_range(0..regions);
                let rtt_scale = rng.gen_range(0.8..1.2);
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
                    region,
                    rtt_scale,
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
        let gateways = cfg.gateways.max(1);
        let rate_each = cfg.load * capacity / gateways as f64;
        let mut jobs = Vec::new();
        for g in 0..gateways {
            // Each gateway's apps have their own bursts: 30% of the 30 s
            // windows, in an order of its own, are busy (2x), the rest
            // quiet, so the mean is `load` exactly.
            let mut rng = StdRng::seed_from_u64(mix(cfg.seed ^ 0x00a1_1ce5 ^ (g as u64) << 40));
            let windows = (cfg.duration_s / BURST_WINDOW_S).ceil() as usize;
            let mut busy_windows: Vec<bool> = (0..windows)
                .map(|w| (w as f64 + 0.5) / windows as f64 <= BUSY_SHARE)
                .collect();
            busy_windows.shuffle(&mut rng);
            let quiet = (1.0 - BUSY_SHARE * 2.0) / (1.0 - BUSY_SHARE);
            let mut t = 0.0;
            loop {
                let w = ((t / BURST_WINDOW_S) as usize).min(windows.saturating_sub(1));
                let rate = rate_each * if busy_windows[w] { 2.0 } else { quiet };
                let next = t + -(1.0 - rng.gen::<f64>()).ln() / rate;
                // A draw past the window's end restarts at the next window's
                // rate (memoryless, so this is exact).
                let window_end = (w + 1) as f64 * BURST_WINDOW_S;
                if next > window_end && w + 1 < windows {
                    t = window_end;
                    continue;
                }
                t = next;
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
                    gateway: g,
                });
            }
        }
        jobs.sort_by(|a, b| {
            a.arrival
                .total_cmp(&b.arrival)
                .then(a.gateway.cmp(&b.gateway))
        });
        Trace {
            nodes,
            gateways: (0..gateways).map(|g| g % regions).collect(),
            jobs,
            cfg: cfg.clone(),
        }
    }

    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    fn service_ms(&self, job: usize, node: usize) -> f64 {
        units(&self.jobs[job].work)
            * self.nodes[node].ms_per_frame_step
            * noise(self.cfg.seed, job, node)
    }

    /// Round trip between gateway `g` and `node`, ms.
    fn rtt_ms(&self, g: usize, node: usize) -> f64 {
        let n = &self.nodes[node];
        let d = self.gateways[g].abs_diff(n.region);
        self.cfg.region_rtt_ms[d.min(self.cfg.region_rtt_ms.len() - 1)] * n.rtt_scale
    }
}

/// What a gateway hears back for one request.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// Finished after this long on the node.
    Done(f64),
    /// Refused, lost, or the node went down.
    Error,
    /// The node's queue was full.
    Busy,
    /// The node would not start it within the time the request allowed:
    /// this much work was ahead of it.
    Late(f64),
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Arrive(usize),
    /// Request (job, attempt) reaches node.
    Deliver(usize, usize, u32),
    /// Node finishes what it is running.
    Finish(usize),
    /// The job's gateway learns the outcome of (job, node, attempt).
    Answer(usize, usize, u32, Outcome),
    /// Time to consider hedging job's attempt.
    Hedge(usize, u32),
    /// Cancellation reaches node.
    Cancel(usize, usize),
    NodeDown(usize),
    /// Gateway probes every prover.
    Probe(usize),
    /// (gateway, node, sent at): a probe reaches the node, which reports
    /// its queue.
    ProbeAt(usize, usize, f64),
    /// (gateway, node, RTT, report): the probe's answer, or `None` for one
    /// that timed out.
    ProbeBack(usize, usize, f64, Option<Load>),
    /// Gateway tries the jobs it holds again.
    Retry(usize),
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
    /// Requests on their way here (only the oracle looks).
    inbound: Vec<usize>,
    queue: VecDeque<(usize, u32)>,
    /// (job, attempt, started, ends)
    running: Option<(usize, u32, f64, f64)>,
}

impl ProverSim {
    fn jobs(&self) -> u32 {
        self.queue.len() as u32 + self.running.is_some() as u32
    }
}

/// One request a gateway sent.
struct Request {
    /// The router's ticket (ours only).
    ticket: Option<Ticket>,
    /// When it was sent, ms.
    at: f64,
    /// How long it may wait in the node's queue, ms (`None`: any wait).
    within: Option<f64>,
}

/// A job that is neither done nor shed when the run ends failed: given up
/// after `max_attempts` errors, nowhere left to try, or still waiting.
#[derive(Default)]
struct JobSim {
    done: bool,
    shed: bool,
    /// Requests sent (numbers each copy).
    attempts: u32,
    errors: u32,
    /// Nodes holding a live copy.
    live: Vec<(usize, u32)>,
    /// Nodes not to send it to again: those that failed it, and those that
    /// were busy since the job was last held.
    tried: Vec<usize>,
    busy_at: Vec<usize>,
    /// Nodes that refused it for holding more work than the request
    /// allowed.
    late: u32,
}

/// One gateway's private state.
struct GatewaySim {
    map: GridMap,
    /// Outstanding requests per node, as this gateway counts them.
    outstanding: Vec<u32>,
    rng: StdRng,
    rr: usize,
    /// Jobs accepted but not sent: no node had room (FIFO).
    held: VecDeque<usize>,
    retry_armed: bool,
}

/// How often a gateway holding jobs looks for room again (besides every
/// answer it gets), ms.
const RETRY_MS: f64 = 100.0;

struct World<'t> {
    trace: &'t Trace,
    policy: Policy,
    heap: BinaryHeap<Timed>,
    seq: u64,
    provers: Vec<ProverSim>,
    jobs: Vec<JobSim>,
    gateways: Vec<GatewaySim>,
    keys: Vec<Hotkey>,
    /// (job, node, attempt) → the request.
    sent: BTreeMap<(usize, usize, u32), Request>,
    latencies: Vec<f64>,
    by_size: Vec<(f64, f64)>,
    retries: u64,
    hedges: u64,
    busy: u64,
    late: u64,
}

fn key(i: usize) -> Hotkey {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Hotkey(b)
}

fn index_of(hk: &Hotkey) -> usize {
    u64::from_le_bytes(hk.0[..8].try_into().expect("8 bytes")) as usize
}

/// Where a job went when the gateway tried to send it.
enum Sending {
    Sent,
    /// No node has room now; the gateway keeps it.
    Held,
    /// Nowhere left to try.
    Nowhere,
}

impl<'t> World<'t> {
    fn at(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Timed(t, self.seq, ev));
    }

    fn counted(&self, job: usize) -> bool {
        self.trace.jobs[job].arrival >= self.trace.cfg.warmup_s * 1000.0
    }

    /// The oracle's pick: the earliest true completion among open nodes
    /// that are up and have room; `None` when there is none. `dice`: whether it knows this job's own service time on each node
    /// (the oracle) or only the node's speed (the informed policy).
    fn oracle(&self, job: usize, g: usize, now: f64, open: &[usize], dice: bool) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        for &i in open {
            let rtt = self.trace.rtt_ms(g, i);
            let arrive = now + rtt / 2.0;
            if self.trace.nodes[i].down_at(arrive) {
                continue;
            }
            let p = &self.provers[i];
            if p.jobs() + p.inbound.len() as u32 >= self.trace.cfg.prover_capacity {
                continue;
            }
            let mut free = arrive;
            if let Some((_, _, _, ends)) = p.running {
                free = free.max(ends);
            }
            let backlog: f64 = (p.queue.iter().map(|&(j, _)| j))
                .chain(p.inbound.iter().copied())
                .map(|j| self.trace.service_ms(j, i))
                .sum();
            let service = if dice {
                self.trace.service_ms(job, i)
            } else {
                units(&self.trace.jobs[job].work) * self.trace.nodes[i].ms_per_frame_step
            };
            let done = free + backlog + service + rtt / 2.0;
            if best.is_none_or(|(b, _)| done < b) {
                best = Some((done, i));
            }
        }
        best.map(|(_, i)| i)
    }

    fn choose(
        &mut self,
        job: usize,
        now: f64,
        hedge: bool,
    ) -> Result<(usize, Option<Ticket>), bool> {
        let n = self.trace.nodes.len();
        let g = self.trace.jobs[job].gateway;
        let j = &self.jobs[job];
        let skip = |i: &usize| {
            j.tried.contains(i) || j.busy_at.contains(i) || j.live.iter().any(|l| l.0 == *i)
        };
        let open: Vec<usize> = (0..n).filter(|i| !skip(i)).collect();
        if open.is_empty() {
            // Only busy nodes are left: wait, then try them again.
            return Err(!j.busy_at.is_empty());
        }
        let gw = &mut self.gateways[g];
        let pick = match self.policy {
            Policy::Random => open[gw.rng.gen_range(0..open.len())],
            Policy::RoundRobin => {
                let mut i = gw.rr;
                while !open.contains(&(i % n)) {
                    i += 1;
                }
                gw.rr = i + 1;
                i % n
            }
            Policy::LeastLoaded => {
                let min = open.iter().map(|&i| gw.outstanding[i]).min().expect("open");
                let least: Vec<usize> = open
                    .into_iter()
                    .filter(|&i| gw.outstanding[i] == min)
                    .collect();
                least[gw.rng.gen_range(0..least.len())]
            }
            Policy::Oracle | Policy::Informed => {
                let dice = self.policy == Policy::Oracle;
                // Everything open down or full: hold the job for room.
                return self
                    .oracle(job, g, now, &open, dice)
                    .map(|i| (i, None))
                    .ok_or(true);
            }
            Policy::Fractal => {
                let j = &self.jobs[job];
                let exclude: Vec<Hotkey> = (j.tried.iter().chain(&j.busy_at))
                    .copied()
                    .chain(j.live.iter().map(|l| l.0))
                    .map(|i| self.keys[i])
                    .collect();
                let work = self.trace.jobs[job].work;
                let t = if hedge {
                    gw.map.choose_hedge(&work, now, &exclude)
                } else {
                    gw.map.choose(&work, now, &exclude)
                };
                // Nothing eligible: the gateway holds the job until a node
                // has room or a breaker lets a trial through.
                let t = t.ok_or(true)?;
                return Ok((index_of(&t.node), Some(t)));
            }
        };
        Ok((pick, None))
    }

    fn send(&mut self, job: usize, now: f64, hedge: bool) -> Sending {
        let (node, ticket) = match self.choose(job, now, hedge) {
            Ok(c) => c,
            Err(true) => return Sending::Held,
            Err(false) => return Sending::Nowhere,
        };
        let g = self.trace.jobs[job].gateway;
        let j = &mut self.jobs[job];
        j.attempts += 1;
        let attempt = j.attempts;
        j.live.push((node, attempt));
        self.gateways[g].outstanding[node] += 1;
        self.provers[node].inbound.push(job);
        let rtt = self.trace.rtt_ms(g, node);
        self.at(now + rtt / 2.0, Ev::Deliver(job, node, attempt));
        if let Some(t) = &ticket {
            if !hedge {
                let after = self.gateways[g].map.hedge_after_ms(t);
                self.at(now + after, Ev::Hedge(job, attempt));
            }
        }
        let within = ticket.as_ref().and_then(|t| {
            let late = self.jobs[job].late;
            self.gateways[g].map.start_within_ms(t, late)
        });
        let request = Request {
            ticket,
            at: now,
            within,
        };
        self.sent.insert((job, node, attempt), request);
        Sending::Sent
    }

    /// Sends `job` or, when no node has room, holds it at its gateway.
    fn dispatch(&mut self, job: usize, now: f64) {
        match self.send(job, now, false) {
            Sending::Sent => {}
            Sending::Held => self.hold(job, now),
            Sending::Nowhere => {} // given up
        }
    }

    fn hold(&mut self, job: usize, now: f64) {
        let g = self.trace.jobs[job].gateway;
        self.jobs[job].busy_at.clear();
        // In arrival order (job indices are): a job sent and bounced
        // keeps its place, as in the gateway's queue.
        let held = &mut self.gateways[g].held;
        let at = held.partition_point(|&j| j < job);
        held.insert(at, job);
        self.arm_retry(g, now);
    }

    fn arm_retry(&mut self, g: usize, now: f64) {
        if !self.gateways[g].retry_armed {
            self.gateways[g].retry_armed = true;
            self.at(now + RETRY_MS, Ev::Retry(g));
        }
    }

    /// Sends held jobs, oldest first, while nodes have room.
    fn release(&mut self, g: usize, now: f64) {
        while let Some(&job) = self.gateways[g].held.front() {
            match self.send(job, now, false) {
                Sending::Sent | Sending::Nowhere => {
                    self.gateways[g].held.pop_front();
                }
                Sending::Held => break,
            }
        }
        if !self.gateways[g].held.is_empty() {
            self.arm_retry(g, now);
        }
    }

    fn arrive(&mut self, job: usize, now: f64) {
        let g = self.trace.jobs[job].gateway;
        if self.policy == Policy::Fractal {
            let work = self.trace.jobs[job].work;
            let ahead = self.gateways[g].held.len();
            if let Admission::Shed { .. } = self.gateways[g].map.admit(&work, now, ahead) {
                self.jobs[job].shed = true;
                return;
            }
        }
        if self.gateways[g].held.is_empty() {
            self.dispatch(job, now);
        } else {
            // First come, first served behind the jobs already waiting.
            self.hold(job, now);
        }
    }

    /// What a prover reports as its backlog: the expected rest of the
    /// running job and the queued jobs at its own (mean) speed. It knows
    /// the jobs' shapes and its speed, not how this run of each will go.
    fn backlog_ms(&self, node: usize, now: f64) -> f64 {
        let p = &self.provers[node];
        let speed = self.trace.nodes[node].ms_per_frame_step;
        let running = p.running.map_or(0.0, |(job, _, started, _)| {
            (units(&self.trace.jobs[job].work) * speed - (now - started)).max(0.0)
        });
        running
            + p.queue
                .iter()
                .map(|&(job, _)| units(&self.trace.jobs[job].work) * speed)
                .sum::<f64>()
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
        let g = self.trace.jobs[job].gateway;
        if self.counted(job) {
            let spec = &self.trace.jobs[job];
            self.latencies.push(now - spec.arrival);
            self.by_size.push((units(&spec.work), now - spec.arrival));
        }
        let j = &mut self.jobs[job];
        j.done = true;
        // Cancel the losing copies (hedges).
        let losers: Vec<(usize, u32)> = j.live.drain(..).filter(|&(n, _)| n != winner).collect();
        for (n, attempt) in losers {
            let gw = &mut self.gateways[g];
            gw.outstanding[n] = gw.outstanding[n].saturating_sub(1);
            if let Some(Request {
                ticket: Some(t), ..
            }) = self.sent.remove(&(job, n, attempt))
            {
                gw.map.cancelled(&t);
            }
            let rtt = self.trace.rtt_ms(g, n);
            self.at(now + rtt / 2.0, Ev::Cancel(job, n));
        }
    }

    fn answer(&mut self, job: usize, node: usize, attempt: u32, outcome: Outcome, now: f64) {
        if !self.jobs[job].live.contains(&(node, attempt)) {
            return; // already cancelled
        }
        let g = self.trace.jobs[job].gateway;
        self.jobs[job].live.retain(|&l| l != (node, attempt));
        let gw = &mut self.gateways[g];
        gw.outstanding[node] = gw.outstanding[node].saturating_sub(1);
        let work = self.trace.jobs[job].work;
        let Request {
            ticket,
            at: sent_at,
            ..
        } = self
            .sent
            .remove(&(job, node, attempt))
            .expect("every live copy was sent");
        match outcome {
            Outcome::Done(service) => {
                if let Some(t) = &ticket {
                    gw.map.completed(t, &work, service, now - sent_at, now);
                }
                if !self.jobs[job].done {
                    self.finish_job(job, now, node);
                }
            }
            Outcome::Error | Outcome::Busy | Outcome::Late(_) => {
                let busy = !matches!(outcome, Outcome::Error);
                if let Some(t) = &ticket {
                    match outcome {
                        Outcome::Late(ahead) => gw.map.refused_late(t, ahead, now),
                        Outcome::Busy => gw.map.failed(t, Failure::Busy, now),
                        _ => gw.map.failed(t, Failure::Error, now),
                    }
                }
                let j = &mut self.jobs[job];
                if let Outcome::Late(_) = outcome {
                    self.late += 1;
                    j.late += 1;
                    j.busy_at.push(node);
                } else if busy {
                    self.busy += 1;
                    j.busy_at.push(node);
                } else {
                    j.errors += 1;
                    j.tried.push(node);
                }
                if j.done || !j.live.is_empty() {
                    return; // a hedge copy is still running
                }
                if j.errors >= self.trace.cfg.max_attempts {
                    return; // given up
                }
                if !busy {
                    self.retries += 1;
                }
                self.dispatch(job, now);
            }
        }
        // An answer frees room this gateway knows of.
        self.release(g, now);
    }

    fn probe_back(&mut self, g: usize, node: usize, rtt: f64, load: Option<Load>, now: f64) {
        let map = &mut self.gateways[g].map;
        match load {
            Some(load) => map.observe_rtt(&self.keys[node], rtt, Some(load), now),
            None => map.unreachable(&self.keys[node], now),
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
        let probe_every = self.trace.cfg.probe_every_s * 1000.0;
        let gateways = self.gateways.len();
        if self.policy == Policy::Fractal {
            for g in 0..gateways {
                // Gateways' probe clocks are not aligned.
                self.at(probe_every * g as f64 / gateways as f64, Ev::Probe(g));
            }
        }
        let end = self.trace.cfg.duration_s * 1000.0 * 3.0;
        while let Some(Timed(now, _, ev)) = self.heap.pop() {
            if now > end {
                break;
            }
            match ev {
                Ev::Arrive(job) => self.arrive(job, now),
                Ev::Deliver(job, node, attempt) => {
                    let inbound = &mut self.provers[node].inbound;
                    if let Some(k) = inbound.iter().position(|&j| j == job) {
                        inbound.swap_remove(k);
                    }
                    if self.jobs[job].done || !self.jobs[job].live.contains(&(node, attempt)) {
                        continue;
                    }
                    let back = now + self.trace.rtt_ms(self.trace.jobs[job].gateway, node) / 2.0;
                    if self.trace.nodes[node].down_at(now) {
                        // Connection refused: the gateway hears it an RTT/2 later.
                        self.at(back, Ev::Answer(job, node, attempt, Outcome::Error));
                        continue;
                    }
                    if self.provers[node].jobs() >= self.trace.cfg.prover_capacity {
                        self.at(back, Ev::Answer(job, node, attempt, Outcome::Busy));
                        continue;
                    }
                    let ahead = self.backlog_ms(node, now);
                    let within = self.sent[&(job, node, attempt)].within;
                    if within.is_some_and(|w| ahead > w) {
                        self.at(back, Ev::Answer(job, node, attempt, Outcome::Late(ahead)));
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
                    let back = now + self.trace.rtt_ms(self.trace.jobs[job].gateway, node) / 2.0;
                    self.at(
                        back,
                        Ev::Answer(job, node, attempt, Outcome::Done(now - started)),
                    );
                    self.start_next(node, now);
                    if let Policy::Oracle | Policy::Informed = self.policy {
                        // The oracle sees room the moment it appears.
                        for g in 0..gateways {
                            self.release(g, now);
                        }
                    }
                }
                Ev::NodeDown(node) => {
                    let p = &mut self.provers[node];
                    let mut lost: Vec<(usize, u32)> = p.queue.drain(..).collect();
                    if let Some((job, attempt, _, _)) = p.running.take() {
                        lost.push((job, attempt));
                    }
                    for (job, attempt) in lost {
                        let back =
                            now + self.trace.rtt_ms(self.trace.jobs[job].gateway, node) / 2.0;
                        self.at(back, Ev::Answer(job, node, attempt, Outcome::Error));
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
                Ev::Answer(job, node, attempt, outcome) => {
                    self.answer(job, node, attempt, outcome, now)
                }
                Ev::Hedge(job, attempt) => {
                    let j = &self.jobs[job];
                    if j.done || j.attempts != attempt || j.live.len() != 1 {
                        continue;
                    }
                    if let Sending::Sent = self.send(job, now, true) {
                        self.hedges += 1;
                    }
                }
                Ev::Probe(g) => {
                    for node in 0..self.trace.nodes.len() {
                        let rtt = self.trace.rtt_ms(g, node);
                        if self.trace.nodes[node].down_at(now + rtt / 2.0) {
                            // The gateway gives up on it after its timeout.
                            self.at(now + probe_every, Ev::ProbeBack(g, node, 0.0, None));
                        } else {
                            self.at(now + rtt / 2.0, Ev::ProbeAt(g, node, now));
                        }
                    }
                    if now < self.trace.cfg.duration_s * 1000.0 * 2.0 {
                        self.at(now + probe_every, Ev::Probe(g));
                    }
                }
                Ev::ProbeAt(g, node, sent) => {
                    let load = Load {
                        jobs: self.provers[node].jobs(),
                        slots: 1,
                        capacity: self.trace.cfg.prover_capacity,
                        backlog_ms: Some(self.backlog_ms(node, now)),
                        ms_per_frame_step: Some(self.trace.nodes[node].ms_per_frame_step),
                    };
                    // RTT as measured, with 5% jitter.
                    let jitter = self.gateways[g].rng.gen_range(0.95..1.05);
                    let rtt = 2.0 * (now - sent) * jitter;
                    self.at(now + (now - sent), Ev::ProbeBack(g, node, rtt, Some(load)));
                }
                Ev::ProbeBack(g, node, rtt, load) => {
                    self.probe_back(g, node, rtt, load, now);
                    if !self.gateways[g].held.is_empty() {
                        self.release(g, now);
                    }
                }
                Ev::Retry(g) => {
                    self.gateways[g].retry_armed = false;
                    self.release(g, now);
                }
            }
        }
        let counted: Vec<usize> = (0..self.trace.jobs.len())
            .filter(|&i| self.counted(i))
            .collect();
        let shed = counted.iter().filter(|&&i| self.jobs[i].shed).count();
        let failed = counted
            .iter()
            .filter(|&&i| !self.jobs[i].done && !self.jobs[i].shed)
            .count();
        let mut lat = self.latencies;
        lat.sort_by(f64::total_cmp);
        let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
        SimResult {
            policy: self.policy,
            gateways,
            load: self.trace.cfg.load,
            jobs: counted.len(),
            completed: lat.len(),
            failed,
            shed,
            p50_ms: percentile(lat.clone(), 0.5).unwrap_or(f64::NAN),
            p95_ms: percentile(lat.clone(), 0.95).unwrap_or(f64::NAN),
            p99_ms: percentile(lat.clone(), 0.99).unwrap_or(f64::NAN),
            mean_ms: mean,
            retries: self.retries,
            hedges: self.hedges,
            busy: self.busy,
            late: self.late,
            latencies_ms: lat,
            by_size: self.by_size,
        }
    }
}

impl SimResult {
    /// One table row: policy, p50/p95/p99, failures, retries, hedges.
    pub fn summary(&self) -> String {
        format!(
            "{:<13} p50 {:>8} p95 {:>8} p99 {:>8} mean {:>8}  jobs {} failed {} shed {} retries {} hedges {} busy {} queue-too-long {}",
            self.policy.name(),
            human_ms(self.p50_ms),
            human_ms(self.p95_ms),
            human_ms(self.p99_ms),
            human_ms(self.mean_ms),
            self.jobs,
            self.failed,
            self.shed,
            self.retries,
            self.hedges,
            self.busy,
            self.late
        )
    }
}

/// Runs one policy on `trace`, every gateway with its own map under
/// `router`.
pub fn simulate(trace: &Trace, policy: Policy, router: RouterConfig) -> SimResult {
    let n = trace.nodes.len();
    let keys: Vec<Hotkey> = (0..n).map(key).collect();
    let gateways = (0..trace.gateways.len())
        .map(|g| {
            let seed = mix(trace.cfg.seed ^ (g as u64 + 1) << 48);
            let mut map = GridMap::new(router.clone(), seed);
            map.sync(keys.iter().map(|k| (*k, None)));
            GatewaySim {
                map,
                outstanding: vec![0; n],
                rng: StdRng::seed_from_u64(seed ^ 0x5eed),
                rr: g * n / trace.gateways.len(),
                held: VecDeque::new(),
                retry_armed: false,
            }
        })
        .collect();
    World {
        trace,
        policy,
        heap: BinaryHeap::new(),
        seq: 0,
        provers: (0..n).map(|_| ProverSim::default()).collect(),
        jobs: (0..trace.jobs.len()).map(|_| JobSim::default()).collect(),
        gateways,
        keys,
        sent: BTreeMap::new(),
        latencies: Vec::new(),
        by_size: Vec::new(),
        retries: 0,
        hedges: 0,
        busy: 0,
        late: 0,
    }
    .run()
}

/// An SVG plot: latency CDFs (log-scaled x) of every policy.
pub fn cdf_svg(results: &[SimResult], title: &str) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 440.0, 70.0, 50.0, 30.0, 160.0);
    let all = results.iter().flat_map(|r| r.latencies_ms.iter().copied());
    let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = (lo.max(1.0).log10().floor(), hi.max(10.0).log10().ceil());
    let x = |ms: f64| left + (ms.max(1.0).log10() - lo) / (hi - lo) * (w - left - right);
    let y = |q: f64| top + (1.0 - q) * (h - top - bottom);
    let colors = [
        "#999999", "#e69f00", "#56b4e9", "#009e73", "#8c564b", "#d62728",
    ];
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">{title}</text>
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

/// An SVG plot of p95 ratios (log-scaled y) against load, a line per
/// ratio and number of gateways: ours over the oracle's and over the
/// informed policy's, random's over the oracle's, with the 1.10x target. `rows`: (load, gateways, every policy's results).
pub fn ratio_svg(rows: &[(f64, usize, &[SimResult])]) -> String {
    let (w, h, left, bottom, top, right) = (800.0, 460.0, 70.0, 50.0, 30.0, 230.0);
    let ratio = |rs: &[SimResult], (p, over): (Policy, Policy)| {
        let get = |p| rs.iter().find(|r| r.policy == p).map(|r| r.p95_ms);
        Some(get(p)? / get(over)?)
    };
    let lines = [
        ((Policy::Fractal, Policy::Oracle), ""),
        (
            (Policy::Fractal, Policy::Informed),
            " stroke-dasharray=\"6 4\"",
        ),
        (
            (Policy::Random, Policy::Oracle),
            " stroke-dasharray=\"2 3\"",
        ),
    ];
    let all: Vec<f64> = rows
        .iter()
        .flat_map(|(_, _, rs)| lines.iter().filter_map(|&(l, _)| ratio(rs, l)))
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = (
        0.9f64.log10(),
        all.iter().fold(2.0f64, |a, &b| a.max(b)).log10() + 0.05,
    );
    let (xlo, xhi) = rows.iter().fold((f64::INFINITY, 0.0f64), |(a, b), r| {
        (a.min(r.0), b.max(r.0))
    });
    let (xlo, xhi) = (xlo - 0.05, xhi + 0.05);
    let x = |load: f64| left + (load - xlo) / (xhi - xlo) * (w - left - right);
    let y = |v: f64| top + (1.0 - (v.max(0.9).log10() - lo) / (hi - lo)) * (h - top - bottom);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">p95 latency ratios by load and number of gateways (simulated grid)</text>
"#,
        (w - right + left) / 2.0
    );
    for v in [1.0f64, 1.1, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0] {
        if v.log10() > hi {
            break;
        }
        let dash = if v == 1.1 {
            " stroke-dasharray=\"6 3\""
        } else {
            ""
        };
        let label = if v == 1.1 { "1.1x target" } else { "" };
        s += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#bbb\"{dash}/><text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{v}x</text><text x=\"{4:.1}\" y=\"{3:.1}\" fill=\"#888\">{label}</text>\n",
            y(v),
            w - right,
            left - 6.0,
            y(v) + 4.0,
            w - right - 70.0
        );
    }
    let mut loads: Vec<f64> = rows.iter().map(|r| r.0).collect();
    loads.sort_by(f64::total_cmp);
    loads.dedup();
    for &l in &loads {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{l}</text>\n",
            x(l),
            h - bottom + 16.0
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">mean offered load (bursts twice this)</text>\n",
        (w - right + left) / 2.0,
        h - 12.0
    );
    let mut gateways: Vec<usize> = rows.iter().map(|r| r.1).collect();
    gateways.sort();
    gateways.dedup();
    let colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"];
    let mut legend = 0;
    for (k, &g) in gateways.iter().enumerate() {
        let c = colors[k % colors.len()];
        for (pair, dash) in lines {
            let (lx, ly) = (w - right + 10.0, top + 16.0 + 18.0 * legend as f64);
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.1 == g)
                .filter_map(|r| Some((r.0, ratio(r.2, pair)?)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let line: Vec<String> = pts
                .iter()
                .map(|&(l, v)| format!("{:.1},{:.1}", x(l), y(v)))
                .collect();
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"2\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{} ÷ {} · {g} gw</text>\n",
                line.join(" "),
                lx + 24.0,
                lx + 30.0,
                ly + 4.0,
                pair.0.name(),
                pair.1.name()
            );
            legend += 1;
        }
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

    fn small(load: f64, gateways: usize) -> SimConfig {
        SimConfig {
            provers: 48,
            gateways,
            duration_s: 300.0,
            warmup_s: 30.0,
            load,
            ..SimConfig::default()
        }
    }

    fn all(t: &Trace) -> (Vec<SimResult>, String) {
        let rs: Vec<SimResult> = Policy::ALL
            .iter()
            .map(|&p| simulate(t, p, RouterConfig::default()))
            .collect();
        let table = rs.iter().map(|r| r.summary() + "\n").collect();
        (rs, table)
    }

    fn get(rs: &[SimResult], p: Policy) -> &SimResult {
        rs.iter().find(|r| r.policy == p).expect("ran")
    }

    #[test]
    fn runs_are_deterministic() {
        let t = Trace::generate(&small(0.5, 3));
        let a = simulate(&t, Policy::Fractal, RouterConfig::default());
        let b = simulate(&t, Policy::Fractal, RouterConfig::default());
        assert_eq!(a.latencies_ms, b.latencies_ms);
        assert!(a.completed > 100, "{}", a.summary());
    }

    #[test]
    fn bursts_keep_the_mean_load_exact() {
        let cfg = small(0.5, 4);
        let t = Trace::generate(&cfg);
        let units: f64 = t.jobs.iter().map(|j| units(&j.work)).sum();
        let capacity: f64 = t.nodes.iter().map(|n| 1000.0 / n.ms_per_frame_step).sum();
        let offered = units / cfg.duration_s / capacity;
        assert!((offered - 0.5).abs() < 0.05, "offered load {offered}");
        // Every gateway gets its share.
        for g in 0..4 {
            let n = t.jobs.iter().filter(|j| j.gateway == g).count();
            assert!(
                n * 4 > t.jobs.len() * 3 / 4,
                "gateway {g}: {n} of {}",
                t.jobs.len()
            );
        }
    }

    /// Pins one small configuration of each kind (one gateway, several),
    /// so a router change that loses ground shows here; `fractal bench
    /// routing` measures the full-size grid.
    #[test]
    fn learned_routing_beats_blind_policies_and_nears_the_oracle() {
        for (load, gateways, bound) in [(0.5, 1, 1.15), (0.7, 4, 1.15), (0.5, 16, 1.15)] {
            let t = Trace::generate(&small(load, gateways));
            let (rs, table) = all(&t);
            eprintln!("load {load}, {gateways} gateways:\n{table}");
            let (random, oracle, ours) = (
                get(&rs, Policy::Random),
                get(&rs, Policy::Oracle),
                get(&rs, Policy::Fractal),
            );
            assert!(ours.p95_ms * 3.0 <= random.p95_ms, "{table}");
            assert!(ours.p95_ms <= oracle.p95_ms * bound, "{table}");
            assert!(
                ours.p95_ms < get(&rs, Policy::LeastLoaded).p95_ms,
                "{table}"
            );
            assert_eq!(
                ours.failed, 0,
                "failover and breakers keep every job: {table}"
            );
            assert_eq!(ours.shed, 0, "below saturation nothing is shed: {table}");
            // Knowing every node's capacity, ours does not knock on full ones.
            assert!(ours.busy * 100 <= ours.jobs as u64, "{table}");
        }
    }

    #[test]
    fn past_saturation_the_router_sheds_instead_of_queueing_without_bound() {
        let t = Trace::generate(&SimConfig {
            duration_s: 600.0,
            ..small(1.5, 2)
        });
        let bound = RouterConfig {
            shed_wait_ms: 60_000.0,
            ..RouterConfig::default()
        };
        let shedding = simulate(&t, Policy::Fractal, bound.clone());
        let queueing = simulate(
            &t,
            Policy::Fractal,
            RouterConfig {
                shed_wait_ms: f64::INFINITY,
                ..RouterConfig::default()
            },
        );
        eprintln!("{}\n{}", shedding.summary(), queueing.summary());
        assert!(shedding.shed > 0, "{}", shedding.summary());
        assert_eq!(queueing.shed, 0);
        // What is accepted is served, and the queue stays bounded: the
        // bound is on predicted waiting, so latency (which adds service
        // and prediction error) is a small multiple of it, while queueing
        // everything grows with the overload.
        assert_eq!(shedding.failed, 0, "{}", shedding.summary());
        assert!(
            shedding.p99_ms <= bound.shed_wait_ms * 5.0,
            "{}",
            shedding.summary()
        );
        assert!(
            queueing.p95_ms > shedding.p95_ms * 2.0,
            "{}",
            queueing.summary()
        );
    }

    #[test]
    fn plots_have_a_curve_per_policy() {
        let t = Trace::generate(&SimConfig {
            provers: 8,
            duration_s: 60.0,
            warmup_s: 0.0,
            ..SimConfig::default()
        });
        let rs: Vec<SimResult> = Policy::ALL
            .iter()
            .map(|&p| simulate(&t, p, RouterConfig::default()))
            .collect();
        let svg = cdf_svg(&rs[3..], "t");
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("fractal p95"));
        let svg = ratio_svg(&[(0.3, 1, &rs), (0.5, 1, &rs), (0.3, 4, &rs)]);
        // Fractal, least-loaded and random, for each of 2 gateway counts.
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains("fractal ÷ informed · 4 gw"));
    }
}
