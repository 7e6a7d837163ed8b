//! The `fractal` binary as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

fn fractal(wallets: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fractal"))
        .args(args)
        .env("BT_WALLET_PATH", wallets)
        .env("TEST_PW", "correct horse")
        .env("WRONG_PW", "battery staple")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fail(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn wallet_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let created = ok(fractal(
        w,
        &[
            "wallet",
            "create",
            "-w",
            "val",
            "--hotkey",
            "hk",
            "--password-env",
            "TEST_PW",
        ],
    ));
    assert!(created.contains("(encrypted)"), "{created}");
    assert!(
        !created.contains("mnemonic:"),
        "secrets are not printed unless asked"
    );
    assert!(std::fs::read(w.join("val/coldkey"))
        .unwrap()
        .starts_with(b"$NACL"));

    // Restoring well-known keys gives substrate's addresses.
    let out = ok(fractal(
        w,
        &[
            "wallet",
            "regen-hotkey",
            "-w",
            "val",
            "--hotkey",
            "alice",
            "--uri",
            "//Alice",
        ],
    ));
    assert!(
        out.contains("5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"),
        "{out}"
    );
    let dev = "bottom drive obey lake curtain smoke basket hold race lonely fit walk";
    let out = ok(fractal(
        w,
        &[
            "wallet",
            "regen-coldkey",
            "-w",
            "dev",
            "--mnemonic",
            dev,
            "--no-password",
        ],
    ));
    assert!(
        out.contains("5DfhGyQdFobKM8NsWvEeAKk5EQQgYe9AydgJ7rMB6E1EqRzV"),
        "{out}"
    );

    let list = ok(fractal(w, &["wallet", "list"]));
    assert!(
        list.contains("val")
            && list.contains("hk")
            && list.contains("alice")
            && list.contains("dev"),
        "{list}"
    );

    // Secrets only with the right password.
    let shown = ok(fractal(
        w,
        &[
            "wallet",
            "show",
            "-w",
            "val",
            "--secrets",
            "--password-env",
            "TEST_PW",
        ],
    ));
    assert_eq!(shown.matches("mnemonic:").count(), 2, "{shown}");
    let err = fail(fractal(
        w,
        &[
            "wallet",
            "show",
            "-w",
            "val",
            "--secrets",
            "--password-env",
            "WRONG_PW",
        ],
    ));
    assert!(err.contains("wrong password"), "{err}");
    let err = fail(fractal(
        w,
        &[
            "wallet",
            "show",
            "-w",
            "val",
            "--secrets",
            "--password-env",
            "UNSET_VAR",
        ],
    ));
    assert!(err.contains("UNSET_VAR is not set"), "{err}");

    // No silent overwrite; bad input is a clear error.
    let err = fail(fractal(
        w,
        &[
            "wallet",
            "regen-hotkey",
            "-w",
            "val",
            "--hotkey",
            "alice",
            "--uri",
            "//Bob",
        ],
    ));
    assert!(err.contains("already exists"), "{err}");
    let err = fail(fractal(
        w,
        &[
            "wallet",
            "regen-hotkey",
            "-w",
            "val",
            "--hotkey",
            "x",
            "--mnemonic",
            "not a real phrase",
        ],
    ));
    assert!(err.contains("invalid mnemonic"), "{err}");
    let err = fail(fractal(w, &["wallet", "new-hotkey", "-w", "../escape"]));
    assert!(err.contains("invalid name"), "{err}");
    let err = fail(fractal(w, &["wallet", "show", "-w", "nobody"]));
    assert!(err.contains("no wallet"), "{err}");
}

#[test]
fn manifest_id_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.toml");
    std::fs::write(&file, include_str!("../../../examples/manifest-tiny.toml")).unwrap();
    let id = ok(fractal(
        dir.path(),
        &["manifest", "id", file.to_str().unwrap()],
    ));
    assert_eq!(id.trim().len(), 64);
    let check = ok(fractal(
        dir.path(),
        &["manifest", "check", file.to_str().unwrap()],
    ));
    assert!(check.contains(id.trim()), "{check}");
    std::fs::write(&file, "manifest_version = 1\n").unwrap();
    let err = fail(fractal(
        dir.path(),
        &["manifest", "check", file.to_str().unwrap()],
    ));
    assert!(err.contains("cannot parse manifest"), "{err}");
}

#[test]
fn world_export_writes_the_clips_its_index_describes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("held");
    let args = [
        "world", "export", "--split", "held-out", "--seeds", "2", "--frames", "4", "--size", "16",
        "--out",
    ];
    let mut with_out: Vec<&str> = args.to_vec();
    with_out.push(out.to_str().unwrap());
    ok(fractal(dir.path(), &with_out));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let count = index["count"].as_u64().unwrap() as usize;
    let clips = index["clips"].as_array().unwrap();
    assert_eq!(clips.len(), count);
    assert!(count > 0 && count.is_multiple_of(2), "{count} clips");
    assert!(clips.iter().all(|c| c["held_out"] == true));
    // Every clip's bytes are the renderer's for its caption and seed.
    let bytes = std::fs::read(out.join("clips.u8")).unwrap();
    let clip_len = 4 * 16 * 16 * 3;
    assert_eq!(bytes.len(), count * clip_len);
    for (i, c) in clips.iter().enumerate().step_by(7) {
        let scene = fractal_world::Scene::parse(c["caption"].as_str().unwrap()).unwrap();
        assert_eq!(scene.split(), fractal_world::Split::HeldOut);
        let clip = fractal_world::render(&scene, c["seed"].as_u64().unwrap(), 4, 16);
        assert_eq!(
            clip.frames.concat(),
            &bytes[i * clip_len..(i + 1) * clip_len]
        );
    }
    // The same export again: the same bytes.
    ok(fractal(dir.path(), &with_out));
    assert_eq!(std::fs::read(out.join("clips.u8")).unwrap(), bytes);
    // A bad size is refused with a reason and writes nothing.
    let bad = dir.path().join("bad");
    let err = fail(fractal(
        dir.path(),
        &[
            "world",
            "export",
            "--size",
            "8",
            "--out",
            bad.to_str().unwrap(),
        ],
    ));
    assert!(err.contains("size"), "{err}");
    assert!(!bad.join("clips.u8").exists());
}
