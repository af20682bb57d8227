//! PTY allocation and window sizes.
//!
//! We open the pair ourselves instead of calling `openpty(3)`: libc's `openpty` opens both ends
//! without `O_CLOEXEC`, and a child forked by another thread in that window would inherit the
//! slave, so this PTY's master would never see EIO (end of output) while that other child lives.
//! `posix_openpt` + `open(ptsname)` with `O_CLOEXEC` closes the window.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{OFlag, open};
use nix::pty::{posix_openpt, ptsname_r, unlockpt};
use nix::sys::stat::Mode;

/// Both ends of a freshly allocated PTY, close-on-exec.
pub struct PtyPair {
    /// The side guestd reads output from and writes input to.
    pub master: OwnedFd,
    /// The side that becomes the child's stdin/stdout/stderr and controlling terminal.
    pub slave: OwnedFd,
}

/// Allocates a PTY whose window is `cols` x `rows`.
pub fn open_pty(cols: u16, rows: u16) -> io::Result<PtyPair> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    // grantpt(3) is a no-op on Linux with devpts; unlockpt is what makes the slave openable.
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = open(name.as_str(), OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty())?;
    let master = OwnedFd::from(master);
    set_window_size(master.as_fd(), cols, rows)?;
    Ok(PtyPair { master, slave })
}

/// `TIOCSWINSZ` on a PTY master; the kernel sends SIGWINCH to the foreground process group.
pub fn set_window_size(master: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let size = nix::libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which points to a live,
    // initialised local for the duration of the call; `master` is an open descriptor.
    let rc = unsafe { nix::libc::ioctl(master.as_raw_fd(), nix::libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TIOCGWINSZ`: the current window size as `(cols, rows)` (either side of the PTY).
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    let mut size = nix::libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` through the pointer, which points to a live
    // local of exactly that type; `fd` is an open descriptor.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCGWINSZ, &mut size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((size.ws_col, size.ws_row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slave_sees_the_requested_and_resized_window() {
        let pair = open_pty(100, 30).unwrap();
        assert_eq!(window_size(pair.slave.as_fd()).unwrap(), (100, 30));
        set_window_size(pair.master.as_fd(), 120, 50).unwrap();
        assert_eq!(window_size(pair.slave.as_fd()).unwrap(), (120, 50));
    }
}
