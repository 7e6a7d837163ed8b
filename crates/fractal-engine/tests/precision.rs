//! The manifest's `dtype` is what the networks compute in: a half-precision
//! manifest loads its weights in that dtype and runs every network in it,
//! deterministically, close to (and not equal to) the f32 run; models of
//! another dtype are refused for it.

use candle_core::{DType, Device};
use fractal_engine::builtin::{tiny, tiny_wan};
use fractal_engine::pipelines::{self, text_to_video_sd};
use fractal_engine::{PinnedModel, TinyVariant, WanVariant};
use fractal_protocol::manifest::{self, ModelManifest, Size};
use fractal_protocol::wire::GenerateRequest;
use fractal_protocol::Seed;

fn in_dtype(m: ModelManifest, dtype: manifest::DType) -> ModelManifest {
    m.in_dtype(dtype)
}

/// Every latent of the trace, and the frames as RGB8.
fn run(m: &PinnedModel, r: &GenerateRequest) -> (Vec<Vec<f32>>, Vec<u8>) {
    let spec = m.spec(r).unwrap();
    let mut trace = Vec::new();
    let out = m
        .pipeline
        .generate(&spec, &mut |e| {
            assert_eq!(e.latents.dtype(), DType::F32, "latents stay f32");
            if let Some(o) = e.output {
                assert_eq!(o.dtype(), DType::F32, "model outputs are widened");
            }
            trace.push(pipelines::values(e.latents).unwrap())
        })
        .unwrap();
    assert_eq!(out.frames.dtype(), DType::F32);
    (trace, out.rgb8().unwrap())
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += ((x - y) as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n).sqrt()
}

fn tiny_request(m: &PinnedModel) -> GenerateRequest {
    let mut r = GenerateRequest::with_defaults(&m.manifest, "a red fox", Seed(7));
    r.frames = 4;
    r.steps = 3;
    r
}

fn wan_request(m: &PinnedModel) -> GenerateRequest {
    let mut r = GenerateRequest::with_defaults(&m.manifest, "a red circle moving left", Seed(7));
    r.size = Size {
        width: 32,
        height: 32,
    };
    r.frames = 5;
    r.steps = 3;
    r
}

/// Runs `base` in f32 and in each half dtype: the half runs are
/// deterministic, in their dtype, and within `bound` (relative L2 of the
/// final latents) of f32 without being equal to it.
fn half_runs_track_f32(
    base: ModelManifest,
    request: fn(&PinnedModel) -> GenerateRequest,
    bound: [f64; 2],
) {
    let f32_model = PinnedModel::load(base.clone(), None, &Device::Cpu).unwrap();
    let (reference, _) = run(&f32_model, &request(&f32_model));
    for (dtype, candle, bound) in [
        (manifest::DType::F16, DType::F16, bound[0]),
        (manifest::DType::Bf16, DType::BF16, bound[1]),
    ] {
        let m = PinnedModel::load(in_dtype(base.clone(), dtype), None, &Device::Cpu).unwrap();
        assert_eq!(m.pipeline.dtype(), candle);
        assert_ne!(m.manifest_id, f32_model.manifest_id);
        let (t1, v1) = run(&m, &request(&m));
        let (t2, v2) = run(&m, &request(&m));
        let bits =
            |t: &[Vec<f32>]| -> Vec<u32> { t.iter().flatten().map(|x| x.to_bits()).collect() };
        assert_eq!(bits(&t1), bits(&t2), "{dtype:?}: same seed, same bits");
        assert_eq!(v1, v2);
        let last = t1.len() - 1;
        let err = rel_l2(&t1[last], &reference[last]);
        eprintln!(
            "{}: final latents {dtype:?} vs f32: rel L2 {err:.3e}",
            base.name
        );
        assert!(
            err > 0.0,
            "{dtype:?} computed exactly as f32: not in {dtype:?}"
        );
        assert!(
            err < bound,
            "{dtype:?}: rel L2 {err:.3e} from f32 (bound {bound})"
        );
    }
}

#[test]
fn text_to_video_sd_computes_in_the_manifests_dtype() {
    half_runs_track_f32(
        tiny::manifest(TinyVariant::Base),
        tiny_request,
        [1.5e-2, 8e-2],
    );
}

#[test]
fn wan_computes_in_the_manifests_dtype() {
    half_runs_track_f32(
        tiny_wan::manifest(WanVariant::Tiny),
        wan_request,
        [5e-3, 4e-2],
    );
}

#[test]
fn models_of_another_dtype_are_refused_for_a_manifest() {
    let m = in_dtype(tiny::manifest(TinyVariant::Base), manifest::DType::Bf16);
    let f32_models = text_to_video_sd::Model::tiny(TinyVariant::Base, &Device::Cpu).unwrap();
    let e = PinnedModel::from_parts(m, f32_models)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("computes in bf16, the models in f32"), "{e}");
}
