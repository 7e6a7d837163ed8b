use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use fractal_protocol::manifest::Weights;
use fractal_protocol::ModelManifest;

#[derive(Subcommand)]
pub enum ManifestCmd {
    /// Print the content id (SHA-256 of the canonical encoding) of a manifest file.
    Id { file: PathBuf },
    /// Validate a manifest (TOML or JSON) and summarise it.
    Check { file: PathBuf },
    /// Print the canonical JSON encoding that the id hashes.
    Canonical { file: PathBuf },
}

fn load(file: &PathBuf) -> anyhow::Result<ModelManifest> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    ModelManifest::parse(&text).with_context(|| format!("in {}", file.display()))
}

pub fn run(cmd: ManifestCmd) -> anyhow::Result<()> {
    match cmd {
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
