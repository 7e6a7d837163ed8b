//! Signing and reading content credentials on real MP4, GIF and PNG files
//! from the engine's encoders.

use fractal_credentials::assertion::binding_message;
use fractal_credentials::{
    read, Audit, CertificateBinding, CredentialError, Generation, Issuer, MediaFormat, Origin,
    SigningIdentity, State,
};
use fractal_engine::io::video::{encode_gif, encode_mp4, thumbnail_png, Frames};
use fractal_protocol::keys::Keypair;

fn clip() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (w, h, n) = (32, 24, 4);
    let rgb: Vec<u8> = (0..w * h * 3 * n).map(|i| (i * 7 % 251) as u8).collect();
    let f = Frames {
        rgb: &rgb,
        width: w,
        height: h,
        count: n,
        fps: 8,
    };
    (
        encode_mp4(f).unwrap(),
        encode_gif(f).unwrap(),
        thumbnail_png(f).unwrap(),
    )
}

fn generation() -> Generation {
    Generation {
        video_id: "video_0123".into(),
        manifest_id: "ab".repeat(32),
        model: "tiny-v1".into(),
        seed: 42,
        prompt_sha256: Generation::sha256_hex("a red circle"),
        negative_prompt_sha256: Generation::sha256_hex(""),
        frames: 4,
        width: 32,
        height: 24,
        steps: 10,
        guidance_scale: 7.5,
        prover: Keypair::from_seed(&[9; 32]).hotkey().to_string(),
        trace_root: "cd".repeat(32),
        audit: Audit::Failed {
            check: "step".into(),
        },
    }
}

fn issuer(dir: &std::path::Path, key: &Keypair) -> Issuer {
    let id = SigningIdentity::development(dir, &key.hotkey()).unwrap();
    Issuer::new(id, key.hotkey(), |m| key.sign(m)).unwrap()
}

#[test]
fn every_served_format_carries_a_valid_manifest_with_the_job_and_a_verified_binding() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::from_seed(&[1; 32]);
    let issuer = issuer(dir.path(), &key);
    let (mp4, gif, png) = clip();
    for (bytes, format) in [
        (mp4, MediaFormat::Mp4),
        (gif, MediaFormat::Gif),
        (png, MediaFormat::Png),
    ] {
        let signed = issuer.sign(&bytes, format, &generation()).unwrap();
        assert_eq!(MediaFormat::sniff(&signed).unwrap(), format);
        let c = read(&signed, format, None).unwrap();
        assert!(
            c.valid_apart_from_trust(),
            "{format:?}: {} {:?}",
            c.state,
            c.failures
        );
        assert_eq!(
            c.state,
            State::Valid,
            "{format:?}: no trust anchors, so not trusted"
        );
        let f = c.fractal.as_ref().expect("the Fractal assertion");
        assert_eq!(f.generation, generation());
        assert_eq!(f.validator, key.hotkey().to_string());
        assert_eq!(c.binding, Ok(key.hotkey().to_string()), "{format:?}");
        assert_eq!(
            c.digital_source_type.as_deref(),
            Some(fractal_credentials::TRAINED_ALGORITHMIC_MEDIA)
        );
        assert!(c.claim_generator.iter().any(|g| g.starts_with("Fractal ")));

        // The media bytes are covered by the manifest's hash: flip one of
        // the original file's middle bytes where it lies in the signed one.
        let mid = &bytes[bytes.len() / 2..bytes.len() / 2 + 16];
        let at = signed
            .windows(16)
            .position(|w| w == mid)
            .expect("the media survives signing");
        let mut tampered = signed.clone();
        tampered[at] ^= 0x40;
        let t = read(&tampered, format, None);
        // An error is also a failure to validate (e.g. a box header was hit).
        if let Ok(t) = t {
            assert!(
                !t.signature_valid(),
                "{format:?}: tampered file still valid"
            );
        }
    }
}

#[test]
fn the_development_root_as_trust_anchor_makes_the_manifest_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::from_seed(&[2; 32]);
    let issuer = issuer(dir.path(), &key);
    let (_, _, png) = clip();
    let signed = issuer.sign(&png, MediaFormat::Png, &generation()).unwrap();
    let chain = issuer.identity().chain_pem();
    let root = &chain[chain.rfind("-----BEGIN CERTIFICATE-----").unwrap()..];
    let c = read(&signed, MediaFormat::Png, Some(root)).unwrap();
    assert_eq!(c.state, State::Trusted, "{:?}", c.failures);
}

#[test]
fn a_binding_for_another_certificate_or_by_another_key_fails() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let key = Keypair::from_seed(&[3; 32]);
    let a = SigningIdentity::development(dir_a.path(), &key.hotkey()).unwrap();
    let b = SigningIdentity::development(dir_b.path(), &key.hotkey()).unwrap();
    let (_, _, png) = clip();

    // Certificate B signs, but the hotkey vouched for certificate A.
    let a_message = binding_message(a.leaf_spki());
    let b_spki = b.leaf_spki().to_vec();
    let foreign = Issuer::new(b, key.hotkey(), |_| key.sign(&a_message)).unwrap();
    let c = read(
        &foreign.sign(&png, MediaFormat::Png, &generation()).unwrap(),
        MediaFormat::Png,
        None,
    )
    .unwrap();
    assert!(
        c.valid_apart_from_trust(),
        "the C2PA signature itself is fine"
    );
    assert!(
        c.binding.is_err(),
        "a binding of another certificate verified"
    );
    // A genuine binding of A, copied into a manifest that B signed.
    let genuine = CertificateBinding::new(&key.hotkey(), a.leaf_spki(), key.sign(&a_message));
    assert!(genuine.verify(a.leaf_spki()).is_ok());
    let why = genuine.verify(&b_spki).unwrap_err();
    assert!(why.contains("another certificate"), "{why}");

    // The right certificate, signed by a key that is not the hotkey named.
    let other = Keypair::from_seed(&[4; 32]);
    let forged = Issuer::new(a, key.hotkey(), |m| other.sign(m)).unwrap();
    let c = read(
        &forged.sign(&png, MediaFormat::Png, &generation()).unwrap(),
        MediaFormat::Png,
        None,
    )
    .unwrap();
    let why = c.binding.unwrap_err();
    assert!(why.contains("does not verify"), "{why}");
}

#[test]
fn the_development_chain_is_made_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let hotkey = Keypair::from_seed(&[5; 32]).hotkey();
    let first = SigningIdentity::development(dir.path(), &hotkey).unwrap();
    assert_eq!(first.origin(), &Origin::Development { created: true });
    assert!(first.subject().contains(&hotkey.to_string()));
    let again = SigningIdentity::development(dir.path(), &hotkey).unwrap();
    assert_eq!(again.origin(), &Origin::Development { created: false });
    assert_eq!(first.leaf_spki(), again.leaf_spki());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let (_, key) = SigningIdentity::development_files(dir.path());
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the private key is readable by others");
    }
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hotkey = Keypair::from_seed(&[6; 32]).hotkey();
    let id = SigningIdentity::development(dir.path(), &hotkey).unwrap();
    let (chain, _) = SigningIdentity::development_files(dir.path());

    // A key that is not PKCS#8 PEM.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let e = SigningIdentity::from_files(&chain, &junk).err().unwrap();
    assert!(e.to_string().contains("private key"), "{e}");

    // The key of another certificate: caught by the issuer's self-test.
    let other = tempfile::tempdir().unwrap();
    SigningIdentity::development(other.path(), &hotkey).unwrap();
    let (_, other_key) = SigningIdentity::development_files(other.path());
    let mismatched = SigningIdentity::from_files(&chain, &other_key).unwrap();
    let e = Issuer::new(mismatched, hotkey, |_| [0; 64]).err().unwrap();
    assert!(e.to_string().contains("does the key belong"), "{e}");
    drop(id);

    // A file with no manifest, and one that is no media at all.
    let (_, _, png) = clip();
    assert!(matches!(
        read(&png, MediaFormat::Png, None),
        Err(CredentialError::NoManifest)
    ));
    assert!(MediaFormat::sniff(b"hello").is_err());
}
