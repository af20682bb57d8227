//! `GET /files` (download) and `POST /files` (upload): envd's plain-HTTP file transfer
//! (http.md §4.5–4.6), streamed both ways so memory stays flat whatever the file size.
//!
//! | file | owns |
//! |---|---|
//! | this file | [`FilesState`], the method router, query/user/path decoding, [`FilesError`] and the one mapping to HTTP statuses ([`status`]) |
//! | `files/download.rs` | encoding negotiation, conditional/range handling, gzip on the fly |
//! | `files/upload.rs` | octet-stream and multipart bodies, gzip request bodies, `X-Metadata-*`, one [`crate::fs::AtomicWrite`] per file |
//! | `files/media.rs` | Go-compatible media-type and `Content-Disposition` grammar, content sniffing |
//! | `files/range.rs` | `Range` parsing and precondition evaluation (`http.ServeContent` semantics) |
//!
//! All disk work is `crate::fs`; nothing here touches a path except through it. Errors are
//! JSON `{"code":<status>,"message":"..."}` like envd's `jsonError`. The request user (the
//! `username` query parameter, else the session's default user) decides path resolution and
//! the ownership of created files; I/O runs with guestd's own privileges, as in envd.
//! Signed-URL checks (`signature`, `signature_expiration`) belong to the auth layer in front.

mod download;
mod media;
mod range;
mod upload;

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::Serialize;

use crate::fs::{FsError, MetadataError, Owner};
use crate::paths::{self, PathError};
use crate::session::{Defaults, Session};
use crate::users::{self, User, UserError};

/// What the `/files` handlers need from the agent.
#[derive(Debug, Clone)]
pub struct FilesState {
    /// Default user and workdir, read per request (`/init` may change them).
    pub session: Session,
}

/// `GET` and `POST` for the `/files` route: `router.route("/files", files::method_router(state))`.
pub fn method_router(state: FilesState) -> MethodRouter {
    get(download::get_files).post(upload::post_files).with_state(state)
}

/// Query parameters of both directions. Unknown ones (`signature`, ...) are ignored here.
#[derive(Debug, Default, PartialEq)]
struct FilesQuery {
    /// Bytes, as percent-decoded: a Linux file name need not be UTF-8 (`%FF` names byte 0xFF,
    /// where a decoder into `String` would substitute U+FFFD and write or read another file).
    path: Option<OsString>,
    username: Option<String>,
}

impl FilesQuery {
    /// `application/x-www-form-urlencoded` as Go's `url.ParseQuery` reads it for envd: `+` is a
    /// space, a malformed `%` escape stays as written, the first of repeated keys counts.
    fn parse(raw: Option<&str>) -> FilesQuery {
        let mut query = FilesQuery::default();
        for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode(value.replace('+', " ").as_bytes()).collect::<Vec<u8>>();
            match &*percent_encoding::percent_decode_str(&key.replace('+', " ")).decode_utf8_lossy() {
                "path" if query.path.is_none() => query.path = Some(OsString::from_vec(value)),
                "username" if query.username.is_none() => {
                    query.username = Some(String::from_utf8_lossy(&value).into_owned());
                }
                _ => {}
            }
        }
        query
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for FilesQuery {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(FilesQuery::parse(parts.uri.query()))
    }
}

/// Why a `/files` request failed. [`status`] maps each to its HTTP status; the message a client
/// sees is the error's chain (`what: why: root cause`).
#[derive(Debug, thiserror::Error)]
enum FilesError {
    /// No `username` parameter and no default user configured.
    #[error("username not provided")]
    NoUser,
    /// The user has no passwd entry (401, like envd) or passwd could not be read (500).
    #[error("error looking up user")]
    User(#[source] UserError),
    /// `~name` paths and the like.
    #[error("error resolving path '{path}'")]
    Path {
        path: String,
        #[source]
        source: PathError,
    },
    /// An upload path ending in `/`.
    #[error("cannot upload to '{path}': the path ends with '/', name the file to write")]
    UploadToDirectory { path: String },
    /// An octet-stream upload without `?path=`.
    #[error("path query parameter is required for raw body upload")]
    MissingPath,
    /// `Content-Encoding` other than absent, `identity` or `gzip`.
    #[error("unsupported Content-Encoding: {0}, supported: [gzip]")]
    UnsupportedContentEncoding(String),
    /// An upload whose `Content-Type` is neither multipart nor octet-stream.
    #[error("unsupported content type: {0}, expected multipart/form-data or application/octet-stream")]
    UnsupportedContentType(String),
    /// A multipart `Content-Type` that is not `multipart/form-data` with a boundary.
    #[error("error parsing multipart form: {0}")]
    BadMultipart(String),
    /// `X-Metadata-*` headers that break the xattr rules.
    #[error("invalid metadata")]
    Metadata(#[source] MetadataError),
    /// The multipart body is malformed or ended early.
    #[error("error reading form")]
    Multipart(#[source] multer::Error),
    /// A multipart body with more than `limit` bytes before its first boundary or in one
    /// part's boundary line and headers.
    #[error(
        "error reading form: more than {} KiB of multipart preamble or part headers (no boundary or no blank line after the headers)",
        .limit / 1024
    )]
    MultipartFraming { limit: usize },
    /// A `file` part without a usable `filename` (and no `path` override).
    #[error("error getting multipart part file name")]
    PartFileName(#[source] media::MediaTypeError),
    /// A `file` part whose Content-Disposition has no `filename` (and no `path` override).
    #[error("error getting multipart part file name: filename not found in Content-Disposition header")]
    MissingFileName,
    /// Two parts of one request resolve to the same file.
    #[error(
        "you cannot upload multiple files to the same path '{}' in one upload request, only the first specified file was uploaded",
        .path.display()
    )]
    DuplicateTarget { path: PathBuf },
    /// The request body broke off, or its gzip encoding is corrupt or truncated.
    #[error("error reading request body")]
    Body(#[source] io::Error),
    /// `Accept-Encoding` rules out identity and everything guestd can send.
    #[error("no acceptable encoding found, supported: [gzip]")]
    NotAcceptable,
    /// The `Range` header cannot be satisfied; `size` (for `Content-Range: bytes */size`) when
    /// the ranges were well-formed but all beyond the end.
    #[error("requested range not satisfiable")]
    Range {
        #[source]
        source: range::RangeError,
        size: Option<u64>,
    },
    /// A filesystem operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// The one mapping from `/files` errors to HTTP statuses. envd's codes where it has them
/// (http.md §4.5–4.6): 400 bad input, 401 unknown user, 404 missing, 406 unacceptable
/// encoding, 507 out of space, 500 otherwise. Deliberate choices beyond envd: a malformed or
/// truncated body (multipart or gzip) is the client's fault, 400 (envd: 500); so is a file
/// where a parent directory must be ("path is a file", envd: 500 — the RPCs answer
/// `invalid_argument` for it too), a non-regular file or a symlink loop; EACCES/EPERM is 403
/// (envd: 500 — the SDK treats both as a generic `SandboxException`).
fn status(err: &FilesError) -> StatusCode {
    match err {
        FilesError::NoUser
        | FilesError::Path { .. }
        | FilesError::MissingPath
        | FilesError::UploadToDirectory { .. }
        | FilesError::UnsupportedContentEncoding(_)
        | FilesError::UnsupportedContentType(_)
        | FilesError::BadMultipart(_)
        | FilesError::Metadata(_)
        | FilesError::Multipart(_)
        | FilesError::MultipartFraming { .. }
        | FilesError::PartFileName(_)
        | FilesError::MissingFileName
        | FilesError::DuplicateTarget { .. }
        | FilesError::Body(_) => StatusCode::BAD_REQUEST,
        FilesError::User(UserError::Unknown { .. }) => StatusCode::UNAUTHORIZED,
        FilesError::User(UserError::Lookup { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
        FilesError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
        FilesError::Range { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        FilesError::Fs(fs) => match fs {
            FsError::NotFound { .. } => StatusCode::NOT_FOUND,
            FsError::IsADirectory { .. }
            | FsError::NotADirectory { .. }
            | FsError::NotRegularFile { .. }
            | FsError::ParentNotDirectory { .. }
            | FsError::CyclicSymlink { .. }
            | FsError::NetworkMount { .. } => StatusCode::BAD_REQUEST,
            FsError::AlreadyExists { .. } => StatusCode::CONFLICT,
            FsError::PermissionDenied { .. } => StatusCode::FORBIDDEN,
            FsError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            // Never from a download or upload (only ListDir lists).
            FsError::ListingTooLarge { .. } | FsError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        },
        FilesError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for FilesError {
    fn into_response(self) -> Response {
        let status = status(&self);
        let message = crate::error_chain(&self);
        if status.is_server_error() {
            tracing::warn!(%status, error = %message, "files request failed");
        } else {
            tracing::debug!(%status, error = %message, "files request refused");
        }
        let mut response = super::json_error(status, &message);
        if let FilesError::Range { size: Some(size), .. } = &self
            && let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}"))
        {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
        response
    }
}

/// One written file in the upload response (envd's `EntryInfo` of `/files`).
#[derive(Debug, Serialize)]
struct WrittenFile {
    path: String,
    name: String,
    r#type: &'static str,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    metadata: std::collections::BTreeMap<String, String>,
}

type UploadResponse = Json<Vec<WrittenFile>>;

/// The request user's name: `username` if given (even empty), else the session's default user.
fn username(defaults: &Defaults, requested: Option<&str>) -> Result<String, FilesError> {
    match requested {
        Some(name) => Ok(name.to_owned()),
        None if defaults.user.is_empty() => Err(FilesError::NoUser),
        None => Ok(defaults.user.clone()),
    }
}

/// passwd lookup; an unknown user is a 401, as in envd.
fn lookup(name: &str) -> Result<User, FilesError> {
    users::lookup(name).map_err(FilesError::User)
}

fn resolve(raw: &OsStr, user: &User, workdir: Option<&std::path::Path>) -> Result<PathBuf, FilesError> {
    paths::resolve(raw, user, workdir)
        .map_err(|source| FilesError::Path { path: raw.to_string_lossy().into_owned(), source })
}

fn owner(user: &User) -> Owner {
    Owner { uid: user.uid, gid: user.gid }
}

/// Runs blocking filesystem work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FilesError> + Send + 'static,
) -> Result<T, FilesError> {
    tokio::task::spawn_blocking(work).await.map_err(FilesError::Task)?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Go's `url.ParseQuery` (envd): `+` is a space, bad escapes stay, the first value of a
    /// repeated key counts, other keys are ignored, and `path` keeps bytes that are not UTF-8.
    #[test]
    fn the_query_is_read_as_envd_reads_it() {
        let q = FilesQuery::parse(Some("path=%2Ftmp%2Fa+b%zz&username=us%65r&path=/other&signature=x"));
        assert_eq!(q, FilesQuery { path: Some("/tmp/a b%zz".into()), username: Some("user".into()) });
        let q = FilesQuery::parse(Some("path=/tmp/%FF&username"));
        assert_eq!(q.path, Some(OsString::from_vec(b"/tmp/\xff".to_vec())));
        assert_eq!(q.username.as_deref(), Some(""), "present but empty: the empty user, not the default");
        assert_eq!(FilesQuery::parse(None), FilesQuery::default());
    }

    #[test]
    fn statuses_follow_envd() {
        let nf = FilesError::Fs(FsError::NotFound { path: "/x".into() });
        assert_eq!(status(&nf), StatusCode::NOT_FOUND);
        let dir = FilesError::Fs(FsError::IsADirectory { path: "/x".into() });
        assert_eq!(status(&dir), StatusCode::BAD_REQUEST);
        let user = FilesError::User(UserError::Unknown { name: "nobody-here".into() });
        assert_eq!(status(&user), StatusCode::UNAUTHORIZED);
        let full = FilesError::Fs(FsError::NoSpace { path: "/x".into(), source: io::Error::other("full") });
        assert_eq!(status(&full), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(status(&FilesError::NotAcceptable), StatusCode::NOT_ACCEPTABLE);
    }

    #[tokio::test]
    async fn error_body_is_envd_json() {
        let err = FilesError::User(UserError::Unknown { name: "ghost".into() });
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json; charset=utf-8");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        assert_eq!(&body[..], b"{\"code\":401,\"message\":\"error looking up user: unknown user 'ghost'\"}\n");
    }
}
