//! Running one job: the denoising loop with its trace, progress and
//! cancellation, and (with the `cheats` feature) the ways a dishonest
//! prover might try to save work.

use std::sync::Mutex;
#[cfg(feature = "cheats")]
use std::time::Duration;
use std::time::Instant;

use candle_core::Tensor;
use fractal_engine::pipelines::values;
use fractal_engine::{EngineError, GenerateSpec, PinnedModel};
use fractal_protocol::merkle::{f32_le_bytes, MerkleTree};
use fractal_protocol::wire::{GenerateRequest, Timing};
use fractal_protocol::Digest32;

/// A trace's leaves: each latent and model output, flattened.
type Leaves = Vec<Vec<f32>>;

use crate::traces::Trace;

/// How this prover behaves. Only `Honest` exists outside the `cheats` feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Strategy {
    Honest,
    /// Runs half the manifest's steps and pads the trace to the right length.
    #[cfg(feature = "cheats")]
    FewerSteps,
    /// Honest, but the last `n` steps repeat the latent before them.
    #[cfg(feature = "cheats")]
    RepeatTail(usize),
    /// Honest, but `n` steps from the middle of the schedule repeat the
    /// latent before them (the schedule then continues from it).
    #[cfg(feature = "cheats")]
    RepeatMiddle(usize),
    /// Reuses the model output of the middle step for the whole second half
    /// (half the UNet calls; the scheduler still runs every step).
    #[cfg(feature = "cheats")]
    ReuseSecondHalf,
    /// Reuses the previous step's model output on every other step.
    #[cfg(feature = "cheats")]
    ReuseAlternate,
    /// Honest first half, then one DDIM jump to the end; the latents in
    /// between are interpolated.
    #[cfg(feature = "cheats")]
    JumpFromHalf,
    /// Skips classifier-free guidance: the conditional branch only (half
    /// the UNet batch).
    #[cfg(feature = "cheats")]
    NoGuidance,
    /// Classifier-free guidance on even steps only.
    #[cfg(feature = "cheats")]
    GuidanceAlternate,
    /// Runs the UNet on every other frame and duplicates its output.
    #[cfg(feature = "cheats")]
    HalfFrames,
    /// Rounds each model output to bfloat16 (lower-precision activations).
    #[cfg(feature = "cheats")]
    OutputBf16,
    /// Encodes the prompt of its first job only and reuses that
    /// conditioning for every later job.
    #[cfg(feature = "cheats")]
    CachedPrompt,
    /// Commits to and decodes random latents: no model work at all.
    #[cfg(feature = "cheats")]
    RandomLatents,
    /// Answers every job with the first job's video and trace.
    #[cfg(feature = "cheats")]
    ReplayCached,
    /// Commits to the honest trajectory, answers audits from another seed's.
    #[cfg(feature = "cheats")]
    InconsistentAudit,
    /// Commits honestly, answers audits with made-up values.
    #[cfg(feature = "cheats")]
    FabricatedAudit,
    /// Does the work honestly, then waits this long before answering.
    #[cfg(feature = "cheats")]
    Late(Duration),
}

impl Strategy {
    /// Every cheat that needs no argument, by its `--strategy` name.
    #[cfg(feature = "cheats")]
    pub const CHEATS: &'static [(&'static str, Strategy)] = &[
        ("fewer-steps", Strategy::FewerSteps),
        ("reuse-second-half", Strategy::ReuseSecondHalf),
        ("reuse-alternate", Strategy::ReuseAlternate),
        ("jump-from-half", Strategy::JumpFromHalf),
        ("no-guidance", Strategy::NoGuidance),
        ("guidance-alternate", Strategy::GuidanceAlternate),
        ("half-frames", Strategy::HalfFrames),
        ("output-bf16", Strategy::OutputBf16),
        ("cached-prompt", Strategy::CachedPrompt),
        ("random-latents", Strategy::RandomLatents),
        ("replay-cached", Strategy::ReplayCached),
        ("inconsistent-audit", Strategy::InconsistentAudit),
        ("fabricated-audit", Strategy::FabricatedAudit),
    ];

    /// `honest`, a name from [`Strategy::CHEATS`], or `repeat-tail:N`,
    /// `repeat-middle:N` (steps), `late:MS`.
    pub fn parse(s: &str) -> Option<Strategy> {
        if s == "honest" {
            return Some(Strategy::Honest);
        }
        #[cfg(feature = "cheats")]
        {
            if let Some((_, c)) = Self::CHEATS.iter().find(|(n, _)| *n == s) {
                return Some(c.clone());
            }
            let (name, arg) = s.split_once(':')?;
            let arg: u64 = arg.parse().ok()?;
            return match name {
                "repeat-tail" => Some(Strategy::RepeatTail(arg as usize)),
                "repeat-middle" => Some(Strategy::RepeatMiddle(arg as usize)),
                "late" => Some(Strategy::Late(Duration::from_millis(arg))),
                _ => None,
            };
        }
        #[allow(unreachable_code)]
        None
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

/// State a strategy keeps between jobs (only some cheaters use it).
#[derive(Default)]
pub struct StrategyState {
    #[cfg_attr(not(feature = "cheats"), allow(dead_code))]
    cached: Mutex<Option<Replay>>,
    #[cfg_attr(not(feature = "cheats"), allow(dead_code))]
    context: Mutex<Option<Tensor>>,
}

/// The first job's output and trace, as the replaying cheater keeps them.
#[cfg_attr(not(feature = "cheats"), allow(dead_code))]
struct Replay {
    content: Vec<u8>,
    shape: Vec<u32>,
    leaves: Leaves,
}

fn shape_of(t: &Tensor) -> Vec<u32> {
    t.dims().iter().map(|&d| d as u32).collect()
}

/// A trace over leaf values in trace order (`x_0, out_0, x_1, ..., x_N`):
/// each leaf encoded once, kept as committed and hashed from those bytes.
fn trace_of(shape: Vec<u32>, leaves: &[Vec<f32>]) -> Result<Trace, JobError> {
    let leaves: Vec<Vec<u8>> = leaves.iter().map(|l| f32_le_bytes(l)).collect();
    let digests: Vec<Digest32> = leaves.iter().map(|b| Digest32::sha256(b)).collect();
    let tree = MerkleTree::new(&digests).map_err(|e| EngineError::BadInput(e.to_string()))?;
    Ok(Trace {
        shape,
        leaves,
        tree,
    })
}

/// Where a step's model output and next latent come from.
#[cfg_attr(not(feature = "cheats"), allow(dead_code))]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shortcut {
    /// The real model output and scheduler step.
    None,
    /// The last computed model output again, then the scheduler.
    ReuseOutput,
    /// The last computed model output again, and no move at all.
    Repeat,
    /// The conditional branch only, then the scheduler.
    Unguided,
    /// The UNet on every other frame, duplicated, then the scheduler.
    HalfFrames,
    /// The real model output rounded to bfloat16, then the scheduler.
    Bf16Output,
}

/// The shortcut `strategy` takes at step `i` of `n`.
fn shortcut(strategy: &Strategy, i: usize, n: usize) -> Shortcut {
    #[cfg(not(feature = "cheats"))]
    let _ = (i, n);
    match strategy {
        Strategy::Honest => Shortcut::None,
        #[cfg(feature = "cheats")]
        Strategy::RepeatTail(k) if i + k >= n => Shortcut::Repeat,
        #[cfg(feature = "cheats")]
        Strategy::RepeatMiddle(k) if i >= n / 2 && i < n / 2 + k => Shortcut::Repeat,
        #[cfg(feature = "cheats")]
        Strategy::ReuseSecondHalf | Strategy::JumpFromHalf if i > n / 2 => Shortcut::ReuseOutput,
        #[cfg(feature = "cheats")]
        Strategy::ReuseAlternate if i % 2 == 1 => Shortcut::ReuseOutput,
        #[cfg(feature = "cheats")]
        Strategy::NoGuidance => Shortcut::Unguided,
        #[cfg(feature = "cheats")]
        Strategy::GuidanceAlternate if i % 2 == 1 => Shortcut::Unguided,
        #[cfg(feature = "cheats")]
        Strategy::HalfFrames => Shortcut::HalfFrames,
        #[cfg(feature = "cheats")]
        Strategy::OutputBf16 => Shortcut::Bf16Output,
        #[cfg(feature = "cheats")]
        _ => Shortcut::None,
    }
}

/// The conditioning for `spec`: `[uncond; cond]` with CFG (the cheater that
/// caches its first prompt's returns that one instead).
fn context_for(
    model: &PinnedModel,
    spec: &GenerateSpec,
    strategy: &Strategy,
    state: &StrategyState,
) -> Result<Tensor, JobError> {
    #[cfg(feature = "cheats")]
    if *strategy == Strategy::CachedPrompt {
        let mut cached = state.context.lock().expect("context cache lock");
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let c = model.pipeline.context(spec)?;
        *cached = Some(c.clone());
        return Ok(c);
    }
    #[cfg(not(feature = "cheats"))]
    let _ = (strategy, state);
    Ok(model.pipeline.context(spec)?)
}

/// The denoising loop over `steps` steps, as `strategy` runs it; returns
/// the final latent and every leaf of the trace. `progress(done)` returns
/// false to cancel.
fn denoise(
    model: &PinnedModel,
    spec: &GenerateSpec,
    steps: usize,
    strategy: &Strategy,
    state: &StrategyState,
    progress: &mut dyn FnMut(u32) -> bool,
) -> Result<(Tensor, Leaves), JobError> {
    let p = &model.pipeline;
    let g = spec.guidance_scale;
    let mut scheduler = p.scheduler_for(steps)?;
    let context = context_for(model, spec, strategy, state)?;
    let cond_only = || -> Result<Tensor, JobError> {
        let n = context.dim(0)?;
        Ok(context.narrow(0, n - 1, 1)?)
    };
    let mut x = p.initial_latents(spec)?;
    let mut leaves = Vec::with_capacity(2 * steps + 1);
    leaves.push(values(&x)?);
    let mut last: Option<Tensor> = None;
    for i in 0..steps {
        let compute = |s: &Shortcut| -> Result<Tensor, JobError> {
            Ok(match s {
                Shortcut::Unguided => p.model_output(&scheduler, i, &x, &cond_only()?, 1.0)?,
                Shortcut::HalfFrames => {
                    let f = x.dim(2)?;
                    let dev = x.device();
                    let even: Vec<u32> = (0..f as u32).step_by(2).collect();
                    let dup: Vec<u32> = (0..f as u32).map(|j| j / 2).collect();
                    let half = x.index_select(&Tensor::new(even, dev)?, 2)?;
                    let out = p.model_output(&scheduler, i, &half, &context, g)?;
                    out.index_select(&Tensor::new(dup, dev)?, 2)?
                }
                Shortcut::Bf16Output => p
                    .model_output(&scheduler, i, &x, &context, g)?
                    .to_dtype(candle_core::DType::BF16)?
                    .to_dtype(candle_core::DType::F32)?,
                _ => p.model_output(&scheduler, i, &x, &context, g)?,
            })
        };
        let s = shortcut(strategy, i, steps);
        let (output, next) = match (s, last.clone()) {
            (Shortcut::Repeat, Some(o)) => {
                // The scheduler still takes the (cheap) step, so a multistep
                // solver's history stays in order; only its result is dropped.
                scheduler.step(&o, i, &x)?;
                (o, x.clone())
            }
            (Shortcut::ReuseOutput, Some(o)) => {
                let next = scheduler.step(&o, i, &x)?;
                (o, next)
            }
            (s, _) => {
                let o = compute(&s)?;
                let next = scheduler.step(&o, i, &x)?;
                (o, next)
            }
        };
        leaves.push(values(&output)?);
        leaves.push(values(&next)?);
        if s == Shortcut::None || last.is_none() {
            last = Some(output);
        }
        x = next;
        if !progress(i as u32 + 1) {
            return Err(JobError::Cancelled);
        }
    }
    #[cfg(feature = "cheats")]
    if *strategy == Strategy::JumpFromHalf && steps >= 2 {
        // Only the end of the jump is real; the latents in between are a
        // straight line to it.
        let h = steps / 2;
        let (from, to) = (leaves[2 * h].clone(), leaves[2 * steps].clone());
        for j in h + 1..steps {
            let t = (j - h) as f32 / (steps - h) as f32;
            leaves[2 * j] = from.iter().zip(&to).map(|(a, b)| a + t * (b - a)).collect();
        }
    }
    Ok((x, leaves))
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
    let _ = req;
    let start = Instant::now();
    // `audit`: the leaves an inconsistent cheat opens instead of the
    // committed ones (named here: without the `cheats` feature no arm
    // builds one, so inference alone cannot tell its type).
    let (final_latents, committed, audit): (Tensor, Leaves, Option<Leaves>) = match strategy {
        #[cfg(feature = "cheats")]
        Strategy::FewerSteps => {
            let half = (spec.steps / 2).max(1);
            let (x, short) = denoise(model, spec, half, strategy, state, progress)?;
            // Stretch the short trajectory to the promised length.
            let at = |i: usize| (i * half + spec.steps / 2) / spec.steps;
            let mut trace = Vec::with_capacity(2 * spec.steps + 1);
            for i in 0..=spec.steps {
                if i > 0 {
                    trace.push(short[2 * at(i - 1).min(half - 1) + 1].clone());
                }
                trace.push(short[2 * at(i)].clone());
            }
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
            let mut trace = Vec::with_capacity(2 * spec.steps + 1);
            for i in 0..=spec.steps {
                let scaled = (&x * (1.0 - i as f64 / (spec.steps as f64 + 1.0)))?;
                if i > 0 {
                    trace.push(values(&x)?);
                }
                trace.push(values(&scaled)?);
            }
            (x, trace, None)
        }
        #[cfg(feature = "cheats")]
        Strategy::ReplayCached => {
            let mut cached = state.cached.lock().expect("replay cache lock");
            if let Some(r) = cached.as_ref() {
                let trace = trace_of(r.shape.clone(), &r.leaves)?;
                return Ok(Produced {
                    content: r.content.clone(),
                    root: trace.tree.root(),
                    trace_len: trace.tree.leaf_count(),
                    audit_trace: trace,
                    timing: Timing::default(),
                });
            }
            let (x, trace) = denoise(model, spec, spec.steps, strategy, state, progress)?;
            let frames = model.pipeline.decode(&x)?;
            let content = model.render(req.output, &frames, &x)?;
            *cached = Some(Replay {
                content,
                shape: shape_of(&x),
                leaves: trace.clone(),
            });
            drop(cached);
            (x, trace, None)
        }
        #[cfg(feature = "cheats")]
        Strategy::InconsistentAudit => {
            let (x, trace) = denoise(model, spec, spec.steps, strategy, state, progress)?;
            let other = GenerateSpec {
                seed: fractal_protocol::Seed(spec.seed.0.wrapping_add(1)),
                ..spec.clone()
            };
            let (_, other_trace) =
                denoise(model, &other, spec.steps, strategy, state, &mut |_| true)?;
            (x, trace, Some(other_trace))
        }
        #[cfg(feature = "cheats")]
        Strategy::FabricatedAudit => {
            let (x, trace) = denoise(model, spec, spec.steps, strategy, state, progress)?;
            // Keep the honest tree (so paths look right) but swap the values.
            let shape = shape_of(&x);
            let honest = trace_of(shape.clone(), &trace)?;
            let fake: Vec<Vec<u8>> = honest
                .leaves
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
                    leaves: fake,
                    tree: honest.tree,
                },
                timing: Timing {
                    denoise_ms: start.elapsed().as_millis() as u64,
                    ..Timing::default()
                },
            });
        }
        _ => {
            let (x, trace) = denoise(model, spec, spec.steps, strategy, state, progress)?;
            (x, trace, None)
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
    let committed = trace_of(shape.clone(), &committed)?;
    let root = committed.tree.root();
    let trace_len = committed.tree.leaf_count();
    let audit_trace = match audit {
        Some(other) => trace_of(shape, &other)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use fractal_protocol::merkle::TraceDigests;

    #[test]
    fn a_trace_commits_every_leaf_in_order() {
        let leaves = vec![vec![1.0f32, 2.0], vec![0.5, 0.5], vec![3.0, 4.0]];
        let t = trace_of(vec![2], &leaves).unwrap();
        assert_eq!(t.tree.leaf_count(), 3);
        let mut d = TraceDigests::new();
        for l in &leaves {
            d.push(l);
        }
        assert_eq!(t.tree.root(), MerkleTree::new(d.digests()).unwrap().root());
    }
}
