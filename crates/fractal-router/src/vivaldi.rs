//! Vivaldi network coordinates (Dabek et al., SIGCOMM 2004) in the variant
//! Serf and Consul use: a 2-D Euclidean position plus a non-negative
//! "height" for the access link, and a per-node error estimate that damps
//! updates from uncertain peers.
//!
//! Units are milliseconds of round-trip time. A node's coordinate moves a
//! little towards or away from a peer with every RTT sample, so the distance
//! between any two coordinates predicts their RTT without measuring every
//! pair.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Tuning constants; the defaults follow the paper and Serf.
#[derive(Clone, Copy, Debug)]
pub struct VivaldiConfig {
    /// Weight of one sample in the error estimate (paper's `c_e`).
    pub error_gain: f64,
    /// Fraction of the way a sample moves the coordinate (paper's `c_c`).
    pub step_gain: f64,
    /// Error never grows beyond this (a fresh node starts here).
    pub max_error: f64,
    /// Lower bound on the height, in ms.
    pub min_height: f64,
}

impl Default for VivaldiConfig {
    fn default() -> Self {
        VivaldiConfig {
            error_gain: 0.25,
            step_gain: 0.25,
            max_error: 1.5,
            min_height: 0.01,
        }
    }
}

/// Below this, distances and errors count as zero (avoids dividing by 0).
const EPSILON: f64 = 1e-6;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Coord {
    /// Position in ms.
    pub vec: [f64; 2],
    /// Access-link latency in ms, added to every distance.
    pub height: f64,
    /// Relative error estimate: 0 is certain, `max_error` knows nothing.
    pub error: f64,
}

impl Coord {
    pub fn origin(cfg: &VivaldiConfig) -> Self {
        Coord {
            vec: [0.0, 0.0],
            height: cfg.min_height,
            error: cfg.max_error,
        }
    }

    fn euclid(&self, other: &Coord) -> f64 {
        ((self.vec[0] - other.vec[0]).powi(2) + (self.vec[1] - other.vec[1]).powi(2)).sqrt()
    }

    /// Predicted RTT to `other`, in ms.
    pub fn distance(&self, other: &Coord) -> f64 {
        self.euclid(other) + self.height + other.height
    }

    pub fn is_finite(&self) -> bool {
        self.vec.iter().all(|v| v.is_finite()) && self.height.is_finite() && self.error.is_finite()
    }

    /// Moves this coordinate after measuring `rtt_ms` to a peer at `other`.
    /// `rng` only picks a direction when the two coordinates coincide.
    pub fn update(&mut self, other: &Coord, rtt_ms: f64, cfg: &VivaldiConfig, rng: &mut impl Rng) {
        if !rtt_ms.is_finite() || rtt_ms < 0.0 || !other.is_finite() {
            return;
        }
        let rtt = rtt_ms.max(EPSILON);
        let dist = self.distance(other);
        let wrongness = (dist - rtt).abs() / rtt;
        let total_error = (self.error + other.error).max(EPSILON);
        let weight = self.error / total_error;
        self.error = (cfg.error_gain * weight * wrongness
            + self.error * (1.0 - cfg.error_gain * weight))
            .min(cfg.max_error);
        let force = cfg.step_gain * weight * (rtt - dist);

        // Unit vector pointing from `other` to us; any direction if we coincide.
        let d = [self.vec[0] - other.vec[0], self.vec[1] - other.vec[1]];
        let mag = self.euclid(other);
        let unit = if mag > EPSILON {
            [d[0] / mag, d[1] / mag]
        } else {
            let angle = rng.gen_range(0.0..std::f64::consts::TAU);
            [angle.cos(), angle.sin()]
        };
        self.vec[0] += unit[0] * force;
        self.vec[1] += unit[1] * force;
        if mag > EPSILON {
            // The height takes its share of the correction, as the paper's
            // height-vector model does.
            self.height =
                ((self.height + other.height) * force / mag + self.height).max(cfg.min_height);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Points on a plane plus access delays: RTTs Vivaldi can embed exactly.
    fn true_rtt(a: ([f64; 2], f64), b: ([f64; 2], f64)) -> f64 {
        ((a.0[0] - b.0[0]).powi(2) + (a.0[1] - b.0[1]).powi(2)).sqrt() + a.1 + b.1
    }

    #[test]
    fn converges_on_an_embeddable_network() {
        let cfg = VivaldiConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let truth: Vec<([f64; 2], f64)> = (0..12)
            .map(|_| {
                (
                    [rng.gen_range(0.0..150.0), rng.gen_range(0.0..150.0)],
                    rng.gen_range(1.0..10.0),
                )
            })
            .collect();
        let mut coords = vec![Coord::origin(&cfg); truth.len()];
        for _ in 0..4000 {
            let i = rng.gen_range(0..truth.len());
            let j = rng.gen_range(0..truth.len());
            if i == j {
                continue;
            }
            let rtt = true_rtt(truth[i], truth[j]);
            let other = coords[j];
            coords[i].update(&other, rtt, &cfg, &mut rng);
        }
        let mut worst: f64 = 0.0;
        for i in 0..truth.len() {
            for j in 0..truth.len() {
                if i != j {
                    let rel = (coords[i].distance(&coords[j]) - true_rtt(truth[i], truth[j])).abs()
                        / true_rtt(truth[i], truth[j]);
                    worst = worst.max(rel);
                }
            }
        }
        assert!(worst < 0.15, "worst relative RTT error {worst}");
        assert!(
            coords.iter().all(|c| c.error < 0.2),
            "errors settle: {coords:?}"
        );
    }

    #[test]
    fn one_observer_learns_its_distances() {
        // The gateway's case: one node measures everyone; both ends move.
        let cfg = VivaldiConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let rtts = [5.0, 40.0, 90.0, 160.0, 280.0];
        let mut me = Coord::origin(&cfg);
        let mut peers = vec![Coord::origin(&cfg); rtts.len()];
        for round in 0..200 {
            for (p, rtt) in peers.iter_mut().zip(rtts) {
                let jitter = 1.0 + 0.05 * ((round % 7) as f64 - 3.0) / 3.0;
                let before = me;
                me.update(p, rtt * jitter, &cfg, &mut rng);
                p.update(&before, rtt * jitter, &cfg, &mut rng);
            }
        }
        for (p, rtt) in peers.iter().zip(rtts) {
            // Within 10%, or 1 ms for the shortest links (heights and the
            // jitter dominate there).
            let err = (me.distance(p) - rtt).abs();
            assert!(
                err < (0.1 * rtt).max(1.0),
                "predicted {} for {rtt}",
                me.distance(p)
            );
        }
    }

    #[test]
    fn garbage_samples_are_ignored() {
        let cfg = VivaldiConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut c = Coord::origin(&cfg);
        let o = Coord::origin(&cfg);
        for bad in [f64::NAN, f64::INFINITY, -5.0] {
            c.update(&o, bad, &cfg, &mut rng);
            assert_eq!(c, Coord::origin(&cfg));
        }
    }
}
