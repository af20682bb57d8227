//! `POST /init` (http.md §4.4): the host configures the sandbox in one call. Parses the body
//! and hands it to `Session::init`; errors are plain text, as envd's are.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::Agent;
use crate::session::{AccessToken, InitError, InitRequest};

/// The envd protocol version guestd implements (every SDK feature gate up to 0.6.4 is on).
pub const ENVD_VERSION: &str = "0.6.13";

/// Largest `/init` body accepted: env vars and a token, never megabytes.
const MAX_INIT_BODY: usize = 1 << 20;

/// The JSON body; unknown fields are ignored (envd does too).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    env_vars: Option<BTreeMap<String, String>>,
    /// Parsed straight into the redacting type: this struct derives `Debug`.
    access_token: Option<AccessToken>,
    timestamp: Option<String>,
    default_user: Option<String>,
    default_workdir: Option<String>,
    /// guestd extension: overrides the image's start command if it has not run yet.
    start_cmd: Option<String>,
    /// guestd extension: base64 bytes mixed into the kernel's entropy pool (fresh randomness
    /// for a guest restored from a snapshot shared by many sandboxes).
    entropy: Option<String>,
}

pub(super) async fn post_init(State(agent): State<Arc<Agent>>, body: axum::body::Body) -> Response {
    let version = [(HeaderName::X_ENVD_VERSION, HeaderValue::from_static(ENVD_VERSION))];
    let body = match crate::body::read_to_bytes(body, MAX_INIT_BODY, None).await {
        Ok(body) => body,
        Err(crate::body::ReadBodyError::TooLarge { .. }) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, version, "init body too large\n").into_response();
        }
        Err(err) => {
            return (StatusCode::BAD_REQUEST, version, format!("{}\n", crate::error_chain(&err))).into_response();
        }
    };
    let parsed: Body = if body.is_empty() {
        Body::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(err) => {
                return (StatusCode::BAD_REQUEST, version, format!("invalid JSON body: {err}\n")).into_response();
            }
        }
    };
    let rfc3339 = |s: &str| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339);
    let timestamp = match parsed.timestamp.as_deref().map(rfc3339).transpose() {
        Ok(ts) => ts.map(std::time::SystemTime::from),
        Err(err) => return (StatusCode::BAD_REQUEST, version, format!("invalid timestamp: {err}\n")).into_response(),
    };
    let entropy = match parsed.entropy.as_deref().map(|e| base64::engine::general_purpose::STANDARD.decode(e)) {
        None => None,
        Some(Ok(bytes)) => Some(bytes),
        Some(Err(err)) => {
            return (StatusCode::BAD_REQUEST, version, format!("invalid entropy: {err}\n")).into_response();
        }
    };
    let request = InitRequest {
        env_vars: parsed.env_vars,
        access_token: parsed.access_token,
        timestamp,
        default_user: parsed.default_user,
        default_workdir: parsed.default_workdir,
    };
    let outcome = match agent.session.init(request, agent.clock.as_ref()) {
        Ok(outcome) => outcome,
        Err(err @ (InitError::TokenMismatch | InitError::TokenResetNotAuthorized)) => {
            return (StatusCode::UNAUTHORIZED, version, format!("{err}\n")).into_response();
        }
        Err(err @ (InitError::InvalidToken | InitError::InvalidEnvVar { .. })) => {
            return (StatusCode::BAD_REQUEST, version, format!("{err}\n")).into_response();
        }
    };
    if outcome.applied {
        if let Some(bytes) = entropy
            && let Err(err) = crate::sys::entropy::add(&bytes)
        {
            tracing::warn!(error = %err, "cannot add /init entropy to the kernel pool");
        }
        if let Some(cmd) = parsed.start_cmd {
            agent.boot.override_start_cmd(cmd);
        }
        agent.boot.init_received();
    }
    let epoch = HeaderValue::from(outcome.restore_epoch);
    (
        StatusCode::NO_CONTENT,
        [
            (HeaderName::X_ENVD_VERSION, HeaderValue::from_static(ENVD_VERSION)),
            (HeaderName::RESTORE_EPOCH, epoch),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response()
}

/// Response header names of `/init`.
struct HeaderName;

impl HeaderName {
    const X_ENVD_VERSION: header::HeaderName = header::HeaderName::from_static("x-envd-version");
    /// guestd extension: how many snapshot restores this guest has seen.
    const RESTORE_EPOCH: header::HeaderName = header::HeaderName::from_static("x-guestd-restore-epoch");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parsed_body_never_shows_the_token() {
        let body: Body = serde_json::from_str(r#"{"accessToken": "s3cret-token", "defaultUser": "user"}"#).unwrap();
        let shown = format!("{body:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("user"), "{shown}");
    }
}
