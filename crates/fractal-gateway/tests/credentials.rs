//! Content credentials through the gateway: a real prover on loopback makes
//! the video, the verifier audits it, and every file the app downloads
//! carries a C2PA manifest that validates and says how it was made.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fractal_chain::{Chain, Hyperparams, LocalChain, Rao};
use fractal_credentials::{read, Audit, Generation, MediaFormat, SigningIdentity};
use fractal_engine::PinnedModel;
use fractal_gateway::credentials::CertificateSource;
use fractal_gateway::db::KeyLimits;
use fractal_gateway::{Gateway, GatewayConfig, GatewayError};
use fractal_protocol::Keypair;
use fractal_prover::{Prover, ProverConfig, ValidatorAuthorizer};
use fractal_verifier::store::Store;
use fractal_verifier::{Verifier, VerifierConfig};
use serde_json::{json, Value};

mod common;
use common::{serve, tiny_model};

fn key(n: u8) -> Keypair {
    Keypair::from_seed(&[n; 32])
}

fn pinned() -> Arc<PinnedModel> {
    Arc::new(tiny_model())
}

/// A chain where `vkey` holds a permit and one honest prover serves.
async fn grid(vkey: &Keypair) -> (Arc<LocalChain>, Keypair) {
    let params = Hyperparams::default();
    let chain = Arc::new(LocalChain::in_memory(params.clone(), key(1).hotkey()).unwrap());
    chain.register(&key(2), &vkey.hotkey()).await.unwrap();
    chain
        .add_stake(&key(2), &vkey.hotkey(), Rao(100 * Rao::PER_TAO))
        .await
        .unwrap();
    chain.produce_blocks(params.tempo).unwrap();
    let auth = ValidatorAuthorizer::new([]);
    auth.update(&chain.metagraph().await.unwrap());
    let hot = key(5);
    chain.register(&key(6), &hot.hotkey()).await.unwrap();
    let prover = Prover::new(hot.clone(), tiny_model(), ProverConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(fractal_prover::serve(
        listener,
        prover,
        auth,
        std::future::pending(),
    ));
    fractal_prover::announce(chain.as_ref(), &hot, addr)
        .await
        .unwrap();
    (chain, hot)
}

fn verifier(vkey: Keypair, chain: Arc<LocalChain>, model: Arc<PinnedModel>) -> Arc<Verifier> {
    let config = VerifierConfig {
        audit_sample: 1.0,
        ..VerifierConfig::from_manifest(&model.manifest)
    };
    Verifier::new(vkey, chain, model, Store::in_memory().unwrap(), config).unwrap()
}

async fn get(http: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    http.get(url).bearer_auth(key).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_carry_credentials_that_match_the_job_and_its_audit() {
    let dir = tempfile::tempdir().unwrap();
    let vkey = key(3);
    let (chain, prover) = grid(&vkey).await;
    let model = pinned();
    let gw = Gateway::open(
        GatewayConfig::new(dir.path().to_path_buf()),
        verifier(vkey.clone(), chain, model.clone()),
        model.clone(),
    )
    .unwrap();
    // Held to the end: dropping it stops the gateway.
    let running = serve(gw, KeyLimits::default()).await;
    let (base, secret, gw) = (
        running.base.clone(),
        running.key.clone(),
        running.gw.clone(),
    );
    let http = reqwest::Client::new();
    let prompt = "a blue square moving up";
    let id = running
        .create(
            json!({"prompt": prompt, "size": "32x32", "seconds": "0.25", "steps": 3, "seed": 77}),
        )
        .await;
    let started = Instant::now();
    let job = loop {
        let j: Value = get(&http, &format!("{base}/v1/videos/{id}"), &secret)
            .await
            .json()
            .await
            .unwrap();
        assert_ne!(j["status"], "failed", "{j}");
        if j["status"] == "completed" {
            break j;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["prover"], prover.hotkey().to_string());

    // Every download is signed; the audit (all jobs sampled here) shows up
    // once the verifier has recorded it.
    let content = format!("{base}/v1/videos/{id}/content");
    let (signed, c) = loop {
        let bytes = get(&http, &content, &secret)
            .await
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let c = read(&bytes, MediaFormat::Mp4, None).unwrap();
        let audit = &c.fractal.as_ref().unwrap().generation.audit;
        assert!(matches!(audit, Audit::Pending | Audit::Passed), "{audit:?}");
        if *audit == Audit::Passed {
            break (bytes, c);
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the audit never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(c.valid_apart_from_trust(), "{} {:?}", c.state, c.failures);
    assert_eq!(c.binding, Ok(vkey.hotkey().to_string()));
    let f = c.fractal.unwrap();
    let g = &f.generation;
    assert_eq!(g.video_id, id);
    assert_eq!(g.manifest_id, model.manifest_id.to_string());
    assert_eq!(g.model, model.manifest.name);
    assert_eq!(g.seed, 77);
    assert_eq!(g.prompt_sha256, Generation::sha256_hex(prompt));
    assert_eq!((g.width, g.height, g.frames, g.steps), (32, 32, 2, 3));
    assert_eq!(g.guidance_scale, model.manifest.defaults.guidance_scale);
    assert_eq!(g.prover, prover.hotkey().to_string());
    assert_eq!(g.trace_root.len(), 64, "{}", g.trace_root);
    assert_eq!(f.validator, vkey.hotkey().to_string());

    // The media inside is the prover's: it decodes to the same frames as the
    // bare file the trace was checked against.
    let bare = std::fs::read(gw.config.videos_dir().join(format!("{id}.mp4"))).unwrap();
    let (a, b) = (
        fractal_engine::io::video::decode_mp4(&bare, 64).unwrap(),
        fractal_engine::io::video::decode_mp4(&signed, 64).unwrap(),
    );
    assert_eq!(a.frames, b.frames);
    // A second download is the cached file, byte for byte.
    assert_eq!(
        get(&http, &content, &secret).await.bytes().await.unwrap(),
        signed
    );

    // One flipped media byte breaks the manifest's hash.
    let mid = &bare[bare.len() / 2..bare.len() / 2 + 16];
    let at = signed.windows(16).position(|w| w == mid).unwrap();
    let mut tampered = signed.clone();
    tampered[at] ^= 1;
    assert!(read(&tampered, MediaFormat::Mp4, None).is_ok_and(|t| !t.signature_valid()));

    // The GIF and the thumbnail carry the same assertion.
    for (variant, format) in [("gif", MediaFormat::Gif), ("thumbnail", MediaFormat::Png)] {
        let r = get(&http, &format!("{content}?variant={variant}"), &secret).await;
        assert_eq!(r.headers()["content-type"], format.mime());
        let c = read(&r.bytes().await.unwrap(), format, None).unwrap();
        assert!(c.valid_apart_from_trust(), "{variant}: {:?}", c.failures);
        assert_eq!(c.fractal.unwrap().generation, *g, "{variant}");
    }

    // Deleting the video deletes its signed copies too.
    http.delete(format!("{base}/v1/videos/{id}"))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(gw.config.videos_dir()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_certificate_signs_and_a_bad_one_stops_the_start() {
    let vkey = key(3);
    let chain = Arc::new(LocalChain::in_memory(Hyperparams::default(), key(1).hotkey()).unwrap());
    let model = pinned();
    // The operator's own chain (made here the way the development one is).
    let certs = tempfile::tempdir().unwrap();
    let own = SigningIdentity::development(certs.path(), &vkey.hotkey()).unwrap();
    let (chain_pem, key_pem) = SigningIdentity::development_files(certs.path());

    let dir = tempfile::tempdir().unwrap();
    let mut config = GatewayConfig::new(dir.path().to_path_buf());
    config.certificate = CertificateSource::Operator {
        chain: chain_pem.clone(),
        key: key_pem,
    };
    Gateway::open(
        config,
        verifier(vkey.clone(), chain.clone(), model.clone()),
        model.clone(),
    )
    .unwrap();
    let (dev_chain, _) = SigningIdentity::development_files(dir.path());
    assert!(
        !dev_chain.exists(),
        "no development chain next to an operator's"
    );
    drop(own);

    // A key file that is not the certificate's key.
    let junk = certs.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let mut config = GatewayConfig::new(dir.path().to_path_buf());
    config.certificate = CertificateSource::Operator {
        chain: chain_pem,
        key: junk,
    };
    match Gateway::open(config, verifier(vkey, chain, model.clone()), model) {
        Err(e @ GatewayError::Credentials(_)) => {
            assert!(e.to_string().contains("private key"), "{e}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a bad key was accepted"),
    }
}
