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
    pub verification: Verification,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// diffusers `TextToVideoSDPipeline` (ModelScope text-to-video, Zeroscope).
    TextToVideoSd,
    /// diffusers `WanPipeline` (Wan 2.1 text-to-video and its family).
    Wan(WanSpec),
}

impl Architecture {
    /// The architecture's name as manifests spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::TextToVideoSd => "text-to-video-sd",
            Architecture::Wan(_) => "wan",
        }
    }
}

/// What a Wan pipeline is run with beyond its folder's configs, and the
/// shape constraints requests must meet (checked against the folder's
/// configs when it loads, so the manifest can refuse bad requests without
/// the model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanSpec {
    /// Tokens every prompt is padded or truncated to (diffusers'
    /// `max_sequence_length`, 512 for the released models).
    pub text_length: u32,
    /// The transformer's `patch_size`: frames, height, width.
    pub patch_size: [u32; 3],
    /// The VAE's temporal downscale (frames are `1 + scale·k`).
    pub vae_scale_temporal: u32,
    /// The VAE's spatial downscale.
    pub vae_scale_spatial: u32,
}

impl WanSpec {
    /// Why `frames` of `size` cannot be generated, if they cannot: frames
    /// are `1 + t·k` for the VAE's temporal scale `t`, with a latent frame
    /// count the temporal patch divides; sides are multiples of the VAE's
    /// spatial scale times the patch.
    pub fn check_shape(&self, frames: u32, size: Size) -> Result<(), String> {
        let t = self.vae_scale_temporal;
        let latent_frames = frames.saturating_sub(1) / t + 1;
        if frames == 0
            || !(frames - 1).is_multiple_of(t)
            || !latent_frames.is_multiple_of(self.patch_size[0])
        {
            return Err(format!(
                "{frames} frames: this model makes 1 + {t}k frames (1, {}, {}, ...)",
                1 + t,
                1 + 2 * t
            ));
        }
        let (sh, sw) = (
            self.vae_scale_spatial * self.patch_size[1],
            self.vae_scale_spatial * self.patch_size[2],
        );
        if !size.height.is_multiple_of(sh) || !size.width.is_multiple_of(sw) {
            return Err(format!(
                "size {size}: width must be a multiple of {sw} and height of {sh}"
            ));
        }
        Ok(())
    }
}

/// What the model's networks compute in (the scheduler, its latents and
/// the trace stay f32 whatever the dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for DType {
    type Err = String;

    /// A dtype as manifests spell it (`f32`, `f16`, `bf16`).
    fn from_str(s: &str) -> Result<Self, String> {
        [DType::F32, DType::F16, DType::Bf16]
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown dtype {s:?} (f32, f16, bf16)"))
    }
}

impl DType {
    /// The dtype as manifests spell it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// The smallest `verification.output_rel_l2` a manifest of this dtype
    /// may set. Honest provers compute a half-precision network with their
    /// own hardware's roundings, so a verifier's recomputation differs from
    /// theirs by the dtype's precision, not f32's: two implementations (this
    /// engine and diffusers, both in the dtype, same inputs) differ on one
    /// step's model output by a relative L2 of up to 2.7e-3 in f16 and
    /// 2.1e-2 in bf16 (`crates/fractal-engine/tests/parity_half.rs`). The
    /// floors are about four and three times those.
    pub fn min_output_rel_l2(self) -> f64 {
        match self {
            DType::F32 => 0.0,
            DType::F16 => 1e-2,
            DType::Bf16 => 6e-2,
        }
    }
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

/// The schedulers a manifest can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Ddim,
    /// DPM-Solver++ (multistep, second order), diffusers `DPMSolverMultistepScheduler`.
    DpmSolverMultistep,
    /// diffusers `FlowMatchEulerDiscreteScheduler` (static shift).
    FlowMatchEuler,
    /// diffusers `UniPCMultistepScheduler` on flow sigmas, as Wan folders
    /// configure it (second order, bh2, data prediction).
    #[serde(rename = "unipc_multistep")]
    UniPcMultistep,
}

impl SchedulerKind {
    /// Whether the kind runs on a DDPM beta schedule (else on flow sigmas).
    pub fn is_ddpm(self) -> bool {
        matches!(
            self,
            SchedulerKind::Ddim | SchedulerKind::DpmSolverMultistep
        )
    }

    /// The earlier steps whose latents and model outputs an audit of step
    /// `index` opens: the history the scheduler's update there depends on
    /// (none for single-step schedulers, the previous data prediction for
    /// DPM-Solver++ 2M, the previous two for UniPC's predictor-corrector).
    pub fn audit_history(self, index: u32) -> u32 {
        match self {
            SchedulerKind::Ddim | SchedulerKind::FlowMatchEuler => 0,
            SchedulerKind::DpmSolverMultistep => index.min(1),
            SchedulerKind::UniPcMultistep => index.min(2),
        }
    }

    /// Leaves one audited step opens at most: its latent, output and next
    /// latent, and the history's latents and outputs.
    pub fn max_leaves_per_pair(self) -> u32 {
        3 + 2 * self.audit_history(u32::MAX)
    }
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

/// The scheduler and its configuration, mirroring diffusers' config keys;
/// each kind names only what it uses. Written as one table with `kind`
/// first, so manifests from before the flow schedulers keep their ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SchedulerSpec {
    Ddim(DdpmSchedule),
    DpmSolverMultistep(DdpmSchedule),
    FlowMatchEuler(FlowSchedule),
    #[serde(rename = "unipc_multistep")]
    UniPcMultistep(FlowSchedule),
}

/// A DDPM beta schedule (DDIM, DPM-Solver++).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdpmSchedule {
    pub num_train_timesteps: u32,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    /// DDIM only (DPM-Solver++ does not clip or use a final alpha).
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: u32,
    pub timestep_spacing: TimestepSpacing,
}

/// Flow-matching sigmas `1 → 0` shifted by `shift·σ / (1 + (shift − 1)·σ)`
/// (diffusers' `shift`, UniPC's `flow_shift`); the model predicts velocity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSchedule {
    pub num_train_timesteps: u32,
    pub shift: f64,
}

impl SchedulerSpec {
    pub fn kind(&self) -> SchedulerKind {
        match self {
            SchedulerSpec::Ddim(_) => SchedulerKind::Ddim,
            SchedulerSpec::DpmSolverMultistep(_) => SchedulerKind::DpmSolverMultistep,
            SchedulerSpec::FlowMatchEuler(_) => SchedulerKind::FlowMatchEuler,
            SchedulerSpec::UniPcMultistep(_) => SchedulerKind::UniPcMultistep,
        }
    }

    pub fn num_train_timesteps(&self) -> u32 {
        match self {
            SchedulerSpec::Ddim(d) | SchedulerSpec::DpmSolverMultistep(d) => d.num_train_timesteps,
            SchedulerSpec::FlowMatchEuler(f) | SchedulerSpec::UniPcMultistep(f) => {
                f.num_train_timesteps
            }
        }
    }

    /// This schedule run by another scheduler of the same family (DDPM
    /// betas or flow sigmas), or why it cannot be.
    pub fn with_kind(self, kind: SchedulerKind) -> Result<Self, String> {
        let from = self.kind();
        match (self, kind) {
            (SchedulerSpec::Ddim(d) | SchedulerSpec::DpmSolverMultistep(d), k) if k.is_ddpm() => {
                Ok(match k {
                    SchedulerKind::Ddim => SchedulerSpec::Ddim(d),
                    _ => SchedulerSpec::DpmSolverMultistep(d),
                })
            }
            (SchedulerSpec::FlowMatchEuler(f) | SchedulerSpec::UniPcMultistep(f), k)
                if !k.is_ddpm() =>
            {
                Ok(match k {
                    SchedulerKind::FlowMatchEuler => SchedulerSpec::FlowMatchEuler(f),
                    _ => SchedulerSpec::UniPcMultistep(f),
                })
            }
            _ => Err(format!(
                "{from:?} runs on {}, {kind:?} cannot take its place",
                if from.is_ddpm() {
                    "a DDPM beta schedule"
                } else {
                    "flow sigmas"
                }
            )),
        }
    }
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

/// How verifiers check this model's jobs (DESIGN.md section 4, trace
/// format v2 in `merkle`): the tolerances an honest recomputation stays
/// within, and the audit plan. Fields other than `frame_psnr_db` may be
/// omitted and take the defaults below; trace v1's `step_rel_l2` is refused
/// by name (its whole-latent check let late-step cheats through).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// Maximum relative L2 distance of a recomputed model output (the guided
    /// noise prediction of one step) from the committed one, relative to
    /// the recomputation. Every step's output is O(1) whatever the step, so
    /// one tolerance is equally sensitive at the first step and the last.
    #[serde(default = "Verification::default_output_rel_l2")]
    pub output_rel_l2: f64,
    /// Maximum relative L2 distance of the scheduler's update
    /// `x_{k+1} - x_k`, recomputed from the committed `x_k` and model
    /// output, from the committed update (relative to the recomputed update,
    /// so small late-step updates are checked as closely as large ones).
    #[serde(default = "Verification::default_update_rel_l2")]
    pub update_rel_l2: f64,
    /// Minimum PSNR (dB) of a re-decoded frame against the returned video.
    pub frame_psnr_db: f64,
    /// Step pairs recomputed per audit, drawn uniformly without replacement
    /// from the whole schedule by the verifier after the commitment.
    #[serde(default = "Verification::default_pairs_per_audit")]
    pub pairs_per_audit: u32,
    /// Audits each prover gets per epoch (audited app jobs count; the
    /// verifier tops up with challenges). With `pairs_per_audit` this sets
    /// the per-epoch detection of a cheat that fakes a fraction `f` of the
    /// steps: `1 - (1 - f)^(pairs_per_audit * audits_per_epoch)`.
    #[serde(default = "Verification::default_audits_per_epoch")]
    pub audits_per_epoch: u32,
}

impl Verification {
    /// The default plan and tolerances, with a model's frame PSNR bound
    /// (the one field without a default).
    pub fn with_defaults(frame_psnr_db: f64) -> Self {
        Verification {
            output_rel_l2: Self::default_output_rel_l2(),
            update_rel_l2: Self::default_update_rel_l2(),
            frame_psnr_db,
            pairs_per_audit: Self::default_pairs_per_audit(),
            audits_per_epoch: Self::default_audits_per_epoch(),
        }
    }

    /// Measured honest worst case on CPU builds is far below this (see
    /// `fractal bench verify`); cheaper weights or activations are above it.
    pub const fn default_output_rel_l2() -> f64 {
        1e-4
    }
    pub const fn default_update_rel_l2() -> f64 {
        1e-4
    }
    pub const fn default_pairs_per_audit() -> u32 {
        2
    }
    /// With 2 pairs per audit, 45 audits catch a cheat on 4 of 50 steps
    /// (or 1 of 10) with probability above 99.9% per epoch: 33 would be the
    /// bare minimum for 5 of 50, the rest is margin for per-audit rates
    /// measured below the plan's arithmetic.
    pub const fn default_audits_per_epoch() -> u32 {
        45
    }

    /// Probability that one epoch's audits miss a cheat on a fraction
    /// `faked` of a job's `steps` steps (each audit draws its pairs without
    /// replacement).
    pub fn epoch_miss_probability(&self, faked: f64, steps: u32) -> f64 {
        let n = steps.max(1) as f64;
        let bad = (faked.clamp(0.0, 1.0) * n).round();
        let pairs = (self.pairs_per_audit as f64).min(n);
        let mut miss = 1.0;
        for i in 0..pairs as u32 {
            miss *= ((n - bad - i as f64) / (n - i as f64)).max(0.0);
        }
        miss.powi(self.audits_per_epoch as i32)
    }
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

/// Trace v1's tolerance: a whole-latent relative L2 of each recomputed step.
const LEGACY_STEP_TOLERANCE: &str = "step_rel_l2";

impl ModelManifest {
    /// Parses JSON (text starting with `{`) or TOML, then validates.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let json = text.trim_start().starts_with('{');
        let parsed: Result<ModelManifest, String> = if json {
            serde_json::from_str(text).map_err(|e| e.to_string())
        } else {
            toml::from_str(text).map_err(|e| e.to_string())
        };
        let m = parsed.map_err(|e| {
            if has_legacy_step_tolerance(text, json) {
                invalid(format!(
                    "verification.{LEGACY_STEP_TOLERANCE} is the trace-v1 check (f16 latents compared whole), \
                     which let provers skip late steps; this build checks every step's model output and update: \
                     replace it with verification.output_rel_l2 and verification.update_rel_l2 \
                     (or drop it for the defaults, {:e} and {:e})",
                    Verification::default_output_rel_l2(),
                    Verification::default_update_rel_l2()
                ))
            } else {
                ManifestError::Parse(e)
            }
        })?;
        m.validate()?;
        Ok(m)
    }

    /// The smallest frame count of at least `n` this model can make (Wan
    /// makes `1 + t·k`; others any count).
    pub fn frames_at_least(&self, n: u32) -> u32 {
        match &self.architecture {
            Architecture::TextToVideoSd => n.max(1),
            Architecture::Wan(w) => {
                let step = w.vae_scale_temporal * w.patch_size[0];
                let k = n.saturating_sub(1).div_ceil(step);
                1 + k * step
            }
        }
    }

    /// The canonical encoding that the id hashes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest types always serialise")
    }

    pub fn id(&self) -> ManifestId {
        ManifestId(Digest32::sha256(&self.canonical_bytes()))
    }

    /// This manifest computing in `dtype`, its model-output tolerance raised
    /// to that dtype's floor ([`DType::min_output_rel_l2`]) where below it.
    pub fn in_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        let floor = dtype.min_output_rel_l2();
        if self.verification.output_rel_l2 < floor {
            self.verification.output_rel_l2 = floor;
        }
        self
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
        let train_steps = self.scheduler.num_train_timesteps();
        if train_steps == 0 || train_steps > 100_000 {
            return Err(invalid("scheduler.num_train_timesteps must be 1..=100000"));
        }
        match &self.scheduler {
            SchedulerSpec::Ddim(s) | SchedulerSpec::DpmSolverMultistep(s) => {
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
            }
            SchedulerSpec::FlowMatchEuler(f) | SchedulerSpec::UniPcMultistep(f) => {
                if !(f.shift.is_finite() && f.shift > 0.0 && f.shift <= 100.0) {
                    return Err(invalid("scheduler.shift must be in (0, 100]"));
                }
            }
        }
        // Which scheduler families each architecture's denoiser is trained for.
        let fits = match self.architecture {
            Architecture::TextToVideoSd => self.scheduler.kind().is_ddpm(),
            Architecture::Wan(_) => !self.scheduler.kind().is_ddpm(),
        };
        if !fits {
            return Err(invalid(format!(
                "architecture {} does not run scheduler {:?}",
                self.architecture.name(),
                self.scheduler.kind()
            )));
        }
        if let Architecture::Wan(w) = &self.architecture {
            if !(1..=4096).contains(&w.text_length) {
                return Err(invalid("architecture.wan.text_length must be 1..=4096"));
            }
            if w.patch_size.iter().any(|&p| !(1..=16).contains(&p))
                || !(1..=16).contains(&w.vae_scale_temporal)
                || !(1..=64).contains(&w.vae_scale_spatial)
            {
                return Err(invalid(
                    "architecture.wan: patch_size entries must be 1..=16, vae scales 1..=16 (temporal) and 1..=64 (spatial)",
                ));
            }
        }
        let l = &self.limits;
        if l.sizes.is_empty() {
            return Err(invalid("limits.sizes is empty"));
        }
        for size in &l.sizes {
            let dim_ok = |d: u32| (8..=4096).contains(&d) && d.is_multiple_of(8);
            if !dim_ok(size.width) || !dim_ok(size.height) {
                return Err(invalid(format!(
                    "size {size}: dimensions must be multiples of 8 in 8..=4096"
                )));
            }
        }
        if l.max_frames == 0 || l.max_frames > 1024 {
            return Err(invalid("limits.max_frames must be 1..=1024"));
        }
        if l.max_steps == 0 || l.max_steps > train_steps {
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
        if let Architecture::Wan(w) = &self.architecture {
            for size in &l.sizes {
                w.check_shape(d.frames, *size)
                    .map_err(|e| invalid(format!("limits.sizes and defaults.frames: {e}")))?;
            }
        }
        if !(d.guidance_scale.is_finite() && (0.0..=50.0).contains(&d.guidance_scale)) {
            return Err(invalid("defaults.guidance_scale must be within 0..=50"));
        }
        if d.fps == 0 || d.fps > 120 {
            return Err(invalid("defaults.fps must be 1..=120"));
        }
        let t = &self.verification;
        for (name, v) in [
            ("output_rel_l2", t.output_rel_l2),
            ("update_rel_l2", t.update_rel_l2),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 1.0) {
                return Err(invalid(format!("verification.{name} must be in (0, 1)")));
            }
        }
        let floor = self.dtype.min_output_rel_l2();
        if t.output_rel_l2 < floor {
            return Err(invalid(format!(
                "verification.output_rel_l2 {:e} is below {floor:e}, the least a {} model may \
                 set: honest provers' {} roundings differ by more than that",
                t.output_rel_l2,
                self.dtype.name(),
                self.dtype.name()
            )));
        }
        let max_pairs = max_pairs_per_audit(self.scheduler.kind());
        if !(1..=max_pairs).contains(&t.pairs_per_audit) {
            return Err(invalid(format!(
                "verification.pairs_per_audit must be 1..={max_pairs} for {:?}",
                self.scheduler.kind()
            )));
        }
        if !(1..=10_000).contains(&t.audits_per_epoch) {
            return Err(invalid("verification.audits_per_epoch must be 1..=10000"));
        }
        if !(t.frame_psnr_db.is_finite() && t.frame_psnr_db > 0.0) {
            return Err(invalid("verification.frame_psnr_db must be positive"));
        }
        Ok(())
    }
}

/// The most step pairs one audit of `kind` may draw: their leaves and the
/// trace's two ends stay within the wire's `MAX_AUDIT_LEAVES` (6 for
/// DPM-Solver++'s five leaves a pair, 4 for UniPC's seven).
pub fn max_pairs_per_audit(kind: SchedulerKind) -> u32 {
    ((crate::wire::MAX_AUDIT_LEAVES as u32 - 2) / kind.max_leaves_per_pair()).min(6)
}

fn has_legacy_step_tolerance(text: &str, json: bool) -> bool {
    if json {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("verification")?.get(LEGACY_STEP_TOLERANCE).cloned())
            .is_some()
    } else {
        toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|v| v.get("verification")?.get(LEGACY_STEP_TOLERANCE).cloned())
            .is_some()
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
            "9767717f603daa8d1d5d412f6516b486779fc945d4e97b5fde28efe70f60ff95"
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
        let SchedulerSpec::Ddim(d) = &mut n.scheduler else {
            panic!("the sample is DDIM")
        };
        d.beta_end = 0.0120001;
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
                "dtype = \"bf16\"",
                "below 6e-2, the least a bf16 model may set",
            ),
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

    #[test]
    fn a_half_precision_manifest_gets_its_dtypes_tolerance_floor() {
        let m = sample().in_dtype(DType::F16);
        assert_eq!(m.dtype, DType::F16);
        assert_eq!(m.verification.output_rel_l2, 1e-2);
        m.validate().unwrap();
        assert_ne!(m.id(), sample().id());
        // A looser tolerance than the floor is kept; f32 has none.
        let mut loose = sample();
        loose.verification.output_rel_l2 = 0.2;
        assert_eq!(
            loose
                .clone()
                .in_dtype(DType::Bf16)
                .verification
                .output_rel_l2,
            0.2
        );
        assert_eq!(sample().in_dtype(DType::F32), sample());
    }

    #[test]
    fn verification_fields_default_and_the_v1_tolerance_is_refused_by_name() {
        let m = sample();
        let bare = SAMPLE_TOML
            .lines()
            .filter(|l| !l.starts_with("output_rel_l2") && !l.starts_with("update_rel_l2"))
            .filter(|l| !l.starts_with("pairs_per_audit") && !l.starts_with("audits_per_epoch"))
            .collect::<Vec<_>>()
            .join("\n");
        let d = ModelManifest::parse(&bare).unwrap().verification;
        assert_eq!(d.output_rel_l2, Verification::default_output_rel_l2());
        assert_eq!(d.pairs_per_audit, Verification::default_pairs_per_audit());
        assert_eq!(d.audits_per_epoch, Verification::default_audits_per_epoch());
        let old = bare.replace("[verification]", "[verification]\nstep_rel_l2 = 0.001");
        let err = ModelManifest::parse(&old).unwrap_err().to_string();
        assert!(err.contains("verification.step_rel_l2"), "{err}");
        let mut json: serde_json::Value = serde_json::to_value(&m).unwrap();
        json["verification"]["step_rel_l2"] = 0.001.into();
        let err = ModelManifest::parse(&json.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("verification.step_rel_l2"), "{err}");
        // Another unknown field is still a plain parse error.
        let other = bare.replace("[verification]", "[verification]\nsurprise = 1");
        assert!(matches!(
            ModelManifest::parse(&other),
            Err(ManifestError::Parse(_))
        ));
        let zero = SAMPLE_TOML.replacen("pairs_per_audit = 2", "pairs_per_audit = 0", 1);
        assert!(ModelManifest::parse(&zero)
            .unwrap_err()
            .to_string()
            .contains("pairs_per_audit"));
    }

    #[test]
    fn audits_of_multistep_schedulers_open_their_history_within_the_wire_bound() {
        use SchedulerKind::*;
        assert_eq!(UniPcMultistep.audit_history(0), 0);
        assert_eq!(UniPcMultistep.audit_history(1), 1);
        assert_eq!(UniPcMultistep.audit_history(9), 2);
        assert_eq!(DpmSolverMultistep.audit_history(9), 1);
        assert_eq!(FlowMatchEuler.audit_history(9), 0);
        for (kind, pairs) in [
            (Ddim, 6),
            (DpmSolverMultistep, 6),
            (FlowMatchEuler, 6),
            (UniPcMultistep, 4),
        ] {
            assert_eq!(max_pairs_per_audit(kind), pairs, "{kind:?}");
            assert!(pairs * kind.max_leaves_per_pair() + 2 <= crate::wire::MAX_AUDIT_LEAVES as u32);
        }
        let wan = SAMPLE_TOML
            .replace("architecture = \"text-to-video-sd\"", "architecture = { wan = { text_length = 16, patch_size = [1, 2, 2], vae_scale_temporal = 4, vae_scale_spatial = 8 } }")
            .replace("kind = \"ddim\"\nnum_train_timesteps = 1000\nbeta_start = 0.00085\nbeta_end = 0.012\nbeta_schedule = \"scaled_linear\"\nprediction_type = \"epsilon\"\nclip_sample = false\nset_alpha_to_one = false\nsteps_offset = 1\ntimestep_spacing = \"leading\"", "kind = \"unipc_multistep\"\nnum_train_timesteps = 1000\nshift = 3.0")
            .replace("frames = 8", "frames = 9");
        let m = ModelManifest::parse(&wan).unwrap();
        assert_eq!(m.scheduler.kind(), UniPcMultistep);
        let e = ModelManifest::parse(&wan.replace("pairs_per_audit = 2", "pairs_per_audit = 5"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pairs_per_audit must be 1..=4"), "{e}");
        // A UNet's manifest cannot name a flow scheduler, nor Wan's a DDPM one.
        let e = ModelManifest::parse(&SAMPLE_TOML.replace("kind = \"ddim\"\nnum_train_timesteps = 1000\nbeta_start = 0.00085\nbeta_end = 0.012\nbeta_schedule = \"scaled_linear\"\nprediction_type = \"epsilon\"\nclip_sample = false\nset_alpha_to_one = false\nsteps_offset = 1\ntimestep_spacing = \"leading\"", "kind = \"flow_match_euler\"\nnum_train_timesteps = 1000\nshift = 3.0")).unwrap_err().to_string();
        assert!(e.contains("does not run scheduler"), "{e}");
        // Fields of another scheduler kind are refused, not ignored.
        let e = ModelManifest::parse(&wan.replace("shift = 3.0", "shift = 3.0\nbeta_start = 0.1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_start"), "{e}");
    }

    #[test]
    fn epoch_miss_probability_follows_the_plan() {
        let v = sample().verification;
        // 45 audits of 2 pairs: a cheat on 4 of 50 steps is missed < 0.1%,
        // one on 3 of 50 more often.
        let miss = v.epoch_miss_probability(0.08, 50);
        assert!(miss < 1e-3 && miss > 1e-5, "{miss}");
        assert!(v.epoch_miss_probability(0.06, 50) > 1e-3);
        assert_eq!(v.epoch_miss_probability(1.0, 50), 0.0);
        assert_eq!(v.epoch_miss_probability(0.0, 50), 1.0);
    }
}
