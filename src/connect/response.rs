//! gRPC response from the inner tonic service → Connect response.
//!
//! Unary: the gRPC body is collected (one message plus trailers) and answered as a bare
//! message with 200, or as a JSON error with the status from the code table.
//!
//! Streams: the response head goes out as soon as tonic's head arrives (HTTP 200), then every
//! gRPC frame becomes a Connect envelope in the poll that delivers it — nothing is held back,
//! so process output reaches the client live. Proto streams without compression are forwarded
//! byte-identical (a gRPC frame *is* a Connect envelope); only header bytes are inspected. The
//! gRPC trailers (or a trailers-only head) become the end-stream envelope.
//!
//! A response that is not gRPC at all (e.g. a 401 from an auth layer inside this one, or a
//! 404 fallback) is passed through unchanged: Connect clients derive the code from the HTTP
//! status, which is how envd's own auth failures reach them.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::Frame as HttpFrame;
use http_body_util::BodyExt as _;

use super::codec::Codec;
use super::compression::{self, Encoding};
use super::envelope::{self, FLAG_COMPRESSED, FLAG_END_STREAM, FrameDecoder, FrameScanner};
use super::error::{self, Code, ConnectProtocolError, WireError};
use super::request::ErrorSlot;
use super::{MAX_RESPONSE_MESSAGE_BYTES, Method};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Is this the gRPC answer of a tonic handler (rather than a plain HTTP response)?
fn is_grpc(res: &Response<Body>) -> bool {
    res.status() == StatusCode::OK
        && res.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Headers of the gRPC response that are the handler's own metadata.
fn is_metadata(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(n.starts_with("grpc-")
        || n.starts_with("connect-")
        || matches!(n, "content-type" | "content-length" | "content-encoding" | "transfer-encoding" | "te" | "trailer"))
}

fn copy_metadata(from: &HeaderMap, to: &mut HeaderMap, prefix: &str) {
    for (name, value) in from.iter().filter(|(n, _)| is_metadata(n)) {
        if prefix.is_empty() {
            to.append(name.clone(), value.clone());
        } else if let Ok(name) = HeaderName::from_bytes(format!("{prefix}{name}").as_bytes()) {
            to.append(name, value.clone());
        }
    }
}

fn metadata_json(from: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in from.iter().filter(|(n, _)| is_metadata(n)) {
        out.entry(name.as_str().to_owned()).or_default().push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    out
}

fn content_type(codec: Codec, streaming: bool) -> HeaderValue {
    HeaderValue::from_static(match (codec, streaming) {
        (Codec::Json, false) => "application/json",
        (Codec::Proto, false) => "application/proto",
        (Codec::Json, true) => "application/connect+json",
        (Codec::Proto, true) => "application/connect+proto",
    })
}

/// A Connect unary error response.
pub(super) fn unary_error(err: &WireError, metadata: HeaderMap) -> Response<Body> {
    let mut res = Response::new(Body::from(err.to_json()));
    *res.status_mut() = err.code.http_status();
    *res.headers_mut() = metadata;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(header::ACCEPT_ENCODING, HeaderValue::from_static(compression::ACCEPTED));
    res
}

/// A Connect streaming response that carries only an end-stream error (HTTP 200, as Connect
/// streams always are).
pub(super) fn stream_error(codec: Codec, err: &WireError) -> Response<Body> {
    let payload = error::end_stream_json(Some(err), &BTreeMap::new());
    let mut res = Response::new(Body::from(envelope::envelope(FLAG_END_STREAM, &payload)));
    res.headers_mut().insert(header::CONTENT_TYPE, content_type(codec, true));
    res.headers_mut().insert("connect-accept-encoding", HeaderValue::from_static(compression::ACCEPTED));
    res
}

/// Translate the gRPC answer to a unary call.
pub(super) async fn unary(res: Response<Body>, method: &Method, codec: Codec, accept: Encoding) -> Response<Body> {
    if !is_grpc(&res) {
        return res;
    }
    let (parts, body) = res.into_parts();
    let mut metadata = HeaderMap::new();
    copy_metadata(&parts.headers, &mut metadata, "");
    if parts.headers.contains_key("grpc-status") {
        // Trailers-only: the call failed (or returned nothing) before any message.
        let err = error::status_from_trailers(&parts.headers)
            .err()
            .unwrap_or_else(|| WireError::new(Code::Unimplemented, "unary response has no message"));
        return unary_error(&err, metadata);
    }
    let (message, trailers) = match collect_unary(body).await {
        Ok(parts) => parts,
        Err(e) => return unary_error(&e.to_wire(), metadata),
    };
    copy_metadata(&trailers, &mut metadata, "trailer-");
    if let Err(err) = error::status_from_trailers(&trailers) {
        return unary_error(&err, metadata);
    }
    let Some(message) = message else {
        let err = WireError::new(Code::Unimplemented, "unary response has no message");
        return unary_error(&err, metadata);
    };
    let mut json_or_proto = BytesMut::new();
    if let Err(e) = method.codec.response_from_proto(codec, &message, &mut json_or_proto) {
        return unary_error(&e.to_wire(), metadata);
    }
    let body = if accept == Encoding::Gzip && !json_or_proto.is_empty() {
        let mut gz = BytesMut::new();
        compression::gzip_into(&json_or_proto, &mut gz);
        metadata.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        gz
    } else {
        json_or_proto
    };
    let mut res = Response::new(Body::from(body.freeze()));
    *res.headers_mut() = metadata;
    res.headers_mut().insert(header::CONTENT_TYPE, content_type(codec, false));
    res.headers_mut().insert(header::ACCEPT_ENCODING, HeaderValue::from_static(compression::ACCEPTED));
    res
}

/// The single message and the trailers of a unary gRPC response body.
async fn collect_unary(body: Body) -> Result<(Option<Bytes>, HeaderMap), ConnectProtocolError> {
    let mut body = std::pin::pin!(body);
    let mut decoder = FrameDecoder::new(MAX_RESPONSE_MESSAGE_BYTES);
    let mut message = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ConnectProtocolError::ResponseBody)?;
        let frame = match frame.into_data() {
            Ok(data) => {
                decoder.push(data);
                while let Some(f) = decoder.decode()? {
                    if f.flags != 0 {
                        return Err(ConnectProtocolError::BadGrpcResponse("flagged gRPC frame"));
                    }
                    if message.replace(f.payload).is_some() {
                        return Err(ConnectProtocolError::BadGrpcResponse("unary response has multiple messages"));
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            if decoder.has_partial() {
                return Err(ConnectProtocolError::BadGrpcResponse("gRPC message cut short"));
            }
            return Ok((message, trailers));
        }
    }
    Err(ConnectProtocolError::BadGrpcResponse("gRPC response ended without trailers"))
}

/// Translate the gRPC answer to a streaming call (client, server or bidi).
pub(super) fn streaming(
    res: Response<Body>,
    method: Arc<Method>,
    codec: Codec,
    accept: Encoding,
    slot: ErrorSlot,
) -> Response<Body> {
    if !is_grpc(&res) {
        return res;
    }
    let (parts, body) = res.into_parts();
    let mut headers = HeaderMap::new();
    copy_metadata(&parts.headers, &mut headers, "");
    headers.insert(header::CONTENT_TYPE, content_type(codec, true));
    headers.insert("connect-accept-encoding", HeaderValue::from_static(compression::ACCEPTED));
    if accept == Encoding::Gzip {
        headers.insert("connect-content-encoding", HeaderValue::from_static("gzip"));
    }
    let state = if parts.headers.contains_key("grpc-status") {
        State::Ending(error::status_from_trailers(&parts.headers), BTreeMap::new())
    } else {
        State::Streaming
    };
    let mode = if codec == Codec::Proto && accept == Encoding::Identity {
        Mode::Passthrough(FrameScanner::default())
    } else {
        Mode::Transcode(FrameDecoder::new(MAX_RESPONSE_MESSAGE_BYTES))
    };
    let conv = Converter { method, codec, accept };
    let body = ConnectResponseBody { inner: body, mode, conv, slot, state };
    let mut res = Response::new(Body::new(body));
    *res.headers_mut() = headers;
    res
}

enum Mode {
    /// Forward gRPC chunks unchanged, watching only frame boundaries.
    Passthrough(FrameScanner),
    /// Decode each gRPC frame and write a Connect envelope in the client's codec/compression.
    Transcode(FrameDecoder),
}

enum State {
    Streaming,
    /// The gRPC call is over; the end-stream envelope is still to be sent.
    Ending(Result<(), WireError>, BTreeMap<String, Vec<String>>),
    Done,
}

/// What turns one gRPC message into one Connect envelope.
struct Converter {
    method: Arc<Method>,
    codec: Codec,
    accept: Encoding,
}

impl Converter {
    /// Append the Connect envelope for one gRPC frame to `out`.
    fn transcode(&self, frame: envelope::Frame, out: &mut BytesMut) -> Result<(), ConnectProtocolError> {
        if frame.flags != 0 {
            return Err(ConnectProtocolError::BadGrpcResponse("flagged gRPC frame"));
        }
        let at = out.len();
        match self.accept {
            Encoding::Identity => {
                envelope::begin_envelope(out, 0);
                self.method.codec.response_from_proto(self.codec, &frame.payload, out)?;
            }
            Encoding::Gzip => {
                let mut plain = BytesMut::new();
                self.method.codec.response_from_proto(self.codec, &frame.payload, &mut plain)?;
                // An empty message is sent uncompressed: receivers never inflate empty payloads.
                let flags = if plain.is_empty() { 0 } else { FLAG_COMPRESSED };
                envelope::begin_envelope(out, flags);
                if !plain.is_empty() {
                    compression::gzip_into(&plain, out);
                }
            }
        }
        if out.len() - at - envelope::HEADER_LEN > u32::MAX as usize {
            return Err(ConnectProtocolError::BadGrpcResponse("converted message exceeds 4 GiB"));
        }
        envelope::finish_envelope(out, at);
        Ok(())
    }
}

struct ConnectResponseBody {
    inner: Body,
    mode: Mode,
    conv: Converter,
    slot: ErrorSlot,
    state: State,
}

impl ConnectResponseBody {
    fn end_with(&mut self, err: ConnectProtocolError) {
        tracing::debug!(path = %self.conv.method.path, error = %err, "gRPC response could not be translated");
        self.state = State::Ending(Err(err.to_wire()), BTreeMap::new());
    }

    fn end_envelope(&mut self) -> Bytes {
        let State::Ending(status, metadata) = std::mem::replace(&mut self.state, State::Done) else {
            return Bytes::new();
        };
        // A request-side protocol error is what went wrong, whatever the handler concluded.
        let err = match self.slot.take() {
            Some(e) => Some(e),
            None => status.err(),
        };
        envelope::envelope(FLAG_END_STREAM, &error::end_stream_json(err.as_ref(), &metadata))
    }

    /// True if bytes of an unfinished frame were already forwarded: the stream can then only
    /// be aborted, since an end-stream envelope would be read as part of that frame.
    fn forwarded_partial(&self) -> bool {
        match &self.mode {
            Mode::Passthrough(scanner) => !scanner.at_boundary(),
            Mode::Transcode(_) => false,
        }
    }

    fn abort(&mut self, why: &'static str) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        tracing::warn!(path = %self.conv.method.path, why, "aborting Connect stream");
        self.state = State::Done;
        Poll::Ready(Some(Err(why.into())))
    }
}

impl http_body::Body for ConnectResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.state {
                State::Done => return Poll::Ready(None),
                State::Ending(..) => {
                    return Poll::Ready(Some(Ok(HttpFrame::data(this.end_envelope()))));
                }
                State::Streaming => {}
            }
            if let Mode::Transcode(decoder) = &mut this.mode {
                // Everything already complete goes out in one write.
                let mut out = BytesMut::new();
                let mut failure = None;
                loop {
                    match decoder.decode() {
                        Ok(Some(frame)) => {
                            if let Err(e) = this.conv.transcode(frame, &mut out) {
                                failure = Some(e);
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                let failed = failure.is_some();
                if let Some(e) = failure {
                    this.end_with(e);
                }
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(HttpFrame::data(out.freeze()))));
                }
                if failed {
                    continue;
                }
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match &mut this.mode {
                        Mode::Passthrough(scanner) => {
                            if let Err(why) = scanner.scan(&data, MAX_RESPONSE_MESSAGE_BYTES) {
                                return this.abort(why);
                            }
                            if !data.is_empty() {
                                return Poll::Ready(Some(Ok(HttpFrame::data(data))));
                            }
                        }
                        Mode::Transcode(decoder) => decoder.push(data),
                    },
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else { continue };
                        if this.forwarded_partial() {
                            return this.abort("gRPC trailers inside a message");
                        }
                        if let Mode::Transcode(d) = &this.mode
                            && d.has_partial()
                        {
                            this.end_with(ConnectProtocolError::BadGrpcResponse("gRPC message cut short"));
                            continue;
                        }
                        this.state = State::Ending(error::status_from_trailers(&trailers), metadata_json(&trailers));
                    }
                },
                Some(Err(e)) => {
                    if this.forwarded_partial() {
                        return this.abort("gRPC response body failed inside a message");
                    }
                    this.end_with(ConnectProtocolError::ResponseBody(e));
                }
                None => {
                    if this.forwarded_partial() {
                        return this.abort("gRPC response ended inside a message");
                    }
                    this.end_with(ConnectProtocolError::BadGrpcResponse("gRPC response ended without trailers"));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}
