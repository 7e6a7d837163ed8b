//! Server side of btauth/1 as axum middleware.
//!
//! ```ignore
//! let auth = BtAuth::new(my_hotkey, Arc::new(AllowList::new([gateway])));
//! let app = Router::new().route("/v1/generate", post(generate))
//!     .layer(axum::middleware::from_fn_with_state(auth, fractal_http::auth::require_btauth));
//! // handlers: async fn generate(Extension(caller): Extension<Caller>, body: Bytes)
//! ```
//! The middleware buffers the body (bounded by `max_body`, 413 beyond), hashes
//! the raw bytes, verifies, asks the [`Authorizer`], and hands the same bytes on.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{OriginalUri, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fractal_protocol::btauth::{self, AuthError, ReplayCache, VerifyPolicy};
use fractal_protocol::Hotkey;

use crate::ApiError;

/// Why an authenticated hotkey may not call (HTTP 403).
#[derive(Debug, Clone)]
pub struct Denied(pub String);

/// Decides which authenticated hotkeys may call a server (e.g. registered
/// validators with a permit, or the gateway's hotkey).
pub trait Authorizer: Send + Sync + 'static {
    fn authorize(&self, hotkey: &Hotkey) -> Result<(), Denied>;
}

/// Any correctly signed request is admitted (for open, read-only endpoints).
pub struct AllowAll;
impl Authorizer for AllowAll {
    fn authorize(&self, _: &Hotkey) -> Result<(), Denied> {
        Ok(())
    }
}

/// A fixed set of hotkeys.
pub struct AllowList(HashSet<Hotkey>);
impl AllowList {
    pub fn new(keys: impl IntoIterator<Item = Hotkey>) -> Self {
        AllowList(keys.into_iter().collect())
    }
}
impl Authorizer for AllowList {
    fn authorize(&self, hotkey: &Hotkey) -> Result<(), Denied> {
        if self.0.contains(hotkey) {
            Ok(())
        } else {
            Err(Denied(format!(
                "hotkey {hotkey} is not permitted to call this node"
            )))
        }
    }
}

/// State of the btauth middleware; cheap to clone.
#[derive(Clone)]
pub struct BtAuth {
    policy: Arc<VerifyPolicy>,
    replay: Arc<ReplayCache>,
    authorizer: Arc<dyn Authorizer>,
    max_body: usize,
}

impl BtAuth {
    pub fn new(self_hotkey: Hotkey, authorizer: Arc<dyn Authorizer>) -> Self {
        BtAuth {
            policy: Arc::new(VerifyPolicy::new(self_hotkey)),
            replay: Arc::new(ReplayCache::default()),
            authorizer,
            max_body: 1024 * 1024,
        }
    }
    pub fn with_max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }
    pub fn with_policy(mut self, policy: VerifyPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }
    pub fn with_replay_cache(mut self, cache: ReplayCache) -> Self {
        self.replay = Arc::new(cache);
        self
    }
}

struct HeaderView<'a>(&'a http::HeaderMap);
impl btauth::Headers for HeaderView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

fn auth_error(e: AuthError) -> ApiError {
    match e {
        AuthError::Overloaded => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string())
                .with_retry_after(1)
        }
        _ => ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()),
    }
}

/// The middleware: see the module docs.
pub async fn require_btauth(State(auth): State<BtAuth>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    // Declared lengths over the limit are refused before reading anything.
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > auth.max_body as u64) {
        return too_large(auth.max_body);
    }
    let bytes = match axum::body::to_bytes(body, auth.max_body).await {
        Ok(b) => b,
        Err(_) => return too_large(auth.max_body),
    };
    // Signatures cover the target as the client sent it, before any nesting.
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map(|o| o.0.clone())
        .unwrap_or_else(|| parts.uri.clone());
    let target = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let now = crate::unix_now_ns();
    let caller = match btauth::verify(
        &HeaderView(&parts.headers),
        parts.method.as_str(),
        target,
        &bytes,
        &auth.policy,
        &auth.replay,
        now,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "btauth rejected");
            return auth_error(e).into_response();
        }
    };
    if let Err(Denied(why)) = auth.authorizer.authorize(&caller.hotkey) {
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", why).into_response();
    }
    parts.extensions.insert(caller);
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn too_large(limit: usize) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body exceeds {limit} bytes"),
    )
    .into_response()
}
