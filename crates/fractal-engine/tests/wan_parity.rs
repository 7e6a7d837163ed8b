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

fn check(name: &str) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/parity/wan/");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}{name}.json")).unwrap())
            .unwrap();
    let device = Device::Cpu;
    let fx: HashMap<String, Tensor> =
        candle_core::safetensors::load(format!("{dir}{name}.safetensors"), &device).unwrap();
    let config: WanTransformerConfig = serde_json::from_value(meta["config"].clone()).unwrap();
    let vb = VarBuilder::from_tensors(fx.clone(), candle_core::DType::F32, &device);
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
