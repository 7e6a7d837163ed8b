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
}

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
    /// Jobs the node runs at once (from its info).
    pub concurrency: u32,
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
            concurrency: 1,
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

    fn service_ms(&self, work: &Work, fleet_prior: f64) -> f64 {
        let per = match self.ms_per_frame_step.get(&work.resolution()) {
            Some(ms) => *ms,
            // Not measured at this size: scale what we know by pixel count.
            None => self.normalised_speed().unwrap_or(fleet_prior) * work.pixels() / REF_PIXELS,
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
    #[serde(skip, default = "default_config")]
    cfg: RouterConfig,
    #[serde(skip, default = "default_rng")]
    rng: StdRng,
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
    /// Vivaldi coordinates. `queue` is what the node reported, if anything.
    pub fn observe_rtt(
        &mut self,
        hk: &Hotkey,
        rtt_ms: f64,
        queue: Option<(u32, u32)>,
        now_ms: f64,
    ) {
        let Some(n) = self.nodes.get_mut(hk) else {
            return;
        };
        if !(rtt_ms.is_finite() && rtt_ms >= 0.0) {
            return;
        }
        n.rtt_samples.push_back(rtt_ms);
        while n.rtt_samples.len() > self.cfg.rtt_window {
            n.rtt_samples.pop_front();
        }
        if n.probe_down {
            n.probe_down = false;
            if let Breaker::Open { .. } = n.breaker {
                n.breaker = Breaker::HalfOpen { probing: false };
            }
        }
        if let Some((queue, concurrency)) = queue {
            n.reported_queue = queue;
            n.reported_at_ms = now_ms;
            n.concurrency = concurrency.max(1);
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
        let speeds: Vec<f64> = self
            .nodes
            .values()
            .filter_map(NodeState::normalised_speed)
            .collect();
        percentile(speeds, 0.5).unwrap_or(self.cfg.prior_ms_per_frame_step)
    }

    fn predict_with(&self, n: &NodeState, work: &Work, prior: f64, now_ms: f64) -> Prediction {
        let rtt_ms = if n.rtt_samples.is_empty() {
            // Never probed: assume the fleet's typical distance.
            self.fleet_rtt()
        } else {
            self.me.distance(&n.coord)
        };
        let service_ms = n.service_ms(work, prior);
        // Our own requests there, or what the node last said it holds
        // (which includes other gateways' jobs), whichever is more.
        let ours = if n.inflight == 0 {
            0.0
        } else {
            (n.free_at_ms - (now_ms + rtt_ms / 2.0)).max(0.0)
        };
        let reported = (n.reported_queue as f64 * service_ms / n.concurrency.max(1) as f64
            - (now_ms - n.reported_at_ms))
            .max(0.0);
        let wait_ms = ours.max(reported) + n.extra_wait_ms;
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

    /// Picks the node with the lowest predicted completion time (power of
    /// two choices among the near-best), skipping `exclude`, and counts the
    /// request as in flight there. `None` when no node is eligible.
    pub fn choose(&mut self, work: &Work, now_ms: f64, exclude: &[Hotkey]) -> Option<Ticket> {
        let prior = self.fleet_prior();
        let mut cands: Vec<(Hotkey, Prediction)> = self
            .nodes
            .values()
            .filter(|n| !exclude.contains(&n.hotkey) && self.eligible(n, now_ms))
            .map(|n| (n.hotkey, self.predict_with(n, work, prior, now_ms)))
            .collect();
        let best = cands
            .iter()
            .map(|c| c.1.total_ms)
            .fold(f64::INFINITY, f64::min);
        if !best.is_finite() {
            return None;
        }
        cands.retain(|c| c.1.total_ms <= best * self.cfg.near_best + 1.0);
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
        if work.frame_steps() > 0.0 && service_ms.is_finite() && service_ms >= 0.0 {
            let per = service_ms / work.frame_steps();
            let e = n.ms_per_frame_step.entry(work.resolution()).or_insert(per);
            *e += alpha * (per - *e);
        }
        let rtt = percentile(n.rtt_samples.iter().copied().collect(), 0.5).unwrap_or(0.0);
        let unexplained = (total_ms - service_ms - rtt - t.predicted.wait_ms).max(0.0);
        if unexplained.is_finite() {
            n.extra_wait_ms += alpha * (unexplained - n.extra_wait_ms);
        }
    }

    /// The request of `t` failed; enough in a row opens the node's breaker.
    pub fn failed(&mut self, t: &Ticket, why: Failure, now_ms: f64) {
        let alpha = self.cfg.ema_alpha;
        let (threshold, open_ms) = (self.cfg.breaker_failures, self.cfg.breaker_open_ms);
        let Some(n) = self.settle(t) else {
            return;
        };
        match why {
            Failure::Busy => {
                // Saturated, not broken: leave the breaker alone, but expect
                // a queue there until a probe says otherwise.
                n.reported_queue = n.reported_queue.max(n.concurrency * 4);
                n.reported_at_ms = now_ms;
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
    fn a_node_back_from_a_failed_probe_gets_a_trial_at_once() {
        let mut m = map(1);
        m.unreachable(&hk(0), 0.0);
        assert_eq!(m.choose(&WORK, 1.0, &[]), None);
        m.observe_rtt(&hk(0), 5.0, None, 2.0);
        let trial = m.choose(&WORK, 2.0, &[]).expect("one trial");
        assert_eq!(m.choose(&WORK, 2.0, &[]), None, "only one until it answers");
        m.completed(&trial, &WORK, 100.0, 110.0, 3.0);
        assert_eq!(m.node(&hk(0)).unwrap().breaker, Breaker::Closed);
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
        m.observe_rtt(&hk(0), 12.0, Some((2, 1)), 0.0);
        let json = serde_json::to_string(&m).unwrap();
        let back: GridMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back.nodes.len(), 2);
        assert_eq!(back.node(&hk(0)).unwrap().reported_queue, 2);
        let snap = serde_json::to_value(m.snapshot(&WORK, 0.0)).unwrap();
        assert_eq!(snap["nodes"].as_array().unwrap().len(), 2);
    }
}
