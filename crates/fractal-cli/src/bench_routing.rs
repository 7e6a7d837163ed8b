//! `fractal bench routing`: every routing policy on the same simulated
//! grids, at several loads and with 1 to many independent gateways
//! (DESIGN.md section 9 and issue 19: p95 within 1.10x of an oracle, at
//! least 3x better than random), and what happens past saturation.

use std::path::PathBuf;

use clap::Args;
use fractal_router::sim::{
    cdf_svg, human_ms, ratio_svg, simulate, Policy, SimConfig, SimResult, Trace,
};
use fractal_router::RouterConfig;
use rayon::prelude::*;
use serde::Serialize;

#[derive(Args)]
pub struct RoutingBench {
    #[arg(long, default_value_t = 256)]
    provers: usize,
    /// Simulated seconds of arrivals.
    #[arg(long, default_value_t = 1200.0)]
    duration_s: f64,
    /// Mean offered loads as a share of the grid's capacity (bursts double
    /// them), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0.3, 0.5, 0.7, 0.85])]
    loads: Vec<f64>,
    /// Numbers of independent gateways sharing the provers, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16])]
    gateways: Vec<usize>,
    /// A load past saturation, run with and without shedding (0: skip).
    #[arg(long, default_value_t = 1.2)]
    saturated_load: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to write the plots (SVG): the p95 ratios by load, and next to
    /// it (`-cdf` before the extension) the latency CDFs at the heaviest
    /// configuration.
    #[arg(long, default_value = "routing.svg")]
    plot: PathBuf,
    /// Also write every result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Every policy on one (load, gateways) configuration.
#[derive(Serialize)]
pub struct Row {
    pub load: f64,
    pub gateways: usize,
    pub jobs: usize,
    pub results: Vec<SimResult>,
}

impl Row {
    pub fn get(&self, p: Policy) -> &SimResult {
        self.results
            .iter()
            .find(|r| r.policy == p)
            .expect("every policy ran")
    }
    /// Fractal's p95 over the oracle's.
    pub fn vs_oracle(&self) -> f64 {
        self.get(Policy::Fractal).p95_ms / self.get(Policy::Oracle).p95_ms
    }
    /// Fractal's p95 over the informed policy's (the oracle without the
    /// per-run dice).
    pub fn vs_informed(&self) -> f64 {
        self.get(Policy::Fractal).p95_ms / self.get(Policy::Informed).p95_ms
    }
    /// Random's p95 over Fractal's.
    pub fn vs_random(&self) -> f64 {
        self.get(Policy::Random).p95_ms / self.get(Policy::Fractal).p95_ms
    }
}

/// Past saturation: our router shedding (the default) or queueing
/// everything, against the oracle (which queues).
#[derive(Serialize)]
struct Saturation {
    load: f64,
    gateways: usize,
    shedding: SimResult,
    queueing: SimResult,
    oracle: SimResult,
}

#[derive(Serialize)]
struct Report<'a> {
    config: &'a SimConfig,
    router: String,
    rows: &'a [Row],
    saturation: &'a [Saturation],
}

pub fn run(b: RoutingBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.provers > 0, "--provers must be at least 1");
    anyhow::ensure!(
        b.loads.iter().all(|&l| l > 0.0 && l < 1.0),
        "--loads must each be in (0, 1); past saturation is --saturated-load"
    );
    anyhow::ensure!(
        b.saturated_load == 0.0 || (1.0..=4.0).contains(&b.saturated_load),
        "--saturated-load must be 0 (skip) or in [1, 4]"
    );
    anyhow::ensure!(
        !b.gateways.is_empty() && b.gateways.iter().all(|&g| (1..=256).contains(&g)),
        "--gateways must each be in 1..=256"
    );
    anyhow::ensure!(b.duration_s >= 60.0, "--duration-s must be at least 60");
    let base = SimConfig {
        provers: b.provers,
        duration_s: b.duration_s,
        seed: b.seed,
        ..SimConfig::default()
    };
    eprintln!(
        "simulating {} provers (speed spread {}x, regions {:?} ms apart, queues of {}, outages) for {} s, loads {:?} (bursts 2x), gateways {:?}, seed {}",
        base.provers,
        base.speed_spread,
        base.region_rtt_ms,
        base.prover_capacity,
        base.duration_s,
        b.loads,
        b.gateways,
        base.seed
    );
    let configs: Vec<(f64, usize)> = b
        .gateways
        .iter()
        .flat_map(|&g| b.loads.iter().map(move |&l| (l, g)))
        .collect();
    let rows: Vec<Row> = configs
        .par_iter()
        .map(|&(load, gateways)| {
            let trace = Trace::generate(&SimConfig {
                load,
                gateways,
                ..base.clone()
            });
            let results: Vec<SimResult> = Policy::ALL
                .iter()
                .map(|&p| simulate(&trace, p, RouterConfig::default()))
                .collect();
            let row = Row {
                load,
                gateways,
                jobs: trace.jobs(),
                results,
            };
            eprintln!(
                "  load {load:.2}, {gateways:>2} gateways: fractal p95 {} = {:.3}x the oracle's, {:.3}x the informed policy's; random's {:.1}x ours",
                human_ms(row.get(Policy::Fractal).p95_ms),
                row.vs_oracle(),
                row.vs_informed(),
                row.vs_random()
            );
            row
        })
        .collect();

    println!("\n| load | gateways | oracle p50 / p95 / p99 | fractal p50 / p95 / p99 | fractal ÷ oracle (p95) | fractal ÷ informed (p95) | fractal ÷ oracle (p50) | random ÷ fractal (p95) | least-loaded ÷ oracle (p95) | failed (fractal / oracle / least-loaded) | hedges | busy answers | queue-too-long answers |");
    println!("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let s = |ms: f64| format!("{:.1}", ms / 1000.0);
    for r in &rows {
        let (o, f) = (r.get(Policy::Oracle), r.get(Policy::Fractal));
        println!(
            "| {:.2} | {} | {} / {} / {} s | {} / {} / {} s | **{:.3}x** | {:.3}x | {:.2}x | {:.1}x | {:.2}x | {} / {} / {} | {} | {} | {} |",
            r.load,
            r.gateways,
            s(o.p50_ms),
            s(o.p95_ms),
            s(o.p99_ms),
            s(f.p50_ms),
            s(f.p95_ms),
            s(f.p99_ms),
            r.vs_oracle(),
            r.vs_informed(),
            f.p50_ms / o.p50_ms,
            r.vs_random(),
            r.get(Policy::LeastLoaded).p95_ms / o.p95_ms,
            f.failed,
            o.failed,
            r.get(Policy::LeastLoaded).failed,
            f.hedges,
            f.busy,
            f.late
        );
    }
    let worst = rows.iter().map(Row::vs_oracle).fold(0.0f64, f64::max);
    let least_vs_random = rows
        .iter()
        .map(Row::vs_random)
        .fold(f64::INFINITY, f64::min);
    let worst_informed = rows.iter().map(Row::vs_informed).fold(0.0f64, f64::max);
    println!(
        "\nworst fractal p95 = {worst:.3}x the oracle's (target <= 1.10), {worst_informed:.3}x the informed policy's; random's p95 is at least {least_vs_random:.1}x fractal's (target >= 3)"
    );

    let mut saturation = Vec::new();
    if b.saturated_load > 0.0 {
        let mut sat_gateways = vec![1usize, *b.gateways.iter().max().expect("not empty")];
        sat_gateways.dedup();
        saturation = sat_gateways
            .par_iter()
            .map(|&gateways| {
                let trace = Trace::generate(&SimConfig {
                    load: b.saturated_load,
                    gateways,
                    ..base.clone()
                });
                let queue_all = RouterConfig {
                    shed_wait_ms: f64::INFINITY,
                    ..RouterConfig::default()
                };
                Saturation {
                    load: b.saturated_load,
                    gateways,
                    shedding: simulate(&trace, Policy::Fractal, RouterConfig::default()),
                    queueing: simulate(&trace, Policy::Fractal, queue_all),
                    oracle: simulate(&trace, Policy::Oracle, RouterConfig::default()),
                }
            })
            .collect();
        println!(
            "\nPast saturation (load {:.2}, bursts {:.1}x capacity; shedding refuses a job whose predicted wait exceeds {} with 429 and Retry-After):\n",
            b.saturated_load,
            2.0 * b.saturated_load,
            human_ms(RouterConfig::default().shed_wait_ms)
        );
        println!(
            "| gateways | policy | jobs | completed | shed (429) | failed | p50 | p95 | p99 |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for sat in &saturation {
            for (name, r) in [
                ("fractal, shedding", &sat.shedding),
                ("fractal, queueing", &sat.queueing),
                ("oracle (queues)", &sat.oracle),
            ] {
                println!(
                    "| {} | {name} | {} | {} | {} | {} | {} s | {} s | {} s |",
                    sat.gateways,
                    r.jobs,
                    r.completed,
                    r.shed,
                    r.failed,
                    s(r.p50_ms),
                    s(r.p95_ms),
                    s(r.p99_ms)
                );
            }
        }
    }

    std::fs::write(
        &b.plot,
        ratio_svg(
            &rows
                .iter()
                .map(|r| (r.load, r.gateways, r.results.as_slice()))
                .collect::<Vec<_>>(),
        ),
    )?;
    let heaviest = rows
        .iter()
        .max_by(|a, b| {
            (a.load, a.gateways)
                .partial_cmp(&(b.load, b.gateways))
                .expect("finite")
        })
        .expect("at least one configuration");
    let cdf = b.plot.with_file_name(format!(
        "{}-cdf.svg",
        b.plot.file_stem().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(
        &cdf,
        cdf_svg(
            &heaviest.results,
            &format!(
                "Job latency CDF by policy (load {:.2}, {} gateways)",
                heaviest.load, heaviest.gateways
            ),
        ),
    )?;
    eprintln!("plots: {} and {}", b.plot.display(), cdf.display());
    if let Some(path) = &b.json {
        let report = Report {
            config: &base,
            router: format!("{:?}", RouterConfig::default()),
            rows: &rows,
            saturation: &saturation,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
