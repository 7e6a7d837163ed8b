//! Files in and out: video containers and images, safetensors weights,
//! JSON configs.

use std::path::Path;

use crate::EngineError;

pub mod mapped;
pub mod video;
pub mod weights;

/// A JSON file under `dir`, with the path in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    dir: &Path,
    rel: &str,
) -> Result<T, EngineError> {
    let path = dir.join(rel);
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::Io {
        path: path.clone(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path,
        message: e.to_string(),
    })
}

/// The pipeline class a diffusers folder's `model_index.json` names.
pub fn pipeline_class(dir: &Path) -> Result<String, EngineError> {
    #[derive(serde::Deserialize)]
    struct Index {
        #[serde(rename = "_class_name")]
        class: String,
    }
    Ok(read_json::<Index>(dir, "model_index.json")?.class)
}
