use fractal_router::sim::{simulate, Policy, SimConfig, Trace};
use fractal_router::RouterConfig;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let loads: Vec<f64> = args
        .get(1)
        .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![0.3, 0.5, 0.7, 0.85]);
    let gws: Vec<usize> = args
        .get(2)
        .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![1, 16]);
    let pols: Vec<Policy> = match args.get(3).map(|s| s.as_str()) {
        Some("all") => Policy::ALL.to_vec(),
        _ => vec![Policy::Oracle, Policy::Fractal],
    };
    for &g in &gws {
        for &l in &loads {
            let t0 = std::time::Instant::now();
            let trace = Trace::generate(&SimConfig {
                load: l,
                gateways: g,
                ..SimConfig::default()
            });
            let rs: Vec<_> = pols.iter().map(|&p| simulate(&trace, p, cfg())).collect();
            let o = rs
                .iter()
                .find(|r| r.policy == Policy::Oracle)
                .unwrap()
                .p95_ms;
            for r in &rs {
                println!("G={g:2} load={l:.2} {}  x{:.3}", r.summary(), r.p95_ms / o);
            }
            println!("  ({:.1} s)", t0.elapsed().as_secs_f64());
        }
    }
}

fn cfg() -> RouterConfig {
    let mut c = RouterConfig::default();
    let f = |k: &str| std::env::var(k).ok().map(|v| v.parse::<f64>().unwrap());
    if let Some(v) = f("NEAR") {
        c.near_best = v;
    }
    if let Some(v) = f("HEDGE") {
        c.hedge_factor = v;
    }
    if let Some(v) = f("ALPHA") {
        c.ema_alpha = v;
    }
    if let Some(v) = f("SHED") {
        c.shed_wait_ms = v;
    }
    c
}
