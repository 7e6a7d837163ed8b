//! Writes every fuzz target's seed inputs under the folder given (one
//! subfolder per target), for `scripts/fuzz`.

fn main() {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: fuzz-seeds OUT_DIR");
        std::process::exit(2);
    };
    let out = std::path::PathBuf::from(out);
    for (target, _) in fractal_fuzz::TARGETS {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus folder");
        for (i, seed) in fractal_fuzz::seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).expect("write seed");
        }
    }
}
