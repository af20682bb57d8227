//! Native gRPC requests get the check Connect requests get: each large request message is
//! walked with the method's descriptor ([`MethodCodec::check_proto`](super::codec::MethodCodec))
//! before tonic decodes it.
//!
//! Why: tonic's generated decoder turns every element of a repeated field into its own value
//! (a `String` is 24 bytes before its contents), so a 16 MiB `StartRequest` of empty `args`
//! grows ~12× while decoding. The check refuses messages with more than 256 Ki values
//! (`resource_exhausted`, the limit Connect requests have) and answers malformed ones with
//! `invalid_argument` instead of tonic's `internal`.
//!
//! Only messages over [`CHECKED_FROM`] are checked: a smaller one cannot grow past a few MiB,
//! and the check needs the descriptor registry, whose first build (decoding the descriptor
//! pool) would otherwise fall on the first gRPC call of every boot — measured in the micro-VM
//! tier as +60 ms before the first command.
//!
//! The body is forwarded unchanged; the bytes of the frame being completed are kept aside
//! (zero-copy where it lies in one fragment) and a fragment that completes a frame is passed on
//! only after that frame passed the check, so tonic never decodes a large message that did not.
//! Compressed frames are passed on unchecked: guestd's services accept no compression, so tonic
//! refuses them itself.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::Bytes;
use http_body::Frame as HttpFrame;

use super::envelope::{FLAG_COMPRESSED, FrameDecoder};
use super::error::ConnectProtocolError;
use super::{LazyRegistry, MAX_MESSAGE_BYTES};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Messages this large or larger are checked (see the module docs).
const CHECKED_FROM: usize = 64 * 1024;

/// A gRPC request body whose messages are checked as they complete.
pub(super) struct CheckedRequest {
    inner: Body,
    frames: FrameDecoder,
    registry: Arc<LazyRegistry>,
    /// The request path: `/pkg.Service/Method`.
    path: String,
    /// Set once a message failed: the body then ends with that error.
    failed: bool,
}

impl CheckedRequest {
    pub(super) fn new(inner: Body, registry: Arc<LazyRegistry>, path: String) -> Self {
        CheckedRequest { inner, frames: FrameDecoder::new(MAX_MESSAGE_BYTES), registry, path, failed: false }
    }

    /// Checks every frame `data` completes.
    fn check(&mut self, data: &Bytes) -> Result<(), ConnectProtocolError> {
        self.frames.push(data.clone());
        while let Some(frame) = self.frames.decode()? {
            if frame.flags & FLAG_COMPRESSED == 0
                && frame.payload.len() >= CHECKED_FROM
                && let Some(method) = self.registry.get().methods.get(&self.path)
            {
                method.codec.check_proto(&frame.payload)?;
            }
        }
        Ok(())
    }
}

/// The error tonic reads from the body: a `Status` is reported to the client as it is.
fn status(err: &ConnectProtocolError) -> BoxError {
    let wire = err.to_wire();
    Box::new(tonic::Status::new(tonic::Code::from(wire.code as i32), wire.message))
}

impl http_body::Body for CheckedRequest {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref()
            && let Err(err) = self.check(data)
        {
            self.failed = true;
            return Poll::Ready(Some(Err(status(&err))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
