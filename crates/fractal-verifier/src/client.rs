//! Calling provers: signed generate (reading the NDJSON stream) and audits.

use std::time::{Duration, Instant};

use fractal_http::{ErrorBody, SignedClient};
use fractal_protocol::wire::{
    AuditAnswer, AuditChallenge, GenerateRequest, GenerateResponse, ProgressEvent, ProverInfo,
    StreamItem,
};
use fractal_protocol::Hotkey;
use reqwest::Url;

/// Why a call to a prover produced nothing usable.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CallError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Full, or holding more work than the request allowed to wait
    /// behind (`backlog_ms`: how much, by its estimate).
    #[error("prover is busy (retry after {retry_after:?} s, backlog {backlog_ms:?} ms)")]
    Busy {
        retry_after: Option<u64>,
        backlog_ms: Option<u64>,
    },
    #[error("prover refused: HTTP {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("job failed on the prover: {code}: {message}")]
    JobFailed { code: String, message: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// Largest NDJSON answer accepted (a video plus its progress lines).
const MAX_ANSWER: usize = 256 << 20;

pub struct ProverClient {
    signer: SignedClient,
}

#[derive(Clone, Debug)]
pub struct Generated {
    pub response: GenerateResponse,
    /// From sending the request to the last byte of the result.
    pub latency: Duration,
    /// From the first progress line to the result: the prover's own time.
    pub service: Duration,
}

impl ProverClient {
    pub fn new(signer: SignedClient) -> Self {
        ProverClient { signer }
    }

    async fn refused(resp: reqwest::Response) -> CallError {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice::<ErrorBody>(&bytes);
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            return CallError::Busy {
                retry_after,
                backlog_ms: body.ok().and_then(|b| b.error.backlog_ms),
            };
        }
        match body {
            Ok(b) => CallError::Refused {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => CallError::Refused {
                status: status.as_u16(),
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            },
        }
    }

    /// Runs `req` on the prover at `base`, calling `on_progress` for each
    /// progress line; gives up after `deadline`.
    pub async fn generate(
        &self,
        base: &str,
        prover: &Hotkey,
        req: &GenerateRequest,
        deadline: Duration,
        on_progress: &mut (dyn FnMut(&ProgressEvent) + Send),
    ) -> Result<Generated, CallError> {
        let start = Instant::now();
        let work = async {
            let url = Url::parse(base)
                .and_then(|u| u.join("/v1/generate"))
                .map_err(|e| CallError::Transport(e.to_string()))?;
            let mut resp = self
                .signer
                .post_json(url, prover, req)
                .await
                .map_err(|e| CallError::Transport(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(Self::refused(resp).await);
            }
            let mut buf: Vec<u8> = Vec::new();
            let mut first_progress: Option<Instant> = None;
            loop {
                let chunk = resp
                    .chunk()
                    .await
                    .map_err(|e| CallError::Transport(e.to_string()))?;
                let Some(chunk) = chunk else {
                    return Err(CallError::Malformed("stream ended without a result".into()));
                };
                buf.extend_from_slice(&chunk);
                if buf.len() > MAX_ANSWER {
                    return Err(CallError::Malformed("answer too large".into()));
                }
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let item: StreamItem = serde_json::from_slice(&line[..line.len() - 1])
                        .map_err(|e| CallError::Malformed(format!("stream line: {e}")))?;
                    match item {
                        StreamItem::Progress(p) => {
                            first_progress.get_or_insert_with(Instant::now);
                            on_progress(&p);
                        }
                        StreamItem::Result(r) => {
                            let now = Instant::now();
                            return Ok(Generated {
                                response: *r,
                                latency: now - start,
                                service: now - first_progress.unwrap_or(start),
                            });
                        }
                        StreamItem::Error { code, message } => {
                            return Err(CallError::JobFailed { code, message })
                        }
                    }
                }
            }
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| CallError::Timeout(deadline))?
    }

    /// A signed `GET path` on the prover, answered 2xx within `deadline`:
    /// its body.
    async fn get_bytes(
        &self,
        base: &str,
        path: &str,
        prover: &Hotkey,
        deadline: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let work = async {
            let url = Url::parse(base)
                .and_then(|u| u.join(path))
                .map_err(|e| CallError::Transport(e.to_string()))?;
            let resp = self
                .signer
                .get(url, prover)
                .await
                .map_err(|e| CallError::Transport(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(Self::refused(resp).await);
            }
            resp.bytes()
                .await
                .map(|b| b.to_vec())
                .map_err(|e| CallError::Transport(e.to_string()))
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| CallError::Timeout(deadline))?
    }

    /// The prover's `GET /v1/info` and the round trip it took: the map's
    /// RTT probe (signed, so it also checks the prover still accepts us).
    pub async fn info(
        &self,
        base: &str,
        prover: &Hotkey,
        deadline: Duration,
    ) -> Result<(ProverInfo, Duration), CallError> {
        let start = Instant::now();
        let bytes = self.get_bytes(base, "/v1/info", prover, deadline).await?;
        let info: ProverInfo = serde_json::from_slice(&bytes)
            .map_err(|e| CallError::Malformed(format!("info: {e}")))?;
        Ok((info, start.elapsed()))
    }

    /// A manifest document a prover serves (`GET /v1/manifests/{id}`),
    /// checked to hash to `id`: the carrier need not be trusted.
    pub async fn manifest(
        &self,
        base: &str,
        prover: &Hotkey,
        id: &fractal_protocol::ManifestId,
        deadline: Duration,
    ) -> Result<fractal_protocol::ModelManifest, CallError> {
        let bytes = self
            .get_bytes(base, &format!("/v1/manifests/{id}"), prover, deadline)
            .await?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| CallError::Malformed(format!("manifest: {e}")))?;
        let m = fractal_protocol::ModelManifest::parse(text)
            .map_err(|e| CallError::Malformed(format!("manifest: {e}")))?;
        if &m.id() != id {
            return Err(CallError::Malformed(format!(
                "the manifest served as {id} hashes to {}",
                m.id()
            )));
        }
        Ok(m)
    }

    pub async fn audit(
        &self,
        base: &str,
        prover: &Hotkey,
        challenge: &AuditChallenge,
        deadline: Duration,
    ) -> Result<AuditAnswer, CallError> {
        let work = async {
            let url = Url::parse(base)
                .and_then(|u| u.join("/v1/audit"))
                .map_err(|e| CallError::Transport(e.to_string()))?;
            let resp = self
                .signer
                .post_json(url, prover, challenge)
                .await
                .map_err(|e| CallError::Transport(e.to_string()))?;
            if !resp.status().is_success() {
                return Err(Self::refused(resp).await);
            }
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| CallError::Transport(e.to_string()))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| CallError::Malformed(format!("audit answer: {e}")))
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| CallError::Timeout(deadline))?
    }
}
