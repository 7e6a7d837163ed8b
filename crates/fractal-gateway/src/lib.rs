//! The gateway: where apps and people reach the grid (DESIGN.md section 7).
//!
//! * An OpenAI-compatible Videos API (`POST/GET/DELETE /v1/videos…`) with
//!   Bearer API keys, per-key rate limits and quotas ([`db`], [`limits`],
//!   [`openai`]).
//! * Durable jobs: a job is in SQLite before the client hears it was
//!   accepted; jobs running when the gateway stopped are re-queued at
//!   start-up and, the seed being fixed at acceptance, regenerate the same
//!   video.
//! * Routing onto the grid through the map ([`fractal_router`]): RTT probes
//!   of every prover, learned speeds, hedging and failover ([`dispatch`]).
//! * The grid's models ([`models`]): those the chain's schedule serves now
//!   (`GET /v1/models`); a job is accepted for one of them and only ever
//!   made by it, on provers that serve it.
//! * Live progress over SSE, the map as JSON (`GET /v1/grid`) and a web page.
//! * Content credentials: every file served carries a C2PA manifest of how
//!   it was made ([`credentials`]).

pub mod credentials;
pub mod db;
pub mod dispatch;
pub mod limits;
pub mod models;
pub mod openai;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fractal_chain::NeuronInfo;
use fractal_engine::PinnedModel;
use fractal_router::{Admission, GridMap, Load, MapStore, RouterConfig, Work};
use fractal_verifier::client::CallError;
use fractal_verifier::Verifier;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, Notify};

use db::{now_s, ApiKey, Db, Job, Status};
use openai::{Fields, OaiError, Video};

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// `gateway.sqlite`, `map.sqlite` and `videos/` live here.
    pub data_dir: PathBuf,
    /// How long finished videos are kept.
    pub retention: Duration,
    /// Jobs running on the grid at once (the rest wait, durable, in order).
    pub max_running: usize,
    /// Provers tried per job before it fails.
    pub max_attempts: u32,
    pub probe_every: Duration,
    /// A job nobody could take for this long fails with `no_capacity`.
    pub queue_timeout: Duration,
    pub max_body_bytes: usize,
    pub router: RouterConfig,
    /// The certificate content credentials are signed with.
    pub certificate: credentials::CertificateSource,
}

impl GatewayConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        GatewayConfig {
            data_dir,
            retention: Duration::from_secs(24 * 3600),
            max_running: 32,
            max_attempts: 4,
            probe_every: Duration::from_secs(2),
            queue_timeout: Duration::from_secs(600),
            max_body_bytes: 1 << 20,
            router: RouterConfig::default(),
            certificate: credentials::CertificateSource::default(),
        }
    }
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("gateway.sqlite")
    }
    pub fn videos_dir(&self) -> PathBuf {
        self.data_dir.join("videos")
    }
    fn map_path(&self) -> PathBuf {
        self.data_dir.join("map.sqlite")
    }
}

#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub failovers: AtomicU64,
    pub hedges: AtomicU64,
    /// New jobs refused because the grid was saturated.
    pub shed: AtomicU64,
}

pub struct Gateway {
    pub config: GatewayConfig,
    pub db: Db,
    verifier: Arc<Verifier>,
    model: Arc<PinnedModel>,
    /// The models the grid offers and who serves which (updated by probes).
    catalog: Mutex<models::Catalog>,
    issuer: Arc<fractal_credentials::Issuer>,
    map: Arc<Mutex<GridMap>>,
    map_store: Mutex<MapStore>,
    /// Provers from the last metagraph read.
    provers: Mutex<Vec<NeuronInfo>>,
    limiter: limits::RateLimiter,
    /// Job tasks of this process, by job id.
    running: Mutex<BTreeMap<String, tokio::task::AbortHandle>>,
    wake: Notify,
    /// Job ids whose row changed (SSE listeners re-read them).
    changes: broadcast::Sender<String>,
    progress_tx: mpsc::UnboundedSender<(String, u32, String)>,
    progress_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, u32, String)>>>,
    pub counters: Counters,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Map(#[from] fractal_router::MapStoreError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("content credentials: {0}")]
    Credentials(#[from] fractal_credentials::CredentialError),
}

/// Wall-clock ms: the map's clock (persisted, so it must survive restarts).
pub(crate) fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

impl Gateway {
    /// Opens (or creates) the gateway's stores under `config.data_dir` and
    /// re-queues jobs a previous run left unfinished.
    pub fn open(
        config: GatewayConfig,
        verifier: Arc<Verifier>,
        model: Arc<PinnedModel>,
    ) -> Result<Arc<Self>, GatewayError> {
        let videos = config.videos_dir();
        std::fs::create_dir_all(&videos)
            .map_err(|e| GatewayError::Io(videos.display().to_string(), e))?;
        let db = Db::open(&config.db_path())?;
        let resumed = db.requeue_unfinished()?;
        if resumed > 0 {
            tracing::info!(resumed, "jobs from the previous run are queued again");
        }
        let issuer = credentials::open_issuer(&config.certificate, &config.data_dir, &verifier)?;
        let map_store = MapStore::open(&config.map_path())?;
        let map = map_store.load(config.router.clone(), rand::random())?;
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Gateway {
            db,
            verifier,
            catalog: Mutex::new(models::Catalog::new(
                model.manifest_id,
                model.manifest.clone(),
            )),
            model,
            issuer: Arc::new(issuer),
            map: Arc::new(Mutex::new(map)),
            map_store: Mutex::new(map_store),
            provers: Mutex::new(Vec::new()),
            limiter: limits::RateLimiter::default(),
            running: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            changes: broadcast::channel(1024).0,
            progress_tx,
            progress_rx: Mutex::new(Some(progress_rx)),
            counters: Counters::default(),
            config,
        }))
    }

    /// The model this gateway was started with.
    pub fn model(&self) -> &PinnedModel {
        &self.model
    }

    /// The models an app may ask for now, the default first.
    pub fn offered(&self) -> Vec<models::OfferedModel> {
        self.catalog.lock().expect("catalog lock").offered()
    }

    /// The manifest of a known model.
    pub(crate) fn manifest_of(
        &self,
        id: &fractal_protocol::ManifestId,
    ) -> Option<Arc<fractal_protocol::ModelManifest>> {
        self.catalog.lock().expect("catalog lock").manifest(id)
    }

    /// `id`'s document from the first prover that says it serves it.
    async fn manifest_from_provers(
        &self,
        id: &fractal_protocol::ManifestId,
    ) -> Result<fractal_protocol::ModelManifest, String> {
        let serving = self
            .catalog
            .lock()
            .expect("catalog lock")
            .provers_serving(id);
        let neurons = self.provers.lock().expect("provers lock").clone();
        let mut errors = vec!["the chain holds no manifest documents".to_string()];
        for n in neurons.iter().filter(|n| serving.contains(&n.hotkey)) {
            match self
                .verifier
                .client()
                .manifest(
                    &fractal_verifier::axon_url(n),
                    &n.hotkey,
                    id,
                    Duration::from_secs(5),
                )
                .await
            {
                Ok(m) => return Ok(m),
                Err(e) => errors.push(format!("{}: {e}", n.hotkey)),
            }
        }
        if serving.is_empty() {
            errors.push("no prover says it serves it yet".into());
        }
        Err(errors.join("; "))
    }

    /// Reads the chain's model schedule and the documents of scheduled
    /// models not known here yet (the chain checks each hashes to its id).
    async fn follow_schedule(&self, block: u64) {
        let chain = self.verifier.chain().clone();
        let schedule = match chain.model_schedule().await {
            Ok(s) => s,
            // A chain without schedules: the gateway's own model throughout.
            Err(fractal_chain::ChainError::Unsupported(_)) => return,
            Err(e) => {
                tracing::warn!(error = %e, "model schedule unavailable; offering the models of the last read");
                return;
            }
        };
        let missing = {
            let mut c = self.catalog.lock().expect("catalog lock");
            c.set_schedule(schedule, block);
            c.missing()
        };
        for id in missing {
            let why = match chain.manifest(&id).await {
                Ok(Some(m)) => {
                    self.catalog.lock().expect("catalog lock").learn(id, m);
                    continue;
                }
                // Chains that keep no documents (subtensor): from a prover
                // that serves it, checked against its id.
                Ok(None) => match self.manifest_from_provers(&id).await {
                    Ok(m) => {
                        self.catalog.lock().expect("catalog lock").learn(id, m);
                        continue;
                    }
                    Err(e) => e,
                },
                Err(e) => e.to_string(),
            };
            if self.catalog.lock().expect("catalog lock").unreadable(id) {
                tracing::warn!(manifest = %id, error = %why, "the schedule names a manifest this gateway cannot read; not offered until it can");
            }
        }
    }

    fn changed(&self, id: &str) {
        let _ = self.changes.send(id.to_string());
    }

    fn default_work(&self) -> Work {
        let d = &self.model.manifest.defaults;
        Work {
            width: d.size.width,
            height: d.size.height,
            frames: d.frames,
            steps: d.steps,
        }
    }

    /// The map as `GET /v1/grid` serves it.
    pub fn grid(&self) -> Value {
        let snapshot = self
            .map
            .lock()
            .expect("map lock")
            .snapshot(&self.default_work(), now_ms());
        let uids: BTreeMap<String, u16> = self
            .provers
            .lock()
            .expect("provers lock")
            .iter()
            .map(|n| (n.hotkey.to_string(), n.uid))
            .collect();
        let mut v = serde_json::to_value(&snapshot).expect("snapshot serialises");
        if let Some(nodes) = v["nodes"].as_array_mut() {
            for n in nodes {
                let uid = n["hotkey"].as_str().and_then(|h| uids.get(h)).copied();
                n["uid"] = serde_json::json!(uid);
            }
        }
        let catalog = self.catalog.lock().expect("catalog lock");
        if let Some(nodes) = v["nodes"].as_array_mut() {
            for n in nodes {
                let serving = n["hotkey"]
                    .as_str()
                    .and_then(|h| h.parse::<fractal_protocol::Hotkey>().ok())
                    .and_then(|h| catalog.serving().get(&h).cloned())
                    .unwrap_or_default();
                n["models"] =
                    serde_json::json!(serving.iter().map(|m| m.to_string()).collect::<Vec<_>>());
            }
        }
        let offered = catalog.offered();
        let default = offered.first();
        let models: Vec<Value> = offered
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.manifest.name,
                    "manifest_id": m.manifest_id.to_string(),
                    "state": m.state.name(),
                    "provers": catalog
                        .provers_serving(&m.manifest_id)
                        .iter()
                        .map(|h| h.to_string())
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "object": "grid",
            // The default model for new jobs.
            "model": default.map(|m| m.manifest.name.clone()),
            "manifest_id": default.map(|m| m.manifest_id.to_string()),
            "models": models,
            "gateway": { "hotkey": self.verifier.hotkey().to_string(), "coord": v["me"] },
            "nodes": v["nodes"],
        })
    }

    /// Reads the metagraph, probes every prover (RTT and queue), and takes
    /// the verifier's current weights into the map.
    async fn probe(&self) {
        let chain = self.verifier.chain().clone();
        let mg = match chain.metagraph().await {
            Ok(mg) => mg,
            Err(e) => {
                tracing::warn!(error = %e, "metagraph unavailable; routing on the last one");
                return;
            }
        };
        self.follow_schedule(mg.block).await;
        let provers = self.verifier.provers(&mg);
        self.catalog
            .lock()
            .expect("catalog lock")
            .retain_provers(&provers.iter().map(|n| n.hotkey).collect());
        self.map.lock().expect("map lock").sync(
            provers
                .iter()
                .map(|n| (n.hotkey, Some(fractal_verifier::axon_url(n)))),
        );
        *self.provers.lock().expect("provers lock") = provers.clone();
        let client = self.verifier.client();
        let timeout = self.config.probe_every.max(Duration::from_secs(1));
        let probes = provers.iter().map(|n| async move {
            let base = fractal_verifier::axon_url(n);
            (n.hotkey, client.info(&base, &n.hotkey, timeout).await)
        });
        for (hk, r) in futures_util::future::join_all(probes).await {
            if let Ok((info, _)) = &r {
                self.catalog
                    .lock()
                    .expect("catalog lock")
                    .set_serving(hk, info.manifest_ids());
            }
            let mut map = self.map.lock().expect("map lock");
            match r {
                Ok((info, rtt)) => map.observe_rtt(
                    &hk,
                    rtt.as_secs_f64() * 1000.0,
                    Some(Load {
                        jobs: (info.running + info.queued) as u32,
                        slots: info.max_concurrent as u32,
                        capacity: (info.max_concurrent + info.max_queued) as u32,
                        backlog_ms: info.backlog_ms.map(|ms| ms as f64),
                        ms_per_frame_step: info.ms_per_frame_step,
                    }),
                    now_ms(),
                ),
                // Down or unreachable: keep jobs away until it answers again.
                Err(e @ (CallError::Transport(_) | CallError::Timeout(_))) => {
                    tracing::debug!(prover = %hk, error = %e, "probe failed");
                    map.unreachable(&hk, now_ms());
                }
                // It answered, but refused or garbled: jobs will show
                // whether it serves us (e.g. before our validator permit).
                Err(e) => tracing::debug!(prover = %hk, error = %e, "probe refused"),
            }
        }
        match self.verifier.standings().await {
            Ok(weights) => {
                let mut map = self.map.lock().expect("map lock");
                // A prover not audited under a served model yet keeps its
                // last verdict: unknown is not bad.
                for s in weights {
                    if let Some(score) = s.score {
                        map.set_verdict(&s.hotkey, score, s.passed, s.failed);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "verifier scores unavailable"),
        }
    }

    fn save_map(&self) {
        let map = self.map.lock().expect("map lock").clone();
        if let Err(e) = self
            .map_store
            .lock()
            .expect("map store lock")
            .save(&map, now_ms() as u64)
        {
            tracing::warn!(error = %e, "saving the map failed");
        }
    }

    /// Starts queued jobs while there is room.
    fn dispatch(self: &Arc<Self>) {
        let mut running = self.running.lock().expect("running lock");
        running.retain(|_, h| !h.is_finished());
        let room = self.config.max_running.saturating_sub(running.len());
        if room == 0 {
            return;
        }
        let queued = match self.db.queued((room + running.len()) as u32) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = %e, "reading the queue failed");
                return;
            }
        };
        let fresh: Vec<Job> = queued
            .into_iter()
            .filter(|j| !running.contains_key(&j.id))
            .take(room)
            .collect();
        for job in fresh {
            let me = self.clone();
            let id = job.id.clone();
            let task = tokio::spawn(async move {
                me.clone().run_job(job).await;
                me.wake.notify_one();
            });
            running.insert(id, task.abort_handle());
        }
    }

    /// Deletes the files of videos past their retention; their `content`
    /// answers 410 from then on.
    pub fn sweep_expired(&self) {
        let Ok(ids) = self.db.expiring(now_s()) else {
            return;
        };
        for id in ids {
            for file in credentials::files_of(&self.config.videos_dir(), &id) {
                let _ = std::fs::remove_file(file);
            }
            if let Err(e) = self.db.mark_expired(&id) {
                tracing::warn!(error = %e, "marking a video expired failed");
            }
        }
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<ApiKey, OaiError> {
        let unauthorized = |code, msg: &str| {
            OaiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", code, msg)
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "missing_api_key",
                "You didn't provide an API key. Send it as 'Authorization: Bearer fk-…'.",
            ));
        };
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if secret.is_empty() || secret.len() > 200 {
            return Err(unauthorized(
                "invalid_api_key",
                "Malformed Authorization header.",
            ));
        }
        let key = self
            .db
            .key_by_secret(secret)?
            .ok_or_else(|| unauthorized("invalid_api_key", "Incorrect API key provided."))?;
        self.limiter
            .take(&key.id, "request", key.limits.requests_per_min)
            .map_err(|wait| {
                OaiError::rate_limited(
                    "rate_limit_exceeded",
                    format!(
                        "Rate limit reached for {} requests per minute.",
                        key.limits.requests_per_min
                    ),
                    wait,
                )
            })?;
        Ok(key)
    }

    fn owned_job(&self, key: &ApiKey, id: &str) -> Result<Job, OaiError> {
        match self.db.job(id)? {
            Some(j) if j.key_id == key.id => Ok(j),
            // Someone else's job is as invisible as a missing one.
            _ => Err(OaiError::not_found(&format!("Video {id:?}"))),
        }
    }
}

/// Serves the gateway on `listener` until `shutdown`, with its background
/// work (dispatching, probing, progress, retention).
pub async fn serve(
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    // Dispatcher.
    {
        let gw = gw.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                gw.dispatch();
                tokio::select! {
                    _ = gw.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    // Prober, map persistence and retention.
    {
        let gw = gw.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick: u64 = 0;
            loop {
                gw.probe().await;
                if tick.is_multiple_of(5) {
                    gw.save_map();
                    gw.sweep_expired();
                }
                tick += 1;
                gw.wake.notify_one();
                tokio::select! {
                    _ = tokio::time::sleep(gw.config.probe_every) => {}
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    // Progress writer.
    if let Some(mut rx) = gw.progress_rx.lock().expect("progress lock").take() {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((id, pct, prover)) = rx.recv().await {
                if let Err(e) = gw.db.set_progress(&id, pct, &prover) {
                    tracing::warn!(error = %e, "recording progress failed");
                }
                gw.changed(&id);
            }
        }));
    }
    let app = router(gw.clone());
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop_tx.send(true);
    // Jobs still running stay `in_progress` in the database and are
    // re-queued by the next start; their requests are dropped here.
    for (_, h) in std::mem::take(&mut *gw.running.lock().expect("running lock")) {
        h.abort();
    }
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    gw.save_map();
    result
}

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/v1/videos", get(list_videos).post(create_video))
        .route("/v1/videos/{id}", get(get_video).delete(delete_video))
        .route("/v1/videos/{id}/content", get(video_content))
        .route("/v1/videos/{id}/events", get(video_events))
        .route("/v1/grid", get(grid))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/metrics", get(metrics))
        .fallback(|| async { OaiError::not_found("This route") })
        .method_not_allowed_fallback(|| async {
            OaiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "Method not allowed for this route",
            )
        })
        .with_state(gw)
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// The body, bounded; anything larger is refused with 413 before parsing.
async fn read_fields(gw: &Gateway, req: Request) -> Result<Fields, OaiError> {
    let too_large = || {
        OaiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("Request body exceeds {} bytes", gw.config.max_body_bytes),
        )
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = axum::body::to_bytes(req.into_body(), gw.config.max_body_bytes)
        .await
        .map_err(|_| too_large())?;
    parse_body(&content_type, bytes).await
}

/// A create request's fields from its body (JSON object or multipart
/// form), given the request's `Content-Type`. Files in a multipart form are
/// counted, not kept: the Videos API's `input_reference` is not supported.
pub async fn parse_body(content_type: &str, bytes: axum::body::Bytes) -> Result<Fields, OaiError> {
    // Media types are case-insensitive; the multipart boundary is not.
    let media_type = content_type.to_ascii_lowercase();
    if media_type.starts_with("application/json") {
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            OaiError::invalid(
                None,
                "invalid_json",
                format!("We could not parse the JSON body: {e}"),
            )
        })?;
        match v {
            Value::Object(m) => Ok(m.into_iter().collect()),
            _ => Err(OaiError::invalid(
                None,
                "invalid_json",
                "The JSON body must be an object",
            )),
        }
    } else if media_type.starts_with("multipart/form-data") {
        let req = Request::builder()
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(bytes))
            .map_err(|_| OaiError::invalid(None, "invalid_multipart", "bad Content-Type"))?;
        let mut form = axum::extract::Multipart::from_request(req, &())
            .await
            .map_err(|e| OaiError::invalid(None, "invalid_multipart", e.body_text()))?;
        let mut fields = Fields::new();
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| OaiError::invalid(None, "invalid_multipart", e.body_text()))?
        {
            let name = field.name().unwrap_or("").to_string();
            let is_file = field.file_name().is_some();
            let data = field
                .bytes()
                .await
                .map_err(|e| OaiError::invalid(None, "invalid_multipart", e.body_text()))?;
            let value = if is_file {
                Value::String(format!("<file of {} bytes>", data.len()))
            } else {
                Value::String(String::from_utf8(data.to_vec()).map_err(|_| {
                    OaiError::invalid(
                        None,
                        "invalid_multipart",
                        format!("field {name:?} is not UTF-8"),
                    )
                })?)
            };
            fields.insert(name, value);
        }
        Ok(fields)
    } else {
        Err(OaiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "Send application/json or multipart/form-data",
        ))
    }
}

fn video_json(job: &Job) -> Response {
    let mut resp = Json(Video::from(job)).into_response();
    if !job.status.is_terminal() {
        // The openai SDK's poll helpers wait this long between polls.
        resp.headers_mut()
            .insert("openai-poll-after-ms", HeaderValue::from_static("500"));
    }
    resp
}

async fn create_video(State(gw): State<Arc<Gateway>>, req: Request) -> Result<Response, OaiError> {
    let key = gw.authenticate(req.headers())?;
    gw.limiter
        .take(&key.id, "create", key.limits.creates_per_min)
        .map_err(|wait| {
            OaiError::rate_limited(
                "rate_limit_exceeded",
                format!(
                    "Rate limit reached for {} videos per minute.",
                    key.limits.creates_per_min
                ),
                wait,
            )
        })?;
    let idem = idempotency_key(req.headers())?;
    let fields = read_fields(&gw, req).await?;
    if let Some(idem) = &idem {
        if let Some(job) = gw.db.job_by_idempotency_key(&key.id, idem)? {
            return Ok(video_json(&job));
        }
    }
    let spec = openai::parse_create(&fields, &gw.offered(), rand::random)?;
    let (active, today) = gw.db.usage(&key.id)?;
    if active >= key.limits.max_active {
        return Err(OaiError::rate_limited(
            "too_many_active_jobs",
            format!(
                "This key already has {active} videos queued or in progress (limit {}).",
                key.limits.max_active
            ),
            5,
        ));
    }
    if today >= key.limits.daily_quota {
        return Err(OaiError::rate_limited(
            "insufficient_quota",
            format!(
                "This key created {today} videos in the last 24 hours (quota {}).",
                key.limits.daily_quota
            ),
            3600,
        ));
    }
    // Past saturation, refuse new work rather than queue it without bound.
    let work = Work {
        width: spec.width,
        height: spec.height,
        frames: spec.frames,
        steps: spec.steps,
    };
    let held = gw.db.queued_count()? as usize;
    let admission = gw
        .map
        .lock()
        .expect("map lock")
        .admit(&work, now_ms(), held);
    if let Admission::Shed { retry_after_s } = admission {
        gw.counters.shed.fetch_add(1, Ordering::Relaxed);
        return Err(OaiError::rate_limited(
            "grid_saturated",
            format!(
                "The grid is saturated: a new video would wait about {retry_after_s} s for a prover ({held} already queued here). Try again later."
            ),
            retry_after_s,
        ));
    }
    let id = format!("video_{}", fractal_protocol::JobId::random());
    // Durable before the answer: from here on the job survives restarts.
    let (job, new) = gw.db.insert_job(&id, &key.id, &spec, idem.as_deref())?;
    if new {
        gw.counters.accepted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(video = %id, key = %key.id, "accepted");
        gw.wake.notify_one();
    }
    Ok(video_json(&job))
}

/// The optional `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, OaiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(s) if !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(s.to_string()))
        }
        _ => Err(OaiError::invalid(
            None,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

async fn get_video(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, OaiError> {
    let key = gw.authenticate(&headers)?;
    Ok(video_json(&gw.owned_job(&key, &id)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<String>,
    limit: Option<u32>,
    order: Option<String>,
}

async fn list_videos(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OaiError> {
    let key = gw.authenticate(&headers)?;
    let Query(q) = query.map_err(|e| OaiError::invalid(None, "invalid_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(OaiError::invalid(
            Some("limit"),
            "invalid_value",
            "limit must be 1..=100",
        ));
    }
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => {
            return Err(OaiError::invalid(
                Some("order"),
                "invalid_value",
                "order must be asc or desc",
            ))
        }
    };
    let mut jobs = gw
        .db
        .list_jobs(&key.id, q.after.as_deref(), limit + 1, ascending)?;
    let has_more = jobs.len() > limit as usize;
    jobs.truncate(limit as usize);
    let data: Vec<Video> = jobs.iter().map(Video::from).collect();
    Ok(Json(serde_json::json!({
        "object": "list",
        "first_id": data.first().map(|v| v.id.clone()),
        "last_id": data.last().map(|v| v.id.clone()),
        "has_more": has_more,
        "data": data,
    }))
    .into_response())
}

async fn delete_video(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, OaiError> {
    let key = gw.authenticate(&headers)?;
    let job = gw.owned_job(&key, &id)?;
    if let Some(h) = gw.running.lock().expect("running lock").remove(&job.id) {
        h.abort();
    }
    gw.db.delete(&job.id)?;
    for file in credentials::files_of(&gw.config.videos_dir(), &job.id) {
        let _ = std::fs::remove_file(file);
    }
    gw.changed(&job.id);
    Ok(
        Json(serde_json::json!({"id": job.id, "object": "video.deleted", "deleted": true}))
            .into_response(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentQuery {
    variant: Option<String>,
}

async fn video_content(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ContentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OaiError> {
    let key = gw.authenticate(&headers)?;
    let Query(q) = query.map_err(|e| OaiError::invalid(None, "invalid_query", e.body_text()))?;
    use fractal_credentials::MediaFormat;
    let (ext, format) = match q.variant.as_deref().unwrap_or("video") {
        "video" => ("mp4", MediaFormat::Mp4),
        "gif" => ("gif", MediaFormat::Gif),
        "thumbnail" => ("png", MediaFormat::Png),
        other => {
            return Err(OaiError::invalid(
                Some("variant"),
                "invalid_value",
                format!("Unsupported variant {other:?}: video, gif or thumbnail"),
            ))
        }
    };
    let job = gw.owned_job(&key, &id)?;
    if job.status != Status::Completed {
        return Err(OaiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "video_not_ready",
            format!(
                "Video is {}; content is available once it is completed",
                job.status.as_str()
            ),
        ));
    }
    if job.expired {
        return Err(OaiError::new(
            StatusCode::GONE,
            "invalid_request_error",
            "video_expired",
            "This video's content has expired and was deleted",
        ));
    }
    let bytes = gw.credentialed(&job, ext, format).await?;
    Ok((
        [
            (header::CONTENT_TYPE, format.mime().to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{}.{ext}\"", job.id),
            ),
        ],
        bytes,
    )
        .into_response())
}

async fn video_events(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, OaiError> {
    let key = gw.authenticate(&headers)?;
    let job = gw.owned_job(&key, &id)?;
    let rx = gw.changes.subscribe();
    // State: (gateway, id, receiver, the last status sent or None at first, done)
    let stream = futures_util::stream::unfold(
        (gw, id, rx, Some(job), false),
        |(gw, id, mut rx, first, done)| async move {
            if done {
                return None;
            }
            let job = match first {
                Some(j) => j,
                None => loop {
                    match rx.recv().await {
                        Ok(changed) if changed != id => continue,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                    match gw.db.job(&id) {
                        Ok(Some(j)) => break j,
                        // Deleted (or the store failed): end the stream.
                        _ => return None,
                    }
                },
            };
            let terminal = job.status.is_terminal();
            let event = Event::default()
                .event("video")
                .json_data(Video::from(&job))
                .expect("video serialises");
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (gw, id, rx, None, terminal),
            ))
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response())
}

/// OpenAI's model list: the models the schedule serves now, the default
/// for new jobs first.
async fn list_models(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Response, OaiError> {
    gw.authenticate(&headers)?;
    let data = gw.catalog.lock().expect("catalog lock").objects();
    Ok(Json(serde_json::json!({ "object": "list", "data": data })).into_response())
}

/// One offered model, by name or manifest id.
async fn get_model(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, OaiError> {
    gw.authenticate(&headers)?;
    gw.catalog
        .lock()
        .expect("catalog lock")
        .objects()
        .into_iter()
        .find(|o| o.id == id || o.manifest_id == id)
        .map(|o| Json(o).into_response())
        .ok_or_else(|| {
            OaiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model {id:?} is not served on this grid (GET /v1/models lists those that are)"),
            )
        })
}

async fn grid(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Response, OaiError> {
    gw.authenticate(&headers)?;
    Ok(Json(gw.grid()).into_response())
}

/// Prometheus text; open like the prover's (counters only, no job data).
async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let c = &gw.counters;
    let mut out = String::new();
    for (name, v) in [
        (
            "fractal_gateway_jobs_accepted_total",
            c.accepted.load(Ordering::Relaxed),
        ),
        (
            "fractal_gateway_jobs_completed_total",
            c.completed.load(Ordering::Relaxed),
        ),
        (
            "fractal_gateway_jobs_failed_total",
            c.failed.load(Ordering::Relaxed),
        ),
        (
            "fractal_gateway_failovers_total",
            c.failovers.load(Ordering::Relaxed),
        ),
        (
            "fractal_gateway_hedges_total",
            c.hedges.load(Ordering::Relaxed),
        ),
        (
            "fractal_gateway_jobs_shed_total",
            c.shed.load(Ordering::Relaxed),
        ),
        (
            "fractal_gateway_jobs_running",
            gw.running.lock().expect("running lock").len() as u64,
        ),
    ] {
        out += &format!("{name} {v}\n");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
