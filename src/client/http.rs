//! Plain HTTP on guestd's port: `/health`, `/ready`, `/init`, and `/files` uploads and
//! downloads. Each call dials its own HTTP/1.1 connection through the client's [`Connector`]
//! (see the module docs of `client` for why).
//!
//! Memory: transfers stream. An upload reads [`UPLOAD_CHUNK`] bytes at a time and hyper sends
//! each before the next is read; a download writes each received frame before asking for the
//! next. Nothing ever holds a whole file.
//!
//! [`Connector`]: super::Connector

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::{Client, ClientError};

/// Read size of uploads: big enough that a fast link costs few syscalls and frames, small
/// enough that progress moves smoothly and memory per transfer stays trivial.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// Most of an error body read to find guestd's message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Told how a transfer advances (guestctl draws a progress bar with it).
pub trait Progress: Send + Sync {
    /// Once, before the first byte; `total` when the size is known.
    fn start(&self, _total: Option<u64>) {}
    /// After each chunk, with that chunk's size.
    fn advance(&self, _bytes: u64) {}
}

/// Ignores progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// `POST /init`: configure the sandbox. Unset fields leave guestd's settings alone.
/// `Debug` shows whether a token is set, never the token.
#[derive(Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    /// Env vars for every later process; replaces the set of any earlier `/init`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// From now on every request must carry this token (see [`Client::with_access_token`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Steps the guest clock (RFC 3339 on the wire).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "rfc3339")]
    pub timestamp: Option<SystemTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// guestd extension: replaces the start command if it has not started yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
}

impl std::fmt::Debug for InitRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitRequest")
            .field("env_vars", &self.env_vars)
            .field("access_token", &self.access_token.as_ref().map(|_| "<redacted>"))
            .field("timestamp", &self.timestamp)
            .field("default_user", &self.default_user)
            .field("default_workdir", &self.default_workdir)
            .field("start_cmd", &self.start_cmd)
            .finish()
    }
}

fn rfc3339<S: serde::Serializer>(value: &Option<SystemTime>, serializer: S) -> Result<S::Ok, S::Error> {
    let Some(time) = value else { return serializer.serialize_none() };
    let formatted = time::OffsetDateTime::from(*time)
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(&formatted)
}

/// `GET /ready`: whether the start command is up, with guestd's JSON status.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    pub detail: serde_json::Value,
}

impl Client {
    /// `GET /health`: guestd is serving.
    pub async fn health(&self) -> Result<(), ClientError> {
        const WHAT: &str = "GET /health";
        let response = self.exchange(WHAT, self.request(Method::GET, "/health").body(Empty::<Bytes>::new())).await?;
        expect_success(WHAT, response).await.map(drop)
    }

    /// `GET /ready`: the start command's readiness.
    pub async fn ready(&self) -> Result<Readiness, ClientError> {
        const WHAT: &str = "GET /ready";
        let response = self.exchange(WHAT, self.request(Method::GET, "/ready").body(Empty::<Bytes>::new())).await?;
        let status = response.status();
        let body = read_limited(response.into_body()).await.map_err(|source| self.transport(WHAT, source))?;
        let detail = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol { what: WHAT, detail: format!("not JSON: {e}") })?;
        Ok(Readiness { ready: status == StatusCode::OK, detail })
    }

    /// `POST /init`.
    pub async fn init(&self, init: &InitRequest) -> Result<(), ClientError> {
        const WHAT: &str = "POST /init";
        let body = serde_json::to_vec(init).map_err(|e| ClientError::Protocol { what: WHAT, detail: e.to_string() })?;
        let request = self
            .request(Method::POST, "/init")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let response = self.exchange(WHAT, request).await?;
        expect_success(WHAT, response).await.map(drop)
    }

    /// Streams `reader` into the guest file `remote` (created or replaced atomically; parents
    /// created). `len`, when known, is sent as `Content-Length` and given to `progress`.
    /// Returns the bytes sent.
    pub async fn upload<R>(
        &self,
        reader: R,
        len: Option<u64>,
        remote: &str,
        progress: Arc<dyn Progress>,
    ) -> Result<u64, ClientError>
    where
        R: AsyncRead + Send + 'static,
    {
        const WHAT: &str = "upload (POST /files)";
        // A failing local read surfaces as a hyper body error; keep the real cause to report it.
        let local_error: Arc<Mutex<Option<io::Error>>> = Arc::default();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        progress.start(len);
        let (slot, counter) = (local_error.clone(), sent.clone());
        let frames = ReaderStream::with_capacity(reader, UPLOAD_CHUNK).map(move |chunk| match chunk {
            Ok(bytes) => {
                progress.advance(bytes.len() as u64);
                counter.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(Frame::data(bytes))
            }
            Err(err) => {
                let reported = io::Error::new(err.kind(), err.to_string());
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
                Err(reported)
            }
        });
        let mut request = self
            .request(Method::POST, &self.files_uri(remote))
            .header(header::CONTENT_TYPE, "application/octet-stream");
        if let Some(len) = len {
            request = request.header(header::CONTENT_LENGTH, len);
        }
        let result = self.exchange(WHAT, request.body(StreamBody::new(frames))).await;
        if let Some(source) = local_error.lock().unwrap_or_else(PoisonError::into_inner).take() {
            return Err(ClientError::Local { what: "reading the local side of the upload".into(), source });
        }
        expect_success(WHAT, result?).await?;
        Ok(sent.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Uploads the local file `local` to `remote`.
    pub async fn upload_file(
        &self,
        local: &Path,
        remote: &str,
        progress: Arc<dyn Progress>,
    ) -> Result<u64, ClientError> {
        let local_err = |source| ClientError::Local { what: format!("opening {}", local.display()), source };
        let file = tokio::fs::File::open(local).await.map_err(local_err)?;
        let len = file.metadata().await.map_err(local_err)?.len();
        self.upload(file, Some(len), remote, progress).await
    }

    /// Streams the guest file `remote` into `writer`; returns the bytes written.
    pub async fn download<W>(
        &self,
        remote: &str,
        writer: &mut W,
        progress: Arc<dyn Progress>,
    ) -> Result<u64, ClientError>
    where
        W: AsyncWrite + Unpin,
    {
        const WHAT: &str = "download (GET /files)";
        let request = self
            .request(Method::GET, &self.files_uri(remote))
            .header(header::ACCEPT_ENCODING, "identity")
            .body(Empty::<Bytes>::new());
        let response = expect_success(WHAT, self.exchange(WHAT, request).await?).await?;
        let total = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        progress.start(total);
        let mut body = response.into_body();
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| self.transport(WHAT, source))?;
            let Ok(data) = frame.into_data() else { continue };
            writer
                .write_all(&data)
                .await
                .map_err(|source| ClientError::Local { what: "writing the downloaded data".into(), source })?;
            written += data.len() as u64;
            progress.advance(data.len() as u64);
        }
        writer
            .flush()
            .await
            .map_err(|source| ClientError::Local { what: "writing the downloaded data".into(), source })?;
        if let Some(total) = total
            && total != written
        {
            return Err(ClientError::Protocol {
                what: WHAT,
                detail: format!("announced {total} bytes but sent {written}"),
            });
        }
        Ok(written)
    }

    /// Downloads `remote` to the local file `local`. The data goes to a sibling temporary file
    /// renamed over `local` once complete, so a failed download leaves `local` as it was.
    pub async fn download_file(
        &self,
        remote: &str,
        local: &Path,
        progress: Arc<dyn Progress>,
    ) -> Result<u64, ClientError> {
        let partial = partial_path(local);
        let local_err = |what: String| move |source| ClientError::Local { what, source };
        let mut file =
            tokio::fs::File::create(&partial).await.map_err(local_err(format!("creating {}", partial.display())))?;
        let result = self.download(remote, &mut file, progress).await;
        let synced = match result {
            Ok(n) => file.sync_all().await.map(|()| n).map_err(local_err(format!("writing {}", partial.display()))),
            Err(err) => Err(err),
        };
        drop(file);
        match synced {
            Ok(n) => {
                tokio::fs::rename(&partial, local)
                    .await
                    .map_err(local_err(format!("renaming onto {}", local.display())))?;
                Ok(n)
            }
            Err(err) => {
                let _ = tokio::fs::remove_file(&partial).await;
                Err(err)
            }
        }
    }

    /// `/files?path=…[&username=…]`.
    fn files_uri(&self, remote: &str) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("path", remote);
        if let Some(user) = &self.options.user {
            query.append_pair("username", user);
        }
        format!("/files?{}", query.finish())
    }

    fn request(&self, method: Method, path_and_query: &str) -> http::request::Builder {
        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, self.addr().authority())
            .header(header::USER_AGENT, concat!("guestd-client/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &self.options.access_token {
            builder = builder.header("x-access-token", token);
        }
        builder
    }

    /// Dials a fresh connection and sends one HTTP/1.1 request on it.
    async fn exchange<B>(
        &self,
        what: &'static str,
        request: Result<Request<B>, http::Error>,
    ) -> Result<Response<Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let request = request.map_err(|_| ClientError::BadHeader { what: "request header" })?;
        let stream = self.connector.dial().await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| self.transport(what, e))?;
        // Ends with the exchange: once the response body is read and `sender` dropped.
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "HTTP/1.1 connection to guestd ended with an error");
            }
        });
        sender.send_request(request).await.map_err(|e| self.transport(what, e))
    }

    fn transport(&self, what: &'static str, source: hyper::Error) -> ClientError {
        ClientError::Transport { what, addr: self.addr().clone(), source }
    }
}

/// Passes a 2xx response through; otherwise turns guestd's error body into [`ClientError::Http`].
async fn expect_success(what: &'static str, response: Response<Incoming>) -> Result<Response<Incoming>, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = read_limited(response.into_body()).await.unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    let message = if message.is_empty() { status.canonical_reason().unwrap_or("").to_owned() } else { message };
    Err(ClientError::Http { what, status: status.as_u16(), message })
}

/// Reads a small body (error messages, JSON status), at most [`MAX_ERROR_BODY`] bytes.
async fn read_limited(body: Incoming) -> Result<Bytes, hyper::Error> {
    let limited = http_body_util::Limited::new(body, MAX_ERROR_BODY);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) => match err.downcast::<hyper::Error>() {
            Ok(hyper_err) => Err(*hyper_err),
            // Over the limit: what arrived is enough to say something went wrong.
            Err(_) => Ok(Bytes::new()),
        },
    }
}

fn partial_path(local: &Path) -> PathBuf {
    let mut name = local.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".guestctl-partial-{}", std::process::id()));
    local.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_token() {
        let request = InitRequest { access_token: Some("s3cret-token".into()), ..InitRequest::default() };
        let options = super::super::ClientOptions { access_token: Some("s3cret-token".into()), ..Default::default() };
        for shown in [format!("{request:?}"), format!("{options:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }
}
