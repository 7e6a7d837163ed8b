//! `fractal grid`: a whole local grid in one process — chain, provers with
//! a built-in model (tiny-v1 unless `--tiny` names another), a verifier, and the gateway with a dev API key —
//! on loopback, until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fractal_chain::{Chain, Hyperparams, LocalChain, Rao};
use fractal_protocol::Keypair;
use fractal_prover::{Prover, ProverConfig, ValidatorAuthorizer};
use fractal_verifier::{Verifier, VerifierConfig};

use crate::chain_cmd::{metagraph_table, shutdown_signal};
use crate::node_cmd::ModelArgs;

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
        let mut prover_tasks = Vec::new();
        for i in 0..a.provers {
            let key = dev_key(&format!("prover-{i}"))?;
            if chain.metagraph().await?.neuron(&key.hotkey()).is_none() {
                chain.register(&dev_key(&format!("prover-{i}-cold"))?, &key.hotkey()).await?;
            }
            let prover = Prover::new(key.clone(), a.model.load()?, ProverConfig::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            fractal_prover::announce(chain.as_ref(), &key, addr).await?;
            eprintln!("prover {i} {} at http://{addr}", key.hotkey());
            prover_tasks.push(tokio::spawn(fractal_prover::serve(
                listener,
                prover,
                auth.clone(),
                stopped(stop_rx.clone()),
            )));
        }
        let model = Arc::new(a.model.load()?);
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
        let verifier = Verifier::new(vkey, dyn_chain.clone(), model.clone(), store, config)?;
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
        for t in prover_tasks {
            let _ = t.await;
        }
        let _ = chain_server.await;
        producer.abort();
        refresh.abort();
        chain.integrity_check()?;
        eprintln!("grid stopped at block {}", chain.block().await?);
        Ok(())
    })
}
