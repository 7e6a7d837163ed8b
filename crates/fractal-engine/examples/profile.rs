//! Times the pipeline on a diffusers folder and prints where the time goes:
//! `FRACTAL_PROFILE=1 cargo run --release -p fractal-engine --example profile -- DIR [frames] [size] [steps]`.
use std::time::Instant;

use fractal_engine::pipelines::text_to_video_sd::{Model, TextToVideoSd};
use fractal_engine::{GenerateSpec, Pipeline};
use fractal_protocol::Seed;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    fractal_engine::prepare_process();
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(
        args.get(1)
            .ok_or("usage: profile DIR [frames] [size] [steps] [repeats]")?,
    );
    let num = |i: usize, d: usize| {
        args.get(i)
            .map(|s| s.parse())
            .transpose()
            .map(|v| v.unwrap_or(d))
    };
    let (frames, size, steps, repeats) = (num(2, 8)?, num(3, 64)?, num(4, 10)?, num(5, 2)?);
    let model = Model::load(&dir, &candle_core::Device::Cpu)?;
    let scheduler = fractal_engine::schedulers::spec_from_folder(&dir)?;
    let pipeline = Pipeline::from(TextToVideoSd::new(model, scheduler));
    for i in 0..repeats {
        let spec = GenerateSpec {
            prompt: "a red fox running in the snow".into(),
            negative_prompt: String::new(),
            seed: Seed(i as u64),
            frames,
            height: size,
            width: size,
            steps,
            guidance_scale: 9.0,
        };
        let _ = fractal_engine::profile::take_report();
        let t = Instant::now();
        let out = pipeline.generate(&spec, &mut |_| {})?;
        out.rgb8()?;
        println!("run {i}: {:.3} s", t.elapsed().as_secs_f64());
    }
    if let Some(r) = fractal_engine::profile::take_report() {
        eprintln!("{r}");
    }
    Ok(())
}
