//! Dialing a guestd: one byte stream per call, over TCP, AF_VSOCK or a hybrid-vsock Unix
//! socket, retried with backoff while the guest is not listening yet.
//!
//! The hybrid-vsock handshake (Firecracker, Cloud Hypervisor, vhost-device-vsock) is: connect
//! to the Unix socket, write `CONNECT <port>\n`, read one line, which must start with `OK `;
//! from then on the socket is the guest's stream. Three rules, each learnt the hard way:
//!
//! - The reply is read **one byte at a time** up to `\n`: a buffered reader could swallow the
//!   first bytes the guest sends right after the `OK` line.
//! - Nothing is written after `CONNECT` before the `OK` line arrives: vhost-device-vsock reads
//!   the line through a buffered reader and silently drops whatever came with it.
//! - Only the `OK ` prefix is checked: Firecracker answers `OK <host-side port>`,
//!   vhost-device-vsock `OK <guest port>`.
//!
//! While the guest is not listening (still booting), the muxer accepts the Unix connection and
//! closes it after `CONNECT`; the client then sees EOF, EPIPE or ECONNRESET. Those are retried,
//! as are ECONNREFUSED (TCP, vsock) and AF_VSOCK's ECONNRESET, until the deadline. An address
//! that cannot be reached at all (no such socket file, no route, no vsock transport) and a
//! handshake answered with something other than `OK` fail at once.
//!
//! [`Connector`] is a `tower::Service<Uri>`, so tonic (`Endpoint::connect_with_connector`) and
//! hyper's client both dial through it; the URI is ignored (it only sets `:authority`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use super::addr::GuestAddr;
use crate::sys::stream::SocketStream;

/// Longest handshake reply accepted (`OK 4294967295\n` is 14 bytes; anything much longer is not
/// a vsock muxer talking).
const MAX_REPLY: usize = 128;

/// The least time a single attempt gets, even when the deadline is (nearly) used up, so a zero
/// deadline still means "one real try" rather than "fail at once".
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// How dials retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// No new attempt starts after this long from the first; [`ConnectError::NeverAnswered`] (or
    /// [`ConnectError::Refused`]) then. Zero: exactly one attempt.
    pub deadline: Duration,
    /// Pause after the first failed attempt; doubled after each further one up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ConnectOptions {
    /// 10 s covers a micro-VM boot (about 2 s under TCG here, well under 1 s with KVM); backoff
    /// from 10 ms to 100 ms keeps the delay between "guest listens" and "client connected" small
    /// (it is part of every boot-to-first-command figure) for a few dozen attempts per boot.
    fn default() -> Self {
        ConnectOptions {
            deadline: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        }
    }
}

/// Why a guestd could not be dialed. Each message names the address.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing can be reached at the address: no such socket file, no route to the host, an
    /// unknown host name, no vsock transport. Not retried.
    #[error("cannot reach {addr}")]
    Unreachable {
        addr: GuestAddr,
        #[source]
        source: io::Error,
    },
    /// Something at the address actively refused the connection, up to the deadline.
    #[error("connection to {addr} refused ({attempts} attempt{} in {})", if *.attempts == 1 { "" } else { "s" }, secs(*.waited))]
    Refused {
        addr: GuestAddr,
        attempts: u32,
        waited: Duration,
        #[source]
        source: io::Error,
    },
    /// The hybrid-vsock muxer answered `CONNECT` with something other than `OK `. Not retried.
    #[error("{addr} rejected the vsock handshake: it answered {reply:?} instead of \"OK <port>\"")]
    HandshakeRejected { addr: GuestAddr, reply: String },
    /// The address was there, but guestd never took the connection (closed during the handshake,
    /// reset, or silent) before the deadline.
    #[error("the guest at {addr} never answered within {} (is guestd running and listening on that port?)", secs(*.deadline))]
    NeverAnswered {
        addr: GuestAddr,
        deadline: Duration,
        #[source]
        last: Option<io::Error>,
    },
}

fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) { format!("{} ms", d.as_millis()) } else { format!("{:.1} s", d.as_secs_f64()) }
}

/// One failed attempt, sorted by what happens next.
enum Failure {
    /// Give up now.
    Fatal(ConnectError),
    /// ECONNREFUSED: retry; reported as [`ConnectError::Refused`] at the deadline.
    Refused(io::Error),
    /// The guest is not listening yet (or not answering): retry; reported as
    /// [`ConnectError::NeverAnswered`] at the deadline.
    NotListening(io::Error),
}

/// A connected byte stream to guestd, whatever the transport.
#[derive(Debug)]
pub enum GuestStream {
    Tcp(TcpStream),
    /// A hybrid-vsock Unix socket after its `OK` line.
    Unix(UnixStream),
    /// Not `tokio_vsock::VsockStream`, which cannot write vectored (see `sys::stream`).
    Vsock(SocketStream),
}

impl GuestStream {
    /// The TCP socket, when this is one (tests check `TCP_NODELAY` through it).
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            GuestStream::Tcp(s) => Some(s),
            _ => None,
        }
    }
}

impl AsyncRead for GuestStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GuestStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            GuestStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            GuestStream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GuestStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GuestStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            GuestStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            GuestStream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    /// Forwarded so hyper and h2 write a message's header and payload in one `writev` instead
    /// of copying the payload into their own buffer first (uploads are the big case).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GuestStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            GuestStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            GuestStream::Vsock(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            GuestStream::Tcp(s) => s.is_write_vectored(),
            GuestStream::Unix(s) => s.is_write_vectored(),
            GuestStream::Vsock(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GuestStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            GuestStream::Unix(s) => Pin::new(s).poll_flush(cx),
            GuestStream::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GuestStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            GuestStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            GuestStream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Dials one guest address. Cheap to clone; every clone dials the same address.
#[derive(Debug, Clone)]
pub struct Connector {
    addr: Arc<GuestAddr>,
    options: ConnectOptions,
    /// A stream dialed ahead (by `Client::connect`, to report a typed error), handed to the first
    /// `call` instead of dialing again.
    primed: Arc<Mutex<Option<GuestStream>>>,
}

impl Connector {
    pub fn new(addr: GuestAddr, options: ConnectOptions) -> Connector {
        Connector { addr: Arc::new(addr), options, primed: Arc::default() }
    }

    pub fn addr(&self) -> &GuestAddr {
        &self.addr
    }

    pub fn options(&self) -> ConnectOptions {
        self.options
    }

    /// Makes the next `call` return `stream` instead of dialing.
    pub(crate) fn prime(&self, stream: GuestStream) {
        *self.primed.lock().unwrap_or_else(PoisonError::into_inner) = Some(stream);
    }

    /// Dials until connected, a fatal error, or the deadline (see the module docs).
    #[tracing::instrument(name = "client.dial", skip(self), fields(addr = %self.addr))]
    pub async fn dial(&self) -> Result<GuestStream, ConnectError> {
        let start = Instant::now();
        let deadline = start + self.options.deadline;
        let mut backoff = self.options.initial_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let budget = deadline.saturating_duration_since(Instant::now()).max(MIN_ATTEMPT);
            let failure = match tokio::time::timeout(budget, attempt(&self.addr)).await {
                Ok(Ok(stream)) => {
                    tracing::debug!(attempts, elapsed = ?start.elapsed(), "connected");
                    return Ok(stream);
                }
                Ok(Err(failure)) => failure,
                Err(_) => Failure::NotListening(io::Error::new(io::ErrorKind::TimedOut, "no answer")),
            };
            let retry = match failure {
                Failure::Fatal(err) => return Err(err),
                Failure::Refused(source) => {
                    if Instant::now() + backoff >= deadline {
                        return Err(ConnectError::Refused {
                            addr: (*self.addr).clone(),
                            attempts,
                            waited: start.elapsed(),
                            source,
                        });
                    }
                    source
                }
                Failure::NotListening(last) => {
                    if Instant::now() + backoff >= deadline {
                        return Err(ConnectError::NeverAnswered {
                            addr: (*self.addr).clone(),
                            deadline: self.options.deadline,
                            last: Some(last),
                        });
                    }
                    last
                }
            };
            tracing::trace!(attempts, error = %retry, ?backoff, "guest not answering yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
        }
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<GuestStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let primed = this.primed.lock().unwrap_or_else(PoisonError::into_inner).take();
            match primed {
                Some(stream) => Ok(TokioIo::new(stream)),
                None => this.dial().await.map(TokioIo::new),
            }
        })
    }
}

/// One connection attempt.
async fn attempt(addr: &GuestAddr) -> Result<GuestStream, Failure> {
    let fatal = |source| Failure::Fatal(ConnectError::Unreachable { addr: addr.clone(), source });
    match addr {
        GuestAddr::Tcp { host, port } => {
            let targets: Vec<_> = tokio::net::lookup_host((host.as_str(), *port)).await.map_err(fatal)?.collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"));
            for target in targets {
                match TcpStream::connect(target).await {
                    Ok(stream) => {
                        // Small RPC frames must not wait for Nagle's delayed ACK dance.
                        stream.set_nodelay(true).map_err(|e| classify(addr, e))?;
                        return Ok(GuestStream::Tcp(stream));
                    }
                    Err(err) => last = err,
                }
            }
            Err(classify(addr, last))
        }
        GuestAddr::Vsock { cid, port } => {
            let target = tokio_vsock::VsockAddr::new(*cid, *port);
            let stream = tokio_vsock::VsockStream::connect(target).await.map_err(|e| classify(addr, e))?;
            SocketStream::new(stream.into()).map(GuestStream::Vsock).map_err(fatal)
        }
        GuestAddr::HybridVsock { path, port } => {
            let stream = UnixStream::connect(path).await.map_err(|e| classify(addr, e))?;
            hybrid_handshake(addr, stream, *port).await.map(GuestStream::Unix)
        }
    }
}

/// `CONNECT <port>\n` → `OK …\n`, reading the reply byte by byte so not one byte of the guest's
/// stream is consumed.
async fn hybrid_handshake(addr: &GuestAddr, mut stream: UnixStream, port: u32) -> Result<UnixStream, Failure> {
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(|e| classify(addr, e))?;
    let mut reply = Vec::with_capacity(32);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(0) => {
                return Err(Failure::NotListening(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the vsock muxer closed the connection before answering CONNECT {port}"),
                )));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => reply.push(byte[0]),
            Err(err) => return Err(classify(addr, err)),
        }
        if reply.len() > MAX_REPLY {
            break;
        }
    }
    if reply.starts_with(b"OK ") && reply.len() <= MAX_REPLY {
        return Ok(stream);
    }
    Err(Failure::Fatal(ConnectError::HandshakeRejected {
        addr: addr.clone(),
        reply: String::from_utf8_lossy(&reply).into_owned(),
    }))
}

/// Sorts a connect-time I/O error: retry (the guest may come up) or give up.
fn classify(addr: &GuestAddr, err: io::Error) -> Failure {
    use io::ErrorKind::*;
    match err.kind() {
        ConnectionRefused => Failure::Refused(err),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut | Interrupted => {
            Failure::NotListening(err)
        }
        _ => Failure::Fatal(ConnectError::Unreachable { addr: addr.clone(), source: err }),
    }
}
