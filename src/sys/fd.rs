//! Non-blocking file descriptors driven by the tokio reactor.
//!
//! Pipes and PTY masters are wrapped in one type, [`AsyncRawFd`], so that the output readers and
//! input writers of `process` have one code path. Reads go straight into the spare capacity of
//! a `BytesMut` (no zeroing, no intermediate copy): the caller then `split().freeze()`s the bytes
//! into a chunk that every subscriber shares.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use bytes::BytesMut;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;

/// An owned file descriptor in `O_NONBLOCK` mode, registered with the current tokio reactor.
///
/// Reads and writes may run concurrently from different tasks (`&self` methods), which the
/// PTY master needs: one task reads output while RPCs write input.
pub struct AsyncRawFd {
    inner: AsyncFd<OwnedFd>,
}

impl AsyncRawFd {
    /// Puts `fd` in non-blocking mode and registers it with the reactor of the current runtime.
    ///
    /// Must be called from within a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self { inner: register(fd)? })
    }

    /// Waits until the descriptor is readable, then reads at most `max` bytes into the spare
    /// capacity of `buf` (which the caller must have reserved). `Ok(0)` is end of file.
    pub async fn read_buf(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|fd| read_into(fd.as_fd(), buf, max)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads what is available right now; `WouldBlock` when nothing is.
    pub fn try_read_buf(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        read_into(self.inner.get_ref().as_fd(), buf, max)
    }

    /// Writes all of `data`, waiting for the reader to make room whenever the kernel buffer is
    /// full (a full pipe makes the caller wait, it never fails).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.inner.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd, data).map_err(io::Error::from)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

impl AsFd for AsyncRawFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

/// Puts `fd` in non-blocking mode and registers it with the reactor of the current runtime.
pub(super) fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    set_nonblocking(fd.as_fd())?;
    // SAFETY: `fd` is moved into the AsyncFd, so it stays open and refers to the same open file
    // description until the AsyncFd is dropped; `OwnedFd::as_raw_fd` always returns the same
    // number.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// One `read(2)` of at most `max` bytes into the spare capacity of `buf`.
///
/// The caller reserves capacity first; with no spare capacity this reads nothing and returns
/// `Ok(0)`, which would look like end of file, so it is a caller bug and asserted in debug.
fn read_into(fd: BorrowedFd<'_>, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    debug_assert!(len > 0, "read_into called without spare capacity");
    let n = read_uninit(fd, &mut spare[..len])?;
    // SAFETY: the kernel initialised the first `n <= len` bytes of the spare capacity, so the new
    // length covers only initialised bytes and stays within the capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// One `read(2)` into `out`, which need not be initialised: how many bytes it initialised, at
/// most `out.len()`.
pub(super) fn read_uninit(fd: BorrowedFd<'_>, out: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: `out` is writable memory valid for `out.len()` bytes for the duration of the call;
    // `read(2)` writes at most that many bytes into it and does not keep the pointer.
    let n = unsafe { nix::libc::read(fd.as_raw_fd(), out.as_mut_ptr().cast(), out.len()) };
    // Non-negative and at most the length asked for when it is not an error.
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Appends `len` bytes that `fill` writes into `buf`'s spare capacity, without zeroing them first
/// (for encoders that write a known length, e.g. base64 output of a 128 KiB chunk: zeroing it
/// cost as much as a tenth of the encoding).
///
/// `fill` gets exactly `len` uninitialised bytes and must return them, initialised, as the
/// same slice (which is how such encoders report what they wrote); anything else panics.
pub fn append_with(
    buf: &mut BytesMut,
    len: usize,
    fill: impl for<'a> FnOnce(&'a mut [MaybeUninit<u8>]) -> &'a mut [u8],
) {
    buf.reserve(len);
    let spare = &mut buf.spare_capacity_mut()[..len];
    let at = spare.as_ptr().cast::<u8>();
    let written = fill(spare);
    assert!(
        std::ptr::eq(written.as_ptr(), at) && written.len() == len,
        "append_with: the filler returned other bytes than the ones it was given"
    );
    // SAFETY: `written` is a `&mut [u8]`, so initialised, and it covers exactly the `len` bytes of
    // spare capacity after the current length (checked above); the capacity was reserved.
    unsafe { buf.set_len(buf.len() + len) };
}

/// Sets `O_NONBLOCK` on the open file description behind `fd`.
///
/// Only call this on descriptions guestd owns alone (its end of a pipe, a PTY master): the flag
/// is shared by every descriptor that refers to the same description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Grows the kernel buffer of the pipe behind `fd` to `bytes` (best effort: an unprivileged
/// caller is capped at `/proc/sys/fs/pipe-max-size`; the caller decides whether to care).
pub fn set_pipe_size(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    fcntl(fd, FcntlArg::F_SETPIPE_SZ(bytes))?;
    Ok(())
}

/// A pipe whose both ends are close-on-exec: `(read end, write end)`.
///
/// Close-on-exec is set atomically (`pipe2`), so a child forked concurrently by another thread
/// never inherits the other process's pipe end (which would hold its EOF back).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Starts writeback of `len` bytes at `offset` of the file behind `fd` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a long streamed write then reaches the disk while
/// it is being received, instead of piling up dirty pages that throttle the writer and make the
/// final fsync wait for all of them. Not a durability guarantee (no metadata, no flush).
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(nix::libc::EINVAL));
    };
    // SAFETY: plain syscall on a borrowed, open descriptor; no memory is passed.
    let rc = unsafe { nix::libc::sync_file_range(fd.as_raw_fd(), offset, len, nix::libc::SYNC_FILE_RANGE_WRITE) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn append_with_appends_exactly_what_the_filler_wrote() {
        let mut buf = BytesMut::from(&b"ab:"[..]);
        append_with(&mut buf, 4, |spare| {
            base64_simd::STANDARD.encode(b"hi!", base64_simd::Out::from_uninit_slice(spare))
        });
        assert_eq!(&buf[..], b"ab:aGkh");
    }

    #[test]
    #[should_panic(expected = "other bytes")]
    fn append_with_refuses_a_filler_that_returns_less() {
        let mut buf = BytesMut::new();
        // The encoder writes 4 of the 6 bytes it is given: the other 2 stay uninitialised.
        append_with(&mut buf, 6, |spare| {
            base64_simd::STANDARD.encode(b"hi!", base64_simd::Out::from_uninit_slice(spare))
        });
    }

    #[test]
    fn writeback_starts_on_files_and_is_refused_on_pipes() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7; 8192]).unwrap();
        start_writeback(file.as_fd(), 0, 8192).unwrap();
        let (read, _write) = pipe().unwrap();
        assert_eq!(start_writeback(read.as_fd(), 0, 1).unwrap_err().raw_os_error(), Some(nix::libc::ESPIPE));
    }
}
