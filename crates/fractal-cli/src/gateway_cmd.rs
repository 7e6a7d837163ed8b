//! `fractal gateway`: the app-facing API and web page, and its API keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use fractal_gateway::db::{Db, KeyLimits};
use fractal_gateway::{Gateway, GatewayConfig};
use fractal_verifier::{Verifier, VerifierConfig};

use crate::chain_cmd::{fractal_home, runtime, shutdown_signal, ChainUrl};
use crate::node_cmd::{connect_registered, ModelArgs, NodeKey};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GatewayArgs {
    #[command(subcommand)]
    keys: Option<GatewaySub>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum GatewaySub {
    /// Manage the gateway's API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
}

#[derive(Args, Clone)]
pub struct DirArg {
    /// The gateway's data folder (SQLite stores and videos).
    #[arg(long, default_value_os_t = fractal_home("gateway"))]
    pub dir: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    chain: ChainUrl,
    /// The gateway signs requests to provers with this hotkey; provers take
    /// them from validators with a permit (or hotkeys they `--allow`).
    #[command(flatten)]
    key: NodeKey,
    #[command(flatten)]
    model: ModelArgs,
    /// Audit this model too (repeatable; a built-in name, a manifest file,
    /// or MANIFEST=FOLDER): sampled jobs for models the gateway cannot
    /// audit are routed unaudited. Apps may ask for any model the chain's
    /// schedule serves, whether or not it is listed here.
    #[arg(long = "also-audit", value_name = "MODEL")]
    also_audit: Vec<String>,
    #[command(flatten)]
    dir: DirArg,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Hours finished videos are kept.
    #[arg(long, default_value_t = 24)]
    retention_h: u64,
    /// Jobs on the grid at once.
    #[arg(long, default_value_t = 32)]
    max_running: usize,
    /// Share of routed jobs the gateway audits.
    #[arg(long, default_value_t = 0.1)]
    audit_sample: f64,
    /// Also run the verifier's challenge loop and weight setting here, a
    /// round at most every this many seconds (0: off), instead of a
    /// separate `fractal verifier` with the same hotkey: challenges are
    /// drawn like the traffic this process has routed.
    #[arg(long, default_value_t = 0)]
    challenge_pause_s: u64,
    /// Sign content credentials with this certificate chain (PEM, leaf
    /// first; Ed25519 or ECDSA P-256/P-384, with a C2PA signing EKU such as
    /// documentSigning). Without it a development chain is made in --dir:
    /// valid credentials that no C2PA trust list knows.
    #[arg(long, requires = "c2pa_key")]
    c2pa_cert: Option<PathBuf>,
    /// The certificate's private key (PKCS#8 PEM).
    #[arg(long, requires = "c2pa_cert")]
    c2pa_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key; its secret is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        dir: DirArg,
        #[arg(long, default_value_t = KeyLimits::default().creates_per_min)]
        creates_per_min: u32,
        #[arg(long, default_value_t = KeyLimits::default().requests_per_min)]
        requests_per_min: u32,
        #[arg(long, default_value_t = KeyLimits::default().max_active)]
        max_active: u32,
        #[arg(long, default_value_t = KeyLimits::default().daily_quota)]
        daily_quota: u32,
    },
    /// List keys (ids, names, limits; never secrets).
    List {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id (`key_…`); requests with it get 401 from then on.
    Revoke {
        id: String,
        #[command(flatten)]
        dir: DirArg,
    },
}

pub fn open_db(dir: &Path) -> anyhow::Result<Db> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = GatewayConfig::new(dir.to_path_buf());
    Db::open(&cfg.db_path()).with_context(|| format!("opening {}", cfg.db_path().display()))
}

pub fn run(a: GatewayArgs) -> anyhow::Result<()> {
    match a.keys {
        Some(GatewaySub::Keys(cmd)) => keys(cmd),
        None => serve(a.serve),
    }
}

fn keys(cmd: KeysCmd) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Create {
            name,
            dir,
            creates_per_min,
            requests_per_min,
            max_active,
            daily_quota,
        } => {
            let limits = KeyLimits {
                requests_per_min,
                creates_per_min,
                max_active,
                daily_quota,
            };
            let (key, secret) = open_db(&dir.dir)?.create_key(&name, limits)?;
            eprintln!("created {} ({name}); the secret is shown once:", key.id);
            println!("{secret}");
        }
        KeysCmd::List { dir, json } => {
            let keys = open_db(&dir.dir)?.keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "{:<18} {:<16} {:<8} {:>8} {:>8} {:>8} {:>8}",
                    "id", "name", "state", "req/min", "new/min", "active", "per day"
                );
                for k in keys {
                    let state = if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "live"
                    };
                    let l = k.limits;
                    println!(
                        "{:<18} {:<16} {:<8} {:>8} {:>8} {:>8} {:>8}",
                        k.id,
                        k.name,
                        state,
                        l.requests_per_min,
                        l.creates_per_min,
                        l.max_active,
                        l.daily_quota
                    );
                }
            }
        }
        KeysCmd::Revoke { id, dir } => {
            anyhow::ensure!(open_db(&dir.dir)?.revoke_key(&id)?, "no live key {id:?}");
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let key = a.key.load()?;
    let models = a.model.load_shared(&a.also_audit)?;
    let model = models[0].clone();
    let mut config = GatewayConfig::new(a.dir.dir.clone());
    config.retention = Duration::from_secs(a.retention_h * 3600);
    config.max_running = a.max_running.max(1);
    if let (Some(chain), Some(key)) = (a.c2pa_cert, a.c2pa_key) {
        config.certificate =
            fractal_gateway::credentials::CertificateSource::Operator { chain, key };
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let store = Verifier::open_store(&config.data_dir.join("verifier.sqlite"))?;
    runtime()?.block_on(async move {
        let (chain, _) = connect_registered(&a.chain, &key).await?;
        let vconfig = VerifierConfig {
            audit_sample: a.audit_sample.clamp(0.0, 1.0),
            ..VerifierConfig::from_manifest(&model.manifest)
        };
        let verifier = Verifier::auditing(key, chain, models, store, vconfig)?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let challenger = (a.challenge_pause_s > 0).then(|| {
            tokio::spawn(
                verifier
                    .clone()
                    .run(Duration::from_secs(a.challenge_pause_s), stop_rx),
            )
        });
        let gw = Gateway::open(config, verifier, model)?;
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "gateway at http://{addr}/ (data in {})",
            a.dir.dir.display()
        );
        fractal_gateway::serve(listener, gw, shutdown_signal()).await?;
        let _ = stop_tx.send(true);
        if let Some(task) = challenger {
            let _ = task.await;
        }
        eprintln!("gateway stopped");
        Ok(())
    })
}

/// The dev key of a local grid, kept in `dir` so a restarted grid keeps it.
pub fn dev_key(db: &Db, dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("dev-api-key");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_string();
        if db.key_by_secret(&secret)?.is_some() {
            return Ok(secret);
        }
    }
    let (_, secret) = db.create_key("dev", KeyLimits::default())?;
    std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}
