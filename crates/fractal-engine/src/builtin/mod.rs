//! Models built into the binary, so tests and `fractal grid` need no
//! download: `world-v1` (trained on the toy world, weight files carried in
//! the binary) and the tiny models (configs with weights derived from
//! parameter names, for parity tests and measurements at real shapes).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use crate::EngineError;

pub mod tiny;
pub mod tiny_wan;
pub mod world;

/// The model `fractal generate`, `fractal grid` and the node roles run
/// when none is named. Still the untrained tiny model: `world-v1` becomes
/// the default once it meets its quality targets (`fractal bench quality`).
pub const DEFAULT_NAME: &str = "tiny-v1";

/// Writes `value` as pretty JSON to `dir/rel`, making its folder.
pub(crate) fn write_json(
    dir: &Path,
    rel: &str,
    value: &serde_json::Value,
) -> Result<(), EngineError> {
    let path = dir.join(rel);
    let io = |source| EngineError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(path.parent().expect("a file in a folder")).map_err(io)?;
    std::fs::write(
        &path,
        serde_json::to_string_pretty(value).expect("json") + "\n",
    )
    .map_err(io)
}

/// Saves `tensors` as one safetensors file at `path`, making its folder.
/// The file is written beside it and renamed over it: a process that has
/// the old file mapped (a running prover, see [`crate::io::mapped`]) keeps
/// its weights, and a crash leaves no half-written file under the name.
pub(crate) fn save_tensors(
    tensors: BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(), EngineError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| EngineError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    let partial = path.with_extension("safetensors.partial");
    candle_core::safetensors::save(&tensors, &partial).map_err(|e| EngineError::Weights {
        path: partial.clone(),
        message: e.to_string(),
    })?;
    std::fs::rename(&partial, path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The built-in models, by name.
pub const NAMES: [&str; 6] = [
    world::WORLD_NAME,
    "tiny-v1",
    "tiny-wide-v1",
    "ms-1.7b-shape",
    "tiny-wan-v1",
    "wan-1.3b-shape",
];

/// The manifest that pins the built-in model `name`.
pub fn manifest(name: &str) -> Option<fractal_protocol::ModelManifest> {
    if name == world::WORLD_NAME {
        return Some(world::manifest());
    }
    if let Some(v) = tiny::TinyVariant::parse(name) {
        return Some(tiny::manifest(v));
    }
    tiny_wan::WanVariant::parse(name).map(tiny_wan::manifest)
}

/// `name` as a built-in model, or an error listing the ones there are.
pub fn manifest_or_err(name: &str) -> Result<fractal_protocol::ModelManifest, EngineError> {
    manifest(name).ok_or_else(|| {
        EngineError::BadInput(format!(
            "no built-in model named {name:?} (built in: {})",
            NAMES.join(", ")
        ))
    })
}
