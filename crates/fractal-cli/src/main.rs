//! `fractal`: one binary for every role in the grid.

mod bench_chaos;
mod bench_cmd;
mod bench_load;
mod bench_quality;
mod bench_routing;
#[cfg(feature = "cheats")]
mod bench_verify;
mod chain_cmd;
mod credentials_cmd;
mod gateway_cmd;
mod generate_cmd;
mod grid_cmd;
mod manifest_cmd;
mod model_cmd;
mod node_cmd;
mod wallet_cmd;
mod world_cmd;

use clap::{Parser, Subcommand};

/// Weights load as views of their files instead of copies (see
/// `fractal_engine::io::mapped`).
#[global_allocator]
static ALLOCATOR: fractal_engine::io::mapped::WeightsAllocator =
    fractal_engine::io::mapped::WeightsAllocator;

#[derive(Parser)]
#[command(
    name = "fractal",
    version,
    about = "Fractal: a homogeneous text-to-video inference grid on Bittensor"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `fractal_http=debug`.
    #[arg(
        long,
        global = true,
        env = "FRACTAL_LOG",
        default_value = "info,c2pa=warn"
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one video locally with the pinned model (or the built-in tiny one).
    Generate(generate_cmd::GenerateArgs),
    /// Benchmarks that report ratios against a reference measured in the same run.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
    /// Create, restore, list and inspect Bittensor-compatible wallets (sr25519 hot- and coldkeys).
    #[command(subcommand)]
    Wallet(wallet_cmd::WalletCmd),
    /// Model manifests: validate them, print their ids, publish them and
    /// schedule model upgrades on the chain (`publish`, `schedule`, `show`).
    #[command(subcommand)]
    Manifest(manifest_cmd::ManifestCmd),
    /// Work with model folders: export the built-in tiny model, hash weights.
    #[command(subcommand)]
    Model(model_cmd::ModelCmd),
    /// Run or inspect the chain (the embedded local subnet).
    #[command(subcommand)]
    Chain(chain_cmd::ChainCmd),
    /// Register a wallet's hotkey on the subnet (burned registration paid by the coldkey).
    Register(chain_cmd::KeyArgs),
    /// Stake TAO from a wallet's coldkey onto its hotkey.
    Stake(chain_cmd::StakeArgs),
    /// A whole local grid in one process: chain, provers (tiny model), verifier, gateway.
    Grid(grid_cmd::GridArgs),
    /// The app-facing gateway (OpenAI-compatible Videos API and web page), or its API keys.
    Gateway(gateway_cmd::GatewayArgs),
    /// Serve the pinned model to validators (a Bittensor miner).
    Prover(node_cmd::ProverArgs),
    /// Challenge and audit every prover, score them, set weights (a Bittensor validator).
    Verifier(node_cmd::VerifierArgs),
    /// Check a video's content credentials: its C2PA manifest, the validator
    /// hotkey's binding to the signing certificate, and (--chain) the permit.
    VerifyCredentials(credentials_cmd::VerifyCredentialsArgs),
    /// The toy video world a small model is trained on (tools/train).
    #[command(subcommand)]
    World(world_cmd::WorldCmd),
}

fn main() -> std::process::ExitCode {
    fractal_engine::prepare_process();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate_cmd::run(args),
        Command::Bench(cmd) => bench_cmd::run(cmd),
        Command::Wallet(cmd) => wallet_cmd::run(cmd),
        Command::Manifest(cmd) => manifest_cmd::run(cmd),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Chain(cmd) => chain_cmd::run(cmd),
        Command::Register(args) => chain_cmd::register(args),
        Command::Stake(args) => chain_cmd::stake(args),
        Command::Grid(args) => grid_cmd::run(args),
        Command::Gateway(args) => gateway_cmd::run(args),
        Command::Prover(args) => node_cmd::prover(args),
        Command::Verifier(args) => node_cmd::verifier(args),
        Command::VerifyCredentials(args) => credentials_cmd::run(args),
        Command::World(cmd) => world_cmd::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
