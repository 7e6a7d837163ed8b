use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use fractal_engine::{model::WEIGHT_FILES, tiny, Model, TinyVariant};
use fractal_protocol::Digest32;
use sha2::{Digest, Sha256};

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Write a built-in tiny model as a diffusers folder (for diffusers parity runs or as a test model).
    ExportTiny {
        /// tiny-v1 or tiny-wide-v1.
        #[arg(long, default_value = "tiny-v1")]
        variant: String,
        out: PathBuf,
    },
    /// Print the SHA-256 of a diffusers folder's weight files, as a manifest's [weights.files] table.
    Hash { dir: PathBuf },
}

fn sha256_file(path: &std::path::Path) -> anyhow::Result<Digest32> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest32(h.finalize().into()))
}

pub fn run(cmd: ModelCmd) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::ExportTiny { variant, out } => {
            let Some(v) = TinyVariant::parse(&variant) else {
                bail!("unknown tiny variant {variant:?} (tiny-v1, tiny-wide-v1)")
            };
            let files = Model::write_tiny_folder(v, &out, &tiny::manifest(v).scheduler)?;
            println!("wrote {} ({} weight files)", out.display(), files.len());
        }
        ModelCmd::Hash { dir } => {
            println!("[weights.files]");
            for f in WEIGHT_FILES {
                println!("\"{f}\" = \"{}\"", sha256_file(&dir.join(f))?);
            }
        }
    }
    Ok(())
}
