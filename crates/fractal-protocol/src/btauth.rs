//! btauth/1: hotkey-signed HTTP requests, interoperable with the bittensor 11
//! Python SDK (`bittensor.http_auth`).
//!
//! Signed payload (UTF-8, newline-joined):
//! `btauth/1`, scheme, METHOD, path?query, sha256-hex(raw body), nonce (unix ns),
//! sender SS58, receiver SS58 or `-`. sr25519 with context `substrate`.
//!
//! Verification order matches the reference: header shape, receiver binding,
//! freshness, signature, and only then the replay cache, so unauthenticated
//! traffic can never poison the cache against a real sender. Error messages
//! never echo the signature or the payload.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::keys::{parse_signature_hex, Hotkey, Keypair};

pub const PROTOCOL: &str = "btauth/1";
pub const VERSION: &str = "1";
pub const HEADER_VERSION: &str = "X-Bittensor-Version";
pub const HEADER_HOTKEY: &str = "X-Bittensor-Hotkey";
pub const HEADER_RECEIVER: &str = "X-Bittensor-Receiver";
pub const HEADER_NONCE: &str = "X-Bittensor-Nonce";
pub const HEADER_CRYPTO: &str = "X-Bittensor-Crypto";
pub const HEADER_SIGNATURE: &str = "X-Bittensor-Signature";
const SCHEME_SR25519: &str = "sr25519";
const NO_RECEIVER: &str = "-";

pub const DEFAULT_MAX_AGE_NS: u64 = 10_000_000_000;
pub const DEFAULT_ALLOWED_SKEW_NS: u64 = 2_000_000_000;

/// Why a request failed authentication. All of these are HTTP 401; whether an
/// authenticated hotkey may call (403) is the server's policy, not btauth's.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum AuthError {
    #[error("malformed auth: {0}")]
    Malformed(&'static str),
    #[error("request was signed for a different (or no) receiving hotkey")]
    WrongReceiver,
    #[error("nonce is outside the freshness window")]
    Stale,
    #[error("signature does not verify against the claimed hotkey")]
    BadSignature,
    #[error("this nonce was already accepted from this hotkey")]
    Replayed,
    #[error("replay cache is full; retry shortly")]
    Overloaded,
}

impl AuthError {
    /// A stable machine-readable code for error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "auth_malformed",
            AuthError::WrongReceiver => "auth_wrong_receiver",
            AuthError::Stale => "auth_stale",
            AuthError::BadSignature => "auth_bad_signature",
            AuthError::Replayed => "auth_replayed",
            AuthError::Overloaded => "auth_overloaded",
        }
    }
}

/// The exact bytes that are signed.
pub fn payload(
    method: &str,
    path_and_query: &str,
    body: &[u8],
    nonce_ns: u64,
    sender: &Hotkey,
    receiver: Option<&Hotkey>,
) -> Vec<u8> {
    let receiver = receiver.map(Hotkey::to_ss58);
    [
        PROTOCOL,
        SCHEME_SR25519,
        &method.to_ascii_uppercase(),
        path_and_query,
        &hex::encode(Sha256::digest(body)),
        &nonce_ns.to_string(),
        &sender.to_ss58(),
        receiver.as_deref().unwrap_or(NO_RECEIVER),
    ]
    .join("\n")
    .into_bytes()
}

/// The headers that authenticate one request. `path_and_query` must be the
/// request target exactly as it will be sent; every retry needs a fresh nonce.
pub fn sign(
    key: &Keypair,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    receiver: Option<&Hotkey>,
    nonce_ns: u64,
) -> Vec<(&'static str, String)> {
    let sender = key.hotkey();
    let msg = payload(method, path_and_query, body, nonce_ns, &sender, receiver);
    let mut headers = vec![
        (HEADER_VERSION, VERSION.to_string()),
        (HEADER_HOTKEY, sender.to_ss58()),
        (HEADER_NONCE, nonce_ns.to_string()),
        (
            HEADER_SIGNATURE,
            format!("0x{}", hex::encode(key.sign(&msg))),
        ),
    ];
    if let Some(r) = receiver {
        headers.push((HEADER_RECEIVER, r.to_ss58()));
    }
    headers
}

/// Case-insensitive header lookup, so this module needs no HTTP crate.
pub trait Headers {
    fn header(&self, name: &str) -> Option<&str>;
}

impl Headers for [(&str, String)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
impl Headers for Vec<(&str, String)> {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

/// The authenticated sender of a verified request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub hotkey: Hotkey,
    pub nonce_ns: u64,
}

/// A server's verification policy.
#[derive(Clone, Debug)]
pub struct VerifyPolicy {
    pub self_hotkey: Hotkey,
    pub max_age_ns: u64,
    pub allowed_skew_ns: u64,
    pub require_receiver: bool,
}

impl VerifyPolicy {
    pub fn new(self_hotkey: Hotkey) -> Self {
        VerifyPolicy {
            self_hotkey,
            max_age_ns: DEFAULT_MAX_AGE_NS,
            allowed_skew_ns: DEFAULT_ALLOWED_SKEW_NS,
            require_receiver: true,
        }
    }
    /// How long a nonce must be remembered to make replays impossible.
    pub fn window_ns(&self) -> u64 {
        self.max_age_ns + self.allowed_skew_ns
    }
}

/// Verifies one request; `now_ns` is the server's unix time in nanoseconds.
pub fn verify<H: Headers + ?Sized>(
    headers: &H,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    policy: &VerifyPolicy,
    replay: &ReplayCache,
    now_ns: u64,
) -> Result<Caller, AuthError> {
    if headers.header(HEADER_VERSION) != Some(VERSION) {
        return Err(AuthError::Malformed(
            "missing or unsupported X-Bittensor-Version (expected 1)",
        ));
    }
    let sender = headers
        .header(HEADER_HOTKEY)
        .filter(|s| !s.is_empty())
        .ok_or(AuthError::Malformed("missing X-Bittensor-Hotkey"))?;
    let nonce_text = headers
        .header(HEADER_NONCE)
        .ok_or(AuthError::Malformed("missing X-Bittensor-Nonce"))?;
    let nonce: u64 = nonce_text
        .parse()
        .ok()
        .filter(|_| nonce_text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(AuthError::Malformed(
            "X-Bittensor-Nonce is not a decimal integer",
        ))?;
    match headers.header(HEADER_CRYPTO) {
        None => {}
        Some(s) if s.eq_ignore_ascii_case(SCHEME_SR25519) => {}
        Some(_) => return Err(AuthError::Malformed("unsupported X-Bittensor-Crypto")),
    }
    let signature_text = headers
        .header(HEADER_SIGNATURE)
        .ok_or(AuthError::Malformed("missing X-Bittensor-Signature"))?;
    let signature = parse_signature_hex(signature_text)
        .map_err(|_| AuthError::Malformed("invalid hotkey address or signature encoding"))?;
    let receiver_text = headers.header(HEADER_RECEIVER);
    let receiver = match receiver_text {
        None if policy.require_receiver => return Err(AuthError::WrongReceiver),
        None => None,
        Some(r) if r == policy.self_hotkey.to_ss58() => Some(policy.self_hotkey),
        Some(_) => return Err(AuthError::WrongReceiver),
    };
    if now_ns.saturating_sub(nonce) > policy.max_age_ns
        || nonce.saturating_sub(now_ns) > policy.allowed_skew_ns
    {
        return Err(AuthError::Stale);
    }
    let sender = Hotkey::from_ss58(sender)
        .map_err(|_| AuthError::Malformed("invalid hotkey address or signature encoding"))?;
    let msg = payload(
        method,
        path_and_query,
        body,
        nonce,
        &sender,
        receiver.as_ref(),
    );
    if !sender.verify(&msg, &signature) {
        return Err(AuthError::BadSignature);
    }
    replay.check_and_store(sender, nonce, now_ns, policy.window_ns())?;
    Ok(Caller {
        hotkey: sender,
        nonce_ns: nonce,
    })
}

/// Remembers accepted (hotkey, nonce) pairs for the freshness window.
///
/// Memory is bounded by `capacity`; when it is full of unexpired entries new
/// requests fail with [`AuthError::Overloaded`] (fail closed) rather than
/// forgetting a nonce that could then be replayed. Only signature-verified
/// requests reach it, so filling it requires registered keys.
pub struct ReplayCache {
    capacity: usize,
    inner: Mutex<ReplayInner>,
}

#[derive(Default)]
struct ReplayInner {
    seen: HashSet<(Hotkey, u64)>,
    /// (expiry ns, key), in insertion order; expiries are monotone because the
    /// window is constant and insertion time only grows (clock steps backwards
    /// only delay eviction, never lose an entry early).
    expiry: VecDeque<(u64, (Hotkey, u64))>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            capacity,
            inner: Mutex::new(ReplayInner::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("replay cache lock").seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check_and_store(
        &self,
        hotkey: Hotkey,
        nonce: u64,
        now_ns: u64,
        window_ns: u64,
    ) -> Result<(), AuthError> {
        let mut g = self.inner.lock().expect("replay cache lock");
        while g.expiry.front().is_some_and(|(t, _)| *t <= now_ns) {
            let (_, key) = g.expiry.pop_front().expect("checked");
            g.seen.remove(&key);
        }
        if g.seen.contains(&(hotkey, nonce)) {
            return Err(AuthError::Replayed);
        }
        if g.seen.len() >= self.capacity {
            return Err(AuthError::Overloaded);
        }
        g.seen.insert((hotkey, nonce));
        // An entry must outlive the nonce's own acceptance window, which ends
        // max_age after the nonce (future nonces included).
        let expires = now_ns.max(nonce).saturating_add(window_ns);
        let back = g.expiry.back().map_or(0, |(t, _)| *t);
        g.expiry.push_back((expires.max(back), (hotkey, nonce)));
        Ok(())
    }
}

impl Default for ReplayCache {
    fn default() -> Self {
        ReplayCache::new(200_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_000_000_000_000_000;

    struct Setup {
        alice: Keypair,
        bob: Hotkey,
        policy: VerifyPolicy,
        cache: ReplayCache,
    }

    fn setup() -> Setup {
        let bob = Keypair::from_suri("//Bob").unwrap().hotkey();
        Setup {
            alice: Keypair::from_suri("//Alice").unwrap(),
            bob,
            policy: VerifyPolicy::new(bob),
            cache: ReplayCache::new(100),
        }
    }

    fn check(s: &Setup, h: &[(&str, String)], body: &[u8], now: u64) -> Result<Caller, AuthError> {
        verify(
            h,
            "POST",
            "/v1/generate?x=1",
            body,
            &s.policy,
            &s.cache,
            now,
        )
    }

    #[test]
    fn valid_request_is_accepted_once() {
        let s = setup();
        let h = sign(
            &s.alice,
            "post",
            "/v1/generate?x=1",
            b"{}",
            Some(&s.bob),
            NOW,
        );
        let caller = check(&s, &h, b"{}", NOW + 5).unwrap();
        assert_eq!(caller.hotkey, s.alice.hotkey());
        assert_eq!(check(&s, &h, b"{}", NOW + 6), Err(AuthError::Replayed));
    }

    #[test]
    fn each_tampering_is_rejected() {
        let s = setup();
        let h = sign(
            &s.alice,
            "POST",
            "/v1/generate?x=1",
            b"{}",
            Some(&s.bob),
            NOW,
        );
        assert_eq!(
            check(&s, &h, b"{ }", NOW),
            Err(AuthError::BadSignature),
            "body"
        );
        assert_eq!(
            verify(
                &h,
                "PUT",
                "/v1/generate?x=1",
                b"{}",
                &s.policy,
                &s.cache,
                NOW
            ),
            Err(AuthError::BadSignature),
            "method"
        );
        assert_eq!(
            verify(
                &h,
                "POST",
                "/v1/generate?x=2",
                b"{}",
                &s.policy,
                &s.cache,
                NOW
            ),
            Err(AuthError::BadSignature),
            "query"
        );
        let mut sig = h.clone();
        let last = sig
            .iter_mut()
            .find(|(k, _)| *k == HEADER_SIGNATURE)
            .unwrap();
        last.1
            .replace_range(10..11, if &last.1[10..11] == "0" { "1" } else { "0" });
        assert_eq!(
            check(&s, &sig, b"{}", NOW),
            Err(AuthError::BadSignature),
            "signature"
        );
        // Claiming another sender with Alice's signature.
        let mut imp = h.clone();
        imp.iter_mut().find(|(k, _)| *k == HEADER_HOTKEY).unwrap().1 = s.bob.to_ss58();
        assert_eq!(
            check(&s, &imp, b"{}", NOW),
            Err(AuthError::BadSignature),
            "sender"
        );
        assert!(
            s.cache.is_empty(),
            "failed requests must not enter the replay cache"
        );
        // The untampered one still goes through afterwards.
        assert!(check(&s, &h, b"{}", NOW).is_ok());
    }

    #[test]
    fn receiver_binding_and_freshness() {
        let s = setup();
        let charlie = Keypair::from_suri("//Charlie").unwrap().hotkey();
        let wrong = sign(
            &s.alice,
            "POST",
            "/v1/generate?x=1",
            b"",
            Some(&charlie),
            NOW,
        );
        assert_eq!(check(&s, &wrong, b"", NOW), Err(AuthError::WrongReceiver));
        let unbound = sign(&s.alice, "POST", "/v1/generate?x=1", b"", None, NOW);
        assert_eq!(check(&s, &unbound, b"", NOW), Err(AuthError::WrongReceiver));
        let lax = Setup {
            policy: VerifyPolicy {
                require_receiver: false,
                ..s.policy.clone()
            },
            ..setup()
        };
        assert!(check(&lax, &unbound, b"", NOW).is_ok());
        let h = sign(&s.alice, "POST", "/v1/generate?x=1", b"", Some(&s.bob), NOW);
        assert_eq!(
            check(&s, &h, b"", NOW + 10_000_000_001),
            Err(AuthError::Stale),
            "too old"
        );
        assert_eq!(
            check(&s, &h, b"", NOW - 2_000_000_001),
            Err(AuthError::Stale),
            "too far ahead"
        );
        assert!(check(&s, &h, b"", NOW - 2_000_000_000).is_ok(), "skew edge");
    }

    #[test]
    fn malformed_headers() {
        let s = setup();
        let good = sign(&s.alice, "POST", "/v1/generate?x=1", b"", Some(&s.bob), NOW);
        let edit = |name: &'static str, value: Option<&str>| {
            let mut h: Vec<(&str, String)> =
                good.iter().filter(|(k, _)| *k != name).cloned().collect();
            if let Some(v) = value {
                h.push((name, v.to_string()));
            }
            check(&s, &h, b"", NOW).unwrap_err()
        };
        assert!(matches!(
            edit(HEADER_VERSION, None),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_VERSION, Some("2")),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_HOTKEY, Some("")),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_HOTKEY, Some("5notanaddress")),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_NONCE, Some("-5")),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_NONCE, Some("+5")),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_NONCE, Some("99999999999999999999999")),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_SIGNATURE, None),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_SIGNATURE, Some("0xabc")),
            AuthError::Malformed(_)
        ));
        assert!(matches!(
            edit(HEADER_CRYPTO, Some("ecdsa")),
            AuthError::Malformed(_)
        ));
        // Lower-case header names are the same headers.
        let lower: Vec<(&str, String)> = good
            .iter()
            .map(|(k, v)| (&*Box::leak(k.to_lowercase().into_boxed_str()), v.clone()))
            .collect();
        assert!(check(&s, &lower, b"", NOW).is_ok());
    }

    #[test]
    fn replay_cache_expires_and_bounds_memory() {
        let s = setup();
        let cache = ReplayCache::new(3);
        let key = s.alice.hotkey();
        for n in 0..3 {
            cache.check_and_store(key, NOW + n, NOW, 12).unwrap();
        }
        assert_eq!(
            cache.check_and_store(key, NOW + 9, NOW, 12),
            Err(AuthError::Overloaded)
        );
        assert_eq!(
            cache.check_and_store(key, NOW + 1, NOW, 12),
            Err(AuthError::Replayed)
        );
        // After the window the old entries are gone and there is room again.
        cache
            .check_and_store(key, NOW + 100, NOW + 100, 12)
            .unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn python_sdk_vectors_verify() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../../fixtures/interop/bittensor11.json"))
                .unwrap();
        let alice = Keypair::from_suri("//Alice").unwrap().hotkey();
        for v in doc["btauth"].as_array().unwrap() {
            let body = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                v["body_b64"].as_str().unwrap(),
            )
            .unwrap();
            let method = v["method"].as_str().unwrap();
            let path = v["path"].as_str().unwrap();
            let nonce = v["nonce_ns"].as_u64().unwrap();
            let receiver = v["receiver"]
                .as_str()
                .map(|r| Hotkey::from_ss58(r).unwrap());
            let ours = payload(method, path, &body, nonce, &alice, receiver.as_ref());
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                v["payload"].as_str().unwrap()
            );
            let headers: Vec<(&str, String)> = v["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    (
                        &*Box::leak(k.clone().into_boxed_str()),
                        v.as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let policy = VerifyPolicy {
                require_receiver: receiver.is_some(),
                ..VerifyPolicy::new(receiver.unwrap_or(alice))
            };
            let caller = verify(
                &headers,
                method,
                path,
                &body,
                &policy,
                &ReplayCache::default(),
                nonce + 1,
            )
            .unwrap();
            assert_eq!(caller.hotkey, alice);
        }
    }
}
