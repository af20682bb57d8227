//! The one reader of the shared inotify fd: an OS thread that reads events, hands them to the
//! tree (which fans them out into per-watcher mailboxes without ever waiting), and drops idle
//! polling watchers — with a timer only while there are any: otherwise it sleeps until an
//! event arrives or the last handle is gone.
//!
//! A plain thread rather than a tokio task: handling an event may read directories (a new
//! directory in a recursive tree is walked) and add watches, all blocking syscalls, and the
//! manager must work without a runtime. The thread ends when the last `WatchManager` clone and
//! the last `WatchStream` are gone: they share the write end of a socket pair whose read end the
//! thread polls next to the inotify fd.

use std::io::Read as _;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, Inotify, InotifyEvent};

use super::Shared;

/// The two halves of a rename (IN_MOVED_FROM, IN_MOVED_TO) are queued back to back, but one
/// read can end between them. When a batch ends with a directory's IN_MOVED_FROM and no
/// IN_MOVED_TO, wait this long for the rest before deciding it moved out of every watched
/// directory: a hit keeps the directory's watches (a miss costs dropping and re-adding them).
/// Microseconds would do; 1 ms is invisible to clients.
const MOVE_PAIR_WAIT: Duration = Duration::from_millis(1);

/// At most this many extra reads per batch while waiting for IN_MOVED_TO halves, so a burst of
/// directories moved out of the tree delays delivery by at most ~3 ms.
const MOVE_PAIR_READS: usize = 3;

/// After an unexpected read error (none is known to happen), pause this long so a persistent
/// one cannot spin the thread.
const READ_ERROR_BACKOFF: Duration = Duration::from_millis(100);

pub(super) fn spawn(shared: Arc<Shared>, stop: UnixStream) -> std::io::Result<()> {
    std::thread::Builder::new().name("guestd-watch".into()).spawn(move || run(&shared, &stop)).map(drop)
}

fn run(shared: &Shared, stop: &UnixStream) {
    shared.reader_tid.store(nix::unistd::gettid().as_raw(), std::sync::atomic::Ordering::Relaxed);
    let sweep_every = shared.config.sweep_interval();
    let mut last_sweep = Instant::now();
    loop {
        // The sweep timer runs only while there are polling watchers to sweep (creating one
        // wakes this thread); otherwise it sleeps until an event or the end.
        let timeout = if shared.pollers().is_empty() {
            PollTimeout::NONE
        } else {
            PollTimeout::try_from(sweep_every).unwrap_or(PollTimeout::MAX)
        };
        let mut fds =
            [PollFd::new(shared.inotify.as_fd(), PollFlags::POLLIN), PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => {
                tracing::error!(%errno, "polling the inotify fd failed");
                std::thread::sleep(READ_ERROR_BACKOFF);
            }
        }
        if fds[1].any().unwrap_or(false) && !take_nudges(stop) {
            tracing::debug!("last watch handle dropped; reader exits");
            return;
        }
        if fds[0].any().unwrap_or(false) {
            drain(shared);
        }
        if last_sweep.elapsed() >= sweep_every {
            shared.expire_idle(Instant::now());
            last_sweep = Instant::now();
        }
    }
}

/// Reads the nudges waiting on the stop socket; false once it reached EOF (every handle gone).
fn take_nudges(stop: &UnixStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match (&*stop).read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // WouldBlock: every nudge taken. Any other error: keep serving, as before.
            Err(_) => return true,
        }
    }
}

/// Reads and handles events until the kernel queue is empty.
fn drain(shared: &Shared) {
    loop {
        let mut batch = match shared.inotify.read_events() {
            Ok(batch) => batch,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                // Every event queued before our last directory walk has been handled.
                shared.tree().expire_synthesized(Instant::now());
                return;
            }
            Err(errno) => {
                tracing::error!(%errno, "reading inotify events failed");
                std::thread::sleep(READ_ERROR_BACKOFF);
                return;
            }
        };
        complete_moves(&shared.inotify, &mut batch);
        shared.tree().handle_batch(&shared.inotify, &batch);
    }
}

fn complete_moves(ino: &Inotify, batch: &mut Vec<InotifyEvent>) {
    for _ in 0..MOVE_PAIR_READS {
        if !has_unpaired_dir_move(batch) {
            return;
        }
        let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(MOVE_PAIR_WAIT).unwrap_or(PollTimeout::ZERO);
        if !matches!(poll(&mut fds, timeout), Ok(n) if n > 0) {
            return;
        }
        match ino.read_events() {
            Ok(more) => batch.extend(more),
            Err(_) => return,
        }
    }
}

fn has_unpaired_dir_move(batch: &[InotifyEvent]) -> bool {
    batch.iter().enumerate().any(|(i, e)| {
        e.mask.contains(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_ISDIR)
            && !batch[i + 1..].iter().any(|t| t.cookie == e.cookie && t.mask.contains(AddWatchFlags::IN_MOVED_TO))
    })
}
