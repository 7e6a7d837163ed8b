//! Parity in half precision: the built-in tiny-v1 (TextToVideoSD, DDIM)
//! and tiny-wan-v1 (Wan, UniPC) with f16 and bf16 manifests against
//! diffusers/transformers run in the same dtype (fixtures/parity/half, made
//! by tools/parity/make_half_fixtures.py), every stage from the same inputs.
//!
//! Two implementations of one half-precision network round at different
//! places: their results differ by about as much as either differs from
//! f32. So each stage's bound is relative to that stage's own precision
//! error, the distance between diffusers in f32 and diffusers in the dtype
//! (`*_f32` in the fixture, from the same inputs): the engine in the dtype
//! must be within [`RATIO`] times that distance of diffusers in the dtype.
//! (That it computes in the dtype at all, deterministically, is
//! tests/precision.rs.)

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use fractal_engine::builtin::{tiny, tiny_wan};
use fractal_engine::pipelines::max_abs_diff;
use fractal_engine::{GenerateSpec, PinnedModel, Pipeline, TinyVariant, WanVariant};
use fractal_protocol::manifest::{self, SchedulerKind};
use fractal_protocol::Seed;

/// `FRACTAL_TEST_DEVICE=cuda` runs the engine's side on the GPU (a
/// `--features cuda` build; `scripts/gpu-check`); the fixtures were made on
/// the CPU.
fn device() -> Device {
    let name = std::env::var("FRACTAL_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    fractal_engine::device_from_name(&name).unwrap()
}

fn fixture(name: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/parity/half/");
    let meta = serde_json::from_str(&std::fs::read_to_string(format!("{dir}{name}.json")).unwrap())
        .unwrap();
    let fx =
        candle_core::safetensors::load(format!("{dir}{name}.safetensors"), &Device::Cpu).unwrap();
    (meta, fx)
}

fn dtype_of(meta: &serde_json::Value) -> (manifest::DType, DType) {
    match meta["dtype"].as_str().unwrap() {
        "f16" => (manifest::DType::F16, DType::F16),
        "bf16" => (manifest::DType::Bf16, DType::BF16),
        other => panic!("fixture dtype {other}"),
    }
}

/// How far the engine in a dtype may be from diffusers in it, in units of
/// diffusers' own f32-to-dtype distance on the same stage.
const RATIO: f32 = 2.5;

/// `‖a − b‖ / ‖b‖`: how verification tolerances measure a step's output.
fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    norm(&(a - b).unwrap()) / norm(b)
}

/// Checks stages and reports them all.
struct Stages {
    name: String,
    dtype: DType,
    report: Vec<String>,
    failures: Vec<String>,
}

impl Stages {
    fn new(name: &str, dtype: DType) -> Self {
        Stages {
            name: name.into(),
            dtype,
            report: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// `ours` against diffusers in the dtype (`fx[key]`): within [`RATIO`]
    /// times diffusers' f32 run's distance (`fx[key_f32]`) from it.
    fn check(&mut self, key: &str, ours: &Tensor, fx: &HashMap<String, Tensor>) {
        let theirs = &fx[key];
        let ours = &ours.to_device(&Device::Cpu).unwrap();
        let err = max_abs_diff(ours, theirs).unwrap();
        let gap = max_abs_diff(&fx[&format!("{key}_f32")], theirs).unwrap();
        self.report.push(format!(
            "{key}: {err:.2e}, {:.2} x diffusers' f32-to-{:?} distance {gap:.2e}; relative L2 {:.2e}",
            err / gap,
            self.dtype,
            rel_l2(ours, theirs)
        ));
        if err > RATIO * gap {
            self.failures
                .push(format!("{key}: {err:.3e} > {RATIO} x {gap:.3e}"));
        }
    }

    fn finish(self) {
        eprintln!(
            "{} in {:?}:\n  {}",
            self.name,
            self.dtype,
            self.report.join("\n  ")
        );
        assert!(
            self.failures.is_empty(),
            "{}: {}\n{}",
            self.name,
            self.failures.join("; "),
            self.report.join("\n")
        );
    }
}

/// The fixture's request: its seed, shape, steps and guidance, with these prompts.
fn spec_of(meta: &serde_json::Value, prompt: String, negative_prompt: String) -> GenerateSpec {
    let u = |k: &str| meta[k].as_u64().unwrap() as usize;
    GenerateSpec {
        prompt,
        negative_prompt,
        seed: Seed(meta["seed"].as_u64().unwrap()),
        frames: u("frames"),
        height: u("height"),
        width: u("width"),
        steps: u("steps"),
        guidance_scale: meta["guidance"].as_f64().unwrap(),
    }
}

fn text_to_video_sd(name: &str) {
    let (meta, fx) = fixture(name);
    let dev = device();
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let (dtype, candle) = dtype_of(&meta);
    let m = tiny::manifest(TinyVariant::Base).in_dtype(dtype);
    let model = PinnedModel::load(m, None, &dev).unwrap();
    assert_eq!(model.pipeline.dtype(), candle);
    let Pipeline::TextToVideoSd(sd) = &model.pipeline else {
        unreachable!("a TextToVideoSD manifest")
    };
    let prompt = tokens("prompt");
    let negative = tokens("negative");
    let mut s = Stages::new(name, candle);

    let cond = sd.encode_prompt(&prompt).unwrap().squeeze(0).unwrap();
    s.check("text_cond", &cond, &fx);
    let uncond = sd.encode_prompt(&negative).unwrap().squeeze(0).unwrap();
    s.check("text_uncond", &uncond, &fx);

    // The denoiser from diffusers' own conditioning and input: the stage alone.
    let context = on(&Tensor::stack(&[&fx["text_uncond"], &fx["text_cond"]], 0).unwrap());
    let x = &on(&fx["latents_0_f32"]);
    let input = Tensor::cat(&[x, x], 0).unwrap().to_dtype(candle).unwrap();
    let out = sd
        .model
        .unet
        .forward(
            &input,
            meta["t"].as_f64().unwrap(),
            &context.to_dtype(candle).unwrap(),
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    s.check("unet_out", &out, &fx);
    s.check("decoded", &sd.decode_frame(x, 0).unwrap(), &fx);

    let spec = spec_of(&meta, String::new(), String::new());
    let context = sd.encode_prompts(&negative, &prompt).unwrap();
    let mut latents = Vec::new();
    let generated = model
        .pipeline
        .generate_from(&spec, &context, &mut |e| latents.push(e.latents.clone()))
        .unwrap();
    for (i, l) in latents.iter().enumerate().skip(1) {
        s.check(&format!("latents_{i}"), l, &fx);
    }
    s.check("frames", &generated.frames, &fx);
    s.finish();
}

/// The token ids make_half_fixtures.py feeds tiny-v1 (the CLIP ids of "a
/// red fox running in the snow", and of the empty prompt).
fn tokens(which: &str) -> Vec<u32> {
    let pad = |mut ids: Vec<u32>| {
        ids.resize(77, 49407);
        ids
    };
    match which {
        "prompt" => pad(vec![49406, 320, 736, 3240, 2761, 530, 518, 2583, 49407]),
        _ => pad(vec![49406, 49407]),
    }
}

fn wan(name: &str) {
    let (meta, fx) = fixture(name);
    let dev = device();
    let on = |t: &Tensor| t.to_device(&dev).unwrap();
    let (dtype, candle) = dtype_of(&meta);
    let mut m = tiny_wan::manifest(WanVariant::Tiny).in_dtype(dtype);
    m.scheduler = m
        .scheduler
        .with_kind(SchedulerKind::UniPcMultistep)
        .unwrap();
    let model = PinnedModel::load(m, None, &dev).unwrap();
    let Pipeline::Wan(wan) = &model.pipeline else {
        unreachable!("a Wan manifest")
    };
    let text = |k: &str| meta[k].as_str().unwrap().to_string();
    let mut s = Stages::new(name, candle);
    let cond = wan.encode_prompt(&text("prompt")).unwrap();
    s.check("cond", &cond.squeeze(0).unwrap(), &fx);
    let uncond = wan.encode_prompt(&text("negative")).unwrap();
    s.check("uncond", &uncond.squeeze(0).unwrap(), &fx);

    let x = &on(&fx["latents_0_f32"]);
    let out = wan
        .model
        .transformer
        .forward(
            &x.to_dtype(candle).unwrap(),
            &[meta["t"].as_f64().unwrap() as f32],
            &on(&fx["cond"])
                .unsqueeze(0)
                .unwrap()
                .to_dtype(candle)
                .unwrap(),
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    s.check("transformer_out", &out, &fx);
    let decoded = wan.model.decode(x).unwrap();
    // diffusers' decode is [1, 3, F, H, W]; ours [F, 3, H, W].
    let decoded = decoded.permute((1, 0, 2, 3)).unwrap().unsqueeze(0).unwrap();
    s.check("decoded", &decoded, &fx);

    let spec = spec_of(&meta, text("prompt"), text("negative"));
    let mut latents = Vec::new();
    let generated = model
        .pipeline
        .generate(&spec, &mut |e| latents.push(e.latents.clone()))
        .unwrap();
    for (i, l) in latents.iter().enumerate().skip(1) {
        s.check(&format!("latents_{i}"), l, &fx);
    }
    s.check("frames", &generated.frames, &fx);
    s.finish();
}

#[test]
fn tiny_v1_in_f16_matches_diffusers_in_f16() {
    text_to_video_sd("tiny-v1-f16");
}

#[test]
fn tiny_v1_in_bf16_matches_diffusers_in_bf16() {
    text_to_video_sd("tiny-v1-bf16");
}

#[test]
fn tiny_wan_in_f16_matches_diffusers_in_f16() {
    wan("tiny-wan-v1-f16");
}

#[test]
fn tiny_wan_in_bf16_matches_diffusers_in_bf16() {
    wan("tiny-wan-v1-bf16");
}
