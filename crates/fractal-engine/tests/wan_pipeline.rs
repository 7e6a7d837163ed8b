//! The built-in tiny Wan end to end: through the roles' interface
//! ([`PinnedModel`], [`Pipeline`]), determinism, the exported folder (whole
//! and sharded) loading to the same bits, and clear errors for requests and
//! folders it cannot serve.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use fractal_engine::builtin::tiny_wan::{self, WanVariant};
use fractal_engine::{pipelines, EngineError, PinnedModel};
use fractal_protocol::manifest::{self, ModelManifest, Size, Weights};
use fractal_protocol::wire::GenerateRequest;
use fractal_protocol::Digest32;
use fractal_protocol::Seed;

fn builtin() -> PinnedModel {
    PinnedModel::load(tiny_wan::manifest(WanVariant::Tiny), None, &Device::Cpu).unwrap()
}

fn request(m: &PinnedModel, seed: u64) -> GenerateRequest {
    let mut r = GenerateRequest::with_defaults(&m.manifest, "a red circle moving left", Seed(seed));
    r.size = Size {
        width: 32,
        height: 32,
    };
    r.frames = 5;
    r.steps = 3;
    r
}

/// Every latent of the trace (as bits) and the frames as RGB8.
fn run(m: &PinnedModel, r: &GenerateRequest) -> (Vec<u32>, Vec<u8>, Vec<usize>) {
    let spec = m.spec(r).unwrap();
    let mut bits = Vec::new();
    let out = m
        .pipeline
        .generate(&spec, &mut |e| {
            bits.extend(
                pipelines::values(e.latents)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits()),
            )
        })
        .unwrap();
    (bits, out.rgb8().unwrap(), out.frames.dims().to_vec())
}

#[test]
fn same_seed_same_bits_and_the_clip_has_the_frames_asked() {
    let m = builtin();
    let (t1, v1, dims) = run(&m, &request(&m, 1));
    let (t2, v2, _) = run(&m, &request(&m, 1));
    assert_eq!(dims, [5, 3, 32, 32]);
    assert_eq!(t1, t2);
    assert_eq!(v1, v2);
    let (t3, v3, _) = run(&m, &request(&m, 2));
    assert_ne!(t1, t3);
    assert_ne!(v1, v3);
    let (lo, hi) = (v1.iter().min().unwrap(), v1.iter().max().unwrap());
    assert!(hi - lo > 10, "not a flat colour: {lo}..{hi}");
    // The prompt conditions the result.
    let mut other = request(&m, 1);
    other.prompt = "a blue square".into();
    assert_ne!(run(&m, &other).1, v1);
}

#[test]
fn one_decoded_frame_is_the_clips_frame() {
    let m = builtin();
    let p = &m.pipeline;
    let spec = m.spec(&request(&m, 3)).unwrap();
    let latents = p.initial_latents(&spec).unwrap();
    let all = p.decode(&latents).unwrap();
    for frame in [0, 1, 4] {
        let one = p.decode_frame(&latents, frame).unwrap();
        let err = pipelines::max_abs_diff(&one, &all.narrow(0, frame, 1).unwrap()).unwrap();
        assert_eq!(err, 0.0, "frame {frame}");
    }
    assert!(p.decode_frame(&latents, 5).is_err());
}

#[test]
fn requests_it_cannot_make_are_refused_with_reasons() {
    let m = builtin();
    let mut r = request(&m, 1);
    r.frames = 8;
    let e = m.spec(&r).unwrap_err().to_string();
    assert!(e.contains("1 + 4k frames"), "{e}");
    let mut r = request(&m, 1);
    r.size = Size {
        width: 48,
        height: 48,
    };
    let e = m.spec(&r).unwrap_err().to_string();
    assert!(e.contains("not served"), "{e}");
    let e = m.pipeline.latent_shape(5, 40, 40).unwrap_err().to_string();
    assert!(e.contains("multiple of 16"), "{e}");
    // A manifest whose sizes the model cannot make is refused at parse time.
    let mut bad = tiny_wan::manifest(WanVariant::Tiny);
    bad.limits.sizes.push(Size {
        width: 72,
        height: 64,
    });
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("multiple of 16"), "{e}");
    let mut bad = tiny_wan::manifest(WanVariant::Tiny);
    bad.defaults.frames = 10;
    assert!(bad.validate().unwrap_err().to_string().contains("1 + 4k"));
}

/// Writes the tiny Wan as a diffusers folder and a manifest pinning it.
fn export(dir: &Path) -> ModelManifest {
    let m = tiny_wan::manifest(WanVariant::Tiny);
    pipelines::wan::Model::write_tiny_folder(WanVariant::Tiny, dir, &m.scheduler).unwrap();
    export_pins(dir)
}

/// Splits `component/{stem}.safetensors` into two shards with their index,
/// as the real Wan folders ship the transformer and text encoder.
fn shard(dir: &Path, component: &str, stem: &str) {
    let path = dir.join(component).join(format!("{stem}.safetensors"));
    let all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("{stem}-0000{}-of-00002.safetensors", i + 1);
        let tensors: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| (n.to_string(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(component).join(&file)).unwrap();
        for n in part {
            map.insert(n.to_string(), file.clone().into());
        }
    }
    std::fs::write(
        dir.join(component)
            .join(format!("{stem}.safetensors.index.json")),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
}

#[test]
fn an_exported_folder_whole_or_sharded_loads_to_the_same_bits() {
    let want = run(&builtin(), &request(&builtin(), 4));
    let dir = tempfile::tempdir().unwrap();
    let manifest = export(dir.path());
    let loaded = PinnedModel::load(manifest, Some(dir.path()), &Device::Cpu).unwrap();
    let mut r = request(&loaded, 4);
    r.manifest_id = loaded.manifest_id;
    assert_eq!(run(&loaded, &r), want);

    shard(dir.path(), "transformer", "diffusion_pytorch_model");
    shard(dir.path(), "text_encoder", "model");
    let sharded = export_pins(dir.path());
    let loaded = PinnedModel::load(sharded.clone(), Some(dir.path()), &Device::Cpu).unwrap();
    let mut r = request(&loaded, 4);
    r.manifest_id = loaded.manifest_id;
    assert_eq!(run(&loaded, &r), want);
    let unpinned =
        PinnedModel::unpinned_folder(dir.path(), &Device::Cpu, None, manifest::DType::F32).unwrap();
    assert_eq!(unpinned.manifest.scheduler, sharded.scheduler);

    // A changed shard is a hash mismatch; a missing one a missing file.
    let shard1 = dir
        .path()
        .join("transformer/diffusion_pytorch_model-00001-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard1).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard1, &bytes).unwrap();
    let e = PinnedModel::load(sharded.clone(), Some(dir.path()), &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(e, EngineError::HashMismatch { .. }), "{e}");
    std::fs::remove_file(&shard1).unwrap();
    let e = PinnedModel::load(sharded, Some(dir.path()), &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(e, EngineError::MissingFile(_)), "{e}");
    let e = PinnedModel::unpinned_folder(dir.path(), &Device::Cpu, None, manifest::DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}

/// The tiny manifest pinning every file of `dir` as it is now.
fn export_pins(dir: &Path) -> ModelManifest {
    let mut m = tiny_wan::manifest(WanVariant::Tiny);
    let files: BTreeMap<String, Digest32> = fractal_engine::io::weights::pinned_files(dir)
        .unwrap()
        .into_iter()
        .map(|f| {
            let d = fractal_engine::io::weights::sha256_file(&dir.join(&f)).unwrap();
            (f, d)
        })
        .collect();
    m.weights = Weights::Files(files);
    m
}

#[test]
fn a_folder_of_another_shape_than_its_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = export(dir.path());
    let fractal_protocol::manifest::Architecture::Wan(spec) = &mut m.architecture else {
        unreachable!()
    };
    spec.vae_scale_spatial = 16;
    m.limits
        .sizes
        .retain(|s| s.width % 32 == 0 && s.height % 32 == 0);
    m.defaults.size = m.limits.sizes[0];
    let e = PinnedModel::load(m, Some(dir.path()), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("VAE scales"), "{e}");
}

/// The example manifest is the built-in one, so the docs cannot drift.
#[test]
fn the_example_manifest_is_the_builtin_one() {
    let text = include_str!("../../../examples/manifest-tiny-wan.toml");
    let parsed = ModelManifest::parse(text).unwrap();
    assert_eq!(parsed, tiny_wan::manifest(WanVariant::Tiny));
    assert_eq!(parsed.id(), tiny_wan::manifest(WanVariant::Tiny).id());
}
