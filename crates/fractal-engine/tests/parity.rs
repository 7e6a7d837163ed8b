//! Parity with Python diffusers 0.42 on the tiny configs in
//! fixtures/parity (made by tools/parity/make_fixtures.sh from the very
//! weights `Model::tiny` builds) and on the committed world-v1 folder at
//! its serving shape. Every stage must match within TOLERANCE.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use fractal_engine::builtin::world;
use fractal_engine::pipelines::text_to_video_sd::{Model, TextToVideoSd};
use fractal_engine::{GenerateSpec, Pipeline, TinyVariant};
use fractal_protocol::Seed;

/// Max absolute error allowed per stage, in f32.
const TOLERANCE: f32 = 1e-4;

/// `FRACTAL_TEST_DEVICE=cuda` runs the comparison on the GPU (a `--features
/// cuda` build); the fixtures were made on the CPU.
fn device() -> Device {
    let name = std::env::var("FRACTAL_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    fractal_engine::device_from_name(&name).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    fractal_engine::pipelines::max_abs_diff(a, b).unwrap()
}

fn check(name: &str) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/parity/");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}{name}.json")).unwrap())
            .unwrap();
    let device = device();
    let fx: HashMap<String, Tensor> =
        candle_core::safetensors::load(format!("{dir}{name}.safetensors"), &device).unwrap();
    let (model, scheduler) = if meta["folder"].is_string() {
        // The committed world-v1 folder, as every command loads it.
        let manifest = world::manifest();
        let dir = world::folder_for(&manifest).unwrap().unwrap();
        (Model::load(&dir, &device).unwrap(), manifest.scheduler)
    } else {
        let variant = TinyVariant::parse(meta["variant"].as_str().unwrap()).unwrap();
        let mut scheduler = fractal_engine::builtin::tiny::manifest(variant).scheduler;
        if meta["scheduler"].as_str() == Some("dpm-solver") {
            scheduler = scheduler
                .with_kind(fractal_protocol::manifest::SchedulerKind::DpmSolverMultistep)
                .unwrap();
        }
        (Model::tiny(variant, &device).unwrap(), scheduler)
    };
    let sd = TextToVideoSd::new(model, scheduler);
    let ids = |k: &str| {
        fx[k]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect::<Vec<_>>()
    };
    let u = |k: &str| meta[k].as_u64().unwrap() as usize;
    // The fixtures hold token ids: the prompts are encoded from them.
    let (prompt_ids, negative_ids) = (ids("prompt_ids"), ids("negative_ids"));
    let spec = GenerateSpec {
        prompt: String::new(),
        negative_prompt: String::new(),
        seed: Seed(meta["seed"].as_u64().unwrap()),
        frames: u("frames"),
        height: u("height"),
        width: u("width"),
        steps: u("steps"),
        guidance_scale: meta["guidance"].as_f64().unwrap(),
    };
    let mut report = Vec::new();
    let mut stage = |what: String, err: f32| {
        report.push(format!("{what}: {err:.2e}"));
        assert!(
            err <= TOLERANCE,
            "{name} {what}: max abs error {err} > {TOLERANCE}\n{}",
            report.join("\n")
        );
    };

    let cond = sd.encode_prompt(&prompt_ids).unwrap().squeeze(0).unwrap();
    stage("text_cond".into(), max_abs(&cond, &fx["text_cond"]));
    let uncond = sd.encode_prompt(&negative_ids).unwrap().squeeze(0).unwrap();
    stage("text_uncond".into(), max_abs(&uncond, &fx["text_uncond"]));

    let context = if spec.guidance_scale > 1.0 {
        sd.encode_prompts(&negative_ids, &prompt_ids).unwrap()
    } else {
        sd.encode_prompt(&prompt_ids).unwrap()
    };
    let out = sd
        .model
        .unet
        .forward(&fx["unet_in"], meta["t"].as_f64().unwrap(), &context)
        .unwrap();
    stage("unet_forward".into(), max_abs(&out, &fx["unet_out"]));

    let p = Pipeline::from(sd);
    let ddim = p.scheduler_for(spec.steps).unwrap();
    let expected_t: Vec<usize> = meta["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as usize)
        .collect();
    let got: Vec<usize> = (0..ddim.len())
        .map(|i| ddim.timestep(i).unwrap() as usize)
        .collect();
    assert_eq!(got, expected_t);

    let mut latents = Vec::new();
    let generated = p
        .generate_from(&spec, &context, &mut |e| latents.push(e.latents.clone()))
        .unwrap();
    assert_eq!(latents.len(), spec.steps + 1);
    for (i, l) in latents.iter().enumerate() {
        stage(
            format!("latents_{i}"),
            max_abs(l, &fx[&format!("latents_{i}")]),
        );
    }
    stage("frames".into(), max_abs(&generated.frames, &fx["frames"]));
    eprintln!("{name}:\n  {}", report.join("\n  "));
}

#[test]
fn base_with_guidance() {
    check("base-cfg");
}

#[test]
fn base_without_guidance_non_square() {
    check("base-nocfg-rect");
}

#[test]
fn base_dpm_solver_multistep() {
    check("base-dpm");
}

#[test]
fn wide_three_levels() {
    check("wide-cfg");
}

/// The trained weights at 64x64, 8 frames: v-prediction DDIM over linear
/// betas from t=999, which no tiny config exercises.
#[test]
fn world_v1_at_its_serving_shape() {
    check("world-v1");
}

/// Token ids equal transformers' `CLIPTokenizer` (the pipeline's tokenizer)
/// on the real CLIP vocabulary, built in and loaded from a folder.
#[test]
fn tokenizer_matches_transformers() {
    use fractal_engine::models::clip_tokenizer::ClipTokenizer;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/parity/tokenizer.json"
    );
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    ClipTokenizer::builtin()
        .unwrap()
        .write_folder(dir.path())
        .unwrap();
    let from_folder = ClipTokenizer::from_folder(dir.path()).unwrap();
    let builtin = ClipTokenizer::builtin().unwrap();
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["slow"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(builtin.encode(prompt).unwrap(), want, "{prompt:?}");
        assert_eq!(
            from_folder.encode(prompt).unwrap(),
            want,
            "{prompt:?} (from folder)"
        );
    }
}
