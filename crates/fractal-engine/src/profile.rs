//! Where the time goes: per-stage wall time of the UNet, switched on by
//! `FRACTAL_PROFILE=1` (then `fractal generate` and `bench engine` print a
//! table to stderr).
//!
//! Times are *exclusive*: a stage's own time, without the stages nested in it,
//! so the column sums to the time spent inside profiled stages. CPU tensor
//! ops are synchronous, so wall time around a call is that call's cost; on
//! CUDA kernels run asynchronously and the figures mean little. Off by default
//! it costs one relaxed atomic load per stage.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether `FRACTAL_PROFILE` asks for profiling (read once).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = std::env::var("FRACTAL_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

thread_local! {
    /// Time spent in nested stages, one entry per open stage on this thread.
    static NESTED: RefCell<Vec<Duration>> = const { RefCell::new(Vec::new()) };
}

/// Exclusive time and calls per stage, from every thread: the model runs on
/// rayon's workers, not on the thread that asks for the report.
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// An open stage; its time is booked when it is dropped.
pub struct Stage {
    open: Option<(&'static str, Instant)>,
}

/// Opens a stage named `name` on this thread.
pub fn stage(name: &'static str) -> Stage {
    if !enabled() {
        return Stage { open: None };
    }
    NESTED.with(|n| n.borrow_mut().push(Duration::ZERO));
    Stage {
        open: Some((name, Instant::now())),
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let Some((name, start)) = self.open.take() else {
            return;
        };
        let total = start.elapsed();
        let nested = NESTED.with(|n| {
            let mut n = n.borrow_mut();
            let nested = n.pop().unwrap_or_default();
            if let Some(parent) = n.last_mut() {
                *parent += total;
            }
            nested
        });
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let e = totals.entry(name).or_default();
        e.0 += total.saturating_sub(nested);
        e.1 += 1;
    }
}

/// Runs `f` as the stage `name`.
pub fn time<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let _s = stage(name);
    f()
}

/// The table of all threads' stages since the last report, slowest first,
/// and clears it. `None` when profiling is off or nothing was timed.
pub fn take_report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let totals = std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()));
    if totals.is_empty() {
        return None;
    }
    let sum: Duration = totals.values().map(|(d, _)| *d).sum();
    let mut rows: Vec<_> = totals.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
    let mut out = format!(
        "{:<24} {:>10} {:>7} {:>8}\n",
        "stage", "ms", "share", "calls"
    );
    for (name, (d, n)) in rows {
        out += &format!(
            "{:<24} {:>10.1} {:>6.1}% {:>8}\n",
            name,
            d.as_secs_f64() * 1e3,
            100.0 * d.as_secs_f64() / sum.as_secs_f64().max(1e-12),
            n
        );
    }
    out += &format!("{:<24} {:>10.1}\n", "total", sum.as_secs_f64() * 1e3);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column `col` of `name`'s row (1: ms, 3: calls).
    fn cell(report: &str, name: &str, col: usize) -> f64 {
        let line = report.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(col).unwrap().parse().unwrap()
    }

    #[test]
    fn nested_time_is_not_counted_twice() {
        STATE.store(ON, Ordering::Relaxed);
        {
            let _outer = stage("test.outer");
            std::thread::sleep(Duration::from_millis(20));
            time("test.inner", || {
                std::thread::sleep(Duration::from_millis(30))
            });
        }
        let report = take_report().unwrap();
        assert!(cell(&report, "test.inner", 1) >= 30.0, "{report}");
        // Counted twice, outer would be at least 50 ms.
        let outer = cell(&report, "test.outer", 1);
        assert!((20.0..50.0).contains(&outer), "{report}");

        // A stage on another thread (a rayon worker) lands in the same table,
        // and does not nest in this thread's open stage.
        {
            let _outer = stage("test.outer");
            std::thread::scope(|s| {
                s.spawn(|| {
                    time("test.inner", || {
                        std::thread::sleep(Duration::from_millis(30))
                    })
                });
            });
        }
        let report = take_report().unwrap();
        assert_eq!(
            cell(&report, "test.inner", 3),
            1.0,
            "the report clears the table: {report}"
        );
        assert!(cell(&report, "test.outer", 1) >= 30.0, "{report}");
    }
}
