//! The Fractal assertion: what the grid knows about how a clip was made.

use fractal_protocol::{Digest32, Hotkey};
use serde::{Deserialize, Serialize};

/// The assertion's label in the C2PA manifest.
pub const LABEL: &str = "io.fractal.generation";

/// What the gateway knows of one generated clip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The gateway's video id (`video_…`).
    pub video_id: String,
    /// The pinned model manifest the prover ran (its content address).
    pub manifest_id: String,
    pub model: String,
    pub seed: u64,
    /// SHA-256 of the prompt's UTF-8 bytes, hex: the prompt itself stays
    /// with the app.
    pub prompt_sha256: String,
    pub negative_prompt_sha256: String,
    pub frames: u32,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    /// The prover (miner) hotkey that generated the clip.
    pub prover: String,
    /// The Merkle root of the prover's denoising trace, hex.
    pub trace_root: String,
    pub audit: Audit,
}

impl Generation {
    pub fn sha256_hex(text: &str) -> String {
        Digest32::sha256(text.as_bytes()).to_string()
    }
}

/// Whether the validator re-derived part of the clip's work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Audit {
    /// Not in the sample the validator audits.
    NotSampled,
    /// Sampled; the audit had not finished when the file was signed.
    Pending,
    Passed,
    /// The check that failed (e.g. `step`, `frames`).
    Failed {
        check: String,
    },
}

/// The validator hotkey vouching for the certificate that signed the
/// manifest: an sr25519 signature over [`binding_message`] of the leaf
/// certificate's public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateBinding {
    /// SS58.
    pub hotkey: String,
    /// SHA-256 of the leaf's SubjectPublicKeyInfo (DER), hex.
    pub public_key_sha256: String,
    /// 64 bytes, hex.
    pub signature: String,
}

/// What the hotkey signs: a domain tag and the certificate's public key.
pub fn binding_message(leaf_spki: &[u8]) -> Vec<u8> {
    let mut m = b"fractal/c2pa-certificate-binding/v1:".to_vec();
    m.extend_from_slice(leaf_spki);
    m
}

impl CertificateBinding {
    pub fn new(hotkey: &Hotkey, leaf_spki: &[u8], signature: [u8; 64]) -> Self {
        CertificateBinding {
            hotkey: hotkey.to_string(),
            public_key_sha256: Digest32::sha256(leaf_spki).to_string(),
            signature: hex::encode(signature),
        }
    }

    /// Whether `hotkey` signed `leaf_spki`; why not otherwise.
    pub fn verify(&self, leaf_spki: &[u8]) -> Result<Hotkey, String> {
        let hotkey = Hotkey::from_ss58(&self.hotkey)
            .map_err(|e| format!("the binding's hotkey {:?}: {e}", self.hotkey))?;
        if Digest32::sha256(leaf_spki).to_string() != self.public_key_sha256 {
            return Err("the binding names another certificate's public key than the one that signed the manifest".into());
        }
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("the binding's signature is not 64 hex-encoded bytes")?;
        if hotkey.verify(&binding_message(leaf_spki), &sig) {
            Ok(hotkey)
        } else {
            Err(format!(
                "{hotkey}'s signature over the certificate's public key does not verify"
            ))
        }
    }
}

/// The assertion as stored: the clip's facts, the validator, the binding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FractalAssertion {
    #[serde(flatten)]
    pub generation: Generation,
    /// The gateway's validator hotkey, SS58.
    pub validator: String,
    pub certificate_binding: CertificateBinding,
}
