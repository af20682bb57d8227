//! `POST /files`: octet-stream or multipart uploads (http.md §4.6), each file streamed into a
//! [`crate::fs::AtomicWrite`] and renamed into place only when its bytes are complete.
//!
//! Order of checks as envd: user name (400) → `Content-Encoding` (400) → user lookup (401) →
//! `X-Metadata-*` (400) → `Content-Type` dispatch (400). Multipart parts are handled in
//! request order; a failing part stops the request and parts before it stay written (envd
//! does the same), the failing one leaves nothing.
//!
//! Memory: nothing collects a body. The request body is pulled in hyper's chunks (or
//! [`GUNZIP_CHUNK`] pieces when gzip-encoded) and each chunk is handed to the file before the
//! next is read, so a slow disk slows the client down (TCP backpressure) instead of filling
//! memory. Multipart framing is parsed by `multer` over the same stream.

use std::io;
use std::path::PathBuf;

use async_compression::tokio::bufread::GzipDecoder;
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use tokio_util::io::{ReaderStream, StreamReader};

use super::media::parse_media_type;
use super::{
    FilesError, FilesQuery, FilesState, UploadResponse, WrittenFile, blocking, lookup, owner, resolve, username,
};
use crate::fs::entry::base_name;
use crate::fs::{self, AtomicWrite, Metadata, Owner};
use crate::users::User;

/// Read size of the gzip decoder's output: large enough that a fast upload costs few
/// file writes, small enough to be irrelevant per concurrent upload.
const GUNZIP_CHUNK: usize = 64 * 1024;

/// Header prefix carrying metadata (`X-Metadata-<key>: <value>`), lowercase as `http` stores it.
const METADATA_HEADER_PREFIX: &str = "x-metadata-";

pub(super) async fn post_files(
    State(state): State<FilesState>,
    query: Result<Query<FilesQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match upload(state, query, headers, body).await {
        Ok(written) => written.into_response(),
        Err(err) => err.into_response(),
    }
}

#[tracing::instrument(name = "files.upload", skip_all, fields(path, user))]
async fn upload(
    state: FilesState,
    query: Result<Query<FilesQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<UploadResponse, FilesError> {
    let Query(query) = query.map_err(FilesError::Query)?;
    // envd rejects an unsupported encoding before looking the user up.
    let defaults = state.session.defaults();
    let username = username(&defaults, query.username.as_deref())?;
    let gzip = content_encoding(&headers)?;
    let user = lookup(&username)?;
    let workdir = defaults.workdir;
    tracing::Span::current().record("user", user.name.as_str());
    let metadata = metadata_from_headers(&headers)?;

    let content_type = headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let content_type = content_type.unwrap_or_default();
    let media = parse_media_type(&content_type).ok();
    let essence = media.as_ref().map(|m| m.essence.clone()).unwrap_or_default();
    let target = Target { user: &user, workdir: workdir.as_deref(), owner: owner(&user), metadata: &metadata };

    if essence == "application/octet-stream" {
        let raw = query.path.ok_or(FilesError::MissingPath)?;
        let path = resolve(&raw, &user, workdir.as_deref())?;
        tracing::Span::current().record("path", tracing::field::display(path.display()));
        let written = write_file(&path, &target, body_stream(body, gzip).map_err(FilesError::Body)).await?;
        return Ok(Json(vec![written]));
    }
    if essence.starts_with("multipart/") {
        let Some(media) = media.filter(|_| essence == "multipart/form-data") else {
            return Err(FilesError::BadMultipart(format!("expected multipart/form-data, got {essence}")));
        };
        let boundary = media
            .params
            .get("boundary")
            .filter(|b| !b.is_empty())
            .ok_or_else(|| FilesError::BadMultipart("no multipart boundary param in Content-Type".to_owned()))?;
        if let Some(raw) = &query.path {
            tracing::Span::current().record("path", raw.as_str());
        }
        let parts = multer::Multipart::new(OneChunkPerPoll::new(body_stream(body, gzip)), boundary.clone());
        return upload_parts(parts, query.path.as_deref(), &target).await.map(Json);
    }
    Err(FilesError::UnsupportedContentType(content_type))
}

/// What every file of one request shares.
struct Target<'a> {
    user: &'a User,
    workdir: Option<&'a std::path::Path>,
    owner: Owner,
    metadata: &'a Metadata,
}

/// envd's `parseContentEncoding`: absent/`identity` → plain, `gzip` (any case, `;q` ignored)
/// → gzip, anything else refused.
fn content_encoding(headers: &HeaderMap) -> Result<bool, FilesError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(false) };
    let raw = String::from_utf8_lossy(value.as_bytes()).into_owned();
    let coding = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match coding.as_str() {
        "" | "identity" => Ok(false),
        "gzip" => Ok(true),
        _ => Err(FilesError::UnsupportedContentEncoding(raw)),
    }
}

/// `X-Metadata-<key>` headers → validated metadata; keys lowercased, first value of each.
fn metadata_from_headers(headers: &HeaderMap) -> Result<Metadata, FilesError> {
    let pairs = headers.iter().filter_map(|(name, value)| {
        let key = name.as_str().strip_prefix(METADATA_HEADER_PREFIX)?;
        Some((key.to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
    });
    Metadata::new(pairs).map_err(FilesError::Metadata)
}

/// The request body as a stream of byte chunks, gunzipped when `gzip` (all members of a
/// multi-member stream, like Go's `gzip.Reader`; truncation is an error, never a short file).
fn body_stream(body: Body, gzip: bool) -> BoxStream<'static, io::Result<Bytes>> {
    let raw = body.into_data_stream().map_err(io::Error::other);
    if !gzip {
        return raw.boxed();
    }
    let mut decoder = GzipDecoder::new(StreamReader::new(raw));
    decoder.multiple_members(true);
    ReaderStream::with_capacity(decoder, GUNZIP_CHUNK).boxed()
}

/// Streams `data` into `path` atomically and describes the result.
async fn write_file(
    path: &std::path::Path,
    target: &Target<'_>,
    mut data: impl futures_util::Stream<Item = Result<Bytes, FilesError>> + Unpin,
) -> Result<WrittenFile, FilesError> {
    let mut file = AtomicWrite::create(path, target.owner, target.metadata.clone()).await?;
    while let Some(chunk) = data.next().await {
        file.write(&chunk?).await?;
    }
    let written = file.written();
    file.commit().await?;
    tracing::debug!(path = %path.display(), bytes = written, "file written");
    let read_back = path.to_path_buf();
    let metadata = blocking(move || Ok(fs::metadata::read(&read_back))).await?;
    Ok(WrittenFile { path: path.to_string_lossy().into_owned(), name: base_name(path), r#type: "file", metadata })
}

/// Hands `multer` one chunk per poll. multer's buffer pulls from its stream until the stream
/// is pending; a gzip decoder over already-received bytes is never pending, so without this a
/// small, highly compressible body would be inflated into memory whole before the first
/// byte reaches a file. With it, multer holds at most one chunk plus an unfinished boundary.
struct OneChunkPerPoll<S> {
    inner: S,
    yielded: bool,
}

impl<S> OneChunkPerPoll<S> {
    fn new(inner: S) -> Self {
        OneChunkPerPoll { inner, yielded: false }
    }
}

impl<S: futures_util::Stream + Unpin> futures_util::Stream for OneChunkPerPoll<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if std::mem::take(&mut self.yielded) {
            // Pending with an immediate wake-up: multer stops filling its buffer and consumes
            // what it has; the task is polled again right away.
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let next = self.inner.poll_next_unpin(cx);
        if matches!(next, std::task::Poll::Ready(Some(_))) {
            self.yielded = true;
        }
        next
    }
}

/// Writes every `file` part of a `multipart/form-data` body, in order.
async fn upload_parts(
    mut parts: multer::Multipart<'static>,
    path_override: Option<&str>,
    target: &Target<'_>,
) -> Result<Vec<WrittenFile>, FilesError> {
    let mut written: Vec<WrittenFile> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    while let Some(mut part) = parts.next_field().await.map_err(FilesError::Multipart)? {
        let disposition =
            part.headers().get(header::CONTENT_DISPOSITION).map(|v| String::from_utf8_lossy(v.as_bytes()));
        let disposition = parse_media_type(disposition.as_deref().unwrap_or(""));
        // Go's `Part.FormName`: only `form-data` dispositions have a name.
        let is_file = matches!(&disposition, Ok(d) if d.essence == "form-data"
            && d.params.get("name").map(String::as_str) == Some("file"));
        if !is_file {
            continue; // multer skips the rest of the part on the next `next_field`
        }
        let raw = match path_override {
            Some(raw) => raw.to_owned(),
            None => {
                let disposition = disposition.map_err(FilesError::PartFileName)?;
                disposition.params.get("filename").cloned().ok_or(FilesError::MissingFileName)?
            }
        };
        let path = resolve(&raw, target.user, target.workdir)?;
        if seen.contains(&path) {
            return Err(FilesError::DuplicateTarget { path });
        }
        seen.push(path.clone());
        written.push(write_file(&path, target, (&mut part).map_err(FilesError::Multipart)).await?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn multer_gets_one_chunk_per_poll() {
        use std::task::{Context, Poll};
        let always_ready = futures_util::stream::iter([1, 2, 3]);
        let mut paced = OneChunkPerPoll::new(always_ready);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert_eq!(paced.poll_next_unpin(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(paced.poll_next_unpin(&mut cx), Poll::Pending, "a buffer-filling loop stops here");
        assert_eq!(paced.poll_next_unpin(&mut cx), Poll::Ready(Some(2)));
        assert_eq!(paced.poll_next_unpin(&mut cx), Poll::Pending);
        assert_eq!(paced.poll_next_unpin(&mut cx), Poll::Ready(Some(3)));
        assert_eq!(paced.poll_next_unpin(&mut cx), Poll::Pending);
        assert_eq!(paced.poll_next_unpin(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn content_encoding_rules() {
        let mut h = HeaderMap::new();
        assert!(!content_encoding(&h).unwrap());
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("GZip;q=1"));
        assert!(content_encoding(&h).unwrap());
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("identity"));
        assert!(!content_encoding(&h).unwrap());
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        let err = content_encoding(&h).unwrap_err();
        assert_eq!(err.to_string(), "unsupported Content-Encoding: br, supported: [gzip]");
    }

    #[test]
    fn metadata_headers_are_lowercased_and_validated() {
        let mut h = HeaderMap::new();
        h.append("X-Metadata-Owner", HeaderValue::from_static("alice"));
        h.append("x-metadata-owner", HeaderValue::from_static("bob"));
        h.append("X-Other", HeaderValue::from_static("ignored"));
        let m = metadata_from_headers(&h).unwrap().into_map();
        assert_eq!(m.into_iter().collect::<Vec<_>>(), [("owner".to_owned(), "alice".to_owned())]);
        h.append("x-metadata-bad", HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert!(matches!(metadata_from_headers(&h), Err(FilesError::Metadata(_))));
    }
}
