//! The built-in tiny model end to end: shapes, determinism, the loader.

use candle_core::{Device, Tensor};
use fractal_engine::pipelines::text_to_video_sd::{Model, TextToVideoSd};
use fractal_engine::{GenerateSpec, Pipeline, TinyVariant};
use fractal_protocol::Seed;

fn spec(seed: u64) -> GenerateSpec {
    GenerateSpec {
        prompt: "a red fox".into(),
        negative_prompt: String::new(),
        seed: Seed(seed),
        frames: 4,
        height: 32,
        width: 32,
        steps: 3,
        guidance_scale: 7.5,
    }
}

fn pipeline() -> Pipeline {
    let m = fractal_engine::builtin::tiny::manifest(TinyVariant::Base);
    TextToVideoSd::new(
        Model::tiny(TinyVariant::Base, &Device::Cpu).unwrap(),
        m.scheduler,
    )
    .into()
}

fn run(p: &Pipeline, s: &GenerateSpec) -> (Vec<Vec<f32>>, Vec<u8>) {
    let mut trace = Vec::new();
    let out = p
        .generate(s, &mut |e| {
            trace.push(e.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .unwrap();
    (trace, out.rgb8().unwrap())
}

#[test]
fn same_seed_same_bits_other_seed_differs() {
    let p = pipeline();
    let (t1, v1) = run(&p, &spec(1));
    let (t2, v2) = run(&p, &spec(1));
    assert_eq!(t1.len(), 4, "initial latents + 3 steps");
    assert_eq!(v1.len(), 4 * 32 * 32 * 3);
    let bits = |t: &Vec<Vec<f32>>| t.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&t1), bits(&t2));
    assert_eq!(v1, v2);
    let (t3, v3) = run(&p, &spec(2));
    assert_ne!(bits(&t1), bits(&t3));
    assert_ne!(v1, v3);
    assert!(t1.iter().flatten().all(|x| x.is_finite()));
    // The video is not a flat colour.
    let (lo, hi) = (v1.iter().min().unwrap(), v1.iter().max().unwrap());
    assert!(hi - lo > 10, "{lo}..{hi}");
}

/// The fused CPU kernels and candle's ops (the path CUDA takes) compute the
/// same pipeline: every step's latents and the decoded frames agree.
#[test]
fn fused_cpu_kernels_match_candle_ops() {
    let p = pipeline();
    let s = GenerateSpec {
        frames: 3,
        height: 40,
        width: 24,
        ..spec(5)
    };
    fractal_engine::kernels::cpu::set_enabled(Some(true));
    let (fused, v1) = run(&p, &s);
    fractal_engine::kernels::cpu::set_enabled(Some(false));
    let (plain, v2) = run(&p, &s);
    fractal_engine::kernels::cpu::set_enabled(None);
    assert_ne!(fused, plain, "the switch must change which ops run");
    for (step, (a, b)) in fused.iter().zip(&plain).enumerate() {
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "step {step}: max abs {err}");
    }
    let worst = v1
        .iter()
        .zip(&v2)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "frames differ by {worst}/255");
}

#[test]
fn exported_folder_loads_and_matches_the_builtin_model() {
    let dir = tempfile::tempdir().unwrap();
    let m = fractal_engine::builtin::tiny::manifest(TinyVariant::Base);
    let files = Model::write_tiny_folder(TinyVariant::Base, dir.path(), &m.scheduler).unwrap();
    assert_eq!(files.len(), 3);
    // The engine only decodes, but diffusers loads the whole autoencoder.
    let vae = fractal_engine::io::weights::SafetensorsFile::open(
        &dir.path().join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let names: Vec<String> = vae.names().into_iter().map(|(n, _)| n).collect();
    for want in [
        "encoder.conv_in.weight",
        "quant_conv.weight",
        "decoder.conv_out.weight",
        "post_quant_conv.weight",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from the exported VAE"
        );
    }
    let loaded: Pipeline = TextToVideoSd::new(
        Model::load(dir.path(), &Device::Cpu).unwrap(),
        m.scheduler.clone(),
    )
    .into();
    let builtin = pipeline();
    let s = spec(9);
    let a = builtin.initial_latents(&s).unwrap();
    let ctx_a = builtin.context(&s).unwrap();
    let ctx_b = loaded.context(&s).unwrap();
    assert_eq!(max_abs(&ctx_a, &ctx_b), 0.0);
    let ya = builtin
        .denoise_step(&mut builtin.scheduler_for(3).unwrap(), 1, &a, &ctx_a, 7.5)
        .unwrap();
    let yb = loaded
        .denoise_step(&mut loaded.scheduler_for(3).unwrap(), 1, &a, &ctx_b, 7.5)
        .unwrap();
    assert_eq!(max_abs(&ya.output, &yb.output), 0.0);
    assert_eq!(max_abs(&ya.latents, &yb.latents), 0.0);
    // Export is byte-for-byte reproducible (manifests pin file hashes).
    let dir2 = tempfile::tempdir().unwrap();
    Model::write_tiny_folder(TinyVariant::Base, dir2.path(), &m.scheduler).unwrap();
    for f in fractal_engine::pipelines::text_to_video_sd::model::WEIGHT_FILES {
        assert_eq!(
            std::fs::read(dir.path().join(f)).unwrap(),
            std::fs::read(dir2.path().join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let p = pipeline();
    let mut s = spec(1);
    s.frames = 0;
    assert!(p.generate(&s, &mut |_| {}).is_err());
    let mut s = spec(1);
    s.width = 33;
    assert!(p.generate(&s, &mut |_| {}).is_err());
    let mut s = spec(1);
    s.steps = 0;
    assert!(p.generate(&s, &mut |_| {}).is_err());
    let dir = tempfile::tempdir().unwrap();
    let err = Model::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model_index.json"), "{err}");
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    fractal_engine::pipelines::max_abs_diff(a, b).unwrap()
}

/// A verifier decodes single frames; they must equal the full decode's frames.
#[test]
fn single_frame_decode_matches_full_decode() {
    let p = pipeline();
    let s = spec(3);
    let latents = p.initial_latents(&s).unwrap();
    let all = p.decode(&latents).unwrap();
    for f in [0, 3] {
        let one = p.decode_frame(&latents, f).unwrap();
        assert_eq!(
            max_abs(&one, &all.narrow(0, f, 1).unwrap()),
            0.0,
            "frame {f}"
        );
    }
}

/// A folder whose UNet is stored as shards with an index (as diffusers
/// saves large models) loads to the same model.
#[test]
fn sharded_component_loads_like_the_single_file() {
    let m = fractal_engine::builtin::tiny::manifest(TinyVariant::Base);
    let dir = tempfile::tempdir().unwrap();
    Model::write_tiny_folder(TinyVariant::Base, dir.path(), &m.scheduler).unwrap();
    let unet = dir.path().join("unet");
    let single = unet.join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].into_iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let shard: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, unet.join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    std::fs::remove_file(&single).unwrap();
    let sharded: Pipeline = TextToVideoSd::new(
        Model::load(dir.path(), &Device::Cpu).unwrap(),
        m.scheduler.clone(),
    )
    .into();
    let builtin = pipeline();
    let s = spec(3);
    let x = builtin.initial_latents(&s).unwrap();
    let ctx = builtin.context(&s).unwrap();
    let a = builtin
        .model_output(&builtin.scheduler_for(3).unwrap(), 0, &x, &ctx, 7.5)
        .unwrap();
    let b = sharded
        .model_output(&sharded.scheduler_for(3).unwrap(), 0, &x, &ctx, 7.5)
        .unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
    // A shard gone is a clear error naming it.
    std::fs::remove_file(unet.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let err = Model::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("shard diffusion_pytorch_model-00002-of-00002.safetensors is missing"),
        "{err}"
    );
}
