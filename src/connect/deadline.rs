//! `grpc-timeout` enforcement for the tonic services.
//!
//! tonic enforces `grpc-timeout` only inside its own `transport::Server` (the layer is crate
//! private); guestd drives tonic's `Routes` from its own hyper loop, so this layer does it. It
//! sits *inside* [`super::ConnectLayer`], so it covers native gRPC calls and translated Connect
//! calls (whose `Connect-Timeout-Ms` became `grpc-timeout`) alike:
//!
//! * a deadline of zero has passed before the call began → a trailers-only `DEADLINE_EXCEEDED`
//!   answer, and the handler is never called: nothing starts. (envd answers the same error but
//!   runs the call anyway, with a process that then has no time limit at all — Go quirk #8 of
//!   `rpc.md` §7. The SDKs never send `0`: they omit the header for "no timeout".)
//! * no response head by the deadline → a trailers-only `DEADLINE_EXCEEDED` answer, and the
//!   handler's future is dropped (cancelled);
//! * response body still streaming at the deadline → the body ends with trailers
//!   `grpc-status: 4`, and the handler's stream is dropped.
//!
//! The timer is one `tokio::time::Sleep` per call that carries the header; calls without it
//! pay nothing but a header lookup.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use http_body::Frame;
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The `grpc-message` of a deadline answer.
const DEADLINE_MESSAGE: &str = "deadline exceeded";

/// Parse a `grpc-timeout` value (1–8 digits and a unit: H, M, S, m, u, n). `None` if absent
/// or malformed; like tonic, a malformed value means "no deadline".
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's deadline, if its `grpc-timeout` header carries one.
pub fn request_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers.get("grpc-timeout").and_then(parse_grpc_timeout)
}

/// Layer producing [`GrpcDeadline`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcDeadlineLayer;

impl GrpcDeadlineLayer {
    pub fn new() -> Self {
        Self
    }
}

impl<S> tower::Layer<S> for GrpcDeadlineLayer {
    type Service = GrpcDeadline<S>;

    fn layer(&self, inner: S) -> GrpcDeadline<S> {
        GrpcDeadline { inner }
    }
}

/// Enforces `grpc-timeout` on the wrapped service; see the module docs.
#[derive(Clone, Debug)]
pub struct GrpcDeadline<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for GrpcDeadline<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let timeout = request_timeout(req.headers());
        if timeout == Some(Duration::ZERO) {
            return Box::pin(async { Ok(trailers_only_deadline()) });
        }
        let fut = self.inner.call(req);
        let Some(timeout) = timeout else {
            return Box::pin(async move { Ok(fut.await?.map(Body::new)) });
        };
        // A timeout too large for the clock is no deadline at all.
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            return Box::pin(async move { Ok(fut.await?.map(Body::new)) });
        };
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(res) => Ok(res?.map(|body| Body::new(DeadlineBody::new(body, deadline)))),
                Err(_) => Ok(trailers_only_deadline()),
            }
        })
    }
}

fn deadline_trailers() -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert("grpc-status", HeaderValue::from_static("4"));
    map.insert("grpc-message", HeaderValue::from_static(DEADLINE_MESSAGE));
    map
}

fn trailers_only_deadline() -> Response<Body> {
    let mut res = Response::new(Body::empty());
    *res.headers_mut() = deadline_trailers();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    res
}

/// A gRPC response body cut off with DEADLINE_EXCEEDED trailers at the deadline.
struct DeadlineBody<B> {
    /// `None` once the deadline fired: dropping the body cancels the handler's stream.
    inner: Option<Pin<Box<B>>>,
    sleep: Pin<Box<Sleep>>,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, deadline: Instant) -> Self {
        Self { inner: Some(Box::pin(inner)), sleep: Box::pin(tokio::time::sleep_until(deadline)) }
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        // The deadline is checked first so that a body that is always ready (a fast producer)
        // cannot outrun it.
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.inner = None;
            return Poll::Ready(Some(Ok(Frame::trailers(deadline_trailers()))));
        }
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    this.inner = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use http_body_util::BodyExt as _;
    use tower::{Layer as _, ServiceExt as _};

    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let p = |s: &str| parse_grpc_timeout(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("99999999S"), Some(Duration::from_secs(99_999_999)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("7u"), Some(Duration::from_micros(7)));
        assert_eq!(p("0n"), Some(Duration::ZERO));
        for bad in ["", "m", "123456789m", "10x", "-1m", "1.5S"] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    fn grpc_request(timeout: &'static str) -> Request<Body> {
        Request::builder()
            .header("content-type", "application/grpc")
            .header("grpc-timeout", timeout)
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn slow_handler_gets_trailers_only_deadline() {
        let svc = GrpcDeadlineLayer.layer(tower::service_fn(|_req: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }));
        let res = svc.oneshot(grpc_request("100m")).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "4");
        assert_eq!(res.headers()["grpc-message"], DEADLINE_MESSAGE);
    }

    #[tokio::test(start_paused = true)]
    async fn streaming_body_is_cut_with_deadline_trailers() {
        let svc = GrpcDeadlineLayer.layer(tower::service_fn(|_req: Request<Body>| async {
            let stream = futures_util::stream::unfold(0u32, |n| async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(vec![0, 0, 0, 0, 0]))), n + 1))
            });
            Ok::<_, Infallible>(Response::new(Body::new(http_body_util::StreamBody::new(stream))))
        }));
        let res = svc.oneshot(grpc_request("100m")).await.unwrap();
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], "4");
        assert_eq!(collected.to_bytes().len(), 15, "three 30 ms frames fit in 100 ms");
    }

    #[tokio::test]
    async fn a_zero_deadline_has_passed_and_the_handler_is_never_called() {
        let called = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&called);
        let svc = GrpcDeadlineLayer.layer(tower::service_fn(move |_req: Request<Body>| {
            seen.store(true, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Body::from("ran"))) }
        }));
        for zero in ["0m", "0n", "0S", "00000000H"] {
            let res = svc.clone().oneshot(grpc_request(zero)).await.unwrap();
            assert_eq!(res.headers()["grpc-status"], "4", "{zero}");
        }
        assert!(!called.load(Ordering::SeqCst));
        // The shortest deadline that is not zero still runs the handler.
        svc.oneshot(grpc_request("1n")).await.unwrap();
        assert!(called.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn no_header_no_deadline() {
        let svc = GrpcDeadlineLayer.layer(tower::service_fn(|_req: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, Infallible>(Response::new(Body::from("late")))
        }));
        let req = Request::builder().body(Body::empty()).unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "late");
    }
}
