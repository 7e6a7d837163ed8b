use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fractal_protocol::manifest::Weights;
use fractal_protocol::{Keypair, ManifestId, ModelManifest, Upgrade};

use crate::chain_cmd::{runtime, ChainUrl};
use crate::wallet_cmd::{existing_password, wallet, Location};

#[derive(Subcommand)]
pub enum ManifestCmd {
    /// Print the content id (SHA-256 of the canonical encoding) of a manifest file.
    Id { file: PathBuf },
    /// Validate a manifest (TOML or JSON) and summarise it.
    Check { file: PathBuf },
    /// Print the canonical JSON encoding that the id hashes.
    Canonical { file: PathBuf },
    /// Publish a manifest on the chain so every node can read it by id
    /// (subnet owner only).
    Publish {
        /// A manifest file, or a built-in model's name (tiny-v1, …).
        file: PathBuf,
        #[command(flatten)]
        owner: OwnerArgs,
    },
    /// Schedule the subnet's move to a published manifest: from `--at-block`
    /// it is served, and what was served before stays served for
    /// `--grace-blocks` more (subnet owner only).
    Schedule {
        /// The manifest's id, a manifest file, or a built-in model's name
        /// (its id is computed).
        manifest: String,
        /// First block the manifest is served at; it must be in the future.
        #[arg(long)]
        at_block: Option<u64>,
        /// Instead of --at-block: this many blocks from now.
        #[arg(long, conflicts_with = "at_block")]
        in_blocks: Option<u64>,
        /// Blocks the previous model stays served after the switch, for
        /// provers to move over one at a time.
        #[arg(long, default_value_t = 100)]
        grace_blocks: u64,
        #[command(flatten)]
        owner: OwnerArgs,
    },
    /// The subnet's model schedule, each entry's state at the current block.
    Show {
        #[command(flatten)]
        chain: ChainUrl,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Who signs as the subnet owner: a wallet's coldkey (the local chain's
/// owner), one of its hotkeys (subtensor: the owner *hotkey* commits the
/// schedule), or a secret URI.
#[derive(Args)]
pub struct OwnerArgs {
    #[command(flatten)]
    chain: ChainUrl,
    #[command(flatten)]
    at: Location,
    /// Read the coldkey password from this environment variable instead of prompting.
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// Sign with this hotkey of the wallet instead of its coldkey (on
    /// subtensor, the subnet owner's hotkey: `SubnetOwnerHotkey`).
    #[arg(long, value_name = "NAME", conflicts_with = "password_env")]
    owner_hotkey: Option<String>,
    /// Sign with this secret URI instead of a wallet (development chains:
    /// `fractal chain serve` is owned by `//Alice` unless told otherwise).
    #[arg(long, value_name = "SURI", conflicts_with_all = ["wallet_name", "password_env", "owner_hotkey"])]
    owner_suri: Option<String>,
}

impl OwnerArgs {
    fn keypair(&self) -> anyhow::Result<Keypair> {
        if let Some(suri) = &self.owner_suri {
            return Keypair::from_suri(suri).context("--owner-suri");
        }
        let w = wallet(&self.at)?;
        if let Some(name) = &self.owner_hotkey {
            return Ok(w
                .hotkey(name)
                .with_context(|| format!("hotkey {name:?} of wallet {:?}", self.at.wallet_name))?
                .keypair);
        }
        Ok(w.coldkey(|| existing_password(&self.password_env))
            .with_context(|| format!("coldkey of wallet {:?}", self.at.wallet_name))?
            .keypair)
    }
}

fn load(file: &PathBuf) -> anyhow::Result<ModelManifest> {
    if let (false, Some(m)) = (
        file.exists(),
        file.to_str().and_then(fractal_engine::builtin::manifest),
    ) {
        return Ok(m);
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    ModelManifest::parse(&text).with_context(|| format!("in {}", file.display()))
}

/// A manifest id given as hex, as a file holding the manifest, or as a
/// built-in model's name.
fn manifest_id(arg: &str) -> anyhow::Result<ManifestId> {
    match arg.parse::<ManifestId>() {
        Ok(id) => Ok(id),
        Err(_) if std::path::Path::new(arg).exists() => Ok(load(&PathBuf::from(arg))?.id()),
        Err(_) if fractal_engine::builtin::manifest(arg).is_some() => {
            Ok(load(&PathBuf::from(arg))?.id())
        }
        Err(e) => {
            bail!("{arg:?} is neither a manifest id ({e}), a manifest file, nor a built-in model")
        }
    }
}

pub fn run(cmd: ManifestCmd) -> anyhow::Result<()> {
    match cmd {
        ManifestCmd::Publish { file, owner } => {
            let m = load(&file)?;
            let key = owner.keypair()?;
            runtime()?.block_on(async {
                let chain = owner.chain.connect().await?;
                let id = chain.publish_manifest(&key, &m).await?;
                println!("published {} as {id}", m.name);
                anyhow::Ok(())
            })?;
        }
        ManifestCmd::Schedule {
            manifest,
            at_block,
            in_blocks,
            grace_blocks,
            owner,
        } => {
            let id = manifest_id(&manifest)?;
            let key = owner.keypair()?;
            runtime()?.block_on(async {
                let chain = owner.chain.connect().await?;
                let now = chain.block().await?;
                let at_block = match (at_block, in_blocks) {
                    (Some(b), _) => b,
                    (None, Some(n)) => now.saturating_add(n.max(1)),
                    (None, None) => bail!("say when: --at-block N or --in-blocks N"),
                };
                let schedule = chain
                    .schedule_upgrade(
                        &key,
                        Upgrade {
                            manifest: id,
                            at_block,
                            grace_blocks,
                        },
                    )
                    .await?;
                println!(
                    "scheduled {id} from block {at_block} (now {now}, grace {grace_blocks} blocks)"
                );
                print!("{}", schedule_table(&schedule, now));
                anyhow::Ok(())
            })?;
        }
        ManifestCmd::Show { chain, json } => runtime()?.block_on(async {
            let chain = chain.connect().await?;
            let now = chain.block().await?;
            let schedule = chain.model_schedule().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&schedule)?);
                return Ok(());
            }
            println!("block {now}");
            print!("{}", schedule_table(&schedule, now));
            for (e, state) in schedule.at(now) {
                if state.is_served() && chain.manifest(&e.manifest).await?.is_none() {
                    println!(
                        "warning: served manifest {} is not published on this chain",
                        e.manifest
                    );
                }
            }
            anyhow::Ok(())
        })?,
        ManifestCmd::Id { file } => println!("{}", load(&file)?.id()),
        ManifestCmd::Canonical { file } => {
            println!("{}", String::from_utf8(load(&file)?.canonical_bytes())?)
        }
        ManifestCmd::Check { file } => {
            let m = load(&file)?;
            let d = &m.defaults;
            println!("ok: {} ({}, {:?})", m.name, m.architecture.name(), m.dtype);
            println!("id:        {}", m.id());
            match &m.weights {
                Weights::Files(files) => {
                    println!("weights:   {} files pinned by SHA-256", files.len())
                }
                Weights::Builtin(name) => println!("weights:   built-in {name}"),
            }
            println!(
                "scheduler: {:?}, {} train steps",
                m.scheduler.kind(),
                m.scheduler.num_train_timesteps()
            );
            println!(
                "defaults:  {} x {} frames, {} steps, guidance {}, {} fps",
                d.size, d.frames, d.steps, d.guidance_scale, d.fps
            );
            let sizes: Vec<String> = m.limits.sizes.iter().map(|s| s.to_string()).collect();
            println!(
                "limits:    sizes {}, <= {} frames, <= {} steps",
                sizes.join(" "),
                m.limits.max_frames,
                m.limits.max_steps
            );
        }
    }
    Ok(())
}

fn schedule_table(s: &fractal_protocol::ModelSchedule, now: u64) -> String {
    use std::fmt::Write;
    if s.entries.is_empty() {
        return "nothing scheduled: every node serves the manifest it is started with\n".into();
    }
    let mut out = format!(
        "{:<64}  {:>10}  {:>10}  state\n",
        "manifest", "from", "until"
    );
    for (e, state) in s.at(now) {
        let until = e.until_block.map_or("-".to_string(), |u| u.to_string());
        let _ = writeln!(
            out,
            "{:<64}  {:>10}  {:>10}  {}",
            e.manifest.to_string(),
            e.from_block,
            until,
            state.name()
        );
    }
    out
}
