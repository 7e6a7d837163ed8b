//! Fuzz harnesses: one function per parser that reads bytes a peer or a
//! file controls. Each takes arbitrary bytes, must never panic, and returns
//! whether the input was accepted. The cargo-fuzz targets under `fuzz/`
//! call these; `tests/replay.rs` runs the seed corpora (which must be
//! accepted) and every committed crash input (`fuzz/regressions/`) through
//! them in the ordinary test suite, so CI needs no fuzzer.
//!
//! Where a parser has an invariant beyond "no panic" (a signed request is
//! accepted once, a parsed request serializes back to itself), the harness
//! asserts it, so the fuzzer looks for those violations too.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fractal_engine::io::video::Frames;
use fractal_engine::{builtin::tiny, pipelines::text_to_video_sd::Model, TinyVariant};
use fractal_protocol::btauth::{self, ReplayCache, VerifyPolicy};
use fractal_protocol::merkle::{f32_le_bytes, values_digest, MerkleTree};
use fractal_protocol::wire::{
    AuditAnswer, AuditChallenge, GenerateRequest, GenerateResponse, LeafOpening, ProverInfo,
    StreamItem, PROTOCOL_VERSION,
};
use fractal_protocol::{Digest32, JobId, Keypair, ModelManifest, Seed};

/// A harness: arbitrary bytes in, "accepted" out; it must never panic.
pub type Harness = fn(&[u8]) -> bool;

/// Every harness, by the name of its cargo-fuzz target.
pub const TARGETS: &[(&str, Harness)] = &[
    ("btauth", btauth_headers),
    ("wire_json", wire_json),
    ("gateway_create", gateway_create),
    ("manifest", manifest),
    ("audit_answer", audit_answer),
    ("model_config", model_config),
    ("safetensors", safetensors),
    ("mp4", mp4),
];

/// The verifier's clock in the btauth harness and its seeds.
const NOW_NS: u64 = 1_764_000_000_000_000_000;
const SIGNED_PATH: &str = "/v1/generate";

fn alice() -> &'static Keypair {
    static K: OnceLock<Keypair> = OnceLock::new();
    K.get_or_init(|| Keypair::from_suri("//Alice").expect("dev key"))
}
fn bob() -> &'static Keypair {
    static K: OnceLock<Keypair> = OnceLock::new();
    K.get_or_init(|| Keypair::from_suri("//Bob").expect("dev key"))
}

/// Input: `Name: value` header lines, an empty line, then the body; the
/// request is a POST to /v1/generate addressed to //Bob.
pub fn btauth_headers(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let headers: Vec<(&str, String)> = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim().to_string()))
        .collect();
    let policy = VerifyPolicy::new(bob().hotkey());
    let replay = ReplayCache::new(16);
    let first = btauth::verify(
        &headers,
        "POST",
        SIGNED_PATH,
        body.as_bytes(),
        &policy,
        &replay,
        NOW_NS,
    );
    if first.is_ok() {
        let again = btauth::verify(
            &headers,
            "POST",
            SIGNED_PATH,
            body.as_bytes(),
            &policy,
            &replay,
            NOW_NS,
        );
        assert_eq!(
            again.err(),
            Some(btauth::AuthError::Replayed),
            "a signed request is accepted once"
        );
    }
    first.is_ok()
}

fn tiny_manifest() -> &'static (ModelManifest, fractal_protocol::ManifestId) {
    static M: OnceLock<(ModelManifest, fractal_protocol::ManifestId)> = OnceLock::new();
    M.get_or_init(|| {
        let m = tiny::manifest(TinyVariant::Base);
        let id = m.id();
        (m, id)
    })
}

/// Input: a selector byte, then JSON for the message it picks — what a
/// prover parses from validators (generate request, audit challenge) and
/// what validators and the gateway parse from provers (response, stream
/// line, info).
pub fn wire_json(data: &[u8]) -> bool {
    let Some((&which, json)) = data.split_first() else {
        return false;
    };
    fn round_trip<T>(v: &T)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_vec(v).expect("serializes");
        let back: T = serde_json::from_slice(&text).expect("parses what it wrote");
        assert_eq!(&back, v, "JSON round trip");
    }
    match which % 5 {
        0 => match serde_json::from_slice::<GenerateRequest>(json) {
            Ok(r) => {
                round_trip(&r);
                let (m, id) = tiny_manifest();
                r.validate(m, id).is_ok()
            }
            Err(_) => false,
        },
        1 => match serde_json::from_slice::<AuditChallenge>(json) {
            Ok(c) => {
                round_trip(&c);
                c.validate(9).is_ok()
            }
            Err(_) => false,
        },
        2 => serde_json::from_slice::<GenerateResponse>(json).is_ok(),
        3 => serde_json::from_slice::<StreamItem>(json).is_ok(),
        _ => serde_json::from_slice::<ProverInfo>(json).is_ok(),
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

/// The multipart boundary the gateway_create harness declares.
pub const BOUNDARY: &str = "----WebKitFormBoundary7MA4YWxkTrZu0gW";

/// Input: a selector byte (JSON or multipart body), then the body of
/// `POST /v1/videos`; runs the gateway's body parser and field checks.
pub fn gateway_create(data: &[u8]) -> bool {
    let Some((&which, body)) = data.split_first() else {
        return false;
    };
    let content_type = if which % 2 == 0 {
        "application/json".to_string()
    } else {
        format!("multipart/form-data; boundary={BOUNDARY}")
    };
    let body = bytes::Bytes::copy_from_slice(body);
    let Ok(fields) = runtime().block_on(fractal_gateway::parse_body(&content_type, body)) else {
        return false;
    };
    let (m, id) = tiny_manifest();
    let offered = [fractal_gateway::models::OfferedModel {
        manifest_id: *id,
        manifest: std::sync::Arc::new(m.clone()),
        state: fractal_protocol::ModelState::Active,
    }];
    match fractal_gateway::openai::parse_create(&fields, &offered, || 7) {
        Ok(spec) => {
            assert!(spec.frames >= 1 && spec.frames <= m.limits.max_frames);
            assert!(spec.steps >= 1 && spec.steps <= m.limits.max_steps);
            true
        }
        Err(e) => {
            assert!(e.status.is_client_error(), "bad input is a 4xx: {e:?}");
            false
        }
    }
}

/// Input: a manifest as TOML or JSON.
pub fn manifest(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    match ModelManifest::parse(text) {
        Ok(m) => {
            // A manifest that parses has a content id, stable across calls.
            assert_eq!(m.id(), m.id());
            true
        }
        Err(_) => false,
    }
}

/// A committed trace of five leaves and a challenge for leaves 1 and 3.
struct Trace {
    latents: Vec<Vec<f32>>,
    tree: MerkleTree,
    challenge: AuditChallenge,
}

impl Trace {
    fn tree_digest(&self, leaf: u32) -> Digest32 {
        values_digest(&self.latents[leaf as usize])
    }
}

fn trace() -> &'static Trace {
    static T: OnceLock<Trace> = OnceLock::new();
    T.get_or_init(|| {
        let latents: Vec<Vec<f32>> = (0..5)
            .map(|s| (0..16).map(|i| (s * 16 + i) as f32 / 7.0).collect())
            .collect();
        let digests: Vec<Digest32> = latents.iter().map(|l| values_digest(l)).collect();
        Trace {
            tree: MerkleTree::new(&digests).expect("five leaves"),
            latents,
            challenge: AuditChallenge {
                version: PROTOCOL_VERSION,
                job_id: JobId([7; 16]),
                leaves: vec![1, 3],
            },
        }
    })
}

/// Input: a prover's audit answer (JSON), checked against a committed
/// root and a challenge as the verifier does before any numeric check.
pub fn audit_answer(data: &[u8]) -> bool {
    let Ok(answer) = serde_json::from_slice::<AuditAnswer>(data) else {
        return false;
    };
    let t = trace();
    let ok = answer.validate(&t.challenge, &t.tree.root()).is_ok();
    if ok {
        for o in &answer.openings {
            let values = o.values().expect("validated sizes decode");
            // What the root committed to is exactly what decodes.
            assert_eq!(f32_le_bytes(&values), o.values_f32.0);
            assert_eq!(values_digest(&values), t.tree_digest(o.leaf));
        }
    }
    ok
}

/// A diffusers folder of the tiny model, written once per process.
fn tiny_folder() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fractal-fuzz-model-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Model::write_tiny_folder(
            TinyVariant::Base,
            &dir,
            &tiny::manifest(TinyVariant::Base).scheduler,
        )
        .expect("tiny folder");
        dir
    })
}

/// The config files `model_config` can replace, by selector byte.
pub const CONFIG_FILES: [&str; 5] = [
    "model_index.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
];

/// Input: a selector byte naming one config file of a diffusers folder,
/// then that file's content; the rest of the folder is the tiny model.
/// Loads the model and its scheduler config as a node does at start-up.
pub fn model_config(data: &[u8]) -> bool {
    let Some((&which, content)) = data.split_first() else {
        return false;
    };
    let dir = tiny_folder();
    let path = dir.join(CONFIG_FILES[which as usize % CONFIG_FILES.len()]);
    let original = std::fs::read(&path).expect("tiny folder file");
    std::fs::write(&path, content).expect("write config");
    let loaded = Model::load(dir, &candle_core::Device::Cpu).is_ok()
        && fractal_engine::schedulers::spec_from_folder(dir).is_ok();
    std::fs::write(&path, original).expect("restore config");
    loaded
}

/// Input: a whole safetensors file; opened as the engine opens weights,
/// then every tensor it lists is read.
pub fn safetensors(data: &[u8]) -> bool {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("fractal-fuzz-{}.safetensors", std::process::id()))
    });
    std::fs::write(path, data).expect("write weights");
    let Ok(file) = fractal_engine::io::weights::SafetensorsFile::open(path) else {
        return false;
    };
    let names = file.names();
    let vb = file.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu);
    names
        .iter()
        .all(|(name, shape)| vb.get(shape.as_slice(), name).is_ok())
}

/// Input: an MP4 as a prover returns it; decoded as the gateway checks it.
pub fn mp4(data: &[u8]) -> bool {
    match fractal_engine::io::video::decode_mp4(data, 64) {
        Ok(v) => {
            assert!(v.frames.len() <= 64, "max_frames is a bound");
            assert!(v.frames.iter().all(|f| f.len() == v.width * v.height * 3));
            true
        }
        Err(_) => false,
    }
}

/// Inputs each harness accepts, to start the fuzzers from (written to
/// `fuzz/corpus/<target>/` by `scripts/fuzz`) and to keep them honest
/// (the replay test asserts they are accepted).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "btauth" => {
            let body = br#"{"prompt":"a fox"}"#;
            let signed = btauth::sign(
                alice(),
                "POST",
                SIGNED_PATH,
                body,
                Some(&bob().hotkey()),
                NOW_NS,
            );
            let mut text: String = signed.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            text.push('\n');
            text.push_str(std::str::from_utf8(body).expect("ascii"));
            vec![text.into_bytes()]
        }
        "wire_json" => {
            let (m, _) = tiny_manifest();
            let mut req = GenerateRequest::with_defaults(m, "a red fox", Seed(5));
            req.job_id = JobId([1; 16]);
            let challenge = AuditChallenge {
                version: PROTOCOL_VERSION,
                job_id: JobId([1; 16]),
                leaves: vec![0, 4],
            };
            vec![
                prefixed(0, &serde_json::to_vec(&req).expect("json")),
                prefixed(1, &serde_json::to_vec(&challenge).expect("json")),
            ]
        }
        "gateway_create" => {
            let json = br#"{"prompt":"a red fox running through snow","seconds":"1","steps":4,"seed":5,"negative_prompt":"blurry"}"#;
            let multipart = format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na red fox\r\n\
                 --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"seed\"\r\n\r\n5\r\n\
                 --{BOUNDARY}--\r\n"
            );
            vec![prefixed(0, json), prefixed(1, multipart.as_bytes())]
        }
        "manifest" => {
            let (m, _) = tiny_manifest();
            vec![
                serde_json::to_vec_pretty(m).expect("json"),
                include_bytes!("../../../examples/manifest-tiny.toml").to_vec(),
            ]
        }
        "audit_answer" => {
            let t = trace();
            let answer = AuditAnswer {
                version: PROTOCOL_VERSION,
                job_id: t.challenge.job_id,
                openings: t
                    .challenge
                    .leaves
                    .iter()
                    .map(|&s| LeafOpening {
                        leaf: s,
                        shape: vec![1, 4, 1, 2, 2],
                        values_f32: fractal_protocol::wire::Base64Bytes(f32_le_bytes(
                            &t.latents[s as usize],
                        )),
                        proof: t.tree.proof(s).expect("in range"),
                    })
                    .collect(),
            };
            vec![serde_json::to_vec(&answer).expect("json")]
        }
        "model_config" => {
            let dir = tiny_folder();
            CONFIG_FILES
                .iter()
                .enumerate()
                .map(|(i, f)| prefixed(i as u8, &std::fs::read(dir.join(f)).expect("config")))
                .collect()
        }
        "safetensors" => {
            // The tiny VAE's weights: a real file the engine loads.
            vec![
                std::fs::read(tiny_folder().join("vae/diffusion_pytorch_model.safetensors"))
                    .expect("weights"),
            ]
        }
        "mp4" => {
            let (w, h, n) = (16, 16, 3);
            let rgb: Vec<u8> = (0..w * h * 3 * n).map(|i| (i * 7 % 251) as u8).collect();
            let video = fractal_engine::io::video::encode_mp4(Frames {
                rgb: &rgb,
                width: w,
                height: h,
                count: n,
                fps: 8,
            })
            .expect("encode");
            vec![video]
        }
        other => panic!("no fuzz target {other:?}"),
    }
}

fn prefixed(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(rest);
    v
}
