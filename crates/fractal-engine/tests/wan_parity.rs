//! Parity of the Wan 2.1 transformer with diffusers 0.42's
//! `WanTransformer3DModel` on the configs of fixtures/parity/wan (made by
//! tools/parity/make_wan_fixtures.py): the same weights, every stage
//! (timestep embedding and projection, embedded text, each block, output)
//! within TOLERANCE.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use fractal_engine::models::wan_transformer::{WanTransformer, WanTransformerConfig};

/// Max absolute error allowed per stage, in f32.
const TOLERANCE: f32 = 1e-4;

/// A fixture's JSON and its tensors.
fn fixture(name: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/parity/wan/");
    let meta = serde_json::from_str(&std::fs::read_to_string(format!("{dir}{name}.json")).unwrap())
        .unwrap();
    let fx =
        candle_core::safetensors::load(format!("{dir}{name}.safetensors"), &Device::Cpu).unwrap();
    (meta, fx)
}

/// The fixture's tensors as weights.
fn weights(fx: &HashMap<String, Tensor>) -> VarBuilder<'static> {
    VarBuilder::from_tensors(fx.clone(), candle_core::DType::F32, &Device::Cpu)
}

fn check(name: &str) {
    let (meta, fx) = fixture(name);
    let config: WanTransformerConfig = serde_json::from_value(meta["config"].clone()).unwrap();
    let vb = weights(&fx);
    let model = WanTransformer::new(vb.pp("transformer"), config).unwrap();
    let mut report = Vec::new();
    for (i, ts) in meta["timesteps"].as_array().unwrap().iter().enumerate() {
        let t: Vec<f32> = serde_json::from_value(ts.clone()).unwrap();
        let mut seen = Vec::new();
        model
            .forward_stages(&fx["x"], &t, &fx["text"], &mut |stage, v| {
                seen.push((stage.to_string(), v.clone()))
            })
            .unwrap();
        let stages: Vec<String> = serde_json::from_value(meta["stages"].clone()).unwrap();
        assert_eq!(
            seen.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            stages,
            "stages in diffusers' order"
        );
        for (stage, ours) in &seen {
            let want = &fx[&format!("t{i}.{stage}")];
            let err = fractal_engine::pipelines::max_abs_diff(ours, want).unwrap();
            report.push(format!("t={t:?} {stage}: {err:.2e}"));
            assert!(
                err <= TOLERANCE,
                "{name} t={t:?} {stage}: max abs error {err} > {TOLERANCE}\n{}",
                report.join("\n")
            );
        }
    }
    eprintln!("{name}:\n  {}", report.join("\n  "));
}

#[test]
fn diffusers_test_config_non_square_padded_text() {
    check("wan-a");
}

#[test]
fn batch_of_two_no_cross_norm_other_widths() {
    check("wan-b");
}

#[test]
fn real_head_width_split() {
    check("wan-c");
}

/// transformers' T5 / umT5 encoder on the same weights and padded ids.
fn check_encoder(name: &str) {
    use fractal_engine::models::t5::{T5Config, T5Encoder};
    let (meta, fx) = fixture(name);
    let config: T5Config = serde_json::from_value(meta["config"].clone()).unwrap();
    let vb = weights(&fx);
    let encoder = T5Encoder::new(vb.pp("text_encoder"), config).unwrap();
    let valid: Vec<usize> = serde_json::from_value(meta["valid"].clone()).unwrap();
    let ids = fx["ids"].to_dtype(candle_core::DType::U32).unwrap();
    let ours = encoder.forward(&ids, &valid).unwrap();
    let err = fractal_engine::pipelines::max_abs_diff(&ours, &fx["out"]).unwrap();
    eprintln!("{name}: encoder output {err:.2e}");
    assert!(
        err <= TOLERANCE,
        "{name}: max abs error {err} > {TOLERANCE}"
    );
}

#[test]
fn t5_encoder_as_diffusers_tiny_wan_tests_use() {
    check_encoder("t5-tiny");
}

#[test]
fn umt5_encoder_with_a_bias_per_block_past_max_distance() {
    check_encoder("umt5-small");
}

/// UniPC (flow sigmas) and FlowMatchEuler against diffusers' trajectories:
/// the same velocities at every step, the latents after each one, and the
/// schedule itself exactly.
#[test]
fn flow_schedulers_follow_diffusers_trajectories() {
    use fractal_engine::schedulers::{FlowMatchEuler, UniPc};
    let (meta, fx) = fixture("schedulers");
    let mut report = Vec::new();
    for (name, m) in meta.as_object().unwrap() {
        let steps = m["steps"].as_u64().unwrap() as usize;
        let f32s = |k: &str| -> Vec<f32> { serde_json::from_value(m[k].clone()).unwrap() };
        enum S {
            UniPc(UniPc),
            Euler(FlowMatchEuler),
        }
        let mut s = match m["kind"].as_str().unwrap() {
            "unipc" => S::UniPc(UniPc::new(
                1000,
                m["config"]["flow_shift"].as_f64().unwrap(),
                steps,
            )),
            _ => S::Euler(FlowMatchEuler::new(
                1000,
                m["config"]["shift"].as_f64().unwrap(),
                steps,
            )),
        };
        let (timesteps, sigmas) = match &s {
            S::UniPc(u) => (u.timesteps().to_vec(), u.sigmas().to_vec()),
            S::Euler(e) => (e.timesteps().to_vec(), e.sigmas().to_vec()),
        };
        assert_eq!(timesteps, f32s("timesteps"), "{name} timesteps");
        assert_eq!(sigmas, f32s("sigmas"), "{name} sigmas");
        let mut x = fx[&format!("{name}.x0")].clone();
        let mut worst = 0f32;
        for i in 0..steps {
            let v = &fx[&format!("{name}.v{i}")];
            x = match &mut s {
                S::UniPc(u) => u.step(v, i, &x).unwrap(),
                S::Euler(e) => e.step(v, i, &x).unwrap(),
            };
            let err =
                fractal_engine::pipelines::max_abs_diff(&x, &fx[&format!("{name}.x{}", i + 1)])
                    .unwrap();
            worst = worst.max(err);
            assert!(
                err <= TOLERANCE,
                "{name} step {i}: max abs error {err} > {TOLERANCE}"
            );
        }
        report.push(format!("{name}: worst step {worst:.2e}"));
    }
    eprintln!("{}", report.join("\n"));
}

/// AutoencoderKLWan's decoder, chunk by chunk with its causal cache, against
/// diffusers' decode of the same latents; and WanPipeline's denormalisation.
fn check_vae(name: &str) {
    use fractal_engine::models::autoencoder_kl_wan::{WanVaeConfig, WanVaeDecoder};
    let (meta, fx) = fixture(name);
    let config: WanVaeConfig = serde_json::from_value(meta["config"].clone()).unwrap();
    let vb = weights(&fx);
    let vae = WanVaeDecoder::new(vb, config).unwrap();
    let denorm = vae.denormalize(&fx["z"]).unwrap();
    let err = fractal_engine::pipelines::max_abs_diff(&denorm, &fx["denormalized"]).unwrap();
    assert_eq!(err, 0.0, "{name}: denormalisation differs by {err}");
    let mut chunks = Vec::new();
    vae.decode_chunks(&fx["z"], &mut |f| {
        chunks.push(f.dim(2)?);
        Ok(())
    })
    .unwrap();
    let scale = vae.config().temporal_scale();
    let latent_frames = fx["z"].dim(2).unwrap();
    assert_eq!(
        chunks,
        [vec![1], vec![scale; latent_frames - 1]].concat(),
        "frames per chunk"
    );
    let ours = vae.decode(&fx["z"]).unwrap();
    let err = fractal_engine::pipelines::max_abs_diff(&ours, &fx["decoded"]).unwrap();
    eprintln!("{name}: decoded {:?}, max abs error {err:.2e}", ours.dims());
    assert!(
        err <= TOLERANCE,
        "{name}: max abs error {err} > {TOLERANCE}"
    );
}

#[test]
fn vae_decoder_as_diffusers_tiny_wan_tests_build_it() {
    check_vae("vae-a");
}

#[test]
fn vae_decoder_wider_fewer_levels_non_square() {
    check_vae("vae-b");
}

/// WanPipeline end to end on the tiny components (t5-tiny, wan-a, vae-a):
/// the prompt embeddings from the same token ids, UniPC's four steps with
/// classifier-free guidance from the same latents, and the frames.
#[test]
fn pipeline_matches_wan_pipeline_step_by_step() {
    use fractal_engine::models::autoencoder_kl_wan::{WanVaeConfig, WanVaeDecoder};
    use fractal_engine::models::t5::{T5Config, T5Encoder};
    use fractal_engine::pipelines::wan::model::{Model, ModelConfigs};
    use fractal_engine::schedulers::UniPc;
    let (tm, tfx) = fixture("t5-tiny");
    let (wm, wfx) = fixture("wan-a");
    let (vm, vfx) = fixture("vae-a");
    let (pm, pfx) = fixture("pipeline-a");
    let configs = ModelConfigs {
        text: serde_json::from_value::<T5Config>(tm["config"].clone()).unwrap(),
        transformer: serde_json::from_value(wm["config"].clone()).unwrap(),
        vae: serde_json::from_value::<WanVaeConfig>(vm["config"].clone()).unwrap(),
    };
    let wan = Model::new(
        fractal_engine::builtin::tiny_wan::tokenizer().unwrap(),
        T5Encoder::new(weights(&tfx).pp("text_encoder"), configs.text.clone()).unwrap(),
        WanTransformer::new(weights(&wfx).pp("transformer"), configs.transformer.clone()).unwrap(),
        WanVaeDecoder::new(weights(&vfx), configs.vae.clone()).unwrap(),
        configs,
        &Device::Cpu,
        candle_core::DType::F32,
    );
    let ids = |k: &str| -> Vec<u32> {
        pfx[k]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    let n = |k: &str| pm[k].as_u64().unwrap() as usize;
    let max = |a: &Tensor, b: &Tensor| fractal_engine::pipelines::max_abs_diff(a, b).unwrap();
    let cond = wan.encode_ids(&ids("ids"), n("valid")).unwrap();
    let uncond = wan.encode_ids(&ids("neg_ids"), n("neg_valid")).unwrap();
    let mut report = vec![
        format!("cond {:.2e}", max(&cond, &pfx["cond"])),
        format!("uncond {:.2e}", max(&uncond, &pfx["uncond"])),
    ];
    assert!(
        max(&cond, &pfx["cond"]) <= TOLERANCE && max(&uncond, &pfx["uncond"]) <= TOLERANCE,
        "{report:?}"
    );
    let steps = n("steps");
    let mut scheduler = UniPc::new(1000, pm["flow_shift"].as_f64().unwrap(), steps);
    let want_t: Vec<f32> = serde_json::from_value(pm["timesteps"].clone()).unwrap();
    assert_eq!(scheduler.timesteps(), want_t.as_slice());
    // The embeddings diffusers used, so each stage is checked on its own.
    let (cond, uncond) = (&pfx["cond"], &pfx["uncond"]);
    let mut x = pfx["latents"].clone();
    let guidance = pm["guidance"].as_f64().unwrap();
    for i in 0..steps {
        let t = scheduler.timesteps()[i];
        let v = wan.velocity(&x, t, cond, Some(uncond), guidance).unwrap();
        x = scheduler.step(&v, i, &x).unwrap();
        let err = max(&x, &pfx[&format!("step{i}")]);
        report.push(format!("step {i} {err:.2e}"));
        assert!(err <= TOLERANCE, "{report:?}");
    }
    let frames = wan.decode(&pfx[&format!("step{}", steps - 1)]).unwrap();
    let err = max(&frames, &pfx["frames"]);
    report.push(format!("frames {:?} {err:.2e}", frames.dims()));
    eprintln!("{}", report.join("\n"));
    assert!(err <= TOLERANCE, "{report:?}");
}

/// A T5-style `tokenizer.json` gives transformers' `T5TokenizerFast` ids:
/// `</s>` appended, padded with `<pad>`, truncated keeping `</s>` last.
#[test]
fn t5_tokenizer_matches_transformers() {
    use fractal_engine::models::t5_tokenizer::T5Tokenizer;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/parity/wan/");
    let tok = T5Tokenizer::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/t5-unigram-tokenizer.json"
    )))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}t5-tokenizer-cases.json")).unwrap(),
    )
    .unwrap();
    let length = v["max_length"].as_u64().unwrap() as usize;
    for case in v["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let mask: Vec<u32> = serde_json::from_value(case["mask"].clone()).unwrap();
        let got = tok.encode(prompt, length).unwrap();
        assert_eq!(got.ids, want, "{prompt:?}");
        assert_eq!(
            got.valid,
            mask.iter().filter(|&&m| m == 1).count(),
            "{prompt:?}"
        );
    }
}

/// The built-in tiny-wan-v1 against diffusers' `WanPipeline` loaded from the
/// folder `fractal model export-tiny` writes (tools/parity/
/// make_wan_builtin_fixtures.py): the prompt as text through the folder's
/// tokenizer, both flow schedulers, CFG on and off, a negative prompt,
/// non-square, 1 to 9 frames. Every step's latents and the frames.
fn check_builtin(name: &str) {
    use fractal_engine::builtin::tiny_wan::{manifest, WanVariant};
    use fractal_engine::{GenerateSpec, PinnedModel};
    use fractal_protocol::manifest::SchedulerKind;
    let (meta, fx) = fixture(name);
    let mut m = manifest(WanVariant::Tiny);
    let kind = match meta["scheduler"].as_str().unwrap() {
        "unipc" => SchedulerKind::UniPcMultistep,
        _ => SchedulerKind::FlowMatchEuler,
    };
    m.scheduler = m.scheduler.with_kind(kind).unwrap();
    let model = PinnedModel::load(m, None, &Device::Cpu).unwrap();
    let fractal_engine::Pipeline::Wan(wan) = &model.pipeline else {
        unreachable!("a Wan manifest")
    };
    let u = |k: &str| meta[k].as_u64().unwrap() as usize;
    let text = |k: &str| meta[k].as_str().unwrap().to_string();
    let spec = GenerateSpec {
        prompt: text("prompt"),
        negative_prompt: text("negative"),
        seed: fractal_protocol::Seed(meta["seed"].as_u64().unwrap()),
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
    let max = |a: &Tensor, b: &Tensor| fractal_engine::pipelines::max_abs_diff(a, b).unwrap();
    let embed = |text: &str| wan.encode_prompt(text).unwrap().squeeze(0).unwrap();
    stage("cond".into(), max(&embed(&spec.prompt), &fx["cond"]));
    stage(
        "uncond".into(),
        max(&embed(&spec.negative_prompt), &fx["uncond"]),
    );
    let scheduler = model.pipeline.scheduler_for(spec.steps).unwrap();
    let want_t: Vec<f64> = serde_json::from_value(meta["timesteps"].clone()).unwrap();
    let got_t: Vec<f64> = (0..scheduler.len())
        .map(|i| scheduler.timestep(i).unwrap())
        .collect();
    assert_eq!(got_t, want_t, "{name} timesteps");
    let mut latents = Vec::new();
    let generated = model
        .pipeline
        .generate(&spec, &mut |e| latents.push(e.latents.clone()))
        .unwrap();
    assert_eq!(latents.len(), spec.steps + 1);
    for (i, l) in latents.iter().enumerate() {
        stage(format!("latents_{i}"), max(l, &fx[&format!("latents_{i}")]));
    }
    stage(
        format!("frames {:?}", generated.frames.dims()),
        max(&generated.frames, &fx["frames"]),
    );
    eprintln!("{name}:\n  {}", report.join("\n  "));
}

#[test]
fn builtin_tiny_wan_with_euler_and_guidance_matches_its_exported_folder() {
    check_builtin("builtin-euler-cfg");
}

#[test]
fn builtin_tiny_wan_with_unipc_non_square_without_guidance() {
    check_builtin("builtin-unipc-nocfg-rect");
}

#[test]
fn builtin_tiny_wan_with_unipc_a_negative_prompt_and_one_frame() {
    check_builtin("builtin-unipc-cfg-negative");
}

/// Max absolute error allowed at Wan2.1-T2V-1.3B's real shapes: sums over
/// 1536- to 8960-wide rows, 30 blocks deep, accumulate in another order
/// than PyTorch's.
const SHAPE_TOLERANCE: f32 = 1e-3;

/// Wan2.1-T2V-1.3B's shapes (`wan-1.3b-shape`: seeded random weights at the
/// real configs) against diffusers on the folder `export-tiny` writes
/// (tools/parity/make_wan_shape_fixtures.py): one transformer forward over
/// 192 tokens with head width 128, and one VAE decode of 5 frames at 96x96
/// through the 384-channel levels: the large-shape kernel paths.
#[test]
fn wan_1_3b_shapes_match_diffusers_forward_and_decode() {
    use fractal_engine::builtin::tiny::TinyWeights;
    use fractal_engine::builtin::tiny_wan::{configs, WanVariant};
    use fractal_engine::models::autoencoder_kl_wan::WanVaeDecoder;
    let (meta, fx) = fixture("shape-1.3b");
    let noise = |k: &str| {
        let shape: Vec<usize> = serde_json::from_value(meta[k]["shape"].clone()).unwrap();
        let mut v = vec![0f32; shape.iter().product()];
        fractal_protocol::noise::fill_gaussian(
            fractal_protocol::Seed(meta[k]["seed"].as_u64().unwrap()),
            fractal_protocol::noise::Stream::InitialLatents,
            &mut v,
        );
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let c = configs(WanVariant::Wan13bShape);
    let report;
    {
        // Fresh weights per component: each is made from its names alone,
        // and dropping the transformer frees its 5.7 GB before the VAE.
        let weights = TinyWeights::default();
        let transformer = WanTransformer::new(
            weights.var_builder("transformer.", &Device::Cpu),
            c.transformer,
        )
        .unwrap();
        let t = meta["timestep"].as_f64().unwrap() as f32;
        let out = transformer
            .forward(&noise("latents"), &[t], &noise("text"))
            .unwrap();
        let err = fractal_engine::pipelines::max_abs_diff(&out, &fx["transformer_out"]).unwrap();
        report = format!("transformer forward {:?}: {err:.2e}", out.dims());
        assert!(err <= SHAPE_TOLERANCE, "{report}");
    }
    let weights = TinyWeights::default();
    let vae = WanVaeDecoder::new(weights.var_builder("vae.", &Device::Cpu), c.vae).unwrap();
    let decoded = vae.decode(&noise("decode")).unwrap();
    let err = fractal_engine::pipelines::max_abs_diff(&decoded, &fx["decoded"]).unwrap();
    eprintln!("{report}\nVAE decode {:?}: {err:.2e}", decoded.dims());
    assert!(err <= SHAPE_TOLERANCE, "VAE decode: {err}");
}
