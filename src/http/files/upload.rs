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
//! memory. Multipart framing is parsed by `multer` over the same stream, which holds at most
//! [`MULTIPART_FRAMING_LIMIT`] bytes of preamble or part headers plus one chunk.

use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use async_compression::tokio::bufread::GzipDecoder;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
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
    query: FilesQuery,
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
    query: FilesQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<UploadResponse, FilesError> {
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
        let path = file_path(&raw, &user, workdir.as_deref())?;
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
            tracing::Span::current().record("path", raw.to_string_lossy().as_ref());
        }
        let budget = FramingBudget::default();
        let feed = MultipartFeed::new(body_stream(body, gzip), budget.clone());
        let parts = multer::Multipart::new(feed, boundary.clone());
        return upload_parts(parts, budget, query.path.as_deref(), &target).await.map(Json);
    }
    Err(FilesError::UnsupportedContentType(content_type))
}

/// Where an upload named `raw` goes. A name ending in `/` names a directory: refused, where
/// envd (Go's `filepath.Clean`) would drop the slash and write a file called like the directory
/// the client meant, or fail with a 500 when that is an existing file.
fn file_path(raw: &OsStr, user: &User, workdir: Option<&std::path::Path>) -> Result<PathBuf, FilesError> {
    let path = resolve(raw, user, workdir)?;
    if path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return Err(FilesError::UploadToDirectory { path: raw.to_string_lossy().into_owned() });
    }
    Ok(path)
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

/// How many bytes multer may be handed without giving anything back (a part or a piece of a
/// part's data). Those bytes are the preamble before the first boundary, and each part's
/// boundary line and headers: multer holds them whole and searches them again on every chunk,
/// so a body that never shows a boundary, or a header section that never ends, would cost
/// memory and CPU without bound (a 174 KB gzip body inflating to 40 MB of zeros took 32 s of
/// CPU). Clients send a few hundred bytes there; envd (Go) skips any preamble line by line and
/// allows 10 MB of part headers, a limit no upload needs.
const MULTIPART_FRAMING_LIMIT: usize = 64 * 1024;

/// Bytes handed to multer since it last gave something back, shared between the feed and the
/// code that drives multer; `usize::MAX` once [`MULTIPART_FRAMING_LIMIT`] was exceeded.
#[derive(Clone, Default)]
struct FramingBudget(Arc<AtomicUsize>);

impl FramingBudget {
    /// multer returned a part or some part data: what it was handed has been parsed.
    fn progress(&self) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| (held != usize::MAX).then_some(0));
    }

    fn exceeded(&self) -> bool {
        self.0.load(Ordering::Relaxed) == usize::MAX
    }

    /// The error for a multer failure: ours when the feed cut it off for exceeding the budget.
    fn error(&self, err: multer::Error) -> FilesError {
        if self.exceeded() {
            FilesError::MultipartFraming { limit: MULTIPART_FRAMING_LIMIT }
        } else {
            FilesError::Multipart(err)
        }
    }
}

/// The body as multer sees it: one chunk per poll, and no chunk once multer holds more than
/// [`MULTIPART_FRAMING_LIMIT`] bytes without progress (it then reads an error, so it holds at
/// most the limit plus one chunk).
///
/// One chunk per poll: multer's buffer pulls from its stream until the stream is pending; a
/// gzip decoder over already-received bytes is never pending, so without this a small, highly
/// compressible body would be inflated into memory whole before the first byte reaches a file.
struct MultipartFeed<S> {
    inner: S,
    yielded: bool,
    budget: FramingBudget,
}

impl<S> MultipartFeed<S> {
    fn new(inner: S, budget: FramingBudget) -> Self {
        MultipartFeed { inner, yielded: false, budget }
    }
}

impl<S: futures_util::Stream<Item = io::Result<Bytes>> + Unpin> futures_util::Stream for MultipartFeed<S> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if std::mem::take(&mut self.yielded) {
            // Pending with an immediate wake-up: multer stops filling its buffer and consumes
            // what it has; the task is polled again right away.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.budget.0.load(Ordering::Relaxed) > MULTIPART_FRAMING_LIMIT {
            self.budget.0.store(usize::MAX, Ordering::Relaxed);
            return Poll::Ready(Some(Err(io::Error::other("multipart framing over its limit"))));
        }
        let next = self.inner.poll_next_unpin(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            // Never reaches usize::MAX: nothing is added once the limit is passed.
            self.budget.0.fetch_add(chunk.len(), Ordering::Relaxed);
            self.yielded = true;
        }
        next
    }
}

/// Writes every `file` part of a `multipart/form-data` body, in order.
async fn upload_parts(
    mut parts: multer::Multipart<'static>,
    budget: FramingBudget,
    path_override: Option<&OsStr>,
    target: &Target<'_>,
) -> Result<Vec<WrittenFile>, FilesError> {
    let mut written: Vec<WrittenFile> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    while let Some(mut part) = parts.next_field().await.map_err(|e| budget.error(e))? {
        budget.progress();
        let disposition =
            part.headers().get(header::CONTENT_DISPOSITION).map(|v| String::from_utf8_lossy(v.as_bytes()));
        let disposition = parse_media_type(disposition.as_deref().unwrap_or(""));
        // Go's `Part.FormName`: only `form-data` dispositions have a name.
        let is_file = matches!(&disposition, Ok(d) if d.essence == "form-data"
            && d.params.get("name").map(String::as_str) == Some("file"));
        if !is_file {
            // Read past it here rather than leave it to `next_field`, which would skip it
            // without giving anything back: the budget would count the part's data.
            while part.chunk().await.map_err(|e| budget.error(e))?.is_some() {
                budget.progress();
            }
            continue;
        }
        let raw = match path_override {
            Some(raw) => raw.to_owned(),
            None => {
                let disposition = disposition.map_err(FilesError::PartFileName)?;
                disposition.params.get("filename").cloned().ok_or(FilesError::MissingFileName)?.into()
            }
        };
        let path = file_path(&raw, target.user, target.workdir)?;
        if seen.contains(&path) {
            return Err(FilesError::DuplicateTarget { path });
        }
        seen.push(path.clone());
        let data = (&mut part).inspect_ok(|_| budget.progress()).map_err(|e| budget.error(e));
        written.push(write_file(&path, target, data).await?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn chunk(data: &'static [u8]) -> io::Result<Bytes> {
        Ok(Bytes::from_static(data))
    }

    #[test]
    fn multer_gets_one_chunk_per_poll() {
        let always_ready = futures_util::stream::iter([chunk(b"1"), chunk(b"2"), chunk(b"3")]);
        let mut paced = MultipartFeed::new(always_ready, FramingBudget::default());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for expected in [b"1", b"2", b"3"] {
            let next = paced.poll_next_unpin(&mut cx);
            assert!(matches!(next, Poll::Ready(Some(Ok(c))) if c == expected[..]));
            assert!(paced.poll_next_unpin(&mut cx).is_pending(), "a buffer-filling loop stops here");
        }
        assert!(matches!(paced.poll_next_unpin(&mut cx), Poll::Ready(None)));
    }

    /// `prefix` and then 4 MiB of `x` in 8 KiB chunks, counting the bytes pulled.
    fn long_body(prefix: &'static [u8], pulled: Arc<AtomicUsize>) -> BoxStream<'static, io::Result<Bytes>> {
        let filler = Bytes::from(vec![b'x'; 8192]);
        let rest = futures_util::stream::repeat_with(move || {
            pulled.fetch_add(filler.len(), Ordering::Relaxed);
            Ok(filler.clone())
        });
        let rest = rest.take(512);
        futures_util::stream::iter([chunk(prefix)]).chain(rest).boxed()
    }

    #[tokio::test]
    async fn multer_holds_a_bounded_preamble_and_header_section() {
        let part = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\nX-Long: ";
        for (case, prefix) in [("no boundary", &b""[..]), ("endless headers", &part[..])] {
            let pulled = Arc::new(AtomicUsize::new(0));
            let budget = FramingBudget::default();
            let mut parts =
                multer::Multipart::new(MultipartFeed::new(long_body(prefix, pulled.clone()), budget.clone()), "b");
            let err = parts.next_field().await.map(|_| ()).expect_err(case);
            assert!(matches!(budget.error(err), FilesError::MultipartFraming { .. }), "{case}");
            let pulled = pulled.load(Ordering::Relaxed);
            assert!(pulled <= MULTIPART_FRAMING_LIMIT + 8192, "{case}: {pulled} bytes pulled");
        }
    }

    #[tokio::test]
    async fn part_data_of_any_size_resets_the_budget() {
        let pulled = Arc::new(AtomicUsize::new(0));
        let budget = FramingBudget::default();
        let part = b"--b\r\nContent-Disposition: form-data; name=\"big\"\r\n\r\n";
        let mut parts =
            multer::Multipart::new(MultipartFeed::new(long_body(part, pulled.clone()), budget.clone()), "b");
        let mut field = parts.next_field().await.unwrap().expect("a part");
        budget.progress();
        while pulled.load(Ordering::Relaxed) < 3 << 20 {
            field.chunk().await.unwrap().expect("data");
            budget.progress();
        }
        assert!(!budget.exceeded());
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
