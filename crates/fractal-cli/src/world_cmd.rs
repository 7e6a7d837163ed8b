//! `fractal world`: the toy video world (`fractal_world`), exported for
//! the training script in `tools/train`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use fractal_world::{render, Scene, Split};

#[derive(Subcommand)]
pub enum WorldCmd {
    /// Render scenes of the world into DIR: `clips.u8` (every clip's RGB8
    /// frames, back to back: count x frames x size x size x 3 bytes) and
    /// `index.json` (each clip's caption, scene split and seed).
    Export(ExportArgs),
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Which scenes: the training split, the held-out one, or all.
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
    /// Clips per scene, each from its own seed (a different start).
    #[arg(long, default_value_t = 8)]
    seeds: u64,
    #[arg(long, default_value_t = 8)]
    frames: usize,
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Folder to write (made if missing; its two files are replaced).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SplitArg {
    Train,
    HeldOut,
    All,
}

impl SplitArg {
    fn keeps(self, split: Split) -> bool {
        match self {
            SplitArg::Train => split == Split::Train,
            SplitArg::HeldOut => split == Split::HeldOut,
            SplitArg::All => true,
        }
    }
}

/// The seed of clip `k` of scene number `index` in [`Scene::all`]'s order:
/// distinct for every clip of an export.
fn clip_seed(index: usize, k: u64) -> u64 {
    (index as u64) << 20 | k
}

pub fn run(cmd: WorldCmd) -> anyhow::Result<()> {
    match cmd {
        WorldCmd::Export(a) => export(a),
    }
}

fn export(a: ExportArgs) -> anyhow::Result<()> {
    if a.size < 16 || a.frames < 2 {
        bail!("--size must be at least 16 and --frames at least 2");
    }
    if a.seeds == 0 || a.seeds >= 1 << 20 {
        bail!("--seeds must be between 1 and {}", (1 << 20) - 1);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("making {}", a.out.display()))?;
    let clips_path = a.out.join("clips.u8");
    let partial = a.out.join("clips.u8.partial");
    let mut clips = std::io::BufWriter::new(
        std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?,
    );
    let mut index = Vec::new();
    for (i, scene) in Scene::all().iter().enumerate() {
        let split = scene.split();
        if !a.split.keeps(split) {
            continue;
        }
        for k in 0..a.seeds {
            let seed = clip_seed(i, k);
            for frame in render(scene, seed, a.frames, a.size).frames {
                clips.write_all(&frame)?;
            }
            index.push(serde_json::json!({
                "caption": scene.caption(),
                "held_out": split == Split::HeldOut,
                "seed": seed,
            }));
        }
    }
    clips.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&partial, &clips_path)?;
    let doc = serde_json::json!({
        "frames": a.frames,
        "size": a.size,
        "count": index.len(),
        "clips": index,
    });
    std::fs::write(
        a.out.join("index.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    println!(
        "wrote {} clips ({} frames of {}x{}) to {}",
        doc["count"],
        a.frames,
        a.size,
        a.size,
        a.out.display()
    );
    Ok(())
}
