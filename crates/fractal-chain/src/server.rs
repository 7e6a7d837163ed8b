//! The local chain over HTTP (`fractal chain serve`), so several processes
//! share one chain on loopback.
//!
//! Reads are open, like a node's RPC: `GET /v1/chain/info`,
//! `/v1/chain/block?after=N&timeout_ms=T` (long poll), `/v1/chain/metagraph`,
//! `/v1/chain/balance/{ss58}`. State changes are `POST`s that must be
//! btauth/1-signed by the key the extrinsic is "from": the coldkey for
//! `register` and `add_stake`, the hotkey for `serve_axon` and
//! `set_weights`, the subnet owner's coldkey for `publish_manifest` and
//! `schedule_upgrade`. The receiver is the chain node's own key. The model
//! schedule is read at `GET /v1/chain/schedule` and published manifests at
//! `GET /v1/chain/manifests/{id}` (canonical JSON, which hashes to `id`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use fractal_http::{AllowAll, ApiError, BtAuth, Caller};
use fractal_protocol::{Hotkey, ManifestId, ModelManifest, ModelSchedule, Upgrade};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{AxonInfo, BlockNumber, Chain, ChainError, Hyperparams, LocalChain, Rao, Uid};

/// `GET /v1/chain/info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainInfo {
    /// The key write requests must be addressed to (btauth receiver).
    pub node: Hotkey,
    pub owner: Hotkey,
    pub block: BlockNumber,
    pub hyperparams: Hyperparams,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockReply {
    pub block: BlockNumber,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BalanceReply {
    pub coldkey: Hotkey,
    pub balance: Rao,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterCall {
    pub hotkey: Hotkey,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterReply {
    pub uid: Uid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetWeightsCall {
    pub weights: Vec<(Uid, u16)>,
    pub version_key: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddStakeCall {
    pub hotkey: Hotkey,
    pub amount: Rao,
}

/// `GET /v1/chain/schedule`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleReply {
    pub block: BlockNumber,
    pub schedule: ModelSchedule,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishReply {
    pub manifest_id: ManifestId,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    pub ok: bool,
}

/// Longest a block long-poll may hold a connection.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// The largest write request: 256 weights fit in well under this.
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
struct AppState {
    chain: Arc<LocalChain>,
    node: Hotkey,
}

/// HTTP status for each rule violation.
pub fn status_of(e: &ChainError) -> StatusCode {
    match e {
        ChainError::NotRegistered(_)
        | ChainError::NotOwner { .. }
        | ChainError::NotSubnetOwner { .. }
        | ChainError::NoValidatorPermit(_) => StatusCode::FORBIDDEN,
        ChainError::UnknownManifest(_) => StatusCode::NOT_FOUND,
        ChainError::Schedule(_) => StatusCode::CONFLICT,
        ChainError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        ChainError::AlreadyRegistered(..)
        | ChainError::SubnetFull { .. }
        | ChainError::VersionKeyTooOld { .. } => StatusCode::CONFLICT,
        ChainError::InsufficientBalance { .. } => StatusCode::PAYMENT_REQUIRED,
        ChainError::WeightsRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        ChainError::UnknownUid(_) | ChainError::InvalidWeights(_) | ChainError::Invalid(_) => {
            StatusCode::BAD_REQUEST
        }
        ChainError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ChainError::Transport(_) => StatusCode::BAD_GATEWAY,
    }
}

/// Error body of the chain API: the usual `{"error": {code, message}}`
/// plus the structured [`ChainError`] so clients can act on it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChainErrorBody {
    pub error: fractal_http::ErrorDetail,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_error: Option<ChainError>,
}

/// A refused call: either a chain rule or a plain API error (bad JSON...).
enum Rejection {
    Chain(ChainError),
    Api(ApiError),
}

impl From<ApiError> for Rejection {
    fn from(e: ApiError) -> Self {
        Rejection::Api(e)
    }
}

impl From<ChainError> for Rejection {
    fn from(e: ChainError) -> Self {
        Rejection::Chain(e)
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        match self {
            Rejection::Api(e) => e.into_response(),
            Rejection::Chain(e) => {
                let status = status_of(&e);
                if status.is_server_error() {
                    tracing::error!(error = %e, "chain call failed");
                }
                let body = ChainErrorBody {
                    error: fractal_http::ErrorDetail {
                        code: e.code().to_string(),
                        message: e.to_string(),
                        backlog_ms: None,
                    },
                    chain_error: Some(e.clone()),
                };
                let mut resp = (status, Json(body)).into_response();
                if let ChainError::WeightsRateLimited { .. } = e {
                    resp.headers_mut()
                        .insert(axum::http::header::RETRY_AFTER, 1.into());
                }
                resp
            }
        }
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("request body: {e}")))
}

/// The router; `node` is the key callers must address writes to.
pub fn router(chain: Arc<LocalChain>, node: Hotkey) -> Router {
    let auth = BtAuth::new(node, Arc::new(AllowAll)).with_max_body(MAX_BODY);
    let state = AppState { chain, node };
    let writes = Router::new()
        .route("/v1/chain/register", post(register))
        .route("/v1/chain/serve_axon", post(serve_axon))
        .route("/v1/chain/set_weights", post(set_weights))
        .route("/v1/chain/add_stake", post(add_stake))
        .route("/v1/chain/publish_manifest", post(publish_manifest))
        .route("/v1/chain/schedule_upgrade", post(schedule_upgrade))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            fractal_http::auth::require_btauth,
        ));
    Router::new()
        .route("/v1/chain/info", get(info))
        .route("/v1/chain/block", get(block))
        .route("/v1/chain/metagraph", get(metagraph))
        .route("/v1/chain/balance/{coldkey}", get(balance))
        .route("/v1/chain/schedule", get(schedule))
        .route("/v1/chain/manifests/{id}", get(manifest))
        .merge(writes)
        .fallback(|| async { ApiError::not_found("no such chain endpoint") })
        .with_state(state)
}

/// Serves `chain` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    chain: Arc<LocalChain>,
    node: Hotkey,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(chain, node))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn info(State(st): State<AppState>) -> Result<Json<ChainInfo>, Rejection> {
    Ok(Json(ChainInfo {
        node: st.node,
        owner: st.chain.owner()?,
        block: st.chain.block().await?,
        hyperparams: st.chain.hyperparams().await?,
    }))
}

#[derive(Deserialize)]
struct BlockQuery {
    after: Option<BlockNumber>,
    timeout_ms: Option<u64>,
}

async fn block(
    State(st): State<AppState>,
    Query(q): Query<BlockQuery>,
) -> Result<Json<BlockReply>, Rejection> {
    let block = match q.after {
        Some(after) => {
            let wait = Duration::from_millis(q.timeout_ms.unwrap_or(10_000)).min(MAX_WAIT);
            st.chain.wait_for_block_after(after, wait).await
        }
        None => st.chain.block().await,
    }?;
    Ok(Json(BlockReply { block }))
}

async fn metagraph(State(st): State<AppState>) -> Result<Json<crate::Metagraph>, Rejection> {
    Ok(Json(st.chain.metagraph().await?))
}

async fn balance(
    State(st): State<AppState>,
    Path(coldkey): Path<String>,
) -> Result<Json<BalanceReply>, Rejection> {
    let coldkey = Hotkey::from_ss58(&coldkey)
        .map_err(|e| ApiError::bad_request("bad_address", format!("coldkey {coldkey:?}: {e}")))?;
    let balance = st.chain.balance(&coldkey).await?;
    Ok(Json(BalanceReply { coldkey, balance }))
}

/// Runs a chain call off the async runtime: SQLite writes are blocking.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ChainError> + Send + 'static,
) -> Result<T, Rejection> {
    let joined = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(joined?)
}

async fn register(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<(StatusCode, Json<RegisterReply>), Rejection> {
    let call: RegisterCall = parse(&body)?;
    let uid = blocking(move || st.chain.register_signed_by(&caller.hotkey, &call.hotkey)).await?;
    Ok((StatusCode::CREATED, Json(RegisterReply { uid })))
}

async fn serve_axon(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Done>, Rejection> {
    let axon: AxonInfo = parse(&body)?;
    blocking(move || st.chain.serve_axon_signed_by(&caller.hotkey, axon)).await?;
    Ok(Json(Done { ok: true }))
}

async fn set_weights(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Done>, Rejection> {
    let call: SetWeightsCall = parse(&body)?;
    blocking(move || {
        st.chain
            .set_weights_signed_by(&caller.hotkey, &call.weights, call.version_key)
    })
    .await?;
    Ok(Json(Done { ok: true }))
}

async fn add_stake(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Done>, Rejection> {
    let call: AddStakeCall = parse(&body)?;
    blocking(move || {
        st.chain
            .add_stake_signed_by(&caller.hotkey, &call.hotkey, call.amount)
    })
    .await?;
    Ok(Json(Done { ok: true }))
}

async fn schedule(State(st): State<AppState>) -> Result<Json<ScheduleReply>, Rejection> {
    let (block, schedule) = st.chain.model_schedule_now()?;
    Ok(Json(ScheduleReply { block, schedule }))
}

async fn manifest(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Rejection> {
    let id: ManifestId = id.parse().map_err(|e| {
        ApiError::bad_request("bad_manifest_id", format!("manifest id {id:?}: {e}"))
    })?;
    let m = blocking(move || st.chain.manifest_by_id(&id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no manifest {id} is published here")))?;
    // The canonical bytes, so the reader can hash exactly what it got.
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        m.canonical_bytes(),
    )
        .into_response())
}

async fn publish_manifest(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<(StatusCode, Json<PublishReply>), Rejection> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("malformed_json", "manifest is not UTF-8"))?;
    let m = ModelManifest::parse(text)
        .map_err(|e| ApiError::bad_request("invalid_manifest", e.to_string()))?;
    let manifest_id =
        blocking(move || st.chain.publish_manifest_signed_by(&caller.hotkey, &m)).await?;
    Ok((StatusCode::CREATED, Json(PublishReply { manifest_id })))
}

async fn schedule_upgrade(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<ModelSchedule>, Rejection> {
    let up: Upgrade = parse(&body)?;
    let next = blocking(move || st.chain.schedule_upgrade_signed_by(&caller.hotkey, up)).await?;
    Ok(Json(next))
}
