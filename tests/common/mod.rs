//! Shared helpers for the in-process integration tests: a real guestd server on 127.0.0.1:0,
//! a gRPC client, and a minimal Connect client over raw HTTP/1.1.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use guestd::config::Config;
use guestd::proto::process::process_client::ProcessClient;
use guestd::proto::process::*;
use guestd::server::Server;
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A guestd serving on an ephemeral loopback port for the duration of one test.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::with_config(Config::loopback("root")).await
    }

    pub async fn with_config(config: Config) -> TestServer {
        let server = Server::bind(&config).await.expect("bind 127.0.0.1:0");
        let addr = server.tcp_addr().expect("a TCP listener");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        TestServer { addr, stop: Some(stop), task: Some(task) }
    }

    pub async fn grpc(&self) -> ProcessClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to guestd");
        ProcessClient::new(channel)
    }

    /// Stops the server and waits for it (processes are terminated within the grace period).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// Everything a process stream delivered.
#[derive(Debug, Default)]
pub struct Outcome {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub keepalives: usize,
    pub end: Option<process_event::EndEvent>,
    pub error: Option<tonic::Status>,
    /// Events after `end`, or a second `start`: must stay zero.
    pub out_of_order: usize,
}

impl Outcome {
    pub fn add(&mut self, event: ProcessEvent) {
        use process_event::Event;
        use process_event::data_event::Output;
        if self.end.is_some() {
            self.out_of_order += 1;
        }
        match event.event {
            Some(Event::Start(s)) => {
                if self.pid.replace(s.pid).is_some() {
                    self.out_of_order += 1;
                }
            }
            Some(Event::Data(d)) => match d.output {
                Some(Output::Stdout(b)) => self.stdout.extend_from_slice(&b),
                Some(Output::Stderr(b)) => self.stderr.extend_from_slice(&b),
                Some(Output::Pty(b)) => self.pty.extend_from_slice(&b),
                None => self.out_of_order += 1,
            },
            Some(Event::End(e)) => self.end = Some(e),
            Some(Event::Keepalive(_)) => self.keepalives += 1,
            None => self.out_of_order += 1,
        }
    }

    pub fn exit_code(&self) -> i32 {
        self.end.as_ref().expect("an end event").exit_code
    }

    pub fn status(&self) -> &str {
        &self.end.as_ref().expect("an end event").status
    }
}

pub fn start_request(cmd: &str, args: &[&str]) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> StartRequest {
    start_request("/bin/sh", &["-c", script])
}

pub fn pid(pid: u32) -> Option<ProcessSelector> {
    Some(ProcessSelector { selector: Some(process_selector::Selector::Pid(pid)) })
}

pub fn tag(tag: &str) -> Option<ProcessSelector> {
    Some(ProcessSelector { selector: Some(process_selector::Selector::Tag(tag.into())) })
}

/// Runs a Start stream to its end over gRPC.
pub async fn run(client: &mut ProcessClient<Channel>, req: StartRequest) -> Outcome {
    try_run(client, req).await.expect("Start accepted")
}

/// [`run`], or the status that refused the Start.
pub async fn try_run(client: &mut ProcessClient<Channel>, req: StartRequest) -> Result<Outcome, tonic::Status> {
    let mut stream = client.start(req).await?.into_inner();
    let mut outcome = Outcome::default();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => outcome.add(msg.event.expect("event set")),
            Ok(None) => break,
            Err(status) => {
                outcome.error = Some(status);
                break;
            }
        }
    }
    Ok(outcome)
}

/// True while a process with this pid exists (zombies included).
pub fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits up to `limit` for `cond`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Waits up to `limit` for an async `cond`.
pub async fn eventually_async<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

// ---- a minimal Connect client (HTTP/1.1, one request per connection) -----------------------

/// A raw HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// Splits a Connect streaming body into (flags, payload) envelopes.
    pub fn envelopes(&self) -> Vec<(u8, Bytes)> {
        let mut body = self.body.clone();
        let mut out = Vec::new();
        while body.has_remaining() {
            assert!(body.len() >= 5, "truncated envelope header: {body:?}");
            let flags = body.get_u8();
            let len = body.get_u32() as usize;
            assert!(body.len() >= len, "truncated envelope payload");
            out.push((flags, body.split_to(len)));
        }
        out
    }

    /// The JSON messages of a Connect+JSON stream and its parsed end-stream message.
    pub fn json_stream(&self) -> (Vec<serde_json::Value>, serde_json::Value) {
        let mut messages = Vec::new();
        let mut end = None;
        for (flags, payload) in self.envelopes() {
            let value: serde_json::Value = serde_json::from_slice(&payload).expect("JSON envelope");
            if flags & 0x02 != 0 {
                assert!(end.replace(value).is_none(), "two end-stream envelopes");
            } else {
                assert!(end.is_none(), "message after end-stream");
                messages.push(value);
            }
        }
        (messages, end.expect("an end-stream envelope"))
    }
}

/// Sends one HTTP/1.1 request and reads the whole response.
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Bytes) -> HttpResponse {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender.send_request(req.body(Full::new(body)).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    HttpResponse { status, headers, body }
}

/// POST with a JSON body (plain HTTP routes such as `/init`).
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    json: serde_json::Value,
) -> HttpResponse {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    http(addr, "POST", path, &all, Bytes::from(json.to_string())).await
}

/// GET with extra headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http(addr, "GET", path, headers, Bytes::new()).await
}

/// A Connect unary call with the JSON codec.
pub async fn connect_unary(addr: SocketAddr, path: &str, json: serde_json::Value) -> HttpResponse {
    http(addr, "POST", path, &[("content-type", "application/json")], Bytes::from(json.to_string())).await
}

/// A Connect streaming call with the JSON codec; `messages` are sent as request envelopes.
pub async fn connect_stream(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    messages: &[serde_json::Value],
) -> HttpResponse {
    let mut body = BytesMut::new();
    for m in messages {
        body.put_slice(&envelope(0, m.to_string().as_bytes()));
    }
    let mut all = vec![("content-type", "application/connect+json")];
    all.extend_from_slice(headers);
    http(addr, "POST", path, &all, body.freeze()).await
}

pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &std::path::Path) -> String {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).unwrap();
    format!("{:x}", hasher.finalize())
}

/// Decodes a base64 JSON bytes field.
pub fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

/// Holds every exec of one file until released: what a binary on a stuck FUSE or NFS mount does
/// to `execve` (and to the vfork parent waiting for it), here with a fanotify permission event.
pub struct HeldExec {
    pub path: std::path::PathBuf,
    pub held: std::sync::mpsc::Receiver<()>,
    pub release: std::sync::mpsc::Sender<()>,
    _dir: tempfile::TempDir,
}

impl HeldExec {
    /// Err (saying why) where fanotify permission events are not available (not root, no
    /// kernel support). The file lives under /var/tmp: guestd as PID 1 mounts a tmpfs on /tmp.
    pub fn new() -> Result<HeldExec, String> {
        use nix::sys::fanotify::*;
        let fan = Fanotify::init(InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC, EventFFlags::O_RDONLY)
            .map_err(|e| format!("fanotify_init: {e}"))?;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let path = dir.path().join("held-true");
        std::fs::copy("/bin/true", &path).unwrap();
        fan.mark(MarkFlags::FAN_MARK_ADD, MaskFlags::FAN_OPEN_EXEC_PERM, nix::fcntl::AT_FDCWD, Some(&path))
            .map_err(|e| format!("fanotify_mark(FAN_OPEN_EXEC_PERM): {e}"))?;
        let (held_tx, held) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            // Every exec is answered once released (or once the test is gone). Closing the
            // descriptor would not do: a child waiting in execve still holds a copy of it (its
            // close-on-exec has not happened yet), so the kernel never sees it closed.
            let mut released = false;
            while let Ok(events) = fan.read_events() {
                if !released {
                    let _ = held_tx.send(());
                    let _ = release_rx.recv();
                    released = true;
                }
                for event in &events {
                    if let Some(fd) = event.fd() {
                        let _ = fan.write_response(FanotifyResponse::new(fd, Response::FAN_ALLOW));
                    }
                }
            }
        });
        Ok(HeldExec { path, held, release, _dir: dir })
    }
}
