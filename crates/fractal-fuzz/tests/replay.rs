//! The fuzz harnesses in the ordinary test suite: every seed is accepted
//! (so the fuzzers start from inputs that reach deep into each parser),
//! every committed crash input (`fuzz/regressions/<target>/`) runs without
//! a panic, and deterministic truncations and byte flips of each seed are
//! handled without one.

use std::path::PathBuf;

fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

#[test]
fn seeds_are_accepted() {
    for (target, harness) in fractal_fuzz::TARGETS {
        let seeds = fractal_fuzz::seeds(target);
        assert!(!seeds.is_empty(), "{target} has seeds");
        for (i, seed) in seeds.iter().enumerate() {
            assert!(harness(seed), "{target} seed {i} is accepted");
        }
    }
}

#[test]
fn committed_crash_inputs_no_longer_crash() {
    for (target, harness) in fractal_fuzz::TARGETS {
        for (path, data) in regressions(target) {
            eprintln!("replaying {}", path.display());
            harness(&data);
        }
    }
}

#[test]
fn truncated_and_flipped_seeds_do_not_panic() {
    for (target, harness) in fractal_fuzz::TARGETS {
        for seed in fractal_fuzz::seeds(target) {
            // Up to ~40 cut points and ~40 flipped bytes per seed: enough to
            // cross every field boundary of the small seeds, cheap for the
            // big ones (model folders, weights).
            let stride = (seed.len() / 40).max(1);
            for cut in (0..seed.len()).step_by(stride) {
                harness(&seed[..cut]);
            }
            for at in (0..seed.len()).step_by(stride) {
                let mut v = seed.clone();
                v[at] ^= 0x5a;
                harness(&v);
            }
        }
    }
}
