//! `fractal bench routing`: every routing policy on the same simulated
//! grid (DESIGN.md section 9: p95 within 1.15x of an oracle, at least 3x
//! better than random).

use std::path::PathBuf;

use clap::Args;
use fractal_router::sim::{cdf_svg, simulate, Policy, SimConfig, SimResult, Trace};
use fractal_router::RouterConfig;

#[derive(Args)]
pub struct RoutingBench {
    #[arg(long, default_value_t = 256)]
    provers: usize,
    /// Simulated seconds of arrivals.
    #[arg(long, default_value_t = 1200.0)]
    duration_s: f64,
    /// Mean offered load as a share of the grid's capacity (bursts double it).
    #[arg(long, default_value_t = 0.5)]
    load: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to write the latency plot (SVG).
    #[arg(long, default_value = "routing.svg")]
    plot: PathBuf,
    /// Also write the table as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(b: RoutingBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.provers > 0, "--provers must be at least 1");
    anyhow::ensure!(b.load > 0.0 && b.load < 1.0, "--load must be in (0, 1)");
    let cfg = SimConfig {
        provers: b.provers,
        duration_s: b.duration_s,
        load: b.load,
        seed: b.seed,
        ..SimConfig::default()
    };
    let trace = Trace::generate(&cfg);
    eprintln!(
        "simulating {} provers (speed spread {}x, RTT {:?} ms by region, outages), {} jobs over {} s at {:.0}% mean load (bursts 2x), seed {}",
        cfg.provers,
        cfg.speed_spread,
        cfg.region_rtt_ms,
        trace.jobs(),
        cfg.duration_s,
        cfg.load * 100.0,
        cfg.seed
    );
    let results: Vec<SimResult> = Policy::ALL
        .iter()
        .map(|&p| {
            let r = simulate(&trace, p, RouterConfig::default());
            eprintln!("  {}", r.summary());
            r
        })
        .collect();
    let get = |p| {
        results
            .iter()
            .find(|r| r.policy == p)
            .expect("every policy ran")
    };
    let (ours, oracle, random) = (
        get(Policy::Fractal),
        get(Policy::Oracle),
        get(Policy::Random),
    );
    println!("\n| policy | p50 | p95 | p99 | failed | retries | hedges |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {:.2} s | {:.2} s | {:.2} s | {} | {} | {} |",
            r.policy.name(),
            r.p50_ms / 1000.0,
            r.p95_ms / 1000.0,
            r.p99_ms / 1000.0,
            r.failed,
            r.retries,
            r.hedges
        );
    }
    let vs_oracle = ours.p95_ms / oracle.p95_ms;
    let vs_random = random.p95_ms / ours.p95_ms;
    println!(
        "\nfractal p95 = {vs_oracle:.3}x the oracle's (target <= 1.15), random's p95 = {vs_random:.1}x fractal's (target >= 3)"
    );
    std::fs::write(&b.plot, cdf_svg(&results))?;
    eprintln!("plot: {}", b.plot.display());
    if let Some(path) = &b.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}
