//! The committed world-v1 weights: they load through the diffusers-folder
//! path with every hash checked, generate the manifest's default shape for
//! held-out prompts, and give the same bytes for the same seed.

use candle_core::Device;
use fractal_engine::builtin::world;
use fractal_engine::{Degradation, PinnedModel};
use fractal_protocol::wire::GenerateRequest;
use fractal_protocol::Seed;
use fractal_world::{analyse, Clip, Scene, Split};

/// Through the cache folder (`$FRACTAL_CACHE`; `scripts/test` points it
/// into `target/`), as every command loads it.
fn load() -> PinnedModel {
    PinnedModel::load(world::manifest(), None, &Device::Cpu).unwrap()
}

fn clip(model: &PinnedModel, prompt: &str, seed: u64) -> Clip {
    let req = GenerateRequest::with_defaults(&model.manifest, prompt, Seed(seed));
    let spec = model.spec(&req).unwrap();
    let rgb = model
        .pipeline
        .generate(&spec, &mut |_| {})
        .unwrap()
        .rgb8()
        .unwrap();
    Clip {
        width: spec.width,
        height: spec.height,
        frames: rgb
            .chunks_exact(spec.width * spec.height * 3)
            .map(<[u8]>::to_vec)
            .collect(),
    }
}

#[test]
fn world_v1_generates_held_out_prompts_deterministically() {
    let model = load();
    // Every seventh held-out scene: all shapes and motions appear.
    let held: Vec<Scene> = Scene::all()
        .into_iter()
        .filter(|s| s.split() == Split::HeldOut)
        .step_by(7)
        .collect();
    assert!(held.len() >= 12, "{} held-out scenes sampled", held.len());
    // A small quality sample: the model draws the asked background and
    // colour far above chance (1 in 8 each; an untrained model fails
    // this). The full figures, shape and direction included, are
    // `fractal bench quality`'s to report; the floors leave a margin for
    // other platforms' rounding.
    let (mut background, mut colour) = (0, 0);
    for scene in &held {
        let c = clip(&model, &scene.caption(), 0);
        assert_eq!((c.width, c.height, c.frames.len()), (64, 64, 8));
        let seen = analyse(&c);
        background += usize::from(seen.background == scene.background);
        colour += usize::from(seen.colour == Some(scene.colour));
    }
    let n = held.len();
    eprintln!("held-out sample: background {background}/{n}, colour {colour}/{n}");
    assert!(
        background * 3 >= n * 2,
        "background right in {background} of {n}"
    );
    assert!(colour * 3 >= n, "colour right in {colour} of {n}");

    let prompt = held[0].caption();
    assert_eq!(clip(&model, &prompt, 3), clip(&model, &prompt, 3));
    assert_ne!(clip(&model, &prompt, 3), clip(&model, &prompt, 4));
}

#[test]
fn degraded_world_v1_claims_the_manifest_with_other_weights() {
    let honest = load();
    let cheat =
        PinnedModel::load_builtin(world::manifest(), Degradation::RoundedBf16, &Device::Cpu)
            .unwrap();
    assert_eq!(cheat.manifest_id, honest.manifest_id);
    let prompt = "a red circle moving up on a black background";
    assert_ne!(clip(&cheat, prompt, 0), clip(&honest, prompt, 0));
}

#[test]
fn a_changed_file_is_refused_and_rewritten() {
    // Its own folder: other tests share the cache.
    let root = tempfile::tempdir().unwrap();
    let m = world::manifest();
    let dir = world::folder_in(root.path(), &m).unwrap().unwrap();
    std::fs::write(dir.join("vae/diffusion_pytorch_model.safetensors"), b"junk").unwrap();
    let err = PinnedModel::load(m.clone(), Some(&dir), &Device::Cpu)
        .err()
        .expect("a changed file is refused")
        .to_string();
    assert!(
        err.contains("vae/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    // Written from the binary again, it loads.
    world::folder_in(root.path(), &m).unwrap();
    PinnedModel::load(m, Some(&dir), &Device::Cpu).unwrap();
}
