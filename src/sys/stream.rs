//! A connected stream socket of any family (AF_VSOCK here) as tokio `AsyncRead + AsyncWrite`,
//! with vectored writes.
//!
//! `tokio_vsock::VsockStream` writes one slice at a time and says so (`is_write_vectored` is
//! false). hyper then switches its HTTP/1.1 writer to "flatten": every body chunk is copied into
//! hyper's own buffer before the `write`, so on vsock, guestd's production transport, each byte
//! of process output or file download was copied once more than on TCP. h2 likewise sends a
//! frame header and its payload in two `write`s. This type is what tokio's `TcpStream` is for
//! TCP: `writev` of the slices as given, reads straight into the caller's buffer.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::fd::{read_uninit, register};

/// A connected stream socket in `O_NONBLOCK` mode, registered with the tokio reactor.
#[derive(Debug)]
pub struct SocketStream {
    inner: AsyncFd<OwnedFd>,
}

impl SocketStream {
    /// Takes over a connected stream socket (it must be one: reads and writes are `read(2)`,
    /// `writev(2)` and `shutdown(2)`). Must be called from within a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self { inner: register(fd)? })
    }

    /// Runs one non-blocking syscall once the socket is ready for writing (`write`) or reading;
    /// retries on `EINTR` and on a readiness that turned out stale.
    fn poll_io<T>(
        &self,
        cx: &mut Context<'_>,
        write: bool,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            let mut guard =
                if write { ready!(self.inner.poll_write_ready(cx))? } else { ready!(self.inner.poll_read_ready(cx))? };
            match guard.try_io(|fd| op(fd.as_fd())) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsFd for SocketStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

impl AsyncRead for SocketStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // SAFETY: the slice is only handed to read(2), which writes at most its length and never
        // de-initialises anything; `assume_init` below covers exactly the bytes it wrote.
        let unfilled = unsafe { buf.unfilled_mut() };
        let n = ready!(self.poll_io(cx, false, |fd| read_uninit(fd, unfilled)))?;
        // SAFETY: read(2) initialised the first `n` bytes of the unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SocketStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_io(cx, true, |fd| Ok(nix::unistd::write(fd, buf)?))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // writev(2) takes at most UIO_MAXIOV slices; the caller writes the rest next time.
        let bufs = &bufs[..bufs.len().min(nix::libc::UIO_MAXIOV as usize)];
        self.poll_io(cx, true, |fd| Ok(nix::sys::uio::writev(fd, bufs)?))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match nix::sys::socket::shutdown(self.inner.get_ref().as_raw_fd(), nix::sys::socket::Shutdown::Write) {
            // The peer is gone already: nothing left to shut.
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn pair() -> (SocketStream, SocketStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (SocketStream::new(a.into()).expect("register a"), SocketStream::new(b.into()).expect("register b"))
    }

    #[tokio::test]
    async fn vectored_writes_arrive_whole_and_in_order_past_a_full_buffer() {
        let (mut tx, mut rx) = pair();
        assert!(tx.is_write_vectored(), "hyper and h2 only write vectored when asked to");
        // 8 MiB in slices of three sizes, far more than a socket buffer holds: the writer must
        // wait for the reader (readiness) rather than fail or drop a partial write.
        let pieces: Vec<Vec<u8>> =
            (0..96u32).map(|i| vec![(i % 251) as u8; [5, 64 * 1024, 123_457][i as usize % 3]]).collect();
        let expected: Vec<u8> = pieces.concat();
        let writer = tokio::spawn(async move {
            let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let n = std::future::poll_fn(|cx| Pin::new(&mut tx).poll_write_vectored(cx, slices)).await.unwrap();
                assert!(n > 0, "writev wrote nothing");
                IoSlice::advance_slices(&mut slices, n);
            }
            tx.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        rx.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");
    }

    #[tokio::test]
    async fn reads_see_the_peers_shutdown_as_end_of_file_and_writes_after_a_close_fail() {
        let (mut a, mut b) = pair();
        a.write_all(b"ping").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = String::new();
        b.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "ping");
        drop(a);
        // EPIPE (SIGPIPE is ignored in every Rust program), not a hang or a signal death.
        let err = b.write_all(b"pong").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
