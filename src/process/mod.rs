//! Process management: spawning commands as a user, streaming their output to any number of
//! subscribers, delivering input, signals and PTY resizes, and remembering how they ended.
//!
//! What this module owns, and how it is concurrent:
//! - **wait()**: only [`reaper`] waits for registered children (its SIGCHLD-driven thread, or a
//!   supervisor whose child's pidfd turned readable, through the same module and lock). Each
//!   process gets a oneshot that resolves with its status. `tokio::process` is banned because its
//!   own SIGCHLD waiter would race the reaper. (A child whose exec failed was never registered;
//!   the spawner collects it.)
//! - **Per process, one or two tokio tasks**, tracked by the manager's `TaskTracker`: a
//!   supervisor that drives the output pumps (pipe/PTY -> output log, one per stream) and turns
//!   "leader reaped + output drained" into the End event, and, with a time limit, a task that
//!   SIGKILLs the group when it expires. RPC handlers never touch fds directly; they call the
//!   manager.
//! - **Output fan-out** lives in `output`: a bounded log per process with one cursor per
//!   subscriber (see its docs for the eviction policy).
//! - **Cgroups, process groups**: every child starts in a cgroup of its own where the machine
//!   allows it ([`cgroup`]), and signals, the timeout and shutdown go to everything in it.
//!   Every child is also its own session and group (pgid == pid): without a cgroup, signals go
//!   to the group with `kill(-pgid)`.
//! - **Tables**: live processes (pid -> process), displaced ones (their leader was reaped and the
//!   kernel gave its pid to a newer command while a daemon they started keeps their output
//!   open) and recently finished ones (pid, tag, status) sit behind one std mutex that is never
//!   held across an await. A finished process leaves the
//!   live table before its End event is published, so a caller that saw End never finds it in
//!   [`ProcessManager::list`].
//!
//! Nothing here knows about proto, tonic, hyper or axum: the RPC adapter maps these types.

pub mod cgroup;
mod io;
mod output;
pub mod reaper;
mod spawn;
mod status;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use nix::sys::signal::Signal as NixSignal;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::cgroup::{Cgroup, CgroupSource};
use self::io::{Input, InputError};
pub use self::io::{PIPE_SIZE, READ_CHUNK};
pub use self::output::Subscription;
use self::output::{Limits, OutputLog, Stream};
use self::reaper::Exit;
use self::spawn::ParentIo;
use crate::paths::PathError;
use crate::sys::fd::AsyncRawFd;
use crate::sys::wait::WaitStatus;
use crate::users::User;

/// At most this many finished processes are remembered (oldest forgotten first). At guestd's
/// 60 s retention (envd keeps 30 s) this is ~68 process exits per second before anything is
/// dropped early; each entry is a few hundred bytes.
const MAX_RETAINED: usize = 4096;

/// Spawns that may wait for their exec at once. Each holds a blocking-pool thread (tokio allows
/// 512) for as long as its exec takes, which is forever on a hung mount: a client retrying a
/// command there must not take every thread the file service and other commands need. Healthy
/// spawns take well under a millisecond, so only hung ones ever count up to this.
pub const MAX_SPAWNS_IN_FLIGHT: usize = 128;

/// One spawn counted in [`Inner::spawning`] until dropped (also when its task never ran).
struct Starting(Arc<Inner>);

impl Starting {
    fn begin(inner: &Arc<Inner>) -> Option<Starting> {
        let before = inner.spawning.fetch_add(1, Ordering::SeqCst);
        let starting = Starting(Arc::clone(inner));
        (before < MAX_SPAWNS_IN_FLIGHT).then_some(starting)
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.0.spawning.fetch_sub(1, Ordering::SeqCst);
    }
}

/// After a SIGTERM/SIGKILL sent through [`ProcessManager::signal`] or the timeout, once the group
/// leader is reaped: how long the pumps may keep reading what is already buffered before End is
/// sent anyway. Short because everything the leader wrote is already in the pipe; the bound only
/// matters when a descendant that escaped the group keeps writing.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// During shutdown, how long to wait after SIGKILL for supervisors to publish End. SIGKILLed
/// processes are reaped at once unless stuck in uninterruptible sleep, which we do not wait out.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Orders processes by start, for "newest with this tag".
static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

/// Settings shared by every process of one manager.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// $PATH given to every child (guestd's own PATH at startup, or the standard default when unset).
    pub path_env: String,
    /// How long a finished process stays reachable by Connect (>= 30 s).
    pub retention: Duration,
    /// Where each command gets a cgroup of its own (if anywhere: else commands share guestd's).
    pub cgroups: Arc<CgroupSource>,
}

/// How an RPC names a process.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    Pid(u32),
    Tag(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Pid(pid) => write!(f, "pid {pid}"),
            Selector::Tag(tag) => write!(f, "tag '{tag}'"),
        }
    }
}

/// Terminal window size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// The signals a client may send (envd accepts exactly these two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn to_nix(self) -> NixSignal {
        match self {
            Signal::Term => NixSignal::SIGTERM,
            Signal::Kill => NixSignal::SIGKILL,
        }
    }
}

/// The command exactly as the client asked for it; List echoes it back unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandSpec {
    pub cmd: String,
    pub args: Vec<String>,
    /// Request envs, in request order.
    pub envs: Vec<(String, String)>,
    /// Raw, unresolved.
    pub cwd: Option<String>,
}

/// Everything needed to start one process.
#[derive(Clone, Debug)]
pub struct StartSpec {
    pub command: CommandSpec,
    pub user: User,
    /// Sandbox-wide default workdir (POST /init), used only when command.cwd is None or "".
    pub default_workdir: Option<std::path::PathBuf>,
    /// Sandbox-wide env vars (POST /init), applied after PATH/HOME/USER/LOGNAME and before command.envs.
    pub sandbox_env: Vec<(String, String)>,
    pub pty: Option<PtySize>,
    pub tag: Option<String>,
    /// true: stdin is a pipe (SendInput/CloseStdin); false: /dev/null. Ignored with a PTY.
    pub stdin: bool,
    /// Process lifetime: when it expires the whole process group gets SIGKILL. `Some(0)` means
    /// no limit (the RPC layers never pass it: a zero deadline has passed before the call
    /// begins, see `connect::deadline`).
    pub timeout: Option<Duration>,
    /// Keep output for late subscribers: every `connect` replays from the oldest retained byte
    /// (the last [`output::REPLAY_TAIL`] bytes) instead of only new output. Used for the boot
    /// start command, whose output a host reads after the fact.
    pub replay: bool,
}

/// One entry of [`ProcessManager::list`].
#[derive(Clone, Debug)]
pub struct ProcessSummary {
    pub pid: u32,
    pub tag: Option<String>,
    pub command: CommandSpec,
}

/// What a subscriber receives, in order: output chunks, then exactly one End.
#[derive(Clone, Debug)]
pub enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    End(ExitStatus),
}

/// How a process ended, in envd's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit status; -1 when killed by a signal.
    pub exit_code: i32,
    /// WIFEXITED.
    pub exited: bool,
    /// Go `ProcessState.String()`: "exit status 0", "signal: killed", "signal: terminated (core dumped)".
    pub status: String,
    /// None for exit 0; else the same text as `status`.
    pub error: Option<String>,
}

/// A subscription ended abnormally.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// This subscriber read too slowly and was cut off so that others (and the process) could
    /// go on; see `output` for the policy.
    #[error("output stream of pid {pid} evicted: client fell {behind_bytes} bytes behind")]
    Evicted { pid: u32, behind_bytes: u64 },
}

/// A process and a subscription to its output.
pub struct Attached {
    pub pid: u32,
    pub events: Subscription,
}

/// Why a process operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// No live (or recently finished, for Connect) process matches.
    #[error("process with {0} not found")]
    NotFound(Selector),
    /// The resolved working directory does not exist.
    #[error("cwd '{cwd}' does not exist")]
    CwdMissing { cwd: String },
    /// The resolved working directory is a file (or other non-directory).
    #[error("cwd '{cwd}' is not a directory")]
    CwdNotDirectory { cwd: String },
    /// The cwd could not be resolved (E2B path rules).
    #[error(transparent)]
    Path(#[from] PathError),
    /// No executable of that name in the child's PATH (or at that path).
    #[error("executable '{cmd}' not found in PATH")]
    ExecutableNotFound { cmd: String, path_env: String },
    /// The user lacks a permission the spawn needs (`what`: e.g. "execute '/x'").
    #[error("permission denied: user '{user}' cannot {what}")]
    PermissionDenied { what: String, user: String },
    /// fork/exec (or pipe creation) failed.
    #[error("failed to start '{cmd}'")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    /// guestd is stopping: nothing new starts (a process whose spawn raced the shutdown is
    /// killed).
    #[error("cannot start '{cmd}': guestd is shutting down")]
    ShuttingDown { cmd: String },
    /// [`MAX_SPAWNS_IN_FLIGHT`] spawns are still waiting for their exec.
    #[error(
        "cannot start '{cmd}': {limit} commands are still starting (their executables or working directories may be on a hung mount)"
    )]
    TooManyStarting { cmd: String, limit: usize },
    /// PTY allocation failed.
    #[error("failed to allocate a PTY")]
    Pty(#[source] std::io::Error),
    /// PTY input/resize for a process started without a PTY.
    #[error("process {pid} has no PTY: write to stdin instead")]
    NotPty { pid: u32 },
    /// Stdin input/close for a process started with a PTY.
    #[error("process {pid} has a PTY: write to the pty instead (to close its input, send Ctrl+D (0x04))")]
    IsPty { pid: u32 },
    /// Stdin was not requested at start, or was closed.
    #[error("stdin of process {pid} is not enabled or already closed")]
    StdinClosed { pid: u32 },
    /// Writing input failed (e.g. the child closed its end: broken pipe).
    #[error("writing input to process {pid}")]
    Write {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// kill(2) failed.
    #[error("sending a signal to process {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// TIOCSWINSZ failed.
    #[error("resizing the PTY of process {pid}")]
    Resize {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Spawns and tracks processes. Cheap to clone; all clones share one table.
#[derive(Clone)]
pub struct ProcessManager {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ManagerConfig,
    limits: Limits,
    table: Mutex<Table>,
    tasks: TaskTracker,
    closing: AtomicBool,
    /// Spawns on the blocking pool that have not returned (see [`MAX_SPAWNS_IN_FLIGHT`]).
    spawning: AtomicUsize,
}

#[derive(Default)]
struct Table {
    live: HashMap<u32, Arc<Proc>>,
    /// Running processes whose pid a newer process has taken: their leader was reaped while a
    /// descendant that left the group (a daemon) keeps their output open, and the kernel reused
    /// the pid. Still listed, found by tag and stopped at shutdown; by pid, the newer one wins.
    displaced: Vec<Arc<Proc>>,
    /// In finish order; all share one retention, so expiry order is the same.
    finished: VecDeque<Finished>,
}

struct Finished {
    pid: u32,
    tag: Option<String>,
    status: ExitStatus,
    expires: Instant,
}

/// One live process.
struct Proc {
    seq: u64,
    tag: Option<String>,
    command: CommandSpec,
    /// `connect` replays retained output instead of starting at the tail.
    replay: bool,
    log: Arc<OutputLog>,
    input: ProcInput,
    /// How many times we signalled the group: a leader killed after a signal from us, or a
    /// signal sent once the leader is gone, publishes End without waiting for escaped writers.
    signals: tokio::sync::watch::Sender<u64>,
    /// End has been published.
    ended: CancellationToken,
    /// The command's own cgroup: signals go to every process in it. None: to the process group.
    cgroup: Option<Cgroup>,
    /// The leader's registration with the reaper: its pid, which is also the process group's id.
    leader: reaper::Leader,
}

enum ProcInput {
    Pipe(Input),
    Pty(Input),
}

impl ProcInput {
    fn close(&self) {
        match self {
            ProcInput::Pipe(input) | ProcInput::Pty(input) => input.close(),
        }
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.leader.pid
    }

    /// Signals every process of the command: its cgroup, or else its process group. Counts the
    /// signal first, so the End follows the leader's death even if a descendant keeps the pipes
    /// open.
    fn kill(&self, signal: Signal) -> std::io::Result<()> {
        self.signals.send_modify(|n| *n += 1);
        match &self.cgroup {
            Some(cgroup) => cgroup.signal(signal.to_nix()),
            None => reaper::signal_group(self.leader, signal.to_nix()),
        }
    }
}

impl Table {
    fn find_live(&self, sel: &Selector) -> Option<&Arc<Proc>> {
        match sel {
            Selector::Pid(pid) => self.live.get(pid),
            Selector::Tag(tag) => {
                self.running().filter(|p| p.tag.as_deref() == Some(tag.as_str())).max_by_key(|p| p.seq)
            }
        }
    }

    /// Every process that has not ended: the live table and the displaced ones.
    fn running(&self) -> impl Iterator<Item = &Arc<Proc>> {
        self.live.values().chain(&self.displaced)
    }

    fn prune(&mut self, now: Instant) {
        while self.finished.front().is_some_and(|f| f.expires <= now) {
            self.finished.pop_front();
        }
    }

    fn find_finished(&mut self, sel: &Selector, now: Instant) -> Option<&Finished> {
        self.prune(now);
        self.finished.iter().rev().find(|f| match sel {
            Selector::Pid(pid) => f.pid == *pid,
            Selector::Tag(tag) => f.tag.as_deref() == Some(tag.as_str()),
        })
    }
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn find(&self, sel: &Selector) -> Result<Arc<Proc>, ProcessError> {
        self.table().find_live(sel).cloned().ok_or_else(|| ProcessError::NotFound(sel.clone()))
    }

    /// Moves `proc` from the live table to the finished one.
    fn retire(&self, proc: &Arc<Proc>, status: ExitStatus) {
        let now = Instant::now();
        let mut table = self.table();
        // The pid may already belong to a newer process (reaped pids are reusable).
        if table.live.get(&proc.pid()).is_some_and(|p| Arc::ptr_eq(p, proc)) {
            table.live.remove(&proc.pid());
        }
        table.displaced.retain(|p| !Arc::ptr_eq(p, proc));
        table.prune(now);
        if table.finished.len() >= MAX_RETAINED {
            table.finished.pop_front();
        }
        table.finished.push_back(Finished {
            pid: proc.pid(),
            tag: proc.tag.clone(),
            status,
            expires: now + self.cfg.retention,
        });
    }
}

impl ProcessManager {
    pub fn new(cfg: ManagerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                limits: Limits::default(),
                table: Mutex::new(Table::default()),
                tasks: TaskTracker::new(),
                closing: AtomicBool::new(false),
                spawning: AtomicUsize::new(0),
            }),
        }
    }

    /// Spawns and registers the process; the returned subscription is attached BEFORE the child
    /// runs, so the starter sees every byte. Spawn failure -> Err, nothing registered.
    ///
    /// The spawn runs on the blocking pool: it stats the cwd and the `PATH` directories, and its
    /// vfork waits for the exec, each of which can hang on a stuck mount (FUSE, NFS) where a
    /// runtime worker must never wait. Once started it completes even if the caller goes away,
    /// so a client that vanishes mid-spawn leaves a listed, supervised process.
    #[tracing::instrument(skip_all, fields(cmd = %spec.command.cmd, user = %spec.user.name, pid))]
    pub async fn start(&self, spec: StartSpec) -> Result<Attached, ProcessError> {
        let this = self.clone();
        let span = tracing::Span::current();
        let cmd = spec.command.cmd.clone();
        let Some(starting) = Starting::begin(&self.inner) else {
            return Err(ProcessError::TooManyStarting { cmd, limit: MAX_SPAWNS_IN_FLIGHT });
        };
        tokio::task::spawn_blocking(move || {
            let _starting = starting;
            span.in_scope(|| this.start_blocking(spec))
        })
        .await
        .map_err(|join| ProcessError::Spawn { cmd, source: std::io::Error::other(join) })?
    }

    fn start_blocking(&self, spec: StartSpec) -> Result<Attached, ProcessError> {
        if self.inner.closing.load(Ordering::SeqCst) {
            return Err(ProcessError::ShuttingDown { cmd: spec.command.cmd });
        }
        let limits = if spec.replay { self.inner.limits.with_replay_tail() } else { self.inner.limits };
        let log = OutputLog::new(limits);
        let events = log.subscribe_at_tail();
        let launched = spawn::launch(&self.inner.cfg.path_env, self.inner.cfg.cgroups.get(), &spec)?;
        let pid = launched.pid;
        tracing::Span::current().record("pid", pid);
        log.set_pid(pid);

        let (input, pumps) = match launched.io {
            ParentIo::Pipes { stdin, stdout, stderr } => {
                (ProcInput::Pipe(Input::new(stdin)), vec![(stdout, Stream::Stdout), (stderr, Stream::Stderr)])
            }
            ParentIo::Pty { master } => {
                (ProcInput::Pty(Input::new(Some(Arc::clone(&master)))), vec![(master, Stream::Pty)])
            }
        };
        let proc = Arc::new(Proc {
            seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
            tag: spec.tag,
            command: spec.command,
            replay: spec.replay,
            log: Arc::clone(&log),
            input,
            signals: tokio::sync::watch::Sender::new(0),
            ended: CancellationToken::new(),
            cgroup: launched.cgroup,
            leader: launched.exit.leader(),
        });
        let closing = {
            let mut table = self.inner.table();
            if let Some(earlier) = table.live.insert(pid, Arc::clone(&proc)) {
                tracing::debug!(pid, earlier_seq = earlier.seq, "pid reused while an earlier process's output is open");
                table.displaced.push(earlier);
            }
            // Read under the lock `shutdown` lists the processes under: if it is set now, that
            // list may have been taken before this insert, and nobody else would end this one.
            self.inner.closing.load(Ordering::SeqCst)
        };
        tracing::debug!("process started");

        let drain = CancellationToken::new();
        let pumps = futures_util::future::join_all(
            pumps.into_iter().map(|(fd, stream)| io::pump(fd, stream, Arc::clone(&log), drain.clone(), pid)),
        );
        if let Some(limit) = spec.timeout.filter(|t| !t.is_zero()) {
            self.inner.tasks.spawn(enforce_timeout(Arc::clone(&proc), limit));
        }
        self.inner.tasks.spawn(supervise(Arc::clone(&self.inner), Arc::clone(&proc), launched.exit, pumps, drain));
        if closing {
            if let Err(error) = proc.kill(Signal::Kill) {
                tracing::debug!(pid, %error, "SIGKILL of a process started during shutdown failed");
            }
            return Err(ProcessError::ShuttingDown { cmd: proc.command.cmd.clone() });
        }
        Ok(Attached { pid, events })
    }

    /// Live process: subscribe at the current tail (only output produced from now on, like envd).
    /// Finished within `retention`: a subscription that yields just End. Else NotFound.
    /// Tag lookup: the newest live process with that tag (then the newest retained one).
    pub fn connect(&self, sel: &Selector) -> Result<Attached, ProcessError> {
        let mut table = self.inner.table();
        if let Some(proc) = table.find_live(sel) {
            let events = if proc.replay { proc.log.subscribe_from_oldest() } else { proc.log.subscribe_at_tail() };
            return Ok(Attached { pid: proc.pid(), events });
        }
        if let Some(finished) = table.find_finished(sel, Instant::now()) {
            return Ok(Attached { pid: finished.pid, events: Subscription::ended(finished.status.clone()) });
        }
        Err(ProcessError::NotFound(sel.clone()))
    }

    /// Processes that have not ended, oldest first (a displaced one shares its pid with a newer
    /// process).
    pub fn list(&self) -> Vec<ProcessSummary> {
        let table = self.inner.table();
        let mut procs: Vec<&Arc<Proc>> = table.running().collect();
        procs.sort_by_key(|p| p.seq);
        procs
            .into_iter()
            .map(|p| ProcessSummary { pid: p.pid(), tag: p.tag.clone(), command: p.command.clone() })
            .collect()
    }

    /// Writes all of `data` to the process's stdin pipe, waiting while the pipe is full.
    pub async fn write_stdin(&self, sel: &Selector, data: Bytes) -> Result<(), ProcessError> {
        let proc = self.inner.find(sel)?;
        let pid = proc.pid();
        match &proc.input {
            ProcInput::Pty(_) => Err(ProcessError::IsPty { pid }),
            ProcInput::Pipe(input) => input.write(&data).await.map_err(|e| match e {
                InputError::Closed => ProcessError::StdinClosed { pid },
                InputError::Io(source) => ProcessError::Write { pid, source },
            }),
        }
    }

    /// Writes all of `data` to the PTY master (the terminal's keyboard side).
    pub async fn write_pty(&self, sel: &Selector, data: Bytes) -> Result<(), ProcessError> {
        let proc = self.inner.find(sel)?;
        let pid = proc.pid();
        match &proc.input {
            ProcInput::Pipe(_) => Err(ProcessError::NotPty { pid }),
            ProcInput::Pty(input) => input.write(&data).await.map_err(|e| match e {
                // Only after the process ended and its terminal was closed.
                InputError::Closed => ProcessError::NotFound(sel.clone()),
                InputError::Io(source) => ProcessError::Write { pid, source },
            }),
        }
    }

    /// Closes the stdin pipe (the child reads EOF). Idempotent, also for `stdin: false`.
    pub fn close_stdin(&self, sel: &Selector) -> Result<(), ProcessError> {
        let proc = self.inner.find(sel)?;
        match &proc.input {
            ProcInput::Pty(_) => Err(ProcessError::IsPty { pid: proc.pid() }),
            ProcInput::Pipe(input) => {
                input.close();
                Ok(())
            }
        }
    }

    /// Signals the whole command (its cgroup, or its process group); afterwards End is emitted as
    /// soon as the leader is reaped, even if a descendant that escaped still holds the pipes.
    pub fn signal(&self, sel: &Selector, sig: Signal) -> Result<(), ProcessError> {
        let proc = self.inner.find(sel)?;
        tracing::debug!(pid = proc.pid(), ?sig, "signalling every process of the command");
        proc.kill(sig).map_err(|source| ProcessError::Signal { pid: proc.pid(), source })
    }

    /// Sets the PTY window size (the foreground group gets SIGWINCH).
    pub fn resize(&self, sel: &Selector, size: PtySize) -> Result<(), ProcessError> {
        let proc = self.inner.find(sel)?;
        let pid = proc.pid();
        let ProcInput::Pty(input) = &proc.input else {
            return Err(ProcessError::NotPty { pid });
        };
        let master: Arc<AsyncRawFd> = input.current().ok_or_else(|| ProcessError::NotFound(sel.clone()))?;
        crate::sys::pty::set_window_size(std::os::fd::AsFd::as_fd(&*master), size.cols, size.rows)
            .map_err(|source| ProcessError::Resize { pid, source })
    }

    /// SIGTERM every live group, wait up to `grace` for them to end, SIGKILL the rest.
    /// Starts are refused from now on.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let procs: Vec<Arc<Proc>> = self.inner.table().running().cloned().collect();
        tracing::info!(count = procs.len(), "stopping processes");
        for proc in &procs {
            if let Err(error) = proc.kill(Signal::Term) {
                tracing::debug!(pid = proc.pid(), %error, "SIGTERM failed");
            }
        }
        let all_ended = || async {
            for proc in &procs {
                proc.ended.cancelled().await;
            }
        };
        if tokio::time::timeout(grace, all_ended()).await.is_err() {
            for proc in procs.iter().filter(|p| !p.ended.is_cancelled()) {
                tracing::warn!(pid = proc.pid(), "still running after the grace period: SIGKILL");
                if let Err(error) = proc.kill(Signal::Kill) {
                    tracing::debug!(pid = proc.pid(), %error, "SIGKILL failed");
                }
            }
            let _ = tokio::time::timeout(KILL_WAIT, all_ended()).await;
        }
        self.inner.tasks.close();
        if tokio::time::timeout(KILL_WAIT, self.inner.tasks.wait()).await.is_err() {
            tracing::warn!("process tasks still running after shutdown");
        }
        if let Some(cgroups) = self.inner.cfg.cgroups.get() {
            cgroups.sweep();
        }
    }
}

/// SIGKILLs the group when the process's lifetime runs out.
async fn enforce_timeout(proc: Arc<Proc>, limit: Duration) {
    tokio::select! {
        () = proc.ended.cancelled() => {}
        () = tokio::time::sleep(limit) => {
            tracing::info!(pid = proc.pid(), ?limit, "process timed out: killing its group");
            if let Err(error) = proc.kill(Signal::Kill) {
                tracing::debug!(pid = proc.pid(), %error, "timeout SIGKILL failed");
            }
        }
    }
}

/// Runs the output pumps and publishes End once the leader is reaped and the output is
/// complete: after both pumps hit EOF, or, when we signalled the group, after a short drain of
/// what is already buffered. One task per process: the pumps and the wait for the exit share it,
/// so a command's whole life is woken on one worker.
async fn supervise(
    inner: Arc<Inner>,
    proc: Arc<Proc>,
    exit: Exit,
    pumps: impl Future<Output = Vec<()>> + Send,
    drain: CancellationToken,
) {
    // A pump that panicked (a bug) must not take the End event down with it: the subscribers
    // and shutdown wait for End. It is logged and counts as finished.
    let pid = proc.pid();
    let mut pumps = pin!(AssertUnwindSafe(pumps).catch_unwind().map(move |done| {
        if done.is_err() {
            tracing::error!(pid, "an output pump panicked; the output may be incomplete");
        }
    }));
    let mut exit = pin!(exit.wait());
    let mut pumps_done = false;
    let outcome = loop {
        tokio::select! {
            outcome = &mut exit => break outcome,
            _ = &mut pumps, if !pumps_done => pumps_done = true,
        }
    };
    // The output ends early — what is buffered, then End — when the leader died of a signal
    // after we signalled the group, or when we signal it from now on (the leader is gone; only
    // descendants that left the group can still hold the pipes). A leader that survived our
    // SIGTERM and exited by itself is waited for like any other, up to end of file.
    let mut signals = proc.signals.subscribe();
    let killed =
        *signals.borrow_and_update() > 0 && matches!(outcome, reaper::Outcome::Ended(WaitStatus::Signaled { .. }));
    if !pumps_done {
        let cut = killed
            || tokio::select! {
                biased;
                _ = &mut pumps => false,
                _ = signals.changed() => true,
            };
        if cut {
            drain.cancel();
            // Past the grace the pumps are dropped: a descendant that escaped the kill may hold
            // the pipe open forever.
            let _ = tokio::time::timeout(DRAIN_GRACE, &mut pumps).await;
        }
    }
    let status = ExitStatus::from_outcome(outcome);
    tracing::debug!(pid = proc.pid(), status = %status.status, "process ended");
    proc.input.close();
    inner.retire(&proc, status.clone());
    proc.log.finish(status);
    proc.ended.cancel();
}
