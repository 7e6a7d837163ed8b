//! The prover's HTTP API on loopback: happy path, progress, audits, and
//! every kind of bad request answered with the right 4xx while it keeps serving.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fractal_engine::{builtin::tiny, PinnedModel, TinyVariant};
use fractal_http::{AllowList, SignedClient};
use fractal_protocol::manifest::Size;
use fractal_protocol::wire::{
    AuditAnswer, AuditChallenge, GenerateRequest, StreamItem, PROTOCOL_VERSION,
};
use fractal_protocol::{JobId, Keypair, Seed};
use fractal_prover::{Prover, ProverConfig};
use reqwest::{Method, StatusCode, Url};

struct Node {
    url: String,
    prover: Keypair,
    client: SignedClient,
    manifest: fractal_protocol::ModelManifest,
}

async fn start(config: ProverConfig) -> Node {
    start_serving(config, &[TinyVariant::Base]).await.0
}

/// A prover of several built-in models; `Node::manifest` is the first.
async fn start_serving(config: ProverConfig, variants: &[TinyVariant]) -> (Node, Arc<Prover>) {
    let prover = Keypair::from_seed(&[1; 32]);
    let verifier = Keypair::from_seed(&[2; 32]);
    let manifest = tiny::manifest(variants[0]);
    let models = variants
        .iter()
        .map(|v| PinnedModel::load(tiny::manifest(*v), None, &Device::Cpu).unwrap())
        .collect();
    let node = Prover::serving(prover.clone(), models, config).unwrap();
    let handle = node.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let auth = Arc::new(AllowList::new([verifier.hotkey()]));
    tokio::spawn(fractal_prover::serve(
        listener,
        node,
        auth,
        std::future::pending(),
    ));
    (
        Node {
            url,
            prover,
            client: SignedClient::new(reqwest::Client::new(), Arc::new(verifier)),
            manifest,
        },
        handle,
    )
}

impl Node {
    fn u(&self, path: &str) -> Url {
        Url::parse(&format!("{}{path}", self.url)).unwrap()
    }
    fn request(&self, seed: u64) -> GenerateRequest {
        let mut r = GenerateRequest::with_defaults(&self.manifest, "a red fox", Seed(seed));
        r.size = Size {
            width: 32,
            height: 32,
        };
        r.frames = 2;
        r.steps = 3;
        r
    }
    /// The Prometheus text of `/metrics` (open, unsigned).
    async fn metrics(&self) -> String {
        reqwest::get(self.u("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
    /// Posts `req` and returns the response as it starts (the stream unread).
    async fn send(&self, req: &GenerateRequest) -> reqwest::Response {
        self.client
            .post_json(self.u("/v1/generate"), &self.prover.hotkey(), req)
            .await
            .unwrap()
    }
    async fn generate(&self, req: &GenerateRequest) -> (StatusCode, Vec<StreamItem>) {
        let resp = self.send(req).await;
        let status = resp.status();
        let body = resp.text().await.unwrap();
        if !status.is_success() {
            return (status, Vec::new());
        }
        (
            status,
            body.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    }
}

#[tokio::test]
async fn generate_streams_progress_then_a_committed_result_and_audits_open_it() {
    let node = start(ProverConfig::default()).await;
    let req = node.request(5);
    let (status, items) = node.generate(&req).await;
    assert_eq!(status, 200);
    let steps: Vec<u32> = items
        .iter()
        .filter_map(|i| match i {
            StreamItem::Progress(p) => Some(p.step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![0, 1, 2, 3]);
    let StreamItem::Result(resp) = items.last().unwrap() else {
        panic!("no result: {items:?}")
    };
    // Trace v2: x_0..x_3 and the three steps' model outputs.
    assert_eq!(resp.trace_len, 7);
    assert_eq!(&resp.content.0[4..8], b"ftyp");

    let challenge = AuditChallenge {
        version: PROTOCOL_VERSION,
        job_id: req.job_id,
        leaves: vec![0, 2, 3, 6],
    };
    let r = node
        .client
        .post_json(node.u("/v1/audit"), &node.prover.hotkey(), &challenge)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: AuditAnswer = r.json().await.unwrap();
    answer.validate(&challenge, &resp.trace_root).unwrap();

    // The same job id again is refused, not recomputed.
    assert_eq!(node.generate(&req).await.0, StatusCode::CONFLICT);
    let info = node
        .client
        .get(node.u("/v1/info"), &node.prover.hotkey())
        .await
        .unwrap();
    let info: serde_json::Value = info.json().await.unwrap();
    assert_eq!(info["manifest_id"], serde_json::json!(node.manifest.id()));
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("fractal_prover_jobs_completed_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fractal_prover_audits_total 1"));
}

#[tokio::test]
async fn bad_requests_get_4xx_and_the_prover_keeps_serving() {
    let node = start(ProverConfig::default()).await;
    let hk = node.prover.hotkey();
    let http = reqwest::Client::new();
    let body = serde_json::to_vec(&node.request(1)).unwrap();

    // Unsigned.
    let r = http
        .post(node.u("/v1/generate"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Signed by a hotkey that is not allowed.
    let stranger = SignedClient::new(http.clone(), Arc::new(Keypair::from_seed(&[9; 32])));
    let r = stranger
        .post_json(node.u("/v1/info"), &hk, &())
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Addressed to another prover.
    let r = node
        .client
        .request(
            Method::POST,
            node.u("/v1/generate"),
            &stranger.hotkey(),
            body.clone(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Replayed.
    let req = node
        .client
        .request(Method::GET, node.u("/v1/info"), &hk, Vec::new())
        .build()
        .unwrap();
    let again = req.try_clone().unwrap();
    assert_eq!(http.execute(req).await.unwrap().status(), 200);
    assert_eq!(http.execute(again).await.unwrap().status(), 401);
    // Malformed, unknown fields, oversized.
    for bad in [&b"{"[..], br#"{"version":1}"#] {
        let r = node
            .client
            .request(Method::POST, node.u("/v1/generate"), &hk, bad.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
    let r = node
        .client
        .request(
            Method::POST,
            node.u("/v1/generate"),
            &hk,
            vec![b' '; 200_000],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Unknown manifest, empty prompt, absurd size.
    let mut req = node.request(2);
    req.manifest_id = tiny::manifest(TinyVariant::Wide).id();
    assert_eq!(node.generate(&req).await.0, 404);
    let mut req = node.request(2);
    req.prompt = " ".into();
    assert_eq!(node.generate(&req).await.0, 400);
    let mut req = node.request(2);
    req.size = Size {
        width: 4096,
        height: 4096,
    };
    assert_eq!(node.generate(&req).await.0, 400);
    // Audits: unknown job, bad steps.
    let unknown = AuditChallenge {
        version: PROTOCOL_VERSION,
        job_id: JobId([3; 16]),
        leaves: vec![0],
    };
    let r = node
        .client
        .post_json(node.u("/v1/audit"), &hk, &unknown)
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let req = node.request(3);
    assert_eq!(node.generate(&req).await.0, 200);
    let out_of_range = AuditChallenge {
        version: PROTOCOL_VERSION,
        job_id: req.job_id,
        leaves: vec![0, 99],
    };
    let r = node
        .client
        .post_json(node.u("/v1/audit"), &hk, &out_of_range)
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http.get(node.u("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Still serving.
    assert_eq!(node.generate(&node.request(4)).await.0, 200);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_expired_traces_are_gone() {
    let node = start(ProverConfig {
        max_concurrent: 1,
        max_queued: 0,
        audit_window: Duration::from_millis(300),
        ..ProverConfig::default()
    })
    .await;
    let hk = node.prover.hotkey();
    let mut slow = node.request(1);
    slow.steps = 20;
    slow.frames = 8;
    let first = node.send(&slow).await;
    assert_eq!(first.status(), 200);
    let r = node.send(&node.request(2)).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    // Hanging up cancels the running job and frees the slot.
    drop(first);
    let mut freed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = node.metrics().await;
        if m.contains("fractal_prover_jobs_cancelled_total 1") {
            freed = true;
            break;
        }
    }
    assert!(freed, "the abandoned job was not cancelled");
    let req = node.request(3);
    assert_eq!(node.generate(&req).await.0, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = AuditChallenge {
        version: PROTOCOL_VERSION,
        job_id: req.job_id,
        leaves: vec![0],
    };
    let r = node
        .client
        .post_json(node.u("/v1/audit"), &hk, &c)
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "trace kept past the audit window");
}

#[tokio::test]
async fn a_prover_of_two_models_serves_each_by_manifest_and_unloads_the_retired_one() {
    use fractal_protocol::{ModelSchedule, Upgrade};
    let (node, prover) = start_serving(
        ProverConfig::default(),
        &[TinyVariant::Base, TinyVariant::Wide],
    )
    .await;
    let hk = node.prover.hotkey();
    let (base, wide) = (
        tiny::manifest(TinyVariant::Base),
        tiny::manifest(TinyVariant::Wide),
    );
    let info: fractal_protocol::wire::ProverInfo = node
        .client
        .request(Method::GET, node.u("/v1/info"), &hk, Vec::new())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info.manifest_ids(), vec![base.id(), wide.id()]);
    // Each request is answered by the model it names.
    for m in [&base, &wide] {
        let mut req = node.request(7);
        req.manifest_id = m.id();
        let (status, items) = node.generate(&req).await;
        assert_eq!(status, 200);
        match items.last().unwrap() {
            StreamItem::Result(r) => assert_eq!(r.manifest_id, m.id()),
            other => panic!("{other:?}"),
        }
        // The manifest document, open and content-addressed.
        let doc = reqwest::get(node.u(&format!("/v1/manifests/{}", m.id())))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            fractal_protocol::ModelManifest::parse(&doc).unwrap().id(),
            m.id()
        );
    }
    // Another model's request: 404 naming what it serves.
    let mut req = node.request(8);
    req.manifest_id = fractal_protocol::ManifestId(fractal_protocol::Digest32([7; 32]));
    let r = node.send(&req).await;
    assert_eq!(r.status(), 404);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("model_not_served") && body.contains(&wide.id().to_string()),
        "{body}"
    );

    // The schedule moves from base to wide: base is unloaded once retired.
    let schedule = ModelSchedule::default()
        .with_upgrade(
            Upgrade {
                manifest: base.id(),
                at_block: 1,
                grace_blocks: 1,
            },
            0,
        )
        .unwrap()
        .with_upgrade(
            Upgrade {
                manifest: wide.id(),
                at_block: 10,
                grace_blocks: 5,
            },
            2,
        )
        .unwrap();
    assert_eq!(prover.apply_schedule(&ModelSchedule::default(), 3), None);
    assert_eq!(prover.apply_schedule(&schedule, 12), Some(true));
    assert_eq!(prover.models().len(), 2, "base is retiring, not retired");
    assert_eq!(prover.apply_schedule(&schedule, 15), Some(true));
    assert_eq!(prover.models().len(), 1);
    let mut req = node.request(9);
    req.manifest_id = base.id();
    assert_eq!(node.generate(&req).await.0, 404);
    // The last model is never unloaded, even when the schedule moved on.
    let later = schedule
        .with_upgrade(
            Upgrade {
                manifest: fractal_protocol::ManifestId(fractal_protocol::Digest32([7; 32])),
                at_block: 20,
                grace_blocks: 1,
            },
            16,
        )
        .unwrap();
    assert_eq!(prover.apply_schedule(&later, 30), Some(false));
    assert_eq!(prover.models().len(), 1);
}

#[tokio::test]
async fn a_request_that_may_not_wait_behind_the_backlog_is_refused_with_it() {
    let (node, prover) = start_serving(ProverConfig::default(), &[TinyVariant::Base]).await;
    let info = prover.info();
    assert_eq!((info.backlog_ms, info.ms_per_frame_step), (None, None));
    // One finished job teaches it its speed; idle, it holds nothing.
    assert_eq!(node.generate(&node.request(1)).await.0, 200);
    let info = prover.info();
    assert!(
        info.ms_per_frame_step.is_some_and(|ms| ms > 0.0),
        "{info:?}"
    );
    assert_eq!(info.backlog_ms, Some(0));
    // Two slow jobs: one runs, one waits behind it.
    let mut slow = node.request(2);
    (slow.frames, slow.steps) = (8, 20);
    let mut held = Vec::new();
    for seed in [2, 3] {
        slow.job_id = JobId::random();
        slow.seed = Seed(seed);
        let r = node.send(&slow).await;
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    let backlog = prover.info().backlog_ms.unwrap();
    assert!(backlog > 0, "two slow jobs held");
    let mut quick = node.request(4);
    quick.start_within_ms = Some(0);
    let r = node.send(&quick).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let body: fractal_http::ErrorBody = r.json().await.unwrap();
    assert_eq!(body.error.code, "queue_too_long");
    assert!(body.error.backlog_ms.is_some_and(|ms| ms > 0), "{body:?}");
    // Without the bound it queues and runs.
    quick.start_within_ms = None;
    quick.job_id = JobId::random();
    let (status, items) = node.generate(&quick).await;
    assert_eq!(status, 200);
    assert!(matches!(items.last(), Some(StreamItem::Result(_))));
    let m = node.metrics().await;
    assert!(m.contains("fractal_prover_jobs_rejected_queue_too_long_total 1"));
}
