//! Client side of btauth/1: a reqwest client that signs every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fractal_protocol::{btauth, Hotkey, Keypair};
use reqwest::{Method, Response, Url};
use serde::Serialize;

/// Signs each request with this node's hotkey, bound to the receiving hotkey.
#[derive(Clone)]
pub struct SignedClient {
    http: reqwest::Client,
    key: Arc<Keypair>,
    last_nonce: Arc<AtomicU64>,
}

impl SignedClient {
    pub fn new(http: reqwest::Client, key: Arc<Keypair>) -> Self {
        SignedClient {
            http,
            key,
            last_nonce: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn hotkey(&self) -> Hotkey {
        self.key.hotkey()
    }

    /// Strictly increasing nanosecond nonces, so two requests in the same
    /// nanosecond are never mistaken for a replay.
    fn next_nonce(&self) -> u64 {
        let now = crate::unix_now_ns();
        let mut prev = self.last_nonce.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self.last_nonce.compare_exchange_weak(
                prev,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    /// Builds a signed request; `body` is sent exactly as signed.
    pub fn request(
        &self,
        method: Method,
        url: Url,
        receiver: &Hotkey,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        let target = match url.query() {
            Some(q) => format!("{}?{}", url.path(), q),
            None => url.path().to_string(),
        };
        let headers = btauth::sign(
            &self.key,
            method.as_str(),
            &target,
            &body,
            Some(receiver),
            self.next_nonce(),
        );
        let mut rb = self.http.request(method, url);
        for (name, value) in headers {
            rb = rb.header(name, value);
        }
        rb.body(body)
    }

    pub async fn post_json<T: Serialize + ?Sized>(
        &self,
        url: Url,
        receiver: &Hotkey,
        value: &T,
    ) -> reqwest::Result<Response> {
        let body = serde_json::to_vec(value).expect("request types serialise");
        self.request(Method::POST, url, receiver, body)
            .header(http::header::CONTENT_TYPE, "application/json")
            .send()
            .await
    }

    pub async fn get(&self, url: Url, receiver: &Hotkey) -> reqwest::Result<Response> {
        self.request(Method::GET, url, receiver, Vec::new())
            .send()
            .await
    }
}
