//! Plain HTTP routes served beside the RPC services on the same port: `/health`, `/ready`,
//! `/init`, `/envs`, `/metrics`, `/files`; plus the access-token gate ([`auth`]) that sits in
//! front of everything. Handlers parse, call the domain, and answer in envd's formats.

pub mod auth;
pub mod files;
mod init;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use self::init::ENVD_VERSION;
use crate::Agent;

/// Adds the plain HTTP routes to the RPC router built by `crate::rpc`.
pub fn routes(agent: Arc<Agent>, rpc: Router) -> Router {
    let files = files::method_router(files::FilesState { session: agent.session.clone() });
    let plain = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/init", post(init::post_init))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics))
        .with_state(agent)
        .route("/files", files);
    rpc.merge(plain).fallback(not_found)
}

/// 204 once guestd is serving (envd answers the same; orchestrators poll it).
async fn health() -> impl IntoResponse {
    (StatusCode::NO_CONTENT, [no_store()])
}

/// guestd extension: 200 once the start command is ready, else 503; both with a JSON status.
async fn ready(State(agent): State<Arc<Agent>>) -> Response {
    let readiness = agent.boot.readiness(agent.session.restore_epoch());
    let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, &readiness)
}

/// Every env var processes get (internal and `/init` ones), as a JSON object.
async fn envs(State(agent): State<Arc<Agent>>) -> Response {
    json_response(StatusCode::OK, &agent.session.env_map())
}

/// Host CPU, memory and disk use, computed on request (envd's fields and order).
async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    match agent.metrics.collect() {
        Ok(m) => json_response(StatusCode::OK, &m),
        Err(err) => {
            tracing::warn!(error = %crate::error_chain(&err), "cannot collect metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, [no_store()]).into_response()
        }
    }
}

/// envd's CORS policy (rpc.md §2.4): any origin, any request header, the methods its API uses,
/// and the headers a browser Connect/gRPC-web client must read. Outermost, so preflights never
/// meet the token gate.
pub fn cors() -> tower_http::cors::CorsLayer {
    use axum::http::Method;
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer, ExposeHeaders};
    let expose = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "location",
        "cache-control",
        "x-content-type-options",
    ]
    .map(header::HeaderName::from_static);
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_headers(AllowHeaders::mirror_request())
        .allow_methods([Method::HEAD, Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .expose_headers(ExposeHeaders::list(expose))
        .max_age(std::time::Duration::from_secs(7200))
}

/// tonic's own fallback answers HTTP 200 + grpc-status 12, which plain HTTP clients misread.
async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "404 page not found\n")
}

fn no_store() -> (header::HeaderName, HeaderValue) {
    (header::CACHE_CONTROL, HeaderValue::from_static("no-store"))
}

/// A JSON response with `Cache-Control: no-store`, as envd's API answers.
pub(crate) fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let mut bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json")), no_store()], bytes).into_response()
}

/// envd's API error (its `jsonError`): `{"code":<status>,"message":"..."}` (in that order) and a
/// newline, `application/json; charset=utf-8`, `X-Content-Type-Options: nosniff`.
pub(crate) fn json_error(status: StatusCode, message: &str) -> Response {
    #[derive(serde::Serialize)]
    struct ErrorBody<'a> {
        code: u16,
        message: &'a str,
    }
    let mut body = serde_json::to_vec(&ErrorBody { code: status.as_u16(), message }).unwrap_or_default();
    body.push(b'\n');
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
    ];
    (status, headers, body).into_response()
}
