//! Connect request → gRPC request for the inner tonic service.
//!
//! Unary bodies are read whole (bounded) and re-encoded as one gRPC frame before the handler
//! runs, so every error is known before the call. Streaming bodies are translated envelope by
//! envelope *while the client is still sending* ([`ConnectRequestBody`]): a client-streaming
//! handler sees each message as soon as its last byte arrives. An error found mid-stream is
//! handed to the handler as a `tonic::Status` and also parked in an [`ErrorSlot`], from which
//! the response side reports it to the client verbatim, whatever the handler makes of it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body::Frame as HttpFrame;

use super::compression::{self, Encoding};
use super::envelope::{self, FLAG_COMPRESSED, FrameDecoder};
use super::error::{ConnectProtocolError, WireError};
use super::{MAX_MESSAGE_BYTES, Method, codec::Codec};

/// Where the request side leaves a protocol error for the response side to report.
/// The first error wins; later ones are consequences of it.
#[derive(Clone, Debug, Default)]
pub(super) struct ErrorSlot(Arc<Mutex<Option<WireError>>>);

impl ErrorSlot {
    pub(super) fn set(&self, err: WireError) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(err);
    }

    pub(super) fn take(&self) -> Option<WireError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// `Connect-Timeout-Ms` as a `grpc-timeout` value. At most 10 digits (Connect rule); gRPC
/// allows at most 8, so long timeouts are expressed in whole seconds, rounded up.
pub(super) fn connect_timeout_as_grpc(headers: &HeaderMap) -> Result<Option<HeaderValue>, ConnectProtocolError> {
    let Some(raw) = headers.get("connect-timeout-ms") else { return Ok(None) };
    let bytes = raw.as_bytes();
    let invalid = || ConnectProtocolError::InvalidTimeout(String::from_utf8_lossy(bytes).into_owned());
    if bytes.is_empty() || bytes.len() > 10 || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    let ms: u64 = std::str::from_utf8(bytes).ok().and_then(|s| s.parse().ok()).ok_or_else(invalid)?;
    let value = if ms <= 99_999_999 { format!("{ms}m") } else { format!("{}S", ms.div_ceil(1000)) };
    HeaderValue::from_str(&value).map(Some).map_err(|_| invalid())
}

/// Turn the Connect request headers into gRPC ones. Everything that is not protocol framing
/// (Authorization, Keepalive-Ping-Interval, X-Access-Token, ...) stays and reaches the handler
/// as metadata. `connect-*` headers are protocol-reserved and removed; the handler reads the
/// deadline from `grpc-timeout` (see `deadline::parse_grpc_timeout`), which native gRPC
/// clients send too.
pub(super) fn to_grpc_headers(headers: &mut HeaderMap, timeout: Option<HeaderValue>) {
    let reserved: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("connect-")).cloned().collect();
    for name in reserved {
        headers.remove(name);
    }
    for name in [header::CONTENT_LENGTH, header::CONTENT_ENCODING, header::TRANSFER_ENCODING, header::TE] {
        headers.remove(name);
    }
    // Frames we hand tonic are never compressed, and tonic must not compress its answers.
    for name in ["grpc-timeout", "grpc-encoding", "grpc-accept-encoding"] {
        headers.remove(name);
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(t) = timeout {
        headers.insert("grpc-timeout", t);
    }
}

/// Read a whole unary body, refusing more than [`MAX_MESSAGE_BYTES`] before buffering it.
pub(super) async fn read_unary_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ConnectProtocolError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared
        && size > MAX_MESSAGE_BYTES as u64
    {
        return Err(ConnectProtocolError::MessageTooLarge { size, max: MAX_MESSAGE_BYTES });
    }
    crate::body::read_to_bytes(body, MAX_MESSAGE_BYTES, declared).await.map_err(|e| match e {
        crate::body::ReadBodyError::TooLarge { max } => ConnectProtocolError::BodyTooLarge { max },
        crate::body::ReadBodyError::Read(e) => ConnectProtocolError::ReadBody(e),
    })
}

/// The gRPC frame for a unary Connect body.
pub(super) fn unary_frame(
    method: &Method,
    codec: Codec,
    encoding: Encoding,
    body: &[u8],
) -> Result<Bytes, ConnectProtocolError> {
    let inflated;
    let payload = match encoding {
        Encoding::Gzip => {
            inflated = compression::gunzip(body, MAX_MESSAGE_BYTES)?;
            &inflated[..]
        }
        Encoding::Identity => body,
    };
    let mut out = BytesMut::with_capacity(envelope::HEADER_LEN + payload.len());
    let at = envelope::begin_envelope(&mut out, 0);
    method.codec.request_to_proto(codec, payload, true, &mut out)?;
    envelope::finish_envelope(&mut out, at);
    Ok(out.freeze())
}

/// A Connect streaming request body presented to tonic as a gRPC body, frame by frame.
pub(super) struct ConnectRequestBody {
    inner: Body,
    decoder: FrameDecoder,
    method: Arc<Method>,
    codec: Codec,
    encoding: Encoding,
    slot: ErrorSlot,
    /// Messages passed on so far (a server-streaming call takes exactly one).
    messages: usize,
    done: bool,
}

impl ConnectRequestBody {
    pub(super) fn new(inner: Body, method: Arc<Method>, codec: Codec, encoding: Encoding, slot: ErrorSlot) -> Self {
        Self {
            inner,
            decoder: FrameDecoder::new(MAX_MESSAGE_BYTES),
            method,
            codec,
            encoding,
            slot,
            messages: 0,
            done: false,
        }
    }

    fn translate(&self, frame: envelope::Frame) -> Result<Bytes, ConnectProtocolError> {
        if frame.flags & !FLAG_COMPRESSED != 0 {
            return Err(ConnectProtocolError::InvalidRequestFlags(frame.flags));
        }
        let inflated;
        let payload = if frame.flags & FLAG_COMPRESSED != 0 && !frame.payload.is_empty() {
            if self.encoding != Encoding::Gzip {
                return Err(ConnectProtocolError::UnexpectedCompression);
            }
            inflated = compression::gunzip(&frame.payload, MAX_MESSAGE_BYTES)?;
            &inflated[..]
        } else {
            &frame.payload[..]
        };
        let mut out = BytesMut::with_capacity(envelope::HEADER_LEN + payload.len());
        let at = envelope::begin_envelope(&mut out, 0);
        self.method.codec.request_to_proto(self.codec, payload, false, &mut out)?;
        envelope::finish_envelope(&mut out, at);
        Ok(out.freeze())
    }

    fn fail(&mut self, err: ConnectProtocolError) -> Poll<Option<Result<HttpFrame<Bytes>, tonic::Status>>> {
        tracing::debug!(path = %self.method.path, error = %err, "bad Connect request stream");
        let wire = err.to_wire();
        let status = tonic::Status::new(wire.code.to_tonic(), wire.message.clone());
        self.slot.set(wire);
        self.done = true;
        Poll::Ready(Some(Err(status)))
    }
}

impl http_body::Body for ConnectRequestBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<HttpFrame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.decoder.decode() {
                Ok(Some(frame)) => {
                    this.messages += 1;
                    if !this.method.client_streaming && this.messages > 1 {
                        return this.fail(ConnectProtocolError::RequestCardinality("multiple"));
                    }
                    return match this.translate(frame) {
                        Ok(data) => Poll::Ready(Some(Ok(HttpFrame::data(data)))),
                        Err(e) => this.fail(e),
                    };
                }
                Ok(None) => {}
                Err(e) => return this.fail(e),
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // HTTP trailers on a Connect request carry nothing we use.
                    if let Ok(data) = frame.into_data() {
                        this.decoder.push(data);
                    }
                }
                Some(Err(e)) => {
                    // The client went away (or broke the transfer encoding): nobody is left to
                    // read an error, so just fail the handler's stream.
                    this.done = true;
                    return Poll::Ready(Some(Err(tonic::Status::cancelled(format!("read request body: {e}")))));
                }
                None if this.decoder.has_partial() => {
                    return this.fail(ConnectProtocolError::IncompleteEnvelope);
                }
                None if !this.method.client_streaming && this.messages == 0 => {
                    return this.fail(ConnectProtocolError::RequestCardinality("zero"));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_timeouts_become_grpc_timeouts() {
        let t = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("connect-timeout-ms", HeaderValue::from_str(v).unwrap());
            connect_timeout_as_grpc(&h).map(|o| o.map(|v| v.to_str().unwrap().to_owned()))
        };
        assert_eq!(t("0").unwrap().as_deref(), Some("0m"));
        assert_eq!(t("60000").unwrap().as_deref(), Some("60000m"));
        assert_eq!(t("99999999").unwrap().as_deref(), Some("99999999m"));
        assert_eq!(t("100000001").unwrap().as_deref(), Some("100001S"));
        assert_eq!(t("9999999999").unwrap().as_deref(), Some("10000000S"));
        for bad in ["", "12345678901", "-1", "1.5", "abc", " 1"] {
            assert!(matches!(t(bad), Err(ConnectProtocolError::InvalidTimeout(_))), "{bad:?}");
        }
        assert_eq!(connect_timeout_as_grpc(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn headers_keep_metadata_and_drop_connect_framing() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/connect+json"),
            ("connect-protocol-version", "1"),
            ("connect-timeout-ms", "5"),
            ("connect-accept-encoding", "gzip"),
            ("content-length", "12"),
            ("authorization", "Basic dXNlcjo="),
            ("keepalive-ping-interval", "50"),
            ("grpc-accept-encoding", "gzip"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        to_grpc_headers(&mut h, Some(HeaderValue::from_static("5m")));
        let mut names: Vec<_> = h.iter().map(|(k, v)| format!("{k}={}", v.to_str().unwrap())).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "authorization=Basic dXNlcjo=",
                "content-type=application/grpc",
                "grpc-timeout=5m",
                "keepalive-ping-interval=50",
                "te=trailers",
            ]
        );
    }
}
