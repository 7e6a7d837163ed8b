//! What a prover holds, priced in time: each accepted job's size, its
//! measured speed, and so how long a new job would wait before it starts.
//! Gateways read it from `/v1/info` and bound a request's queueing with
//! `start_within_ms` against it (the router's `start_within_ms`).

use std::collections::BTreeMap;
use std::time::Instant;

use fractal_protocol::JobId;

/// Weight of the newest job in the speed's moving average.
const SPEED_ALPHA: f64 = 0.3;

/// A job's size in frame·steps at 64x64, the unit speeds are kept in.
pub fn units(width: u32, height: u32, frames: u32, steps: u32) -> f64 {
    width as f64 * height as f64 / 4096.0 * frames as f64 * steps as f64
}

#[derive(Debug)]
struct Held {
    units: f64,
    started: Option<Instant>,
}

#[derive(Debug)]
pub struct Backlog {
    slots: usize,
    jobs: BTreeMap<JobId, Held>,
    /// Moving average of ms per frame·step at 64x64 over finished jobs.
    speed: Option<f64>,
}

impl Backlog {
    pub fn new(slots: usize) -> Self {
        Backlog {
            slots: slots.max(1),
            jobs: BTreeMap::new(),
            speed: None,
        }
    }

    /// Measured speed, ms per frame·step at 64x64; `None` before the
    /// first finished job.
    pub fn speed(&self) -> Option<f64> {
        self.speed
    }

    /// The work held per slot at `now`, ms: what the running jobs have
    /// left (at least nothing) and the queued ones, at the measured speed.
    /// `None` while the speed is unknown.
    pub fn ms(&self, now: Instant) -> Option<f64> {
        let speed = self.speed?;
        let total: f64 = self
            .jobs
            .values()
            .map(|h| {
                let ms = h.units * speed;
                match h.started {
                    Some(t) => (ms - now.duration_since(t).as_secs_f64() * 1000.0).max(0.0),
                    None => ms,
                }
            })
            .sum();
        Some(total / self.slots as f64)
    }

    pub fn accept(&mut self, job: JobId, units: f64) {
        self.jobs.insert(
            job,
            Held {
                units,
                started: None,
            },
        );
    }

    pub fn start(&mut self, job: &JobId, now: Instant) {
        if let Some(h) = self.jobs.get_mut(job) {
            h.started = Some(now);
        }
    }

    /// The job left (finished, failed or cancelled); `service_ms` is what
    /// it took when it ran to the end, to learn the speed from.
    pub fn finish(&mut self, job: &JobId, service_ms: Option<f64>) {
        let Some(h) = self.jobs.remove(job) else {
            return;
        };
        if let Some(ms) = service_ms.filter(|ms| ms.is_finite() && *ms >= 0.0 && h.units > 0.0) {
            let per = ms / h.units;
            self.speed = Some(match self.speed {
                Some(s) => s + SPEED_ALPHA * (per - s),
                None => per,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(b: u8) -> JobId {
        JobId([b; 16])
    }

    #[test]
    fn prices_what_is_held_at_the_measured_speed() {
        let mut b = Backlog::new(1);
        let t0 = Instant::now();
        b.accept(id(1), 10.0);
        assert_eq!(b.ms(t0), None, "no speed before a job finished");
        b.finish(&id(1), Some(200.0));
        assert_eq!(b.speed(), Some(20.0));
        b.accept(id(2), 10.0);
        b.accept(id(3), 5.0);
        b.start(&id(2), t0);
        // 10 units at 20 ms, 50 ms of it done, plus 5 queued units.
        let ms = b.ms(t0 + Duration::from_millis(50)).unwrap();
        assert!((ms - (150.0 + 100.0)).abs() < 1e-6, "{ms}");
        // A running job past its estimate counts as nothing left.
        let ms = b.ms(t0 + Duration::from_secs(5)).unwrap();
        assert!((ms - 100.0).abs() < 1e-6, "{ms}");
        // A cancelled job leaves without teaching the speed.
        b.finish(&id(3), None);
        assert_eq!(b.speed(), Some(20.0));
    }

    #[test]
    fn spreads_the_work_over_its_slots() {
        let mut b = Backlog::new(2);
        b.accept(id(1), 1.0);
        b.finish(&id(1), Some(10.0));
        b.accept(id(2), 4.0);
        assert_eq!(b.ms(Instant::now()), Some(20.0));
    }
}
