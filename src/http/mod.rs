//! Plain HTTP routes served beside the RPC services on the same port.
//!
//! Only `/health` for now; `/files`, `/init`, `/envs` and `/metrics` arrive with their issues.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Plain HTTP routes, merged into the RPC router by `crate::server`.
pub fn routes(router: Router) -> Router {
    router.route("/health", get(health)).fallback(not_found)
}

/// 204 once guestd is serving (envd answers the same; orchestrators poll it).
async fn health() -> impl IntoResponse {
    (StatusCode::NO_CONTENT, [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))])
}

/// tonic's own fallback answers HTTP 200 + grpc-status 12, which plain HTTP clients misread.
async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "404 page not found\n")
}
