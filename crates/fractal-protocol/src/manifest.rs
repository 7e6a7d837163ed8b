//! The model manifest: the one model the whole grid runs.
//!
//! A manifest is content-addressed: its [`ManifestId`] is the SHA-256 of its
//! canonical encoding, which is the compact JSON that serde writes for these
//! types (fields in declaration order, maps sorted, floats in shortest
//! round-trip form). The id therefore does not depend on how the source file
//! was formatted, and any change of meaning changes the id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Digest32, ManifestId};

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub manifest_version: u32,
    pub name: String,
    pub architecture: Architecture,
    pub dtype: DType,
    pub weights: Weights,
    pub scheduler: SchedulerSpec,
    pub defaults: GenerationDefaults,
    pub limits: Limits,
    pub verification: Tolerances,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// diffusers `TextToVideoSDPipeline` (ModelScope text-to-video, Zeroscope).
    TextToVideoSd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

/// Where the weights come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Weights {
    /// A diffusers folder: path relative to the folder → SHA-256 of the file.
    Files(BTreeMap<String, Digest32>),
    /// A model built into the engine, weights derived from a fixed seed.
    Builtin(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Ddim,
    /// DPM-Solver++ (multistep, second order), diffusers `DPMSolverMultistepScheduler`.
    DpmSolverMultistep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The scheduler and its configuration, mirroring diffusers' config keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSpec {
    pub kind: SchedulerKind,
    pub num_train_timesteps: u32,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: u32,
    pub timestep_spacing: TimestepSpacing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    pub size: Size,
    pub frames: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub fps: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The resolutions this model serves; requests must name one of them.
    pub sizes: Vec<Size>,
    pub max_frames: u32,
    pub max_steps: u32,
    /// UTF-8 bytes; also bounds the negative prompt.
    pub max_prompt_bytes: u32,
}

/// How closely an honest recomputation must match, per DESIGN.md section 4.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerances {
    /// Maximum relative L2 distance of one recomputed scheduler step.
    pub step_rel_l2: f64,
    /// Minimum PSNR (dB) of a re-decoded frame against the returned video.
    pub frame_psnr_db: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot parse manifest: {0}")]
    Parse(String),
    #[error("unsupported manifest_version {0} (this build reads {MANIFEST_VERSION})")]
    Version(u32),
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ManifestError {
    ManifestError::Invalid(msg.into())
}

impl ModelManifest {
    /// Parses JSON (text starting with `{`) or TOML, then validates.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let m: ModelManifest = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| ManifestError::Parse(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| ManifestError::Parse(e.to_string()))?
        };
        m.validate()?;
        Ok(m)
    }

    /// The canonical encoding that the id hashes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest types always serialise")
    }

    pub fn id(&self) -> ManifestId {
        ManifestId(Digest32::sha256(&self.canonical_bytes()))
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version(self.manifest_version));
        }
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(invalid("name must be 1 to 128 bytes"));
        }
        match &self.weights {
            Weights::Files(files) => {
                if files.is_empty() {
                    return Err(invalid("weights.files lists no files"));
                }
                for path in files.keys() {
                    let bad = path.is_empty()
                        || path.starts_with('/')
                        || path.contains('\\')
                        || path
                            .split('/')
                            .any(|c| c.is_empty() || c == "." || c == "..");
                    if bad {
                        return Err(invalid(format!(
                            "weight path {path:?} must be a plain relative path"
                        )));
                    }
                }
            }
            Weights::Builtin(name) if name.is_empty() => {
                return Err(invalid("weights.builtin is empty"))
            }
            Weights::Builtin(_) => {}
        }
        let s = &self.scheduler;
        if s.num_train_timesteps == 0 || s.num_train_timesteps > 100_000 {
            return Err(invalid("scheduler.num_train_timesteps must be 1..=100000"));
        }
        let betas_ok = s.beta_start.is_finite()
            && s.beta_end.is_finite()
            && 0.0 < s.beta_start
            && s.beta_start <= s.beta_end
            && s.beta_end < 1.0;
        if !betas_ok {
            return Err(invalid(
                "scheduler betas must satisfy 0 < beta_start <= beta_end < 1",
            ));
        }
        let l = &self.limits;
        if l.sizes.is_empty() {
            return Err(invalid("limits.sizes is empty"));
        }
        for size in &l.sizes {
            let dim_ok = |d: u32| (8..=4096).contains(&d) && d % 8 == 0;
            if !dim_ok(size.width) || !dim_ok(size.height) {
                return Err(invalid(format!(
                    "size {size}: dimensions must be multiples of 8 in 8..=4096"
                )));
            }
        }
        if l.max_frames == 0 || l.max_frames > 1024 {
            return Err(invalid("limits.max_frames must be 1..=1024"));
        }
        if l.max_steps == 0 || l.max_steps > s.num_train_timesteps {
            return Err(invalid("limits.max_steps must be 1..=num_train_timesteps"));
        }
        if l.max_prompt_bytes == 0 || l.max_prompt_bytes > 65_536 {
            return Err(invalid("limits.max_prompt_bytes must be 1..=65536"));
        }
        let d = &self.defaults;
        if !l.sizes.contains(&d.size) {
            return Err(invalid("defaults.size is not one of limits.sizes"));
        }
        if d.frames == 0 || d.frames > l.max_frames || d.steps == 0 || d.steps > l.max_steps {
            return Err(invalid("defaults.frames/steps must be within limits"));
        }
        if !(d.guidance_scale.is_finite() && (0.0..=50.0).contains(&d.guidance_scale)) {
            return Err(invalid("defaults.guidance_scale must be within 0..=50"));
        }
        if d.fps == 0 || d.fps > 120 {
            return Err(invalid("defaults.fps must be 1..=120"));
        }
        let t = &self.verification;
        if !(t.step_rel_l2.is_finite() && t.step_rel_l2 > 0.0 && t.step_rel_l2 < 1.0) {
            return Err(invalid("verification.step_rel_l2 must be in (0, 1)"));
        }
        if !(t.frame_psnr_db.is_finite() && t.frame_psnr_db > 0.0) {
            return Err(invalid("verification.frame_psnr_db must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> ModelManifest {
        ModelManifest::parse(SAMPLE_TOML).unwrap()
    }

    /// The example manifest shipped in `examples/`, so docs and tests cannot drift apart.
    pub(crate) const SAMPLE_TOML: &str = include_str!("../../../examples/manifest-tiny.toml");

    #[test]
    fn id_is_stable_and_format_independent() {
        let m = sample();
        // Golden: any change to the canonical encoding or the types fails here.
        assert_eq!(
            m.id().to_string(),
            "7eb9fa428c950d808cdeba655cddfee5f7245230125cdfef28f29eb63dec5b5c"
        );
        let json = String::from_utf8(m.canonical_bytes()).unwrap();
        let pretty = serde_json::to_string_pretty(&m).unwrap();
        assert_eq!(ModelManifest::parse(&json).unwrap().id(), m.id());
        assert_eq!(ModelManifest::parse(&pretty).unwrap().id(), m.id());
    }

    #[test]
    fn any_change_of_meaning_changes_the_id() {
        let m = sample();
        let mut n = m.clone();
        n.defaults.steps = 11;
        assert_ne!(n.id(), m.id());
        let mut n = m.clone();
        n.scheduler.beta_end = 0.0120001;
        assert_ne!(n.id(), m.id());
    }

    #[test]
    fn bad_manifests_are_rejected_with_reasons() {
        let cases = [
            (
                "manifest_version = 1",
                "manifest_version = 2",
                "unsupported manifest_version",
            ),
            ("frames = 8", "frames = 0", "defaults.frames"),
            ("max_steps = 50", "max_steps = 5000", "max_steps"),
            ("beta_end = 0.012", "beta_end = 0.0001", "betas"),
            (
                "width = 64, height = 64 }, {",
                "width = 63, height = 64 }, {",
                "multiples of 8",
            ),
            ("dtype = \"f32\"", "dtype = \"f64\"", "cannot parse"),
            (
                "dtype = \"f32\"",
                "dtype = \"f32\"\nextra = 1",
                "cannot parse",
            ),
            (
                "builtin = \"tiny-v1\"",
                "files = { \"../unet.bin\" = \"00\" }",
                "cannot parse",
            ),
        ];
        for (from, to, want) in cases {
            let text = SAMPLE_TOML.replacen(from, to, 1);
            let err = ModelManifest::parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
        let digest = "0".repeat(64);
        let text = SAMPLE_TOML.replacen(
            "builtin = \"tiny-v1\"",
            &format!("files = {{ \"../unet.bin\" = \"{digest}\" }}"),
            1,
        );
        assert!(ModelManifest::parse(&text)
            .unwrap_err()
            .to_string()
            .contains("plain relative path"));
        let text = SAMPLE_TOML.replacen(
            "builtin = \"tiny-v1\"",
            &format!("files = {{ \"unet/model.safetensors\" = \"{digest}\" }}"),
            1,
        );
        assert!(ModelManifest::parse(&text).is_ok());
    }
}
