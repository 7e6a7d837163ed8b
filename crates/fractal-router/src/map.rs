//! The map of the grid: what one gateway has measured about every prover,
//! and the routing decision built on it (DESIGN.md section 8).
//!
//! Time is passed in as milliseconds (`now_ms`) so that the same code runs
//! on the wall clock in the gateway and on simulated time in
//! [`crate::sim`].

use std::collections::{BTreeMap, VecDeque};

use fractal_protocol::Hotkey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::vivaldi::{Coord, VivaldiConfig};

#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Candidates within this factor of the best predicted completion time
    /// count as "near-best"; two of them are drawn and the better one wins,
    /// so several gateways do not all herd onto the same node.
    pub near_best: f64,
    /// A second (hedged) request goes out when a job has taken this many
    /// times its predicted completion time…
    pub hedge_factor: f64,
    /// …but never before this many ms.
    pub hedge_min_ms: f64,
    /// Consecutive failures that open a node's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps a node out before one trial request.
    pub breaker_open_ms: f64,
    /// Service-time guess (ms per frame·step at 64x64) for a node nobody
    /// has measured, before the fleet has any measurement either.
    pub prior_ms_per_frame_step: f64,
    /// Weight of the newest sample in the moving averages.
    pub ema_alpha: f64,
    /// RTT samples kept per node for percentiles.
    pub rtt_window: usize,
    /// A new job whose predicted wait for a node (or, with every node
    /// full, for the jobs held ahead of it) exceeds this is refused with
    /// `Retry-After` rather than queued: past saturation, the gateway
    /// sheds load instead of growing its queue without bound.
    pub shed_wait_ms: f64,
    /// A job smaller than the recent mix may go to a slower node whose
    /// predicted completion is within this fraction of the best, keeping
    /// the fastest nodes for big jobs (0: always the near-best).
    pub small_job_slack: f64,
    /// A request may wait in the node's queue as long as predicted plus
    /// this fraction of its service time (at least
    /// `START_WITHIN_MIN_MS`); a node holding more refuses it at once.
    pub start_within_margin: f64,
    /// After this many such refusals for one job, its next request takes
    /// any queue.
    pub start_within_tries: u32,
    pub vivaldi: VivaldiConfig,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            near_best: 1.1,
            hedge_factor: 2.0,
            hedge_min_ms: 1_000.0,
            breaker_failures: 3,
            breaker_open_ms: 30_000.0,
            prior_ms_per_frame_step: 20.0,
            ema_alpha: 0.3,
            rtt_window: 64,
            shed_wait_ms: 300_000.0,
            small_job_slack: 0.5,
            start_within_margin: 0.1,
            start_within_tries: 4,
            vivaldi: VivaldiConfig::default(),
        }
    }
}

/// The shape of a job, for predicting how long a node takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Work {
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub steps: u32,
}

impl Work {
    fn frame_steps(&self) -> f64 {
        self.frames as f64 * self.steps as f64
    }
    fn pixels(&self) -> f64 {
        (self.width as f64 * self.height as f64).max(1.0)
    }
    fn resolution(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }
    /// Size in frame·steps at 64x64.
    fn units(&self) -> f64 {
        self.frame_steps() * self.pixels() / REF_PIXELS
    }
}

/// How many of the slowest acceptable nodes a small job draws two from.
const SLOW_CANDIDATES: usize = 8;

/// The least queueing a request allows beyond the prediction, ms: jitter
/// between a probe and the request should not bounce a job.
const START_WITHIN_MIN_MS: f64 = 250.0;

/// Weight of the newest job in the moving average of the job mix.
const MIX_ALPHA: f64 = 0.02;

/// Weight of the newest report in a node's foreign arrival rate, and the
/// longest gap between two reports it is measured across.
const FOREIGN_ALPHA: f64 = 0.3;
const FOREIGN_WINDOW_MS: f64 = 60_000.0;

/// Weight of one probe report in this gateway's share of the grid.
const SHARE_ALPHA: f64 = 0.01;

/// Reference resolution for comparing speeds measured at different sizes.
const REF_PIXELS: f64 = 64.0 * 64.0;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Breaker {
    Closed,
    /// Refusing requests until `until_ms`.
    Open {
        until_ms: f64,
    },
    /// One trial request may go; its outcome closes or re-opens.
    HalfOpen {
        probing: bool,
    },
}

/// Why a request to a node did not produce a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Refused, connection lost, malformed answer, or the job failed.
    Error,
    /// No answer within the deadline.
    Timeout,
    /// The node is saturated (503/429): not its fault, but route elsewhere.
    Busy,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub hotkey: Hotkey,
    pub addr: Option<String>,
    pub coord: Coord,
    rtt_samples: VecDeque<f64>,
    /// Moving average of ms per frame·step, per resolution ("WxH").
    pub ms_per_frame_step: BTreeMap<String, f64>,
    /// Requests this gateway has outstanding on the node.
    pub inflight: u32,
    /// Predicted service time of those requests, ms.
    pub backlog_ms: f64,
    /// When the node should be through those requests (gateway clock, ms).
    /// Re-anchored at every answer, so it tracks the running job's progress.
    pub free_at_ms: f64,
    /// Jobs the node reported running or queued at the last probe…
    pub reported_queue: u32,
    /// …and when (gateway clock, ms); the report drains from then on.
    pub reported_at_ms: f64,
    /// Predicted work of the reported jobs that are not ours (other
    /// gateways' and the verifier's), ms, as of `reported_at_ms`.
    #[serde(default)]
    pub others_ms: f64,
    /// Jobs of the others' in the last report.
    #[serde(default)]
    pub others_jobs: u32,
    /// The node's own speed report (ms per frame·step at 64x64).
    #[serde(default)]
    pub reported_speed: Option<f64>,
    /// Moving average of the work other gateways send it, in ms of work
    /// per ms: between reports their queue grows at this rate.
    #[serde(default)]
    pub foreign_rate: f64,
    /// Jobs the node runs at once (from its info).
    pub concurrency: u32,
    /// Jobs it accepts at once, running or waiting (from its info; 0 until
    /// it has said): past it, it answers busy.
    #[serde(default)]
    pub capacity: u32,
    /// Moving average of waiting that the node's queue did not explain
    /// (other gateways' load), in ms.
    pub extra_wait_ms: f64,
    pub completed: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// Moving average of failure (1) vs success (0).
    pub error_rate: f64,
    pub consecutive_failures: u32,
    pub breaker: Breaker,
    /// The breaker was opened by a failed probe (not by failed jobs), so a
    /// successful probe may let a trial job through at once.
    #[serde(default)]
    pub probe_down: bool,
    /// The verifier's score; `Some(0.0)` means never route here.
    pub score: Option<f64>,
    pub audits_passed: u64,
    pub audits_failed: u64,
}

impl NodeState {
    fn new(hotkey: Hotkey, cfg: &RouterConfig) -> Self {
        NodeState {
            hotkey,
            addr: None,
            coord: Coord::origin(&cfg.vivaldi),
            rtt_samples: VecDeque::new(),
            ms_per_frame_step: BTreeMap::new(),
            inflight: 0,
            backlog_ms: 0.0,
            free_at_ms: 0.0,
            reported_queue: 0,
            reported_at_ms: 0.0,
            others_ms: 0.0,
            others_jobs: 0,
            reported_speed: None,
            foreign_rate: 0.0,
            concurrency: 1,
            capacity: 0,
            extra_wait_ms: 0.0,
            completed: 0,
            errors: 0,
            timeouts: 0,
            error_rate: 0.0,
            consecutive_failures: 0,
            breaker: Breaker::Closed,
            probe_down: false,
            score: None,
            audits_passed: 0,
            audits_failed: 0,
        }
    }

    /// RTT percentile `q` in 0..=1 over the recent samples.
    pub fn rtt_percentile(&self, q: f64) -> Option<f64> {
        percentile(self.rtt_samples.iter().copied().collect(), q)
    }

    /// Speed normalised to 64x64 (ms per frame·step), if ever measured.
    fn normalised_speed(&self) -> Option<f64> {
        let (res, ms) = self.ms_per_frame_step.iter().next_back()?;
        Some(ms * REF_PIXELS / pixels_of(res)?)
    }

    /// Best guess of the speed normalised to 64x64: measured here, else
    /// what the node says of itself, else the fleet's.
    fn speed(&self, fleet_prior: f64) -> f64 {
        self.normalised_speed()
            .or(self.reported_speed)
            .unwrap_or(fleet_prior)
    }

    /// What an average job of the mix (`mix_units` frame·steps at 64x64)
    /// takes here, ms.
    fn mean_job_ms(&self, fleet_prior: f64, mix_units: f64) -> f64 {
        self.speed(fleet_prior) * mix_units
    }

    /// Jobs there as far as this gateway can tell: all of ours until they
    /// are answered (counting one as done before its answer comes makes
    /// the node refuse the next), and the others' from the last report
    /// less what the node has worked off since.
    fn jobs_now(&self, now_ms: f64, fleet_prior: f64, mix_units: f64) -> f64 {
        let slots = self.concurrency.max(1) as f64;
        let ours = self.inflight as f64;
        let others = self.others_remaining_ms(now_ms) * slots;
        let priced = (others / self.mean_job_ms(fleet_prior, mix_units).max(1e-9)).ceil();
        // The reported count, worked off in proportion: a backlog of small
        // jobs is few ms but many jobs, and each takes a place in the queue.
        let counted = if self.others_ms > 0.0 {
            (self.others_jobs as f64 * (others / self.others_ms).min(1.0)).ceil()
        } else {
            0.0
        };
        ours + priced.max(counted)
    }

    /// A slot free: fewer jobs there, ours and the others', than it runs
    /// at once.
    fn idle(&self, now_ms: f64, fleet_prior: f64, mix_units: f64) -> bool {
        self.jobs_now(now_ms, fleet_prior, mix_units) < self.concurrency.max(1) as f64
    }

    /// Queue time that other gateways' jobs put ahead of a new one, ms:
    /// the last report, worked off since, plus what they kept sending (at
    /// `foreign_rate`).
    fn others_remaining_ms(&self, now_ms: f64) -> f64 {
        let slots = self.concurrency.max(1) as f64;
        let elapsed = (now_ms - self.reported_at_ms).max(0.0);
        ((self.others_ms + (self.foreign_rate - slots) * elapsed) / slots).max(0.0)
    }

    /// The others' work in a backlog the node priced itself (ms per
    /// slot), as total ms: ours in it are booked until `free_at_ms`.
    fn others_in_backlog_ms(&self, backlog_ms: f64, now_ms: f64) -> f64 {
        let ours = if self.inflight == 0 {
            0.0
        } else {
            (self.free_at_ms - now_ms).max(0.0)
        };
        (backlog_ms - ours).max(0.0) * self.concurrency.max(1) as f64
    }

    fn service_ms(&self, work: &Work, fleet_prior: f64) -> f64 {
        let per = match self.ms_per_frame_step.get(&work.resolution()) {
            Some(ms) => *ms,
            // Not measured at this size: scale what we know by pixel count.
            None => self.speed(fleet_prior) * work.pixels() / REF_PIXELS,
        };
        per * work.frame_steps()
    }
}

fn pixels_of(res: &str) -> Option<f64> {
    let (w, h) = res.split_once('x')?;
    Some(w.parse::<f64>().ok()? * h.parse::<f64>().ok()?)
}

/// Nearest-rank percentile; `None` for no samples.
pub fn percentile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// What a prover reported about its load at a probe (`/v1/info`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Jobs running or waiting there (every gateway's).
    pub jobs: u32,
    /// Jobs it runs at once.
    pub slots: u32,
    /// Jobs it accepts at once, running or waiting; past it, busy.
    pub capacity: u32,
    /// The prover's own estimate of the work it holds, ms: what is left
    /// of the running jobs plus the queued ones at its measured speed, per
    /// slot. A new job would start about this long after the report.
    #[serde(default)]
    pub backlog_ms: Option<f64>,
    /// The prover's own measured speed (ms per frame·step at 64x64), over
    /// its recent jobs, everybody's: a prior until this gateway has
    /// measured it.
    #[serde(default)]
    pub ms_per_frame_step: Option<f64>,
}

/// Whether a gateway should take a new job (see [`GridMap::admit`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admission {
    Accept,
    /// The grid is saturated: refuse with `Retry-After`.
    Shed {
        retry_after_s: u64,
    },
}

/// A request the router sent: where, and what it predicted then.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ticket {
    pub node: Hotkey,
    pub predicted: Prediction,
}

/// Predicted completion of one job on one node, in ms.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub rtt_ms: f64,
    pub wait_ms: f64,
    pub service_ms: f64,
    pub total_ms: f64,
}

/// The whole map, owned by one gateway. Not thread-safe by itself; the
/// gateway keeps it behind a mutex and never holds that across I/O.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GridMap {
    /// This gateway's own coordinate.
    pub me: Coord,
    pub nodes: BTreeMap<Hotkey, NodeState>,
    /// Moving average of the jobs routed, in frame·steps at 64x64: prices
    /// the jobs a node reports without saying what they are.
    #[serde(default)]
    pub mix_units: f64,
    /// Median normalised speed over the measured fleet (ms per frame·step
    /// at 64x64), kept current as jobs finish.
    #[serde(skip)]
    fleet_speed: Option<f64>,
    /// Moving average, over probe reports, of the share of a prover's
    /// jobs that are this gateway's: its share of the grid when every
    /// gateway has work waiting.
    #[serde(default = "alone")]
    pub own_share: f64,
    #[serde(skip, default = "default_config")]
    cfg: RouterConfig,
    #[serde(skip, default = "default_rng")]
    rng: StdRng,
}

fn alone() -> f64 {
    1.0
}

fn default_config() -> RouterConfig {
    RouterConfig::default()
}
fn default_rng() -> StdRng {
    StdRng::seed_from_u64(0)
}

impl GridMap {
    /// `seed` drives tie-breaking only (never anything a job's output
    /// depends on); the simulator fixes it for reproducible runs.
    pub fn new(cfg: RouterConfig, seed: u64) -> Self {
        GridMap {
            me: Coord::origin(&cfg.vivaldi),
            nodes: BTreeMap::new(),
            mix_units: 0.0,
            fleet_speed: None,
            own_share: 1.0,
            cfg,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Restores a persisted map under a (possibly new) configuration.
    pub fn with_config(mut self, cfg: RouterConfig, seed: u64) -> Self {
        self.cfg = cfg;
        self.rng = StdRng::seed_from_u64(seed);
        for n in self.nodes.values_mut() {
            // Requests in flight died with the process that sent them.
            n.inflight = 0;
            n.backlog_ms = 0.0;
            n.free_at_ms = 0.0;
            if let Breaker::HalfOpen { .. } = n.breaker {
                n.breaker = Breaker::HalfOpen { probing: false };
            }
        }
        self.update_fleet_speed();
        self
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Makes the map's node set equal `provers` (from the metagraph),
    /// keeping measurements of nodes that stay.
    pub fn sync(&mut self, provers: impl IntoIterator<Item = (Hotkey, Option<String>)>) {
        let mut seen = BTreeMap::new();
        for (hk, addr) in provers {
            seen.insert(hk, addr);
        }
        self.nodes.retain(|hk, _| seen.contains_key(hk));
        for (hk, addr) in seen {
            let cfg = &self.cfg;
            let n = self
                .nodes
                .entry(hk)
                .or_insert_with(|| NodeState::new(hk, cfg));
            if n.addr != addr {
                // A new address is a new network position.
                n.coord = Coord::origin(&cfg.vivaldi);
                n.rtt_samples.clear();
                n.addr = addr;
            }
        }
    }

    pub fn node(&self, hk: &Hotkey) -> Option<&NodeState> {
        self.nodes.get(hk)
    }

    /// The verifier's view of `hk`: its current weight (0 excludes it)
    /// and its audit record.
    pub fn set_verdict(&mut self, hk: &Hotkey, score: f64, audits_passed: u64, audits_failed: u64) {
        if let Some(n) = self.nodes.get_mut(hk) {
            n.score = Some(score);
            n.audits_passed = audits_passed;
            n.audits_failed = audits_failed;
        }
    }

    /// One round-trip measurement to `hk` (a probe, not a job): moves both
    /// Vivaldi coordinates. `load` is what the node reported, if anything.
    pub fn observe_rtt(&mut self, hk: &Hotkey, rtt_ms: f64, load: Option<Load>, now_ms: f64) {
        let (prior, mix_units) = (self.fleet_prior(), self.mix_units);
        let Some(inflight) = self.nodes.get(hk).map(|n| n.inflight) else {
            return;
        };
        if !(rtt_ms.is_finite() && rtt_ms >= 0.0) {
            return;
        }
        if let Some(load) = load.filter(|l| l.jobs > 0) {
            let ours = inflight.min(load.jobs) as f64 / load.jobs as f64;
            self.own_share += SHARE_ALPHA * (ours - self.own_share);
        }
        let n = self.nodes.get_mut(hk).expect("looked up above");
        n.rtt_samples.push_back(rtt_ms);
        while n.rtt_samples.len() > self.cfg.rtt_window {
            n.rtt_samples.pop_front();
        }
        if n.probe_down {
            // It was unreachable and answers again: what failed was the
            // node being away, which the answer disproves, so it takes
            // jobs at once (a trial job would hold it to one job for as
            // long as that job runs). Failures while it answers probes
            // still need a trial.
            n.probe_down = false;
            n.consecutive_failures = 0;
            n.breaker = Breaker::Closed;
        }
        if let Some(load) = load {
            n.reported_queue = load.jobs;
            n.concurrency = load.slots.max(1);
            n.capacity = load.capacity;
            let slots = n.concurrency as f64;
            if let Some(ms) = load
                .ms_per_frame_step
                .filter(|ms| ms.is_finite() && *ms > 0.0)
            {
                n.reported_speed = Some(ms);
            }
            let others_ms = match load.backlog_ms.filter(|ms| ms.is_finite() && *ms >= 0.0) {
                // The node priced its queue itself; ours in it are booked
                // until `free_at_ms`.
                Some(backlog) => n.others_in_backlog_ms(backlog, now_ms),
                // Ours are booked precisely; price the rest at the mix.
                _ => load.jobs.saturating_sub(n.inflight) as f64 * n.mean_job_ms(prior, mix_units),
            };
            // Others' work that arrived since the last report: what is
            // there beyond what was left of the last one.
            let dt = now_ms - n.reported_at_ms;
            if n.reported_at_ms > 0.0 && dt > 0.0 && dt <= FOREIGN_WINDOW_MS {
                let left = (n.others_ms - slots * dt).max(0.0);
                let rate = ((others_ms - left).max(0.0) / dt).min(slots);
                n.foreign_rate += FOREIGN_ALPHA * (rate - n.foreign_rate);
            }
            n.others_ms = others_ms;
            n.others_jobs = load.jobs.saturating_sub(n.inflight);
            n.reported_at_ms = now_ms;
        }
        // Serf filters samples through a short median to shed outliers.
        let recent: Vec<f64> = n.rtt_samples.iter().rev().take(3).copied().collect();
        let filtered = percentile(recent, 0.5).unwrap_or(rtt_ms);
        let me_before = self.me;
        let node_before = n.coord;
        n.coord
            .update(&me_before, filtered, &self.cfg.vivaldi, &mut self.rng);
        self.me
            .update(&node_before, filtered, &self.cfg.vivaldi, &mut self.rng);
    }

    /// `hk` answered with something unusable (a video that does not
    /// decode): keep jobs away for the breaker's open period.
    pub fn distrust(&mut self, hk: &Hotkey, now_ms: f64) {
        let open_ms = self.cfg.breaker_open_ms;
        if let Some(n) = self.nodes.get_mut(hk) {
            n.errors += 1;
            n.consecutive_failures += 1;
            n.breaker = Breaker::Open {
                until_ms: now_ms + open_ms,
            };
        }
    }

    /// A probe found `hk` unreachable (connection refused or timed out):
    /// open its breaker now rather than after failed jobs.
    pub fn unreachable(&mut self, hk: &Hotkey, now_ms: f64) {
        let open_ms = self.cfg.breaker_open_ms;
        if let Some(n) = self.nodes.get_mut(hk) {
            n.consecutive_failures += 1;
            n.probe_down = true;
            if !matches!(n.breaker, Breaker::HalfOpen { probing: true }) {
                n.breaker = Breaker::Open {
                    until_ms: now_ms + open_ms,
                };
            }
        }
    }

    /// Median normalised speed over the measured fleet: the guess for
    /// nodes not measured yet.
    fn fleet_prior(&self) -> f64 {
        self.fleet_speed.unwrap_or(self.cfg.prior_ms_per_frame_step)
    }

    fn update_fleet_speed(&mut self) {
        let speeds: Vec<f64> = self
            .nodes
            .values()
            .filter_map(NodeState::normalised_speed)
            .collect();
        self.fleet_speed = percentile(speeds, 0.5);
    }

    fn predict_with(&self, n: &NodeState, work: &Work, prior: f64, now_ms: f64) -> Prediction {
        let rtt_ms = if n.rtt_samples.is_empty() {
            // Never probed: assume the fleet's typical distance.
            self.fleet_rtt()
        } else {
            self.me.distance(&n.coord)
        };
        let service_ms = n.service_ms(work, prior);
        // Our own requests there (booked at their predicted service), then
        // what the node last said it holds of others'.
        let ours = if n.inflight == 0 {
            0.0
        } else {
            (n.free_at_ms - (now_ms + rtt_ms / 2.0)).max(0.0)
        };
        let wait_ms = ours + n.others_remaining_ms(now_ms) + n.extra_wait_ms;
        Prediction {
            rtt_ms,
            wait_ms,
            service_ms,
            total_ms: rtt_ms + wait_ms + service_ms,
        }
    }

    fn fleet_rtt(&self) -> f64 {
        let d: Vec<f64> = self
            .nodes
            .values()
            .filter(|n| !n.rtt_samples.is_empty())
            .map(|n| self.me.distance(&n.coord))
            .collect();
        percentile(d, 0.5).unwrap_or(50.0)
    }

    pub fn predict(&self, hk: &Hotkey, work: &Work, now_ms: f64) -> Option<Prediction> {
        let n = self.nodes.get(hk)?;
        Some(self.predict_with(n, work, self.fleet_prior(), now_ms))
    }

    /// Whether the router may send a request to `n` at `now_ms`.
    fn eligible(&self, n: &NodeState, now_ms: f64) -> bool {
        if n.score.is_some_and(|s| s <= 0.0) {
            return false;
        }
        match n.breaker {
            Breaker::Closed => true,
            Breaker::Open { until_ms } => now_ms >= until_ms,
            Breaker::HalfOpen { probing } => !probing,
        }
    }

    /// Whether `n` would take one more job, as far as this gateway can
    /// tell (a full node answers busy).
    fn has_room(&self, n: &NodeState, prior: f64, now_ms: f64) -> bool {
        n.capacity == 0 || n.jobs_now(now_ms, prior, self.mix_units) + 1.0 <= n.capacity as f64
    }

    /// Picks the node with the lowest predicted completion time (power of
    /// two choices among the near-best), skipping `exclude`, and counts the
    /// request as in flight there. `None` when no node is eligible.
    pub fn choose(&mut self, work: &Work, now_ms: f64, exclude: &[Hotkey]) -> Option<Ticket> {
        self.choose_among(work, now_ms, exclude, false)
    }

    /// Like [`GridMap::choose`], for a hedged second request: only nodes
    /// with nothing queued, so a hedge uses spare capacity and never adds
    /// to a busy grid's queues. `None` when no such node is eligible.
    pub fn choose_hedge(&mut self, work: &Work, now_ms: f64, exclude: &[Hotkey]) -> Option<Ticket> {
        self.choose_among(work, now_ms, exclude, true)
    }

    fn choose_among(
        &mut self,
        work: &Work,
        now_ms: f64,
        exclude: &[Hotkey],
        idle_only: bool,
    ) -> Option<Ticket> {
        let prior = self.fleet_prior();
        let mut cands: Vec<(Hotkey, Prediction)> = self
            .nodes
            .values()
            .filter(|n| !exclude.contains(&n.hotkey) && self.eligible(n, now_ms))
            .filter(|n| {
                self.has_room(n, prior, now_ms)
                    && (!idle_only || n.idle(now_ms, prior, self.mix_units))
            })
            .map(|n| (n.hotkey, self.predict_with(n, work, prior, now_ms)))
            .collect();
        let best = cands
            .iter()
            .map(|c| c.1.total_ms)
            .fold(f64::INFINITY, f64::min);
        if !best.is_finite() {
            return None;
        }
        if !idle_only && work.units() < self.mix_units && self.cfg.small_job_slack > 0.0 {
            // A job smaller than the mix takes one of the slower nodes that
            // would still finish it nearly as soon, and leaves the fast
            // ones to the big jobs that make the tail: a medium job a
            // little later costs less than a big one behind it.
            cands.retain(|c| c.1.total_ms <= best * (1.0 + self.cfg.small_job_slack) + 1.0);
            let speed = |h: &Hotkey| self.nodes[h].speed(prior);
            cands.sort_by(|a, b| speed(&b.0).total_cmp(&speed(&a.0)).then(a.0.cmp(&b.0)));
            cands.truncate(SLOW_CANDIDATES);
        } else {
            cands.retain(|c| c.1.total_ms <= best * self.cfg.near_best + 1.0);
        }
        let (node, predicted) = if cands.len() == 1 {
            cands[0]
        } else {
            let i = self.rng.gen_range(0..cands.len());
            let mut j = self.rng.gen_range(0..cands.len() - 1);
            if j >= i {
                j += 1;
            }
            if cands[i].1.total_ms <= cands[j].1.total_ms {
                cands[i]
            } else {
                cands[j]
            }
        };
        self.mix_units = if self.mix_units > 0.0 {
            self.mix_units + MIX_ALPHA * (work.units() - self.mix_units)
        } else {
            work.units()
        };
        let n = self.nodes.get_mut(&node).expect("candidate exists");
        let arrives = now_ms + predicted.rtt_ms / 2.0;
        n.free_at_ms = if n.inflight == 0 {
            arrives
        } else {
            n.free_at_ms.max(arrives)
        } + predicted.service_ms / n.concurrency.max(1) as f64;
        n.inflight += 1;
        n.backlog_ms += predicted.service_ms;
        if let Breaker::Open { .. } | Breaker::HalfOpen { .. } = n.breaker {
            n.breaker = Breaker::HalfOpen { probing: true };
        }
        Some(Ticket { node, predicted })
    }

    /// The longest a request for `t` may wait in the node's queue before
    /// it starts, ms, sent with the request: a node holding more refuses
    /// at once (telling how much it holds) instead of queueing the job
    /// behind work this gateway could not see (other gateways' sends since
    /// the last probe), and the job goes to the next-best node. After
    /// `refused` such answers for one job, `None`: take any queue, so a
    /// busy grid does not bounce jobs around.
    pub fn start_within_ms(&self, t: &Ticket, refused: u32) -> Option<f64> {
        (refused < self.cfg.start_within_tries).then(|| {
            t.predicted.wait_ms
                + (self.cfg.start_within_margin * t.predicted.service_ms).max(START_WITHIN_MIN_MS)
        })
    }

    /// The node of `t` refused the job because `ahead_ms` of work was
    /// ahead of it, more than [`GridMap::start_within_ms`] allowed: the map
    /// learns that backlog.
    pub fn refused_late(&mut self, t: &Ticket, ahead_ms: f64, now_ms: f64) {
        let Some(n) = self.settle(t) else {
            return;
        };
        if !(ahead_ms.is_finite() && ahead_ms >= 0.0) {
            return;
        }
        n.others_ms = n.others_in_backlog_ms(ahead_ms, now_ms);
        n.reported_at_ms = now_ms;
    }

    /// Whether to take a new job, with `held` jobs already waiting at
    /// this gateway for a node with room: it sheds when the job would
    /// wait longer than `shed_wait_ms` (predicted from the best node with
    /// room, or, with every node full, from how fast the grid works off
    /// the jobs held ahead).
    pub fn admit(&self, work: &Work, now_ms: f64, held: usize) -> Admission {
        let prior = self.fleet_prior();
        let open = || self.nodes.values().filter(|n| self.eligible(n, now_ms));
        let wait_ms = if held == 0 {
            open()
                .filter(|n| self.has_room(n, prior, now_ms))
                .map(|n| self.predict_with(n, work, prior, now_ms).wait_ms)
                .fold(None, |a: Option<f64>, w| Some(a.map_or(w, |a| a.min(w))))
        } else {
            None
        };
        let wait_ms = wait_ms.unwrap_or_else(|| {
            // Every node is full: the job waits for the grid to work off
            // what the nodes hold, and then for the jobs held here ahead
            // of it, which get this gateway's share of the grid (other
            // gateways hold jobs of their own), at the rate it finishes
            // jobs of the mix.
            let mix = self.mix_units.max(1.0);
            let (rate, queued) = open().fold((0.0, 0.0), |(rate, queued), n| {
                let per_job = n.mean_job_ms(prior, mix).max(1e-9);
                (
                    rate + n.concurrency.max(1) as f64 / per_job,
                    queued + n.jobs_now(now_ms, prior, mix),
                )
            });
            if rate > 0.0 {
                (queued + 1.0) / rate + held as f64 / (rate * self.own_share.clamp(0.01, 1.0))
            } else {
                // No node to route to (none known yet, or all down): no
                // way to tell how long; the queue's timeout decides.
                0.0
            }
        });
        if wait_ms <= self.cfg.shed_wait_ms {
            Admission::Accept
        } else {
            Admission::Shed {
                retry_after_s: (wait_ms / 1000.0).clamp(1.0, 600.0).ceil() as u64,
            }
        }
    }

    /// When to send a hedged second request for `t`, in ms after sending it.
    pub fn hedge_after_ms(&self, t: &Ticket) -> f64 {
        (t.predicted.total_ms * self.cfg.hedge_factor).max(self.cfg.hedge_min_ms)
    }

    /// Takes a finished request off its node's books.
    fn settle(&mut self, t: &Ticket) -> Option<&mut NodeState> {
        let n = self.nodes.get_mut(&t.node)?;
        n.inflight = n.inflight.saturating_sub(1);
        n.backlog_ms = if n.inflight == 0 {
            0.0
        } else {
            (n.backlog_ms - t.predicted.service_ms).max(0.0)
        };
        n.free_at_ms -= t.predicted.service_ms / n.concurrency.max(1) as f64;
        Some(n)
    }

    /// The job of `t` finished: `service_ms` is the node's own processing
    /// time, `total_ms` the request as the gateway saw it, `now_ms` when
    /// the answer arrived.
    pub fn completed(
        &mut self,
        t: &Ticket,
        work: &Work,
        service_ms: f64,
        total_ms: f64,
        now_ms: f64,
    ) {
        let alpha = self.cfg.ema_alpha;
        let Some(n) = self.settle(t) else {
            return;
        };
        // The node finished about half an RTT ago; what it still holds of
        // ours starts from there.
        let half_rtt = n.rtt_percentile(0.5).unwrap_or(0.0) / 2.0;
        n.free_at_ms = now_ms - half_rtt + n.backlog_ms / n.concurrency.max(1) as f64;
        n.completed += 1;
        n.consecutive_failures = 0;
        n.breaker = Breaker::Closed;
        n.error_rate *= 1.0 - alpha;
        let measured = work.frame_steps() > 0.0 && service_ms.is_finite() && service_ms >= 0.0;
        if measured {
            let per = service_ms / work.frame_steps();
            let e = n.ms_per_frame_step.entry(work.resolution()).or_insert(per);
            *e += alpha * (per - *e);
        }
        let rtt = percentile(n.rtt_samples.iter().copied().collect(), 0.5).unwrap_or(0.0);
        let unexplained = (total_ms - service_ms - rtt - t.predicted.wait_ms).max(0.0);
        if unexplained.is_finite() {
            n.extra_wait_ms += alpha * (unexplained - n.extra_wait_ms);
        }
        if measured {
            self.update_fleet_speed();
        }
    }

    /// The request of `t` failed; enough in a row opens the node's breaker.
    pub fn failed(&mut self, t: &Ticket, why: Failure, now_ms: f64) {
        let alpha = self.cfg.ema_alpha;
        let (prior, mix_units) = (self.fleet_prior(), self.mix_units);
        let (threshold, open_ms) = (self.cfg.breaker_failures, self.cfg.breaker_open_ms);
        let Some(n) = self.settle(t) else {
            return;
        };
        match why {
            Failure::Busy => {
                // Saturated, not broken: leave the breaker alone, but count
                // it full of others' jobs until a probe says otherwise.
                let full = n.capacity.max(n.concurrency * 4);
                n.reported_queue = full;
                n.reported_at_ms = now_ms;
                n.others_jobs = full.saturating_sub(n.inflight);
                n.others_ms = n.others_jobs as f64 * n.mean_job_ms(prior, mix_units);
                if let Breaker::HalfOpen { .. } = n.breaker {
                    n.breaker = Breaker::HalfOpen { probing: false };
                }
                return;
            }
            Failure::Error => n.errors += 1,
            Failure::Timeout => n.timeouts += 1,
        }
        n.error_rate += alpha * (1.0 - n.error_rate);
        n.consecutive_failures += 1;
        let trial_failed = matches!(n.breaker, Breaker::HalfOpen { .. });
        if trial_failed || n.consecutive_failures >= threshold {
            n.breaker = Breaker::Open {
                until_ms: now_ms + open_ms,
            };
        }
    }

    /// The request of `t` was abandoned (a hedge lost the race).
    pub fn cancelled(&mut self, t: &Ticket) {
        if let Some(n) = self.settle(t) {
            if let Breaker::HalfOpen { .. } = n.breaker {
                n.breaker = Breaker::HalfOpen { probing: false };
            }
        }
    }

    /// The map as `GET /v1/grid` shows it.
    pub fn snapshot(&self, work: &Work, now_ms: f64) -> GridSnapshot {
        let prior = self.fleet_prior();
        GridSnapshot {
            me: self.me,
            nodes: self
                .nodes
                .values()
                .map(|n| {
                    let p = self.predict_with(n, work, prior, now_ms);
                    NodeView {
                        hotkey: n.hotkey.to_string(),
                        addr: n.addr.clone(),
                        coord: n.coord,
                        rtt_ms: RttView {
                            samples: n.rtt_samples.len(),
                            p50: n.rtt_percentile(0.5),
                            p95: n.rtt_percentile(0.95),
                            p99: n.rtt_percentile(0.99),
                            predicted: self.me.distance(&n.coord),
                        },
                        ms_per_frame_step: n.ms_per_frame_step.clone(),
                        predicted_ms: p,
                        inflight: n.inflight,
                        reported_queue: n.reported_queue,
                        capacity: n.concurrency,
                        completed: n.completed,
                        errors: n.errors,
                        timeouts: n.timeouts,
                        error_rate: n.error_rate,
                        score: n.score,
                        audits_passed: n.audits_passed,
                        audits_failed: n.audits_failed,
                        state: if n.score.is_some_and(|s| s <= 0.0) {
                            NodeHealth::Excluded
                        } else {
                            match n.breaker {
                                Breaker::Closed => NodeHealth::Up,
                                Breaker::Open { until_ms } if now_ms < until_ms => NodeHealth::Open,
                                _ => NodeHealth::Probing,
                            }
                        },
                    }
                })
                .collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeHealth {
    /// Routable.
    Up,
    /// Breaker open after failures.
    Open,
    /// Breaker waiting for (or running) one trial request.
    Probing,
    /// Scored zero by the verifier: never routed to.
    Excluded,
}

#[derive(Clone, Debug, Serialize)]
pub struct RttView {
    pub samples: usize,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    /// From the Vivaldi coordinates.
    pub predicted: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    pub hotkey: String,
    pub addr: Option<String>,
    pub coord: Coord,
    pub rtt_ms: RttView,
    pub ms_per_frame_step: BTreeMap<String, f64>,
    /// For the default job shape.
    pub predicted_ms: Prediction,
    pub inflight: u32,
    pub reported_queue: u32,
    pub capacity: u32,
    pub completed: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub error_rate: f64,
    pub score: Option<f64>,
    pub audits_passed: u64,
    pub audits_failed: u64,
    pub state: NodeHealth,
}

#[derive(Clone, Debug, Serialize)]
pub struct GridSnapshot {
    pub me: Coord,
    pub nodes: Vec<NodeView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hk(i: u8) -> Hotkey {
        Hotkey([i; 32])
    }

    const WORK: Work = Work {
        width: 64,
        height: 64,
        frames: 8,
        steps: 10,
    };

    fn map(n: u8) -> GridMap {
        let mut m = GridMap::new(RouterConfig::default(), 1);
        m.sync((0..n).map(|i| (hk(i), Some(format!("http://10.0.0.{i}:1")))));
        m
    }

    #[test]
    fn prefers_the_node_that_finishes_first() {
        let mut m = map(3);
        // Node 0: near but slow; node 1: far but fast; node 2: near and fast.
        for _ in 0..50 {
            m.observe_rtt(&hk(0), 10.0, None, 0.0);
            m.observe_rtt(&hk(1), 200.0, None, 0.0);
            m.observe_rtt(&hk(2), 10.0, None, 0.0);
        }
        for (i, per) in [(0, 50.0), (1, 5.0), (2, 5.0)] {
            let t = m
                .choose(
                    &WORK,
                    0.0,
                    &[hk(0), hk(1), hk(2)]
                        .into_iter()
                        .filter(|h| *h != hk(i))
                        .collect::<Vec<_>>(),
                )
                .unwrap();
            m.completed(&t, &WORK, per * 80.0, per * 80.0 + 10.0, 0.0);
        }
        for _ in 0..20 {
            let t = m.choose(&WORK, 0.0, &[]).unwrap();
            assert_eq!(t.node, hk(2));
            m.cancelled(&t);
        }
        // With node 2 busy, the queue makes the far fast node better than
        // waiting, and far better than the slow one.
        for _ in 0..3 {
            assert_eq!(m.choose(&WORK, 0.0, &[hk(0), hk(1)]).unwrap().node, hk(2));
        }
        assert_eq!(m.choose(&WORK, 0.0, &[]).unwrap().node, hk(1));
    }

    #[test]
    fn never_routes_to_zero_scores_and_breaks_on_failures() {
        let mut m = map(2);
        m.set_verdict(&hk(0), 0.0, 0, 1);
        for _ in 0..10 {
            let t = m.choose(&WORK, 0.0, &[]).unwrap();
            assert_eq!(t.node, hk(1));
            m.cancelled(&t);
        }
        for at in 0..3 {
            let t = m.choose(&WORK, at as f64, &[]).unwrap();
            m.failed(&t, Failure::Error, at as f64);
        }
        assert_eq!(m.choose(&WORK, 10.0, &[]), None, "breaker open");
        // After the open period, exactly one trial goes out.
        let later = 10.0 + m.config().breaker_open_ms;
        let trial = m.choose(&WORK, later, &[]).unwrap();
        assert_eq!(trial.node, hk(1));
        assert_eq!(m.choose(&WORK, later, &[]), None, "one trial at a time");
        m.completed(&trial, &WORK, 100.0, 120.0, later);
        assert_eq!(m.node(&hk(1)).unwrap().breaker, Breaker::Closed);
        assert!(m.choose(&WORK, later, &[]).is_some());
    }

    #[test]
    fn a_node_back_from_a_failed_probe_takes_jobs_at_once() {
        let mut m = map(1);
        m.unreachable(&hk(0), 0.0);
        assert_eq!(m.choose(&WORK, 1.0, &[]), None);
        m.observe_rtt(&hk(0), 5.0, None, 2.0);
        let a = m.choose(&WORK, 2.0, &[]).expect("back");
        assert!(m.choose(&WORK, 2.0, &[]).is_some(), "not held to one trial");
        assert_eq!(m.node(&hk(0)).unwrap().breaker, Breaker::Closed);
        // Failures while it answers probes still open the breaker, and
        // then it takes one trial at a time.
        for at in 3..6 {
            m.failed(&a, Failure::Error, at as f64);
        }
        let later = 10.0 + m.config().breaker_open_ms;
        m.observe_rtt(&hk(0), 5.0, None, later);
        assert!(m.choose(&WORK, later, &[]).is_some());
        assert_eq!(m.choose(&WORK, later, &[]), None, "one trial at a time");
    }

    #[test]
    fn failed_audit_excludes_the_node() {
        let mut m = map(2);
        m.set_verdict(&hk(1), 0.0, 3, 1);
        for _ in 0..10 {
            let t = m.choose(&WORK, 0.0, &[]).unwrap();
            assert_eq!(t.node, hk(0));
            m.cancelled(&t);
        }
        assert_eq!(m.choose(&WORK, 0.0, &[hk(0)]), None);
    }

    fn load(jobs: u32) -> Option<Load> {
        Some(Load {
            jobs,
            slots: 1,
            capacity: 9,
            backlog_ms: None,
            ms_per_frame_step: None,
        })
    }

    /// Two measured nodes, equally near, one 10x faster.
    fn measured_pair() -> GridMap {
        let mut m = map(2);
        for (i, per) in [(0u8, 5.0), (1, 50.0)] {
            m.observe_rtt(&hk(i), 10.0, load(0), 0.0);
            let other = hk(1 - i);
            let t = m.choose(&WORK, 0.0, &[other]).unwrap();
            m.completed(&t, &WORK, per * 80.0, per * 80.0 + 10.0, 0.0);
        }
        m
    }

    #[test]
    fn other_gateways_jobs_are_priced_at_the_mix() {
        let mut m = measured_pair();
        // Node 0 reports 4 jobs, none of them ours: at the mix (these
        // 80 frame·steps jobs) and 5 ms per frame·step that is 1.6 s.
        m.observe_rtt(&hk(0), 10.0, load(4), 1_000.0);
        let p = m.predict(&hk(0), &WORK, 1_000.0).unwrap();
        assert!((p.wait_ms - 1_600.0).abs() < 1.0, "{p:?}");
        // Worked off as time passes.
        let p = m.predict(&hk(0), &WORK, 1_500.0).unwrap();
        assert!((p.wait_ms - 1_100.0).abs() < 1.0, "{p:?}");
        // A small job does not make the queue look small.
        let tiny = Work {
            frames: 1,
            steps: 1,
            ..WORK
        };
        let p = m.predict(&hk(0), &tiny, 1_000.0).unwrap();
        assert!((p.wait_ms - 1_600.0).abs() < 1.0, "{p:?}");
    }

    #[test]
    fn others_sending_between_reports_is_expected_to_continue() {
        let mut m = measured_pair();
        // Node 0's others' queue goes from 0 to 5 jobs (2 s of work) in
        // 2 s: they send about 1 ms of work per ms...
        m.observe_rtt(&hk(0), 10.0, load(0), 1_000.0);
        m.observe_rtt(&hk(0), 10.0, load(5), 3_000.0);
        let rate = m.node(&hk(0)).unwrap().foreign_rate;
        assert!(rate > 0.2 && rate <= 1.0, "{rate}");
        // ...so a second later the queue has not drained by a second.
        let p = m.predict(&hk(0), &WORK, 4_000.0).unwrap();
        assert!(p.wait_ms > 1_000.0 + 1.0, "{p:?}");
        // A report showing them gone brings the rate down.
        for t in 2..8 {
            m.observe_rtt(&hk(0), 10.0, load(0), t as f64 * 2_000.0);
        }
        assert!(m.node(&hk(0)).unwrap().foreign_rate < rate / 4.0);
    }

    #[test]
    fn a_request_may_queue_only_as_predicted_and_a_refusal_teaches_the_backlog() {
        let mut m = measured_pair();
        let t = m.choose(&WORK, 1_000.0, &[]).unwrap();
        assert_eq!(t.node, hk(0), "the fast node");
        // Idle as far as we know: at most the floor of queueing.
        let within = m.start_within_ms(&t, 0).unwrap();
        assert!((within - (t.predicted.wait_ms + START_WITHIN_MIN_MS)).abs() < 1e-9);
        // After enough refusals, any queue.
        let tries = m.config().start_within_tries;
        assert!(m.start_within_ms(&t, tries - 1).is_some());
        assert_eq!(m.start_within_ms(&t, tries), None);
        // It holds 10 s of others' work: the slow node (4 s) is sooner now.
        m.refused_late(&t, 10_000.0, 1_000.0);
        assert_eq!(m.node(&hk(0)).unwrap().inflight, 0, "settled");
        let p = m.predict(&hk(0), &WORK, 1_000.0).unwrap();
        assert!(p.wait_ms > 9_000.0, "{p:?}");
        assert_eq!(m.choose(&WORK, 1_000.0, &[]).unwrap().node, hk(1));
    }

    #[test]
    fn a_prover_s_own_speed_and_backlog_price_it_before_it_is_measured() {
        let mut m = map(2);
        let report = |backlog: f64, speed: f64| {
            Some(Load {
                jobs: 1,
                slots: 1,
                capacity: 9,
                backlog_ms: Some(backlog),
                ms_per_frame_step: Some(speed),
            })
        };
        m.observe_rtt(&hk(0), 10.0, report(0.0, 5.0), 0.0);
        m.observe_rtt(&hk(1), 10.0, report(0.0, 50.0), 0.0);
        let p = m.predict(&hk(0), &WORK, 0.0).unwrap();
        assert!((p.service_ms - 400.0).abs() < 1e-9, "{p:?}");
        assert_eq!(m.choose(&WORK, 0.0, &[]).map(|t| t.node), Some(hk(0)));
        // What it says it holds counts as waiting, whatever its job count.
        let mut m = map(2);
        m.observe_rtt(&hk(0), 10.0, report(3_000.0, 5.0), 0.0);
        m.observe_rtt(&hk(1), 10.0, report(0.0, 30.0), 0.0);
        assert_eq!(m.choose(&WORK, 0.0, &[]).map(|t| t.node), Some(hk(1)));
        // Its own measurement wins over its report.
        let t = m.choose(&WORK, 0.0, &[hk(1)]).unwrap();
        m.completed(&t, &WORK, 20.0 * 80.0, 20.0 * 80.0 + 10.0, 0.0);
        let p = m.predict(&hk(0), &WORK, 0.0).unwrap();
        assert!((p.service_ms - 1600.0).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn small_jobs_leave_the_fastest_nodes_to_big_ones() {
        const BIG: Work = Work {
            width: 128,
            height: 128,
            frames: 8,
            steps: 10,
        };
        // One fast node, nine a little slower, one slow.
        let mut m = map(11);
        let speeds = (0u8..11).map(|i| match i {
            0 => (i, 5.0),
            10 => (i, 50.0),
            _ => (i, 6.0 + i as f64 / 10.0),
        });
        for (i, speed) in speeds {
            m.observe_rtt(
                &hk(i),
                10.0,
                Some(Load {
                    jobs: 0,
                    slots: 1,
                    capacity: 9,
                    backlog_ms: Some(0.0),
                    ms_per_frame_step: Some(speed),
                }),
                0.0,
            );
        }
        // The mix is mostly big jobs.
        for _ in 0..20 {
            let t = m.choose(&BIG, 0.0, &[]).unwrap();
            assert_eq!(t.node, hk(0), "a big job takes the fastest");
            m.cancelled(&t);
        }
        // A smaller one takes one of the slightly slower nodes, never the
        // slow one.
        for _ in 0..20 {
            let t = m.choose(&WORK, 0.0, &[]).unwrap();
            assert!(t.node != hk(0) && t.node != hk(10), "{:?}", t.node);
            m.cancelled(&t);
        }
        // Without the slack it takes the fastest.
        let mut m = m.with_config(
            RouterConfig {
                small_job_slack: 0.0,
                near_best: 1.0,
                ..RouterConfig::default()
            },
            1,
        );
        assert_eq!(m.choose(&WORK, 0.0, &[]).unwrap().node, hk(0));
    }

    #[test]
    fn a_full_node_gets_nothing_until_a_probe_shows_room() {
        let mut m = measured_pair();
        m.observe_rtt(&hk(0), 10.0, load(9), 1_000.0);
        let t = m.choose(&WORK, 1_000.0, &[]).unwrap();
        assert_eq!(t.node, hk(1), "node 0 is full");
        m.cancelled(&t);
        m.observe_rtt(&hk(0), 10.0, load(0), 1_100.0);
        let t = m.choose(&WORK, 1_100.0, &[]).unwrap();
        assert_eq!(t.node, hk(0));
        // A busy answer marks it full again, without opening its breaker.
        m.failed(&t, Failure::Busy, 1_200.0);
        assert_eq!(m.node(&hk(0)).unwrap().breaker, Breaker::Closed);
        let t = m.choose(&WORK, 1_200.0, &[]).unwrap();
        assert_eq!(t.node, hk(1));
        m.cancelled(&t);
        // Our own jobs fill it too: nine in flight, the tenth goes elsewhere.
        m.observe_rtt(&hk(0), 10.0, load(0), 1_300.0);
        for _ in 0..9 {
            assert_eq!(m.choose(&WORK, 1_300.0, &[hk(1)]).unwrap().node, hk(0));
        }
        assert_eq!(
            m.choose(&WORK, 1_300.0, &[hk(1)]),
            None,
            "full: hold the job"
        );
    }

    #[test]
    fn hedges_only_use_idle_nodes() {
        let mut m = measured_pair();
        m.observe_rtt(&hk(1), 10.0, load(1), 1_000.0);
        assert_eq!(
            m.choose_hedge(&WORK, 1_000.0, &[hk(0)]),
            None,
            "node 1 has a job"
        );
        m.observe_rtt(&hk(1), 10.0, load(0), 1_000.0);
        assert_eq!(
            m.choose_hedge(&WORK, 1_000.0, &[hk(0)]).unwrap().node,
            hk(1)
        );
    }

    #[test]
    fn admission_sheds_only_past_the_bound() {
        let mut m = map(2);
        // Nothing known yet: accept (the queue's timeout decides).
        assert_eq!(m.admit(&WORK, 0.0, 100), Admission::Accept);
        let mut m2 = measured_pair();
        std::mem::swap(&mut m, &mut m2);
        assert_eq!(m.admit(&WORK, 0.0, 0), Admission::Accept);
        // Both full; the grid finishes these 80 frame·steps jobs at
        // 1/400 + 1/4000 per ms, so the 18 queued there and 700 held here
        // wait 261 s (under the 300 s bound), 1,000 held 371 s (over).
        m.observe_rtt(&hk(0), 10.0, load(9), 1_000.0);
        m.observe_rtt(&hk(1), 10.0, load(9), 1_000.0);
        assert_eq!(m.admit(&WORK, 1_000.0, 700), Admission::Accept);
        match m.admit(&WORK, 1_000.0, 1_000) {
            Admission::Shed { retry_after_s } => {
                assert!((360..=380).contains(&retry_after_s), "{retry_after_s}")
            }
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn speed_transfers_across_resolutions() {
        let mut m = map(1);
        let t = m.choose(&WORK, 0.0, &[]).unwrap();
        m.completed(&t, &WORK, 800.0, 800.0, 0.0);
        let big = Work {
            width: 128,
            height: 128,
            ..WORK
        };
        let p = m.predict(&hk(0), &big, 0.0).unwrap();
        assert!((p.service_ms - 3200.0).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let mut m = map(2);
        m.observe_rtt(
            &hk(0),
            12.0,
            Some(Load {
                jobs: 2,
                slots: 1,
                capacity: 9,
                backlog_ms: None,
                ms_per_frame_step: None,
            }),
            0.0,
        );
        let json = serde_json::to_string(&m).unwrap();
        let back: GridMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back.nodes.len(), 2);
        assert_eq!(back.node(&hk(0)).unwrap().reported_queue, 2);
        let snap = serde_json::to_value(m.snapshot(&WORK, 0.0)).unwrap();
        assert_eq!(snap["nodes"].as_array().unwrap().len(), 2);
    }
}
