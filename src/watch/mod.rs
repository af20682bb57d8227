//! Directory watches: envd's `WatchDir` stream and its polling watchers
//! (`CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher`), rpc.md §5.6–5.7.
//!
//! What this module owns, and how it is concurrent:
//! - **One inotify instance** for every watch of the agent (`fs.inotify.max_user_instances` is
//!   128 per user, so one per RPC would run out), read by **one OS thread** (`reader.rs`).
//! - **The watch tree** (`tree.rs`, behind one std mutex): one kernel watch per directory, shared
//!   by every subscriber that sees it, re-linked on renames, removed when nobody needs it.
//!   Recursive watches cover directories created or moved in later, including what they already
//!   contain (synthetic CREATEs, each reported once).
//! - **One bounded mailbox per subscriber** (`mailbox.rs`). The reader never waits for a client:
//!   a full mailbox ends that subscriber alone with [`WatchError::SubscriberOverflow`]. Kernel
//!   queue overflow ([`WatchError::QueueOverflow`]) and watch-limit exhaustion
//!   ([`WatchError::WatchLimit`]) also end the affected subscribers with an explicit error,
//!   never silence.
//! - **Entries** for `include_entry` are stat-ed by the consumer when it takes the event, never
//!   by the shared reader, so an expensive stat (owner names, xattrs) cannot slow other watchers.
//!
//! Why the `inotify` syscalls (through `nix`) rather than the `notify` crate: notify 8's
//! recursive mode misses what `mkdir -p` creates before its watches land, reports the rename
//! triple, keeps stale paths for renamed directories, owns one path per watch (two subscribers
//! of one directory would unwatch each other), and drains into an unbounded channel; working
//! around all of that needs the tree above anyway, and the tree needs raw watch descriptors.
//!
//! Ops and names follow envd: one event per op in the fixed order CREATE, RENAME, CHMOD,
//! WRITE, REMOVE; names relative to the watched directory, `"."` for itself; a rename inside the
//! tree is RENAME(old) + CREATE(new); a deleted or moved root yields REMOVE/RENAME `"."` and the
//! watch goes quiet without ending. A directory renamed inside a recursive tree is
//! RENAME(old) + CREATE(new) + a CREATE for everything inside it, as envd's fsnotify fork does.
//!
//! Deliberate differences from envd:
//! - a slow client ends its own watch with an error instead of blocking envd's reader until the
//!   kernel queue overflows; polling watchers are bounded in buffer, number and idle time;
//! - a recursive watch of a path that is a symlink to a directory watches the target (envd's
//!   fork fails with "not a directory"); symlinks inside the tree are never followed;
//! - entries are stat-ed when the client takes the event, not when the kernel reports it;
//! - a CREATE found by the new-directory walk is not repeated when the kernel's own event for
//!   it arrives later (envd's fork can report it twice).
//!
//! Nothing here knows about proto, tonic, hyper or axum.

mod entry;
mod error;
mod mailbox;
mod polling;
mod reader;
mod tree;

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::inotify::{InitFlags, Inotify};
use nix::sys::statfs::{FsType, statfs};
use tokio::task::JoinHandle;

pub use self::entry::EntryInfo;
pub use self::error::WatchError;
use self::mailbox::{Mailbox, RawEvent};
use self::polling::Poller;
use self::tree::{SubId, Tree, Unwatchable};

/// Events a stream may hold that its client has not taken yet. Equal to the kernel's default
/// `fs.inotify.max_queued_events`, the whole backlog envd tolerated before its stream failed, so
/// a client is never cut off earlier than with envd. At ~100 bytes per event, at most ~2 MiB per
/// stream.
pub const STREAM_QUEUE_CAPACITY: usize = 16_384;

/// Events a polling watcher buffers between two takes (envd: unbounded). Same value and
/// reasoning as [`STREAM_QUEUE_CAPACITY`]: the SDK polls on demand, and a burst such as
/// unpacking an archive is a few events per file.
pub const POLL_BUFFER_CAPACITY: usize = 16_384;

/// A polling watcher nobody took events from for this long is dropped (envd: never). The SDK's
/// polling handle is driven by user code, so pauses of minutes are normal; ten minutes still
/// bounds what a forgotten watcher (a crashed client) holds: its buffer and its inotify watches.
pub const POLL_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// At most this many polling watchers at once (envd: unbounded). One per `watch_dir` call of a
/// sync SDK client; far above real use, and it caps their worst-case memory at
/// `MAX_POLLING_WATCHERS × POLL_BUFFER_CAPACITY` events.
pub const MAX_POLLING_WATCHERS: usize = 256;

/// guestd's own cap on watched directories, on top of the kernel's
/// `fs.inotify.max_user_watches` (which yields the same [`WatchError::WatchLimit`]). None by
/// default: the sandbox is the user's machine and a recursive watch of a large tree is
/// legitimate; operators (and tests) can lower it to leave watches for other programs.
pub const DEFAULT_MAX_WATCHES: usize = usize::MAX;

/// The reader thread sweeps idle polling watchers at least this often (and at most every
/// quarter of the idle timeout); polling calls also expire them, so this only frees resources
/// sooner.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// statfs `f_type` of filesystems where inotify misses changes made elsewhere; watching them is
/// refused unless the caller allows network mounts (envd's list).
const NETWORK_FS_MAGIC: [(u32, &str); 5] =
    [(0x6969, "nfs"), (0xFF53_4D42, "cifs"), (0x517B, "smb"), (0xFE53_4D42, "smb2"), (0x6573_5546, "fuse")];

/// How to watch a directory (WatchDirRequest / CreateWatcherRequest).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// Also watch every subdirectory, including ones created or moved in later.
    pub recursive: bool,
    /// Attach an [`EntryInfo`] to CREATE, WRITE and CHMOD events (when the path can be stat-ed).
    pub include_entry: bool,
    /// Allow NFS, CIFS/SMB and FUSE directories (inotify misses remote changes there).
    pub allow_network_mounts: bool,
}

/// Limits of one [`WatchManager`]; the defaults are the documented constants.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Per-stream queue, see [`STREAM_QUEUE_CAPACITY`].
    pub stream_queue: usize,
    /// Per-polling-watcher buffer, see [`POLL_BUFFER_CAPACITY`].
    pub poll_buffer: usize,
    /// See [`POLL_IDLE_TIMEOUT`].
    pub poll_idle_timeout: Duration,
    /// See [`MAX_POLLING_WATCHERS`].
    pub max_polling_watchers: usize,
    /// See [`DEFAULT_MAX_WATCHES`].
    pub max_watches: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            stream_queue: STREAM_QUEUE_CAPACITY,
            poll_buffer: POLL_BUFFER_CAPACITY,
            poll_idle_timeout: POLL_IDLE_TIMEOUT,
            max_polling_watchers: MAX_POLLING_WATCHERS,
            max_watches: DEFAULT_MAX_WATCHES,
        }
    }
}

impl WatchConfig {
    fn sweep_interval(&self) -> Duration {
        (self.poll_idle_timeout / 4).clamp(Duration::from_millis(10), MAX_SWEEP_INTERVAL)
    }
}

/// envd's event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Created, or moved in (also every entry found inside a directory created in a recursive
    /// tree).
    Create,
    /// Data modified (one per write(2)/truncate).
    Write,
    /// Deleted.
    Remove,
    /// Moved away (the old name of a rename).
    Rename,
    /// Metadata changed: mode, owner, times, xattrs.
    Chmod,
}

impl EventKind {
    /// envd attaches entries to these only.
    fn carries_entry(self) -> bool {
        matches!(self, EventKind::Create | EventKind::Write | EventKind::Chmod)
    }
}

/// One filesystem event, as WatchDir / GetWatcherEvents report it.
#[derive(Debug, Clone, PartialEq)]
pub struct FsEvent {
    /// Path relative to the watched directory (`sub/dir/file` in recursive watches), `"."` for
    /// the directory itself. Non-UTF-8 bytes are replaced with U+FFFD.
    pub name: String,
    pub kind: EventKind,
    /// With `include_entry`, for CREATE/WRITE/CHMOD, when the path could be stat-ed.
    pub entry: Option<EntryInfo>,
}

impl FsEvent {
    fn new(event: RawEvent, entry: Option<EntryInfo>) -> Self {
        let name = match event.rel.as_os_str().is_empty() {
            true => ".".to_owned(),
            false => event.rel.to_string_lossy().into_owned(),
        };
        FsEvent { name, kind: event.kind, entry }
    }
}

/// Owner of every directory watch of the agent. Cheap to clone; the reader thread stops when the
/// last clone and the last [`WatchStream`] are dropped.
#[derive(Clone)]
pub struct WatchManager {
    shared: Arc<Shared>,
    alive: Arc<Alive>,
}

/// State shared with the reader thread.
struct Shared {
    inotify: Inotify,
    tree: Mutex<Tree>,
    /// Polling watchers by id. Lock order: never held together with `tree`.
    pollers: Mutex<HashMap<String, Poller>>,
    config: WatchConfig,
    /// The reader thread's kernel thread id, once it runs (for tests: its wake-ups can be
    /// counted in `/proc`).
    reader_tid: AtomicI32,
}

/// Held by every handle; dropping the last one closes the socket the reader thread polls.
struct Alive {
    stop: UnixStream,
}

impl Alive {
    /// Wakes the reader thread to look again at whether it has polling watchers to sweep (it
    /// sleeps without a timeout while it has none). A byte, not EOF: the thread reads it and
    /// goes on. Best effort: if the socket is full, the thread is awake already.
    fn nudge(&self) {
        let _ = (&self.stop).write(&[0]);
    }
}

impl Shared {
    fn tree(&self) -> MutexGuard<'_, Tree> {
        self.tree.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pollers(&self) -> MutexGuard<'_, HashMap<String, Poller>> {
        self.pollers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WatchManager {
    /// A manager with the default limits: one inotify instance and its reader thread.
    pub fn new() -> Result<Self, WatchError> {
        Self::with_config(WatchConfig::default())
    }

    pub fn with_config(config: WatchConfig) -> Result<Self, WatchError> {
        let init = |e: io::Error| WatchError::Init { source: Arc::new(e) };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| init(e.into()))?;
        let (stop, stop_reader) = UnixStream::pair().map_err(init)?;
        let shared = Arc::new(Shared {
            inotify,
            tree: Mutex::new(Tree::new(config.max_watches)),
            pollers: Mutex::new(HashMap::new()),
            config,
            reader_tid: AtomicI32::new(0),
        });
        stop_reader.set_nonblocking(true).map_err(init)?;
        reader::spawn(shared.clone(), stop_reader).map_err(init)?;
        stop.set_nonblocking(true).map_err(init)?;
        Ok(WatchManager { shared, alive: Arc::new(Alive { stop }) })
    }

    /// WatchDir: validates `dir` (exists, is a directory after following symlinks, not a network
    /// mount unless allowed), watches it, and returns the stream of its events.
    ///
    /// Blocking (stat, statfs and, when recursive, a walk of the whole tree): call it from
    /// `spawn_blocking`. A directory that cannot be watched because of the watch limit fails the
    /// whole call with [`WatchError::WatchLimit`] and leaves nothing watched.
    #[tracing::instrument(skip(self, opts), fields(path = %dir.display(), recursive = opts.recursive))]
    pub fn watch(&self, dir: &Path, opts: WatchOptions) -> Result<WatchStream, WatchError> {
        let (sub, mailbox) = self.subscribe(dir, opts, self.shared.config.stream_queue)?;
        tracing::debug!("watch started");
        Ok(WatchStream {
            shared: self.shared.clone(),
            _alive: self.alive.clone(),
            sub,
            mailbox,
            root: dir.to_path_buf(),
            include_entry: opts.include_entry,
            pending: None,
            finished: false,
        })
    }

    /// How many directories are watched right now, over all watchers (for tests and metrics).
    pub fn watched_directories(&self) -> usize {
        self.shared.tree().watch_count()
    }

    fn subscribe(&self, dir: &Path, opts: WatchOptions, capacity: usize) -> Result<(SubId, Arc<Mailbox>), WatchError> {
        validate(dir, opts.allow_network_mounts)?;
        let shared = &self.shared;
        let mailbox = Arc::new(Mailbox::new(dir.to_path_buf(), capacity));
        let (sub, root) = shared.tree().subscribe(&shared.inotify, dir, opts.recursive, mailbox.clone())?;
        if opts.recursive {
            // One directory per lock: the reader keeps handling events of other watchers (and
            // of this one's already-watched part) during a long walk.
            let mut stack = vec![root];
            let mut missed = Unwatchable::default();
            while let Some(dir) = stack.pop() {
                let Some(path) = shared.tree().path_of(dir) else { continue };
                let names = tree::read_subdirs(&path);
                let mut tree = shared.tree();
                if !tree.is_subscribed(sub) {
                    // Ended meanwhile (e.g. kernel queue overflow): its mailbox holds the error.
                    break;
                }
                for name in names {
                    match tree.add_child(&shared.inotify, dir, &name, &mut missed) {
                        Ok(Some(child)) => stack.push(child),
                        Ok(None) => {}
                        Err(err) => {
                            tree.unsubscribe(&shared.inotify, sub);
                            return Err(err);
                        }
                    }
                }
            }
            missed.report();
        }
        Ok((sub, mailbox))
    }
}

/// The events of one WatchDir call. Dropping it removes the watch.
pub struct WatchStream {
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
    sub: SubId,
    mailbox: Arc<Mailbox>,
    root: PathBuf,
    include_entry: bool,
    /// An event taken from the mailbox whose entry is being stat-ed; kept across cancellation.
    pending: Option<Pending>,
    finished: bool,
}

struct Pending {
    event: RawEvent,
    entry: JoinHandle<Option<EntryInfo>>,
}

impl WatchStream {
    /// The next event; `Some(Err)` once when the watch ends with an error (after the events
    /// queued before it), then `None`. A watch whose root was deleted or moved stays pending
    /// forever (envd keeps such a stream open with keepalives only).
    ///
    /// Cancel-safe: dropping the future loses no event, so it can sit in a `select!` next to a
    /// keepalive timer.
    pub async fn next(&mut self) -> Option<Result<FsEvent, WatchError>> {
        if self.finished {
            return None;
        }
        loop {
            if let Some(pending) = &mut self.pending {
                let entry = (&mut pending.entry).await.ok().flatten();
                let pending = self.pending.take()?;
                return Some(Ok(FsEvent::new(pending.event, entry)));
            }
            match self.mailbox.pop() {
                Some(Ok(event)) if self.include_entry && event.kind.carries_entry() => {
                    let path = event_path(&self.root, &event.rel);
                    let entry = tokio::task::spawn_blocking(move || entry::stat(&path));
                    self.pending = Some(Pending { event, entry });
                }
                Some(Ok(event)) => return Some(Ok(FsEvent::new(event, None))),
                Some(Err(error)) => {
                    self.finished = true;
                    return Some(Err(error));
                }
                None => self.mailbox.changed().await,
            }
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.shared.tree().unsubscribe(&self.shared.inotify, self.sub);
        tracing::debug!(path = %self.root.display(), "watch stopped");
    }
}

/// Where an event happened, spelled under the watched path as the client gave it (envd's
/// `filepath.Join(watchPath, name)`): this is the `path` of its entry.
fn event_path(root: &Path, rel: &Path) -> PathBuf {
    match rel.as_os_str().is_empty() {
        true => root.to_path_buf(),
        false => root.join(rel),
    }
}

/// envd's checks, in envd's order: stat (following symlinks), then the filesystem type.
fn validate(dir: &Path, allow_network_mounts: bool) -> Result<(), WatchError> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(WatchError::NotFound { path: dir.to_path_buf() }),
        Err(e) => return Err(WatchError::io("stat", dir, e)),
        Ok(meta) if !meta.is_dir() => return Err(WatchError::NotADirectory { path: dir.to_path_buf() }),
        Ok(_) => {}
    }
    if !allow_network_mounts {
        let fs = statfs(dir).map_err(|e| WatchError::io("statfs", dir, e))?;
        if let Some(kind) = network_fs(fs.filesystem_type()) {
            tracing::debug!(path = %dir.display(), kind, "refusing to watch a network filesystem");
            return Err(WatchError::NetworkMount { path: dir.to_path_buf() });
        }
    }
    Ok(())
}

/// The name of a network filesystem type, `None` for local ones.
fn network_fs(fs_type: FsType) -> Option<&'static str> {
    // f_type is a signed or unsigned word depending on the libc; the magic numbers are 32-bit.
    #[allow(clippy::cast_possible_truncation, clippy::unnecessary_cast)]
    let magic = fs_type.0 as u32;
    NETWORK_FS_MAGIC.iter().find(|(m, _)| *m == magic).map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_filesystems_are_recognised_by_magic() {
        #[allow(clippy::useless_conversion)]
        let fs = |magic: u32| FsType(magic.into());
        assert_eq!(network_fs(fs(0x6969)), Some("nfs"));
        assert_eq!(network_fs(fs(0xFF53_4D42)), Some("cifs"));
        assert_eq!(network_fs(fs(0x517B)), Some("smb"));
        assert_eq!(network_fs(fs(0xFE53_4D42)), Some("smb2"));
        assert_eq!(network_fs(fs(0x6573_5546)), Some("fuse"));
        assert_eq!(network_fs(fs(0xEF53)), None, "ext4");
        assert_eq!(network_fs(fs(0x0102_1994)), None, "tmpfs");
    }

    #[test]
    fn local_directories_pass_validation() {
        let dir = tempfile::tempdir().unwrap();
        validate(dir.path(), false).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(validate(&file, false), Err(WatchError::NotADirectory { .. })));
        assert!(matches!(validate(&dir.path().join("nope"), true), Err(WatchError::NotFound { .. })));
    }

    /// How often the reader thread has slept and woken so far.
    fn reader_wakeups(m: &WatchManager) -> u64 {
        let tid = loop {
            match m.shared.reader_tid.load(std::sync::atomic::Ordering::Relaxed) {
                0 => std::thread::sleep(Duration::from_millis(1)),
                tid => break tid,
            }
        };
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let field = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).unwrap();
        field.trim().parse().unwrap()
    }

    #[test]
    fn the_reader_sleeps_while_idle_and_sweeps_only_while_polling_watchers_exist() {
        // A 40 ms idle timeout: the sweep would run every 10 ms.
        let m = WatchManager::with_config(WatchConfig {
            poll_idle_timeout: Duration::from_millis(40),
            ..WatchConfig::default()
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let before = reader_wakeups(&m);
        std::thread::sleep(Duration::from_millis(200));
        assert!(reader_wakeups(&m) <= before + 1, "the reader woke while nothing happened");

        let id = m.create_watcher(dir.path(), WatchOptions::default()).unwrap();
        let with_watcher = reader_wakeups(&m);
        std::thread::sleep(Duration::from_millis(200));
        assert!(reader_wakeups(&m) >= with_watcher + 3, "no sweeps while a polling watcher exists");
        // Idle for longer than its timeout, the watcher was swept by the reader itself.
        assert!(m.shared.pollers().is_empty());
        assert!(matches!(m.take_events(&id), Err(WatchError::WatcherNotFound { .. })));
        std::thread::sleep(Duration::from_millis(50));
        let swept = reader_wakeups(&m);
        std::thread::sleep(Duration::from_millis(200));
        assert!(reader_wakeups(&m) <= swept + 1, "the timer outlived the last polling watcher");
    }

    #[test]
    fn sweep_interval_follows_the_idle_timeout_within_bounds() {
        let config = |idle| WatchConfig { poll_idle_timeout: idle, ..WatchConfig::default() };
        assert_eq!(config(POLL_IDLE_TIMEOUT).sweep_interval(), MAX_SWEEP_INTERVAL);
        assert_eq!(config(Duration::from_millis(200)).sweep_interval(), Duration::from_millis(50));
        assert_eq!(config(Duration::ZERO).sweep_interval(), Duration::from_millis(10));
    }
}
