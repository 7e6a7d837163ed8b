//! Fairness under faults: an audit call lost in transport is retried
//! before the prover is judged; a prover that never answers it still fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use candle_core::Device;
use fractal_chain::Hyperparams;
use fractal_engine::{pipelines::text_to_video_sd::Model, TinyVariant};
use fractal_prover::Strategy;
use fractal_verifier::audit::Check;
use fractal_verifier::AUDIT_ATTEMPTS;

mod common;
use common::{local_grid, pinned, serve_prover, tiny_verifier};

/// A link in front of a prover that forwards everything, except that the
/// first `drop_audits` audit calls hang until the caller gives up.
#[derive(Clone)]
struct FaultyLink {
    upstream: String,
    http: reqwest::Client,
    drop_audits: usize,
    audits: Arc<AtomicUsize>,
}

async fn forward(
    State(link): State<FaultyLink>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    if uri.path() == "/v1/audit" && link.audits.fetch_add(1, Ordering::SeqCst) < link.drop_audits {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let mut req = link
        .http
        .request(method, format!("{}{}", link.upstream, uri))
        .body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            req = req.header(name, value);
        }
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            let ctype = resp.headers().get("content-type").cloned();
            let bytes = resp.bytes().await.unwrap_or_default();
            let mut out = (status, bytes).into_response();
            if let Some(c) = ctype {
                out.headers_mut().insert("content-type", c);
            }
            out
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// A local chain, one honest prover behind a link dropping its first
/// `drop_audits` audit calls, and a verifier; returns the outcome of one
/// challenge and how many audit calls reached the link.
async fn challenge_through(
    drop_audits: usize,
) -> (Option<fractal_verifier::audit::Failure>, usize) {
    let params = Hyperparams {
        tempo: 5,
        ..Hyperparams::default()
    };
    let (chain, vkey, auth) = local_grid(params, 1).await;
    let base = Model::tiny(TinyVariant::Base, &Device::Cpu).unwrap();
    let (hot, addr) = serve_prover(&chain, "prover", pinned(base), Strategy::Honest, auth).await;
    let upstream = format!("http://{addr}");

    let audits = Arc::new(AtomicUsize::new(0));
    let link = FaultyLink {
        upstream,
        http: reqwest::Client::new(),
        drop_audits,
        audits: audits.clone(),
    };
    let app = axum::Router::new().fallback(forward).with_state(link);
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(front, app).await });
    fractal_prover::announce(chain.as_ref(), &hot, front_addr)
        .await
        .unwrap();
    chain.produce_blocks(1).unwrap();

    let verifier = tiny_verifier(vkey, chain.clone(), Duration::from_secs(2));
    let mut results = verifier.round().await.unwrap();
    assert_eq!(results.len(), 1);
    (results.remove(0).failed, audits.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_audit_call_is_retried_before_judging() {
    let (failed, calls) = challenge_through(1).await;
    assert_eq!(
        failed, None,
        "an honest prover with one lost audit reply was failed"
    );
    assert_eq!(calls, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prover_that_never_answers_the_audit_fails_after_the_retries() {
    let (failed, calls) = challenge_through(usize::MAX).await;
    let f = failed.expect("never answering must fail");
    assert_eq!(f.check, Check::Commitment, "{f}");
    assert!(
        f.detail
            .contains(&format!("after {AUDIT_ATTEMPTS} attempt")),
        "{f}"
    );
    assert_eq!(calls, AUDIT_ATTEMPTS as usize);
}
