//! The host-side client (`guestd::client`) and `guestctl` against a real in-process guestd.
//!
//! The hybrid-vsock path goes through [`Muxer`], a local stand-in for Firecracker's /
//! vhost-device-vsock's Unix socket: it reads `CONNECT <port>\n` the way vhost-device-vsock
//! does (a buffered read, so bytes pipelined after the line would be lost — the muxer counts
//! them), answers `OK <port>\n` and then proxies to guestd on TCP. It can also play a guest that
//! is not listening yet (close after `CONNECT`) or a muxer that rejects the handshake. The real
//! guest path is the micro-VM tier (`scripts/test-microvm.sh`).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, sha256_file};
use guestd::client::{
    Client, ClientError, ClientOptions, Command, ConnectError, ConnectOptions, Connector, EventType, GuestAddr,
    InitRequest, Progress, RunEvent, Selector, Signal,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The guest port every muxer here expects in `CONNECT`.
const PORT: u32 = 49983;

/// What the fake muxer does with a connection after reading its `CONNECT` line.
#[derive(Debug, Clone)]
enum Mode {
    /// Close the first `not_listening` connections right after `CONNECT` (a booting guest), then
    /// answer `OK` and proxy to guestd.
    Proxy { upstream: SocketAddr, not_listening: usize },
    /// Always close after `CONNECT`: the guest never listens.
    NeverListen,
    /// Answer this line instead of `OK`.
    Reject(&'static str),
    /// Answer `OK` and a greeting in one write, then echo.
    Greeting,
}

#[derive(Debug, Default)]
struct MuxStats {
    connections: AtomicUsize,
    /// Bytes that arrived after the `CONNECT` line before `OK` was sent (lost by a real muxer).
    pipelined: AtomicUsize,
}

/// A fake hybrid-vsock muxer on a Unix socket.
struct Muxer {
    path: PathBuf,
    stats: Arc<MuxStats>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Muxer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Muxer {
    fn start(mode: Mode) -> Muxer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stats = Arc::new(MuxStats::default());
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else { return };
                let index = shared.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_one(conn, mode.clone(), index, shared.clone()));
            }
        });
        Muxer { path, stats, _dir: dir, task }
    }

    fn addr(&self) -> GuestAddr {
        GuestAddr::HybridVsock { path: self.path.clone(), port: PORT }
    }

    fn url(&self) -> String {
        self.addr().to_string()
    }

    fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    fn pipelined(&self) -> usize {
        self.stats.pipelined.load(Ordering::SeqCst)
    }
}

async fn serve_one(mut conn: UnixStream, mode: Mode, index: usize, stats: Arc<MuxStats>) {
    // Like vhost-device-vsock's BufReader: one read may take more than the line.
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    let line_end = loop {
        let Ok(n) = conn.read(&mut buf[got..]).await else { return };
        if n == 0 {
            return;
        }
        got += n;
        if let Some(i) = buf[..got].iter().position(|&b| b == b'\n') {
            break i;
        }
    };
    let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
    let mut early = got - line_end - 1;
    // Give a pipelining client time to show itself before answering.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut probe = [0u8; 4096];
    while let Ok(n) = conn.try_read(&mut probe) {
        if n == 0 {
            break;
        }
        early += n;
    }
    stats.pipelined.fetch_add(early, Ordering::SeqCst);
    if line != format!("CONNECT {PORT}") {
        return;
    }
    match mode {
        Mode::Proxy { upstream, not_listening } => {
            if index < not_listening {
                return;
            }
            let Ok(mut guest) = tokio::net::TcpStream::connect(upstream).await else { return };
            if conn.write_all(format!("OK {PORT}\n").as_bytes()).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
        }
        Mode::NeverListen => {}
        Mode::Reject(reply) => {
            let _ = conn.write_all(reply.as_bytes()).await;
        }
        Mode::Greeting => {
            if conn.write_all(b"OK 1073741824\nHELLO").await.is_err() {
                return;
            }
            let mut echo = [0u8; 1024];
            while let Ok(n) = conn.read(&mut echo).await {
                if n == 0 || conn.write_all(&echo[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
}

fn options(deadline: Duration) -> ClientOptions {
    ClientOptions { connect: ConnectOptions { deadline, ..ConnectOptions::default() }, ..ClientOptions::default() }
}

async fn hybrid_client(server: &TestServer) -> (Muxer, Client) {
    let muxer = Muxer::start(Mode::Proxy { upstream: server.addr, not_listening: 0 });
    let client = Client::connect(muxer.addr(), options(Duration::from_secs(5))).await.expect("connect via the muxer");
    (muxer, client)
}

// ---- connectors ----------------------------------------------------------------------------

#[tokio::test]
async fn hybrid_vsock_runs_a_command_with_its_output_and_exit_code() {
    let server = TestServer::start().await;
    let (muxer, client) = hybrid_client(&server).await;
    let out = client.output(&Command::shell("echo out; echo err >&2; exit 3")).await.unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, 3);
    assert!(out.status.exited);
    assert_eq!(muxer.pipelined(), 0, "bytes sent with the CONNECT line are lost by real muxers");
    server.stop().await;
}

#[tokio::test]
async fn hybrid_vsock_retries_while_the_guest_is_not_listening() {
    let server = TestServer::start().await;
    let muxer = Muxer::start(Mode::Proxy { upstream: server.addr, not_listening: 4 });
    let client = Client::connect(muxer.addr(), options(Duration::from_secs(5))).await.expect("connects once listening");
    assert!(muxer.connections() >= 5, "four refused attempts, then one that worked: {}", muxer.connections());
    let out = client.output(&Command::new("true")).await.unwrap();
    assert!(out.status.success());
    assert_eq!(muxer.pipelined(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_guest_that_never_listens_is_reported_at_the_deadline() {
    let muxer = Muxer::start(Mode::NeverListen);
    let deadline = Duration::from_millis(400);
    let start = Instant::now();
    let err = Client::connect(muxer.addr(), options(deadline)).await.unwrap_err();
    let elapsed = start.elapsed();
    assert!(
        matches!(&err, ClientError::Connect(ConnectError::NeverAnswered { deadline: d, .. }) if *d == deadline),
        "{err:?}"
    );
    assert!(elapsed >= deadline - Duration::from_millis(150) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(muxer.connections() >= 3, "it retried: {}", muxer.connections());
    let message = guestd::error_chain(&err);
    assert!(message.contains("never answered within 400 ms"), "{message}");
    assert!(message.contains(&muxer.url()), "{message}");
}

#[tokio::test]
async fn a_rejected_handshake_fails_at_once() {
    let muxer = Muxer::start(Mode::Reject("ERR no such port\n"));
    let err = Client::connect(muxer.addr(), options(Duration::from_secs(5))).await.unwrap_err();
    match &err {
        ClientError::Connect(ConnectError::HandshakeRejected { reply, .. }) => assert_eq!(reply, "ERR no such port"),
        other => panic!("{other:?}"),
    }
    assert_eq!(muxer.connections(), 1, "a rejection is not retried");
}

#[tokio::test]
async fn the_handshake_consumes_not_one_byte_past_the_ok_line() {
    let muxer = Muxer::start(Mode::Greeting);
    let connector = Connector::new(muxer.addr(), ConnectOptions::default());
    let mut stream = connector.dial().await.unwrap();
    let mut greeting = [0u8; 5];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"HELLO", "Firecracker's `OK <host port>` reply is accepted and nothing after it is lost");
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
}

#[tokio::test]
async fn a_missing_socket_is_unreachable_at_once() {
    let addr: GuestAddr = "unix:///nonexistent/guestd-test/v.sock:49983".parse().unwrap();
    let start = Instant::now();
    let err = Client::connect(addr, options(Duration::from_secs(5))).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(ConnectError::Unreachable { .. })), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(1), "not retried");
    let message = guestd::error_chain(&err);
    assert!(message.starts_with("cannot reach unix:///nonexistent/guestd-test/v.sock:49983"), "{message}");
}

#[tokio::test]
async fn a_refused_tcp_connection_is_retried_then_reported() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let addr = GuestAddr::Tcp { host: "127.0.0.1".into(), port };
    let start = Instant::now();
    let err = Client::connect(addr, options(Duration::from_millis(300))).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(ConnectError::Refused { .. })), "{err:?}");
    assert!(start.elapsed() >= Duration::from_millis(150), "retried for most of the deadline");
    assert!(guestd::error_chain(&err).contains("refused"));
}

#[tokio::test]
async fn tcp_connections_set_nodelay_and_serve_rpcs() {
    let server = TestServer::start().await;
    let addr: GuestAddr = format!("tcp://{}", server.addr).parse().unwrap();
    let stream = Connector::new(addr.clone(), ConnectOptions::default()).dial().await.unwrap();
    assert!(stream.as_tcp().expect("a TCP stream").nodelay().unwrap());
    let client = Client::connect(addr, ClientOptions::default()).await.unwrap();
    client.health().await.unwrap();
    let out = client.output(&Command::new("echo").arg("over tcp")).await.unwrap();
    assert_eq!(out.stdout, b"over tcp\n");
    server.stop().await;
}

// ---- typed calls over the hybrid socket ----------------------------------------------------

/// Counts what a transfer reports.
#[derive(Default)]
struct Counted {
    total: std::sync::Mutex<Option<u64>>,
    bytes: AtomicU64,
}

impl Progress for Counted {
    fn start(&self, total: Option<u64>) {
        *self.total.lock().unwrap() = total;
    }

    fn advance(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
    }
}

/// A file of pseudo-random bytes (incompressible, so nothing can shortcut it).
fn random_file(path: &Path, len: usize) {
    let mut rng = fastrand::Rng::with_seed(len as u64);
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    std::fs::write(path, data).unwrap();
}

#[tokio::test]
async fn upload_and_download_stream_with_progress_and_equal_hashes() {
    let server = TestServer::start().await;
    let (muxer, client) = hybrid_client(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("payload.bin");
    let len = 6 * 1024 * 1024 + 123;
    random_file(&local, len);
    let remote = dir.path().join("guest-side/nested/payload.bin");
    let remote = remote.to_str().unwrap();

    let up = Arc::new(Counted::default());
    let sent = client.upload_file(&local, remote, up.clone()).await.unwrap();
    assert_eq!(sent, len as u64);
    assert_eq!(*up.total.lock().unwrap(), Some(len as u64));
    assert_eq!(up.bytes.load(Ordering::SeqCst), len as u64);
    assert_eq!(client.stat(remote).await.unwrap().size, len as i64);

    let back = dir.path().join("back.bin");
    let down = Arc::new(Counted::default());
    let received = client.download_file(remote, &back, down.clone()).await.unwrap();
    assert_eq!(received, len as u64);
    assert_eq!(*down.total.lock().unwrap(), Some(len as u64));
    assert_eq!(down.bytes.load(Ordering::SeqCst), len as u64);
    assert_eq!(sha256_file(&back), sha256_file(&local));
    assert_eq!(muxer.pipelined(), 0);

    // A failed download leaves the local file as it was.
    let err = client.download_file("/nonexistent/file", &back, Arc::new(Counted::default())).await.unwrap_err();
    assert!(matches!(err, ClientError::Http { status: 404, .. }), "{err:?}");
    assert_eq!(sha256_file(&back), sha256_file(&local));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "no partial file left behind");
    server.stop().await;
}

#[tokio::test]
async fn init_env_vars_reach_later_commands_and_tokens_are_sent() {
    let server = TestServer::start().await;
    let (_muxer, client) = hybrid_client(&server).await;
    let init = InitRequest {
        env_vars: Some([("GREETING".to_owned(), "hello from init".to_owned())].into()),
        access_token: Some("s3cret".into()),
        ..InitRequest::default()
    };
    client.init(&init).await.unwrap();
    client.health().await.expect("/health needs no token");

    let err = client.output(&Command::shell("echo $GREETING")).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err:?}");

    let authed = client.with_access_token(Some("s3cret".into())).unwrap();
    let out = authed.output(&Command::shell("echo $GREETING")).await.unwrap();
    assert_eq!(out.stdout, b"hello from init\n");
    server.stop().await;
}

#[tokio::test]
async fn list_stat_and_watch() {
    let server = TestServer::start().await;
    let (_muxer, client) = hybrid_client(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_owned();

    let mut watcher = client.watch(&root, false).await.unwrap();
    let file = format!("{root}/created.txt");
    client.upload(&b"twelve bytes"[..], Some(12), &file, Arc::new(guestd::client::NoProgress)).await.unwrap();
    // Uploads land atomically: a hidden temporary file first, then a rename onto the name.
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let event = watcher.next().await.expect("the watch stays open").unwrap();
            if event.name == "created.txt" {
                return event;
            }
        }
    })
    .await
    .expect("an event for created.txt");
    assert!(matches!(seen.kind, EventType::Create | EventType::Write | EventType::Rename), "{seen:?}");

    client.make_dir(&format!("{root}/sub")).await.unwrap();
    let mut names: Vec<_> = client.list(&root, 1).await.unwrap().into_iter().map(|e| e.name).collect();
    names.sort();
    assert_eq!(names, ["created.txt", "sub"]);
    let stat = client.stat(&file).await.unwrap();
    assert_eq!(stat.size, 12);
    assert_eq!(stat.path, file);

    let err = client.stat(&format!("{root}/missing")).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn tagged_processes_are_listed_attached_and_killed() {
    let server = TestServer::start().await;
    let (_muxer, client) = hybrid_client(&server).await;
    let mut running = client.run(&Command::shell("echo ready; exec sleep 30").tag("sleeper")).await.unwrap();
    assert_eq!(running.next().await.unwrap().unwrap(), RunEvent::Stdout("ready\n".into()));

    let listed = client.processes().await.unwrap();
    assert!(listed.iter().any(|p| p.pid == running.pid && p.tag.as_deref() == Some("sleeper")), "{listed:?}");

    let attached = client.attach(&Selector::Tag("sleeper".into())).await.unwrap();
    assert_eq!(attached.pid, running.pid);
    client.signal(&Selector::Tag("sleeper".into()), Signal::Kill).await.unwrap();
    let out = attached.wait().await.unwrap();
    assert_eq!(out.status.signal(), Some(9));
    assert_eq!(out.status.shell_code(), 137);
    server.stop().await;
}

#[tokio::test]
async fn stdin_streams_to_a_process_and_closes() {
    let server = TestServer::start().await;
    let (_muxer, client) = hybrid_client(&server).await;
    let running = client.run(&Command::new("cat").stdin(true)).await.unwrap();
    let selector = Selector::Pid(running.pid);
    let chunks = ["one ", "two ", "three\n"].map(|s| guestd::client::Input::Stdin(s.into()));
    client.stream_input(&selector, futures_util::stream::iter(chunks)).await.unwrap();
    client.close_stdin(&selector).await.unwrap();
    let out = running.wait().await.unwrap();
    assert_eq!(out.stdout, b"one two three\n");
    assert!(out.status.success());
    server.stop().await;
}

// ---- guestctl ------------------------------------------------------------------------------

/// Runs guestctl with `args`; returns (exit code, stdout, stderr).
async fn guestctl(args: Vec<String>) -> (i32, String, String) {
    guestctl_with_stdin(args, Vec::new()).await
}

/// Runs guestctl with `args` and `stdin` piped in.
async fn guestctl_with_stdin(args: Vec<String>, stdin: Vec<u8>) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_guestctl"))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("guestctl runs");
        let mut pipe = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(&stdin);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn guestctl_run_streams_output_and_exits_with_the_command_code() {
    let server = TestServer::start().await;
    let muxer = Muxer::start(Mode::Proxy { upstream: server.addr, not_listening: 2 });
    let addr = muxer.url();
    let (code, stdout, stderr) =
        guestctl(args(&["--addr", &addr, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 7"])).await;
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (7, "out\n", "err\n"));

    let (code, _, _) = guestctl(args(&["--addr", &addr, "run", "--", "sh", "-c", "kill -TERM $$"])).await;
    assert_eq!(code, 128 + 15, "a signal death is 128 + N, as in a shell");

    let (code, stdout, _) = guestctl(args(&["--addr", &addr, "run", "-e", "A=b", "--", "sh", "-c", "echo $A"])).await;
    assert_eq!((code, stdout.as_str()), (0, "b\n"));
    server.stop().await;
}

#[tokio::test]
async fn guestctl_run_writes_every_output_byte_and_reports_a_closed_stdout() {
    let server = TestServer::start().await;
    let addr = format!("tcp://{}", server.addr);
    // 16 MiB of numbered lines on stdout (many messages), one line on stderr at the end.
    let script = "seq 1 2000000; echo done >&2";
    let (code, stdout, stderr) = guestctl(args(&["--addr", &addr, "run", "--", "sh", "-c", script])).await;
    assert_eq!((code, stderr.as_str()), (0, "done\n"));
    let expected: String = (1..=2_000_000).map(|n| format!("{n}\n")).collect();
    assert!(stdout == expected, "stdout differs: {} bytes instead of {}", stdout.len(), expected.len());

    // A reader that goes away (`guestctl run … | head -1`) ends guestctl with the cause.
    let exe = env!("CARGO_BIN_EXE_guestctl");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("'{exe}' --addr {addr} run -- head -c 64M /dev/zero | head -c 1 >/dev/null"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("writing the output") && stderr.contains("Broken pipe"), "stderr: {stderr}");
    server.stop().await;
}

#[tokio::test]
async fn guestctl_cp_both_ways_keeps_the_bytes() {
    let server = TestServer::start().await;
    let muxer = Muxer::start(Mode::Proxy { upstream: server.addr, not_listening: 0 });
    let addr = muxer.url();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("up.bin");
    random_file(&local, 3 * 1024 * 1024);
    let guest_dir = dir.path().join("guest");
    let guest_path = format!("guest:{}/", guest_dir.display());

    let (code, _, stderr) = guestctl(args(&["--addr", &addr, "cp", local.to_str().unwrap(), &guest_path])).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(sha256_file(&guest_dir.join("up.bin")), sha256_file(&local));

    let back = dir.path().join("back");
    std::fs::create_dir(&back).unwrap();
    let src = format!("guest:{}/up.bin", guest_dir.display());
    let (code, _, stderr) = guestctl(args(&["--addr", &addr, "cp", "-q", &src, back.to_str().unwrap()])).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(sha256_file(&back.join("up.bin")), sha256_file(&local));

    let (code, stdout, _) =
        guestctl(args(&["--addr", &addr, "stat", guest_dir.join("up.bin").to_str().unwrap()])).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("size:        3145728"), "{stdout}");
    server.stop().await;
}

#[tokio::test]
async fn guestctl_says_clearly_why_it_cannot_connect() {
    let (code, _, stderr) = guestctl(args(&["--addr", "unix:///nonexistent/v.sock:49983", "health"])).await;
    assert_eq!(code, 1);
    assert!(stderr.starts_with("guestctl: cannot reach unix:///nonexistent/v.sock:49983"), "{stderr}");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("tcp://127.0.0.1:{port}");
    let (code, _, stderr) = guestctl(args(&["--addr", &addr, "--wait", "0", "run", "--", "true"])).await;
    assert_eq!(code, 255, "run reports its own failures as 255");
    assert!(stderr.contains(&format!("connection to {addr} refused")), "{stderr}");

    let muxer = Muxer::start(Mode::NeverListen);
    let (code, _, stderr) = guestctl(args(&["--addr", &muxer.url(), "--wait", "300ms", "health"])).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("never answered within 300 ms"), "{stderr}");

    let (code, _, stderr) = guestctl(args(&["--addr", "http://x:1", "health"])).await;
    assert_eq!(code, 2, "clap usage error");
    assert!(stderr.contains("invalid guest address"), "{stderr}");
}

#[tokio::test]
async fn guestctl_init_ps_kill_and_health() {
    let server = TestServer::start().await;
    let muxer = Muxer::start(Mode::Proxy { upstream: server.addr, not_listening: 0 });
    let addr = muxer.url();
    let (code, _, stderr) = guestctl(args(&["--addr", &addr, "init", "--env", "FROM_INIT=42"])).await;
    assert_eq!(code, 0, "{stderr}");
    let (_, stdout, _) = guestctl(args(&["--addr", &addr, "run", "--", "sh", "-c", "echo $FROM_INIT"])).await;
    assert_eq!(stdout, "42\n");

    let client = Client::connect(muxer.addr(), ClientOptions::default()).await.unwrap();
    let sleeper = client.run(&Command::new("sleep").arg("30").tag("nap")).await.unwrap();
    let (code, stdout, _) = guestctl(args(&["--addr", &addr, "ps"])).await;
    assert_eq!(code, 0);
    assert!(stdout.lines().any(|l| l.contains(&sleeper.pid.to_string()) && l.contains("nap")), "{stdout}");
    let (code, _, stderr) = guestctl(args(&["--addr", &addr, "kill", "--tag", "nap"])).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(sleeper.wait().await.unwrap().status.shell_code(), 143);

    let (code, stdout, _) = guestctl(args(&["--addr", &addr, "health"])).await;
    assert_eq!(code, 0);
    assert!(stdout.starts_with(&format!("ok: {addr} answered in")), "{stdout}");
    server.stop().await;
}

#[tokio::test]
async fn guestctl_forwards_stdin_and_allocates_a_pty() {
    let server = TestServer::start().await;
    let addr = format!("tcp://{}", server.addr);
    let input = b"line one\nline two\n".to_vec();
    let (code, stdout, stderr) = guestctl_with_stdin(args(&["--addr", &addr, "run", "-i", "--", "cat"]), input).await;
    assert_eq!((code, stdout.as_str()), (0, "line one\nline two\n"), "{stderr}");

    // Without a local terminal, -t still allocates a PTY in the guest (80x24 by default).
    let script = "tty; stty size; read -r line; echo got:$line";
    let (code, stdout, stderr) =
        guestctl_with_stdin(args(&["--addr", &addr, "run", "-t", "--", "sh", "-c", script]), b"typed\n".to_vec()).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("/dev/pts/"), "{stdout:?}");
    assert!(stdout.contains("24 80"), "{stdout:?}");
    assert!(stdout.contains("got:typed"), "PTY input forwarded: {stdout:?}");
    server.stop().await;
}
