//! The prover (Bittensor miner): runs the pinned model for signed requests.
//!
//! Endpoints (all btauth/1-signed except `/metrics`):
//! * `POST /v1/generate` — a [`GenerateRequest`]; answers
//!   `application/x-ndjson`: [`StreamItem::Progress`] lines, then one
//!   `Result` (video + trace commitment + timing) or `Error`. The job is
//!   cancelled when the client goes away.
//! * `POST /v1/audit` — an [`AuditChallenge`] for a job committed within the
//!   audit window; answers the opened latents with Merkle paths.
//! * `GET /v1/info` — the models it serves, hotkey, queue depth and capacity.
//! * `GET /v1/manifests/{id}` — the manifest of a model it serves, as
//!   canonical JSON (open, and content-addressed: the reader hashes it).
//! * `GET /metrics` — Prometheus text (open: scrapers do not sign).
//!
//! A prover serves one or more models (manifests); a request names its
//! manifest, and one for a model it does not serve is refused with 404
//! `model_not_served`. It follows the subnet's model schedule
//! ([`Prover::follow_schedule`]): a model the schedule has retired is
//! unloaded, and it warns while it serves nothing the schedule pins.
//!
//! Admission: at most `max_concurrent` jobs run and `max_queued` wait;
//! beyond that the answer is 503 with `Retry-After`, never a longer queue.

pub mod backlog;
pub mod job;
pub mod traces;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use fractal_chain::{AxonInfo, Chain, ChainError, Metagraph};
use fractal_engine::PinnedModel;
use fractal_http::{ApiError, Authorizer, BtAuth, Caller, Denied};
use fractal_protocol::wire::{
    AuditAnswer, AuditChallenge, Base64Bytes, GenerateRequest, GenerateResponse, Phase,
    ProgressEvent, ServedModel, StreamItem, PROTOCOL_VERSION,
};
use fractal_protocol::{Hotkey, JobId, Keypair, ManifestId, ModelSchedule};
use tokio::sync::{mpsc, Semaphore};

use backlog::Backlog;
pub use job::Strategy;
use job::{JobError, StrategyState};
use traces::TraceStore;

#[derive(Clone, Debug)]
pub struct ProverConfig {
    /// Jobs generating at once (the engine already uses every core).
    pub max_concurrent: usize,
    /// Accepted jobs waiting for a slot.
    pub max_queued: usize,
    /// How long committed traces stay available for audits.
    pub audit_window: Duration,
    /// Memory for kept traces; the oldest go first beyond it.
    pub trace_budget_bytes: usize,
    pub strategy: Strategy,
}

impl Default for ProverConfig {
    fn default() -> Self {
        ProverConfig {
            max_concurrent: 1,
            max_queued: 8,
            audit_window: Duration::from_secs(600),
            trace_budget_bytes: 512 << 20,
            strategy: Strategy::Honest,
        }
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    rejected_busy: AtomicU64,
    rejected_late: AtomicU64,
    audits: AtomicU64,
    steps: AtomicU64,
}

pub struct Prover {
    key: Keypair,
    /// In the order given; never empty.
    models: RwLock<Vec<Arc<PinnedModel>>>,
    config: ProverConfig,
    slots: Arc<Semaphore>,
    /// Accepted and not finished (running + waiting).
    in_flight: AtomicUsize,
    running: AtomicUsize,
    /// The accepted jobs priced in time (`/v1/info`, `start_within_ms`).
    backlog: Mutex<Backlog>,
    traces: Mutex<TraceStore>,
    /// Jobs accepted and not yet committed, so a job id is never run twice.
    active: Mutex<BTreeSet<JobId>>,
    strategy_state: StrategyState,
    counters: Counters,
}

pub use fractal_protocol::wire::ProverInfo;

/// Why a prover cannot be set up with the models it was given.
#[derive(Debug, thiserror::Error)]
pub enum ProverError {
    #[error("a prover needs at least one model")]
    NoModel,
    #[error("manifest {0} is given twice")]
    Duplicate(ManifestId),
}

impl Prover {
    /// A prover of one model.
    pub fn new(key: Keypair, model: PinnedModel, config: ProverConfig) -> Arc<Self> {
        Self::serving(key, vec![model], config).expect("one model is a valid set")
    }

    /// A prover of every model in `models` (at least one, each once).
    pub fn serving(
        key: Keypair,
        models: Vec<PinnedModel>,
        config: ProverConfig,
    ) -> Result<Arc<Self>, ProverError> {
        if models.is_empty() {
            return Err(ProverError::NoModel);
        }
        for (i, m) in models.iter().enumerate() {
            if models[..i].iter().any(|o| o.manifest_id == m.manifest_id) {
                return Err(ProverError::Duplicate(m.manifest_id));
            }
        }
        Ok(Arc::new(Prover {
            key,
            models: RwLock::new(models.into_iter().map(Arc::new).collect()),
            slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            in_flight: AtomicUsize::new(0),
            backlog: Mutex::new(Backlog::new(config.max_concurrent)),
            running: AtomicUsize::new(0),
            traces: Mutex::new(TraceStore::new(
                config.audit_window,
                config.trace_budget_bytes,
            )),
            active: Mutex::new(BTreeSet::new()),
            strategy_state: StrategyState::default(),
            counters: Counters::default(),
            config,
        }))
    }

    pub fn hotkey(&self) -> Hotkey {
        self.key.hotkey()
    }

    /// The models it serves, in the order given.
    pub fn models(&self) -> Vec<Arc<PinnedModel>> {
        self.models.read().expect("models lock").clone()
    }

    /// The model pinned by `id`, if it serves it.
    pub fn model_for(&self, id: &ManifestId) -> Option<Arc<PinnedModel>> {
        self.models
            .read()
            .expect("models lock")
            .iter()
            .find(|m| &m.manifest_id == id)
            .cloned()
    }

    /// Stops serving `id` and frees it once its running jobs end (they hold
    /// their own reference). The last model is never unloaded: a prover
    /// serving nothing could not even say what it is. Returns whether it
    /// was unloaded.
    pub fn unload(&self, id: &ManifestId) -> bool {
        let mut models = self.models.write().expect("models lock");
        if models.len() < 2 {
            return false;
        }
        let before = models.len();
        models.retain(|m| &m.manifest_id != id);
        models.len() < before
    }

    /// Applies the schedule at `block`: unloads what it has retired, and
    /// says whether anything loaded is served (`None` when the schedule
    /// pins nothing, so whatever the prover was started with is right).
    pub fn apply_schedule(&self, schedule: &ModelSchedule, block: u64) -> Option<bool> {
        if !schedule.pins_anything_at(block) {
            return None;
        }
        for m in self.models() {
            let retired = schedule
                .state(&m.manifest_id, block)
                .is_some_and(|s| s == fractal_protocol::ModelState::Retired);
            if retired && self.unload(&m.manifest_id) {
                tracing::info!(manifest = %m.manifest_id, model = %m.manifest.name, block, "the schedule retired this model: unloaded");
            }
        }
        Some(self.models().iter().any(|m| {
            schedule
                .state(&m.manifest_id, block)
                .is_some_and(|s| s.is_served())
        }))
    }

    /// Follows the chain's model schedule (see [`Prover::apply_schedule`]),
    /// warning while this prover serves nothing the subnet pins.
    pub fn follow_schedule(
        self: &Arc<Self>,
        chain: Arc<dyn Chain>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        let warned = Arc::new(AtomicBool::new(false));
        follow_chain(chain, every, move |chain| {
            let (me, warned) = (me.clone(), warned.clone());
            async move {
                match (chain.block().await, chain.model_schedule().await) {
                    (Ok(block), Ok(schedule)) => {
                        let serves = me.apply_schedule(&schedule, block);
                        // Once each time it starts serving nothing pinned.
                        let none = serves == Some(false);
                        let was = warned.swap(none, Ordering::Relaxed);
                        if none && !was {
                            let pinned: Vec<String> = schedule
                                .served_at(block)
                                .iter()
                                .map(|(id, _)| id.to_string())
                                .collect();
                            tracing::warn!(block, pinned = ?pinned, "this prover serves none of the models the subnet's schedule pins: it earns nothing until it is restarted with one");
                        }
                        Turn::Done(block)
                    }
                    (_, Err(ChainError::Unsupported(why))) => {
                        tracing::info!("not following a model schedule: {why}");
                        Turn::Stop
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        // Keep what is loaded.
                        tracing::warn!(error = %e, "model schedule refresh failed");
                        Turn::Retry
                    }
                }
            }
        })
    }

    pub fn info(&self) -> ProverInfo {
        let running = self.running.load(Ordering::Relaxed);
        let models = self.models();
        let (backlog_ms, ms_per_frame_step) = {
            let b = self.backlog.lock().expect("backlog lock");
            (b.ms(Instant::now()).map(|ms| ms.round() as u64), b.speed())
        };
        ProverInfo {
            version: PROTOCOL_VERSION,
            hotkey: self.hotkey(),
            manifest_id: models[0].manifest_id,
            model: models[0].manifest.name.clone(),
            models: models
                .iter()
                .map(|m| ServedModel {
                    manifest_id: m.manifest_id,
                    name: m.manifest.name.clone(),
                })
                .collect(),
            running,
            queued: self
                .in_flight
                .load(Ordering::Relaxed)
                .saturating_sub(running),
            max_concurrent: self.config.max_concurrent,
            max_queued: self.config.max_queued,
            audit_window_s: self.config.audit_window.as_secs(),
            backlog_ms,
            ms_per_frame_step,
        }
    }

    fn metrics_text(&self) -> String {
        let c = &self.counters;
        let info = self.info();
        let traces = self.traces.lock().expect("trace store lock");
        let lines = [
            (
                "fractal_prover_jobs_accepted_total",
                c.accepted.load(Ordering::Relaxed) as f64,
            ),
            (
                "fractal_prover_jobs_completed_total",
                c.completed.load(Ordering::Relaxed) as f64,
            ),
            (
                "fractal_prover_jobs_failed_total",
                c.failed.load(Ordering::Relaxed) as f64,
            ),
            (
                "fractal_prover_jobs_cancelled_total",
                c.cancelled.load(Ordering::Relaxed) as f64,
            ),
            (
                "fractal_prover_jobs_rejected_busy_total",
                c.rejected_busy.load(Ordering::Relaxed) as f64,
            ),
            (
                "fractal_prover_jobs_rejected_queue_too_long_total",
                c.rejected_late.load(Ordering::Relaxed) as f64,
            ),
            (
                "fractal_prover_audits_total",
                c.audits.load(Ordering::Relaxed) as f64,
            ),
            (
                "fractal_prover_denoise_steps_total",
                c.steps.load(Ordering::Relaxed) as f64,
            ),
            ("fractal_prover_jobs_running", info.running as f64),
            ("fractal_prover_jobs_queued", info.queued as f64),
            ("fractal_prover_traces_kept", traces.len() as f64),
            ("fractal_prover_trace_bytes", traces.bytes_used() as f64),
        ];
        let mut out = String::new();
        for (name, value) in lines {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            out.push_str(&format!("# TYPE {name} {kind}\n{name} {value}\n"));
        }
        out
    }
}

/// Admits validators that hold a permit on the chain, plus fixed hotkeys
/// (the gateway's); refreshed from the metagraph.
pub struct ValidatorAuthorizer {
    fixed: BTreeSet<Hotkey>,
    validators: RwLock<BTreeSet<Hotkey>>,
}

impl ValidatorAuthorizer {
    pub fn new(fixed: impl IntoIterator<Item = Hotkey>) -> Arc<Self> {
        Arc::new(ValidatorAuthorizer {
            fixed: fixed.into_iter().collect(),
            validators: RwLock::new(BTreeSet::new()),
        })
    }

    pub fn update(&self, mg: &Metagraph) {
        let set = mg
            .neurons
            .iter()
            .filter(|n| n.validator_permit)
            .map(|n| n.hotkey)
            .collect();
        *self.validators.write().expect("authorizer lock") = set;
    }

    /// Follows the chain: refreshes after every new block (or `every`).
    pub fn spawn_refresh(
        self: &Arc<Self>,
        chain: Arc<dyn Chain>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        follow_chain(chain, every, move |chain| {
            let me = me.clone();
            async move {
                match chain.metagraph().await {
                    Ok(mg) => {
                        me.update(&mg);
                        Turn::Done(mg.block)
                    }
                    Err(e) => {
                        // Keep the last known validators.
                        tracing::warn!(error = %e, "metagraph refresh failed");
                        Turn::Retry
                    }
                }
            }
        })
    }
}

/// What one turn of a chain-following loop came to.
enum Turn {
    /// Done as of this block: the next turn waits for a later one.
    Done(u64),
    /// Failed: try again after a short pause (waiting for a block after an
    /// old one would return at once and spin).
    Retry,
    /// Nothing to follow on this chain.
    Stop,
}

/// Runs `turn` once per new block, at most `every` apart, until it says
/// stop; failed turns and block waits retry after a short pause.
fn follow_chain<F, Fut>(
    chain: Arc<dyn Chain>,
    every: Duration,
    turn: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Arc<dyn Chain>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Turn> + Send + 'static,
{
    let pause = every.min(Duration::from_secs(2));
    tokio::spawn(async move {
        loop {
            let last = match turn(chain.clone()).await {
                Turn::Done(block) => block,
                Turn::Retry => {
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Turn::Stop => return,
            };
            if chain.wait_for_block_after(last, every).await.is_err() {
                tokio::time::sleep(pause).await;
            }
        }
    })
}

impl Authorizer for ValidatorAuthorizer {
    fn authorize(&self, hotkey: &Hotkey) -> Result<(), Denied> {
        if self.fixed.contains(hotkey)
            || self
                .validators
                .read()
                .expect("authorizer lock")
                .contains(hotkey)
        {
            Ok(())
        } else {
            Err(Denied(format!(
                "hotkey {hotkey} is not a validator with a permit on this subnet"
            )))
        }
    }
}

/// Registers this prover's endpoint on the chain.
pub async fn announce(
    chain: &dyn Chain,
    key: &Keypair,
    addr: std::net::SocketAddr,
) -> Result<(), ChainError> {
    chain
        .serve_axon(
            key,
            AxonInfo {
                ip: addr.ip(),
                port: addr.port(),
                version: PROTOCOL_VERSION,
            },
        )
        .await
}

/// The largest request body: a generate request is well under this.
const MAX_BODY: usize = 64 * 1024;

pub fn router(prover: Arc<Prover>, authorizer: Arc<dyn Authorizer>) -> Router {
    let auth = BtAuth::new(prover.hotkey(), authorizer).with_max_body(MAX_BODY);
    let signed = Router::new()
        .route("/v1/generate", post(generate))
        .route("/v1/audit", post(audit))
        .route("/v1/info", get(info))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            fractal_http::auth::require_btauth,
        ));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/manifests/{id}", get(manifest))
        .merge(signed)
        .fallback(|| async { ApiError::not_found("no such prover endpoint") })
        .with_state(prover)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("request body: {e}")))
}

async fn info(State(p): State<Arc<Prover>>) -> Json<ProverInfo> {
    Json(p.info())
}

async fn manifest(
    State(p): State<Arc<Prover>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: ManifestId = id.parse().map_err(|e| {
        ApiError::bad_request("bad_manifest_id", format!("manifest id {id:?}: {e}"))
    })?;
    let m = p
        .model_for(&id)
        .ok_or_else(|| ApiError::not_found(format!("this prover does not serve manifest {id}")))?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        m.manifest.canonical_bytes(),
    )
        .into_response())
}

async fn metrics(State(p): State<Arc<Prover>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        p.metrics_text(),
    )
}

/// Releases a job's admission when the job ends, however it ends.
struct Admission {
    prover: Arc<Prover>,
    job: JobId,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.prover
            .backlog
            .lock()
            .expect("backlog lock")
            .finish(&self.job, None);
        self.prover.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.prover
            .active
            .lock()
            .expect("active jobs lock")
            .remove(&self.job);
    }
}

fn line(item: &StreamItem) -> Bytes {
    let mut v = serde_json::to_vec(item).expect("stream items serialise");
    v.push(b'\n');
    Bytes::from(v)
}

async fn generate(
    State(p): State<Arc<Prover>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: GenerateRequest = parse(&body)?;
    let model = p.model_for(&req.manifest_id).ok_or_else(|| {
        let served: Vec<String> = p
            .models()
            .iter()
            .map(|m| m.manifest_id.to_string())
            .collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_served",
            format!(
                "this prover does not serve manifest {}; it serves {}",
                req.manifest_id,
                served.join(", ")
            ),
        )
    })?;
    let spec = model
        .spec(&req)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))?;
    let job = req.job_id;
    {
        let now = Instant::now();
        let mut active = p.active.lock().expect("active jobs lock");
        if active.contains(&job)
            || p.traces
                .lock()
                .expect("trace store lock")
                .contains(&job, now)
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "duplicate_job",
                format!("job {job} was already submitted"),
            ));
        }
        let capacity = p.config.max_concurrent + p.config.max_queued;
        if p.in_flight.load(Ordering::Acquire) >= capacity {
            p.counters.rejected_busy.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!("{capacity} jobs already accepted; try later or another prover"),
            )
            .with_retry_after(estimated_wait_s(&p)));
        }
        let mut backlog = p.backlog.lock().expect("backlog lock");
        if let Some(within) = req.start_within_ms {
            let ahead = backlog.ms(now);
            if ahead.is_some_and(|ms| ms > within as f64) {
                p.counters.rejected_late.fetch_add(1, Ordering::Relaxed);
                let ahead = ahead.map(|ms| ms.round() as u64);
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_too_long",
                    format!(
                        "this prover holds about {} ms of work, more than the {within} ms the request may wait; try another prover",
                        ahead.unwrap_or_default()
                    ),
                )
                .with_retry_after(estimated_wait_s(&p))
                .with_backlog_ms(ahead));
            }
        }
        backlog.accept(
            job,
            backlog::units(req.size.width, req.size.height, req.frames, req.steps),
        );
        p.in_flight.fetch_add(1, Ordering::AcqRel);
        active.insert(job);
    }
    p.counters.accepted.fetch_add(1, Ordering::Relaxed);
    let admission = Admission {
        prover: p.clone(),
        job,
    };
    tracing::debug!(%job, caller = %caller.hotkey, steps = req.steps, "job accepted");

    // Bounded: progress lines beyond this are dropped rather than buffered.
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let queued_at = Instant::now();
    tokio::spawn(async move {
        let position = p.in_flight.load(Ordering::Relaxed).saturating_sub(1) as u32;
        let total = req.steps;
        let _ = tx
            .send(line(&StreamItem::Progress(ProgressEvent {
                job_id: job,
                phase: Phase::Queued,
                step: 0,
                total,
                queue_position: Some(position),
            })))
            .await;
        let permit = tokio::select! {
            permit = p.slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
            _ = tx.closed() => {
                p.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let queue_ms = queued_at.elapsed().as_millis() as u64;
        p.backlog
            .lock()
            .expect("backlog lock")
            .start(&job, Instant::now());
        p.running.fetch_add(1, Ordering::AcqRel);
        let worker = p.clone();
        let job_model = model.clone();
        let progress_tx = tx.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut on_step = |step: u32| {
                worker.counters.steps.fetch_add(1, Ordering::Relaxed);
                let item = StreamItem::Progress(ProgressEvent {
                    job_id: job,
                    phase: Phase::Denoising,
                    step,
                    total,
                    queue_position: None,
                });
                // A full channel drops a progress line; a closed one cancels.
                !matches!(
                    progress_tx.try_send(line(&item)),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            };
            job::run(
                &job_model,
                &req,
                &spec,
                &worker.config.strategy,
                &worker.strategy_state,
                &mut on_step,
            )
            .map(|produced| (req, produced))
        })
        .await;
        p.running.fetch_sub(1, Ordering::AcqRel);
        drop(permit);
        let item = match result {
            Ok(Ok((req, produced))) => {
                p.traces.lock().expect("trace store lock").insert(
                    job,
                    produced.audit_trace,
                    Instant::now(),
                );
                p.counters.completed.fetch_add(1, Ordering::Relaxed);
                let t = &produced.timing;
                p.backlog.lock().expect("backlog lock").finish(
                    &job,
                    Some((t.denoise_ms + t.decode_ms + t.encode_ms) as f64),
                );
                let mut timing = produced.timing;
                timing.queue_ms = queue_ms;
                StreamItem::Result(Box::new(GenerateResponse {
                    version: PROTOCOL_VERSION,
                    job_id: job,
                    manifest_id: model.manifest_id,
                    trace_root: produced.root,
                    trace_len: produced.trace_len,
                    output: req.output,
                    content: Base64Bytes(produced.content),
                    timing,
                }))
            }
            Ok(Err(JobError::Cancelled)) => {
                p.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%job, "job cancelled by the client");
                return;
            }
            Ok(Err(e)) => {
                p.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%job, error = %e, "job failed");
                StreamItem::Error {
                    code: "generation_failed".into(),
                    message: e.to_string(),
                }
            }
            Err(e) => {
                p.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%job, error = %e, "job panicked");
                StreamItem::Error {
                    code: "internal".into(),
                    message: "the job crashed".into(),
                }
            }
        };
        drop(admission);
        let _ = tx.send(line(&item)).await;
    });

    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Rough seconds until a slot frees up, for `Retry-After`.
fn estimated_wait_s(p: &Prover) -> u64 {
    let queued = p.in_flight.load(Ordering::Relaxed) as u64;
    (queued / p.config.max_concurrent.max(1) as u64).clamp(1, 60)
}

async fn audit(
    State(p): State<Arc<Prover>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<AuditAnswer>, ApiError> {
    let challenge: AuditChallenge = parse(&body)?;
    let mut traces = p.traces.lock().expect("trace store lock");
    let trace = traces
        .get(&challenge.job_id, Instant::now())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no committed trace for job {} (unknown, unfinished or past the audit window)",
                challenge.job_id
            ))
        })?;
    let answer = trace
        .open(&challenge)
        .map_err(|e| ApiError::bad_request("invalid_audit", e.to_string()))?;
    p.counters.audits.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(job = %challenge.job_id, caller = %caller.hotkey, leaves = ?challenge.leaves, "audit answered");
    Ok(Json(answer))
}

/// Serves `prover` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    prover: Arc<Prover>,
    authorizer: Arc<dyn Authorizer>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(prover, authorizer))
        .with_graceful_shutdown(shutdown)
        .await
}
