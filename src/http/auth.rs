//! The access-token gate (http.md §2): once `POST /init` has set a token, every request must
//! carry it in `X-Access-Token`, except the routes a host or a signed URL must reach without
//! it. `/files` also accepts envd's signed URLs. It sits outermost in the service stack, so
//! RPCs and plain routes alike get envd's 401 JSON before anything else runs.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::response::Response;
use base64::Engine;
use http::{Method, Request};
use sha2::{Digest, Sha256};

use super::json_error;
use crate::session::{AccessToken, Session};
use crate::users;

/// Routes open without a token: envd's exempt list plus `/ready` (a readiness probe, like
/// `/health`). `/files` is checked by header or signature instead.
const EXEMPT: &[(Method, &str)] = &[(Method::GET, "/health"), (Method::GET, "/ready"), (Method::POST, "/init")];

/// Why a request was refused; the message is what the client reads (envd's words).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("unauthorized access, please provide a valid access token or method signing if supported")]
    MissingToken,
    #[error("access token present in header but does not match")]
    HeaderMismatch,
    #[error("missing signature query parameter")]
    MissingSignature,
    #[error("invalid signature")]
    InvalidSignature,
    #[error("signature is already expired")]
    Expired,
    #[error("invalid signature_expiration: '{0}'")]
    BadExpiration(String),
    #[error("invalid username: '{0}'")]
    UnknownUser(String),
}

impl AccessError {
    /// 401 for every refusal, except a `signature_expiration` that is not an integer: that is a
    /// malformed request, which envd's parameter binding answers with 400 before any check.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AccessError::BadExpiration(_) => http::StatusCode::BAD_REQUEST,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// envd's URL signature: `v1_` + unpadded standard base64 of
/// sha256(`path:op:username:token[:expiration]`), op `read` (GET) or `write` (POST).
pub fn sign(path: &str, op: &str, username: &str, token: &str, expiration: Option<i64>) -> String {
    let mut raw = format!("{path}:{op}:{username}:{token}");
    if let Some(exp) = expiration {
        raw.push_str(&format!(":{exp}"));
    }
    let digest = Sha256::digest(raw.as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// Decides whether `req` may pass, given the sandbox's token (if any) and the current time.
///
/// envd's order (http.md §1.3): the token gate, then the `Authorization: Basic` user lookup,
/// then (in the `/files` handlers) the signature. A client without the token learns nothing
/// on a gated route, not even whether a user exists.
pub fn check<B>(req: &Request<B>, token: Option<&AccessToken>, now: SystemTime) -> Result<(), AccessError> {
    let Some(token) = token else { return check_basic_user(req) };
    let path = req.uri().path();
    let exempt = EXEMPT.iter().any(|(m, p)| m == req.method() && *p == path);
    let is_files = path == "/files" && (req.method() == Method::GET || req.method() == Method::POST);
    let header = req.headers().get("x-access-token").map(|v| v.to_str().unwrap_or_default());
    if !exempt && !is_files && !header.is_some_and(|presented| token.matches(presented)) {
        return Err(AccessError::MissingToken);
    }
    check_basic_user(req)?;
    if exempt || !is_files {
        return Ok(());
    }
    match header {
        Some(presented) if token.matches(presented) => Ok(()),
        Some(_) => Err(AccessError::HeaderMismatch),
        None => check_signature(req, token, now),
    }
}

fn check_signature<B>(req: &Request<B>, token: &AccessToken, now: SystemTime) -> Result<(), AccessError> {
    let (mut path, mut username, mut signature, mut expiration) = (String::new(), String::new(), None, None);
    for (key, value) in form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()) {
        match &*key {
            "path" => path = value.into_owned(),
            "username" => username = value.into_owned(),
            "signature" => signature = Some(value.into_owned()),
            "signature_expiration" => expiration = Some(value.into_owned()),
            _ => {}
        }
    }
    let signature = signature.ok_or(AccessError::MissingSignature)?;
    let expiration = match expiration {
        Some(raw) => Some(raw.parse::<i64>().map_err(|_| AccessError::BadExpiration(raw))?),
        None => None,
    };
    let op = if req.method() == Method::GET { "read" } else { "write" };
    let expected = sign(&path, op, &username, token.expose(), expiration);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), signature.as_bytes())) {
        return Err(AccessError::InvalidSignature);
    }
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    match expiration {
        Some(exp) if exp < now => Err(AccessError::Expired),
        _ => Ok(()),
    }
}

/// An unknown `Authorization: Basic` user is refused on plain HTTP routes (envd's authn
/// middleware). RPC paths check it in `crate::rpc`, so the error reaches the client in its
/// protocol (a Connect or gRPC error rather than plain JSON).
fn check_basic_user<B>(req: &Request<B>) -> Result<(), AccessError> {
    if is_rpc_path(req.uri().path()) {
        return Ok(());
    }
    let Some(value) = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let Some(encoded) = value.strip_prefix("Basic ") else { return Ok(()) };
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).unwrap_or_default();
    let decoded = String::from_utf8_lossy(&decoded);
    let name = decoded.split_once(':').map_or(&*decoded, |(user, _)| user);
    match users::lookup(name) {
        Ok(_) => Ok(()),
        Err(_) => Err(AccessError::UnknownUser(name.to_owned())),
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Native gRPC clients read refusals from `grpc-status`, not from the HTTP status: a
/// trailers-only UNAUTHENTICATED response.
fn grpc_unauthenticated(message: &str) -> Response {
    tonic::Status::unauthenticated(message).into_http()
}

/// `/pkg.Service/Method`: the first segment of an RPC path names a package-qualified service.
fn is_rpc_path(path: &str) -> bool {
    path.strip_prefix('/').and_then(|p| p.split_once('/')).is_some_and(|(service, _)| service.contains('.'))
}

/// Tower layer applying [`check`] to every request.
#[derive(Clone)]
pub struct AccessLayer {
    session: Session,
}

impl AccessLayer {
    pub fn new(session: Session) -> AccessLayer {
        AccessLayer { session }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessService { inner, session: self.session.clone() }
    }
}

#[derive(Clone)]
pub struct AccessService<S> {
    inner: S,
    session: Session,
}

impl<S> tower::Service<Request<Body>> for AccessService<S>
where
    S: tower::Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match check(&req, self.session.token().as_ref(), SystemTime::now()) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(err) if is_grpc(&req) => Box::pin(std::future::ready(Ok(grpc_unauthenticated(&err.to_string())))),
            Err(err @ AccessError::UnknownUser(_)) => {
                // envd's authn middleware answers in Connect's error shape, not its API one.
                let body = serde_json::json!({"code": "unauthenticated", "message": err.to_string()});
                Box::pin(std::future::ready(Ok(super::json_response(http::StatusCode::UNAUTHORIZED, &body))))
            }
            Err(err) => Box::pin(std::future::ready(Ok(json_error(err.status(), &err.to_string())))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::session::{InitRequest, SystemClock};

    fn token(value: &str) -> AccessToken {
        let session = Session::new("root");
        session.init(InitRequest { access_token: Some(value.into()), ..Default::default() }, &SystemClock).unwrap();
        session.token().unwrap()
    }

    fn req(method: Method, uri: &str, header: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(h) = header {
            b = b.header("x-access-token", h);
        }
        b.body(()).unwrap()
    }

    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    #[test]
    fn signature_matches_the_sdk_algorithm() {
        // Python SDK: "v1_" + base64(sha256(b"path:op:user:token")).rstrip("=").
        assert_eq!(sign("/a.txt", "read", "user", "tok", None), "v1_XWtxPEXQ32YosE/vTtefo243c2C5X+tZLB5JIEwmFHI");
    }

    #[test]
    fn without_a_token_everything_passes() {
        assert_eq!(check(&req(Method::POST, "/process.Process/List", None), None, now()), Ok(()));
    }

    #[test]
    fn with_a_token_the_header_is_required_except_on_exempt_routes() {
        let tok = token("secret");
        let t = Some(&tok);
        assert_eq!(check(&req(Method::POST, "/process.Process/List", None), t, now()), Err(AccessError::MissingToken));
        assert_eq!(
            check(&req(Method::POST, "/process.Process/List", Some("nope")), t, now()),
            Err(AccessError::MissingToken)
        );
        assert_eq!(check(&req(Method::POST, "/process.Process/List", Some("secret")), t, now()), Ok(()));
        assert_eq!(check(&req(Method::GET, "/metrics", None), t, now()), Err(AccessError::MissingToken));
        assert_eq!(check(&req(Method::GET, "/nowhere", None), t, now()), Err(AccessError::MissingToken));
        for (m, p) in [(Method::GET, "/health"), (Method::POST, "/init"), (Method::GET, "/ready")] {
            assert_eq!(check(&req(m, p, None), t, now()), Ok(()));
        }
    }

    #[test]
    fn files_accept_a_header_or_a_valid_signature() {
        let tok = token("secret");
        let t = Some(&tok);
        assert_eq!(check(&req(Method::GET, "/files?path=/x", Some("secret")), t, now()), Ok(()));
        assert_eq!(
            check(&req(Method::GET, "/files?path=/x", Some("wrong")), t, now()),
            Err(AccessError::HeaderMismatch),
            "a wrong header is an error even next to a valid signature"
        );
        assert_eq!(check(&req(Method::GET, "/files?path=/x", None), t, now()), Err(AccessError::MissingSignature));

        let exp = NOW as i64 + 60;
        let read = sign("/x", "read", "user", "secret", Some(exp));
        let uri = |sig: &str, exp: i64| {
            format!("/files?path=%2Fx&username=user&signature={}&signature_expiration={exp}", urlenc(sig))
        };
        assert_eq!(check(&req(Method::GET, &uri(&read, exp), None), t, now()), Ok(()));
        // Wrong op, path, token or a changed expiration all invalidate it.
        assert_eq!(check(&req(Method::POST, &uri(&read, exp), None), t, now()), Err(AccessError::InvalidSignature));
        assert_eq!(check(&req(Method::GET, &uri(&read, exp + 1), None), t, now()), Err(AccessError::InvalidSignature));
        let other_path = sign("/y", "read", "user", "secret", Some(exp));
        assert_eq!(
            check(&req(Method::GET, &uri(&other_path, exp), None), t, now()),
            Err(AccessError::InvalidSignature)
        );
        let other_token = sign("/x", "read", "user", "other", Some(exp));
        assert_eq!(
            check(&req(Method::GET, &uri(&other_token, exp), None), t, now()),
            Err(AccessError::InvalidSignature)
        );
        // Expired, once the signature itself is valid.
        let past = NOW as i64 - 1;
        let expired = sign("/x", "read", "user", "secret", Some(past));
        assert_eq!(check(&req(Method::GET, &uri(&expired, past), None), t, now()), Err(AccessError::Expired));
        // Without an expiration the signature never expires.
        let forever = sign("/x", "write", "", "secret", None);
        let uri = format!("/files?path=/x&signature={}", urlenc(&forever));
        assert_eq!(check(&req(Method::POST, &uri, None), t, now()), Ok(()));
    }

    #[test]
    fn unknown_basic_user_is_refused_on_plain_routes() {
        let mut r = req(Method::GET, "/health", None);
        r.headers_mut().insert("authorization", "Basic bm9ib2R5LWF0LWFsbDo=".parse().unwrap());
        assert_eq!(check(&r, None, now()), Err(AccessError::UnknownUser("nobody-at-all".into())));
        let mut rpc = req(Method::POST, "/process.Process/List", None);
        rpc.headers_mut().insert("authorization", "Basic bm9ib2R5LWF0LWFsbDo=".parse().unwrap());
        assert_eq!(check(&rpc, None, now()), Ok(()), "RPCs answer in their own protocol");
    }

    #[test]
    fn the_token_gate_runs_before_the_user_lookup() {
        // envd's order (http.md §1.3): without the token a client learns nothing, not even
        // whether a user exists.
        let tok = token("secret");
        let basic = |mut r: Request<()>| {
            r.headers_mut().insert("authorization", "Basic bm9ib2R5LWF0LWFsbDo=".parse().unwrap());
            r
        };
        let metrics = basic(req(Method::GET, "/metrics", None));
        assert_eq!(check(&metrics, Some(&tok), now()), Err(AccessError::MissingToken));
        let metrics = basic(req(Method::GET, "/metrics", Some("secret")));
        assert_eq!(check(&metrics, Some(&tok), now()), Err(AccessError::UnknownUser("nobody-at-all".into())));
        // Routes the gate exempts still meet the user lookup.
        let health = basic(req(Method::GET, "/health", None));
        assert_eq!(check(&health, Some(&tok), now()), Err(AccessError::UnknownUser("nobody-at-all".into())));
        let files = basic(req(Method::GET, "/files?path=/x", None));
        assert_eq!(check(&files, Some(&tok), now()), Err(AccessError::UnknownUser("nobody-at-all".into())));
    }

    fn urlenc(s: &str) -> String {
        form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }
}
