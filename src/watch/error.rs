//! [`WatchError`]: every way a watch can fail, at creation or later.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use nix::errno::Errno;

/// Why a watch could not be created, or why it ended.
///
/// Terminal errors ([`WatchError::WatchLimit`] met in a growing tree, [`WatchError::Moved`],
/// [`WatchError::QueueOverflow`], [`WatchError::SubscriberOverflow`]) end a stream after the
/// events queued before them, and are returned by every later `take_events` of a polling watcher.
/// That is why the enum is `Clone` (its OS errors are shared through `Arc`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum WatchError {
    /// The directory to watch does not exist.
    #[error("path {} not found", .path.display())]
    NotFound { path: PathBuf },
    /// The path to watch exists but is not a directory (after following symlinks).
    #[error("path {} not a directory", .path.display())]
    NotADirectory { path: PathBuf },
    /// The directory is on NFS, CIFS/SMB or FUSE and the caller did not allow network mounts:
    /// inotify does not see changes made by other machines there (envd's wording).
    #[error("cannot watch path on network filesystem: {}", .path.display())]
    NetworkMount { path: PathBuf },
    /// inotify_add_watch failed with ENOSPC (the kernel's `fs.inotify.max_user_watches`), or
    /// guestd's own `WatchConfig::max_watches` was reached. `path` is the directory that could
    /// not be watched; at creation nothing was watched, later the watcher ended here.
    #[error(
        "inotify watch limit reached at {} (fs.inotify.max_user_watches): the watch is incomplete",
        .path.display()
    )]
    WatchLimit {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    /// A directory created in a recursively watched tree could not be watched because the path
    /// the tree was watched under no longer leads to it: the watched directory, or one above it,
    /// was renamed (inotify does not report renames above a watched directory) or removed.
    /// `path` is the stale path of the new directory.
    #[error(
        "cannot watch new directory {}: the watched directory or one above it was moved or removed; watch it again at its new path",
        .path.display()
    )]
    Moved { path: PathBuf },
    /// The kernel's inotify queue (`fs.inotify.max_queued_events`) overflowed: events were lost
    /// for every watcher of this agent, so each one ends with this error.
    #[error(
        "inotify event queue overflowed (fs.inotify.max_queued_events) while watching {}: events were lost",
        .path.display()
    )]
    QueueOverflow { path: PathBuf },
    /// This watcher's own queue filled up because its client did not take events fast enough.
    /// Only this watcher ends; the events queued before the overflow are still delivered.
    #[error("watcher on {} fell behind by more than {capacity} events: events were lost", .path.display())]
    SubscriberOverflow { path: PathBuf, capacity: usize },
    /// No polling watcher with this id: never created, removed, or dropped after being idle.
    #[error("watcher with id {id} not found")]
    WatcherNotFound { id: String },
    /// The number of polling watchers is at its limit (`WatchConfig::max_polling_watchers`).
    #[error("too many watchers: at most {limit} polling watchers may exist at once")]
    TooManyWatchers { limit: usize },
    /// The shared inotify instance or its reader thread could not be created (e.g. EMFILE from
    /// `fs.inotify.max_user_instances`).
    #[error("starting the directory watcher")]
    Init {
        #[source]
        source: Arc<io::Error>,
    },
    /// Any other OS error, with the operation and the path it failed on.
    #[error("{op} {}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
}

impl WatchError {
    pub(super) fn io(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        WatchError::Io { op, path: path.into(), source: Arc::new(source.into()) }
    }
}
