//! Binding and serving: one listener per `--listen` address (TCP or AF_VSOCK), all sharing one
//! service stack, HTTP/1.1 and h2c (prior knowledge) on the same socket via hyper-util's `auto`
//! builder:
//!
//! ```text
//! accept ─► hyper (h1 | h2c) ─► CORS ─► AccessLayer ─► ConnectLayer ─► GrpcDeadlineLayer ─► axum Router
//!                                 token gate      │ Connect → gRPC                  ├─ tonic: process, filesystem, reflection
//!                                                 └ gRPC passes through             └─ plain HTTP: /health, /init, /files, …
//! ```
//!
//! Startup is phased: [`Server::bind`] binds every address first (so a bad address fails before
//! anything is served), then [`Server::serve`] runs the accept loops until `shutdown` resolves.
//! Shutdown: stop accepting; then, at once and for at most [`crate::SHUTDOWN_GRACE`], every
//! connection finishes gracefully (idle keep-alive connections close at once, in-flight requests
//! may finish) while the process groups guestd started are terminated (SIGTERM, then SIGKILL).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::boot::Boot;
use crate::config::{Config, ListenAddr};
use crate::host::MetricsSource;
use crate::process::cgroup::{CgroupSource, Cgroups};
use crate::process::{ManagerConfig, ProcessManager};
use crate::session::{Session, SystemClock};
use crate::{Agent, SHUTDOWN_GRACE, http, rpc};

/// How long a finished process stays reachable by `Connect` (envd keeps 30 s).
const PROCESS_RETENTION: Duration = Duration::from_secs(60);

/// Pause after an accept error such as EMFILE, so a full fd table does not spin a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// How long a new connection may take to send the bytes that tell HTTP/1.1 from h2 (the h2
/// preface is 24). Until then hyper waits without a timer of its own, so a client that connects
/// and sends nothing (or a part of the preface) held a descriptor forever, and enough of them
/// stopped guestd accepting. Afterwards hyper's own timers take over (HTTP/1.1: the request
/// head within 30 s; h2: keep-alive pings). Same as hyper's HTTP/1.1 header timeout.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval of HTTP/2 PING frames, so dead peers of long streams are noticed.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// Blocks the allocator parked for reuse go back to the kernel this long after a response ends
/// (at most once per this interval under load; never while nothing happens).
const TRIM_AFTER: Duration = Duration::from_secs(2);

/// A listen address guestd could not bind.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct BindError {
    addr: ListenAddr,
    #[source]
    source: io::Error,
}

enum Listener {
    Tcp(TcpListener),
    Vsock(tokio_vsock::VsockListener),
}

/// Bound listeners plus the agent state they will serve.
pub struct Server {
    listeners: Vec<(ListenAddr, Listener)>,
    agent: Arc<Agent>,
}

impl Server {
    /// Binds every configured address and builds the agent state. Serves nothing yet.
    pub async fn bind(config: &Config) -> Result<Server, BindError> {
        let mut listeners = Vec::with_capacity(config.listen.len());
        for &addr in &config.listen {
            let bound = match addr {
                ListenAddr::Tcp(sock) => TcpListener::bind(sock).await.and_then(|l| {
                    let local = l.local_addr()?;
                    Ok((ListenAddr::Tcp(local), Listener::Tcp(l)))
                }),
                ListenAddr::Vsock { cid, port } => {
                    tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(cid, port)).and_then(|l| {
                        let local = l.local_addr()?;
                        Ok((ListenAddr::Vsock { cid: local.cid(), port: local.port() }, Listener::Vsock(l)))
                    })
                }
            };
            listeners.push(bound.map_err(|source| BindError { addr, source })?);
        }
        let internal_env = [("E2B_SANDBOX".to_owned(), config.in_sandbox.to_string())].into();
        let agent = Arc::new(Agent {
            processes: ProcessManager::new(ManagerConfig {
                path_env: config.path_env.clone(),
                retention: PROCESS_RETENTION,
                cgroups: command_cgroups(config),
            }),
            session: Session::with_internal_env(config.default_user.clone(), internal_env),
            clock: Arc::new(SystemClock),
            boot: Arc::new(Boot::new(config.start.clone())),
            metrics: MetricsSource::new(),
            watches: crate::watch::WatchManager::new().inspect_err(|err| {
                warn!(error = %crate::error_chain(err), "directory watches are unavailable");
            }),
        });
        Ok(Server { listeners, agent })
    }

    /// The addresses actually bound (port 0 replaced by the port the kernel chose).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners.iter().map(|(addr, _)| *addr).collect()
    }

    /// The first bound TCP address, if any (handy for tests and embedders).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.local_addrs().into_iter().find_map(|a| match a {
            ListenAddr::Tcp(sock) => Some(sock),
            ListenAddr::Vsock { .. } => None,
        })
    }

    /// The agent state (process table, session) this server serves.
    pub fn agent(&self) -> Arc<Agent> {
        self.agent.clone()
    }

    /// Serves until `shutdown` resolves, then drains connections and ends the processes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let response_ended = Arc::new(Notify::new());
        let service = service(self.agent.clone(), response_ended.clone());
        let trimmer = tokio::spawn(trim_when_idle(response_ended));
        let tracker = TaskTracker::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for (addr, listener) in self.listeners {
            info!(%addr, "listening");
            let ctx = AcceptContext { service: service.clone() };
            let stop = stop_rx.clone();
            match listener {
                Listener::Tcp(l) => tracker.spawn(accept_loop(Tcp(l), ctx, stop)),
                Listener::Vsock(l) => tracker.spawn(accept_loop(Vsock(l), ctx, stop)),
            };
        }
        let boot = self.agent.boot.clone();
        let boot_task = tokio::spawn(boot.run(self.agent.processes.clone(), self.agent.session.clone()));
        shutdown.await;
        info!("shutting down");
        let _ = stop_tx.send(true);
        // The boot task may be waiting for an /init that will never come.
        boot_task.abort();
        trimmer.abort();
        tracker.close();
        // Processes end while connections drain, so their output streams finish instead of
        // holding the drain for the whole grace period. Each accept loop drains its own
        // connections within the grace period.
        tokio::join!(tracker.wait(), self.agent.processes.shutdown(SHUTDOWN_GRACE));
    }
}

/// The whole request path shared by every listener: Connect translation in front of the
/// router that holds the tonic services and the plain HTTP routes.
type Service = tower::util::BoxCloneSyncService<::http::Request<Incoming>, axum::response::Response, Infallible>;

/// Where commands get cgroups of their own, if anywhere (logged either way), searched for on a
/// thread of its own from now on: the listeners are bound, so a client may already be waiting.
fn command_cgroups(config: &Config) -> Arc<CgroupSource> {
    if !config.cgroups {
        info!("--no-cgroups: commands run in guestd's cgroup; signals reach their process groups");
        return CgroupSource::known(None);
    }
    let source = CgroupSource::new(find_cgroups);
    // As PID 1 (a VM's init) nothing else runs yet: the search can fill idle time, leaving the
    // CPU to guestd's own start; elsewhere it could be starved by a busy machine while the first
    // command waits for it.
    source.prepare(crate::pid1::is_pid1());
    source
}

fn find_cgroups() -> Option<Arc<Cgroups>> {
    match Cgroups::detect() {
        Ok(cgroups) => {
            info!(dir = %cgroups.dir().display(), "each command runs in a cgroup of its own");
            Some(Arc::new(cgroups))
        }
        Err(reason) => {
            info!(%reason, "commands run in guestd's cgroup; signals reach their process groups");
            None
        }
    }
}

fn service(agent: Arc<Agent>, response_ended: Arc<Notify>) -> Service {
    let session = agent.session.clone();
    let router = http::routes(agent.clone(), rpc::router(agent));
    let stack = tower::ServiceBuilder::new()
        .layer(http::cors())
        .layer(http::auth::AccessLayer::new(session))
        .layer(crate::connect::ConnectLayer::new(crate::proto::descriptor_pool))
        .layer(crate::connect::GrpcDeadlineLayer)
        .service(router);
    let stack = stack.map_request(|req: ::http::Request<Incoming>| req.map(axum::body::Body::new)).map_response(
        move |res: axum::response::Response| {
            let ended = NotifyOnDrop(response_ended.clone());
            res.map(|body| axum::body::Body::new(TrackedBody { body, _ended: ended }))
        },
    );
    tower::util::BoxCloneSyncService::new(stack)
}

/// Hands the allocator's parked blocks back ([`crate::sys::alloc::trim`]) [`TRIM_AFTER`] after
/// a response ended: memory kept warm for the next chunk of a stream is not kept once the
/// streams are over. Sleeps on a `Notify` in between: no timer runs while guestd is idle.
///
/// Deliberately not "once no response is open": SDKs keep watch streams open for hours, and
/// the budget would stay parked all that time. A trim during a busy stream (another response
/// ended) costs the stream at most one refill of the budget, ~2k page faults, every 2 s.
async fn trim_when_idle(response_ended: Arc<Notify>) {
    loop {
        response_ended.notified().await;
        tokio::time::sleep(TRIM_AFTER).await;
        crate::sys::alloc::trim();
    }
}

struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

pin_project_lite::pin_project! {
    /// A response body that reports when it is done with (sent, failed or abandoned).
    struct TrackedBody {
        #[pin]
        body: axum::body::Body,
        _ended: NotifyOnDrop,
    }
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

struct AcceptContext {
    service: Service,
}

/// A listening socket of some transport; every transport shares the same serving code.
trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

struct Tcp(TcpListener);
struct Vsock(tokio_vsock::VsockListener);

impl Accept for Tcp {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        let (stream, _) = self.0.accept().await?;
        // Without NODELAY, HEADERS and DATA written separately meet delayed ACKs: 40 ms per call.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Accept for Vsock {
    /// Not `tokio_vsock::VsockStream`: it cannot write vectored (`sys::stream` says what that costs).
    type Io = crate::sys::stream::SocketStream;
    async fn accept(&self) -> io::Result<Self::Io> {
        // The std stream, not yet registered with the reactor: it is registered once, as ours.
        let (stream, _) = std::future::poll_fn(|cx| self.0.poll_accept_std(cx)).await?;
        crate::sys::stream::SocketStream::new(stream.into())
    }
}

async fn accept_loop<L: Accept>(listener: L, ctx: AcceptContext, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Both timers are required: hyper panics on keep-alive/header timeouts without one.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(H2_KEEPALIVE));
    let graceful = GracefulShutdown::new();
    let mut failed_accepts: u64 = 0;
    loop {
        let io = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(io) => io,
                Err(err) => {
                    // Once per streak (EMFILE lasts while the descriptors are taken): not a
                    // line every 50 ms.
                    if failed_accepts == 0 {
                        warn!(error = %err, "accept failed; retrying");
                    }
                    failed_accepts += 1;
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        if failed_accepts > 0 {
            info!(failed = failed_accepts, "accepting again");
            failed_accepts = 0;
        }
        let service = TowerToHyperService::new(ctx.service.clone());
        let io = PrefaceDeadline::new(io, PREFACE_TIMEOUT);
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
        let connection = graceful.watch(connection);
        // Connections are tracked by `graceful`, not by the accept-loop tracker: a stream may
        // outlive the grace period and must not hold shutdown hostage.
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; leaving them");
    }
}

/// A new connection's IO, failing its reads with `TimedOut` when the first
/// [`H2_PREFACE_LEN`] bytes have not arrived within the deadline (see [`PREFACE_TIMEOUT`]);
/// after them, or once that many were read, a plain pass-through.
struct PrefaceDeadline<T> {
    io: T,
    /// None once the preface's worth of bytes was read.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    read: usize,
}

/// The h2 client preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`: what hyper reads to tell the
/// protocols apart.
const H2_PREFACE_LEN: usize = 24;

impl<T> PrefaceDeadline<T> {
    fn new(io: T, timeout: Duration) -> Self {
        Self { io, deadline: Some(Box::pin(tokio::time::sleep(timeout))), read: 0 }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else { return polled };
        if polled.is_ready() {
            let n = buf.filled().len() - before;
            this.read += n;
            // Enough to tell the protocols apart, an error, or end of file: hyper takes it from here.
            if this.read >= H2_PREFACE_LEN || n == 0 || matches!(polled, Poll::Ready(Err(_))) {
                this.deadline = None;
            }
            return polled;
        }
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no request within {}s of connecting", PREFACE_TIMEOUT.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A connection that sends nothing, or only part of the h2 preface, is dropped once the
    /// deadline passes; one that sent the preface's worth is never timed out by it.
    #[tokio::test(start_paused = true)]
    async fn a_connection_must_say_what_it_speaks_within_the_deadline() {
        for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut server = PrefaceDeadline::new(server, PREFACE_TIMEOUT);
            client.write_all(sent).await.unwrap();
            let mut buf = [0u8; 64];
            let mut got = 0;
            let err = loop {
                match server.read(&mut buf[got..]).await {
                    Ok(n) => got += n,
                    Err(err) => break err,
                }
            };
            assert_eq!((got, err.kind()), (sent.len(), io::ErrorKind::TimedOut), "{err}");
        }

        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = PrefaceDeadline::new(server, PREFACE_TIMEOUT);
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), H2_PREFACE_LEN);
        let later = tokio::spawn(async move { server.read(&mut buf).await.map(|_| ()) });
        tokio::time::sleep(PREFACE_TIMEOUT * 4).await;
        assert!(!later.is_finished(), "an idle connection that spoke is left to hyper's own timers");
        drop(client);
        later.await.unwrap().unwrap();
    }
}
