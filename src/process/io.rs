//! Moving bytes between a child and guestd: the output pumps (pipe or PTY master -> output log)
//! and the input side (guestd -> stdin pipe or PTY master).
//!
//! Each output stream has one pump (a future the process's supervising task drives). It asks the
//! log for space *before* reading, so when the subscribers are slow the data stays in the kernel
//! pipe and the child blocks in `write`, which is the backpressure a pipe gives any program.
//! Reads go into a shared `BytesMut` and become zero-copy `Bytes` chunks.

use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use super::output::{OutputLog, Stream};
use crate::sys::fd::AsyncRawFd;

/// Largest single read, i.e. largest output chunk (one Data event on the wire). 128 KiB is four
/// times envd's 32 KiB: fewer wake-ups and messages at GB/s rates, still far below the 4 MiB
/// default message limit of gRPC clients.
pub const READ_CHUNK: usize = 128 * 1024;

/// Size of the buffer reads are packed into. Consecutive reads share one allocation, so many
/// small chunks pin one buffer, not one buffer each.
const READ_ALLOC: usize = 256 * 1024;

/// Start a new buffer when less than this is left in the current one, so reads stay big.
const MIN_READ: usize = 16 * 1024;

/// Kernel pipe buffer for stdout/stderr once a read finds the default 64 KiB full. 1 MiB lets a
/// fast writer run for ~1 ms between our reads; it is also the default `pipe-max-size`, so it
/// works unprivileged. Best effort. Growing only busy pipes keeps two syscalls (and 2 MiB of
/// possible kernel buffers) off every short command.
pub const PIPE_SIZE: usize = 1024 * 1024;

/// A read of at least this much means the pipe was full at its default size.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// Copies one output stream into `log` until end of file.
///
/// Once `drain` is cancelled (we signalled the group and its leader died of a signal), it reads
/// only what is already buffered — at most one pipe's worth, without waiting for subscribers —
/// and stops at the first "would block": a descendant that escaped the kill may hold the pipe
/// open forever.
pub(super) async fn pump(
    src: Arc<AsyncRawFd>,
    stream: Stream,
    log: Arc<OutputLog>,
    drain: CancellationToken,
    pid: u32,
) {
    let mut buf = BytesMut::new();
    let mut grown = stream == Stream::Pty;
    let mut drained = 0;
    loop {
        let draining = drain.is_cancelled();
        if draining {
            // What the killed group left in the pipe goes to the log without waiting for slow
            // subscribers (the grace is short), bounded by one pipe's worth: more can only come
            // from a descendant that escaped the kill.
            if drained >= PIPE_SIZE {
                break;
            }
        } else {
            log.wait_for_space().await;
        }
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(READ_ALLOC);
        }
        let read = if draining {
            // Nothing below waits while draining: yield when the task's budget is spent, so the
            // supervisor's grace timer can end a drain that an escaped writer keeps feeding.
            tokio::task::consume_budget().await;
            src.try_read_buf(&mut buf, READ_CHUNK)
        } else {
            tokio::select! {
                read = src.read_buf(&mut buf, READ_CHUNK) => read,
                () = drain.cancelled() => continue,
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => {
                if !grown && n >= DEFAULT_PIPE_SIZE {
                    grown = true;
                    if let Err(error) = crate::sys::fd::set_pipe_size(src.as_fd(), PIPE_SIZE) {
                        tracing::debug!(pid, %error, "could not enlarge the output pipe");
                    }
                }
                if draining {
                    drained += n;
                }
                log.push(stream, buf.split().freeze());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Only reachable while draining: nothing more is buffered.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // A PTY master reports EIO once every slave descriptor is closed: that is its EOF.
            Err(e) if stream == Stream::Pty && e.raw_os_error() == Some(nix::libc::EIO) => break,
            Err(error) => {
                tracing::warn!(pid, ?stream, %error, "reading process output failed");
                break;
            }
        }
    }
}

/// Why an input write did not happen.
pub(super) enum InputError {
    /// Input was never enabled, was closed, or the process ended.
    Closed,
    Io(io::Error),
}

/// guestd's writing end of a child's stdin pipe or PTY master.
pub(super) struct Input {
    fd: Mutex<Option<Arc<AsyncRawFd>>>,
    /// Cancelled by close: in-flight writes stop waiting so the descriptor really closes.
    closed: CancellationToken,
    /// Serialises writers so two requests' bytes never interleave.
    order: tokio::sync::Mutex<()>,
}

impl Input {
    pub(super) fn new(fd: Option<Arc<AsyncRawFd>>) -> Self {
        let closed = CancellationToken::new();
        if fd.is_none() {
            closed.cancel();
        }
        Self { fd: Mutex::new(fd), closed, order: tokio::sync::Mutex::new(()) }
    }

    pub(super) fn current(&self) -> Option<Arc<AsyncRawFd>> {
        self.fd.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Writes all of `data`; waits while the child's input buffer is full.
    pub(super) async fn write(&self, data: &[u8]) -> Result<(), InputError> {
        let write = async {
            let _order = self.order.lock().await;
            let fd = self.current().ok_or(InputError::Closed)?;
            fd.write_all(data).await.map_err(InputError::Io)
        };
        tokio::select! {
            result = write => result,
            () = self.closed.cancelled() => Err(InputError::Closed),
        }
    }

    /// Idempotent; the child sees EOF once no write is in flight (they are cancelled).
    pub(super) fn close(&self) {
        self.closed.cancel();
        self.fd.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}
