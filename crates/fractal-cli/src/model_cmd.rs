use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use fractal_engine::{pipelines, TinyVariant, WanVariant};
use fractal_protocol::manifest::SchedulerKind;

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Write a built-in tiny model as a diffusers folder (for diffusers parity runs or as a test model).
    ExportTiny {
        /// tiny-v1, tiny-wide-v1, ms-1.7b-shape (TextToVideoSD) or
        /// tiny-wan-v1, wan-1.3b-shape (WanPipeline).
        #[arg(long, default_value = "tiny-v1")]
        variant: String,
        /// Scheduler written to scheduler/scheduler_config.json (the
        /// model's own when not given): ddim or dpm-solver for
        /// TextToVideoSD, flow-euler or unipc for Wan.
        #[arg(long)]
        scheduler: Option<String>,
        out: PathBuf,
    },
    /// Print the SHA-256 of a diffusers folder's config, tokenizer and weight files, as a manifest's [weights.files] table.
    Hash { dir: PathBuf },
}

pub fn run(cmd: ModelCmd) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::ExportTiny {
            variant,
            scheduler,
            out,
        } => {
            let manifest = fractal_engine::builtin::manifest_or_err(&variant)?;
            let spec = match scheduler.as_deref() {
                None => manifest.scheduler,
                Some(name) => {
                    let kind = match name {
                        "ddim" => SchedulerKind::Ddim,
                        "dpm-solver" => SchedulerKind::DpmSolverMultistep,
                        "flow-euler" => SchedulerKind::FlowMatchEuler,
                        "unipc" => SchedulerKind::UniPcMultistep,
                        other => bail!(
                            "unknown scheduler {other:?} (ddim, dpm-solver, flow-euler, unipc)"
                        ),
                    };
                    manifest
                        .scheduler
                        .with_kind(kind)
                        .map_err(|e| anyhow::anyhow!("--scheduler for {variant}: {e}"))?
                }
            };
            let files = match (TinyVariant::parse(&variant), WanVariant::parse(&variant)) {
                (Some(v), _) => {
                    pipelines::text_to_video_sd::Model::write_tiny_folder(v, &out, &spec)?
                }
                (_, Some(v)) => pipelines::wan::Model::write_tiny_folder(v, &out, &spec)?,
                (None, None) => unreachable!("manifest_or_err knows the built-in names"),
            };
            println!("wrote {} ({} weight files)", out.display(), files.len());
        }
        ModelCmd::Hash { dir } => {
            println!("[weights.files]");
            for f in fractal_engine::io::weights::pinned_files(&dir)? {
                println!(
                    "\"{f}\" = \"{}\"",
                    fractal_engine::io::weights::sha256_file(&dir.join(&f))?
                );
            }
        }
    }
    Ok(())
}
