use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use fractal_engine::{
    builtin::tiny, pipelines::text_to_video_sd::model::PINNED_FILES,
    pipelines::text_to_video_sd::Model, TinyVariant,
};
use fractal_protocol::manifest::SchedulerKind;

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Write a built-in tiny model as a diffusers folder (for diffusers parity runs or as a test model).
    ExportTiny {
        /// tiny-v1 or tiny-wide-v1.
        #[arg(long, default_value = "tiny-v1")]
        variant: String,
        /// Scheduler written to scheduler/scheduler_config.json: ddim or dpm-solver.
        #[arg(long, default_value = "ddim")]
        scheduler: String,
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
            let Some(v) = TinyVariant::parse(&variant) else {
                bail!("unknown tiny variant {variant:?} (tiny-v1, tiny-wide-v1)")
            };
            let mut spec = tiny::manifest(v).scheduler;
            spec.kind = match scheduler.as_str() {
                "ddim" => SchedulerKind::Ddim,
                "dpm-solver" => SchedulerKind::DpmSolverMultistep,
                other => bail!("unknown scheduler {other:?} (ddim, dpm-solver)"),
            };
            let files = Model::write_tiny_folder(v, &out, &spec)?;
            println!("wrote {} ({} weight files)", out.display(), files.len());
        }
        ModelCmd::Hash { dir } => {
            println!("[weights.files]");
            for f in PINNED_FILES.iter().filter(|f| dir.join(f).is_file()) {
                println!(
                    "\"{f}\" = \"{}\"",
                    fractal_engine::io::weights::sha256_file(&dir.join(f))?
                );
            }
        }
    }
    Ok(())
}
