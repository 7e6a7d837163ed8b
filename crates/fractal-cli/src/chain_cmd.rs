//! `fractal chain serve|status|metagraph`, `fractal register`, `fractal stake`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fractal_chain::{Chain, Hyperparams, LocalChain, Metagraph, Rao, RemoteChain};
use fractal_protocol::{Hotkey, Keypair};

use crate::wallet_cmd::{existing_password, wallet, Location};

/// The local chain's address when nothing else is said.
pub const DEFAULT_CHAIN_URL: &str = "http://127.0.0.1:9944";

#[derive(Args, Clone)]
pub struct ChainUrl {
    /// Chain endpoint: `http://` for `fractal chain serve`, `ws://` or
    /// `wss://` for a subtensor node (e.g. wss://entrypoint-finney.opentensor.ai:443).
    #[arg(long = "chain", env = "FRACTAL_CHAIN", default_value = DEFAULT_CHAIN_URL)]
    pub url: String,
    /// The subnet, on a subtensor node (the local chain has one subnet).
    #[arg(long, env = "FRACTAL_NETUID", default_value_t = 1)]
    pub netuid: u16,
}

impl ChainUrl {
    fn is_subtensor(&self) -> bool {
        self.url.starts_with("ws://") || self.url.starts_with("wss://")
    }

    /// The chain behind the URL, as a `Chain`.
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn Chain>> {
        if self.is_subtensor() {
            return self.connect_subtensor().await;
        }
        Ok(Arc::new(connect(&self.url).await?))
    }

    #[cfg(feature = "subtensor")]
    async fn connect_subtensor(&self) -> anyhow::Result<Arc<dyn Chain>> {
        let state = fractal_home("subtensor");
        let chain =
            fractal_chain::subtensor::SubtensorChain::connect(&self.url, self.netuid, &state)
                .await
                .with_context(|| format!("subtensor at {}", self.url))?;
        Ok(Arc::new(chain))
    }

    #[cfg(not(feature = "subtensor"))]
    async fn connect_subtensor(&self) -> anyhow::Result<Arc<dyn Chain>> {
        bail!(
            "{} is a subtensor node, and this build has no subtensor support (build with --features subtensor)",
            self.url
        )
    }
}

#[derive(Subcommand)]
pub enum ChainCmd {
    /// Run the embedded local chain (SQLite, blocks on a timer, Yuma every tempo) over HTTP.
    Serve(ServeArgs),
    /// Block, node key, owner and subnet rules of a running chain.
    Status {
        #[command(flatten)]
        chain: ChainUrl,
    },
    /// The subnet's neurons: uid, hotkey, stake, permits, Yuma outputs, axon.
    Metagraph {
        #[command(flatten)]
        chain: ChainUrl,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    /// Chain file; created with the rules below if missing, reopened as it is otherwise.
    #[arg(long, default_value_os_t = default_db())]
    db: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9944")]
    listen: SocketAddr,
    /// Milliseconds between blocks.
    #[arg(long, default_value_t = 1000)]
    block_time_ms: u64,
    /// Subnet owner coldkey (SS58); defaults to the `//Alice` dev key.
    #[arg(long)]
    owner: Option<String>,
    #[arg(long)]
    tempo: Option<u64>,
    #[arg(long)]
    immunity_period: Option<u64>,
    #[arg(long)]
    max_uids: Option<u16>,
    #[arg(long)]
    weights_rate_limit: Option<u64>,
    #[arg(long)]
    weights_version_key: Option<u64>,
}

/// A coldkey-signed call on a hotkey of the same wallet.
#[derive(Args)]
pub struct KeyArgs {
    #[command(flatten)]
    chain: ChainUrl,
    #[command(flatten)]
    at: Location,
    /// Hotkey name in the wallet.
    #[arg(long, default_value = "default")]
    hotkey: String,
    /// Read the coldkey password from this environment variable instead of prompting.
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
}

#[derive(Args)]
pub struct StakeArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// TAO to move from the coldkey's balance onto the hotkey.
    #[arg(long)]
    amount: f64,
}

/// `~/.fractal/<file>`: where node state lives unless told otherwise.
pub(crate) fn fractal_home(file: &str) -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".fractal").join(file)
}

fn default_db() -> PathBuf {
    fractal_home("chain.sqlite")
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn run(cmd: ChainCmd) -> anyhow::Result<()> {
    let rt = runtime()?;
    match cmd {
        ChainCmd::Serve(args) => rt.block_on(serve(args)),
        ChainCmd::Status { chain } => rt.block_on(status(&chain)),
        ChainCmd::Metagraph { chain, json } => rt.block_on(async {
            let mg = chain.connect().await?.metagraph().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&mg)?);
            } else {
                print!("{}", metagraph_table(&mg));
            }
            Ok(())
        }),
    }
}

async fn connect(url: &str) -> anyhow::Result<RemoteChain> {
    RemoteChain::connect(url).await.with_context(|| {
        format!("cannot reach the chain at {url} (is `fractal chain serve` running?)")
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let owner = match &args.owner {
        Some(ss58) => Hotkey::from_ss58(ss58).with_context(|| format!("--owner {ss58:?}"))?,
        None => Keypair::from_suri("//Alice")?.hotkey(),
    };
    let defaults = Hyperparams::default();
    let params = Hyperparams {
        tempo: args.tempo.unwrap_or(defaults.tempo),
        immunity_period: args.immunity_period.unwrap_or(defaults.immunity_period),
        max_uids: args.max_uids.unwrap_or(defaults.max_uids),
        weights_rate_limit: args
            .weights_rate_limit
            .unwrap_or(defaults.weights_rate_limit),
        weights_version_key: args
            .weights_version_key
            .unwrap_or(defaults.weights_version_key),
        ..defaults
    };
    if args.block_time_ms == 0 {
        bail!("--block-time-ms must be positive");
    }
    if let Some(dir) = args.db.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let chain = Arc::new(
        LocalChain::open(&args.db, params, owner)
            .with_context(|| format!("opening chain file {}", args.db.display()))?,
    );
    let node = chain.node_key()?.hotkey();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let producer = chain.spawn_block_producer(Duration::from_millis(args.block_time_ms));
    let p = chain.hyperparams().await?;
    eprintln!(
        "local chain at http://{addr} (file {}, block {}, tempo {}, node {node})",
        args.db.display(),
        chain.block().await?,
        p.tempo
    );
    fractal_chain::server::serve(listener, chain.clone(), node, shutdown_signal()).await?;
    producer.abort();
    chain.integrity_check()?;
    eprintln!("chain stopped at block {}", chain.block().await?);
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn status(at: &ChainUrl) -> anyhow::Result<()> {
    if at.is_subtensor() {
        let chain = at.connect().await?;
        let p = chain.hyperparams().await?;
        let mg = chain.metagraph().await?;
        println!("chain     {} (subtensor, netuid {})", at.url, at.netuid);
        println!("block     {}", chain.block().await?);
        println!(
            "neurons   {} of {} ({} with validator permit)",
            mg.neurons.len(),
            p.max_uids,
            mg.neurons.iter().filter(|n| n.validator_permit).count()
        );
        println!("rules     {}", serde_json::to_string(&p)?);
        return Ok(());
    }
    let url = &at.url;
    let chain = connect(url).await?;
    let info = chain.info().await?;
    let mg = chain.metagraph().await?;
    println!("chain     {url}");
    println!("block     {}", info.block);
    println!("node      {}", info.node);
    println!("owner     {}", info.owner);
    println!(
        "neurons   {} of {} ({} with validator permit)",
        mg.neurons.len(),
        info.hyperparams.max_uids,
        mg.neurons.iter().filter(|n| n.validator_permit).count()
    );
    println!("rules     {}", serde_json::to_string(&info.hyperparams)?);
    Ok(())
}

fn short(key: &Hotkey) -> String {
    let s = key.to_ss58();
    format!("{}…{}", &s[..8], &s[s.len() - 4..])
}

pub fn metagraph_table(mg: &Metagraph) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "block {}  netuid {}  neurons {}",
        mg.block,
        mg.netuid,
        mg.neurons.len()
    );
    let _ = writeln!(
        out,
        "{:>4}  {:<13}  {:<13}  {:>12}  {:>2}  {:>7}  {:>7}  {:>7}  {:>7}  {:>10}  axon",
        "uid",
        "hotkey",
        "coldkey",
        "stake τ",
        "vp",
        "trust",
        "cons",
        "incent",
        "divs",
        "emission τ"
    );
    for n in &mg.neurons {
        let axon = n
            .axon
            .as_ref()
            .map_or_else(|| "-".to_string(), |a| a.base_url());
        let _ = writeln!(
            out,
            "{:>4}  {:<13}  {:<13}  {:>12.4}  {:>2}  {:>7.4}  {:>7.4}  {:>7.4}  {:>7.4}  {:>10.4}  {}",
            n.uid,
            short(&n.hotkey),
            short(&n.coldkey),
            n.stake.as_tao(),
            if n.validator_permit { "*" } else { "" },
            n.trust,
            n.consensus,
            n.incentive,
            n.dividends,
            n.emission.as_tao(),
            axon
        );
    }
    out
}

fn coldkey_and_hotkey(k: &KeyArgs) -> anyhow::Result<(Keypair, Hotkey)> {
    let w = wallet(&k.at)?;
    let hotkey = w
        .hotkeypub(&k.hotkey)
        .or_else(|_| w.hotkey(&k.hotkey).map(|l| l.keypair.hotkey()))
        .with_context(|| format!("hotkey {:?} of wallet {:?}", k.hotkey, k.at.wallet_name))?;
    let coldkey = w
        .coldkey(|| existing_password(&k.password_env))
        .with_context(|| format!("coldkey of wallet {:?}", k.at.wallet_name))?
        .keypair;
    Ok((coldkey, hotkey))
}

pub fn register(k: KeyArgs) -> anyhow::Result<()> {
    let (coldkey, hotkey) = coldkey_and_hotkey(&k)?;
    runtime()?.block_on(async {
        let chain = k.chain.connect().await?;
        let uid = chain.register(&coldkey, &hotkey).await?;
        let balance = chain.balance(&coldkey.hotkey()).await?;
        println!("registered {hotkey} as uid {uid}; coldkey balance now {balance}");
        Ok(())
    })
}

pub fn stake(args: StakeArgs) -> anyhow::Result<()> {
    let amount = Rao::from_tao(args.amount)
        .filter(|r| r.0 > 0)
        .with_context(|| format!("--amount {} is not a positive TAO amount", args.amount))?;
    let (coldkey, hotkey) = coldkey_and_hotkey(&args.key)?;
    runtime()?.block_on(async {
        let chain = args.key.chain.connect().await?;
        chain.add_stake(&coldkey, &hotkey, amount).await?;
        let mg = chain.metagraph().await?;
        let stake = mg.neuron(&hotkey).map(|n| n.stake).unwrap_or_default();
        println!("staked {amount} to {hotkey}; its stake is now {stake}");
        Ok(())
    })
}
