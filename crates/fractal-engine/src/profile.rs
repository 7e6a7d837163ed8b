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

#[derive(Default)]
struct Book {
    /// Time spent in nested stages, one entry per open stage.
    nested: Vec<Duration>,
    totals: BTreeMap<&'static str, (Duration, u64)>,
}

thread_local! {
    static BOOK: RefCell<Book> = RefCell::new(Book::default());
}

/// An open stage; its time is booked when it is dropped.
pub struct Stage {
    open: Option<(&'static str, Instant)>,
}

/// Opens a stage named `name` on this thread.
pub fn stage(name: &'static str) -> Stage {
    if !enabled() {
        return Stage { open: None };
    }
    BOOK.with(|b| b.borrow_mut().nested.push(Duration::ZERO));
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
        BOOK.with(|b| {
            let mut b = b.borrow_mut();
            let nested = b.nested.pop().unwrap_or_default();
            if let Some(parent) = b.nested.last_mut() {
                *parent += total;
            }
            let e = b.totals.entry(name).or_default();
            e.0 += total.saturating_sub(nested);
            e.1 += 1;
        });
    }
}

/// Runs `f` as the stage `name`.
pub fn time<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let _s = stage(name);
    f()
}

/// The table of this thread's stages since the last report, slowest first,
/// and clears it. `None` when profiling is off or nothing was timed.
pub fn take_report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let totals = BOOK.with(|b| std::mem::take(&mut b.borrow_mut().totals));
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

    #[test]
    fn nested_time_is_not_counted_twice() {
        STATE.store(ON, Ordering::Relaxed);
        {
            let _outer = stage("outer");
            std::thread::sleep(Duration::from_millis(20));
            time("inner", || std::thread::sleep(Duration::from_millis(30)));
        }
        let report = take_report().unwrap();
        let ms = |name: &str| -> f64 {
            let line = report.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        assert!(ms("inner") >= 30.0, "{report}");
        // Counted twice, outer would be at least 50 ms.
        assert!(ms("outer") >= 20.0 && ms("outer") < 50.0, "{report}");
        assert!(take_report().is_none(), "the report clears the book");
    }
}
