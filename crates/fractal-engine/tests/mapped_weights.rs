//! Weights as views of their files: with `WeightsAllocator` installed, f32
//! tensors share the file's mapping, equal what a read gives, survive the
//! file being replaced, and release the mapping when the last one goes.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use fractal_engine::io::{mapped, weights::component_weights};

#[global_allocator]
static ALLOCATOR: mapped::WeightsAllocator = mapped::WeightsAllocator;

#[test]
fn tensors_view_the_file_and_release_it_when_dropped() {
    assert!(mapped::installed());
    let dir = tempfile::tempdir().unwrap();
    let a = Tensor::arange(0f32, 12., &Device::Cpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let h = Tensor::new(&[1.5f32, -2.0], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let path = dir.path().join("model.safetensors");
    let save = |a: &Tensor| {
        candle_core::safetensors::save(
            &HashMap::from([("a".to_string(), a.clone()), ("h".to_string(), h.clone())]),
            &path,
        )
        .unwrap()
    };
    save(&a);
    assert_eq!(mapped::live_mappings(), 0);
    let vb = component_weights(dir.path(), "model", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(mapped::live_mappings(), 1, "the file is mapped once opened");
    let got = vb.get((3, 4), "a").unwrap();
    // f16 is converted: an owned copy, the mapping not involved.
    let half = vb.get(2, "h").unwrap();
    drop(vb);
    assert_eq!(mapped::live_mappings(), 1, "the tensor keeps the mapping");
    assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
    assert_eq!(half.to_vec1::<f32>().unwrap(), [1.5, -2.0]);
    // Ops on a view make new tensors; the view itself is unchanged.
    let doubled = (&got * 2.0).unwrap();
    assert_eq!(doubled.to_vec2::<f32>().unwrap()[2][3], 22.0);
    // Replaced by a new file (as the exporters write), the old content stays.
    std::fs::remove_file(&path).unwrap();
    save(&(&a + 100.0).unwrap());
    assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
    let clone = got.clone();
    drop(got);
    assert_eq!(mapped::live_mappings(), 1, "a clone shares the storage");
    drop(clone);
    assert_eq!(mapped::live_mappings(), 0, "the last view unmaps the file");
    // Loaded again, the new content.
    let vb = component_weights(dir.path(), "model", DType::F32, &Device::Cpu).unwrap();
    let again = vb.get((3, 4), "a").unwrap();
    assert_eq!(again.to_vec2::<f32>().unwrap()[0][0], 100.0);
    drop((vb, again));
    assert_eq!(mapped::live_mappings(), 0);
}
