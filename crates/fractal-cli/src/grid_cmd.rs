//! `fractal grid`: a whole local grid in one process — chain, provers with
//! a built-in model (tiny-v1 unless `--tiny` names another), a verifier, and the gateway with a dev API key —
//! on loopback, until Ctrl-C. With `--upgrade-to MODEL` it also shows a
//! model upgrade: the owner publishes both models and schedules the new
//! one, and once it is active the provers restart one at a time serving it
//! (and the old one, until the schedule retires it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fractal_chain::{Chain, Hyperparams, LocalChain, Rao};
use fractal_engine::PinnedModel;
use fractal_protocol::{Keypair, Upgrade};
use fractal_prover::{Prover, ProverConfig, ValidatorAuthorizer};
use fractal_verifier::{Verifier, VerifierConfig};

use crate::chain_cmd::{metagraph_table, shutdown_signal};
use crate::node_cmd::{load_model_spec, ModelArgs};

#[derive(Args)]
pub struct GridArgs {
    /// Honest provers to start.
    #[arg(long, default_value_t = 3)]
    provers: usize,
    /// Where the chain and the verifier keep their SQLite files (a fresh
    /// temporary folder when not given; reusing a folder resumes that grid).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value_t = 500)]
    block_time_ms: u64,
    #[arg(long, default_value_t = 20)]
    tempo: u64,
    /// Challenge shape (small, so the tiny grid turns over quickly); frames
    /// are rounded up to a count the model makes (Wan: 1 + 4k).
    #[arg(long, default_value_t = 4)]
    frames: u32,
    #[arg(long, default_value_t = 32)]
    size: u32,
    #[arg(long, default_value_t = 4)]
    steps: u32,
    /// Where the gateway (API and web page) listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    model: ModelArgs,
    /// Show a model upgrade to this model (a built-in name, a manifest
    /// file, or MANIFEST=FOLDER): scheduled on the chain by the owner, then
    /// the provers move over one at a time once it is active.
    #[arg(long, value_name = "MODEL")]
    upgrade_to: Option<String>,
    /// The block the upgrade starts at (default: two epochs from now).
    #[arg(long, requires = "upgrade_to")]
    at_block: Option<u64>,
    /// Blocks both models are served after the switch.
    #[arg(long, requires = "upgrade_to", default_value_t = 60)]
    grace_blocks: u64,
}

/// One prover of the grid and how to stop it.
struct RunningProver {
    index: usize,
    key: Keypair,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningProver {
    /// Serves `models` under `key` on a fresh loopback port, announced on
    /// the chain, following the chain's model schedule.
    async fn start(
        index: usize,
        key: Keypair,
        models: Vec<PinnedModel>,
        chain: &Arc<dyn Chain>,
        auth: Arc<ValidatorAuthorizer>,
    ) -> anyhow::Result<Self> {
        let prover = Prover::serving(key.clone(), models, ProverConfig::default())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        fractal_prover::announce(chain.as_ref(), &key, addr).await?;
        let names: Vec<String> = prover
            .models()
            .iter()
            .map(|m| m.manifest.name.clone())
            .collect();
        eprintln!(
            "prover {index} {} at http://{addr} serving {}",
            key.hotkey(),
            names.join(", ")
        );
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let follow = prover.follow_schedule(chain.clone(), Duration::from_secs(2));
        let serve = tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = fractal_prover::serve(listener, prover, auth, stopped).await {
                tracing::error!(error = %e, "prover stopped with an error");
            }
        });
        Ok(RunningProver {
            index,
            key,
            stop,
            tasks: vec![serve, follow],
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let mut tasks = self.tasks.into_iter();
        if let Some(serve) = tasks.next() {
            let _ = serve.await;
        }
        for t in tasks {
            t.abort();
        }
    }
}

/// Development keys: anyone can derive them, so a local grid only.
fn dev_key(name: &str) -> anyhow::Result<Keypair> {
    Ok(Keypair::from_suri(&format!("//Fractal//{name}"))?)
}

pub fn run(a: GridArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.provers > 0, "--provers must be at least 1");
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let owner = dev_key("owner")?;
        let params = Hyperparams {
            tempo: a.tempo,
            weights_rate_limit: 1,
            ..Hyperparams::default()
        };
        let chain = Arc::new(LocalChain::open(&dir.join("chain.sqlite"), params, owner.hotkey())?);
        let dyn_chain: Arc<dyn Chain> = chain.clone();
        let chain_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let chain_url = format!("http://{}", chain_listener.local_addr()?);
        let node = chain.node_key()?.hotkey();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let chain_server = tokio::spawn(fractal_chain::server::serve(
            chain_listener,
            chain.clone(),
            node,
            stopped(stop_rx.clone()),
        ));
        let producer = chain.spawn_block_producer(Duration::from_millis(a.block_time_ms));

        // The verifier: registered, staked, permitted after the first epoch.
        let vkey = dev_key("verifier")?;
        let vcold = dev_key("verifier-cold")?;
        let mg = chain.metagraph().await?;
        if mg.neuron(&vkey.hotkey()).is_none() {
            chain.register(&vcold, &vkey.hotkey()).await?;
            chain.add_stake(&vcold, &vkey.hotkey(), Rao(100 * Rao::PER_TAO)).await?;
        }
        let auth = ValidatorAuthorizer::new([]);
        let refresh = auth.spawn_refresh(dyn_chain.clone(), Duration::from_secs(5));
        let mut provers = Vec::new();
        for i in 0..a.provers {
            let key = dev_key(&format!("prover-{i}"))?;
            if chain.metagraph().await?.neuron(&key.hotkey()).is_none() {
                chain.register(&dev_key(&format!("prover-{i}-cold"))?, &key.hotkey()).await?;
            }
            provers.push(RunningProver::start(i, key, vec![a.model.load()?], &dyn_chain, auth.clone()).await?);
        }
        let provers = Arc::new(tokio::sync::Mutex::new(provers));
        let model = Arc::new(a.model.load()?);
        let upgrade = match &a.upgrade_to {
            None => None,
            Some(spec) => {
                let next = load_model_spec(spec, &a.model.device)?;
                let at = schedule_upgrade(&chain, &owner, &model, &next, a.at_block, a.grace_blocks, a.tempo).await?;
                Some((spec.clone(), Arc::new(next), at))
            }
        };
        let config = VerifierConfig {
            frames: model.manifest.frames_at_least(a.frames),
            steps: a.steps,
            size: fractal_protocol::manifest::Size {
                width: a.size,
                height: a.size,
            },
            ..VerifierConfig::from_manifest(&model.manifest)
        };
        let store = Verifier::open_store(&dir.join("verifier.sqlite"))?;
        let mut audited = vec![model.clone()];
        audited.extend(upgrade.as_ref().map(|u| u.1.clone()));
        let verifier = Verifier::auditing(vkey, dyn_chain.clone(), audited, store, config)?;
        let verifier_task = tokio::spawn(verifier.clone().run(Duration::from_millis(a.block_time_ms), stop_rx.clone()));

        // The gateway routes apps' jobs through the same verifier (its key
        // has the permit provers accept) and audits a sample of them.
        let gw_config = fractal_gateway::GatewayConfig::new(dir.join("gateway"));
        let gateway = fractal_gateway::Gateway::open(gw_config, verifier, model)?;
        let api_key = crate::gateway_cmd::dev_key(&gateway.db, &dir)?;
        let gw_listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding the gateway to {} (use --listen to pick another)", a.listen))?;
        let gw_addr = gw_listener.local_addr()?;
        let gateway_task = tokio::spawn(fractal_gateway::serve(gw_listener, gateway, stopped(stop_rx.clone())));
        eprintln!(
            "grid ready: chain {chain_url} ({} provers, data in {})\n\
             web page: http://{gw_addr}/#key={api_key}\n\
             API key:  {api_key}\n\
             try:      curl -s http://{gw_addr}/v1/videos -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' -d '{{\"prompt\": \"a red fox running through snow\", \"size\": \"32x32\", \"seconds\": \"0.5\", \"steps\": 4}}'\n\
             Ctrl-C stops",
            a.provers,
            dir.display()
        );

        let rolling = upgrade.map(|(spec, _, at)| {
            let (chain, provers, auth, a_model, spec_device) =
                (dyn_chain.clone(), provers.clone(), auth.clone(), a.model.clone(), a.model.device.clone());
            tokio::spawn(async move {
                if let Err(e) = roll_over(&chain, &provers, auth, &a_model, &spec, &spec_device, at).await {
                    tracing::error!(error = %e, "the rolling upgrade stopped");
                    eprintln!("the rolling upgrade stopped: {e:#}");
                }
            })
        });

        let mut shown = 0;
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                block = dyn_chain.wait_for_block_after(shown, Duration::from_secs(5)) => {
                    let block = block?;
                    let tempo = a.tempo.max(1);
                    if block / tempo > shown / tempo {
                        print!("{}", metagraph_table(&chain.metagraph().await?));
                    }
                    shown = block;
                }
            }
        }
        eprintln!("stopping the grid…");
        let _ = stop_tx.send(true);
        let _ = verifier_task.await;
        let _ = gateway_task.await;
        if let Some(r) = rolling {
            r.abort();
            let _ = r.await;
        }
        for p in std::mem::take(&mut *provers.lock().await) {
            p.stop().await;
        }
        let _ = chain_server.await;
        producer.abort();
        refresh.abort();
        chain.integrity_check()?;
        eprintln!("grid stopped at block {}", chain.block().await?);
        Ok(())
    })
}

/// Publishes the grid's model and `next` as the owner, pins the grid's
/// model if the schedule pins nothing yet, and schedules `next` at
/// `at_block` (default: two epochs on). Returns the block it starts at.
async fn schedule_upgrade(
    chain: &LocalChain,
    owner: &Keypair,
    current: &PinnedModel,
    next: &PinnedModel,
    at_block: Option<u64>,
    grace_blocks: u64,
    tempo: u64,
) -> anyhow::Result<u64> {
    for m in [current, next] {
        chain.publish_manifest_signed_by(&owner.hotkey(), &m.manifest)?;
    }
    let (now, schedule) = chain.model_schedule_now()?;
    if let Some(state) = schedule.state(&next.manifest_id, now) {
        let from = schedule
            .entries
            .iter()
            .find(|e| e.manifest == next.manifest_id)
            .map_or(now, |e| e.from_block);
        eprintln!(
            "upgrade to {} already scheduled (from block {from}, {} now)",
            next.manifest.name,
            state.name()
        );
        return Ok(from);
    }
    if !schedule.pins_anything_at(now) && schedule.state(&current.manifest_id, now).is_none() {
        chain.schedule_upgrade_signed_by(
            &owner.hotkey(),
            Upgrade {
                manifest: current.manifest_id,
                at_block: now + 1,
                grace_blocks: 1,
            },
        )?;
    }
    let at = at_block.unwrap_or(now + 2 * tempo.max(1));
    chain
        .schedule_upgrade_signed_by(
            &owner.hotkey(),
            Upgrade {
                manifest: next.manifest_id,
                at_block: at,
                grace_blocks: grace_blocks.max(1),
            },
        )
        .with_context(|| format!("scheduling {} at block {at}", next.manifest.name))?;
    eprintln!(
        "upgrade scheduled: {} ({}) from block {at}; {} served until block {}",
        next.manifest.name,
        next.manifest_id,
        current.manifest.name,
        at + grace_blocks.max(1)
    );
    Ok(at)
}

/// Once block `at` is reached, restarts the provers one at a time serving
/// the new model (and the old one, which each unloads when the schedule
/// retires it), a few blocks apart.
async fn roll_over(
    chain: &Arc<dyn Chain>,
    provers: &tokio::sync::Mutex<Vec<RunningProver>>,
    auth: Arc<ValidatorAuthorizer>,
    current: &ModelArgs,
    next: &str,
    device: &str,
    at: u64,
) -> anyhow::Result<()> {
    let mut block = chain.block().await?;
    while block < at {
        block = chain
            .wait_for_block_after(block, Duration::from_secs(30))
            .await?;
    }
    let count = provers.lock().await.len();
    for slot in 0..count {
        let mut all = provers.lock().await;
        let old = all.remove(slot);
        let (index, key) = (old.index, old.key.clone());
        old.stop().await;
        let models = vec![load_model_spec(next, device)?, current.load()?];
        all.insert(
            slot,
            RunningProver::start(index, key, models, chain, auth.clone()).await?,
        );
        drop(all);
        // A few blocks between restarts: the others carry the load.
        for _ in 0..3 {
            block = chain
                .wait_for_block_after(block, Duration::from_secs(30))
                .await?;
        }
    }
    eprintln!("every prover serves the new model");
    Ok(())
}
