//! Running one job: the denoising loop with its trace, progress and
//! cancellation, and (with the `cheats` feature) the ways a dishonest
//! prover might try to save work.

use std::sync::Mutex;
#[cfg(feature = "cheats")]
use std::time::Duration;
use std::time::Instant;

use candle_core::Tensor;
use fractal_engine::{EngineError, GenerateSpec, PinnedModel};
use fractal_protocol::merkle::{latent_f16_bytes, MerkleTree};
use fractal_protocol::wire::{GenerateRequest, Timing};
use fractal_protocol::Digest32;

use crate::traces::Trace;

/// How this prover behaves. Only `Honest` exists outside the `cheats` feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Strategy {
    Honest,
    /// Runs half the manifest's steps and pads the trace to the right length.
    #[cfg(feature = "cheats")]
    FewerSteps,
    /// Commits to and decodes random latents: no model work at all.
    #[cfg(feature = "cheats")]
    RandomLatents,
    /// Answers every job with the first job's video and trace.
    #[cfg(feature = "cheats")]
    ReplayCached,
    /// Commits to the honest trajectory, answers audits from another seed's.
    #[cfg(feature = "cheats")]
    InconsistentAudit,
    /// Commits honestly, answers audits with made-up latents.
    #[cfg(feature = "cheats")]
    FabricatedAudit,
    /// Does the work honestly, then waits this long before answering.
    #[cfg(feature = "cheats")]
    Late(Duration),
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Strategy> {
        Some(match s {
            "honest" => Strategy::Honest,
            #[cfg(feature = "cheats")]
            "fewer-steps" => Strategy::FewerSteps,
            #[cfg(feature = "cheats")]
            "random-latents" => Strategy::RandomLatents,
            #[cfg(feature = "cheats")]
            "replay-cached" => Strategy::ReplayCached,
            #[cfg(feature = "cheats")]
            "inconsistent-audit" => Strategy::InconsistentAudit,
            #[cfg(feature = "cheats")]
            "fabricated-audit" => Strategy::FabricatedAudit,
            #[cfg(feature = "cheats")]
            late if late.starts_with("late:") => {
                Strategy::Late(Duration::from_millis(late[5..].parse().ok()?))
            }
            _ => return None,
        })
    }
}

/// A finished job: what goes back to the client and what stays for audits.
pub struct Produced {
    pub content: Vec<u8>,
    pub root: Digest32,
    pub trace_len: u32,
    /// What audits are answered from (the committed trace, for an honest prover).
    pub audit_trace: Trace,
    pub timing: Timing,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cancelled: the client went away")]
    Cancelled,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<candle_core::Error> for JobError {
    fn from(e: candle_core::Error) -> Self {
        JobError::Engine(e.into())
    }
}

/// State a strategy keeps between jobs (only the replaying cheater uses it).
#[derive(Default)]
pub struct StrategyState {
    #[cfg_attr(not(feature = "cheats"), allow(dead_code))]
    cached: Mutex<Option<Replay>>,
}

/// The first job's output and trace, as the replaying cheater keeps them.
#[cfg_attr(not(feature = "cheats"), allow(dead_code))]
struct Replay {
    content: Vec<u8>,
    shape: Vec<u32>,
    latents: Vec<Vec<u8>>,
}

fn f16_bytes(t: &Tensor) -> Result<Vec<u8>, JobError> {
    Ok(latent_f16_bytes(&t.flatten_all()?.to_vec1::<f32>()?))
}

fn shape_of(t: &Tensor) -> Vec<u32> {
    t.dims().iter().map(|&d| d as u32).collect()
}

fn trace_of(shape: Vec<u32>, latents: Vec<Vec<u8>>) -> Result<Trace, JobError> {
    let digests: Vec<Digest32> = latents.iter().map(|l| Digest32::sha256(l)).collect();
    let tree = MerkleTree::new(&digests).map_err(|e| EngineError::BadInput(e.to_string()))?;
    Ok(Trace {
        shape,
        latents,
        tree,
    })
}

/// The honest denoising loop over `steps` steps; `progress(done)` returns
/// false to cancel.
fn denoise(
    model: &PinnedModel,
    spec: &GenerateSpec,
    steps: usize,
    progress: &mut dyn FnMut(u32) -> bool,
) -> Result<(Tensor, Vec<Vec<u8>>), JobError> {
    let p = &model.pipeline;
    let mut scheduler = p.scheduler_for(steps)?;
    let context = p.context(spec)?;
    let mut x = p.initial_latents(spec)?;
    let mut trace = Vec::with_capacity(steps + 1);
    trace.push(f16_bytes(&x)?);
    for i in 0..steps {
        x = p.denoise_step(&mut scheduler, i, &x, &context, spec.guidance_scale)?;
        trace.push(f16_bytes(&x)?);
        if !progress(i as u32 + 1) {
            return Err(JobError::Cancelled);
        }
    }
    Ok((x, trace))
}

/// Runs `req` (already validated into `spec`) the way `strategy` says.
pub fn run(
    model: &PinnedModel,
    req: &GenerateRequest,
    spec: &GenerateSpec,
    strategy: &Strategy,
    state: &StrategyState,
    progress: &mut dyn FnMut(u32) -> bool,
) -> Result<Produced, JobError> {
    #[cfg(not(feature = "cheats"))]
    let _ = state;
    let start = Instant::now();
    let (final_latents, committed, audit) = match strategy {
        Strategy::Honest => {
            let (x, trace) = denoise(model, spec, spec.steps, progress)?;
            (x, trace, None)
        }
        #[cfg(feature = "cheats")]
        Strategy::Late(_) => {
            let (x, trace) = denoise(model, spec, spec.steps, progress)?;
            (x, trace, None)
        }
        #[cfg(feature = "cheats")]
        Strategy::FewerSteps => {
            let half = (spec.steps / 2).max(1);
            let (x, short) = denoise(model, spec, half, progress)?;
            // Stretch the short trajectory to the promised length.
            let trace = (0..=spec.steps)
                .map(|i| short[(i * half + spec.steps / 2) / spec.steps].clone())
                .collect();
            (x, trace, None)
        }
        #[cfg(feature = "cheats")]
        Strategy::RandomLatents => {
            let x = model.pipeline.initial_latents(&GenerateSpec {
                seed: fractal_protocol::Seed(u64::from_le_bytes(
                    req.job_id.0[..8].try_into().expect("8 bytes"),
                )),
                ..spec.clone()
            })?;
            let mut trace = Vec::with_capacity(spec.steps + 1);
            for i in 0..=spec.steps {
                let scaled = (&x * (1.0 - i as f64 / (spec.steps as f64 + 1.0)))?;
                trace.push(f16_bytes(&scaled)?);
            }
            (x, trace, None)
        }
        #[cfg(feature = "cheats")]
        Strategy::ReplayCached => {
            let mut cached = state.cached.lock().expect("replay cache lock");
            if let Some(r) = cached.as_ref() {
                let trace = trace_of(r.shape.clone(), r.latents.clone())?;
                return Ok(Produced {
                    content: r.content.clone(),
                    root: trace.tree.root(),
                    trace_len: trace.tree.leaf_count(),
                    audit_trace: trace,
                    timing: Timing::default(),
                });
            }
            let (x, trace) = denoise(model, spec, spec.steps, progress)?;
            let frames = model.pipeline.decode(&x)?;
            let content = model.render(req.output, &frames, &x)?;
            *cached = Some(Replay {
                content,
                shape: shape_of(&x),
                latents: trace.clone(),
            });
            drop(cached);
            (x, trace, None)
        }
        #[cfg(feature = "cheats")]
        Strategy::InconsistentAudit => {
            let (x, trace) = denoise(model, spec, spec.steps, progress)?;
            let other = GenerateSpec {
                seed: fractal_protocol::Seed(spec.seed.0.wrapping_add(1)),
                ..spec.clone()
            };
            let (_, other_trace) = denoise(model, &other, spec.steps, &mut |_| true)?;
            (x, trace, Some(other_trace))
        }
        #[cfg(feature = "cheats")]
        Strategy::FabricatedAudit => {
            let (x, trace) = denoise(model, spec, spec.steps, progress)?;
            // Keep the honest tree (so paths look right) but swap the latents.
            let shape = shape_of(&x);
            let honest = trace_of(shape.clone(), trace.clone())?;
            let fake: Vec<Vec<u8>> = trace
                .iter()
                .map(|l| l.iter().map(|b| b.wrapping_add(1)).collect())
                .collect();
            let produced_frames = model.pipeline.decode(&x)?;
            let content = model.render(req.output, &produced_frames, &x)?;
            return Ok(Produced {
                content,
                root: honest.tree.root(),
                trace_len: honest.tree.leaf_count(),
                audit_trace: Trace {
                    shape,
                    latents: fake,
                    tree: honest.tree,
                },
                timing: Timing {
                    denoise_ms: start.elapsed().as_millis() as u64,
                    ..Timing::default()
                },
            });
        }
    };
    let denoise_ms = start.elapsed().as_millis() as u64;
    let t = Instant::now();
    let frames = model.pipeline.decode(&final_latents)?;
    let decode_ms = t.elapsed().as_millis() as u64;
    let t = Instant::now();
    let content = model.render(req.output, &frames, &final_latents)?;
    let encode_ms = t.elapsed().as_millis() as u64;
    let shape = shape_of(&final_latents);
    let committed = trace_of(shape.clone(), committed)?;
    let root = committed.tree.root();
    let trace_len = committed.tree.leaf_count();
    let audit_trace = match audit {
        Some(other) => trace_of(shape, other)?,
        None => committed,
    };
    #[cfg(feature = "cheats")]
    if let Strategy::Late(d) = strategy {
        std::thread::sleep(*d);
    }
    Ok(Produced {
        content,
        root,
        trace_len,
        audit_trace,
        timing: Timing {
            queue_ms: 0,
            denoise_ms,
            decode_ms,
            encode_ms,
        },
    })
}
