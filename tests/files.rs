//! `/files` end to end over real HTTP/1.1 on 127.0.0.1:0: uploads (octet-stream, multipart,
//! gzip, chunked, metadata), downloads (identity, gzip, ranges, conditionals), error bodies,
//! ownership, and the atomic-upload guarantees (truncated, aborted, out of space → old content
//! intact, no temporary file left).
//!
//! Each test starts the real server (`tests/common`), so requests pass the same layers as in
//! production (CORS, access-token gate, Connect pass-through). Tests whose name ends in
//! `_as_root` need root (chown to another user, tmpfs mounts) and say so when skipped.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

type Body = BoxBody<Bytes, Box<dyn StdError + Send + Sync>>;

/// A real guestd (`guestd::server::Server`, default user root) on an ephemeral port; keep the
/// returned handle alive for the test's duration.
async fn serve() -> (SocketAddr, common::TestServer) {
    let server = common::TestServer::start().await;
    (server.addr, server)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Asserts an envd JSON error with `status` and returns its message.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "body: {}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.header("content-type"), Some("application/json; charset=utf-8"));
        let body = self.json();
        assert_eq!(body["code"], json!(status.as_u16()));
        body["message"].as_str().expect("a string message").to_owned()
    }
}

async fn send(addr: SocketAddr, request: Request<Body>) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// A body sent with `Transfer-Encoding: chunked` (no Content-Length), one frame per piece.
fn chunked(pieces: Vec<Bytes>) -> Body {
    let frames = futures_util::stream::iter(
        pieces.into_iter().map(|p| Ok::<_, Box<dyn StdError + Send + Sync>>(Frame::data(p))),
    );
    StreamBody::new(frames).boxed()
}

fn query(pairs: &[(&str, &str)]) -> String {
    let encoded: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
    format!("/files?{}", encoded.join("&"))
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn post(uri: &str, headers: &[(&str, &str)], body: Body) -> Request<Body> {
    let mut builder = Request::post(uri).header(header::HOST, "guestd");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(body).unwrap()
}

fn get(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get(uri).header(header::HOST, "guestd");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(full(Bytes::new())).unwrap()
}

const OCTET: (&str, &str) = ("content-type", "application/octet-stream");

async fn upload_raw(addr: SocketAddr, path: &Path, data: impl Into<Bytes>, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![OCTET];
    all.extend_from_slice(headers);
    send(addr, post(&query(&[("path", path.to_str().unwrap())]), &all, full(data))).await
}

/// A multipart/form-data body: one `(field name, filename, data)` per part.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "guestd-test-boundary-7d3f";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").unwrap();
        if let Some(filename) = filename {
            write!(body, "; filename=\"{filename}\"").unwrap();
        }
        write!(body, "\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data), &mut out).unwrap();
    out
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn workdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    (dir, root)
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".guestd-upload-"))
        .collect()
}

/// Waits (bounded) until no temporary upload file is left in `dir`.
async fn assert_no_temp_files_soon(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !temp_files(dir).is_empty() {
        assert!(Instant::now() < deadline, "temporary files left behind: {:?}", temp_files(dir));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A real system user for ownership and relative-path tests, created once per test run:
/// `guestd-files-t` with home `/tmp/guestd-files-t-home`. Needs root (useradd).
fn test_user() -> &'static guestd::users::User {
    static USER: OnceLock<guestd::users::User> = OnceLock::new();
    USER.get_or_init(|| {
        const NAME: &str = "guestd-files-t";
        const HOME: &str = "/tmp/guestd-files-t-home";
        if guestd::users::lookup(NAME).is_err() {
            let status = std::process::Command::new("useradd")
                .args(["-M", "-d", HOME, "-s", "/bin/false", NAME])
                .status()
                .expect("run useradd");
            assert!(status.success() || guestd::users::lookup(NAME).is_ok(), "useradd {NAME} failed");
        }
        std::fs::create_dir_all(HOME).unwrap();
        guestd::users::lookup(NAME).unwrap()
    })
}

// ---- uploads ------------------------------------------------------------------------------

#[tokio::test]
async fn octet_stream_upload_then_identity_download() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("hello.txt");
    let reply = upload_raw(addr, &path, "hello, world\n", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.json(), json!([{"path": path.to_str().unwrap(), "name": "hello.txt", "type": "file"}]));
    assert_eq!(std::fs::read(&path).unwrap(), b"hello, world\n");

    let reply = send(addr, get(&query(&[("path", path.to_str().unwrap())]), &[])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"hello, world\n");
    assert_eq!(reply.header("content-length"), Some("13"));
    assert_eq!(reply.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(reply.header("content-disposition"), Some("inline; filename=hello.txt"));
    assert_eq!(reply.header("accept-ranges"), Some("bytes"));
    assert_eq!(reply.header("vary"), Some("Accept-Encoding"));
    assert!(reply.header("last-modified").is_some());
    assert_eq!(reply.header("content-encoding"), None);
}

/// A Linux file name is bytes: `%FE` names byte 0xFE both ways, not U+FFFD (a decoder into
/// `String` would write and read a file of another name). envd (Go) keeps the bytes too.
#[tokio::test]
async fn file_names_that_are_not_utf8_keep_their_bytes() {
    use std::os::unix::ffi::OsStrExt as _;
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let dir = root.to_str().unwrap();
    let named = |byte: u8| root.join(std::ffi::OsStr::from_bytes(&[b'n', byte, b'.', b'b', b'i', b'n']));
    let uri = format!("/files?path={dir}/n%FE.bin");
    let reply = send(addr, post(&uri, &[OCTET], full("uploaded"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(std::fs::read(named(0xfe)).unwrap(), b"uploaded", "written under its own bytes");
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1, "and under no other name");

    std::fs::write(named(0xff), "on disk").unwrap();
    let reply = send(addr, get(&format!("/files?path={dir}/n%ff.bin"), &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(&reply.body[..], b"on disk");

    // The longest legal name, all Latin-1 bytes: the upload's temporary beside it must fit in
    // NAME_MAX too (decoded lossily, each byte would have taken three).
    let long = [0xe9u8; 255];
    let uri = format!("/files?path={dir}/{}", "%E9".repeat(255));
    let reply = send(addr, post(&uri, &[OCTET], full("long"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(std::fs::read(root.join(std::ffi::OsStr::from_bytes(&long))).unwrap(), b"long");
}

#[tokio::test]
async fn octet_stream_requires_path_and_known_types() {
    let (addr, _server) = serve().await;
    let reply = send(addr, post("/files", &[OCTET], full("x"))).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST), "path query parameter is required for raw body upload");
    let reply = send(addr, post("/files?path=/tmp/x", &[("content-type", "text/plain")], full("x"))).await;
    assert!(reply.error(StatusCode::BAD_REQUEST).starts_with("unsupported content type: text/plain"));
    let reply = send(addr, post("/files?path=/tmp/x", &[], full("x"))).await;
    assert!(reply.error(StatusCode::BAD_REQUEST).starts_with("unsupported content type: "));
    let reply = send(addr, post("/files?path=/tmp/x", &[OCTET, ("content-encoding", "br")], full("x"))).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST), "unsupported Content-Encoding: br, supported: [gzip]");
}

#[tokio::test]
async fn multipart_single_file_with_path_override() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let target = root.join("override.bin");
    let (ct, body) = multipart(&[("file", Some("ignored-name.txt"), b"payload")]);
    let reply =
        send(addr, post(&query(&[("path", target.to_str().unwrap())]), &[("content-type", &ct)], full(body))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.json(), json!([{"path": target.to_str().unwrap(), "name": "override.bin", "type": "file"}]));
    assert_eq!(std::fs::read(&target).unwrap(), b"payload");
    assert!(!root.join("ignored-name.txt").exists());
}

#[tokio::test]
async fn multipart_several_files_keep_directories_and_skip_other_fields() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let a = root.join("a.txt");
    let b = root.join("nested/deeper/b.txt");
    let (ct, body) = multipart(&[
        ("file", Some(a.to_str().unwrap()), b"first"),
        ("comment", None, b"not a file"),
        ("file", Some(b.to_str().unwrap()), b"second"),
    ]);
    let reply = send(addr, post("/files", &[("content-type", &ct)], full(body))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        reply.json(),
        json!([
            {"path": a.to_str().unwrap(), "name": "a.txt", "type": "file"},
            {"path": b.to_str().unwrap(), "name": "b.txt", "type": "file"},
        ])
    );
    assert_eq!(std::fs::read(&a).unwrap(), b"first");
    assert_eq!(std::fs::read(&b).unwrap(), b"second");
}

#[tokio::test]
async fn multipart_without_file_parts_answers_empty_list() {
    let (addr, _server) = serve().await;
    let (ct, body) = multipart(&[("other", None, b"x")]);
    let reply = send(addr, post("/files", &[("content-type", &ct)], full(body))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!([]));
}

#[tokio::test]
async fn multipart_duplicate_target_is_refused_after_the_first() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let target = root.join("dup.txt");
    let (ct, body) = multipart(&[("file", Some("one"), b"first"), ("file", Some("two"), b"second")]);
    let reply =
        send(addr, post(&query(&[("path", target.to_str().unwrap())]), &[("content-type", &ct)], full(body))).await;
    let message = reply.error(StatusCode::BAD_REQUEST);
    assert!(message.contains("you cannot upload multiple files to the same path"), "{message}");
    assert_eq!(std::fs::read(&target).unwrap(), b"first", "the first part stays written");
    assert!(temp_files(&root).is_empty());
}

#[tokio::test]
async fn multipart_relative_filenames_resolve_against_the_users_home_as_root() {
    if !is_root() {
        eprintln!("skipping: needs root to create the test user");
        return;
    }
    let user = test_user();
    let (addr, _server) = serve().await;
    let unique = format!("rel-{:x}", fastrand::u64(..));
    let (ct, body) = multipart(&[("file", Some(&format!("{unique}/dir/x.txt")), b"rel")]);
    let reply = send(addr, post(&query(&[("username", &user.name)]), &[("content-type", &ct)], full(body))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let expected = user.home.join(&unique).join("dir/x.txt");
    assert_eq!(reply.json()[0]["path"], json!(expected.to_str().unwrap()));
    assert_eq!(std::fs::read(&expected).unwrap(), b"rel");
    std::fs::remove_dir_all(user.home.join(&unique)).unwrap();
}

#[tokio::test]
async fn malformed_multipart_is_refused_and_leaves_no_trace() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let target = root.join("victim.txt");
    std::fs::write(&target, b"old content").unwrap();
    let boundary = "b0undary";
    // A part whose data never reaches the closing boundary.
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\nnew content that never ends",
        target.display()
    );
    let ct = format!("multipart/form-data; boundary={boundary}");
    let reply = send(addr, post("/files", &[("content-type", &ct)], full(body))).await;
    reply.error(StatusCode::BAD_REQUEST);
    assert_eq!(std::fs::read(&target).unwrap(), b"old content");
    assert_no_temp_files_soon(&root).await;

    // No boundary parameter at all; a multipart subtype other than form-data.
    for ct in ["multipart/form-data", "multipart/mixed; boundary=x"] {
        let reply = send(addr, post("/files", &[("content-type", ct)], full("--x--\r\n"))).await;
        assert!(reply.error(StatusCode::BAD_REQUEST).starts_with("error parsing multipart form"), "{ct}");
    }
    // A file part without a filename and no path override.
    let (ct, body) = multipart(&[("file", None, b"x")]);
    let reply = send(addr, post("/files", &[("content-type", &ct)], full(body))).await;
    assert!(reply.error(StatusCode::BAD_REQUEST).contains("filename not found"));
}

/// multer holds the bytes before a boundary and a part's headers whole; guestd stops feeding
/// it after 64 KiB of them (envd skips any preamble and allows 10 MB of part headers). A gzip
/// body inflating to 40 MB of zeros cost 32 s of CPU and 42 MB before this limit.
#[tokio::test]
async fn multipart_preamble_and_part_headers_are_bounded_but_part_data_is_not() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let target = root.join("target.txt");
    let ct = "multipart/form-data; boundary=b0undary";
    let headers = format!(
        "--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\nX-Long: ",
        target.display()
    );
    for (case, prefix) in [("no boundary", String::new()), ("endless part headers", headers)] {
        let mut body = prefix.into_bytes();
        body.resize(40 << 20, 0);
        let reply =
            send(addr, post("/files", &[("content-type", ct), ("content-encoding", "gzip")], full(gzip(&body)))).await;
        let message = reply.error(StatusCode::BAD_REQUEST);
        assert!(message.contains("more than 64 KiB of multipart preamble or part headers"), "{case}: {message}");
    }
    assert!(!target.exists());
    assert_no_temp_files_soon(&root).await;

    // A large field that is not a file is read past, however long, and the file after it lands.
    let (ct, body) =
        multipart(&[("comment", None, &pattern(1 << 20)), ("file", Some(target.to_str().unwrap()), b"after")]);
    let reply = send(
        addr,
        post("/files", &[("content-type", &ct)], chunked(body.chunks(1000).map(Bytes::copy_from_slice).collect())),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(std::fs::read(&target).unwrap(), b"after");
}

#[tokio::test]
async fn gzip_encoded_uploads_octet_stream_and_multipart() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let data = pattern(3 << 20);
    let path = root.join("big.bin");
    let gz = gzip(&data);
    let reply = upload_raw(addr, &path, gz, &[("content-encoding", "gzip")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(std::fs::read(&path).unwrap(), data);

    let other = root.join("from-multipart.txt");
    let (ct, body) = multipart(&[("file", Some(other.to_str().unwrap()), b"zipped form")]);
    let reply =
        send(addr, post("/files", &[("content-type", &ct), ("content-encoding", "GZIP")], full(gzip(&body)))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(std::fs::read(&other).unwrap(), b"zipped form");
}

#[tokio::test]
async fn truncated_gzip_keeps_the_old_file_and_leaves_no_temp() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("keep.bin");
    std::fs::write(&path, b"old content").unwrap();
    let mut gz = gzip(&pattern(1 << 20));
    gz.truncate(gz.len() - 64);
    let reply = upload_raw(addr, &path, gz, &[("content-encoding", "gzip")]).await;
    let message = reply.error(StatusCode::BAD_REQUEST);
    assert!(message.starts_with("error reading request body"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), b"old content");
    assert_no_temp_files_soon(&root).await;

    let reply = upload_raw(addr, &path, "definitely not gzip", &[("content-encoding", "gzip")]).await;
    reply.error(StatusCode::BAD_REQUEST);
    assert_eq!(std::fs::read(&path).unwrap(), b"old content");
    assert_no_temp_files_soon(&root).await;
}

#[tokio::test]
async fn chunked_upload_without_content_length() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("chunked.bin");
    let data = pattern(5 << 20);
    let pieces: Vec<Bytes> = data.chunks(100_003).map(Bytes::copy_from_slice).collect();
    let uri = query(&[("path", path.to_str().unwrap())]);
    let reply = send(addr, post(&uri, &[OCTET], chunked(pieces))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(std::fs::read(&path).unwrap(), data);

    // Chunked and gzip-encoded together (the SDK's streamed `gzip=True` upload).
    let gz = gzip(&data);
    let pieces: Vec<Bytes> = gz.chunks(7_001).map(Bytes::copy_from_slice).collect();
    let path2 = root.join("chunked-gz.bin");
    let uri = query(&[("path", path2.to_str().unwrap())]);
    let reply = send(addr, post(&uri, &[OCTET, ("content-encoding", "gzip")], chunked(pieces))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(std::fs::read(&path2).unwrap(), data);
}

#[tokio::test]
async fn metadata_roundtrip_and_validation() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("meta.txt");
    let reply = upload_raw(addr, &path, "m", &[("X-Metadata-Owner", "alice"), ("x-metadata-Stage", "draft")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let on_disk = guestd::fs::metadata::read(&path);
    if on_disk.is_empty() {
        eprintln!("skipping the metadata assertions: {} has no user xattrs", root.display());
        return;
    }
    assert_eq!(reply.json()[0]["metadata"], json!({"owner": "alice", "stage": "draft"}));
    assert_eq!(on_disk.get("owner").map(String::as_str), Some("alice"));
    assert_eq!(guestd::fs::stat(&path).unwrap().metadata.len(), 2);

    // Overwriting without metadata clears it (envd rewrites the set on every upload).
    let reply = upload_raw(addr, &path, "m2", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.json()[0].get("metadata").is_none());
    assert!(guestd::fs::metadata::read(&path).is_empty());

    // Invalid metadata is refused before anything is written.
    let long_value = "v".repeat(5000);
    let reply = upload_raw(addr, &path, "nope", &[("x-metadata-big", &long_value)]).await;
    assert!(reply.error(StatusCode::BAD_REQUEST).starts_with("invalid metadata"));
    assert_eq!(std::fs::read(&path).unwrap(), b"m2");
}

#[tokio::test]
async fn upload_onto_a_directory_is_refused() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let reply = upload_raw(addr, &root, "x", &[]).await;
    let message = reply.error(StatusCode::BAD_REQUEST);
    assert_eq!(message, format!("path is a directory: {}", root.display()));

    // A file where a parent directory has to be.
    std::fs::write(root.join("plain"), b"").unwrap();
    let reply = upload_raw(addr, &root.join("plain/child.txt"), "x", &[]).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST), format!("path is a file: {}", root.join("plain").display()));

    // A path ending in '/' names a directory, existing or not, whatever is there (envd cleans
    // the slash away and writes a file named like the directory, or fails with a 500).
    for name in ["new/", "plain/"] {
        let raw = format!("{}/{name}", root.display());
        let reply = upload_raw(addr, Path::new(&raw), "x", &[]).await;
        let message = reply.error(StatusCode::BAD_REQUEST);
        assert_eq!(message, format!("cannot upload to '{raw}': the path ends with '/', name the file to write"));
        let (ct, body) = multipart(&[("file", Some(&raw), b"x")]);
        let reply = send(addr, post("/files", &[("content-type", &ct)], full(body))).await;
        assert!(reply.error(StatusCode::BAD_REQUEST).contains("the path ends with '/'"));
    }
    assert!(!root.join("new").exists());
    assert_eq!(std::fs::read(root.join("plain")).unwrap(), b"");
}

#[tokio::test]
async fn unknown_user_is_401_both_ways() {
    let (addr, _server) = serve().await;
    let reply = send(addr, get(&query(&[("path", "/etc/hostname"), ("username", "no-such-guestd-user")]), &[])).await;
    assert_eq!(reply.error(StatusCode::UNAUTHORIZED), "error looking up user: unknown user 'no-such-guestd-user'");
    let uri = query(&[("path", "/tmp/x"), ("username", "no-such-guestd-user")]);
    let reply = send(addr, post(&uri, &[OCTET], full("x"))).await;
    reply.error(StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn new_files_parents_and_overwritten_files_belong_to_the_user_as_root() {
    if !is_root() {
        eprintln!("skipping: needs root to chown files to another user");
        return;
    }
    let user = test_user();
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("p1/p2/new.txt");
    let uri = query(&[("path", path.to_str().unwrap()), ("username", &user.name)]);
    let reply = send(addr, post(&uri, &[OCTET], full("new"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    for created in [root.join("p1"), root.join("p1/p2"), path.clone()] {
        let meta = std::fs::metadata(&created).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (user.uid, user.gid), "{}", created.display());
    }
    let dir_mode = std::fs::metadata(root.join("p1")).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode & !0o022, 0o755 & !0o022);
    assert_eq!(std::fs::metadata(&root).unwrap().uid(), 0, "existing parents keep their owner");

    // A root-owned executable overwritten by the user: handed to the user, mode kept.
    let existing = root.join("tool.sh");
    std::fs::write(&existing, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o750)).unwrap();
    let uri = query(&[("path", existing.to_str().unwrap()), ("username", &user.name)]);
    let reply = send(addr, post(&uri, &[OCTET], full("#!/bin/sh\necho hi\n"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let meta = std::fs::metadata(&existing).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (user.uid, user.gid));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
}

#[tokio::test]
async fn aborted_uploads_keep_the_old_file_and_leave_no_temp() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("precious.txt");
    std::fs::write(&path, b"old content").unwrap();
    let uri = query(&[("path", path.to_str().unwrap())]);

    for framing in ["content-length", "chunked"] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = match framing {
            "content-length" => format!(
                "POST {uri} HTTP/1.1\r\nHost: guestd\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000000\r\n\r\n"
            ),
            _ => format!(
                "POST {uri} HTTP/1.1\r\nHost: guestd\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
        };
        stream.write_all(head.as_bytes()).await.unwrap();
        let piece = vec![b'x'; 256 * 1024];
        let deadline = Instant::now() + Duration::from_secs(10);
        // Send until the server has started writing (a temp file exists), then vanish.
        while temp_files(&root).is_empty() {
            assert!(Instant::now() < deadline, "{framing}: the upload never started");
            if framing == "chunked" {
                stream.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await.unwrap();
                stream.write_all(&piece).await.unwrap();
                stream.write_all(b"\r\n").await.unwrap();
            } else {
                stream.write_all(&piece).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stream.write_all(&piece[..1000]).await.unwrap();
        drop(stream);
        assert_no_temp_files_soon(&root).await;
        assert_eq!(std::fs::read(&path).unwrap(), b"old content", "{framing}");
    }
}

/// A tmpfs of `size` mounted on a fresh directory for the test's lifetime.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("mount -t tmpfs failed ({status})"));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn out_of_space_is_507_and_keeps_the_old_file_as_root() {
    if !is_root() {
        eprintln!("skipping: needs root to mount a small tmpfs");
        return;
    }
    let tmpfs = match Tmpfs::mount("1m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            eprintln!("skipping: this machine cannot mount tmpfs here: {reason}");
            return;
        }
    };
    let (addr, _server) = serve().await;
    let path = tmpfs.path().join("data.bin");
    std::fs::write(&path, b"old content").unwrap();
    let reply = upload_raw(addr, &path, pattern(3 << 20), &[]).await;
    let message = reply.error(StatusCode::INSUFFICIENT_STORAGE);
    assert!(message.contains("not enough disk space"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), b"old content");
    assert_no_temp_files_soon(tmpfs.path()).await;

    // The same through a chunked multipart body.
    let (ct, body) = multipart(&[("file", Some(path.to_str().unwrap()), &pattern(3 << 20))]);
    let pieces: Vec<Bytes> = body.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
    let reply = send(addr, post("/files", &[("content-type", &ct)], chunked(pieces))).await;
    reply.error(StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(std::fs::read(&path).unwrap(), b"old content");
    assert_no_temp_files_soon(tmpfs.path()).await;

    // Once there is room, the same upload goes through.
    let reply = upload_raw(addr, &path, pattern(100_000), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
}

// ---- downloads ----------------------------------------------------------------------------

#[tokio::test]
async fn gzip_download_when_accepted() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("data.json");
    let data = pattern(2 << 20);
    std::fs::write(&path, &data).unwrap();
    let uri = query(&[("path", path.to_str().unwrap())]);
    let reply = send(addr, get(&uri, &[("accept-encoding", "gzip, deflate")])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("content-length"), None);
    assert_eq!(reply.header("vary"), Some("Accept-Encoding"));
    assert_eq!(gunzip(&reply.body), data);

    let reply = send(addr, get(&uri, &[("accept-encoding", "br, identity;q=0")])).await;
    assert_eq!(reply.error(StatusCode::NOT_ACCEPTABLE), "no acceptable encoding found, supported: [gzip]");

    // Already-compressed content goes out as identity even when gzip is welcome...
    let archive = root.join("archive.tar.gz");
    let packed = gzip(&data);
    std::fs::write(&archive, &packed).unwrap();
    let uri = query(&[("path", archive.to_str().unwrap())]);
    let reply = send(addr, get(&uri, &[("accept-encoding", "gzip, deflate")])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-encoding"), None);
    assert_eq!(reply.body, packed);
    // ...but still gzip-encoded when identity is ruled out.
    let reply = send(addr, get(&uri, &[("accept-encoding", "gzip, identity;q=0")])).await;
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    assert_eq!(gunzip(&reply.body), packed);
}

#[tokio::test]
async fn range_requests() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("digits.txt");
    std::fs::write(&path, b"0123456789").unwrap();
    let uri = query(&[("path", path.to_str().unwrap())]);

    // A Range forces identity even when gzip is acceptable.
    let reply = send(addr, get(&uri, &[("range", "bytes=2-5"), ("accept-encoding", "gzip")])).await;
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&reply.body[..], b"2345");
    assert_eq!(reply.header("content-range"), Some("bytes 2-5/10"));
    assert_eq!(reply.header("content-length"), Some("4"));
    assert_eq!(reply.header("content-encoding"), None);

    let reply = send(addr, get(&uri, &[("range", "bytes=-3")])).await;
    assert_eq!(&reply.body[..], b"789");

    let reply = send(addr, get(&uri, &[("range", "bytes=0-1,8-")])).await;
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
    let ct = reply.header("content-type").unwrap().to_owned();
    let boundary = ct.strip_prefix("multipart/byteranges; boundary=").expect("multipart ranges");
    let body = String::from_utf8(reply.body.to_vec()).unwrap();
    assert_eq!(reply.header("content-length").unwrap().parse::<usize>().unwrap(), body.len());
    let expected = format!(
        "--{boundary}\r\nContent-Range: bytes 0-1/10\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n01\
         \r\n--{boundary}\r\nContent-Range: bytes 8-9/10\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n89\
         \r\n--{boundary}--\r\n"
    );
    assert_eq!(body, expected);

    let reply = send(addr, get(&uri, &[("range", "bytes=20-")])).await;
    reply.error(StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(reply.header("content-range"), Some("bytes */10"));
}

#[tokio::test]
async fn conditional_requests() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("cond.txt");
    std::fs::write(&path, b"cached").unwrap();
    let uri = query(&[("path", path.to_str().unwrap())]);
    let first = send(addr, get(&uri, &[])).await;
    let last_modified = first.header("last-modified").unwrap().to_owned();

    let reply = send(addr, get(&uri, &[("if-modified-since", &last_modified), ("accept-encoding", "gzip")])).await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("content-encoding"), None);

    let reply = send(addr, get(&uri, &[("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT")])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"cached");

    let reply = send(addr, get(&uri, &[("if-unmodified-since", "Mon, 01 Jan 2001 00:00:00 GMT")])).await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);

    let reply = send(addr, get(&uri, &[("range", "bytes=0-1"), ("if-range", "Mon, 01 Jan 2001 00:00:00 GMT")])).await;
    assert_eq!(reply.status, StatusCode::OK, "a stale If-Range serves the whole file");
    assert_eq!(&reply.body[..], b"cached");
}

/// envd answers HEAD with 405 (chi registers GET only); guestd answers it as HTTP says, with
/// the GET's headers and no body, so a client can learn a file's size and type without
/// transferring it.
#[tokio::test]
async fn head_answers_a_downloads_headers_without_its_body() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("head.txt");
    std::fs::write(&path, b"twelve bytes").unwrap();
    let head = |uri: String| Request::head(uri).header(header::HOST, "guestd").body(full(Bytes::new())).unwrap();
    let reply = send(addr, head(query(&[("path", path.to_str().unwrap())]))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-length"), Some("12"));
    assert_eq!(reply.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(reply.header("last-modified").is_some());
    assert!(reply.body.is_empty());
    let reply = send(addr, head(query(&[("path", root.join("missing").to_str().unwrap())]))).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.body.is_empty());
}

#[tokio::test]
async fn download_errors_are_json() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let missing = root.join("missing.txt");
    let reply = send(addr, get(&query(&[("path", missing.to_str().unwrap())]), &[])).await;
    assert_eq!(reply.error(StatusCode::NOT_FOUND), format!("file not found: {}", missing.display()));
    let reply = send(addr, get(&query(&[("path", root.to_str().unwrap())]), &[])).await;
    assert_eq!(reply.error(StatusCode::BAD_REQUEST), format!("path is a directory: {}", root.display()));
    let reply = send(addr, get(&query(&[("path", "~nobody/x")]), &[])).await;
    reply.error(StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn content_disposition_and_sniffing() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("日本 report");
    std::fs::write(&path, b"\x7fELF\x02\x01\x01\x00binary").unwrap();
    let reply = send(addr, get(&query(&[("path", path.to_str().unwrap())]), &[])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-disposition"), Some("inline; filename*=utf-8''%E6%97%A5%E6%9C%AC%20report"));
    assert_eq!(reply.header("content-type"), Some("application/octet-stream"), "sniffed: no extension");
}

#[tokio::test]
async fn procfs_files_stream_to_end_of_file() {
    let (addr, _server) = serve().await;
    let reply = send(addr, get(&query(&[("path", "/proc/self/status")]), &[])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&reply.body).contains("Pid:"));
    let reply = send(addr, get(&query(&[("path", "/proc/self/status")]), &[("accept-encoding", "gzip")])).await;
    assert!(String::from_utf8_lossy(&gunzip(&reply.body)).contains("Pid:"));
}

#[tokio::test]
async fn large_round_trip_streams_both_ways() {
    use sha2::{Digest, Sha256};
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("large.bin");
    let data = pattern(64 << 20);
    let pieces: Vec<Bytes> = data.chunks(1 << 20).map(Bytes::copy_from_slice).collect();
    let reply = send(addr, post(&query(&[("path", path.to_str().unwrap())]), &[OCTET], chunked(pieces))).await;
    assert_eq!(reply.status, StatusCode::OK);

    // Download with a raw socket, hashing as bytes arrive (the client holds nothing either).
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: guestd\r\nConnection: close\r\n\r\n",
        query(&[("path", path.to_str().unwrap())])
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("content-length: {}", data.len())), "{head}");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    assert_eq!(total, data.len());
    assert_eq!(hasher.finalize()[..], Sha256::digest(&data)[..]);
}

/// A file dated before 1970 (`touch -d 1969-07-20`) downloads without a `Last-Modified`:
/// formatting the date used to panic, which aborts guestd. (After 9999: `last_modified`'s unit
/// test; most disk filesystems cannot store such dates.)
#[tokio::test]
async fn a_file_dated_before_1970_downloads_without_last_modified() {
    let (addr, _server) = serve().await;
    let (_dir, root) = workdir();
    let path = root.join("old.txt");
    std::fs::write(&path, b"dated").unwrap();
    let old = std::time::UNIX_EPOCH - Duration::from_secs(86_400);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
    let reply = send(addr, get(&query(&[("path", path.to_str().unwrap())]), &[])).await;
    assert_eq!((reply.status, &reply.body[..]), (StatusCode::OK, &b"dated"[..]));
    assert_eq!(reply.header("last-modified"), None);
}
