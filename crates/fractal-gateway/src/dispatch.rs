//! Running accepted jobs on the grid: pick a prover from the map among those
//! serving the job's model, send the job through the verifier (which audits
//! a sample of routed jobs), hedge a slow request with a second prover,
//! fail over on errors, store the outputs, and only then mark the job
//! completed. A job is made by the model it was accepted for or not at all:
//! once the schedule retired that model and no prover serves it any more,
//! it fails with `model_retired`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fractal_chain::NeuronInfo;
use fractal_protocol::manifest::Size;
use fractal_protocol::wire::{
    GenerateRequest, OutputFormat, Phase, ProgressEvent, PROTOCOL_VERSION,
};
use fractal_protocol::{Hotkey, JobId, ManifestId, ModelManifest, ModelState, Seed};
use fractal_router::{Failure, GridMap, Ticket, Work};
use fractal_verifier::client::{CallError, Generated};

use crate::db::{now_s, Job, Provenance};
use crate::Gateway;

#[derive(Debug, thiserror::Error)]
enum OutputError {
    #[error("bad video from the prover: {0}")]
    BadVideo(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Percent shown for a progress event: denoising is most of the work.
pub fn percent(p: &ProgressEvent) -> u32 {
    match p.phase {
        Phase::Queued | Phase::Encoding => 1,
        Phase::Denoising => 2 + (90 * p.step / p.total.max(1)).min(90),
        Phase::Decoding => 93,
        Phase::Muxing => 97,
        Phase::Done => 99,
    }
}

/// The model a job runs under.
struct JobModel {
    id: ManifestId,
    manifest: Arc<ModelManifest>,
}

/// Whether a job can run now.
enum Runnable {
    /// Under this model, never on these provers (they do not serve it, or
    /// have not said what they serve yet).
    Yes(JobModel, Vec<Hotkey>),
    /// Its model's document is not known here yet (a gateway that restarted
    /// reads it from the chain at its first probe).
    NotYet,
    /// Never: the error code and message it fails with.
    Never(&'static str, String),
}

pub fn work_of(job: &Job) -> Work {
    Work {
        width: job.spec.width,
        height: job.spec.height,
        frames: job.spec.frames,
        steps: job.spec.steps,
    }
}

/// A request counted in the map until it is settled; dropping it unsettled
/// (the job was deleted or the gateway is stopping) counts it cancelled.
struct Sent {
    map: Arc<Mutex<GridMap>>,
    ticket: Option<Ticket>,
    neuron: NeuronInfo,
    started: Instant,
}

impl Sent {
    fn settle(&mut self, outcome: Result<&Generated, &CallError>, work: &Work) {
        let Some(t) = self.ticket.take() else { return };
        let mut map = self.map.lock().expect("map lock");
        let now = crate::now_ms();
        match outcome {
            Ok(g) => {
                let timing = &g.response.timing;
                let service = (timing.denoise_ms + timing.decode_ms + timing.encode_ms) as f64;
                let total = self.started.elapsed().as_secs_f64() * 1000.0;
                map.completed(&t, work, service, total, now);
            }
            // Holding more than the request allowed to wait behind.
            Err(CallError::Busy {
                backlog_ms: Some(ms),
                ..
            }) => map.refused_late(&t, *ms as f64, now),
            Err(CallError::Busy { .. }) => map.failed(&t, Failure::Busy, now),
            Err(CallError::Timeout(_)) => map.failed(&t, Failure::Timeout, now),
            Err(_) => map.failed(&t, Failure::Error, now),
        }
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.map.lock().expect("map lock").cancelled(&t);
        }
    }
}

impl Gateway {
    /// The best eligible prover with room not tried yet (for a hedge, only
    /// an idle one); `None` when there is none.
    fn pick(&self, work: &Work, tried: &mut Vec<Hotkey>, hedge: bool) -> Option<Sent> {
        let neurons = self.provers.lock().expect("provers lock").clone();
        let mut map = self.map.lock().expect("map lock");
        loop {
            let now = crate::now_ms();
            let t = if hedge {
                map.choose_hedge(work, now, tried)?
            } else {
                map.choose(work, now, tried)?
            };
            tried.push(t.node);
            match neurons.iter().find(|n| n.hotkey == t.node) {
                Some(n) => {
                    return Some(Sent {
                        map: self.map.clone(),
                        ticket: Some(t),
                        neuron: n.clone(),
                        started: Instant::now(),
                    })
                }
                // Left the metagraph since the map last synced.
                None => map.cancelled(&t),
            }
        }
    }

    /// Whether `job` can run now, under which model and on which provers.
    fn runnable(&self, job: &Job) -> Runnable {
        let catalog = self.catalog.lock().expect("catalog lock");
        let id = match catalog.job_manifest(&job.spec.manifest_id) {
            Ok(id) => id,
            Err(e) => return Runnable::Never("invalid_job", e),
        };
        let serving = catalog.provers_serving(&id);
        if serving.is_empty() && catalog.state(&id) == Some(ModelState::Retired) {
            return Runnable::Never(
                "model_retired",
                format!(
                    "the model {:?} (manifest {id}) this video was accepted for was retired by the grid's schedule and no prover serves it any more; it is not made with another model",
                    job.spec.model
                ),
            );
        }
        let Some(manifest) = catalog.manifest(&id) else {
            return Runnable::NotYet;
        };
        let others = self
            .provers
            .lock()
            .expect("provers lock")
            .iter()
            .map(|n| n.hotkey)
            .filter(|h| !serving.contains(h))
            .collect();
        Runnable::Yes(JobModel { id, manifest }, others)
    }

    fn request(
        &self,
        job: &Job,
        model: &JobModel,
        start_within_ms: Option<u64>,
    ) -> GenerateRequest {
        let m = &model.manifest;
        GenerateRequest {
            version: PROTOCOL_VERSION,
            // A fresh id per attempt: provers refuse a job id twice.
            job_id: JobId::random(),
            manifest_id: model.id,
            prompt: job.spec.prompt.clone(),
            negative_prompt: job.spec.negative_prompt.clone(),
            seed: Seed(job.spec.seed),
            size: Size {
                width: job.spec.width,
                height: job.spec.height,
            },
            frames: job.spec.frames,
            steps: job.spec.steps,
            guidance_scale: m.defaults.guidance_scale,
            output: OutputFormat::Mp4,
            start_within_ms,
        }
    }

    /// How long a request to the prover `to` was picked for may queue
    /// there, after `late` refusals for that (see
    /// [`GridMap::start_within_ms`]).
    fn start_within(&self, to: &Sent, late: u32) -> Option<u64> {
        let t = to.ticket.as_ref()?;
        let map = self.map.lock().expect("map lock");
        map.start_within_ms(t, late).map(|ms| ms.ceil() as u64)
    }

    async fn send(
        &self,
        job: &Job,
        model: &JobModel,
        neuron: NeuronInfo,
        start_within_ms: Option<u64>,
    ) -> Result<Generated, CallError> {
        let req = self.request(job, model, start_within_ms);
        let prover = neuron.hotkey.to_string();
        let progress = self.progress_tx.clone();
        let id = job.id.clone();
        let mut on_progress = move |p: &ProgressEvent| {
            let _ = progress.send((id.clone(), percent(p), prover.clone()));
        };
        self.verifier.forward(&neuron, req, &mut on_progress).await
    }

    /// One attempt with an optional hedge: the first success wins and the
    /// other request is dropped (the prover sees the hang-up and stops).
    /// `started` says whether the job is already `in_progress`; it is
    /// marked so only once a prover is picked, so a job waiting for
    /// capacity stays `queued` for the app.
    async fn attempt(
        &self,
        job: &Job,
        model: &JobModel,
        work: &Work,
        tried: &mut Vec<Hotkey>,
        started: &mut bool,
        late: u32,
    ) -> Option<(Result<Generated, CallError>, Hotkey)> {
        let mut first = self.pick(work, tried, false)?;
        if !*started {
            match self.db.start(&job.id) {
                Ok(true) => {
                    *started = true;
                    self.changed(&job.id);
                }
                // Deleted meanwhile.
                Ok(false) => return None,
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "claiming a job failed");
                    return None;
                }
            }
        }
        let hedge_after = {
            let map = self.map.lock().expect("map lock");
            Duration::from_secs_f64(
                map.hedge_after_ms(first.ticket.as_ref().expect("fresh")) / 1000.0,
            )
        };
        let a = self.send(
            job,
            model,
            first.neuron.clone(),
            self.start_within(&first, late),
        );
        tokio::pin!(a);
        tokio::select! {
            r = &mut a => {
                first.settle(r.as_ref(), work);
                return Some((r, first.neuron.hotkey));
            }
            _ = tokio::time::sleep(hedge_after) => {}
        }
        let Some(mut second) = self.pick(work, tried, true) else {
            let r = a.await;
            first.settle(r.as_ref(), work);
            return Some((r, first.neuron.hotkey));
        };
        tracing::info!(job = %job.id, slow = %first.neuron.hotkey, hedge = %second.neuron.hotkey, "hedging a slow request");
        self.counters
            .hedges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let b = self.send(
            job,
            model,
            second.neuron.clone(),
            self.start_within(&second, late),
        );
        tokio::pin!(b);
        tokio::select! {
            r = &mut a => {
                first.settle(r.as_ref(), work);
                if r.is_ok() { return Some((r, first.neuron.hotkey)); }
                let r2 = b.await;
                second.settle(r2.as_ref(), work);
                Some((r2, second.neuron.hotkey))
            }
            r = &mut b => {
                second.settle(r.as_ref(), work);
                if r.is_ok() { return Some((r, second.neuron.hotkey)); }
                let r1 = a.await;
                first.settle(r1.as_ref(), work);
                Some((r1, first.neuron.hotkey))
            }
        }
    }

    /// Runs a queued job to completion or failure, or leaves it queued
    /// when no prover can take it now.
    pub(crate) async fn run_job(self: Arc<Self>, job: Job) {
        let work = work_of(&job);
        let (model, mut tried) = match self.runnable(&job) {
            Runnable::Yes(model, others) => (model, others),
            Runnable::NotYet => return,
            Runnable::Never(code, msg) => {
                tracing::warn!(job = %job.id, code, %msg, "job cannot run");
                let _ = self.db.fail(&job.id, code, &msg);
                self.counters
                    .failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.changed(&job.id);
                return;
            }
        };
        let mut errors = Vec::new();
        let mut started = false;
        // Refusals for holding more work than a request allowed.
        let mut late = 0;
        while errors.len() < self.config.max_attempts as usize {
            let Some((result, prover)) = self
                .attempt(&job, &model, &work, &mut tried, &mut started, late)
                .await
            else {
                break;
            };
            match result {
                // Made by another model than the job's: not this job's video.
                Ok(g) if g.response.manifest_id != model.id => {
                    tracing::warn!(job = %job.id, %prover, answered = %g.response.manifest_id, "prover answered with another model; failing over");
                    self.map
                        .lock()
                        .expect("map lock")
                        .distrust(&prover, crate::now_ms());
                    errors.push(format!(
                        "{prover}: answered with manifest {}",
                        g.response.manifest_id
                    ));
                }
                Ok(g) => {
                    match self.store_outputs(&job, &model, &g).await {
                        // The prover's fault: try another one.
                        Err(OutputError::BadVideo(e)) => {
                            tracing::warn!(job = %job.id, %prover, error = %e, "prover returned a video that does not decode; failing over");
                            self.map
                                .lock()
                                .expect("map lock")
                                .distrust(&prover, crate::now_ms());
                            errors.push(format!("{prover}: {e}"));
                            continue;
                        }
                        Ok(()) => {
                            let expires = now_s() + self.config.retention.as_secs() as i64;
                            let made = Provenance {
                                request_id: g.response.job_id.to_string(),
                                manifest_id: g.response.manifest_id.to_string(),
                                trace_root: g.response.trace_root.to_string(),
                                guidance_scale: model.manifest.defaults.guidance_scale,
                            };
                            if let Err(e) =
                                self.db
                                    .complete(&job.id, &prover.to_string(), expires, &made)
                            {
                                tracing::error!(job = %job.id, error = %e, "recording completion failed");
                            }
                            self.counters
                                .completed
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(OutputError::Io(e)) => {
                            tracing::error!(job = %job.id, error = %e, "storing outputs failed");
                            let _ = self.db.fail(&job.id, "storage_error", &e.to_string());
                        }
                    }
                    self.changed(&job.id);
                    return;
                }
                // Full: not a failure of the job, and the map now counts
                // that prover full; try another (each is tried once).
                Err(e @ CallError::Busy { .. }) => {
                    if let CallError::Busy {
                        backlog_ms: Some(_),
                        ..
                    } = e
                    {
                        late += 1;
                    }
                    tracing::debug!(job = %job.id, %prover, error = %e, "prover busy; trying another");
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, %prover, error = %e, "prover failed the job; failing over");
                    self.counters
                        .failovers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    errors.push(format!("{prover}: {e}"));
                }
            }
        }
        if errors.len() >= self.config.max_attempts as usize {
            let msg = format!("{} attempts failed: {}", errors.len(), errors.join("; "));
            let _ = self.db.fail(&job.id, "grid_error", &msg);
            self.counters
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if now_s() - job.created_at > self.config.queue_timeout.as_secs() as i64 {
            let _ = self.db.fail(
                &job.id,
                "no_capacity",
                "no prover could take the job before the queue timeout",
            );
            self.counters
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if started {
            // Every eligible prover failed it: back in the queue.
            let _ = self.db.requeue(&job.id);
        } else {
            // Nobody eligible yet; the dispatcher tries again shortly.
            return;
        }
        self.changed(&job.id);
    }

    /// Writes the MP4 and derives the GIF and thumbnail, each via a
    /// temporary file and a rename, so a crash never leaves half a file
    /// under a final name.
    async fn store_outputs(
        &self,
        job: &Job,
        model: &JobModel,
        g: &Generated,
    ) -> Result<(), OutputError> {
        let mp4 = g.response.content.0.clone();
        let dir = self.config.videos_dir();
        let id = job.id.clone();
        let fps = model.manifest.defaults.fps;
        let frames = job.spec.frames as usize;
        let (width, height) = (job.spec.width as usize, job.spec.height as usize);
        tokio::task::spawn_blocking(move || {
            let decoded = fractal_engine::io::video::decode_mp4(&mp4, frames)
                .map_err(|e| OutputError::BadVideo(format!("its MP4 does not decode: {e}")))?;
            if decoded.frames.len() != frames || (decoded.width, decoded.height) != (width, height)
            {
                return Err(OutputError::BadVideo(format!(
                    "its MP4 has {} frames of {}x{}, not {frames} of {width}x{height}",
                    decoded.frames.len(),
                    decoded.width,
                    decoded.height
                )));
            }
            let rgb: Vec<u8> = decoded.frames.concat();
            let f = fractal_engine::io::video::Frames {
                rgb: &rgb,
                width: decoded.width,
                height: decoded.height,
                count: decoded.frames.len(),
                fps,
            };
            let gif = fractal_engine::io::video::encode_gif(f)
                .map_err(|e| OutputError::BadVideo(e.to_string()))?;
            let png = fractal_engine::io::video::thumbnail_png(f)
                .map_err(|e| OutputError::BadVideo(e.to_string()))?;
            for (ext, bytes) in [("mp4", &mp4), ("gif", &gif), ("png", &png)] {
                let tmp = dir.join(format!("{id}.{ext}.tmp"));
                std::fs::write(&tmp, bytes)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, dir.join(format!("{id}.{ext}")))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| OutputError::Io(std::io::Error::other(e)))?
    }
}
