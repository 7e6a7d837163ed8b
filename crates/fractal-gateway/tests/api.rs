//! The gateway's HTTP surface on loopback: every kind of bad request gets an
//! OpenAI-shaped 4xx and the gateway keeps serving; accepted jobs are
//! durable and listed; SSE starts with the job's current state.

use std::sync::Arc;
use std::time::Duration;

use fractal_chain::{Chain, Hyperparams, LocalChain};
use fractal_gateway::db::KeyLimits;
use fractal_gateway::{Gateway, GatewayConfig};
use fractal_protocol::Keypair;
use fractal_verifier::store::Store;
use fractal_verifier::{Verifier, VerifierConfig};
use serde_json::{json, Value};

mod common;
use common::{serve, tiny_model, Running};

/// A gateway on a chain with no provers: jobs are accepted and wait.
async fn start(dir: &std::path::Path, limits: KeyLimits) -> Running {
    let key = Keypair::from_seed(&[3; 32]);
    let chain: Arc<dyn Chain> =
        Arc::new(LocalChain::in_memory(Hyperparams::default(), key.hotkey()).unwrap());
    chain
        .register(&Keypair::from_seed(&[4; 32]), &key.hotkey())
        .await
        .unwrap();
    let model = Arc::new(tiny_model());
    let verifier = Verifier::new(
        key,
        chain,
        model.clone(),
        Store::in_memory().unwrap(),
        VerifierConfig::from_manifest(&model.manifest),
    )
    .unwrap();
    let mut config = GatewayConfig::new(dir.to_path_buf());
    config.max_body_bytes = 64 * 1024;
    serve(Gateway::open(config, verifier, model).unwrap(), limits).await
}

async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "expected {status} {code}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(body["error"]["type"].is_string());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_gateway_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), KeyLimits::default()).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", g.base);
    let good = json!({"prompt": "a fox", "size": "32x32", "seconds": "0.5", "steps": 2});

    // Keys.
    expect_error(
        http.post(url("/v1/videos"))
            .json(&good)
            .send()
            .await
            .unwrap(),
        401,
        "missing_api_key",
    )
    .await;
    expect_error(
        http.post(url("/v1/videos"))
            .bearer_auth("fk-nope")
            .json(&good)
            .send()
            .await
            .unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
    expect_error(
        http.get(url("/v1/videos"))
            .header("Authorization", "Basic abc")
            .send()
            .await
            .unwrap(),
        401,
        "invalid_api_key",
    )
    .await;
    let authed = |r: reqwest::RequestBuilder| r.bearer_auth(&g.key);

    // Bodies.
    let raw = |body: &'static str| {
        authed(http.post(url("/v1/videos")))
            .header("Content-Type", "application/json")
            .body(body)
    };
    expect_error(raw("{not json").send().await.unwrap(), 400, "invalid_json").await;
    expect_error(raw("[1, 2]").send().await.unwrap(), 400, "invalid_json").await;
    expect_error(
        authed(http.post(url("/v1/videos")))
            .header("Content-Type", "text/plain")
            .body("hi")
            .send()
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    expect_error(
        authed(http.post(url("/v1/videos")))
            .header("Content-Type", "application/json")
            .body(vec![b' '; 200 * 1024])
            .send()
            .await
            .unwrap(),
        413,
        "request_too_large",
    )
    .await;
    for (body, code, param) in [
        (
            json!({"prompt": "x".repeat(5000)}),
            "string_above_max_length",
            "prompt",
        ),
        (
            json!({"prompt": "x", "size": "1280x720"}),
            "invalid_value",
            "size",
        ),
        (
            json!({"prompt": "x", "seconds": "12"}),
            "invalid_value",
            "seconds",
        ),
        (
            json!({"prompt": "x", "model": "sora-2"}),
            "model_not_found",
            "model",
        ),
        (
            json!({"size": "32x32"}),
            "missing_required_parameter",
            "prompt",
        ),
    ] {
        let b = expect_error(
            authed(http.post(url("/v1/videos")))
                .json(&body)
                .send()
                .await
                .unwrap(),
            400,
            code,
        )
        .await;
        assert_eq!(b["error"]["param"], param);
    }
    let form = reqwest::multipart::Form::new()
        .text("prompt", "a fox")
        .text("seconds", "99");
    expect_error(
        authed(http.post(url("/v1/videos")))
            .multipart(form)
            .send()
            .await
            .unwrap(),
        400,
        "invalid_value",
    )
    .await;

    // Ids, routes, methods, queries.
    expect_error(
        authed(http.get(url("/v1/videos/video_nope")))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        authed(http.get(url("/v1/videos/video_nope/content")))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        authed(http.delete(url("/v1/videos/video_nope")))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        authed(http.get(url("/v1/nothing"))).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        authed(http.put(url("/v1/videos"))).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    expect_error(
        authed(http.get(url("/v1/videos?limit=0")))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_value",
    )
    .await;
    expect_error(
        authed(http.get(url("/v1/videos?limit=abc")))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
    )
    .await;

    // Still serving: a good request is accepted (JSON and multipart alike),
    // durable, and listed.
    let v: Value = authed(http.post(url("/v1/videos")))
        .json(&good)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "queued");
    assert_eq!(v["object"], "video");
    assert_eq!(v["size"], "32x32");
    let form = reqwest::multipart::Form::new()
        .text("prompt", "a fox")
        .text("seconds", "0.5")
        .text("size", "32x32")
        .text("seed", "42");
    let m: Value = authed(http.post(url("/v1/videos")))
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (m["seed"].as_u64(), m["frames"].as_u64()),
        (Some(42), Some(4))
    );
    let id = v["id"].as_str().unwrap().to_string();
    assert!(g.gw.db.job(&id).unwrap().is_some());
    // Not ready yet: content is a 409, not a broken file.
    expect_error(
        authed(http.get(url(&format!("/v1/videos/{id}/content"))))
            .send()
            .await
            .unwrap(),
        409,
        "video_not_ready",
    )
    .await;
    expect_error(
        authed(http.get(url(&format!("/v1/videos/{id}/content?variant=spritesheet"))))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_value",
    )
    .await;
    let list: Value = authed(http.get(url("/v1/videos?limit=1")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["has_more"], true);
    assert_eq!(list["data"][0]["id"], m["id"], "newest first");
    let page2: Value = authed(http.get(url(&format!(
        "/v1/videos?limit=5&after={}",
        m["id"].as_str().unwrap()
    ))))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(page2["data"][0]["id"], v["id"]);
    assert_eq!(page2["has_more"], false);

    // Another key cannot see this one's videos.
    let (_, other) = g.gw.db.create_key("other", KeyLimits::default()).unwrap();
    expect_error(
        http.get(url(&format!("/v1/videos/{id}")))
            .bearer_auth(&other)
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;

    // SSE opens with the current state.
    let mut sse = authed(http.get(url(&format!("/v1/videos/{id}/events"))))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(Duration::from_secs(5), sse.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&first);
    assert!(
        text.contains("event: video") && text.contains(&id),
        "{text}"
    );
    drop(sse);

    // Delete, then it is gone.
    let d: Value = authed(http.delete(url(&format!("/v1/videos/{id}"))))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        d,
        json!({"id": id, "object": "video.deleted", "deleted": true})
    );
    expect_error(
        authed(http.get(url(&format!("/v1/videos/{id}"))))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;

    // The map is served (no provers here) and /metrics counts what happened.
    let grid: Value = authed(http.get(url("/v1/grid")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(grid["object"], "grid");
    let metrics = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fractal_gateway_jobs_accepted_total 2"),
        "{metrics}"
    );
    let page = http
        .get(url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Map of the grid"));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_quotas_answer_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let limits = KeyLimits {
        requests_per_min: 1000,
        creates_per_min: 3,
        max_active: 2,
        daily_quota: 100,
    };
    let g = start(dir.path(), limits).await;
    let http = reqwest::Client::new();
    let create = || {
        http.post(format!("{}/v1/videos", g.base))
            .bearer_auth(&g.key)
            .json(&json!({"prompt": "a fox", "size": "32x32"}))
            .send()
    };
    assert!(create().await.unwrap().status().is_success());
    assert!(create().await.unwrap().status().is_success());
    // Two jobs waiting (no provers): the third is over max_active.
    let r = create().await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    expect_error(r, 429, "too_many_active_jobs").await;
    // The per-minute creation bucket (3) is now empty as well.
    let r = create().await.unwrap();
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    expect_error(r, 429, "rate_limit_exceeded").await;
    // Reads still work.
    let list: Value = http
        .get(format!("{}/v1/videos", g.base))
        .bearer_auth(&g.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_videos_lose_their_files_and_answer_410() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), KeyLimits::default()).await;
    let http = reqwest::Client::new();
    let id = g.create(json!({"prompt": "a fox", "size": "32x32"})).await;
    // Finish it by hand, already past its retention.
    let videos = g.gw.config.videos_dir();
    let rgb = vec![128u8; 32 * 32 * 3 * 2];
    let f = fractal_engine::io::video::Frames {
        rgb: &rgb,
        width: 32,
        height: 32,
        count: 2,
        fps: 8,
    };
    for (ext, bytes) in [
        ("mp4", fractal_engine::io::video::encode_mp4(f).unwrap()),
        ("gif", fractal_engine::io::video::encode_gif(f).unwrap()),
        ("png", fractal_engine::io::video::thumbnail_png(f).unwrap()),
    ] {
        std::fs::write(videos.join(format!("{id}.{ext}")), bytes).unwrap();
    }
    assert!(g.gw.db.start(&id).unwrap());
    let made = fractal_gateway::db::Provenance {
        request_id: "job".into(),
        manifest_id: g.gw.model().manifest_id.to_string(),
        trace_root: "00".repeat(32),
        guidance_scale: 9.0,
    };
    assert!(g
        .gw
        .db
        .complete(&id, "prover", fractal_gateway::db::now_s() - 1, &made)
        .unwrap());
    let content = format!("{}/v1/videos/{id}/content", g.base);
    assert_eq!(
        http.get(&content)
            .bearer_auth(&g.key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        videos.join(format!("{id}.not_sampled.c2pa.mp4")).exists(),
        "the signed copy is cached"
    );
    g.gw.sweep_expired();
    let left: Vec<_> = std::fs::read_dir(&videos).unwrap().collect();
    assert!(left.is_empty(), "files left after expiry: {left:?}");
    expect_error(
        http.get(&content).bearer_auth(&g.key).send().await.unwrap(),
        410,
        "video_expired",
    )
    .await;
    // The record stays: apps still see it completed.
    let v: Value = http
        .get(format!("{}/v1/videos/{id}", g.base))
        .bearer_auth(&g.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "completed");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_jobs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), KeyLimits::default()).await;
    let id = g
        .create(json!({"prompt": "a fox", "size": "32x32", "seed": 9}))
        .await;
    // Simulate a crash mid-job: the row says in_progress.
    assert!(g.gw.db.start(&id).unwrap());
    g.stop().await;
    let g2 = start(dir.path(), KeyLimits::default()).await;
    let job = g2.gw.db.job(&id).unwrap().unwrap();
    assert_eq!(
        job.status,
        fractal_gateway::db::Status::Queued,
        "re-queued at start-up"
    );
    assert_eq!(job.spec.seed, 9, "same seed, so the same video");
    assert!(g2.gw.db.integrity_check().unwrap());
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_with_an_idempotency_key_makes_no_second_job() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), KeyLimits::default()).await;
    let http = reqwest::Client::new();
    let create = |idem: &str| {
        http.post(format!("{}/v1/videos", g.base))
            .bearer_auth(&g.key)
            .header("Idempotency-Key", idem)
            .json(&json!({"prompt": "a fox", "size": "32x32"}))
            .send()
    };
    let first: Value = create("retry-me").await.unwrap().json().await.unwrap();
    let again: Value = create("retry-me").await.unwrap().json().await.unwrap();
    assert_eq!(first["id"], again["id"], "{first} {again}");
    let other: Value = create("another").await.unwrap().json().await.unwrap();
    assert_ne!(first["id"], other["id"]);
    let list: Value = http
        .get(format!("{}/v1/videos", g.base))
        .bearer_auth(&g.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    let long = "k".repeat(256);
    expect_error(create(&long).await.unwrap(), 400, "invalid_idempotency_key").await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_in_openai_shape_and_unknown_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path(), KeyLimits::default()).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", g.base);
    expect_error(
        http.get(url("/v1/models")).send().await.unwrap(),
        401,
        "missing_api_key",
    )
    .await;
    let list: Value = http
        .get(url("/v1/models"))
        .bearer_auth(&g.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let m = &list["data"][0];
    let id = g.gw.model().manifest_id.to_string();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        (&m["id"], &m["object"], &m["owned_by"], &m["state"]),
        (
            &json!("fractal-tiny-v1"),
            &json!("model"),
            &json!("fractal"),
            &json!("active")
        )
    );
    assert_eq!(m["manifest_id"], id.as_str());
    assert_eq!(m["architecture"], "text-to-video-sd");
    assert!(m["created"].as_i64().unwrap() > 1_600_000_000, "{m}");
    assert_eq!((&m["max_frames"], &m["fps"]), (&json!(24), &json!(8)));
    // Retrieve by name or manifest id; an unknown one is a 404 naming it.
    for key in ["fractal-tiny-v1", id.as_str()] {
        let one: Value = http
            .get(url(&format!("/v1/models/{key}")))
            .bearer_auth(&g.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(&one, m);
    }
    let body = expect_error(
        http.get(url("/v1/models/sora-2"))
            .bearer_auth(&g.key)
            .send()
            .await
            .unwrap(),
        404,
        "model_not_found",
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sora-2"));
    // A create naming another model is refused, naming the one there is.
    let body = expect_error(
        http.post(url("/v1/videos"))
            .bearer_auth(&g.key)
            .json(&json!({"prompt": "x", "model": "sora-2"}))
            .send()
            .await
            .unwrap(),
        400,
        "model_not_found",
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("fractal-tiny-v1"));
    // The accepted job records the manifest it will be made with.
    let v: Value = http
        .post(url("/v1/videos"))
        .bearer_auth(&g.key)
        .json(&json!({"prompt": "x", "model": id}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&v["model"], &v["manifest_id"]),
        (&json!("fractal-tiny-v1"), &json!(id))
    );
    g.stop().await;
}

/// A job accepted for the retiring model that nobody serves fails once the
/// model is retired, saying so, and is never made by the new model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_retired_model_nobody_serves_fails_clearly() {
    use fractal_engine::{builtin::tiny, TinyVariant};
    use fractal_protocol::Upgrade;
    let dir = tempfile::tempdir().unwrap();
    let key = Keypair::from_seed(&[3; 32]);
    let chain = Arc::new(LocalChain::in_memory(Hyperparams::default(), key.hotkey()).unwrap());
    chain
        .register(&Keypair::from_seed(&[4; 32]), &key.hotkey())
        .await
        .unwrap();
    let (a, b) = (
        tiny::manifest(TinyVariant::Base),
        tiny::manifest(TinyVariant::Wide),
    );
    for m in [&a, &b] {
        chain.publish_manifest_signed_by(&key.hotkey(), m).unwrap();
    }
    let now = chain.block().await.unwrap();
    let up = |m: &fractal_protocol::ModelManifest, at, grace| Upgrade {
        manifest: m.id(),
        at_block: at,
        grace_blocks: grace,
    };
    chain
        .schedule_upgrade_signed_by(&key.hotkey(), up(&a, now + 1, 1))
        .unwrap();
    chain
        .schedule_upgrade_signed_by(&key.hotkey(), up(&b, now + 2, 5))
        .unwrap();
    chain.produce_blocks(2).unwrap();
    let model = Arc::new(tiny_model());
    let dyn_chain: Arc<dyn Chain> = chain.clone();
    let verifier = Verifier::new(
        key,
        dyn_chain,
        model.clone(),
        Store::in_memory().unwrap(),
        VerifierConfig::from_manifest(&model.manifest),
    )
    .unwrap();
    let mut config = GatewayConfig::new(dir.path().to_path_buf());
    config.probe_every = Duration::from_millis(100);
    let g = serve(
        Gateway::open(config, verifier, model).unwrap(),
        KeyLimits::default(),
    )
    .await;
    let http = reqwest::Client::new();
    let get = |id: String| {
        let (http, url, key) = (
            http.clone(),
            format!("{}/v1/videos/{id}", g.base),
            g.key.clone(),
        );
        async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // The gateway reads the schedule: B active, A retiring.
    let mut offered = Vec::new();
    for _ in 0..50 {
        offered = g.gw.offered().iter().map(|m| m.manifest_id).collect();
        if offered.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(offered, [b.id(), a.id()]);
    let id = g
        .create(json!({"prompt": "a fox", "model": "fractal-tiny-v1"}))
        .await;
    assert_eq!(get(id.clone()).await["status"], "queued");
    // The grace ends with no prover serving A.
    chain.produce_blocks(5).unwrap();
    let mut v = Value::Null;
    for _ in 0..100 {
        v = get(id.clone()).await;
        if v["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "model_retired", "{v}");
    assert_eq!(v["manifest_id"], a.id().to_string());
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not made with another model"));
    g.stop().await;
}
