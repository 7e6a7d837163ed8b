//! `fractal generate` on the built-in tiny model, checked with ffprobe.

use std::path::Path;
use std::process::Command;

fn fractal(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fractal"))
        .args(args)
        .env("FRACTAL_LOG", "warn")
        .output()
        .unwrap()
}

/// ffprobe is test-only (Debian `ffmpeg`, installed by .ci/run). Outside CI a
/// machine without it skips the container checks with a message.
fn ffprobe(path: &Path, stream: &str) -> Option<String> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            stream,
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output();
    match out {
        Ok(o) => {
            assert!(
                o.status.success(),
                "ffprobe rejected {}: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            Some(String::from_utf8(o.stdout).unwrap().trim().to_string())
        }
        Err(_) if std::env::var("CI").is_ok() => {
            panic!("ffprobe is required in CI (.ci/run installs ffmpeg)")
        }
        Err(_) => {
            eprintln!("ffprobe not installed: skipping container checks");
            None
        }
    }
}

#[test]
fn tiny_generate_writes_playable_mp4_and_gif_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4, gif, png) = (
        dir.path().join("a.mp4"),
        dir.path().join("a.gif"),
        dir.path().join("a.png"),
    );
    let args = |out: &Path| {
        vec![
            "generate".to_string(),
            "--tiny".into(),
            "--prompt".into(),
            "a red fox running in the snow".into(),
            "--seed".into(),
            "11".into(),
            "--frames".into(),
            "6".into(),
            "--size".into(),
            "32x32".into(),
            "--steps".into(),
            "3".into(),
            "-o".into(),
            out.display().to_string(),
        ]
    };
    let mut first = args(&mp4);
    first.extend([
        "--gif".into(),
        gif.display().to_string(),
        "--thumbnail".into(),
        png.display().to_string(),
    ]);
    let out = fractal(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("trace root "), "{stdout}");

    // Same seed, same bytes; another seed, other bytes.
    let again = dir.path().join("b.mp4");
    assert!(
        fractal(&args(&again).iter().map(String::as_str).collect::<Vec<_>>())
            .status
            .success()
    );
    assert_eq!(std::fs::read(&mp4).unwrap(), std::fs::read(&again).unwrap());
    let other = dir.path().join("c.mp4");
    let mut other_args = args(&other);
    other_args[5] = "12".into();
    assert!(
        fractal(&other_args.iter().map(String::as_str).collect::<Vec<_>>())
            .status
            .success()
    );
    assert_ne!(std::fs::read(&mp4).unwrap(), std::fs::read(&other).unwrap());

    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    if let Some(info) = ffprobe(&mp4, "stream=codec_name,width,height,nb_read_frames") {
        assert_eq!(info, "h264,32,32,6");
    }
    if let Some(info) = ffprobe(&gif, "stream=codec_name,width,height,nb_read_frames") {
        assert_eq!(info, "gif,32,32,6");
    }
}

#[test]
fn bad_generate_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.mp4");
    let o = out.to_str().unwrap();
    for (args, want) in [
        (vec!["--prompt", "  ", "-o", o], "prompt is empty"),
        (
            vec!["--prompt", "x", "--frames", "0", "-o", o],
            "frames must be",
        ),
        (
            vec!["--prompt", "x", "--size", "4000x4000", "-o", o],
            "not served by this model",
        ),
        (
            vec!["--prompt", "x", "--size", "big", "-o", o],
            "--size must look like",
        ),
        (vec!["--prompt", "x", "-o", "out.avi"], "must end in .mp4"),
        (
            vec!["--prompt", "x", "--tiny", "huge", "-o", o],
            "no built-in model named \"huge\"",
        ),
        (
            vec!["--prompt", "x", "--model", "/nonexistent", "-o", o],
            "model_index.json",
        ),
        (
            vec!["--prompt", "x", "--scheduler", "euler", "-o", o],
            "unknown scheduler",
        ),
        (
            vec![
                "--prompt",
                "x",
                "--tiny",
                "tiny-wan-v1",
                "--frames",
                "8",
                "-o",
                o,
            ],
            "1 + 4k frames",
        ),
        (
            vec![
                "--prompt",
                "x",
                "--tiny",
                "tiny-wan-v1",
                "--scheduler",
                "ddim",
                "-o",
                o,
            ],
            "cannot take its place",
        ),
    ] {
        let mut full = vec!["generate"];
        full.extend(args);
        let r = fractal(&full);
        assert!(!r.status.success(), "{full:?} should fail");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(want), "{full:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!out.exists());
}

#[test]
fn manifest_pins_folder_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    assert!(fractal(&["model", "export-tiny", model.to_str().unwrap()])
        .status
        .success());
    let hashes =
        String::from_utf8(fractal(&["model", "hash", model.to_str().unwrap()]).stdout).unwrap();
    assert!(
        hashes.contains("unet/diffusion_pytorch_model.safetensors"),
        "{hashes}"
    );
    // A manifest pinning the exported folder, built from the example manifest.
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/manifest-tiny.toml"
    ))
    .unwrap();
    let manifest = example.replace("[weights]\nbuiltin = \"tiny-v1\"\n", &hashes);
    let mpath = dir.path().join("m.toml");
    std::fs::write(&mpath, &manifest).unwrap();
    let out = dir.path().join("v.mp4");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--manifest",
        mpath.to_str().unwrap(),
        "--prompt",
        "fox",
        "--frames",
        "2",
        "--size",
        "32x32",
        "--steps",
        "1",
        "-o",
        out.to_str().unwrap(),
    ];
    let r = fractal(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // Corrupt one weight file: refused before loading.
    let w = model.join("vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&w, bytes).unwrap();
    let r = fractal(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("does not match the manifest"),
        "{err}"
    );
    // Missing weights: a clear error too.
    std::fs::remove_file(&w).unwrap();
    let err = String::from_utf8_lossy(&fractal(&args).stderr).to_string();
    assert!(err.contains("missing model file"), "{err}");
}

/// Wan 2.1 through the same command: the built-in tiny Wan writes a
/// playable clip of 1 + 4k frames, and the folder `export-tiny` writes,
/// pinned by a manifest, makes the same bytes.
#[test]
fn tiny_wan_generates_and_its_exported_folder_makes_the_same_clip() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("wan");
    let r = fractal(&[
        "model",
        "export-tiny",
        "--variant",
        "tiny-wan-v1",
        model.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let hashes =
        String::from_utf8(fractal(&["model", "hash", model.to_str().unwrap()]).stdout).unwrap();
    for f in [
        "transformer/diffusion_pytorch_model.safetensors",
        "tokenizer/tokenizer.json",
        "text_encoder/config.json",
    ] {
        assert!(hashes.contains(f), "{hashes}");
    }
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/manifest-tiny-wan.toml"
    ))
    .unwrap();
    let manifest = example.replace("[weights]\nbuiltin = \"tiny-wan-v1\"\n", &hashes);
    assert_ne!(manifest, example);
    let mpath = dir.path().join("m.toml");
    std::fs::write(&mpath, &manifest).unwrap();
    let run = |out: &Path, source: &[&str]| {
        let mut args = vec!["generate"];
        args.extend(source);
        args.extend([
            "--prompt",
            "a red circle moving left",
            "--seed",
            "5",
            "--frames",
            "9",
            "--size",
            "64x64",
            "--steps",
            "3",
            "-o",
            out.to_str().unwrap(),
        ]);
        let r = fractal(&args);
        assert!(
            r.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        std::fs::read(out).unwrap()
    };
    let builtin = run(&dir.path().join("a.mp4"), &["--tiny", "tiny-wan-v1"]);
    let again = run(&dir.path().join("b.mp4"), &["--tiny", "tiny-wan-v1"]);
    assert_eq!(builtin, again);
    let folder = run(
        &dir.path().join("c.mp4"),
        &[
            "--model",
            model.to_str().unwrap(),
            "--manifest",
            mpath.to_str().unwrap(),
        ],
    );
    assert_eq!(builtin, folder);
    if let Some(info) = ffprobe(
        &dir.path().join("a.mp4"),
        "stream=codec_name,width,height,nb_read_frames",
    ) {
        assert_eq!(info, "h264,64,64,9");
    }
}
