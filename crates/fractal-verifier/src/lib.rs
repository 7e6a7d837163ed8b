//! The verifier (Bittensor validator): challenges every prover with fresh
//! seeds and prompts, spot-checks the answers ([`audit`]), keeps scores in
//! SQLite ([`store`]) and turns them into weights on the chain.
//!
//! A verifier audits every model it was given that the chain's model
//! schedule serves now (all of them while the schedule pins nothing): each
//! prover is challenged under each of those it claims in `/v1/info`, with
//! that model's pipeline and tolerances, and scored per model; the weights
//! combine them as [`store::Store::combined_weight`] says.

pub mod audit;
pub mod challenges;
pub mod client;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fractal_chain::{Chain, ChainError, Metagraph, NeuronInfo, Uid};
use fractal_engine::PinnedModel;
use fractal_http::SignedClient;
use fractal_protocol::manifest::Size;
use fractal_protocol::wire::{GenerateRequest, GenerateResponse, OutputFormat};
use fractal_protocol::{Hotkey, Keypair, ManifestId};
use rand::Rng;
use tokio::sync::Semaphore;

use audit::{Auditor, Check, Failure};
use challenges::{ChallengeMix, JobShape};
use client::{CallError, Generated, ProverClient};
use store::{Outcome, ProverScore, Store};

/// Synthetic challenge shape (before any app traffic is seen; after, the
/// challenges follow the traffic, see [`challenges`]) and deadlines.
#[derive(Clone, Debug)]
pub struct VerifierConfig {
    pub size: Size,
    pub frames: u32,
    pub steps: u32,
    pub output: OutputFormat,
    /// A generate answer after this is a failed (late) job.
    pub deadline: Duration,
    /// Per attempt of an audit call; calls that fail in transport (or time
    /// out) are retried up to [`AUDIT_ATTEMPTS`] times before the prover
    /// is failed.
    pub audit_deadline: Duration,
    /// Sent with `set_weights`; the chain refuses keys older than its own.
    pub version_key: u64,
    pub mode: AuditMode,
    /// Fraction of routed (app) jobs that are audited as well.
    pub audit_sample: f64,
}

/// How synthetic challenges are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditMode {
    /// Open a few steps and recompute them (a few % of the prover's cost).
    SpotCheck,
    /// Regenerate the whole job (100% of the cost; for disputes).
    Full,
}

impl VerifierConfig {
    pub fn from_manifest(m: &fractal_protocol::ModelManifest) -> Self {
        VerifierConfig {
            size: m.defaults.size,
            frames: m.defaults.frames,
            steps: m.defaults.steps,
            output: OutputFormat::Mp4,
            deadline: Duration::from_secs(120),
            audit_deadline: Duration::from_secs(30),
            version_key: fractal_protocol::wire::PROTOCOL_VERSION as u64,
            mode: AuditMode::SpotCheck,
            audit_sample: 0.1,
        }
    }
}

/// Attempts of an audit call before a prover that does not answer it is
/// failed: a lost reply or a dropped connection is not a cheat.
pub const AUDIT_ATTEMPTS: u32 = 3;

pub struct Verifier {
    key: Keypair,
    chain: Arc<dyn Chain>,
    /// The models this verifier can audit, the first the one it started
    /// with (its config's challenge shape is that model's).
    models: Vec<AuditedModel>,
    client: ProverClient,
    store: Mutex<Store>,
    config: VerifierConfig,
    /// Audits are CPU-bound: one at a time, off the async runtime.
    audit_slot: Semaphore,
    /// Scheduled models this verifier cannot audit, warned of once each.
    unaudited: Mutex<BTreeSet<ManifestId>>,
    /// The block at which this verifier was first seen holding a validator
    /// permit (since it last lacked one); `None` without one.
    permit_since: Mutex<Option<u64>>,
    /// Routed jobs (by request job id) picked for an audit whose outcome
    /// is not recorded yet.
    pending_audits: Mutex<BTreeSet<String>>,
}

/// One model a verifier audits: its pipeline, and the recent app traffic
/// under it that its synthetic challenges are drawn like.
struct AuditedModel {
    auditor: Arc<Auditor>,
    challenges: Mutex<ChallengeMix>,
}

/// What routing sees of one prover: its combined score now and its audits
/// under the models the schedule serves.
#[derive(Clone, Debug, PartialEq)]
pub struct Standing {
    pub hotkey: Hotkey,
    /// [`Store::served_score`]: 0 after a failed check (never route
    /// there), `None` while it has no audit under a model served now.
    pub score: Option<f64>,
    pub passed: u64,
    pub failed: u64,
}

/// Where the audit of one routed job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditState {
    /// Not in the audited sample (or its audit was abandoned when the
    /// process stopped).
    NotSampled,
    Pending,
    Passed,
    /// The check that failed, as [`audit::Check::as_str`] names it.
    Failed {
        check: String,
    },
}

/// Whether this verifier may challenge: provers refuse verifiers without a
/// validator permit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    Held,
    /// Waiting for the chain to grant one; epochs (when permits are
    /// decided) end every `tempo` blocks, the next at `next_epoch_block`.
    Missing {
        next_epoch_block: u64,
    },
}

/// What one turn of the run loop did.
enum Round {
    Done(Vec<JobResult>),
    /// No permit: nothing challenged.
    Waiting {
        next_epoch_block: u64,
    },
}

/// Sleeps `wait` unless `shutdown` says stop first; whether it did.
async fn stopped_during(wait: Duration, shutdown: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = shutdown.changed() => return true,
    }
    *shutdown.borrow()
}

#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("a verifier needs at least one model to audit")]
    NoModel,
    #[error("model {0} was given twice")]
    DuplicateModel(ManifestId),
}

/// One prover's result in a round.
#[derive(Clone, Debug)]
pub struct JobResult {
    pub hotkey: Hotkey,
    pub uid: Uid,
    pub failed: Option<Failure>,
    pub service_ms: Option<u64>,
    pub verify_ms: Option<u64>,
    pub generate_ms: Option<u64>,
}

impl JobResult {
    /// A challenge that ended without an outcome to record.
    fn not_held_against(neuron: &NeuronInfo) -> Self {
        JobResult {
            hotkey: neuron.hotkey,
            uid: neuron.uid,
            failed: None,
            service_ms: None,
            verify_ms: None,
            generate_ms: None,
        }
    }
}

/// A neuron's HTTP base URL (empty when it serves none: the call then fails
/// as unavailable).
pub fn axon_url(n: &NeuronInfo) -> String {
    n.axon.as_ref().map(|a| a.base_url()).unwrap_or_default()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Verifier {
    /// A verifier of one model.
    pub fn new(
        key: Keypair,
        chain: Arc<dyn Chain>,
        model: Arc<PinnedModel>,
        store: Store,
        config: VerifierConfig,
    ) -> Result<Arc<Self>, VerifierError> {
        Self::auditing(key, chain, vec![model], store, config)
    }

    /// A verifier of several models (the first is the one `config`'s
    /// challenge shape is for; the others' challenges start from their
    /// manifests' defaults). Scores the store holds from before models
    /// were told apart are the first model's.
    pub fn auditing(
        key: Keypair,
        chain: Arc<dyn Chain>,
        models: Vec<Arc<PinnedModel>>,
        mut store: Store,
        config: VerifierConfig,
    ) -> Result<Arc<Self>, VerifierError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let first = models.first().ok_or(VerifierError::NoModel)?;
        store.adopt_unscoped(&first.manifest_id)?;
        let mut seen = BTreeSet::new();
        let mut audited = Vec::new();
        for (i, model) in models.into_iter().enumerate() {
            if !seen.insert(model.manifest_id) {
                return Err(VerifierError::DuplicateModel(model.manifest_id));
            }
            let challenges = if i == 0 {
                ChallengeMix::with_fallback(
                    model.manifest_id,
                    JobShape {
                        size: config.size,
                        frames: config.frames,
                        steps: config.steps,
                        guidance_scale: model.manifest.defaults.guidance_scale,
                        output: config.output,
                        prompt_words: 0,
                        negative_words: 0,
                        start_within_ms: None,
                    },
                )
            } else {
                ChallengeMix::new(&model.manifest, model.manifest_id)
            };
            audited.push(AuditedModel {
                challenges: Mutex::new(challenges),
                auditor: Arc::new(Auditor::new(model)),
            });
        }
        Ok(Arc::new(Verifier {
            models: audited,
            client: ProverClient::new(SignedClient::new(http, Arc::new(key.clone()))),
            key,
            chain,
            store: Mutex::new(store),
            config,
            audit_slot: Semaphore::new(1),
            unaudited: Mutex::new(BTreeSet::new()),
            permit_since: Mutex::new(None),
            pending_audits: Mutex::new(BTreeSet::new()),
        }))
    }

    pub fn open_store(path: &Path) -> Result<Store, store::StoreError> {
        Store::open(path)
    }

    /// Whether `mg` gives this verifier a validator permit, remembering
    /// since when.
    fn permit(&self, mg: &Metagraph, tempo: u64) -> Permit {
        let held = mg
            .neuron(&self.hotkey())
            .is_some_and(|n| n.validator_permit);
        let mut since = self.permit_since.lock().expect("permit lock");
        if held {
            since.get_or_insert(mg.block);
            Permit::Held
        } else {
            *since = None;
            Permit::Missing {
                next_epoch_block: (mg.block / tempo + 1) * tempo,
            }
        }
    }

    /// Provers learn of a new permit from their own metagraph reads, so
    /// for an epoch after it is granted a refusal is theirs to catch up
    /// on, not held against them.
    fn newly_permitted(&self, block: u64, tempo: u64) -> bool {
        self.permit_since
            .lock()
            .expect("permit lock")
            .is_none_or(|since| block < since + tempo)
    }

    pub fn hotkey(&self) -> Hotkey {
        self.key.hotkey()
    }

    /// Signs `message` with the verifier's hotkey: what the gateway uses to
    /// vouch for the certificate its content credentials are signed with.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message)
    }

    /// The audit of the routed job sent with request id `job_id`.
    pub fn audit_state(&self, job_id: &str) -> Result<AuditState, VerifierError> {
        if self
            .pending_audits
            .lock()
            .expect("pending audits lock")
            .contains(job_id)
        {
            return Ok(AuditState::Pending);
        }
        Ok(
            match self
                .store
                .lock()
                .expect("store lock")
                .audit_of_job(job_id)?
            {
                None => AuditState::NotSampled,
                Some(None) => AuditState::Passed,
                Some(Some(check)) => AuditState::Failed { check },
            },
        )
    }

    /// The auditor of the model this verifier started with.
    pub fn auditor(&self) -> &Auditor {
        &self.models[0].auditor
    }

    /// The manifests this verifier can audit, the one it started with first.
    pub fn models(&self) -> Vec<ManifestId> {
        self.models
            .iter()
            .map(|m| m.auditor.model().manifest_id)
            .collect()
    }

    fn audited(&self, manifest: &ManifestId) -> Option<&AuditedModel> {
        self.models
            .iter()
            .find(|m| &m.auditor.model().manifest_id == manifest)
    }

    /// The models to audit at `block`: those of ours the schedule serves,
    /// newest first; all of ours while it pins nothing (or the chain keeps
    /// no schedule). A served model we lack is warned of once: its provers
    /// go unaudited under it by us.
    pub async fn audited_models(&self, block: u64) -> Vec<ManifestId> {
        let mine = self.models();
        let schedule = match self.chain.model_schedule().await {
            Ok(s) => s,
            Err(ChainError::Unsupported(_)) => return mine,
            Err(e) => {
                tracing::warn!(error = %e, "reading the model schedule failed; auditing every model we have");
                return mine;
            }
        };
        if !schedule.pins_anything_at(block) {
            return mine;
        }
        let mut audited = Vec::new();
        for (id, state) in schedule.served_at(block) {
            if mine.contains(&id) {
                audited.push(id);
            } else if self.unaudited.lock().expect("unaudited lock").insert(id) {
                tracing::warn!(manifest = %id, state = state.name(), "the schedule serves a model this verifier was not given: provers go unaudited (and unweighted) under it by this verifier");
            }
        }
        audited
    }

    /// Signed client for calls the verifier's operator makes on its behalf
    /// (the gateway's probes).
    pub fn client(&self) -> &ProverClient {
        &self.client
    }

    pub fn chain(&self) -> &Arc<dyn Chain> {
        &self.chain
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// Every scored prover as routing should see it now (0 after a failed
    /// check this epoch or the last: the gateway never routes to a zero).
    pub async fn standings(&self) -> Result<Vec<Standing>, VerifierError> {
        let block = self.chain.block().await?;
        let epoch = block / self.chain.hyperparams().await?.tempo.max(1);
        let served = self.audited_models(block).await;
        Ok(self
            .scores_by_prover()?
            .into_iter()
            .map(|(hotkey, scores)| {
                let counted = scores.iter().filter(|s| served.contains(&s.manifest_id));
                Standing {
                    hotkey,
                    score: Store::served_score(&scores, &served, epoch),
                    passed: counted.clone().map(|s| s.passed).sum(),
                    failed: scores.iter().map(|s| s.failed).sum(),
                }
            })
            .collect())
    }

    pub fn scores(&self) -> Result<Vec<ProverScore>, VerifierError> {
        Ok(self.store.lock().expect("store lock").scores()?)
    }

    fn scores_by_prover(&self) -> Result<BTreeMap<Hotkey, Vec<ProverScore>>, VerifierError> {
        let mut by_prover: BTreeMap<Hotkey, Vec<ProverScore>> = BTreeMap::new();
        for s in self.scores()? {
            by_prover.entry(s.hotkey).or_default().push(s);
        }
        Ok(by_prover)
    }

    /// A fresh synthetic request for the model this verifier started
    /// with, drawn like recent app traffic (random seed, new text).
    pub fn synthetic_request(&self) -> GenerateRequest {
        Self::draw(&self.models[0])
    }

    /// A fresh synthetic request for `manifest`; `None` when this verifier
    /// does not audit it.
    pub fn synthetic_request_for(&self, manifest: &ManifestId) -> Option<GenerateRequest> {
        self.audited(manifest).map(Self::draw)
    }

    fn draw(model: &AuditedModel) -> GenerateRequest {
        model
            .challenges
            .lock()
            .expect("challenge mix lock")
            .draw(&mut rand::rngs::OsRng)
    }

    /// Provers to challenge: every other neuron that serves an axon.
    pub fn provers(&self, mg: &Metagraph) -> Vec<NeuronInfo> {
        let me = self.hotkey();
        mg.neurons
            .iter()
            .filter(|n| n.hotkey != me && n.axon.is_some())
            .cloned()
            .collect()
    }

    /// Audits an answered job (a synthetic challenge or routed traffic).
    pub async fn audit_job(
        &self,
        base: &str,
        prover: &Hotkey,
        req: &GenerateRequest,
        generated: &Generated,
    ) -> Result<audit::AuditReport, Failure> {
        let auditor = self.auditor_of(req)?;
        auditor.check_response(req, &generated.response)?;
        let plan = auditor.plan(req, &mut rand::rngs::OsRng);
        let answer = self.audit_call(base, prover, &plan.challenge).await?;
        self.on_audit_thread(auditor, req, generated, move |a, req, resp| {
            a.check(req, resp, &plan, &answer)
        })
        .await
    }

    /// Asks for the openings, retrying calls that failed in transport or
    /// timed out (with a short backoff): only a prover that still gives no
    /// valid answer, or refuses, fails its commitment.
    async fn audit_call(
        &self,
        base: &str,
        prover: &Hotkey,
        challenge: &fractal_protocol::wire::AuditChallenge,
    ) -> Result<fractal_protocol::wire::AuditAnswer, Failure> {
        let mut attempt = 1;
        loop {
            match self
                .client
                .audit(base, prover, challenge, self.config.audit_deadline)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(
                    e @ (CallError::Transport(_) | CallError::Timeout(_) | CallError::Busy { .. }),
                ) if attempt < AUDIT_ATTEMPTS => {
                    tracing::info!(prover = %prover, attempt, error = %e, "audit call failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(Failure::new(
                        Check::Commitment,
                        format!("no valid audit answer after {attempt} attempt(s): {e}"),
                    ))
                }
            }
        }
    }

    /// The auditor of the model `req` asks for. Only requests for models
    /// this verifier audits are sent or sampled, so a miss is ours.
    fn auditor_of(&self, req: &GenerateRequest) -> Result<Arc<Auditor>, Failure> {
        self.audited(&req.manifest_id)
            .map(|m| m.auditor.clone())
            .ok_or_else(|| {
                Failure::new(
                    Check::Unavailable,
                    format!("this verifier does not audit manifest {}", req.manifest_id),
                )
            })
    }

    /// Runs CPU-heavy checks one at a time, off the async runtime.
    async fn on_audit_thread<T: Send + 'static>(
        &self,
        auditor: Arc<Auditor>,
        req: &GenerateRequest,
        generated: &Generated,
        check: impl FnOnce(&Auditor, &GenerateRequest, &GenerateResponse) -> Result<T, Failure>
            + Send
            + 'static,
    ) -> Result<T, Failure> {
        let _slot = self.audit_slot.acquire().await.expect("never closed");
        let (req, resp) = (req.clone(), generated.response.clone());
        tokio::task::spawn_blocking(move || check(&auditor, &req, &resp))
            .await
            .map_err(|e| Failure::new(Check::Unavailable, format!("audit task failed: {e}")))?
    }

    /// Full regeneration of an answered job.
    pub async fn regenerate(
        &self,
        req: &GenerateRequest,
        generated: &Generated,
    ) -> Result<audit::FullReport, Failure> {
        let auditor = self.auditor_of(req)?;
        self.on_audit_thread(auditor, req, generated, |a, req, resp| {
            a.check_full(req, resp)
        })
        .await
    }

    /// Sends an app's job to `neuron` and returns its answer; a sample of
    /// these (`audit_sample`) is audited in the background like a synthetic
    /// challenge, so a prover cannot be honest only with the verifier.
    pub async fn forward(
        self: &Arc<Self>,
        neuron: &NeuronInfo,
        req: GenerateRequest,
        on_progress: &mut (dyn FnMut(&fractal_protocol::wire::ProgressEvent) + Send),
    ) -> Result<Generated, CallError> {
        let audited = self.audited(&req.manifest_id);
        if let Some(m) = audited {
            m.challenges
                .lock()
                .expect("challenge mix lock")
                .observe(&req);
        }
        let base = axon_url(neuron);
        let generated = self
            .client
            .generate(
                &base,
                &neuron.hotkey,
                &req,
                self.config.deadline,
                on_progress,
            )
            .await?;
        if audited.is_some() && rand::rngs::OsRng.gen_bool(self.config.audit_sample.clamp(0.0, 1.0))
        {
            let me = Arc::clone(self);
            let hotkey = neuron.hotkey;
            let generated = generated.clone();
            let job_id = req.job_id.to_string();
            me.pending_audits
                .lock()
                .expect("pending audits lock")
                .insert(job_id.clone());
            tokio::spawn(async move {
                let verdict = me.audit_job(&base, &hotkey, &req, &generated).await;
                let epoch = me.current_epoch().await.unwrap_or(0);
                if let Err(f) = &verdict {
                    tracing::warn!(prover = %hotkey, check = f.check.as_str(), detail = %f.detail, "routed job failed its audit");
                }
                let service_ms = Some(generated.service.as_millis() as u64);
                let verify_ms = verdict.as_ref().ok().map(|r| r.verify_ms);
                if let Err(e) = me.record(
                    hotkey,
                    &req,
                    epoch,
                    verdict.as_ref().err(),
                    service_ms,
                    verify_ms,
                ) {
                    tracing::error!(error = %e, "recording an audit failed");
                }
                me.pending_audits
                    .lock()
                    .expect("pending audits lock")
                    .remove(&job_id);
            });
        }
        Ok(generated)
    }

    /// Stores one audited job's outcome and updates the prover's score.
    fn record(
        &self,
        hotkey: Hotkey,
        req: &GenerateRequest,
        epoch: u64,
        failed: Option<&Failure>,
        service_ms: Option<u64>,
        verify_ms: Option<u64>,
    ) -> Result<ProverScore, store::StoreError> {
        self.store.lock().expect("store lock").record(&Outcome {
            hotkey,
            manifest_id: req.manifest_id,
            job_id: req.job_id.to_string(),
            epoch,
            at_ms: now_ms(),
            failed: failed.map(|f| (f.check, f.detail.clone())),
            service_ms,
            verify_ms,
        })
    }

    async fn current_epoch(&self) -> Result<u64, VerifierError> {
        let block = self.chain.block().await?;
        Ok(block / self.chain.hyperparams().await?.tempo.max(1))
    }

    /// Challenges one prover under each of `models` (those audited now)
    /// that it claims to serve: none when it claims none of them (it then
    /// earns nothing under them). A prover whose claims cannot be read is
    /// challenged under the first, which records why it failed.
    pub async fn challenge_claimed(
        &self,
        neuron: &NeuronInfo,
        epoch: u64,
        models: &[ManifestId],
    ) -> Result<Vec<JobResult>, VerifierError> {
        let base = axon_url(neuron);
        let targets: Vec<ManifestId> = match self
            .client
            .info(&base, &neuron.hotkey, self.config.audit_deadline)
            .await
        {
            Ok((info, _)) => models.iter().filter(|m| info.serves(m)).copied().collect(),
            Err(e) => {
                tracing::debug!(prover = %neuron.hotkey, error = %e, "reading what the prover serves failed");
                models.iter().take(1).copied().collect()
            }
        };
        if targets.is_empty() {
            tracing::debug!(prover = %neuron.hotkey, "prover serves none of the models audited now");
        }
        let mut results = Vec::new();
        for m in targets {
            results.push(self.challenge(neuron, epoch, &m).await?);
        }
        Ok(results)
    }

    /// Challenges one prover once under `manifest` (one this verifier
    /// audits; else the challenge goes to the first model) and records the
    /// outcome.
    pub async fn challenge(
        &self,
        neuron: &NeuronInfo,
        epoch: u64,
        manifest: &ManifestId,
    ) -> Result<JobResult, VerifierError> {
        let base = axon_url(neuron);
        let req = self
            .synthetic_request_for(manifest)
            .unwrap_or_else(|| self.synthetic_request());
        let started = std::time::Instant::now();
        let answer = self
            .client
            .generate(
                &base,
                &neuron.hotkey,
                &req,
                self.config.deadline,
                &mut |_| {},
            )
            .await;
        let generate_ms = started.elapsed().as_millis() as u64;
        let excused = matches!(answer, Err(CallError::Refused { status: 403, .. }))
            && self.newly_permitted(
                self.chain.block().await?,
                self.chain.hyperparams().await?.tempo.max(1),
            );
        let (failed, service_ms, verify_ms) = match answer {
            Ok(generated) => {
                let service = generated.service.as_millis() as u64;
                let verdict = match self.config.mode {
                    AuditMode::SpotCheck => self
                        .audit_job(&base, &neuron.hotkey, &req, &generated)
                        .await
                        .map(|r| r.verify_ms),
                    AuditMode::Full => self.regenerate(&req, &generated).await.map(|r| r.verify_ms),
                };
                match verdict {
                    Ok(verify_ms) => (None, Some(service), Some(verify_ms)),
                    Err(f) => (Some(f), Some(service), None),
                }
            }
            Err(CallError::Timeout(d)) => (
                Some(Failure::new(Check::Late, format!("no result within {d:?}"))),
                None,
                None,
            ),
            // It stopped serving the model between its info and our
            // challenge (it unloaded one the schedule retired): it no
            // longer claims it, which earns nothing under it but is no
            // failure.
            Err(CallError::Refused {
                status: 404, code, ..
            }) if code == "model_not_served" => {
                tracing::debug!(prover = %neuron.hotkey, manifest = %manifest, "prover no longer serves the model");
                return Ok(JobResult::not_held_against(neuron));
            }
            // The challenge carried an app job's bound on queueing and the
            // prover holds more: busy with work, as an app job would have
            // found it. Not a failure: a prover refusing bounded requests
            // to dodge challenges refuses the app jobs that carry them too
            // (it cannot tell them apart), and forwarded app jobs are
            // audited anyway.
            Err(
                e @ CallError::Busy {
                    backlog_ms: Some(_),
                    ..
                },
            ) if req.start_within_ms.is_some() => {
                tracing::debug!(prover = %neuron.hotkey, error = %e, "prover too busy for the challenge's bound; not held against it");
                return Ok(JobResult::not_held_against(neuron));
            }
            Err(e @ CallError::Refused { status: 403, .. }) if excused => {
                tracing::debug!(prover = %neuron.hotkey, error = %e, "prover does not know of our permit yet; not held against it");
                return Ok(JobResult::not_held_against(neuron));
            }
            Err(e) => (
                Some(Failure::new(Check::Unavailable, e.to_string())),
                None,
                None,
            ),
        };
        if let Some(f) = &failed {
            tracing::warn!(prover = %neuron.hotkey, uid = neuron.uid, check = f.check.as_str(), detail = %f.detail, "challenge failed");
        }
        self.record(
            neuron.hotkey,
            &req,
            epoch,
            failed.as_ref(),
            service_ms,
            verify_ms,
        )?;
        Ok(JobResult {
            hotkey: neuron.hotkey,
            uid: neuron.uid,
            failed,
            service_ms,
            verify_ms,
            generate_ms: Some(generate_ms),
        })
    }

    /// Challenges every prover once, concurrently; none without a
    /// validator permit (provers would refuse, and that is not theirs to
    /// answer for).
    pub async fn round(&self) -> Result<Vec<JobResult>, VerifierError> {
        Ok(match self.round_or_wait().await? {
            Round::Done(results) => results,
            Round::Waiting { .. } => Vec::new(),
        })
    }

    /// A round, or what it waits for, from one metagraph read.
    async fn round_or_wait(&self) -> Result<Round, VerifierError> {
        let mg = self.chain.metagraph().await?;
        let tempo = self.chain.hyperparams().await?.tempo.max(1);
        if let Permit::Missing { next_epoch_block } = self.permit(&mg, tempo) {
            return Ok(Round::Waiting { next_epoch_block });
        }
        let epoch = mg.block / tempo;
        let models = self.audited_models(mg.block).await;
        let provers = self.provers(&mg);
        let results = futures_util::future::join_all(
            provers
                .iter()
                .map(|n| self.challenge_claimed(n, epoch, &models)),
        )
        .await;
        let mut done = Vec::new();
        for r in results {
            done.extend(r?);
        }
        Ok(Round::Done(done))
    }

    /// The weights this verifier would set now: the combined scores of
    /// registered provers under the models served now, zeroed where a check
    /// failed this epoch or the last.
    pub async fn weights(&self) -> Result<Vec<(Uid, u16)>, VerifierError> {
        let mg = self.chain.metagraph().await?;
        let tempo = self.chain.hyperparams().await?.tempo.max(1);
        let epoch = mg.block / tempo;
        let served = self.audited_models(mg.block).await;
        let by_prover = self.scores_by_prover()?;
        let mut raw = Vec::new();
        for n in self.provers(&mg) {
            let scores = by_prover.get(&n.hotkey).map_or(&[][..], Vec::as_slice);
            let w = Store::combined_weight(scores, &served, epoch);
            if w > 0.0 {
                raw.push((n.uid, w));
            }
        }
        let max = raw.iter().map(|r| r.1).fold(0.0, f64::max);
        Ok(raw
            .into_iter()
            .map(|(uid, w)| (uid, ((w / max) * u16::MAX as f64).round().max(1.0) as u16))
            .collect())
    }

    /// Sets weights if there are any and the chain's rate limit allows.
    /// Returns what was set.
    pub async fn set_weights(&self) -> Result<Option<Vec<(Uid, u16)>>, VerifierError> {
        let weights = self.weights().await?;
        if weights.is_empty() {
            return Ok(None);
        }
        match self
            .chain
            .set_weights(&self.key, &weights, self.config.version_key)
            .await
        {
            Ok(()) => {
                let block = self.chain.block().await?;
                self.store
                    .lock()
                    .expect("store lock")
                    .set_meta("last_weights_block", &block.to_string())?;
                tracing::info!(block, provers = weights.len(), "weights set");
                Ok(Some(weights))
            }
            Err(ChainError::WeightsRateLimited { next, .. }) => {
                tracing::debug!(next, "weights rate limited; will retry");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Rounds until `shutdown`, weights after each. A round starts at most
    /// `pause` after the last one, sooner when a prover is behind the
    /// manifest's `audits_per_epoch`: the remaining audits are spread over
    /// what is left of the epoch at random gaps, so their timing tells a
    /// prover nothing.
    pub async fn run(
        self: Arc<Self>,
        pause: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut pacer = Pacer::default();
        let mut waiting = false;
        loop {
            // Stopping abandons a round in flight: provers stop with us,
            // and the audits they could no longer answer are not theirs to
            // answer for (a challenge records its outcome only at its end).
            let round = tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                r = self.round_or_wait() => r,
            };
            match round {
                Ok(Round::Waiting { next_epoch_block }) => {
                    if !waiting {
                        tracing::info!(hotkey = %self.hotkey(), next_epoch_block, "waiting for a validator permit (provers refuse verifiers without one; the chain decides permits at each epoch): no challenges or weights until then");
                        waiting = true;
                    }
                    if stopped_during(pause, &mut shutdown).await {
                        return;
                    }
                    continue;
                }
                Ok(Round::Done(results)) => {
                    if waiting {
                        tracing::info!(hotkey = %self.hotkey(), "validator permit granted; challenging provers");
                        waiting = false;
                    }
                    let failed = results.iter().filter(|r| r.failed.is_some()).count();
                    tracing::info!(provers = results.len(), failed, "round done");
                }
                Err(e) => tracing::warn!(error = %e, "round failed"),
            }
            if let Err(e) = self.set_weights().await {
                tracing::warn!(error = %e, "setting weights failed");
            }
            let wait = match self.next_gap(&mut pacer).await {
                Ok(gap) => gap.min(pause),
                Err(e) => {
                    tracing::warn!(error = %e, "pacing audits failed");
                    pause
                }
            };
            if stopped_during(wait, &mut shutdown).await {
                return;
            }
        }
    }

    /// Whether the chain gives this verifier a validator permit now.
    pub async fn permit_now(&self) -> Result<Permit, VerifierError> {
        let mg = self.chain.metagraph().await?;
        let tempo = self.chain.hyperparams().await?.tempo.max(1);
        Ok(self.permit(&mg, tempo))
    }

    /// How long to wait before the next round for every prover to reach the
    /// audit plan this epoch (`Duration::MAX` once all have).
    async fn next_gap(&self, pacer: &mut Pacer) -> Result<Duration, VerifierError> {
        let mg = self.chain.metagraph().await?;
        let tempo = self.chain.hyperparams().await?.tempo.max(1);
        let epoch = mg.block / tempo;
        let plan = self
            .auditor()
            .model()
            .manifest
            .verification
            .audits_per_epoch as u64;
        let provers = self.provers(&mg);
        let min_audits = |epoch: u64| -> Result<u64, VerifierError> {
            let counts = self
                .store
                .lock()
                .expect("store lock")
                .audits_in_epoch(epoch)?;
            Ok(provers
                .iter()
                .map(|n| counts.get(&n.hotkey.to_ss58()).copied().unwrap_or(0))
                .min()
                .unwrap_or(plan))
        };
        // An epoch that began before this verifier held its permit had
        // less time for the plan: not a shortfall to report.
        let permitted_through = |epoch: u64| {
            self.permit_since
                .lock()
                .expect("permit lock")
                .is_some_and(|since| since <= epoch * tempo)
        };
        if let Some(previous) = pacer.new_epoch(epoch).filter(|&e| permitted_through(e)) {
            let done = min_audits(previous)?;
            if done >= plan {
                if pacer.short_epochs > 0 {
                    tracing::info!(
                        epoch = previous,
                        audits = done,
                        plan,
                        "every prover got the planned audits again"
                    );
                }
                pacer.short_epochs = 0;
            } else {
                pacer.short_epochs += 1;
                // Once, then every 100th short epoch in a row: a small grid
                // with short epochs is short every epoch.
                if pacer.short_epochs % 100 == 1 {
                    tracing::warn!(epoch = previous, audits = done, plan, short_epochs = pacer.short_epochs, "a prover got fewer audits than the manifest's plan: per-epoch detection is below its target (more verifier time, or a smaller --pause-s, closes the gap)");
                } else {
                    tracing::debug!(
                        epoch = previous,
                        audits = done,
                        plan,
                        "a prover got fewer audits than planned"
                    );
                }
            }
        }
        let needed = plan.saturating_sub(min_audits(epoch)?);
        if needed == 0 {
            return Ok(Duration::MAX);
        }
        let Some(left) = pacer.time_left(mg.block, tempo) else {
            return Ok(Duration::MAX);
        };
        let gap = left.as_secs_f64() / needed as f64;
        Ok(Duration::from_secs_f64(
            gap * rand::rngs::OsRng.gen_range(0.5..1.5),
        ))
    }
}

/// What pacing knows of the chain: the first block it saw and when (for
/// the block time), the epoch it last paced, and how many epochs in a row
/// fell short of the plan.
#[derive(Default)]
struct Pacer {
    first: Option<(u64, std::time::Instant)>,
    last: Option<(u64, std::time::Instant)>,
    epoch: Option<u64>,
    short_epochs: u64,
}

impl Pacer {
    /// Returns the previous epoch when `epoch` is a new one.
    fn new_epoch(&mut self, epoch: u64) -> Option<u64> {
        let previous = self.epoch.replace(epoch);
        previous.filter(|&p| p != epoch)
    }

    /// Time left in the epoch at `block`, from the block time observed so
    /// far (`None` until two blocks have been seen).
    fn time_left(&mut self, block: u64, tempo: u64) -> Option<Duration> {
        let now = std::time::Instant::now();
        let first = *self.first.get_or_insert((block, now));
        if self.last.is_none_or(|(b, _)| b != block) {
            self.last = Some((block, now));
        }
        let (last_block, last_at) = self.last?;
        if last_block <= first.0 {
            return None;
        }
        let per_block = last_at.duration_since(first.1) / (last_block - first.0) as u32;
        let blocks_left = tempo - block % tempo;
        Some(per_block * blocks_left as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_knows_the_epoch_and_the_time_left_in_it() {
        let mut p = Pacer::default();
        assert_eq!(p.new_epoch(3), None);
        assert_eq!(p.new_epoch(3), None);
        assert_eq!(p.new_epoch(4), Some(3));
        // One block seen: no block time yet.
        assert_eq!(p.time_left(40, 10), None);
        std::thread::sleep(Duration::from_millis(20));
        // Two blocks 20+ ms apart, 8 blocks left in the epoch.
        let left = p.time_left(42, 10).unwrap();
        assert!(left >= Duration::from_millis(80), "{left:?}");
        assert!(left < Duration::from_secs(5), "{left:?}");
    }
}
