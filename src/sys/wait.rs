//! `waitpid(2)` with the raw status decoded, a `waitid(2)` peek at an ended child, and `pidfd_open(2)`.
//!
//! We call libc directly rather than `nix::sys::wait::waitpid`: nix converts the status into its
//! `Signal` enum and returns `EINVAL` for signals it has no variant for (real-time signals),
//! after the child has already been reaped, which would lose the exit status for good.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use nix::libc;

/// How a reaped child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitStatus {
    /// `WIFEXITED`: the child called `exit(code)`.
    Exited(i32),
    /// `WIFSIGNALED`: the child was killed by `signal`.
    Signaled { signal: i32, core_dumped: bool },
}

/// Non-blocking `waitpid(pid, WNOHANG)`: `Ok(None)` while the child is still running.
pub fn try_wait(pid: i32) -> io::Result<Option<WaitStatus>> {
    loop {
        let mut raw: libc::c_int = 0;
        // SAFETY: `raw` is a live local the kernel writes the status into; WNOHANG never blocks.
        let rc = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc == 0 {
            return Ok(None);
        }
        return Ok(decode(raw));
    }
}

/// Non-blocking `waitid(P_ALL, WEXITED | WNOWAIT)`: the pid of an ended child, left unreaped (a
/// later `waitpid` of that pid collects it). `Ok(None)` when none has ended; `ECHILD` when there
/// are no children.
pub fn peek_ended() -> io::Result<Option<i32>> {
    loop {
        // SAFETY: all-zero is a valid siginfo_t (plain integers and unions of them).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live local the kernel fills; WNOHANG never blocks.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid succeeded, so `info` is a SIGCHLD siginfo (si_pid 0 when none ended).
        let pid = unsafe { info.si_pid() };
        return Ok((pid != 0).then_some(pid));
    }
}

/// Without WUNTRACED/WCONTINUED only exits and signal deaths are reported; anything else would be
/// a kernel surprise and is treated as "not ended".
fn decode(raw: libc::c_int) -> Option<WaitStatus> {
    if libc::WIFEXITED(raw) {
        Some(WaitStatus::Exited(libc::WEXITSTATUS(raw)))
    } else if libc::WIFSIGNALED(raw) {
        Some(WaitStatus::Signaled { signal: libc::WTERMSIG(raw), core_dumped: libc::WCOREDUMP(raw) })
    } else {
        None
    }
}

/// `pidfd_open(pid, 0)` (Linux ≥ 5.3): a descriptor that becomes readable when `pid` exits, so an
/// event loop learns of the exit in the same `epoll_wait` as the child's pipes closing, without
/// waiting for SIGCHLD to travel through a signal handler and another thread.
///
/// The caller must know `pid` is its own unreaped child (else the number may name a stranger).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1; no memory is
    // passed.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(rc).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Resolves once the process behind `pidfd` has exited (the descriptor turns readable in the
/// current runtime's reactor). Panics outside a tokio runtime with I/O enabled; fails only if
/// the reactor cannot watch the descriptor.
pub async fn pidfd_exited(pidfd: OwnedFd) -> io::Result<()> {
    // SAFETY: `pidfd` moves into the AsyncFd, so the descriptor stays open and names the same
    // pidfd until the AsyncFd (and with it the registration) is dropped.
    let fd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
    fd.readable().await.map(drop)
}
