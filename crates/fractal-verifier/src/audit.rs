//! Step spot-checks (DESIGN.md section 4, trace format v2): open a few
//! leaves of a committed trace and check them against the pinned model.
//!
//! The trace commits every latent `x_i` and every model output `out_i` as
//! exact f32 values (`fractal_protocol::merkle`). An audit opens
//! * `x_0`, which must equal `noise(seed)` bit for bit;
//! * `pairs_per_audit` random steps `k` (uniform without replacement over
//!   the whole schedule, drawn after the commitment): `x_k`, `out_k` and
//!   `x_{k+1}` (a multistep scheduler also the latents and outputs of the
//!   steps before `k` its update needs: one for DPM-Solver++, two for
//!   UniPC, whose corrected latents are recovered by inverting its
//!   predictor). Two checks per step:
//!   - *model output*: the denoiser with CFG recomputed from the committed
//!     `x_k` against `out_k`, relative L2 within `output_rel_l2`. A step's
//!     output is O(1) at every step, so this is as sensitive at the last
//!     step as at the first, unlike comparing latents (late steps move
//!     them very little);
//!   - *update*: the scheduler run from the committed `x_k` and `out_k`
//!     against the committed `x_{k+1} - x_k`, relative L2 within
//!     `update_rel_l2` of the recomputed update;
//! * `x_N`, one random frame of which is decoded and compared with the
//!   returned video by PSNR.
//!
//! On the prover's own build and platform an honest recomputation is bit
//! identical; the tolerances cover other builds and platforms. Cost: one
//! denoiser pass with CFG per pair and one frame decode (for Wan's causal
//! VAE, the latent frames up to it), instead of every step and every frame.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use fractal_engine::io::video::{self, decode_mp4, psnr_luma};
use fractal_engine::pipelines::values;
use fractal_engine::PinnedModel;
use fractal_protocol::merkle::TraceLeaf;
use fractal_protocol::wire::{
    latents_f16_bytes, latents_from_f16_bytes, AuditAnswer, AuditChallenge, GenerateRequest,
    GenerateResponse, OutputFormat, PROTOCOL_VERSION,
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
    /// A recomputed model output differs from the committed one.
    ModelOutput,
    /// The committed latents do not follow the scheduler from the committed
    /// model output.
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
            Check::ModelOutput => "model_output",
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
    /// The relative L2 error a numeric check measured (model output,
    /// update), for reports; `None` for other checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<f64>,
}

impl Failure {
    pub fn new(check: Check, detail: impl Into<String>) -> Self {
        Failure {
            check,
            detail: detail.into(),
            measured: None,
        }
    }

    /// The same failure, with the error its numeric check measured.
    fn measured(self, err: f64) -> Self {
        Failure {
            measured: Some(err),
            ..self
        }
    }
}

fn fail(check: Check, detail: impl Into<String>) -> Failure {
    Failure::new(check, detail)
}

/// What a passed audit measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub steps: Vec<u32>,
    /// Worst relative L2 of a recomputed model output.
    pub output_rel_l2: f64,
    /// Worst relative L2 of a recomputed scheduler update.
    pub update_rel_l2: f64,
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

/// The planned openings: `x_0`, per recomputed step `k` its `x_k`, `out_k`,
/// `x_{k+1}` (and the history's latents and outputs for multistep), and `x_N`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub challenge: AuditChallenge,
    /// The steps whose output and update are recomputed, ascending.
    pub ks: Vec<u32>,
    pub frame: u32,
}

impl Auditor {
    pub fn new(model: Arc<PinnedModel>) -> Self {
        Auditor { model }
    }

    pub fn model(&self) -> &PinnedModel {
        &self.model
    }

    /// The earlier steps an audit of step `k` opens (see
    /// `SchedulerKind::audit_history`).
    fn history(&self, k: u32) -> std::ops::Range<u32> {
        k - self.model.manifest.scheduler.kind().audit_history(k)..k
    }

    /// Draws the steps to recompute and the frame to compare from `rng`
    /// (the verifier's own randomness, drawn after the commitment).
    ///
    /// Steps are uniform over the whole schedule: a cheat saves work in
    /// proportion to the steps it fakes, wherever they are, so no part of
    /// the schedule may be cheaper to fake than another.
    pub fn plan(&self, req: &GenerateRequest, rng: &mut impl Rng) -> Plan {
        let n = req.steps;
        let pairs = (self.model.manifest.verification.pairs_per_audit as usize).min(n as usize);
        let mut ks: Vec<u32> = rand::seq::index::sample(rng, n as usize, pairs)
            .into_iter()
            .map(|k| k as u32)
            .collect();
        ks.sort_unstable();
        let mut leaves = vec![TraceLeaf::Latent(0).index(), TraceLeaf::Latent(n).index()];
        for &k in &ks {
            leaves.extend([
                TraceLeaf::Latent(k).index(),
                TraceLeaf::Output(k).index(),
                TraceLeaf::Latent(k + 1).index(),
            ]);
            for j in self.history(k) {
                leaves.extend([TraceLeaf::Latent(j).index(), TraceLeaf::Output(j).index()]);
            }
        }
        leaves.sort_unstable();
        leaves.dedup();
        Plan {
            challenge: AuditChallenge {
                version: PROTOCOL_VERSION,
                job_id: req.job_id,
                leaves,
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
        if resp.trace_len != TraceLeaf::count(req.steps) {
            return Err(fail(
                Check::Response,
                format!(
                    "trace has {} leaves, {} steps need {}",
                    resp.trace_len,
                    req.steps,
                    TraceLeaf::count(req.steps)
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
        let device = self.model.pipeline.device();
        let opened = |leaf: TraceLeaf| -> Result<Vec<f32>, Failure> {
            let o = answer
                .openings
                .iter()
                .find(|o| o.leaf == leaf.index())
                .ok_or_else(|| fail(Check::Commitment, format!("{leaf} not opened")))?;
            if o.shape != shape {
                return Err(fail(
                    Check::Commitment,
                    format!("{leaf}: shape {:?}, expected {shape:?}", o.shape),
                ));
            }
            o.values()
                .ok_or_else(|| fail(Check::Commitment, format!("{leaf}: not f32 values")))
        };
        let tensor = |values: Vec<f32>| -> Result<Tensor, Failure> {
            Tensor::from_vec(values, (b, c, f, h, w), device)
                .map_err(|e| fail(Check::Commitment, e.to_string()))
        };
        let to_vec = |t: &Tensor| values(t).map_err(|e| fail(Check::Step, e.to_string()));

        // 1. The trace starts from the seed's noise, bit for bit.
        let noise = to_vec(&p.initial_latents(&spec).map_err(engine)?)?;
        let x0 = opened(TraceLeaf::Latent(0))?;
        if x0.len() != noise.len()
            || x0
                .iter()
                .zip(&noise)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(fail(
                Check::InitialNoise,
                format!("step 0 is not noise(seed {})", req.seed),
            ));
        }

        // 2. Each drawn step: the scheduler's update from the committed
        //    output (cheap, first), then the model output itself.
        let tol = &self.model.manifest.verification;
        let context = p.context(&spec).map_err(engine)?;
        let (mut worst_output, mut worst_update) = (0f64, 0f64);
        for &k in &plan.ks {
            let mut scheduler = p.scheduler_for(spec.steps).map_err(engine)?;
            let step_err = |e: fractal_engine::EngineError| fail(Check::Step, e.to_string());
            let (x_k, out_k) = (opened(TraceLeaf::Latent(k))?, opened(TraceLeaf::Output(k))?);
            let x = tensor(x_k.clone())?;
            // The multistep history, from the committed latents and outputs
            // before k (their own updates are not needed here).
            let history = self
                .history(k)
                .map(|j| {
                    Ok((
                        tensor(opened(TraceLeaf::Latent(j))?)?,
                        tensor(opened(TraceLeaf::Output(j))?)?,
                    ))
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            scheduler
                .resume(k as usize, &history, &x)
                .map_err(|e| step_err(e.into()))?;
            let next = scheduler
                .step(&tensor(out_k.clone())?, k as usize, &x)
                .map_err(|e| step_err(e.into()))?;
            let ours = to_vec(&(next - &x).map_err(|e| step_err(e.into()))?)?;
            let theirs: Vec<f32> = opened(TraceLeaf::Latent(k + 1))?
                .iter()
                .zip(&x_k)
                .map(|(a, b)| a - b)
                .collect();
            let err = rel_l2(&theirs, &ours);
            worst_update = worst_update.max(err);
            if err.is_nan() || err > tol.update_rel_l2 {
                return Err(fail(
                    Check::Step,
                    format!(
                        "step {k}: update from the committed output is off by relative L2 {err:.3e} > {:.1e}",
                        tol.update_rel_l2
                    ),
                )
                .measured(err));
            }
            let recomputed = p
                .model_output(&scheduler, k as usize, &x, &context, spec.guidance_scale)
                .map_err(|e| fail(Check::ModelOutput, e.to_string()))?;
            let err = rel_l2(&out_k, &to_vec(&recomputed)?);
            worst_output = worst_output.max(err);
            if err.is_nan() || err > tol.output_rel_l2 {
                return Err(fail(
                    Check::ModelOutput,
                    format!(
                        "step {k}: model output off by relative L2 {err:.3e} > {:.1e}",
                        tol.output_rel_l2
                    ),
                )
                .measured(err));
            }
        }

        // 3. The returned video is the final latent, decoded.
        let last = TraceLeaf::Latent(req.steps);
        let psnr = match resp.output {
            OutputFormat::Latents => {
                if resp.content.0 != latents_f16_bytes(&opened(last)?) {
                    return Err(fail(
                        Check::Frame,
                        "returned latents differ from the committed final latent",
                    ));
                }
                f64::INFINITY
            }
            format => {
                let x = tensor(opened(last)?)?;
                let frame = p
                    .decode_frame(&x, plan.frame as usize)
                    .map_err(|e| fail(Check::Frame, e.to_string()))?;
                let ours = video::rgb8(&frame).map_err(|e| fail(Check::Frame, e.to_string()))?;
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
            output_rel_l2: worst_output,
            update_rel_l2: worst_update,
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
        let (generated, trace) = self
            .model
            .pipeline
            .generate_traced(&spec, &mut |_| {})
            .map_err(|e| fail(Check::Step, e.to_string()))?;
        let root = trace
            .tree()
            .map_err(|e| fail(Check::Step, e.to_string()))?
            .root();
        let mut worst = f64::INFINITY;
        match resp.output {
            OutputFormat::Latents => {
                let ours = latents_f16_bytes(&to_f32(&generated.final_latents)?);
                let theirs = latents_from_f16_bytes(&resp.content.0)
                    .ok_or_else(|| fail(Check::Frame, "returned latents are not f16"))?;
                let err = rel_l2(&theirs, &latents_from_f16_bytes(&ours).expect("f16"));
                let tol = LATENTS_OUTPUT_REL_L2;
                if err.is_nan() || err > tol {
                    return Err(fail(
                        Check::Frame,
                        format!("final latents: relative L2 {err:.3e} > {tol:.1e}"),
                    ));
                }
            }
            format => {
                let rgb = video::rgb8(&generated.frames)
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

/// How far two honest `latents` outputs may differ: each is rounded to f16
/// (2^-11 relative per element), so last-bit differences before rounding
/// flip at most one f16 step per element.
const LATENTS_OUTPUT_REL_L2: f64 = 1e-3;

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
