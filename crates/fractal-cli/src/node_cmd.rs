//! `fractal prover` and `fractal verifier`: the grid's two node roles.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use fractal_chain::{Chain, Metagraph};
use fractal_engine::PinnedModel;
use fractal_protocol::manifest::ModelManifest;
use fractal_protocol::{Hotkey, Keypair};
use fractal_prover::{Prover, ProverConfig, Strategy, ValidatorAuthorizer};
use fractal_verifier::{Verifier, VerifierConfig};

use crate::chain_cmd::{fractal_home, runtime, shutdown_signal, ChainUrl};
use crate::generate_cmd::parse_size;
use crate::wallet_cmd::{wallet, Location};

/// Which model the node pins.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A diffusers model folder; needs --manifest.
    #[arg(long, requires = "manifest")]
    pub model: Option<PathBuf>,
    /// The subnet's model manifest (TOML or JSON).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Built-in model (the default when no --manifest is given): tiny-v1,
    /// tiny-wide-v1, tiny-wan-v1 (Wan 2.1 at tiny widths), or world-v1
    /// (trained on the toy world).
    #[arg(long, visible_alias = "builtin", default_value = fractal_engine::builtin::DEFAULT_NAME, conflicts_with = "manifest")]
    pub tiny: String,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// One more model for a node: a built-in name, a manifest file, or
/// `MANIFEST=FOLDER` (a manifest and the diffusers folder it pins).
pub fn load_model_spec(spec: &str, device: &str) -> anyhow::Result<PinnedModel> {
    let device = fractal_engine::device_from_name(device)?;
    let (manifest, folder) = match spec.split_once('=') {
        Some((m, f)) => (m, Some(PathBuf::from(f))),
        None => (spec, None),
    };
    let path = PathBuf::from(manifest);
    let manifest = if let (Some(m), None) = (fractal_engine::builtin::manifest(manifest), &folder) {
        m
    } else if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        ModelManifest::parse(&text).with_context(|| format!("manifest {}", path.display()))?
    } else {
        bail!("{spec:?} is neither a built-in model nor a manifest file (MANIFEST or MANIFEST=FOLDER)");
    };
    PinnedModel::load(manifest, folder.as_deref(), &device)
        .with_context(|| format!("loading {spec:?}"))
}

impl ModelArgs {
    /// This model first, then each of `more` (see [`load_model_spec`]).
    pub fn load_with(&self, more: &[String]) -> anyhow::Result<Vec<PinnedModel>> {
        let mut models = vec![self.load()?];
        for spec in more {
            models.push(load_model_spec(spec, &self.device)?);
        }
        Ok(models)
    }

    /// [`ModelArgs::load_with`], shared (verifiers and gateways).
    pub fn load_shared(&self, more: &[String]) -> anyhow::Result<Vec<Arc<PinnedModel>>> {
        Ok(self.load_with(more)?.into_iter().map(Arc::new).collect())
    }

    pub fn load(&self) -> anyhow::Result<PinnedModel> {
        let manifest = match &self.manifest {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                ModelManifest::parse(&text)
                    .with_context(|| format!("manifest {}", path.display()))?
            }
            None => fractal_engine::builtin::manifest_or_err(&self.tiny)?,
        };
        Ok(PinnedModel::load(
            manifest,
            self.model.as_deref(),
            &fractal_engine::device_from_name(&self.device)?,
        )?)
    }
}

/// The node's hotkey, from a wallet.
#[derive(Args, Clone)]
pub struct NodeKey {
    #[command(flatten)]
    at: Location,
    /// Hotkey name in the wallet.
    #[arg(long, default_value = "default")]
    hotkey: String,
}

impl NodeKey {
    pub(crate) fn load(&self) -> anyhow::Result<Keypair> {
        Ok(wallet(&self.at)?
            .hotkey(&self.hotkey)
            .with_context(|| {
                format!(
                    "hotkey {:?} of wallet {:?}",
                    self.hotkey, self.at.wallet_name
                )
            })?
            .keypair)
    }
}

#[derive(Args)]
pub struct ProverArgs {
    #[command(flatten)]
    chain: ChainUrl,
    #[command(flatten)]
    key: NodeKey,
    #[command(flatten)]
    model: ModelArgs,
    /// Address to serve on; it is announced on the chain (serve_axon).
    #[arg(long, default_value = "127.0.0.1:8091")]
    listen: SocketAddr,
    /// Address announced instead of --listen, when validators reach this
    /// node through a forwarded port or a proxy.
    #[arg(long)]
    announce: Option<SocketAddr>,
    /// Serve this model too (repeatable): a built-in name, a manifest
    /// file, or MANIFEST=FOLDER. Requests name the manifest they want.
    #[arg(long = "also-serve", value_name = "MODEL")]
    also_serve: Vec<String>,
    #[arg(long, default_value_t = 1)]
    max_concurrent: usize,
    #[arg(long, default_value_t = 8)]
    max_queued: usize,
    /// Seconds committed traces stay available for audits.
    #[arg(long, default_value_t = 600)]
    audit_window_s: u64,
    /// Hotkeys allowed besides validators with a permit (e.g. the gateway's).
    #[arg(long = "allow", value_name = "SS58")]
    allow: Vec<String>,
    /// Behaviour for the verifier's cheat tests (builds with `--features cheats` only).
    #[arg(long, default_value = "honest", hide = !cfg!(feature = "cheats"))]
    strategy: String,
}

#[derive(Args)]
pub struct VerifierArgs {
    #[command(flatten)]
    chain: ChainUrl,
    #[command(flatten)]
    key: NodeKey,
    #[command(flatten)]
    model: ModelArgs,
    /// Audit this model too (repeatable): a built-in name, a manifest file,
    /// or MANIFEST=FOLDER. Provers are challenged under each model the
    /// chain's schedule serves that they claim and this verifier has.
    #[arg(long = "also-audit", value_name = "MODEL")]
    also_audit: Vec<String>,
    /// Scores and audit history.
    #[arg(long, default_value_os_t = default_verifier_db())]
    db: PathBuf,
    /// Seconds between challenge rounds.
    #[arg(long, default_value_t = 5)]
    pause_s: u64,
    /// Challenge shape (defaults: the manifest's).
    #[arg(long)]
    frames: Option<u32>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    size: Option<String>,
    /// A job answered later than this fails.
    #[arg(long, default_value_t = 120)]
    deadline_s: u64,
    /// Check challenges by regenerating them whole (100% of the prover's
    /// cost) instead of step spot-checks.
    #[arg(long)]
    full_regeneration: bool,
}

fn default_verifier_db() -> PathBuf {
    fractal_home("verifier.sqlite")
}

/// The chain and its metagraph, after checking `key` is registered there.
pub(crate) async fn connect_registered(
    at: &ChainUrl,
    key: &Keypair,
) -> anyhow::Result<(Arc<dyn Chain>, Metagraph)> {
    let chain = at.connect().await?;
    let mg = chain.metagraph().await?;
    if mg.neuron(&key.hotkey()).is_none() {
        bail!(
            "hotkey {} is not registered on the subnet; run `fractal register` first",
            key.hotkey()
        );
    }
    Ok((chain, mg))
}

pub fn prover(a: ProverArgs) -> anyhow::Result<()> {
    let strategy = Strategy::parse(&a.strategy)
        .with_context(|| format!("unknown --strategy {:?}", a.strategy))?;
    let key = a.key.load()?;
    let allow = a
        .allow
        .iter()
        .map(|s| Hotkey::from_ss58(s).with_context(|| format!("--allow {s:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let models = a.model.load_with(&a.also_serve)?;
    runtime()?.block_on(async move {
        let (chain, mg) = connect_registered(&a.chain, &key).await?;
        let me = mg
            .neuron(&key.hotkey())
            .expect("checked by connect_registered");
        let uid = me.uid;
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        fractal_prover::announce(chain.as_ref(), &key, a.announce.unwrap_or(addr)).await?;
        let auth = ValidatorAuthorizer::new(allow);
        auth.update(&mg);
        let refresh = auth.spawn_refresh(chain.clone(), Duration::from_secs(12));
        let config = ProverConfig {
            max_concurrent: a.max_concurrent.max(1),
            max_queued: a.max_queued,
            audit_window: Duration::from_secs(a.audit_window_s),
            strategy,
            ..ProverConfig::default()
        };
        let prover = Prover::serving(key, models, config)?;
        let serving: Vec<String> = prover
            .models()
            .iter()
            .map(|m| format!("{} ({})", m.manifest.name, m.manifest_id))
            .collect();
        eprintln!(
            "prover uid {uid} ({}) serving {} at http://{addr}",
            prover.hotkey(),
            serving.join(", ")
        );
        let follow = prover.follow_schedule(chain.clone(), Duration::from_secs(12));
        fractal_prover::serve(listener, prover, auth, shutdown_signal()).await?;
        refresh.abort();
        follow.abort();
        eprintln!("prover stopped");
        Ok(())
    })
}

pub fn verifier(a: VerifierArgs) -> anyhow::Result<()> {
    let key = a.key.load()?;
    let models = a.model.load_shared(&a.also_audit)?;
    let mut config = VerifierConfig::from_manifest(&models[0].manifest);
    config.frames = a.frames.unwrap_or(config.frames);
    config.steps = a.steps.unwrap_or(config.steps);
    if let Some(s) = &a.size {
        config.size = parse_size(s)?;
    }
    config.deadline = Duration::from_secs(a.deadline_s.max(1));
    if a.full_regeneration {
        config.mode = fractal_verifier::AuditMode::Full;
    }
    if let Some(dir) = a.db.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let store =
        Verifier::open_store(&a.db).with_context(|| format!("opening {}", a.db.display()))?;
    runtime()?.block_on(async move {
        let (chain, mg) = connect_registered(&a.chain, &key).await?;
        let me = mg.neuron(&key.hotkey()).expect("checked by connect_registered");
        if !me.validator_permit {
            eprintln!("note: uid {} has no validator permit yet (stake, then wait an epoch); provers will refuse it until then", me.uid);
        }
        let verifier = Verifier::auditing(key, chain, models, store, config)?;
        eprintln!("verifier {} running (scores in {})", verifier.hotkey(), a.db.display());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(verifier.clone().run(Duration::from_secs(a.pause_s), stop_rx));
        shutdown_signal().await;
        let _ = stop_tx.send(true);
        let _ = run.await;
        for s in verifier.scores()? {
            eprintln!(
                "{}  model {}  score {:.3}  jobs {}  failed {}",
                s.hotkey,
                &s.manifest_id.to_string()[..12],
                s.score,
                s.jobs,
                s.failed
            );
        }
        Ok(())
    })
}
