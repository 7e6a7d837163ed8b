//! The OpenAI Videos API shapes: the `Video` object, the error body, and
//! turning a create request (JSON or multipart form fields) into a
//! validated [`JobSpec`] for one of the models the grid offers.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;

use crate::db::{Job, JobSpec};
use crate::models::OfferedModel;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct OaiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: &'static str,
    pub retry_after_s: Option<u64>,
}

impl OaiError {
    pub fn invalid(
        param: Option<&'static str>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        OaiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code,
            retry_after_s: None,
        }
    }
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        OaiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
            retry_after_s: None,
        }
    }
    pub fn not_found(what: &str) -> Self {
        OaiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            format!("{what} not found"),
        )
    }
    pub fn rate_limited(
        code: &'static str,
        message: impl Into<String>,
        retry_after_s: u64,
    ) -> Self {
        OaiError {
            retry_after_s: Some(retry_after_s.max(1)),
            ..OaiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                code,
                message,
            )
        }
    }
    pub fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!(%message, "internal error");
        OaiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "internal error; the request was not processed",
        )
    }
}

impl<E: Into<crate::db::DbError>> From<E> for OaiError {
    fn from(e: E) -> Self {
        OaiError::internal(e.into())
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// The `Video` object.
#[derive(Debug, Serialize)]
pub struct Video {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub error: Option<VideoError>,
    pub model: String,
    pub progress: u32,
    pub prompt: String,
    pub remixed_from_video_id: Option<String>,
    pub seconds: String,
    pub size: String,
    pub status: &'static str,
    // Extensions.
    pub seed: u64,
    pub steps: u32,
    pub frames: u32,
    pub negative_prompt: String,
    /// The manifest of the model the video is made with (the one named in
    /// `model`; `None` for videos accepted before jobs recorded it).
    pub manifest_id: Option<String>,
    /// Hotkey of the prover that ran (or is running) it.
    pub prover: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct VideoError {
    pub code: String,
    pub message: String,
}

impl From<&Job> for Video {
    fn from(j: &Job) -> Self {
        Video {
            id: j.id.clone(),
            object: "video",
            created_at: j.created_at,
            completed_at: j.completed_at,
            expires_at: j.expires_at,
            error: j.error.as_ref().map(|(code, message)| VideoError {
                code: code.clone(),
                message: message.clone(),
            }),
            model: j.spec.model.clone(),
            progress: j.progress,
            prompt: j.spec.prompt.clone(),
            remixed_from_video_id: None,
            seconds: j.spec.seconds.clone(),
            size: format!("{}x{}", j.spec.width, j.spec.height),
            status: j.status.as_str(),
            seed: j.spec.seed,
            steps: j.spec.steps,
            frames: j.spec.frames,
            negative_prompt: j.spec.negative_prompt.clone(),
            manifest_id: (!j.spec.manifest_id.is_empty()).then(|| j.spec.manifest_id.clone()),
            prover: j.prover.clone(),
        }
    }
}

/// Create-request fields, from JSON or form fields (every value a string
/// in a form, so numbers are accepted either way).
pub type Fields = BTreeMap<String, Value>;

const KNOWN: [&str; 8] = [
    "prompt",
    "model",
    "seconds",
    "size",
    "seed",
    "steps",
    "negative_prompt",
    "input_reference",
];

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn as_u64(v: &Value, param: &'static str) -> Result<u64, OaiError> {
    let text = as_text(v).ok_or_else(|| {
        OaiError::invalid(
            Some(param),
            "invalid_type",
            format!("{param} must be an integer"),
        )
    })?;
    text.trim().parse().map_err(|_| {
        OaiError::invalid(
            Some(param),
            "invalid_value",
            format!("{param} must be a non-negative integer, got {text:?}"),
        )
    })
}

/// Validates a create request against the model it names among `offered`
/// (by name or manifest id; the first when it names none). `seed` is drawn
/// by the caller when absent (so a resumed job regenerates the same video).
pub fn parse_create(
    fields: &Fields,
    offered: &[OfferedModel],
    fresh_seed: impl FnOnce() -> u64,
) -> Result<JobSpec, OaiError> {
    if let Some(unknown) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(OaiError::invalid(
            None,
            "unknown_parameter",
            format!("Unknown parameter: {unknown:?}"),
        ));
    }
    if fields.contains_key("input_reference") {
        return Err(OaiError::invalid(
            Some("input_reference"),
            "unsupported_parameter",
            "input_reference (image-to-video) is not supported by this grid's model",
        ));
    }
    let chosen = choose_model(fields, offered)?;
    let manifest = &*chosen.manifest;
    let limits = &manifest.limits;
    let d = &manifest.defaults;
    let prompt = match fields.get("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => p.clone(),
        Some(Value::String(_)) => {
            return Err(OaiError::invalid(
                Some("prompt"),
                "empty_string",
                "prompt must not be empty",
            ))
        }
        Some(_) => {
            return Err(OaiError::invalid(
                Some("prompt"),
                "invalid_type",
                "prompt must be a string",
            ))
        }
        None => {
            return Err(OaiError::invalid(
                Some("prompt"),
                "missing_required_parameter",
                "Missing required parameter: 'prompt'",
            ))
        }
    };
    let negative_prompt = match fields.get("negative_prompt") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(OaiError::invalid(
                Some("negative_prompt"),
                "invalid_type",
                "negative_prompt must be a string",
            ))
        }
    };
    for (param, text) in [("prompt", &prompt), ("negative_prompt", &negative_prompt)] {
        if text.len() > limits.max_prompt_bytes as usize {
            return Err(OaiError::invalid(
                Some(if param == "prompt" {
                    "prompt"
                } else {
                    "negative_prompt"
                }),
                "string_above_max_length",
                format!(
                    "{param} is {} bytes; this model accepts at most {}",
                    text.len(),
                    limits.max_prompt_bytes
                ),
            ));
        }
    }
    let sizes: Vec<String> = limits
        .sizes
        .iter()
        .map(|s| format!("{}x{}", s.width, s.height))
        .collect();
    let (width, height) = match fields.get("size").and_then(as_text) {
        None => (d.size.width, d.size.height),
        Some(s) => {
            let Some(size) = limits
                .sizes
                .iter()
                .find(|z| format!("{}x{}", z.width, z.height) == s)
            else {
                return Err(OaiError::invalid(
                    Some("size"),
                    "invalid_value",
                    format!(
                        "Unsupported size {s:?}; this model renders {}",
                        sizes.join(", ")
                    ),
                ));
            };
            (size.width, size.height)
        }
    };
    let fps = d.fps.max(1);
    let max_seconds = limits.max_frames as f64 / fps as f64;
    let (frames, seconds) = match fields.get("seconds") {
        None | Some(Value::Null) => (d.frames, trim_float(d.frames as f64 / fps as f64)),
        Some(v) => {
            let text = as_text(v).unwrap_or_default();
            let secs: f64 = text.trim().parse().map_err(|_| {
                OaiError::invalid(
                    Some("seconds"),
                    "invalid_value",
                    format!("seconds must be a number, got {v}"),
                )
            })?;
            // Rounded up to a count the model makes (Wan: 1 + 4k).
            let frames = (secs * fps as f64).round();
            let frames = if frames >= 1.0 && frames <= limits.max_frames as f64 {
                manifest.frames_at_least(frames as u32) as f64
            } else {
                frames
            };
            if !(secs.is_finite() && frames >= 1.0 && frames <= limits.max_frames as f64) {
                return Err(OaiError::invalid(
                    Some("seconds"),
                    "invalid_value",
                    format!(
                        "Unsupported seconds {text:?}: this model renders 1 to {} frames at {fps} fps (up to {} s)",
                        limits.max_frames,
                        trim_float(max_seconds)
                    ),
                ));
            }
            (frames as u32, trim_float(frames / fps as f64))
        }
    };
    let steps = match fields.get("steps") {
        None | Some(Value::Null) => d.steps,
        Some(v) => {
            let s = as_u64(v, "steps")?;
            if s == 0 || s > limits.max_steps as u64 {
                return Err(OaiError::invalid(
                    Some("steps"),
                    "invalid_value",
                    format!("steps must be 1..={}", limits.max_steps),
                ));
            }
            s as u32
        }
    };
    let seed = match fields.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(v) => as_u64(v, "seed")?,
    };
    Ok(JobSpec {
        prompt,
        negative_prompt,
        seed,
        width,
        height,
        frames,
        steps,
        seconds,
        model: manifest.name.clone(),
        manifest_id: chosen.manifest_id.to_string(),
    })
}

/// The offered model `fields` names, or the default (the first).
fn choose_model<'a>(
    fields: &Fields,
    offered: &'a [OfferedModel],
) -> Result<&'a OfferedModel, OaiError> {
    let named = match fields.get("model") {
        None | Some(Value::Null) => None,
        Some(v) => Some(as_text(v).ok_or_else(|| {
            OaiError::invalid(Some("model"), "invalid_type", "model must be a string")
        })?),
    };
    let found = match &named {
        None => offered.first(),
        Some(m) => offered.iter().find(|o| o.is_named(m)),
    };
    found.ok_or_else(|| {
        if offered.is_empty() {
            return OaiError {
                retry_after_s: Some(5),
                ..OaiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "no_model_served",
                    "No model is served on this grid right now: the gateway has not read the documents of the models the schedule names yet; retry shortly",
                )
            };
        }
        let choices: Vec<String> = offered
            .iter()
            .map(|o| {
                format!(
                    "{:?} (manifest {}, {})",
                    o.manifest.name,
                    o.manifest_id,
                    o.state.name()
                )
            })
            .collect();
        OaiError::invalid(
            Some("model"),
            "model_not_found",
            format!(
                "The model {:?} is not served on this grid; choose one of: {}",
                named.unwrap_or_default(),
                choices.join(", ")
            ),
        )
    })
}

fn trim_float(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Strategy as _;
    use serde_json::json;

    fn fields(v: Value) -> Fields {
        serde_json::from_value(v).unwrap()
    }

    fn offer(variants: &[fractal_engine::TinyVariant]) -> Vec<OfferedModel> {
        variants
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let m = fractal_engine::builtin::tiny::manifest(*v);
                OfferedModel {
                    manifest_id: m.id(),
                    manifest: std::sync::Arc::new(m),
                    state: if i == 0 {
                        fractal_protocol::ModelState::Active
                    } else {
                        fractal_protocol::ModelState::Retiring
                    },
                }
            })
            .collect()
    }

    fn parse(v: Value) -> Result<JobSpec, OaiError> {
        parse_create(
            &fields(v),
            &offer(&[fractal_engine::TinyVariant::Base]),
            || 7,
        )
    }

    #[test]
    fn model_picks_among_the_offered_by_name_or_manifest_id() {
        use fractal_engine::TinyVariant::{Base, Wide};
        let offered = offer(&[Wide, Base]);
        let pick = |v: Value| parse_create(&fields(v), &offered, || 7);
        let default = pick(json!({"prompt": "x"})).unwrap();
        assert_eq!(default.model, "fractal-tiny-wide-v1");
        assert_eq!(default.manifest_id, offered[0].manifest_id.to_string());
        let by_name = pick(json!({"prompt": "x", "model": "fractal-tiny-v1"})).unwrap();
        assert_eq!(by_name.manifest_id, offered[1].manifest_id.to_string());
        let by_id =
            pick(json!({"prompt": "x", "model": offered[1].manifest_id.to_string()})).unwrap();
        assert_eq!(by_id, by_name);
        let e = pick(json!({"prompt": "x", "model": "sora-2"})).unwrap_err();
        assert_eq!(e.code, "model_not_found");
        assert!(
            e.message.contains("fractal-tiny-wide-v1") && e.message.contains("retiring"),
            "{}",
            e.message
        );
        let e = parse_create(&fields(json!({"prompt": "x"})), &[], || 7).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "no_model_served")
        );
    }

    #[test]
    fn defaults_come_from_the_manifest() {
        let s = parse(json!({"prompt": "a fox"})).unwrap();
        assert_eq!(
            (s.width, s.height, s.frames, s.steps, s.seed),
            (64, 64, 8, 10, 7)
        );
        assert_eq!(s.seconds, "1");
        assert_eq!(s.model, "fractal-tiny-v1");
    }

    #[test]
    fn form_strings_and_json_numbers_both_work() {
        let a = parse(
            json!({"prompt": "x", "seconds": "0.5", "size": "32x32", "seed": "42", "steps": "4"}),
        )
        .unwrap();
        let b =
            parse(json!({"prompt": "x", "seconds": 0.5, "size": "32x32", "seed": 42, "steps": 4}))
                .unwrap();
        assert_eq!(a, b);
        assert_eq!((a.frames, a.seconds.as_str(), a.seed), (4, "0.5", 42));
    }

    proptest::proptest! {
        /// Whatever an app sends, parsing answers a spec or a 400, and a
        /// spec is always within the model's limits.
        #[test]
        fn any_fields_give_a_valid_spec_or_a_400(
            pairs in proptest::collection::vec((
                proptest::sample::select(vec!["prompt", "model", "seconds", "size", "seed", "steps", "negative_prompt", "input_reference", "other"]),
                proptest::prop_oneof![
                    proptest::prelude::any::<String>().prop_map(Value::String),
                    proptest::prelude::any::<i64>().prop_map(|n| json!(n)),
                    proptest::prelude::any::<f64>().prop_map(|x| json!(x)),
                    proptest::sample::select(vec!["0.5", "1", "3", "32x32", "64x64", "fractal-tiny-v1", "-1", "1e308", ""]).prop_map(|s| json!(s)),
                    proptest::prelude::Just(Value::Null),
                ],
            ), 0..8),
        ) {
            let f: Fields = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            let m = fractal_engine::builtin::tiny::manifest(fractal_engine::TinyVariant::Base);
            match parse_create(&f, &offer(&[fractal_engine::TinyVariant::Base]), || 1) {
                Ok(s) => {
                    proptest::prop_assert!(!s.prompt.trim().is_empty() && s.prompt.len() <= 1000);
                    proptest::prop_assert!((1..=m.limits.max_frames).contains(&s.frames));
                    proptest::prop_assert!((1..=m.limits.max_steps).contains(&s.steps));
                    proptest::prop_assert!(m.limits.sizes.iter().any(|z| (z.width, z.height) == (s.width, s.height)));
                }
                Err(e) => proptest::prop_assert_eq!(e.status, StatusCode::BAD_REQUEST),
            }
        }
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        for (body, param, code) in [
            (json!({}), Some("prompt"), "missing_required_parameter"),
            (json!({"prompt": " "}), Some("prompt"), "empty_string"),
            (json!({"prompt": 5}), Some("prompt"), "invalid_type"),
            (
                json!({"prompt": "x".repeat(1001)}),
                Some("prompt"),
                "string_above_max_length",
            ),
            (
                json!({"prompt": "x", "size": "720x1280"}),
                Some("size"),
                "invalid_value",
            ),
            (
                json!({"prompt": "x", "seconds": "4"}),
                Some("seconds"),
                "invalid_value",
            ),
            (
                json!({"prompt": "x", "seconds": "0"}),
                Some("seconds"),
                "invalid_value",
            ),
            (
                json!({"prompt": "x", "seconds": "NaN"}),
                Some("seconds"),
                "invalid_value",
            ),
            (
                json!({"prompt": "x", "steps": 0}),
                Some("steps"),
                "invalid_value",
            ),
            (
                json!({"prompt": "x", "steps": "-1"}),
                Some("steps"),
                "invalid_value",
            ),
            (
                json!({"prompt": "x", "seed": -1}),
                Some("seed"),
                "invalid_value",
            ),
            (
                json!({"prompt": "x", "model": "sora-2"}),
                Some("model"),
                "model_not_found",
            ),
            (
                json!({"prompt": "x", "input_reference": "f"}),
                Some("input_reference"),
                "unsupported_parameter",
            ),
            (
                json!({"prompt": "x", "colour": "red"}),
                None,
                "unknown_parameter",
            ),
        ] {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!((e.param, e.code), (param, code), "{body}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }
}
