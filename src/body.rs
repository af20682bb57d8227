//! Reading a whole request body in memory proportional to its size.
//!
//! hyper hands a body over in fragments that are slices of its read buffers, so keeping the
//! fragments (as `http_body_util::Collected` does until it is turned into bytes) keeps the
//! buffers: a client sending one byte per HTTP/1.1 chunk or h2 DATA frame made each byte cost a
//! whole buffer, kilobytes, and a 1 MiB body gigabytes. Here every fragment is copied into one
//! buffer as it arrives, which frees hyper's at once.

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt as _;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadBodyError {
    #[error("request body larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("reading the request body")]
    Read(#[source] axum::Error),
}

/// The whole of `body`, refusing more than `max` bytes as soon as they arrive. `expected` (a
/// declared `Content-Length`) sizes the buffer up front when it is within `max`.
pub async fn read_to_bytes<B>(body: B, max: usize, expected: Option<u64>) -> Result<Bytes, ReadBodyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut out = BytesMut::with_capacity(expected.map_or(0, |n| n.min(max as u64) as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadBodyError::Read(axum::Error::new(e)))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(ReadBodyError::TooLarge { max });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use http_body_util::StreamBody;

    use super::*;

    fn fragments(pieces: Vec<&'static [u8]>) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let frames = pieces.into_iter().map(|p| Ok(http_body::Frame::data(Bytes::from_static(p))));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn fragments_are_joined_and_the_limit_is_checked_as_they_arrive() {
        let body = read_to_bytes(fragments(vec![b"ab", b"", b"cd"]), 4, None).await.unwrap();
        assert_eq!(&body[..], b"abcd");
        let err = read_to_bytes(fragments(vec![b"ab", b"cde"]), 4, Some(2)).await.unwrap_err();
        assert!(matches!(err, ReadBodyError::TooLarge { max: 4 }), "{err}");
    }

    /// The point of this module: one-byte fragments cut from a big buffer are not kept while the
    /// rest of the body is awaited (the buffer is free once they were read).
    #[tokio::test]
    async fn small_fragments_do_not_keep_their_buffers() {
        let big = Bytes::from(vec![7u8; 64 * 1024]);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(http_body::Frame::data(b)), rx))
        });
        let reader = tokio::spawn(read_to_bytes(StreamBody::new(stream), 1 << 20, None));
        for i in 0..100 {
            tx.send(big.slice(i..=i)).await.unwrap();
        }
        // The channel holds one: once this one is in, the reader has taken all the others.
        tx.send(Bytes::from_static(b"!")).await.unwrap();
        tokio::task::yield_now().await;
        let big = big.try_into_mut().expect("no fragment of the big buffer is kept");
        drop((tx, big));
        let body = reader.await.unwrap().unwrap();
        assert_eq!(body.len(), 101);
    }
}
