//! Step spot-checks (DESIGN.md §4): open a few latents of a committed
//! trace and check them against the pinned model.
//!
//! A challenge always opens step 0 (must equal `noise(seed)` bit for bit),
//! one random step pair `k, k+1` (recomputed with one denoising step, within
//! the manifest's relative-L2 tolerance; DPM-Solver++ also opens `k-1`,
//! whose model output the multistep update needs), and the final latent
//! (one random frame decoded and compared with the returned video by PSNR).
//! Cost: one or two UNet passes with CFG and one frame decode, instead of
//! every step and every frame.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use fractal_engine::video::{decode_mp4, psnr_luma};
use fractal_engine::{pinned, PinnedModel};
use fractal_protocol::manifest::SchedulerKind;
use fractal_protocol::merkle::{latent_f16_bytes, latent_from_f16_bytes};
use fractal_protocol::wire::{
    AuditAnswer, AuditChallenge, GenerateRequest, GenerateResponse, OutputFormat, PROTOCOL_VERSION,
};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which check a job failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The response does not belong to the request (job, manifest, trace length, format).
    Response,
    /// An opening does not match the committed Merkle root.
    Commitment,
    /// Step 0 is not the seeded noise.
    InitialNoise,
    /// A recomputed step is off.
    Step,
    /// The returned video does not match the final latent.
    Frame,
    /// No valid answer in time (timeouts, errors, refusals).
    Unavailable,
    /// The answer came after the deadline.
    Late,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Response => "response",
            Check::Commitment => "commitment",
            Check::InitialNoise => "initial_noise",
            Check::Step => "step",
            Check::Frame => "frame",
            Check::Unavailable => "unavailable",
            Check::Late => "late",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{} check failed: {detail}", check.as_str())]
pub struct Failure {
    pub check: Check,
    pub detail: String,
}

fn fail(check: Check, detail: impl Into<String>) -> Failure {
    Failure {
        check,
        detail: detail.into(),
    }
}

/// What a passed audit measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub steps: Vec<u32>,
    pub step_rel_l2: f64,
    pub frame: u32,
    pub frame_psnr_db: f64,
    /// CPU time the checks took on this verifier.
    pub verify_ms: u64,
}

/// What a full regeneration found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FullReport {
    /// Our trace root equals the prover's (same build and platform).
    pub root_matches: bool,
    pub worst_frame_psnr_db: f64,
    pub verify_ms: u64,
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>, Failure> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| fail(Check::Frame, e.to_string()))
}

pub struct Auditor {
    model: Arc<PinnedModel>,
}

/// `||a - b|| / ||b||` (0 when both are zero).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = *x as f64 - *y as f64;
        num += d * d;
        den += (*y as f64) * (*y as f64);
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

/// The planned openings: step 0, pairs `k, k+1` (and `k-1` for multistep),
/// the last.
#[derive(Clone, Debug)]
pub struct Plan {
    pub challenge: AuditChallenge,
    pub ks: Vec<u32>,
    pub frame: u32,
}

/// Step pairs recomputed per audit. One pair misses a cheat confined to
/// late steps (where updates are as small as f16 rounding) about half the
/// time; two distinct pairs miss it about a quarter of the time, so a few
/// audits per epoch catch it with ≥ 99.9 %.
pub const PAIRS_PER_AUDIT: usize = 2;

impl Auditor {
    pub fn new(model: Arc<PinnedModel>) -> Self {
        Auditor { model }
    }

    pub fn model(&self) -> &PinnedModel {
        &self.model
    }

    /// Draws the steps to open and the frame to compare from `rng` (the
    /// verifier's own randomness, unknown to the prover).
    pub fn plan(&self, req: &GenerateRequest, rng: &mut impl Rng) -> Plan {
        let n = req.steps;
        let mut ks: Vec<u32> = Vec::new();
        while ks.len() < PAIRS_PER_AUDIT.min(n as usize) {
            let k = rng.gen_range(0..n);
            if !ks.contains(&k) {
                ks.push(k);
            }
        }
        ks.sort_unstable();
        let multistep = self.model.manifest.scheduler.kind == SchedulerKind::DpmSolverMultistep;
        let mut steps = vec![0, n];
        for &k in &ks {
            steps.extend([k, k + 1]);
            if multistep && k > 0 {
                steps.push(k - 1);
            }
        }
        steps.sort_unstable();
        steps.dedup();
        Plan {
            challenge: AuditChallenge {
                version: PROTOCOL_VERSION,
                job_id: req.job_id,
                steps,
            },
            ks,
            frame: rng.gen_range(0..req.frames),
        }
    }

    /// Cheap checks that need no openings.
    pub fn check_response(
        &self,
        req: &GenerateRequest,
        resp: &GenerateResponse,
    ) -> Result<(), Failure> {
        if resp.job_id != req.job_id {
            return Err(fail(Check::Response, "answer is for another job"));
        }
        if resp.manifest_id != self.model.manifest_id {
            return Err(fail(
                Check::Response,
                format!("answered with manifest {}", resp.manifest_id),
            ));
        }
        if resp.trace_len != req.steps + 1 {
            return Err(fail(
                Check::Response,
                format!(
                    "trace has {} leaves, {} steps need {}",
                    resp.trace_len,
                    req.steps,
                    req.steps + 1
                ),
            ));
        }
        if resp.output != req.output {
            return Err(fail(
                Check::Response,
                "output format differs from the request",
            ));
        }
        Ok(())
    }

    /// Checks `answer` to `plan` for the job `req` → `resp`. CPU-heavy: run
    /// it off the async runtime.
    pub fn check(
        &self,
        req: &GenerateRequest,
        resp: &GenerateResponse,
        plan: &Plan,
        answer: &AuditAnswer,
    ) -> Result<AuditReport, Failure> {
        let start = Instant::now();
        self.check_response(req, resp)?;
        if answer.job_id != req.job_id {
            return Err(fail(Check::Commitment, "audit answer is for another job"));
        }
        answer
            .validate(&plan.challenge, &resp.trace_root)
            .map_err(|e| fail(Check::Commitment, e.to_string()))?;
        let engine = |e: fractal_engine::EngineError| {
            fail(Check::Response, format!("cannot replay the request: {e}"))
        };
        let spec = self.model.spec(req).map_err(engine)?;
        let p = &self.model.pipeline;
        let (b, c, f, h, w) = p
            .latent_shape(spec.frames, spec.height, spec.width)
            .map_err(engine)?;
        let shape = vec![b as u32, c as u32, f as u32, h as u32, w as u32];
        let opened = |step: u32| -> Result<&[u8], Failure> {
            let o = answer
                .openings
                .iter()
                .find(|o| o.step == step)
                .ok_or_else(|| fail(Check::Commitment, format!("step {step} not opened")))?;
            if o.shape != shape {
                return Err(fail(
                    Check::Commitment,
                    format!("latent shape {:?}, expected {shape:?}", o.shape),
                ));
            }
            Ok(&o.latent_f16.0)
        };
        let tensor = |bytes: &[u8]| -> Result<Tensor, Failure> {
            let v = latent_from_f16_bytes(bytes)
                .ok_or_else(|| fail(Check::Commitment, "latent bytes are not f16"))?;
            Tensor::from_vec(v, (b, c, f, h, w), &self.model.pipeline.model.device)
                .map_err(|e| fail(Check::Commitment, e.to_string()))
        };
        let to_vec = |t: &Tensor| -> Result<Vec<f32>, Failure> {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| fail(Check::Step, e.to_string()))
        };

        // 1. The trace starts from the seed's noise, exactly.
        let noise = p.initial_latents(&spec).map_err(engine)?;
        if opened(0)? != latent_f16_bytes(&to_vec(&noise)?).as_slice() {
            return Err(fail(
                Check::InitialNoise,
                format!("step 0 is not noise(seed {})", req.seed),
            ));
        }

        // 2. Recomputed steps (a multistep scheduler first replays k-1 to
        //    rebuild the history its update at k needs).
        let tol = self.model.manifest.verification.step_rel_l2;
        let context = p.context(&spec).map_err(engine)?;
        let multistep = self.model.manifest.scheduler.kind == SchedulerKind::DpmSolverMultistep;
        let mut worst = 0f64;
        for &k in &plan.ks {
            let mut scheduler = p.scheduler_for(spec.steps).map_err(engine)?;
            let first = if multistep { k.saturating_sub(1) } else { k };
            for i in first..=k {
                let x = tensor(opened(i)?)?;
                let next = p
                    .denoise_step(
                        &mut scheduler,
                        i as usize,
                        &x,
                        &context,
                        spec.guidance_scale,
                    )
                    .map_err(|e| fail(Check::Step, e.to_string()))?;
                if i < k {
                    continue;
                }
                let claimed = latent_from_f16_bytes(opened(i + 1)?).expect("checked above");
                let err = rel_l2(&to_vec(&next)?, &claimed);
                worst = worst.max(err);
                if err.is_nan() || err > tol {
                    return Err(fail(
                        Check::Step,
                        format!("step {i}→{}: relative L2 {err:.3e} > {tol:.1e}", i + 1),
                    ));
                }
            }
        }

        // 3. The returned video is the final latent, decoded.
        let last = opened(req.steps)?;
        let psnr = match resp.output {
            OutputFormat::Latents => {
                if resp.content.0 != last {
                    return Err(fail(
                        Check::Frame,
                        "returned latents differ from the committed final latent",
                    ));
                }
                f64::INFINITY
            }
            format => {
                let x = tensor(last)?;
                let frame = p
                    .decode_frame(&x, plan.frame as usize)
                    .map_err(|e| fail(Check::Frame, e.to_string()))?;
                let ours = pinned::rgb8(&frame).map_err(|e| fail(Check::Frame, e.to_string()))?;
                let theirs = returned_frame(format, &resp.content.0, req, plan.frame as usize)?;
                // Luma only: 4:2:0 chroma subsampling legitimately blurs colour
                // on noisy content, the luma plane is what H.264 keeps at QP 18.
                let psnr = psnr_luma(&ours, &theirs);
                // GIF's 256-colour palettes cost some fidelity that H.264 at QP 18 does not.
                let bound = match format {
                    OutputFormat::Gif => self.model.manifest.verification.frame_psnr_db - 8.0,
                    _ => self.model.manifest.verification.frame_psnr_db,
                };
                if psnr.is_nan() || psnr < bound {
                    return Err(fail(
                        Check::Frame,
                        format!("frame {}: PSNR {psnr:.1} dB < {bound:.1} dB", plan.frame),
                    ));
                }
                psnr
            }
        };
        Ok(AuditReport {
            steps: plan.ks.clone(),
            step_rel_l2: worst,
            frame: plan.frame,
            frame_psnr_db: psnr,
            verify_ms: start.elapsed().as_millis() as u64,
        })
    }

    /// Full regeneration (the dispute mode, 100% of the prover's cost):
    /// rerun the whole job and compare every returned frame by luma PSNR.
    /// The trace root is compared too and reported; it is expected to match
    /// bit for bit on the same build and platform, not across platforms.
    pub fn check_full(
        &self,
        req: &GenerateRequest,
        resp: &GenerateResponse,
    ) -> Result<FullReport, Failure> {
        let start = Instant::now();
        self.check_response(req, resp)?;
        let engine = |e: fractal_engine::EngineError| {
            fail(Check::Response, format!("cannot replay the request: {e}"))
        };
        let spec = self.model.spec(req).map_err(engine)?;
        let mut digests = Vec::with_capacity(spec.steps + 1);
        let mut latent_err: Option<Failure> = None;
        let generated = self
            .model
            .pipeline
            .generate(
                &spec,
                &mut |e| match e.latents.flatten_all().and_then(|t| t.to_vec1::<f32>()) {
                    Ok(v) => digests.push(fractal_protocol::merkle::latent_digest(&v)),
                    Err(err) => latent_err = Some(fail(Check::Step, err.to_string())),
                },
            )
            .map_err(|e| fail(Check::Step, e.to_string()))?;
        if let Some(f) = latent_err {
            return Err(f);
        }
        let root = fractal_protocol::merkle::MerkleTree::new(&digests)
            .map_err(|e| fail(Check::Step, e.to_string()))?
            .root();
        let mut worst = f64::INFINITY;
        match resp.output {
            OutputFormat::Latents => {
                let ours = latent_f16_bytes(&to_f32(&generated.final_latents)?);
                let theirs = latent_from_f16_bytes(&resp.content.0)
                    .ok_or_else(|| fail(Check::Frame, "returned latents are not f16"))?;
                let err = rel_l2(&theirs, &latent_from_f16_bytes(&ours).expect("f16"));
                let tol = self.model.manifest.verification.step_rel_l2;
                if err.is_nan() || err > tol {
                    return Err(fail(
                        Check::Frame,
                        format!("final latents: relative L2 {err:.3e} > {tol:.1e}"),
                    ));
                }
            }
            format => {
                let rgb = pinned::rgb8(&generated.frames)
                    .map_err(|e| fail(Check::Frame, e.to_string()))?;
                let n = (req.size.width * req.size.height * 3) as usize;
                let bound = self.model.manifest.verification.frame_psnr_db
                    - if format == OutputFormat::Gif {
                        8.0
                    } else {
                        0.0
                    };
                for i in 0..req.frames as usize {
                    let theirs = returned_frame(format, &resp.content.0, req, i)?;
                    let psnr = psnr_luma(&rgb[i * n..(i + 1) * n], &theirs);
                    worst = worst.min(psnr);
                    if psnr.is_nan() || psnr < bound {
                        return Err(fail(
                            Check::Frame,
                            format!("frame {i}: PSNR {psnr:.1} dB < {bound:.1} dB"),
                        ));
                    }
                }
            }
        }
        Ok(FullReport {
            root_matches: root == resp.trace_root,
            worst_frame_psnr_db: worst,
            verify_ms: start.elapsed().as_millis() as u64,
        })
    }
}

/// Frame `index` of the returned video as RGB8, checking its geometry.
fn returned_frame(
    format: OutputFormat,
    bytes: &[u8],
    req: &GenerateRequest,
    index: usize,
) -> Result<Vec<u8>, Failure> {
    let (w, h) = (req.size.width as usize, req.size.height as usize);
    let frames = match format {
        OutputFormat::Mp4 => {
            let v = decode_mp4(bytes, req.frames as usize)
                .map_err(|e| fail(Check::Frame, e.to_string()))?;
            if (v.width, v.height) != (w, h) {
                return Err(fail(
                    Check::Frame,
                    format!("video is {}x{}, asked {w}x{h}", v.width, v.height),
                ));
            }
            v.frames
        }
        OutputFormat::Gif => decode_gif(bytes, w, h, req.frames as usize)?,
        OutputFormat::Latents => unreachable!("latents are compared directly"),
    };
    if frames.len() != req.frames as usize {
        return Err(fail(
            Check::Frame,
            format!("video has {} frames, asked {}", frames.len(), req.frames),
        ));
    }
    Ok(frames.into_iter().nth(index).expect("count checked"))
}

fn decode_gif(bytes: &[u8], w: usize, h: usize, max: usize) -> Result<Vec<Vec<u8>>, Failure> {
    let bad = |e: &dyn std::fmt::Display| fail(Check::Frame, format!("GIF: {e}"));
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut dec = opts.read_info(bytes).map_err(|e| bad(&e))?;
    if (dec.width() as usize, dec.height() as usize) != (w, h) {
        return Err(fail(
            Check::Frame,
            format!("GIF is {}x{}, asked {w}x{h}", dec.width(), dec.height()),
        ));
    }
    let mut out = Vec::new();
    while let Some(frame) = dec.read_next_frame().map_err(|e| bad(&e))? {
        if out.len() >= max
            || (
                frame.width as usize,
                frame.height as usize,
                frame.left,
                frame.top,
            ) != (w, h, 0, 0)
        {
            return Err(fail(Check::Frame, "GIF frames do not match the request"));
        }
        out.push(
            frame
                .buffer
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
        );
    }
    Ok(out)
}
