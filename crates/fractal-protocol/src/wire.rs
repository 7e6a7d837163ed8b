//! Messages between gateway, verifiers and provers (JSON, version [`PROTOCOL_VERSION`]).
//!
//! Every message carries `version`; a receiver rejects versions it does not
//! speak rather than guessing. Validation returns typed errors that servers
//! map to 4xx answers.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::manifest::{ModelManifest, Size};
use crate::merkle::MerkleProof;
use crate::{Digest32, Hotkey, JobId, ManifestId, Seed};

/// 2: traces commit exact f32 latents and model outputs (trace format v2,
/// see [`crate::merkle`]); audits open leaves, not steps.
pub const PROTOCOL_VERSION: u32 = 2;
/// Most leaves one audit may open; keeps answers bounded and audits cheap.
pub const MAX_AUDIT_LEAVES: usize = 32;

/// Binary data carried in JSON as standard base64.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Base64Bytes(pub Vec<u8>);

impl std::fmt::Debug for Base64Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Base64Bytes({} bytes)", self.0.len())
    }
}
impl Serialize for Base64Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}
impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Base64Bytes)
            .map_err(serde::de::Error::custom)
    }
}

/// What the prover sends back besides the commitment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Mp4,
    Gif,
    /// Only the final latents (f16), for verifiers that decode themselves.
    Latents,
}

/// The `latents` output: f32 values rounded to IEEE f16, little-endian.
pub fn latents_f16_bytes(latent: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(latent.len() * 2);
    for &x in latent {
        out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
    }
    out
}

/// Decodes the `latents` output (see [`latents_f16_bytes`]) to f32.
pub fn latents_from_f16_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    )
}

/// Ask a prover to run the pinned model once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub version: u32,
    pub job_id: JobId,
    pub manifest_id: ManifestId,
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub seed: Seed,
    pub size: Size,
    pub frames: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub output: OutputFormat,
    /// The longest the job may wait in the prover's queue before it
    /// starts, ms, by the prover's own estimate of the work ahead of it:
    /// a prover holding more refuses at once (busy, saying how much it
    /// holds) so the gateway can send the job elsewhere. `None`: any wait.
    /// Scheduling only: the output does not depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_within_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("unsupported protocol version {got} (this node speaks {PROTOCOL_VERSION})")]
    Version { got: u32 },
    #[error("unknown manifest {got}; this node runs {expected}")]
    UnknownManifest {
        got: ManifestId,
        expected: ManifestId,
    },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("{field} is {bytes} bytes; the limit is {max}")]
    TooLong {
        field: &'static str,
        bytes: usize,
        max: u32,
    },
    #[error("frames must be 1..={max}, got {got}")]
    Frames { got: u32, max: u32 },
    #[error("steps must be 1..={max}, got {got}")]
    Steps { got: u32, max: u32 },
    #[error("size {got} is not served by this model (supported: {supported})")]
    Size { got: Size, supported: String },
    #[error("guidance_scale must be a number in 0..=50")]
    Guidance,
    /// Frames and size the architecture cannot make (e.g. Wan's `1 + 4k` frames).
    #[error("{0}")]
    Shape(String),
    #[error("audit must name 1..={MAX_AUDIT_LEAVES} distinct trace leaves within 0..={max_leaf}")]
    AuditLeaves { max_leaf: u32 },
    #[error("opening for leaf {leaf}: {why}")]
    Opening { leaf: u32, why: &'static str },
}

impl GenerateRequest {
    /// A request using the manifest's defaults.
    pub fn with_defaults(manifest: &ModelManifest, prompt: impl Into<String>, seed: Seed) -> Self {
        let d = &manifest.defaults;
        GenerateRequest {
            version: PROTOCOL_VERSION,
            job_id: JobId::random(),
            manifest_id: manifest.id(),
            prompt: prompt.into(),
            negative_prompt: String::new(),
            seed,
            size: d.size,
            frames: d.frames,
            steps: d.steps,
            guidance_scale: d.guidance_scale,
            output: OutputFormat::Mp4,
            start_within_ms: None,
        }
    }

    /// Checks the request against the manifest this node serves
    /// (`manifest_id` is the precomputed `manifest.id()`).
    pub fn validate(
        &self,
        manifest: &ModelManifest,
        manifest_id: &ManifestId,
    ) -> Result<(), RequestError> {
        if self.version != PROTOCOL_VERSION {
            return Err(RequestError::Version { got: self.version });
        }
        if self.manifest_id != *manifest_id {
            return Err(RequestError::UnknownManifest {
                got: self.manifest_id,
                expected: *manifest_id,
            });
        }
        let l = &manifest.limits;
        if self.prompt.trim().is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        for (field, text) in [
            ("prompt", &self.prompt),
            ("negative_prompt", &self.negative_prompt),
        ] {
            if text.len() > l.max_prompt_bytes as usize {
                return Err(RequestError::TooLong {
                    field,
                    bytes: text.len(),
                    max: l.max_prompt_bytes,
                });
            }
        }
        if self.frames == 0 || self.frames > l.max_frames {
            return Err(RequestError::Frames {
                got: self.frames,
                max: l.max_frames,
            });
        }
        if self.steps == 0 || self.steps > l.max_steps {
            return Err(RequestError::Steps {
                got: self.steps,
                max: l.max_steps,
            });
        }
        if !l.sizes.contains(&self.size) {
            let supported = l
                .sizes
                .iter()
                .map(Size::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(RequestError::Size {
                got: self.size,
                supported,
            });
        }
        if !(self.guidance_scale.is_finite() && (0.0..=50.0).contains(&self.guidance_scale)) {
            return Err(RequestError::Guidance);
        }
        if let crate::manifest::Architecture::Wan(w) = &manifest.architecture {
            w.check_shape(self.frames, self.size)
                .map_err(RequestError::Shape)?;
        }
        Ok(())
    }
}

/// Wall-clock phases of one job, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub queue_ms: u64,
    pub denoise_ms: u64,
    pub decode_ms: u64,
    pub encode_ms: u64,
}

/// A finished job: the output plus the commitment to its trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateResponse {
    pub version: u32,
    pub job_id: JobId,
    pub manifest_id: ManifestId,
    /// Merkle root over the latents of steps 0..=steps and the model output
    /// of every step (see [`crate::merkle`]).
    pub trace_root: Digest32,
    /// Leaves in the trace: 2 * steps + 1.
    pub trace_len: u32,
    pub output: OutputFormat,
    pub content: Base64Bytes,
    pub timing: Timing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    Encoding,
    Denoising,
    Decoding,
    Muxing,
    Done,
}

/// One model a prover serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedModel {
    pub manifest_id: ManifestId,
    pub name: String,
}

/// A prover's `GET /v1/info`: what it runs and how busy it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProverInfo {
    pub version: u32,
    pub hotkey: Hotkey,
    /// The first of `models` (what a one-model prover runs), for readers
    /// that know only one.
    pub manifest_id: ManifestId,
    pub model: String,
    /// Every model it serves; a request for another is refused.
    #[serde(default)]
    pub models: Vec<ServedModel>,
    pub running: usize,
    pub queued: usize,
    pub max_concurrent: usize,
    pub max_queued: usize,
    pub audit_window_s: u64,
    /// Its estimate of the work it holds, ms per slot: what is left of the
    /// running jobs and the queued ones at its measured speed (a new job
    /// would start about this much later). `None` until it has finished a
    /// job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_ms: Option<u64>,
    /// Its measured speed over recent jobs, ms per frame·step at 64x64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms_per_frame_step: Option<f64>,
}

impl ProverInfo {
    /// The manifests it serves (older provers report only `manifest_id`).
    pub fn manifest_ids(&self) -> Vec<ManifestId> {
        if self.models.is_empty() {
            vec![self.manifest_id]
        } else {
            self.models.iter().map(|m| m.manifest_id).collect()
        }
    }

    pub fn serves(&self, id: &ManifestId) -> bool {
        self.manifest_ids().contains(id)
    }
}

/// Streamed while a job runs (one JSON object per line / SSE event).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub job_id: JobId,
    pub phase: Phase,
    /// Steps finished so far, out of `total`.
    pub step: u32,
    pub total: u32,
    /// Jobs ahead of this one while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
}

/// One line of a prover's `application/x-ndjson` answer to a generate
/// request: progress while it runs, then exactly one result or error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamItem {
    Progress(ProgressEvent),
    Result(Box<GenerateResponse>),
    /// The job failed after it was accepted (`code`, `message`).
    Error {
        code: String,
        message: String,
    },
}

/// A verifier asks for some leaves of a committed trace
/// ([`crate::merkle::TraceLeaf`]: latents and model outputs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditChallenge {
    pub version: u32,
    pub job_id: JobId,
    /// Leaf indices to open, ascending.
    pub leaves: Vec<u32>,
}

impl AuditChallenge {
    /// `trace_len` is the number of leaves of the committed trace.
    pub fn validate(&self, trace_len: u32) -> Result<(), RequestError> {
        if self.version != PROTOCOL_VERSION {
            return Err(RequestError::Version { got: self.version });
        }
        let max_leaf = trace_len.saturating_sub(1);
        let ok = !self.leaves.is_empty()
            && self.leaves.len() <= MAX_AUDIT_LEAVES
            && self.leaves.windows(2).all(|w| w[0] < w[1])
            && self.leaves.last().is_some_and(|&s| s < trace_len);
        if ok {
            Ok(())
        } else {
            Err(RequestError::AuditLeaves { max_leaf })
        }
    }
}

/// One opened leaf: its values as committed (f32 LE) and its Merkle path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeafOpening {
    pub leaf: u32,
    /// Tensor shape, e.g. [batch, channels, frames, height, width].
    pub shape: Vec<u32>,
    pub values_f32: Base64Bytes,
    pub proof: MerkleProof,
}

impl LeafOpening {
    /// The opened values (the length was checked by [`AuditAnswer::validate`]).
    pub fn values(&self) -> Option<Vec<f32>> {
        crate::merkle::f32_from_le_bytes(&self.values_f32.0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAnswer {
    pub version: u32,
    pub job_id: JobId,
    pub openings: Vec<LeafOpening>,
}

/// Largest tensor one opening may carry (elements); bounds verifier memory.
pub const MAX_LATENT_ELEMENTS: u64 = 64 * 1024 * 1024;

impl AuditAnswer {
    /// Structural checks against the challenge and the committed root; the
    /// numeric checks (noise, recomputed step) are the verifier's.
    pub fn validate(
        &self,
        challenge: &AuditChallenge,
        trace_root: &Digest32,
    ) -> Result<(), RequestError> {
        if self.version != PROTOCOL_VERSION {
            return Err(RequestError::Version { got: self.version });
        }
        let answered: Vec<u32> = self.openings.iter().map(|o| o.leaf).collect();
        if challenge.leaves != answered {
            return Err(RequestError::Opening {
                leaf: answered.first().copied().unwrap_or(0),
                why: "leaves differ from the challenge",
            });
        }
        for o in &self.openings {
            let elements = o
                .shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)));
            match elements {
                Some(n)
                    if n > 0
                        && n <= MAX_LATENT_ELEMENTS
                        && n * 4 == o.values_f32.0.len() as u64 => {}
                _ => {
                    return Err(RequestError::Opening {
                        leaf: o.leaf,
                        why: "values do not match their shape",
                    })
                }
            }
            if o.proof.index != o.leaf {
                return Err(RequestError::Opening {
                    leaf: o.leaf,
                    why: "proof is for another leaf",
                });
            }
            if !o
                .proof
                .verify(trace_root, &Digest32::sha256(&o.values_f32.0))
            {
                return Err(RequestError::Opening {
                    leaf: o.leaf,
                    why: "Merkle path does not match the committed root",
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;
    use crate::merkle::{f32_le_bytes, MerkleTree};
    use proptest::prelude::*;

    fn request() -> GenerateRequest {
        let m = sample();
        let mut r = GenerateRequest::with_defaults(&m, "a fox", Seed(5));
        r.job_id = JobId([1; 16]);
        r
    }

    #[test]
    fn defaults_validate_and_errors_are_specific() {
        let m = sample();
        let id = m.id();
        assert_eq!(request().validate(&m, &id), Ok(()));
        let check = |f: &dyn Fn(&mut GenerateRequest)| {
            let mut r = request();
            f(&mut r);
            r.validate(&m, &id).unwrap_err()
        };
        assert_eq!(
            check(&|r| r.prompt = "  ".into()),
            RequestError::EmptyPrompt
        );
        assert!(matches!(
            check(&|r| r.prompt = "x".repeat(1001)),
            RequestError::TooLong {
                field: "prompt",
                ..
            }
        ));
        assert!(matches!(
            check(&|r| r.negative_prompt = "x".repeat(1001)),
            RequestError::TooLong {
                field: "negative_prompt",
                ..
            }
        ));
        assert_eq!(
            check(&|r| r.frames = 0),
            RequestError::Frames { got: 0, max: 16 }
        );
        assert_eq!(
            check(&|r| r.steps = 51),
            RequestError::Steps { got: 51, max: 50 }
        );
        assert!(matches!(
            check(&|r| r.size = Size {
                width: 4096,
                height: 4096
            }),
            RequestError::Size { .. }
        ));
        assert_eq!(
            check(&|r| r.guidance_scale = f64::NAN),
            RequestError::Guidance
        );
        assert_eq!(check(&|r| r.version = 1), RequestError::Version { got: 1 });
        assert!(matches!(
            check(&|r| r.manifest_id = ManifestId(Digest32([9; 32]))),
            RequestError::UnknownManifest { .. }
        ));
    }

    #[test]
    fn unknown_fields_and_bad_ids_are_rejected() {
        let mut v = serde_json::to_value(request()).unwrap();
        v["surprise"] = 1.into();
        assert!(serde_json::from_value::<GenerateRequest>(v).is_err());
        let mut v = serde_json::to_value(request()).unwrap();
        v["job_id"] = "nothex".into();
        assert!(serde_json::from_value::<GenerateRequest>(v).is_err());
    }

    fn trace(n: usize) -> (Vec<Vec<f32>>, MerkleTree) {
        let latents: Vec<Vec<f32>> = (0..n).map(|i| vec![i as f32; 12]).collect();
        let digests: Vec<Digest32> = latents
            .iter()
            .map(|l| crate::merkle::values_digest(l))
            .collect();
        (latents, MerkleTree::new(&digests).unwrap())
    }

    fn answer(latents: &[Vec<f32>], tree: &MerkleTree, leaves: &[u32]) -> AuditAnswer {
        AuditAnswer {
            version: PROTOCOL_VERSION,
            job_id: JobId([1; 16]),
            openings: leaves
                .iter()
                .map(|&s| LeafOpening {
                    leaf: s,
                    shape: vec![1, 3, 1, 2, 2],
                    values_f32: Base64Bytes(f32_le_bytes(&latents[s as usize])),
                    proof: tree.proof(s).unwrap(),
                })
                .collect(),
        }
    }

    #[test]
    fn audit_answers_are_checked_against_the_root() {
        let (latents, tree) = trace(11);
        let ch = AuditChallenge {
            version: PROTOCOL_VERSION,
            job_id: JobId([1; 16]),
            leaves: vec![3, 4],
        };
        ch.validate(11).unwrap();
        let good = answer(&latents, &tree, &[3, 4]);
        good.validate(&ch, &tree.root()).unwrap();
        // Fabricated latent: root mismatch.
        let mut bad = good.clone();
        bad.openings[1].values_f32.0[0] ^= 1;
        assert!(matches!(
            bad.validate(&ch, &tree.root()),
            Err(RequestError::Opening { leaf: 4, .. })
        ));
        // Answering other steps than asked.
        let other = answer(&latents, &tree, &[3, 5]);
        assert!(other.validate(&ch, &tree.root()).is_err());
        // Shape lies about the size.
        let mut bad = good.clone();
        bad.openings[0].shape = vec![1, 3, 1, 2, 3];
        assert!(bad.validate(&ch, &tree.root()).is_err());
        // Challenges out of range, duplicated, unordered, empty or too many.
        for leaves in [vec![11], vec![3, 3], vec![4, 3], vec![], (0..33).collect()] {
            let ch = AuditChallenge {
                version: PROTOCOL_VERSION,
                job_id: JobId([1; 16]),
                leaves,
            };
            assert!(ch.validate(11).is_err());
        }
    }

    fn arb_request() -> impl Strategy<Value = GenerateRequest> {
        (
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            ".{0,40}",
            ".{0,20}",
            any::<u64>(),
            (0u32..5000, 0u32..5000),
            0u32..40,
            0u32..80,
            prop_oneof![Just(f64::NAN), Just(f64::INFINITY), -5.0f64..60.0],
            prop_oneof![
                Just(OutputFormat::Mp4),
                Just(OutputFormat::Gif),
                Just(OutputFormat::Latents)
            ],
        )
            .prop_map(
                |(job, man, prompt, neg, seed, (w, h), frames, steps, g, output)| GenerateRequest {
                    version: PROTOCOL_VERSION,
                    job_id: JobId(job),
                    manifest_id: ManifestId(Digest32(man)),
                    prompt,
                    negative_prompt: neg,
                    seed: Seed(seed),
                    size: Size {
                        width: w,
                        height: h,
                    },
                    frames,
                    steps,
                    guidance_scale: g,
                    output,
                    start_within_ms: None,
                },
            )
    }

    proptest! {
        #[test]
        fn request_json_round_trips(r in arb_request()) {
            prop_assume!(r.guidance_scale.is_finite());
            let json = serde_json::to_vec(&r).unwrap();
            let back: GenerateRequest = serde_json::from_slice(&json).unwrap();
            prop_assert_eq!(back, r);
        }

        #[test]
        fn validation_accepts_exactly_the_valid_requests(mut r in arb_request(), use_manifest in any::<bool>()) {
            let m = sample();
            let id = m.id();
            if use_manifest { r.manifest_id = id; }
            let expected_ok = r.manifest_id == id
                && !r.prompt.trim().is_empty()
                && r.prompt.len() <= 1000
                && (1..=16).contains(&r.frames)
                && (1..=50).contains(&r.steps)
                && m.limits.sizes.contains(&r.size)
                && r.guidance_scale.is_finite() && (0.0..=50.0).contains(&r.guidance_scale);
            prop_assert_eq!(r.validate(&m, &id).is_ok(), expected_ok);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<GenerateRequest>(&bytes);
            let _ = serde_json::from_slice::<AuditAnswer>(&bytes);
            let _ = serde_json::from_slice::<AuditChallenge>(&bytes);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = ModelManifest::parse(text);
            }
        }

        #[test]
        fn audit_round_trips_and_validates(n in 1usize..20, pick in any::<prop::sample::Index>()) {
            let (latents, tree) = trace(n);
            let s = pick.index(n) as u32;
            let ch = AuditChallenge { version: PROTOCOL_VERSION, job_id: JobId([1; 16]), leaves: vec![s] };
            prop_assert!(ch.validate(n as u32).is_ok());
            let a = answer(&latents, &tree, &[s]);
            let back: AuditAnswer = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
            prop_assert!(back.validate(&ch, &tree.root()).is_ok());
        }
    }
}
