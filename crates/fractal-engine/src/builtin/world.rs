//! `world-v1`, the trained built-in model: TextToVideoSD at small widths,
//! trained by `tools/train` on the toy world of the `fractal-world` crate
//! (circles, squares and triangles of a few colours moving across plain
//! backgrounds). It knows those scenes and nothing else.
//!
//! Unlike the tiny models its weights are files: the diffusers folder
//! `models/world-v1/` of the repository, pinned by the manifest beside it
//! and carried inside the binary. Loading writes the pinned files once to a
//! cache folder and loads that folder as any checkpoint is loaded, every
//! hash checked against the manifest; a folder changed on disk is rewritten.
//! It has no `tokenizer/`: the loader's built-in CLIP vocabulary is the one
//! it was trained with.

use std::path::{Path, PathBuf};

use fractal_protocol::manifest::ModelManifest;

use crate::EngineError;

pub const WORLD_NAME: &str = "world-v1";

const MANIFEST: &str = include_str!("../../../../models/world-v1/manifest.toml");

macro_rules! embedded {
    ($($rel:literal),* $(,)?) => {
        [$(($rel, include_bytes!(concat!("../../../../models/world-v1/", $rel)) as &[u8])),*]
    };
}

/// The pinned files, as the binary carries them.
const FILES: [(&str, &[u8]); 8] = embedded![
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

/// world-v1's manifest (`models/world-v1/manifest.toml`).
pub fn manifest() -> ModelManifest {
    ModelManifest::parse(MANIFEST).expect("the committed world-v1 manifest parses")
}

/// Where the folder is written: `$FRACTAL_CACHE`, else `~/.fractal/models`.
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FRACTAL_CACHE") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".fractal").join("models"),
        None => std::env::temp_dir().join("fractal-models"),
    }
}

/// The folder of the built-in model `manifest` pins, written from the
/// binary where it is missing or differs; `None` when the binary carries
/// no files for it.
pub fn folder_for(manifest: &ModelManifest) -> Result<Option<PathBuf>, EngineError> {
    folder_in(&cache_root(), manifest)
}

/// [`folder_for`] under `root` instead of the cache.
pub fn folder_in(root: &Path, manifest: &ModelManifest) -> Result<Option<PathBuf>, EngineError> {
    if manifest.weights != self::manifest().weights {
        return Ok(None);
    }
    let dir = root.join(format!("{WORLD_NAME}-{}", &manifest.id().to_string()[..16]));
    for (rel, bytes) in FILES {
        write_if_changed(&dir.join(rel), bytes)?;
    }
    Ok(Some(dir))
}

/// Writes `bytes` at `path` unless it already holds them: beside it first,
/// then renamed over it, so concurrent loaders and crashes never leave a
/// half-written file under the name.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    if std::fs::read(path).is_ok_and(|held| held == bytes) {
        return Ok(());
    }
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path.parent().expect("a file in a folder")).map_err(io)?;
    // Unique per process and call: two loaders never share a partial file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("partial.{}.{n}", std::process::id()));
    std::fs::write(&partial, bytes).map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractal_protocol::manifest::Weights;

    /// Whether every file the manifest pins is carried (and nothing else).
    fn pins_exactly_the_carried_files(manifest: &ModelManifest) -> bool {
        let Weights::Files(files) = &manifest.weights else {
            return false;
        };
        files
            .keys()
            .map(String::as_str)
            .eq(FILES.iter().map(|(rel, _)| *rel))
    }

    #[test]
    fn the_manifest_pins_the_carried_files_and_their_hashes() {
        let m = manifest();
        assert!(pins_exactly_the_carried_files(&m));
        let root = tempfile::tempdir().unwrap();
        let folder = folder_in(root.path(), &m)
            .unwrap()
            .expect("world-v1 is carried");
        crate::io::weights::verify_weights(&folder, &m).unwrap();
        // A file changed on disk is put back.
        let unet = folder.join("unet/config.json");
        std::fs::write(&unet, "{}").unwrap();
        assert!(crate::io::weights::verify_weights(&folder, &m).is_err());
        folder_in(root.path(), &m).unwrap();
        crate::io::weights::verify_weights(&folder, &m).unwrap();
        // Another manifest's files are not carried.
        let tiny = crate::builtin::manifest("tiny-v1").unwrap();
        assert_eq!(folder_in(root.path(), &tiny).unwrap(), None);
    }
}
