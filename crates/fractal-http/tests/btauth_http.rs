//! btauth/1 over real HTTP on loopback: every rejection path gets the right
//! status and the server keeps serving.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Extension, Router};
use base64::Engine as _;
use bytes::Bytes;
use fractal_http::{AllowList, BtAuth, Caller, ErrorBody, SignedClient};
use fractal_protocol::{btauth, Hotkey, Keypair};
use reqwest::{StatusCode, Url};

struct Server {
    base: Url,
    receiver: Hotkey,
}

async fn start() -> Server {
    let receiver = Keypair::from_suri("//Bob").unwrap().hotkey();
    let allowed = [
        Keypair::from_suri("//Alice").unwrap().hotkey(),
        Keypair::from_suri("//Charlie").unwrap().hotkey(),
    ];
    let auth = BtAuth::new(receiver, Arc::new(AllowList::new(allowed))).with_max_body(64 * 1024);
    let app = Router::new()
        .route(
            "/echo",
            post(|Extension(c): Extension<Caller>, body: Bytes| async move {
                format!("{} {}", c.hotkey, body.len())
            }),
        )
        .route(
            "/v1/thing",
            get(|Extension(c): Extension<Caller>| async move { c.hotkey.to_string() }),
        )
        .layer(axum::middleware::from_fn_with_state(
            auth,
            fractal_http::auth::require_btauth,
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base, receiver }
}

async fn raw(
    s: &Server,
    path: &str,
    headers: &[(&'static str, String)],
    body: &[u8],
) -> (StatusCode, String) {
    let mut rb = reqwest::Client::new()
        .post(s.base.join(path).unwrap())
        .body(body.to_vec());
    for (k, v) in headers {
        rb = rb.header(*k, v);
    }
    let resp = rb.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

fn code(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .map(|b| b.error.code)
        .unwrap_or_else(|_| format!("<not an error body: {body}>"))
}

#[tokio::test]
async fn signed_client_round_trip_with_query() {
    let s = start().await;
    let alice = Arc::new(Keypair::from_suri("//Alice").unwrap());
    let client = SignedClient::new(reqwest::Client::new(), alice.clone());
    let resp = client
        .post_json(
            s.base.join("/echo").unwrap(),
            &s.receiver,
            &serde_json::json!({"a": 1}),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), format!("{} 7", alice.hotkey()));
    // Back-to-back requests never collide on nonces; query strings are signed.
    for _ in 0..20 {
        let resp = client
            .get(s.base.join("/v1/thing?x=1&y=%20").unwrap(), &s.receiver)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn every_rejection_has_the_right_status_and_the_server_keeps_serving() {
    let s = start().await;
    let alice = Keypair::from_suri("//Alice").unwrap();
    let now = fractal_http::unix_now_ns();
    let body = br#"{"prompt":"a fox"}"#;
    let sign = |key: &Keypair, receiver: &Hotkey, body: &[u8], nonce: u64| {
        btauth::sign(key, "POST", "/echo", body, Some(receiver), nonce)
    };

    // Unsigned.
    let (st, b) = raw(&s, "/echo", &[], body).await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_malformed")
    );

    // Bad signature: flip one hex digit.
    let mut h = sign(&alice, &s.receiver, body, now);
    let sig = &mut h
        .iter_mut()
        .find(|(k, _)| *k == btauth::HEADER_SIGNATURE)
        .unwrap()
        .1;
    let flipped = if sig.ends_with('0') { '1' } else { '0' };
    sig.pop();
    sig.push(flipped);
    let sig_text = sig.clone();
    let (st, b) = raw(&s, "/echo", &h, body).await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_bad_signature")
    );
    assert!(
        !b.contains(&sig_text[2..]),
        "errors never echo the signature"
    );

    // Wrong receiver.
    let charlie = Keypair::from_suri("//Charlie").unwrap().hotkey();
    let (st, b) = raw(&s, "/echo", &sign(&alice, &charlie, body, now + 1), body).await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_wrong_receiver")
    );

    // Stale and future nonces.
    let (st, b) = raw(
        &s,
        "/echo",
        &sign(&alice, &s.receiver, body, now - 11_000_000_000),
        body,
    )
    .await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_stale")
    );
    let (st, b) = raw(
        &s,
        "/echo",
        &sign(&alice, &s.receiver, body, now + 5_000_000_000),
        body,
    )
    .await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_stale")
    );

    // Body tampering.
    let h = sign(&alice, &s.receiver, body, now + 2);
    let (st, b) = raw(&s, "/echo", &h, br#"{"prompt":"a cat"}"#).await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_bad_signature")
    );

    // The same headers with the right body are accepted once, then replay fails.
    let (st, _) = raw(&s, "/echo", &h, body).await;
    assert_eq!(st, StatusCode::OK);
    let (st, b) = raw(&s, "/echo", &h, body).await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::UNAUTHORIZED, "auth_replayed")
    );

    // Correctly signed by a hotkey that is not permitted.
    let dave = Keypair::from_suri("//Dave").unwrap();
    let (st, b) = raw(&s, "/echo", &sign(&dave, &s.receiver, body, now + 3), body).await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );

    // Oversized bodies, signed or not.
    let big = vec![b'x'; 65 * 1024];
    let (st, b) = raw(&s, "/echo", &sign(&alice, &s.receiver, &big, now + 4), &big).await;
    assert_eq!(
        (st, code(&b).as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );

    // Still serving.
    let (st, b) = raw(
        &s,
        "/echo",
        &sign(&alice, &s.receiver, body, fractal_http::unix_now_ns()),
        body,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
}

/// With FRACTAL_INTEROP_OUT set, writes requests signed here so the Python SDK
/// can verify them (`tools/interop/make_vectors.sh --check FILE`). Always checks
/// that our own verifier accepts them.
#[test]
fn rust_signed_vectors_for_python() {
    let alice = Keypair::from_suri("//Alice").unwrap();
    let bob = Keypair::from_suri("//Bob").unwrap().hotkey();
    let nonce = 1_764_000_000_000_000_000u64;
    let mut out = Vec::new();
    for (method, path, body) in [
        ("POST", "/v1/generate", &br#"{"prompt":"x"}"#[..]),
        ("GET", "/v1/audit?k=1", &b""[..]),
    ] {
        let h = btauth::sign(&alice, method, path, body, Some(&bob), nonce);
        let policy = btauth::VerifyPolicy::new(bob);
        btauth::verify(
            &h,
            method,
            path,
            body,
            &policy,
            &btauth::ReplayCache::default(),
            nonce,
        )
        .unwrap();
        let headers: serde_json::Map<String, serde_json::Value> = h
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        out.push(serde_json::json!({
            "method": method, "path": path, "receiver": bob.to_ss58(), "sender": alice.hotkey().to_ss58(),
            "nonce_ns": nonce, "headers": headers,
            "body_b64": base64::engine::general_purpose::STANDARD.encode(body),
        }));
    }
    if let Some(path) = std::env::var_os("FRACTAL_INTEROP_OUT") {
        let doc = serde_json::json!({ "btauth": out });
        std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    }
}
