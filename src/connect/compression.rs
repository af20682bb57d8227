//! gzip for Connect messages: the only compression guestd supports (as envd/connect-go).
//!
//! Decompression is bounded: a message that inflates past the limit is rejected while
//! inflating, so a small "zip bomb" never turns into a large allocation.

use std::io::{Read, Write};

use bytes::{BufMut, BytesMut};
use flate2::Compression;
use http::HeaderValue;

use super::error::ConnectProtocolError;

/// Value for `Accept-Encoding` / `Connect-Accept-Encoding` on every response.
pub const ACCEPTED: &str = "gzip";

/// Level 1: the agent shares the sandbox's CPUs with the user's workload, and the E2B SDKs
/// disable compression anyway; gzip is here for clients (connect-go) that negotiate it.
const LEVEL: Compression = Compression::fast();

/// The compression of a request or response body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    /// The request's `Content-Encoding` / `Connect-Content-Encoding`. Absent means identity.
    pub fn from_request(value: Option<&HeaderValue>) -> Result<Self, ConnectProtocolError> {
        let Some(value) = value else { return Ok(Self::Identity) };
        let s = value.to_str().unwrap_or("").trim();
        if s.is_empty() || s.eq_ignore_ascii_case("identity") {
            Ok(Self::Identity)
        } else if s.eq_ignore_ascii_case("gzip") {
            Ok(Self::Gzip)
        } else {
            Err(ConnectProtocolError::UnsupportedCompression(String::from_utf8_lossy(value.as_bytes()).into_owned()))
        }
    }

    /// What to send, given the client's `Accept-Encoding` / `Connect-Accept-Encoding` list.
    /// A `;q=0` entry counts as refused; other weights are not ranked (gzip is the only choice).
    pub fn negotiate(accept: Option<&HeaderValue>) -> Self {
        let Some(list) = accept.and_then(|v| v.to_str().ok()) else { return Self::Identity };
        let wants_gzip = list.split(',').any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()).is_some_and(|q| q <= 0.0)
            });
            name.eq_ignore_ascii_case("gzip") && !refused
        });
        if wants_gzip { Self::Gzip } else { Self::Identity }
    }
}

/// Inflate a gzip message, failing once the output would exceed `max` bytes. An empty input
/// is an empty message: it is never handed to the decoder (Connect rule).
pub fn gunzip(data: &[u8], max: usize) -> Result<Vec<u8>, ConnectProtocolError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(max));
    let read = flate2::read::GzDecoder::new(data)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(ConnectProtocolError::Decompress)?;
    if read > max {
        return Err(ConnectProtocolError::DecompressedTooLarge { max });
    }
    Ok(out)
}

/// Append the gzip compression of `data` to `out`.
pub fn gzip_into(data: &[u8], out: &mut BytesMut) {
    let mut enc = flate2::write::GzEncoder::new(out.writer(), LEVEL);
    // Writing into memory cannot fail.
    let _ = enc.write_all(data);
    let _ = enc.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn request_encodings() {
        assert_eq!(Encoding::from_request(None).unwrap(), Encoding::Identity);
        assert_eq!(Encoding::from_request(Some(&hv("identity"))).unwrap(), Encoding::Identity);
        assert_eq!(Encoding::from_request(Some(&hv("GZIP"))).unwrap(), Encoding::Gzip);
        let err = Encoding::from_request(Some(&hv("br"))).unwrap_err();
        assert_eq!(err.to_string(), r#"unknown compression "br": supported encodings are gzip, identity"#);
    }

    #[test]
    fn accept_lists() {
        assert_eq!(Encoding::negotiate(None), Encoding::Identity);
        assert_eq!(Encoding::negotiate(Some(&hv("identity"))), Encoding::Identity);
        assert_eq!(Encoding::negotiate(Some(&hv("zstd, gzip;q=0.5,br"))), Encoding::Gzip);
        assert_eq!(Encoding::negotiate(Some(&hv("gzip;q=0"))), Encoding::Identity);
    }

    #[test]
    fn round_trip_and_bomb_limit() {
        let data = vec![b'a'; 100_000];
        let mut out = BytesMut::new();
        gzip_into(&data, &mut out);
        assert!(out.len() < 1000);
        assert_eq!(gunzip(&out, 100_000).unwrap(), data);
        let err = gunzip(&out, 99_999).unwrap_err();
        assert!(matches!(err, ConnectProtocolError::DecompressedTooLarge { .. }), "{err}");
        assert!(gunzip(b"", 10).unwrap().is_empty());
        assert!(matches!(gunzip(b"not gzip", 10), Err(ConnectProtocolError::Decompress(_))));
    }
}
