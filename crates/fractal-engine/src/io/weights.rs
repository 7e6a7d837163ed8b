//! Loading safetensors weights one tensor at a time, every offset checked
//! against the file so a corrupt or truncated file is a clear error.
//!
//! An f32 tensor is a view of the file where the binary installed
//! [`super::mapped::WeightsAllocator`] (no bytes read at load; pages come in
//! on first use and stay shared with the page cache), and otherwise read
//! with a positioned read straight into its own buffer. Either way the peak
//! stays at the weights plus one tensor: candle's own mmap loader copies
//! every tensor out of its mapping, so the touched pages and the copies are
//! both resident (about 1.7x the weights at ModelScope size).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;

use super::mapped::Mapping;

/// Largest safetensors header we accept (real ones are well under 1 MiB).
const MAX_HEADER: u64 = 64 << 20;

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

struct TensorInfo {
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// The whole file mapped, where tensors can be views of it.
    mapping: Option<Mapping>,
    tensors: HashMap<String, TensorInfo>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {msg}", path.display()))
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| bad(path, e))?;
        let file_len = file.metadata().map_err(|e| bad(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| bad(path, "too short for a safetensors header"))?;
        let header_len = u64::from_le_bytes(n);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(bad(path, "safetensors header length is out of range"));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| bad(path, e))?;
        let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(path, format!("safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, v) in raw {
            if name == "__metadata__" {
                continue;
            }
            let e: Entry =
                serde_json::from_value(v).map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
            let dtype = match e.dtype.as_str() {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                other => {
                    return Err(bad(
                        path,
                        format!("tensor {name}: unsupported dtype {other}"),
                    ))
                }
            };
            let [s, t] = e.data_offsets;
            let elems = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let ok = s <= t
                && data_start.checked_add(t).is_some_and(|end| end <= file_len)
                && elems.and_then(|n| n.checked_mul(dtype.size_in_bytes()))
                    == Some((t - s) as usize);
            if !ok {
                return Err(bad(
                    path,
                    format!("tensor {name}: offsets do not fit its shape or the file"),
                ));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: e.shape,
                    start: data_start + s,
                    len: (t - s) as usize,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            mapping: Mapping::new(&file, file_len),
            file,
            tensors,
        })
    }

    /// Every tensor's name and shape, sorted by name.
    pub fn names(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        v.sort();
        v
    }

    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn read(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("no tensor {name}")))?;
        let read = |buf: &mut [u8]| {
            self.file
                .read_exact_at(buf, info.start)
                .map_err(|e| bad(&self.path, format!("reading {name}: {e}")))
        };
        // f32 (the pipeline's dtype) is used in place or read straight into
        // the tensor's own buffer: safetensors is little-endian, as the
        // targets we build for.
        if cfg!(target_endian = "little") && info.dtype == DType::F32 {
            let view = self
                .mapping
                .as_ref()
                .and_then(|m| m.f32_vec(usize::try_from(info.start).ok()?, info.len / 4));
            if let Some(data) = view {
                return Tensor::from_vec(data, info.shape.as_slice(), &Device::Cpu);
            }
            let mut data = vec![0f32; info.len / 4];
            // SAFETY: the u8 view covers exactly the f32 buffer, and every
            // bit pattern is a valid f32.
            read(unsafe {
                std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), info.len)
            })?;
            return Tensor::from_vec(data, info.shape.as_slice(), &Device::Cpu);
        }
        let mut bytes = vec![0u8; info.len];
        read(&mut bytes)?;
        Tensor::from_raw_buffer(&bytes, info.dtype, &info.shape, &Device::Cpu)
    }
}

impl SimpleBackend for SafetensorsFile {
    fn get(&self, shape: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &shape {
            return Err(bad(
                &self.path,
                format!(
                    "tensor {name} has shape {:?}, the config needs {:?}",
                    t.dims(),
                    shape.dims()
                ),
            ));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A model component stored as shards: `*.safetensors.index.json` maps
/// each tensor to its file (`weight_map`), as diffusers and transformers
/// save anything past a few GB.
pub struct ShardedSafetensors {
    index: PathBuf,
    shards: Vec<SafetensorsFile>,
    shard_of: HashMap<String, usize>,
}

impl ShardedSafetensors {
    /// Opens the index and every shard it names; each tensor it lists must
    /// be in its shard.
    pub fn open(index: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(index).map_err(|e| bad(index, e))?;
        let parsed: Index =
            serde_json::from_str(&text).map_err(|e| bad(index, format!("shard index: {e}")))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = parsed.weight_map.values().cloned().collect();
        files.sort();
        files.dedup();
        let shards = files
            .iter()
            .map(|f| {
                if f.contains('/') || f.contains("..") {
                    return Err(bad(
                        index,
                        format!("shard {f:?} is not a file beside the index"),
                    ));
                }
                let path = dir.join(f);
                if !path.is_file() {
                    return Err(bad(index, format!("shard {f} is missing")));
                }
                SafetensorsFile::open(&path)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut shard_of = HashMap::with_capacity(parsed.weight_map.len());
        for (name, file) in &parsed.weight_map {
            let i = files.binary_search(file).expect("listed above");
            if !shards[i].tensors.contains_key(name) {
                return Err(bad(
                    index,
                    format!("tensor {name} is not in its shard {file}"),
                ));
            }
            shard_of.insert(name.clone(), i);
        }
        Ok(Self {
            index: index.to_path_buf(),
            shards,
            shard_of,
        })
    }

    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for ShardedSafetensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        match self.shard_of.get(name) {
            Some(&i) => self.shards[i].get(shape, name, init, dtype, dev),
            None => Err(bad(&self.index, format!("no tensor {name}"))),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.shard_of.get(name) {
            Some(&i) => self.shards[i].get_unchecked(name, dtype, dev),
            None => Err(bad(&self.index, format!("no tensor {name}"))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shard_of.contains_key(name)
    }
}

/// A component's weights in `dir`: `{base}.safetensors`, or the shards its
/// `{base}.safetensors.index.json` lists (`base` is
/// `diffusion_pytorch_model` for diffusers' models, `model` for
/// transformers').
pub fn component_weights(
    dir: &Path,
    base: &str,
    dtype: DType,
    device: &Device,
) -> std::result::Result<VarBuilder<'static>, crate::EngineError> {
    let backend = component_backend(dir, base)?;
    Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
}

/// What [`component_weights`] reads from, for callers that wrap it (see
/// [`crate::degradation`]).
pub fn component_backend(
    dir: &Path,
    base: &str,
) -> std::result::Result<Box<dyn SimpleBackend>, crate::EngineError> {
    let single = dir.join(format!("{base}.safetensors"));
    let index = dir.join(format!("{base}.safetensors.index.json"));
    let weights = |e: candle_core::Error, path: PathBuf| crate::EngineError::Weights {
        path,
        message: e.to_string(),
    };
    if single.is_file() {
        return SafetensorsFile::open(&single)
            .map(|f| Box::new(f) as Box<dyn SimpleBackend>)
            .map_err(|e| weights(e, single));
    }
    if index.is_file() {
        return ShardedSafetensors::open(&index)
            .map(|f| Box::new(f) as Box<dyn SimpleBackend>)
            .map_err(|e| weights(e, index));
    }
    Err(crate::EngineError::MissingFile(single))
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(
    path: &Path,
) -> std::result::Result<fractal_protocol::Digest32, crate::EngineError> {
    use sha2::Digest as _;
    use std::io::Read;
    let io = |e| crate::EngineError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(fractal_protocol::Digest32(h.finalize().into()))
}

/// Every file whose content defines a diffusers folder's model, relative
/// and sorted: `model_index.json` and every file of its component folders
/// (configs, tokenizer files, weights whole or sharded with their index),
/// except hidden files and Markdown. A manifest pins all of them.
pub fn pinned_files(dir: &Path) -> std::result::Result<Vec<String>, crate::EngineError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| crate::EngineError::Io { path, source }
    };
    let index = dir.join("model_index.json");
    if !index.is_file() {
        return Err(crate::EngineError::MissingFile(index));
    }
    let mut files = vec!["model_index.json".to_string()];
    let mut components: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(io(dir))?;
    components.sort_by_key(|e| e.file_name());
    for component in components {
        let path = component.path();
        if !path.is_dir() || component.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let mut inside: Vec<String> = std::fs::read_dir(&path)
            .map_err(io(&path))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(io(&path))?
            .into_iter()
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && !n.ends_with(".md"))
            .map(|n| format!("{}/{n}", component.file_name().to_string_lossy()))
            .collect();
        inside.sort();
        files.extend(inside);
    }
    Ok(files)
}

/// Checks that a folder holds exactly the weights a manifest pins; a prover
/// refuses to start otherwise.
pub fn verify_weights(
    dir: &Path,
    manifest: &fractal_protocol::ModelManifest,
) -> std::result::Result<(), crate::EngineError> {
    use fractal_protocol::manifest::Weights;
    let Weights::Files(files) = &manifest.weights else {
        return Err(crate::EngineError::BadInput(format!(
            "manifest {} pins built-in weights, not a folder",
            manifest.name
        )));
    };
    for (rel, want) in files {
        let path = dir.join(rel);
        if !path.is_file() {
            return Err(crate::EngineError::MissingFile(path));
        }
        let got = sha256_file(&path)?;
        if got != *want {
            return Err(crate::EngineError::HashMismatch {
                path,
                expected: want.to_string(),
                got: got.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_load_through_their_index_and_gaps_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let t = |v: f32| Tensor::full(v, (2, 2), &Device::Cpu).unwrap();
        let save = |file: &str, names: &[(&str, f32)]| {
            let m: HashMap<String, Tensor> =
                names.iter().map(|(n, v)| (n.to_string(), t(*v))).collect();
            candle_core::safetensors::save(&m, dir.path().join(file)).unwrap();
        };
        save(
            "model-00001-of-00002.safetensors",
            &[("a", 1.0), ("b", 2.0)],
        );
        save("model-00002-of-00002.safetensors", &[("c", 3.0)]);
        let index = |map: serde_json::Value| {
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                serde_json::json!({"metadata": {"total_size": 48}, "weight_map": map}).to_string(),
            )
            .unwrap();
        };
        index(serde_json::json!({"a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}));
        let vb = component_weights(dir.path(), "model", DType::F32, &Device::Cpu).unwrap();
        let c = vb.get((2, 2), "c").unwrap();
        assert_eq!(c.to_vec2::<f32>().unwrap(), vec![vec![3.0; 2]; 2]);
        assert!(vb.contains_tensor("a") && !vb.contains_tensor("d"));
        let err = |map: serde_json::Value| {
            index(map);
            component_weights(dir.path(), "model", DType::F32, &Device::Cpu)
                .err()
                .expect("refused")
                .to_string()
        };
        let e = err(serde_json::json!({"a": "model-00003-of-00003.safetensors"}));
        assert!(
            e.contains("shard model-00003-of-00003.safetensors is missing"),
            "{e}"
        );
        let e = err(serde_json::json!({"z": "model-00002-of-00002.safetensors"}));
        assert!(e.contains("tensor z is not in its shard"), "{e}");
        let e = err(serde_json::json!({"a": "../elsewhere.safetensors"}));
        assert!(e.contains("not a file beside the index"), "{e}");
        std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
        assert!(matches!(
            component_weights(dir.path(), "model", DType::F32, &Device::Cpu),
            Err(crate::EngineError::MissingFile(_))
        ));
    }

    #[test]
    fn reads_tensors_and_rejects_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a.clone())]), &path)
            .unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert!(f.contains_tensor("a") && !f.contains_tensor("b"));
        let got = f
            .get(
                Shape::from((2, 3)),
                "a",
                Init::Const(0.),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert!(f
            .get(
                Shape::from((3, 2)),
                "a",
                Init::Const(0.),
                DType::F32,
                &Device::Cpu
            )
            .is_err());
        assert!(f
            .get(
                Shape::from((2, 3)),
                "b",
                Init::Const(0.),
                DType::F32,
                &Device::Cpu
            )
            .is_err());

        let bytes = std::fs::read(&path).unwrap();
        for (what, data) in [
            ("truncated", bytes[..bytes.len() - 4].to_vec()),
            ("empty", Vec::new()),
            (
                "huge header",
                [u64::MAX.to_le_bytes().to_vec(), bytes[8..].to_vec()].concat(),
            ),
            (
                "garbage header",
                [bytes[..8].to_vec(), vec![b'x'; bytes.len() - 8]].concat(),
            ),
        ] {
            std::fs::write(&path, data).unwrap();
            assert!(SafetensorsFile::open(&path).is_err(), "{what}");
        }
    }
}
