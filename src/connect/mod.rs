//! The Connect protocol, served by translating to gRPC for the tonic services.
//!
//! The E2B SDKs speak Connect (JSON codec, mostly HTTP/1.1); guestd's handlers are tonic gRPC
//! services. [`ConnectLayer`] sits in front of the single axum `Router` that holds the tonic
//! routes and the plain HTTP routes, and for each request decides:
//!
//! | request | action |
//! |---|---|
//! | `content-type: application/grpc*` | passed through (native gRPC); large request messages of a known method are checked on the way (`grpc_check.rs`) |
//! | path not shaped `/pkg.Service/Method` (checked before the registry is even built), or not an RPC method in the descriptor pool and not under an RPC service | passed through (`/health`, `/files`, ...) |
//! | `/pkg.Service/Unknown` under a known service | 404, Connect JSON error `unimplemented` (envd answers 404 here; the body lets Connect clients read the code) |
//! | RPC path, method other than POST | 405, `Allow: POST` (no method is NO_SIDE_EFFECTS, so no Connect GET) |
//! | RPC path, content type not Connect for that method's stream kind | 415, `Accept-Post` |
//! | RPC path, Connect content type | translated Connect ⇄ gRPC (`request.rs`, `response.rs`) |
//!
//! Invariants: the layer never panics on client input, never buffers more than
//! [`MAX_MESSAGE_BYTES`] of one client message (length prefixes are checked before
//! allocation), and never waits for a whole stream — each message moves as soon as it is
//! complete, in both directions. Nothing here knows what a process or a file is.
//!
//! Deadlines are enforced by [`GrpcDeadlineLayer`] (in [`deadline`]), which goes *inside* this
//! layer so it serves native gRPC and translated calls alike. CORS is not handled here (envd's
//! `withCORS` belongs in front of everything, as its own layer).
//!
//! Wiring:
//! ```ignore
//! let router = tonic::service::Routes::new(
//!         ProcessServer::new(p).max_decoding_message_size(connect::MAX_MESSAGE_BYTES))
//!     .add_service(FilesystemServer::new(f).max_decoding_message_size(connect::MAX_MESSAGE_BYTES))
//!     .into_axum_router()
//!     .route("/health", get(health))
//!     .fallback(|| async { StatusCode::NOT_FOUND });
//! let svc = tower::ServiceBuilder::new()
//!     .layer(connect::ConnectLayer::new(guestd::proto::descriptor_pool)) // decoded on first use
//!     .layer(connect::GrpcDeadlineLayer::new())
//!     .service(router)
//!     .map_request(|r: http::Request<hyper::body::Incoming>| r.map(axum::body::Body::new));
//! // per connection: auto::Builder (http1 + http2 timers set) with TowerToHyperService::new(svc.clone())
//! ```

mod codec;
mod compression;
pub mod deadline;
mod envelope;
mod error;
mod grpc_check;
mod request;
mod response;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::body::Body;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use prost_reflect::DescriptorPool;
use tower::ServiceExt as _;

use self::codec::{Codec, MethodCodec};
use self::compression::Encoding;
pub use self::deadline::{GrpcDeadline, GrpcDeadlineLayer, parse_grpc_timeout, request_timeout};
pub use self::error::{Code, ConnectProtocolError, WireError};

/// Largest client message accepted, in bytes, on the wire and after decompression.
///
/// 16 MiB: the biggest legitimate requests are `SendInput`/`StreamInput` stdin chunks, which
/// the SDKs send in pieces far below this; a bound is needed because the length prefix is
/// client-controlled, and 16 MiB keeps a handful of concurrent worst-case requests well within
/// a small sandbox's memory. Give the tonic services the same limit
/// (`max_decoding_message_size`), or tonic's 4 MiB default rejects what this layer accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Largest response message (from our own handlers) the layer will translate, in bytes.
///
/// Responses are produced by trusted code, so this only guards against a runaway handler;
/// 64 MiB leaves room for a recursive `ListDir` of a large tree (JSON is larger than proto).
pub const MAX_RESPONSE_MESSAGE_BYTES: usize = 64 << 20;

/// Content types a unary method accepts (sent in `Accept-Post` on 415).
const UNARY_CONTENT_TYPES: &str = "application/grpc, application/grpc+proto, application/json, application/proto";
/// Content types a streaming method accepts.
const STREAM_CONTENT_TYPES: &str =
    "application/grpc, application/grpc+proto, application/connect+json, application/connect+proto";

/// One RPC method of the descriptor pool.
#[derive(Debug)]
struct Method {
    /// `/pkg.Service/Method`, for logs.
    path: String,
    /// Neither client- nor server-streaming: bare-message bodies instead of envelopes.
    unary: bool,
    /// The client sends a stream of messages (otherwise exactly one).
    client_streaming: bool,
    codec: MethodCodec,
}

/// Everything the layer knows about the served API, built once from the descriptor pool.
#[derive(Debug)]
struct Registry {
    methods: HashMap<String, Arc<Method>>,
    /// `/pkg.Service/` prefixes, to tell "unknown method" from "not an RPC path".
    services: HashSet<String>,
}

impl Registry {
    fn new(pool: &DescriptorPool) -> Self {
        let mut methods = HashMap::new();
        let mut services = HashSet::new();
        for service in pool.services() {
            services.insert(format!("/{}/", service.full_name()));
            for m in service.methods() {
                let path = format!("/{}/{}", service.full_name(), m.name());
                let method = Method {
                    path: path.clone(),
                    unary: !m.is_client_streaming() && !m.is_server_streaming(),
                    client_streaming: m.is_client_streaming(),
                    codec: MethodCodec::new(m.input(), m.output()),
                };
                methods.insert(path, Arc::new(method));
            }
        }
        Self { methods, services }
    }

    fn is_under_service(&self, path: &str) -> bool {
        path.rfind('/').is_some_and(|i| i > 0 && self.services.contains(&path[..=i]))
    }
}

/// The registry, built from the descriptor pool on the first request that needs it: decoding
/// the pool is most of guestd's start-up work, and native gRPC clients and plain HTTP never
/// need it (a micro-VM's first command goes out sooner).
struct LazyRegistry {
    load: fn() -> DescriptorPool,
    registry: OnceLock<Registry>,
}

impl LazyRegistry {
    fn get(&self) -> &Registry {
        self.registry.get_or_init(|| Registry::new(&(self.load)()))
    }
}

impl std::fmt::Debug for LazyRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRegistry").field("built", &self.registry.get().is_some()).finish()
    }
}

/// Could `path` name an RPC (`/pkg.Service/Method`)? Cheap, so plain HTTP paths such as
/// `/health` or `/files` never build the registry.
fn rpc_shaped(path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    service.contains('.') && !method.contains('/')
}

/// Tower layer that serves the Connect protocol in front of tonic gRPC services.
#[derive(Clone, Debug)]
pub struct ConnectLayer {
    registry: Arc<LazyRegistry>,
}

impl ConnectLayer {
    /// Serve Connect for every method of every service in the pool `load` returns (called once,
    /// on the first request that needs it).
    pub fn new(load: fn() -> DescriptorPool) -> Self {
        Self { registry: Arc::new(LazyRegistry { load, registry: OnceLock::new() }) }
    }
}

impl<S> tower::Layer<S> for ConnectLayer {
    type Service = ConnectService<S>;

    fn layer(&self, inner: S) -> ConnectService<S> {
        ConnectService { inner, registry: self.registry.clone() }
    }
}

/// The service made by [`ConnectLayer`]; see the module docs for what it does per request.
#[derive(Clone, Debug)]
pub struct ConnectService<S> {
    inner: S,
    registry: Arc<LazyRegistry>,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S, B> tower::Service<Request<Body>> for ConnectService<S>
where
    S: tower::Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is checked on the clone that serves the call (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let inner = self.inner.clone();
        let media = media_type(&req);
        if media.starts_with("application/grpc") {
            let path = req.uri().path().to_owned();
            let registry = Arc::clone(&self.registry);
            let req = req.map(|body| Body::new(grpc_check::CheckedRequest::new(body, registry, path)));
            return Box::pin(pass_through(inner, req));
        }
        let path = req.uri().path();
        if !rpc_shaped(path) {
            return Box::pin(pass_through(inner, req));
        }
        let registry = self.registry.get();
        let Some(method) = registry.methods.get(path).cloned() else {
            if registry.is_under_service(path) {
                let err = ConnectProtocolError::UnknownMethod(path.to_owned()).to_wire();
                let mut res = response::unary_error(&err, http::HeaderMap::new());
                *res.status_mut() = StatusCode::NOT_FOUND;
                return Box::pin(async move { Ok(res) });
            }
            return Box::pin(pass_through(inner, req));
        };
        if req.method() != http::Method::POST {
            return Box::pin(async { Ok(method_not_allowed()) });
        }
        let codec = match (method.unary, media.as_str()) {
            (true, "application/json") | (false, "application/connect+json") => Codec::Json,
            (true, "application/proto") | (false, "application/connect+proto") => Codec::Proto,
            _ => return Box::pin(async move { Ok(unsupported_media_type(method.unary)) }),
        };
        if method.unary {
            Box::pin(async move { Ok(serve_unary(inner, method, codec, req).await) })
        } else {
            Box::pin(async move { Ok(serve_streaming(inner, method, codec, req).await) })
        }
    }
}

/// The request's media type, lower-cased, without parameters (`; charset=utf-8`).
fn media_type(req: &Request<Body>) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default()
}

async fn pass_through<S, B>(inner: S, req: Request<Body>) -> Result<Response<Body>, Infallible>
where
    S: tower::Service<Request<Body>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Ok(inner.oneshot(req).await?.map(Body::new))
}

fn method_not_allowed() -> Response<Body> {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    res
}

fn unsupported_media_type(unary: bool) -> Response<Body> {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    let accepted = if unary { UNARY_CONTENT_TYPES } else { STREAM_CONTENT_TYPES };
    res.headers_mut().insert("accept-post", HeaderValue::from_static(accepted));
    res
}

async fn serve_unary<S, B>(inner: S, method: Arc<Method>, codec: Codec, req: Request<Body>) -> Response<Body>
where
    S: tower::Service<Request<Body>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut parts, body) = req.into_parts();
    let accept = Encoding::negotiate(parts.headers.get(header::ACCEPT_ENCODING));
    let prepared = async {
        let encoding = Encoding::from_request(parts.headers.get(header::CONTENT_ENCODING))?;
        let timeout = request::connect_timeout_as_grpc(&parts.headers)?;
        let raw = request::read_unary_body(&parts.headers, body).await?;
        let frame = request::unary_frame(&method, codec, encoding, &raw)?;
        Ok::<_, ConnectProtocolError>((timeout, frame))
    };
    let (timeout, frame) = match prepared.await {
        Ok(ok) => ok,
        Err(e) => {
            tracing::debug!(path = %method.path, error = %e, "bad Connect unary request");
            return response::unary_error(&e.to_wire(), http::HeaderMap::new());
        }
    };
    request::to_grpc_headers(&mut parts.headers, timeout);
    let grpc_req = Request::from_parts(parts, Body::from(frame));
    let Ok(res) = inner.oneshot(grpc_req).await;
    response::unary(res.map(Body::new), &method, codec, accept).await
}

async fn serve_streaming<S, B>(inner: S, method: Arc<Method>, codec: Codec, req: Request<Body>) -> Response<Body>
where
    S: tower::Service<Request<Body>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut parts, body) = req.into_parts();
    let accept = Encoding::negotiate(parts.headers.get("connect-accept-encoding"));
    let prepared = Encoding::from_request(parts.headers.get("connect-content-encoding"))
        .and_then(|enc| Ok((enc, request::connect_timeout_as_grpc(&parts.headers)?)));
    let (encoding, timeout) = match prepared {
        Ok(ok) => ok,
        Err(e) => {
            tracing::debug!(path = %method.path, error = %e, "bad Connect stream request");
            return response::stream_error(codec, &e.to_wire());
        }
    };
    request::to_grpc_headers(&mut parts.headers, timeout);
    let slot = request::ErrorSlot::default();
    let body = request::ConnectRequestBody::new(body, method.clone(), codec, encoding, slot.clone());
    let Ok(res) = inner.oneshot(Request::from_parts(parts, Body::new(body))).await;
    response::streaming(res.map(Body::new), method, codec, accept, slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_knows_every_envd_procedure() {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let r = Registry::new(&pool);
        for (path, unary) in [
            ("/process.Process/List", true),
            ("/process.Process/Start", false),
            ("/process.Process/Connect", false),
            ("/process.Process/StreamInput", false),
            ("/process.Process/SendInput", true),
            ("/filesystem.Filesystem/WatchDir", false),
            ("/filesystem.Filesystem/Stat", true),
        ] {
            assert_eq!(r.methods[path].unary, unary, "{path}");
        }
        assert!(r.is_under_service("/process.Process/Nope"));
        assert!(!r.is_under_service("/health"));
        assert!(!r.is_under_service("/process.Process"));
        assert!(!r.is_under_service("/files/process.Process/x"));
    }

    #[test]
    fn only_rpc_shaped_paths_reach_the_registry() {
        for path in ["/process.Process/Start", "/filesystem.Filesystem/Nope", "/grpc.reflection.v1.ServerReflection/X"]
        {
            assert!(rpc_shaped(path), "{path}");
        }
        for path in ["/health", "/files", "/", "", "/envs/x", "/process.Process", "/a.b/c/d", "process.Process/Start"] {
            assert!(!rpc_shaped(path), "{path}");
        }
    }
}
