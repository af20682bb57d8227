//! `GET /files?path=..[&username=..]`: a file streamed from disk (http.md §4.5).
//!
//! Order of checks as envd: user (401) → path (400) → open (404 missing, 400 directory) →
//! `Accept-Encoding` (406). gzip is chosen per envd's negotiation, except that any `Range` or
//! conditional header forces identity so 206/304 keep working, and (beyond envd) content that
//! is already compressed (archives, images, media — by magic bytes) goes out as identity
//! whenever the client accepts identity: gzip would only burn CPU on it. Identity responses follow Go's
//! `http.ServeContent`: `Last-Modified`, `Accept-Ranges`, single and multipart ranges,
//! `If-(Un)Modified-Since`/`If-(None-)Match`/`If-Range`; no ETag.
//!
//! Memory: the body is pulled from disk one [`crate::fs::read::CHUNK_BYTES`] chunk at a time,
//! only as fast as hyper sends it; gzip compresses chunk by chunk on the blocking pool (level 1:
//! the Python SDK's httpx asks for gzip by default, so this is the common download path and
//! must keep up with the network rather than squeeze the last percent).

use std::io::{self, Write as _};
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use futures_util::stream::{self, BoxStream, StreamExt};

use super::media::{self, SNIFF_LEN};
use super::range::{self, ByteRange, Precondition};
use super::{FilesError, FilesQuery, FilesState, blocking, lookup, resolve, username};
use crate::fs::ReadableFile;
use crate::fs::entry::base_name;

pub(super) async fn get_files(State(state): State<FilesState>, query: FilesQuery, headers: HeaderMap) -> Response {
    download(state, query, headers).await.unwrap_or_else(IntoResponse::into_response)
}

#[tracing::instrument(name = "files.download", skip_all, fields(path))]
async fn download(state: FilesState, query: FilesQuery, headers: HeaderMap) -> Result<Response, FilesError> {
    let defaults = state.session.defaults();
    let user = lookup(&username(&defaults, query.username.as_deref())?)?;
    let raw = query.path.unwrap_or_default();
    let path = resolve(&raw, &user, defaults.workdir.as_deref())?;
    // For the media type by extension, which only ASCII can match.
    let raw_path = raw.to_string_lossy();
    tracing::Span::current().record("path", tracing::field::display(path.display()));

    let opened = path.clone();
    let (file, head) = blocking(move || {
        let file = ReadableFile::open(&opened)?;
        let head = file.head(SNIFF_LEN)?;
        Ok((file, head))
    })
    .await?;

    let negotiated = negotiate(headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()));
    let conditional = [header::RANGE, header::IF_MODIFIED_SINCE, header::IF_NONE_MATCH, header::IF_RANGE]
        .iter()
        .any(|name| headers.get(name).is_some_and(|v| !v.is_empty()));
    let coding = match negotiated {
        Negotiated { identity_ok: false, .. } if conditional => return Err(FilesError::NotAcceptable),
        _ if conditional => Coding::Identity,
        // Accept-Encoding is advisory: content gzip cannot shrink goes out as is, saving the
        // CPU of compressing it (archives, images, media).
        Negotiated { best: Some(Coding::Gzip), identity_ok: true } if media::already_compressed(&head) => {
            Coding::Identity
        }
        Negotiated { best: Some(coding), .. } => coding,
        Negotiated { best: None, .. } => return Err(FilesError::NotAcceptable),
    };

    let mut common = HeaderMap::new();
    common.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if let Ok(value) = HeaderValue::from_str(&media::content_disposition(&base_name(&path))) {
        common.insert(header::CONTENT_DISPOSITION, value);
    }
    match coding {
        Coding::Gzip => Ok(gzip_response(common, &raw_path, &file)),
        Coding::Identity => identity_response(common, &raw_path, file, &head, &headers),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
}

/// Result of envd's `Accept-Encoding` negotiation: the coding to use (`None`: nothing
/// acceptable) and whether identity is still allowed (for range/conditional requests).
#[derive(Debug, PartialEq, Eq)]
struct Negotiated {
    best: Option<Coding>,
    identity_ok: bool,
}

/// envd's `parseAcceptEncoding`: highest q first (stable for ties); identity is acceptable
/// unless `identity;q=0`, or `*;q=0` without an explicit identity entry; `*` picks identity
/// unless identity is rejected, then gzip. Codings are case-insensitive; bad q values count as 1.
fn negotiate(header: Option<&str>) -> Negotiated {
    let Some(header) = header.map(str::trim).filter(|h| !h.is_empty()) else {
        return Negotiated { best: Some(Coding::Identity), identity_ok: true };
    };
    let mut offers: Vec<(String, f64)> = header
        .split(',')
        .map(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    let p = p.trim();
                    p.get(..2).filter(|k| k.eq_ignore_ascii_case("q=")).map(|_| p[2..].trim().parse::<f64>())
                })
                .find_map(Result::ok)
                .unwrap_or(1.0);
            (coding, q)
        })
        .collect();
    offers.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    let listed = |name: &str| offers.iter().find(|(c, _)| c == name).map(|(_, q)| *q);
    let identity_rejected = match (listed("identity"), listed("*")) {
        (Some(q), _) => q == 0.0,
        (None, Some(q)) => q == 0.0,
        (None, None) => false,
    };
    let identity_ok = !identity_rejected;
    for (coding, q) in &offers {
        if *q == 0.0 {
            continue;
        }
        match coding.as_str() {
            "identity" => return Negotiated { best: Some(Coding::Identity), identity_ok },
            "*" if identity_rejected => return Negotiated { best: Some(Coding::Gzip), identity_ok },
            "*" => return Negotiated { best: Some(Coding::Identity), identity_ok },
            "gzip" => return Negotiated { best: Some(Coding::Gzip), identity_ok },
            _ => {}
        }
    }
    Negotiated { best: identity_ok.then_some(Coding::Identity), identity_ok }
}

fn gzip_response(mut headers: HeaderMap, raw_path: &str, file: &ReadableFile) -> Response {
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    let content_type = media::type_by_extension(raw_path).unwrap_or_else(|| "application/octet-stream".to_owned());
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    // Read to end of file, not to the size seen at open: procfs files report 0.
    let body = Body::from_stream(gzip(file.chunks(0, None).boxed()));
    (StatusCode::OK, headers, body).into_response()
}

/// Compresses a byte stream as one gzip member, chunk by chunk on the blocking pool.
fn gzip(inner: BoxStream<'static, io::Result<Bytes>>) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send {
    struct State {
        inner: BoxStream<'static, io::Result<Bytes>>,
        encoder: Option<GzEncoder<Vec<u8>>>,
    }
    let state = State { inner, encoder: Some(GzEncoder::new(Vec::new(), Compression::fast())) };
    stream::unfold(state, |mut state| async move {
        loop {
            let mut encoder = state.encoder.take()?;
            match state.inner.next().await {
                Some(Ok(chunk)) => {
                    let compressed = tokio::task::spawn_blocking(move || {
                        encoder.write_all(&chunk)?;
                        let out = std::mem::take(encoder.get_mut());
                        Ok::<_, io::Error>((encoder, out))
                    })
                    .await
                    .unwrap_or_else(|join| Err(io::Error::other(join)));
                    match compressed {
                        Ok((encoder, out)) => {
                            state.encoder = Some(encoder);
                            if !out.is_empty() {
                                return Some((Ok(Bytes::from(out)), state));
                            }
                        }
                        Err(e) => return Some((Err(e), state)),
                    }
                }
                // The encoder stays `None`: the next poll ends the stream, and hyper aborts the
                // response instead of terminating it cleanly, so the client sees the failure.
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the file failed mid-download");
                    return Some((Err(e), state));
                }
                None => return Some((encoder.finish().map(Bytes::from), state)),
            }
        }
    })
}

/// `Last-Modified` for a file's mtime; none for the epoch itself (envd's "unknown") and for
/// dates HTTP cannot write — before 1970 or after 9999, both settable with `touch` — which
/// `httpdate` would panic on (and a panic aborts guestd).
fn last_modified(modified: SystemTime) -> Option<HeaderValue> {
    /// 9999-12-31T23:59:59Z, the last second an HTTP date can name.
    const LAST_HTTP_DATE: u64 = 253_402_300_799;
    let since_epoch = modified.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    if since_epoch.is_zero() || since_epoch.as_secs() > LAST_HTTP_DATE {
        return None;
    }
    HeaderValue::from_str(&httpdate::fmt_http_date(modified)).ok()
}

fn identity_response(
    mut headers: HeaderMap,
    raw_path: &str,
    file: ReadableFile,
    head: &[u8],
    request: &HeaderMap,
) -> Result<Response, FilesError> {
    if let Some(value) = file.modified.and_then(last_modified) {
        headers.insert(header::LAST_MODIFIED, value);
    }
    let use_range = match range::preconditions(request, file.modified) {
        Precondition::NotModified => return Ok((StatusCode::NOT_MODIFIED, headers).into_response()),
        Precondition::Failed => return Ok((StatusCode::PRECONDITION_FAILED, headers).into_response()),
        Precondition::Proceed { use_range } => use_range,
    };

    let content_type = media::type_by_extension(raw_path).unwrap_or_else(|| media::sniff(head).to_owned());
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));

    let size = file.size;
    let mut ranges = Vec::new();
    if use_range && let Some(value) = request.get(header::RANGE) {
        let value = value.to_str().unwrap_or("");
        ranges = range::parse_range(value, size).map_err(|source| FilesError::Range {
            size: matches!(source, range::RangeError::NoOverlap).then_some(size),
            source,
        })?;
        // Go ignores ranges that add up to more than the file ("probably an attack").
        if ranges.iter().map(|r| r.len).sum::<u64>() > size {
            ranges.clear();
        }
    }

    match ranges.as_slice() {
        [] => {
            set(&mut headers, header::CONTENT_TYPE, &content_type);
            // Size 0 may mean "unknown" (procfs): stream to end of file without a length.
            let body = if size == 0 {
                Body::from_stream(file.chunks(0, None))
            } else {
                set(&mut headers, header::CONTENT_LENGTH, &size.to_string());
                Body::from_stream(file.chunks(0, Some(size)))
            };
            Ok((StatusCode::OK, headers, body).into_response())
        }
        [single] => {
            set(&mut headers, header::CONTENT_TYPE, &content_type);
            set(&mut headers, header::CONTENT_RANGE, &single.content_range(size));
            set(&mut headers, header::CONTENT_LENGTH, &single.len.to_string());
            let body = Body::from_stream(file.chunks(single.start, Some(single.len)));
            Ok((StatusCode::PARTIAL_CONTENT, headers, body).into_response())
        }
        several => {
            let (content_type, length, body) = multipart_ranges(&file, several, &content_type);
            set(&mut headers, header::CONTENT_TYPE, &content_type);
            set(&mut headers, header::CONTENT_LENGTH, &length.to_string());
            Ok((StatusCode::PARTIAL_CONTENT, headers, body).into_response())
        }
    }
}

fn set(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// A `multipart/byteranges` body laid out as Go's `multipart.Writer` does, with its exact
/// length computed up front.
fn multipart_ranges(file: &ReadableFile, ranges: &[ByteRange], content_type: &str) -> (String, u64, Body) {
    let boundary = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let mut parts: Vec<BoxStream<'static, io::Result<Bytes>>> = Vec::with_capacity(ranges.len() * 2 + 1);
    let mut length = 0u64;
    for (i, range) in ranges.iter().enumerate() {
        let lead = if i == 0 { "" } else { "\r\n" };
        let head = format!(
            "{lead}--{boundary}\r\nContent-Range: {}\r\nContent-Type: {content_type}\r\n\r\n",
            range.content_range(file.size)
        );
        length += head.len() as u64 + range.len;
        parts.push(stream::once(async move { Ok(Bytes::from(head)) }).boxed());
        parts.push(file.chunks(range.start, Some(range.len)).boxed());
    }
    let tail = format!("\r\n--{boundary}--\r\n");
    length += tail.len() as u64;
    parts.push(stream::once(async move { Ok(Bytes::from(tail)) }).boxed());
    let body = Body::from_stream(stream::iter(parts).flatten());
    (format!("multipart/byteranges; boundary={boundary}"), length, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_modified_only_for_dates_http_can_write() {
        use std::time::Duration;
        let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(last_modified(at(784_111_777)).unwrap(), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert!(last_modified(SystemTime::UNIX_EPOCH).is_none(), "the epoch means unknown");
        assert!(last_modified(SystemTime::UNIX_EPOCH - Duration::from_secs(1)).is_none());
        assert!(last_modified(at(253_402_300_799)).is_some());
        assert!(last_modified(at(253_402_300_800)).is_none(), "year 10000");
    }

    fn best(header: &str) -> Option<Coding> {
        negotiate(Some(header)).best
    }

    #[test]
    fn negotiation_follows_envd() {
        assert_eq!(negotiate(None), Negotiated { best: Some(Coding::Identity), identity_ok: true });
        assert_eq!(best("gzip, deflate"), Some(Coding::Gzip), "httpx's default gets gzip");
        assert_eq!(best("GZIP"), Some(Coding::Gzip));
        assert_eq!(best("deflate, br"), Some(Coding::Identity));
        assert_eq!(best("gzip;q=0.5, identity"), Some(Coding::Identity));
        assert_eq!(best("gzip;q=0"), Some(Coding::Identity));
        assert_eq!(best("*"), Some(Coding::Identity));
        assert_eq!(best("*, identity;q=0"), Some(Coding::Gzip));
        assert_eq!(best("br, identity;q=0"), None);
        assert_eq!(best("*;q=0"), None);
        assert_eq!(best("*;q=0, identity"), Some(Coding::Identity));
        assert!(!negotiate(Some("gzip, identity;q=0")).identity_ok);
    }
}
