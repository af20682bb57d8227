//! Conditional and range requests for downloads, as Go's `http.ServeContent` answers them
//! (envd serves identity downloads through it). guestd sends no ETag, so entity tags never
//! match: `If-Match` fails unless `*`, `If-None-Match` succeeds unless `*`, `If-Range` with
//! an entity tag never applies the range.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, header};

/// Outcome of the precondition headers for a GET.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Precondition {
    /// Serve normally; `use_range` says whether a `Range` header still applies (`If-Range`).
    Proceed { use_range: bool },
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// RFC 9110 §13.2.2 evaluation order, as `checkPreconditions` in Go's net/http.
pub(crate) fn preconditions(headers: &HeaderMap, modified: Option<SystemTime>) -> Precondition {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let modified = modified.map(truncate_to_seconds);

    let mut ok = header(header::IF_MATCH).map(|value| value.split(',').any(|tag| tag.trim() == "*"));
    if ok.is_none()
        && let (Some(value), Some(modified)) = (header(header::IF_UNMODIFIED_SINCE), modified)
        && let Ok(since) = httpdate::parse_http_date(value)
    {
        ok = Some(modified <= since);
    }
    if ok == Some(false) {
        return Precondition::Failed;
    }

    match header(header::IF_NONE_MATCH) {
        Some(value) if value.split(',').any(|tag| tag.trim() == "*") => return Precondition::NotModified,
        Some(_) => {}
        None => {
            if let (Some(value), Some(modified)) = (header(header::IF_MODIFIED_SINCE), modified)
                && let Ok(since) = httpdate::parse_http_date(value)
                && modified <= since
            {
                return Precondition::NotModified;
            }
        }
    }

    let use_range = match header(header::IF_RANGE) {
        None => true,
        Some(value) if value.starts_with('"') || value.starts_with("W/") => false,
        Some(value) => match (httpdate::parse_http_date(value), modified) {
            (Ok(date), Some(modified)) => date == modified,
            _ => false,
        },
    };
    Precondition::Proceed { use_range }
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

/// A satisfiable byte range: `start` and `len` within the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteRange {
    pub start: u64,
    pub len: u64,
}

impl ByteRange {
    /// `bytes a-b/size` for `Content-Range`.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.start + self.len - 1, size)
    }
}

/// Why a `Range` header cannot be served (416).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum RangeError {
    /// Not `bytes=` followed by well-formed specs.
    #[error("invalid range")]
    Invalid,
    /// Every range starts at or after the end of the file.
    #[error("invalid range: failed to overlap")]
    NoOverlap,
}

/// Upper bound on ranges in one request: each becomes a part with its own headers, and a
/// request of thousands of tiny ranges costs more than the whole file. Go's net/http has no
/// explicit limit but drops ranges whose total exceeds the file; this caps the work itself.
pub(crate) const MAX_RANGES: usize = 64;

/// Go's `parseRange`: the satisfiable ranges (clamped to `size`), empty for an empty spec
/// list. Unsatisfiable ones are dropped; if none remain, [`RangeError::NoOverlap`]. A
/// zero-length suffix (`-0`) is treated as unsatisfiable (RFC 9110 §14.1.3).
pub(crate) fn parse_range(value: &str, size: u64) -> Result<Vec<ByteRange>, RangeError> {
    let specs = value.strip_prefix("bytes=").ok_or(RangeError::Invalid)?;
    let mut ranges = Vec::new();
    let mut no_overlap = false;
    for spec in specs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (start, end) = spec.split_once('-').ok_or(RangeError::Invalid)?;
        let (start, end) = (start.trim(), end.trim());
        let range = if start.is_empty() {
            let suffix: u64 = parse_number(end)?;
            if suffix == 0 || size == 0 {
                no_overlap = true;
                continue;
            }
            let suffix = suffix.min(size);
            ByteRange { start: size - suffix, len: suffix }
        } else {
            let start: u64 = parse_number(start)?;
            if start >= size {
                no_overlap = true;
                continue;
            }
            let last = if end.is_empty() {
                size - 1
            } else {
                let end: u64 = parse_number(end)?;
                if end < start {
                    return Err(RangeError::Invalid);
                }
                end.min(size - 1)
            };
            ByteRange { start, len: last - start + 1 }
        };
        ranges.push(range);
        if ranges.len() > MAX_RANGES {
            return Err(RangeError::Invalid);
        }
    }
    if no_overlap && ranges.is_empty() {
        return Err(RangeError::NoOverlap);
    }
    Ok(ranges)
}

fn parse_number(s: &str) -> Result<u64, RangeError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Invalid);
    }
    s.parse().map_err(|_| RangeError::Invalid)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn r(start: u64, len: u64) -> ByteRange {
        ByteRange { start, len }
    }

    #[test]
    fn ranges_like_go() {
        assert_eq!(parse_range("bytes=0-4", 10), Ok(vec![r(0, 5)]));
        assert_eq!(parse_range("bytes=5-", 10), Ok(vec![r(5, 5)]));
        assert_eq!(parse_range("bytes=-3", 10), Ok(vec![r(7, 3)]));
        assert_eq!(parse_range("bytes=-30", 10), Ok(vec![r(0, 10)]));
        assert_eq!(parse_range("bytes=2-100", 10), Ok(vec![r(2, 8)]));
        assert_eq!(parse_range("bytes= 0-1 , 4-5", 10), Ok(vec![r(0, 2), r(4, 2)]));
        assert_eq!(parse_range("bytes=0-1,20-30", 10), Ok(vec![r(0, 2)]));
        assert_eq!(parse_range("bytes=", 10), Ok(vec![]));
        assert_eq!(parse_range("bytes=20-30", 10), Err(RangeError::NoOverlap));
        assert_eq!(parse_range("bytes=-0", 10), Err(RangeError::NoOverlap));
        assert_eq!(parse_range("bytes=0-", 0), Err(RangeError::NoOverlap));
        assert_eq!(parse_range("items=0-1", 10), Err(RangeError::Invalid));
        assert_eq!(parse_range("bytes=5-2", 10), Err(RangeError::Invalid));
        assert_eq!(parse_range("bytes=a-b", 10), Err(RangeError::Invalid));
        assert_eq!(parse_range("bytes=--1", 10), Err(RangeError::Invalid));
        assert_eq!(parse_range("bytes=1", 10), Err(RangeError::Invalid));
        assert_eq!(r(7, 3).content_range(10), "bytes 7-9/10");
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn conditional_requests_like_go() {
        let mtime = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap() + Duration::from_millis(500);
        let at = "Wed, 21 Oct 2015 07:28:00 GMT";
        let before = "Wed, 21 Oct 2015 07:27:59 GMT";
        let m = Some(mtime);
        let go = Precondition::Proceed { use_range: true };
        assert_eq!(preconditions(&headers(&[]), m), go);
        assert_eq!(preconditions(&headers(&[("if-modified-since", at)]), m), Precondition::NotModified);
        assert_eq!(preconditions(&headers(&[("if-modified-since", before)]), m), go);
        assert_eq!(preconditions(&headers(&[("if-modified-since", "garbage")]), m), go);
        assert_eq!(preconditions(&headers(&[("if-modified-since", at)]), None), go, "no mtime, no 304");
        assert_eq!(preconditions(&headers(&[("if-unmodified-since", before)]), m), Precondition::Failed);
        assert_eq!(preconditions(&headers(&[("if-unmodified-since", at)]), m), go);
        assert_eq!(preconditions(&headers(&[("if-match", "\"x\"")]), m), Precondition::Failed);
        assert_eq!(preconditions(&headers(&[("if-match", "*")]), m), go);
        assert_eq!(preconditions(&headers(&[("if-none-match", "*")]), m), Precondition::NotModified);
        assert_eq!(
            preconditions(&headers(&[("if-none-match", "\"x\""), ("if-modified-since", at)]), m),
            go,
            "If-None-Match takes precedence over If-Modified-Since"
        );
        assert_eq!(preconditions(&headers(&[("if-range", at)]), m), go);
        assert_eq!(preconditions(&headers(&[("if-range", before)]), m), Precondition::Proceed { use_range: false });
        assert_eq!(preconditions(&headers(&[("if-range", "\"etag\"")]), m), Precondition::Proceed { use_range: false });
    }
}
