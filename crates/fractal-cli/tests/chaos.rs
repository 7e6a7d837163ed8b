//! A short chaos run in the test suite (`scripts/chaos` runs the long one):
//! every role killed with SIGKILL at random moments under a job stream, one
//! prover behind a faulty link; nothing accepted may be lost or duplicated.

use serde_json::Value;

mod common;
use common::fractal;

#[test]
fn nothing_accepted_is_lost_or_duplicated_under_kill_9() {
    let out = fractal()
        .args([
            "bench",
            "chaos",
            "--duration-s",
            "45",
            "--kill-every-s",
            "4",
            "--seed",
            "7",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("{report:#}");
    assert!(out.status.success(), "{report:#}");
    assert!(report["accepted"].as_u64().unwrap() >= 5, "{report:#}");
    assert!(report["lost"].as_array().unwrap().is_empty());
    assert!(report["duplicated"].as_array().unwrap().is_empty());
    assert!(report["bad_videos"].as_array().unwrap().is_empty());
    let kills: u64 = report["kills"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(kills >= 3, "faults were injected: {report:#}");
    for (store, state) in report["stores"].as_object().unwrap() {
        assert_eq!(state, "ok", "{store}");
    }
    assert!(report["weights_resumed_at_block"].is_u64());
}
