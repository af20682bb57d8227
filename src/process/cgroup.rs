//! A cgroup of its own for every command, where the machine allows it.
//!
//! A process group is what a command's processes share only until one of them calls `setsid`
//! (daemons, `setsid`, some shells' job control), and it is named by a number the kernel hands
//! out again once its leader is reaped. A cgroup holds everything the command ever forks, and a
//! kill through it (`cgroup.kill`) reaches exactly those processes, race-free, however they
//! regrouped.
//!
//! guestd uses the cgroup v2 hierarchy it runs in: it creates `guestd-<pid>-cmd-<n>` in
//! `guestd-commands` below its own cgroup (the root in a micro-VM where guestd is PID 1 and mounts
//! cgroup2; the service's cgroup under systemd, with `Delegate=yes`; a container's). A command's
//! cgroup enables no controller of its own. Each child starts inside its cgroup
//! (`clone3(CLONE_INTO_CGROUP)`, see `sys::spawn`). When its command is forgotten, an empty
//! cgroup is kept for a later command (a few are) or removed; one still holding processes (a
//! daemon the command left running) lingers and is removed by a later spawn once empty, with the
//! cgroups the command made below it. Nothing is ever started in a cgroup where another
//! command's processes remain, in it or in a cgroup below it.
//!
//! `guestd-commands` gets limits that keep the machine usable for the agent whatever the commands
//! do together (envd gives its `user` cgroup the same memory and CPU limits), set off the spawn
//! path once guestd serves ([`CgroupSource::prepare`]) where guestd may enable controllers in its
//! cgroup ([`Home`] says where that is):
//! - `memory.high` = `memory.max` = the memory less 1/8 of it (at most 128 MiB): a command that
//!   allocates without bound is reclaimed, then OOM-killed inside that cgroup, before guestd's
//!   own pages are touched;
//! - `cpu.weight` 50 (guestd's threads weigh 100 each in the root cgroup, `guestd-agent` 100 as
//!   a whole in a delegated one): the agent answers under a CPU hog;
//! - `pids.max` = the task slots less 1/16 of them (at least 64): a fork bomb cannot take the
//!   last ones, which guestd needs to start threads and commands.
//!
//! The memory and task slots are the machine's (`MemTotal`, `kernel.threads-max`), or those of
//! guestd's cgroup where it has lower limits (a service's `MemoryMax`, `TasksMax`).
//!
//! Where there is no writable cgroup v2 (a container's read-only `/sys/fs/cgroup`, a cgroup v1
//! machine, `--no-cgroups`), or the kernel refuses `CLONE_INTO_CGROUP` (before 5.7, or a seccomp
//! filter hiding `clone3`), commands run as before: signals go to the process group.

use std::collections::VecDeque;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::sys::spawn::IntoCgroupError;

/// Cgroups still holding processes after their command was forgotten, remembered to be removed
/// later. Past this the oldest is forgotten (an empty cgroup left behind costs a few KiB of
/// kernel memory; nothing else).
const MAX_LINGERING: usize = 1024;

/// Interface files and the values written to them.
type Limits = Vec<(&'static str, String)>;

/// The cgroup holding every command's cgroup, below guestd's own.
pub const COMMANDS: &str = "guestd-commands";

/// The cgroup a service manager starts guestd in, below the one it delegates to guestd
/// (systemd 254+: `Delegate=yes` with `DelegateSubgroup=guestd-agent`): the sign that guestd may
/// enable controllers in the cgroup above for `guestd-commands`.
pub const AGENT: &str = "guestd-agent";

/// Emptied cgroups kept for the next commands: reusing one saves a `mkdir` and an `rmdir` per
/// command (together about a tenth of a `true` round trip).
const MAX_SPARE: usize = 8;

/// How often a signal other than SIGKILL re-reads the member list for processes forked while it
/// was being delivered.
const SIGNAL_PASSES: usize = 8;

/// Numbers the cgroups of all managers in this process (tests run several).
static NEXT: AtomicU64 = AtomicU64::new(0);

/// How a manager finds its [`Cgroups`]: on first use, or ahead of it on a thread of its own.
/// At boot in a VM, finding the hierarchy and setting up `guestd-commands` takes tens of
/// milliseconds, better spent while the host is still connecting than before guestd listens.
pub struct CgroupSource(LazyLock<Option<Arc<Cgroups>>, Find>);

type Find = Box<dyn FnOnce() -> Option<Arc<Cgroups>> + Send>;

impl CgroupSource {
    /// `find` runs once, on the first [`CgroupSource::get`] or [`CgroupSource::prepare`].
    pub fn new(find: impl FnOnce() -> Option<Arc<Cgroups>> + Send + 'static) -> Arc<CgroupSource> {
        Arc::new(CgroupSource(LazyLock::new(Box::new(find))))
    }

    /// Already known (tests, embedders).
    pub fn known(cgroups: Option<Arc<Cgroups>>) -> Arc<CgroupSource> {
        CgroupSource::new(move || cgroups)
    }

    /// Runs the search now, on a thread of its own (it fills the time guestd waits for its first
    /// client; a `get` meanwhile waits for it), then sets the commands' shared limits
    /// ([`Cgroups::limit`]), which no spawn waits for. `idle`: search at the lowest priority, so
    /// that on a one-CPU VM it does not delay guestd's own start; only where nothing else can
    /// starve it while a spawn waits for it. The limits are set at guestd's priority: enabling
    /// controllers holds a kernel lock every fork takes.
    pub fn prepare(self: &Arc<Self>, idle: bool) {
        let this = Arc::clone(self);
        let started = std::thread::Builder::new().name("cgroups".into()).spawn(move || {
            let normal = idle.then(crate::sys::limits::this_threads_nice).flatten();
            if idle {
                crate::sys::limits::set_this_threads_nice(19);
            }
            let found = LazyLock::force(&this.0);
            if let Some(normal) = normal {
                crate::sys::limits::set_this_threads_nice(normal);
            }
            if let Some(cgroups) = found {
                match cgroups.limit() {
                    Ok(limits) => tracing::info!(dir = %cgroups.dir.display(), %limits, "limits the commands share"),
                    Err(reason) => tracing::info!(%reason, "no limits the commands share"),
                }
            }
        });
        if let Err(error) = started {
            tracing::debug!(%error, "no thread to find cgroups ahead of the first command");
        }
    }

    pub fn get(&self) -> Option<&Arc<Cgroups>> {
        self.0.as_ref()
    }
}

impl fmt::Debug for CgroupSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CgroupSource { .. }")
    }
}

/// The directory commands' cgroups are created in, and the ones waiting to be removed.
#[derive(Debug)]
pub struct Cgroups {
    dir: PathBuf,
    /// The cgroup `dir` (`guestd-commands`) was made in; None when the commands' cgroups go
    /// beside guestd's (`guestd-commands` could not be made), which leaves them without limits.
    home: Option<Home>,
    /// Cleared for good by the first spawn the kernel refuses to start in a new cgroup (for a
    /// reason other than a limit: see [`Cgroups::refused`]).
    enabled: AtomicBool,
    /// Empty cgroups of ended commands, ready for the next ones.
    spare: Mutex<Vec<Slot>>,
    lingering: Mutex<Lingering>,
}

/// The cgroup guestd runs in, as far as giving its commands limits goes.
#[derive(Debug)]
struct Home {
    dir: PathBuf,
    kind: HomeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HomeKind {
    /// The root cgroup (a VM where guestd is PID 1): the only one that may hold processes and
    /// enable controllers for its children.
    Root,
    /// The cgroup a service manager delegated to guestd, which it started in `guestd-agent`
    /// below it: it holds no process of its own, so it can enable controllers.
    Delegated,
    /// Any other cgroup: a container's (whose runtime puts `exec`'d processes straight into it,
    /// which the kernel refuses once it enables controllers), a service's that was not delegated
    /// (its manager owns its controllers), one guestd shares with other processes. Commands get
    /// cgroups of their own there, but no limits: guestd cannot tell it may enable controllers.
    Shared,
}

impl Home {
    /// guestd runs in the cgroup `dir`: where its commands' cgroups go, and whether they can have
    /// limits.
    fn of(dir: PathBuf) -> Home {
        // Every cgroup but the root has a `cgroup.type`, also the root of a cgroup namespace.
        if !dir.join("cgroup.type").exists() {
            return Home { dir, kind: HomeKind::Root };
        }
        match dir.parent() {
            Some(parent) if dir.file_name() == Some(AGENT.as_ref()) => {
                Home { dir: parent.to_owned(), kind: HomeKind::Delegated }
            }
            _ => Home { dir, kind: HomeKind::Shared },
        }
    }
}

#[derive(Debug, Default)]
struct Lingering {
    dirs: VecDeque<PathBuf>,
    /// Commands started since the last sweep: a sweep runs once there are as many as lingering
    /// cgroups, so each spawn pays for at most about one removal attempt.
    created: usize,
}

impl Cgroups {
    /// The cgroup v2 directory guestd runs in, if it may create cgroups there; otherwise why not.
    /// Commands go into `guestd-commands` below it (its limits are set by [`Cgroups::limit`]).
    /// Removes the empty cgroups an earlier guestd left (it ended without its shutdown).
    pub fn detect() -> Result<Cgroups, String> {
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let own = unified_path(&own).ok_or("guestd is in no cgroup v2 hierarchy (no 0:: line in /proc/self/cgroup)")?;
        let mounts =
            fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let dir = cgroup2_dir(&mounts, own).ok_or_else(|| format!("no cgroup2 mount shows guestd's cgroup {own}"))?;
        let home = Home::of(dir);
        nix::unistd::access(&home.dir, nix::unistd::AccessFlags::W_OK)
            .map_err(|e| format!("cannot create cgroups in {}: {e}", home.dir.display()))?;
        let cgroups = Cgroups::for_guestd_in(home);
        remove_stale(&cgroups.dir);
        Ok(cgroups)
    }

    /// Commands' cgroups for a guestd at `home`: in `guestd-commands` below it, or beside guestd
    /// if that cannot be made.
    fn for_guestd_in(home: Home) -> Cgroups {
        let commands = home.dir.join(COMMANDS);
        match fs::create_dir(&commands) {
            Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
                tracing::debug!(dir = %commands.display(), %error, "commands' cgroups go beside guestd instead");
                Cgroups::at(home.dir)
            }
            _ => Cgroups { home: Some(home), ..Cgroups::at(commands) },
        }
    }

    /// Commands' cgroups go into `dir` (which must be a cgroup v2 directory for spawns into them
    /// to work; see [`Cgroups::refused`]), with no limits.
    pub fn at(dir: PathBuf) -> Cgroups {
        Cgroups {
            dir,
            home: None,
            enabled: AtomicBool::new(true),
            spare: Mutex::default(),
            lingering: Mutex::default(),
        }
    }

    /// Sets the limits all commands share (see the module docs); returns them as `file=value`
    /// pairs, or why there are none. A limit the kernel does not offer is left out. (Enabling a
    /// controller while commands run moves them, which takes a lock whose first use can wait
    /// for an RCU grace period: this runs off the spawn path.)
    pub fn limit(&self) -> Result<String, String> {
        let home = self.home.as_ref().ok_or("the commands' cgroups are beside guestd's")?;
        if home.kind == HomeKind::Shared {
            return Err(format!(
                "guestd's cgroup {} is not delegated to it (a container's, a service's without \
                 Delegate=yes and DelegateSubgroup={AGENT}): no controllers are enabled there",
                home.dir.display()
            ));
        }
        if home.kind == HomeKind::Delegated {
            let procs = fs::read_to_string(home.dir.join("cgroup.procs")).unwrap_or_default();
            if let Some(pid) = procs.lines().next() {
                return Err(format!(
                    "process {pid} is in {} itself, beside {AGENT}: no controllers can be enabled there",
                    home.dir.display()
                ));
            }
        }
        let limits = limit_commands(&home.dir, &self.dir)?;
        Ok(limits.iter().map(|(file, value)| format!("{file}={value}")).collect::<Vec<_>>().join(" "))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// False once the kernel has refused to start a command in a cgroup.
    pub fn active(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// An empty cgroup for one command (a spare one, or a new one); None once spawns into
    /// cgroups have failed (or when creating one fails: logged).
    pub fn create(self: &Arc<Self>) -> Option<Cgroup> {
        if !self.active() {
            return None;
        }
        self.sweep_if_due();
        let spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner).pop();
        match spare {
            Some(slot) => Some(self.own(slot, true)),
            None => self.create_new(),
        }
    }

    /// A new cgroup for one command, as [`Cgroups::create`], never a spare. A name in use is
    /// skipped (guestds in different PID namespaces sharing one cgroup may have the same pid).
    fn create_new(self: &Arc<Self>) -> Option<Cgroup> {
        let mut error = None;
        for _ in 0..8 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("guestd-{}-cmd-{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => match open_dir(&path) {
                    Ok(dir) => return Some(self.own(Slot { path, dir }, false)),
                    Err(e) => {
                        let _ = fs::remove_dir(&path);
                        error = Some(e);
                        break;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => error = Some(e),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if let Some(error) = error {
            tracing::warn!(dir = %self.dir.display(), %error, "cannot create a cgroup for a command: it runs in guestd's");
        }
        None
    }

    fn own(self: &Arc<Self>, slot: Slot, spare: bool) -> Cgroup {
        Cgroup { slot: Some(slot), killed: AtomicBool::new(false), spare, owner: Arc::clone(self) }
    }

    /// The kernel would not start a child in `cgroup` (nothing was started): what the spawn does
    /// next. A limit reached fails it, as it would fail a fork; a spare that went bad is replaced
    /// by a new cgroup; anything else means cgroups do not work here: the command starts without
    /// one, and so do all later commands.
    pub fn refused(self: &Arc<Self>, cgroup: Cgroup, error: &IntoCgroupError) -> Refused {
        // EAGAIN: the commands' `pids.max` (charged to the cgroup the child starts in) or the
        // machine's task slots; starting the command elsewhere would take it out of the limit.
        if matches!(error.source.raw_os_error(), Some(nix::libc::EAGAIN | nix::libc::ENOMEM)) {
            return Refused::Fail;
        }
        if cgroup.spare {
            // Killed from outside since its command ended (a `cgroup.kill` on it or on the
            // directory above, which kills the other spares too: Linux kills every child later
            // started there, see `sys::spawn`), or removed (another guestd's `remove_stale`):
            // none of the spares is used again.
            cgroup.killed.store(true, Ordering::Relaxed);
            drop(cgroup);
            self.remove_spares();
            return Refused::Retry(self.create_new());
        }
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.dir.display(),
                error = %crate::error_chain(error),
                "commands cannot start in cgroups of their own: signals reach their process groups only"
            );
        }
        drop(cgroup); // removed: cgroups are off
        Refused::Retry(None)
    }

    /// Keeps an ended command's cgroup for the next command if no process is left in it or in
    /// cgroups below it, it was never killed through `cgroup.kill` and spares are wanted; else
    /// removes it, or remembers it while processes remain in it.
    fn release(&self, slot: Slot, killed: bool) {
        // Linux (6.18) kills every child later started in a cgroup that has been through
        // `cgroup.kill` (its kill count no longer matches the parent's): such a cgroup is
        // never reused.
        if !killed && self.active() && unpopulated(&slot) {
            let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
            if spare.len() < MAX_SPARE {
                spare.push(slot);
                return;
            }
        }
        let path = slot.path;
        match remove(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                let mut lingering = self.lingering.lock().unwrap_or_else(PoisonError::into_inner);
                if lingering.dirs.len() == MAX_LINGERING {
                    lingering.dirs.pop_front();
                }
                lingering.dirs.push_back(path);
            }
            Err(error) => tracing::debug!(path = %path.display(), %error, "cannot remove a command's cgroup"),
        }
    }

    fn sweep_if_due(&self) {
        let mut lingering = self.lingering.lock().unwrap_or_else(PoisonError::into_inner);
        lingering.created += 1;
        if lingering.created >= lingering.dirs.len() && !lingering.dirs.is_empty() {
            lingering.sweep();
        }
    }

    /// Removes the spare cgroups and every lingering one that has emptied (at shutdown).
    pub fn sweep(&self) {
        self.remove_spares();
        self.lingering.lock().unwrap_or_else(PoisonError::into_inner).sweep();
    }

    fn remove_spares(&self) {
        for slot in self.spare.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            let _ = remove(&slot.path);
        }
    }
}

impl Lingering {
    /// Removes every lingering cgroup that has emptied; keeps those still in use.
    fn sweep(&mut self) {
        self.created = 0;
        self.dirs.retain(|dir| remove(dir).is_err_and(|e| e.raw_os_error() == Some(nix::libc::EBUSY)));
    }
}

/// What a spawn does once the kernel refused to start its child in a cgroup ([`Cgroups::refused`]).
pub enum Refused {
    /// Fail with that error.
    Fail,
    /// Start the command again, in this cgroup (None: in guestd's).
    Retry(Option<Cgroup>),
}

/// A cgroup directory and a descriptor of it (what `clone3` takes), kept open from its creation
/// to its removal: a spare is reused without opening it again.
#[derive(Debug)]
struct Slot {
    path: PathBuf,
    dir: OwnedFd,
}

/// One command's cgroup; kept as a spare, removed or left lingering on drop.
#[derive(Debug)]
pub struct Cgroup {
    /// Taken only by drop.
    slot: Option<Slot>,
    /// `cgroup.kill` was written.
    killed: AtomicBool,
    /// An earlier command's.
    spare: bool,
    owner: Arc<Cgroups>,
}

impl Cgroup {
    fn slot(&self) -> &Slot {
        self.slot.as_ref().expect("a cgroup's slot is taken only when it drops")
    }

    pub fn path(&self) -> &Path {
        &self.slot().path
    }

    /// The descriptor to start the command in this cgroup with.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.slot().dir.as_fd()
    }

    /// Sends `signal` to every process in the cgroup. SIGKILL goes through `cgroup.kill` (Linux
    /// 5.14), which also catches processes being forked meanwhile; other signals go to each
    /// member (also those in cgroups the command made below), re-reading the members until a
    /// pass finds no new one.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        let path = self.path();
        if signal == Signal::SIGKILL {
            self.killed.store(true, Ordering::Relaxed);
            // Not `fs::write`: creating a missing file in cgroupfs fails with EACCES, which would
            // hide that the kernel has no `cgroup.kill`.
            let kill = fs::OpenOptions::new().write(true).open(path.join("cgroup.kill"));
            match kill.and_then(|mut file| io::Write::write_all(&mut file, b"1")) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && path.exists() => {} // before 5.14
                result => return result,
            }
        }
        let mut signalled = Vec::new();
        for _ in 0..SIGNAL_PASSES {
            let mut fresh = Vec::new();
            members(path, &mut fresh)?;
            fresh.retain(|pid| !signalled.contains(pid));
            if fresh.is_empty() {
                break;
            }
            for &pid in &fresh {
                match kill(Pid::from_raw(pid), signal) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            signalled.extend(fresh);
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.owner.release(slot, *self.killed.get_mut());
        }
    }
}

/// Enables the cpu, memory and pids controllers for the children of guestd's home and sets
/// `commands`' limits (see the module docs): the limits set, or why there are none.
fn limit_commands(home: &Path, commands: &Path) -> Result<Limits, String> {
    let available =
        fs::read_to_string(home.join("cgroup.controllers")).map_err(|e| format!("cgroup.controllers: {e}"))?;
    let wanted: Vec<&str> =
        ["cpu", "memory", "pids"].into_iter().filter(|c| available.split_whitespace().any(|a| a == *c)).collect();
    if wanted.is_empty() {
        return Err(format!("none of the cpu, memory, pids controllers is available in {}", home.display()));
    }
    let enable: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
    fs::write(home.join("cgroup.subtree_control"), enable.join(" "))
        .map_err(|e| format!("enabling {} in {}: {e}", enable.join(" "), home.display()))?;
    let mem_total = crate::host::mem_total().ok_or("no MemTotal in /proc/meminfo")?;
    let threads_max: u64 = fs::read_to_string("/proc/sys/kernel/threads-max")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or("no /proc/sys/kernel/threads-max")?;
    // A service's own limits (systemd's TasksMax, MemoryMax) bound guestd and its commands
    // together: the commands' share is taken from those where they are lower.
    let memory = mem_total.min(limit_of(home, "memory.max"));
    let tasks = threads_max.min(limit_of(home, "pids.max"));
    let mut set = Vec::new();
    for (file, value) in command_limits(memory, tasks) {
        let controller = file.split('.').next().unwrap_or_default();
        if !wanted.contains(&controller) {
            continue;
        }
        match fs::write(commands.join(file), &value) {
            Ok(()) => set.push((file, value)),
            Err(error) => tracing::warn!(file, value, %error, "cannot set a limit for the commands' cgroup"),
        }
    }
    Ok(set)
}

/// The number in the interface file `file` of the cgroup `dir`; `u64::MAX` for `max`, or when it
/// has none (the root cgroup has no limits).
fn limit_of(dir: &Path, file: &str) -> u64 {
    fs::read_to_string(dir.join(file)).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(u64::MAX)
}

/// The limits all commands share, out of `mem_total` bytes and `threads_max` tasks (the
/// machine's, or those of guestd's cgroup where lower).
fn command_limits(mem_total: u64, threads_max: u64) -> [(&'static str, String); 4] {
    let memory = mem_total - (mem_total / 8).min(128 << 20);
    let pids = threads_max - (threads_max / 16).max(64).min(threads_max / 2);
    [
        ("memory.high", memory.to_string()),
        ("memory.max", memory.to_string()),
        ("cpu.weight", "50".to_owned()),
        ("pids.max", pids.to_string()),
    ]
}

/// Adds the processes in the cgroup at `path`, and in the cgroups below it, to `into`.
fn members(path: &Path, into: &mut Vec<i32>) -> io::Result<()> {
    let procs = fs::read_to_string(path.join("cgroup.procs"))?;
    into.extend(procs.lines().filter_map(|line| line.parse::<i32>().ok()));
    for below in cgroups_below(path)? {
        let _ = members(&below, into); // one removed meanwhile holds no process
    }
    Ok(())
}

/// The cgroups right below the one at `path` (its subdirectories).
fn cgroups_below(path: &Path) -> io::Result<impl Iterator<Item = PathBuf>> {
    Ok(fs::read_dir(path)?.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()))
}

/// Whether no process is left in the cgroup or in cgroups below it (where the command may have
/// moved some: a nested container runtime does): `populated 0` in its `cgroup.events`.
fn unpopulated(slot: &Slot) -> bool {
    let events = nix::fcntl::openat(
        &slot.dir,
        "cgroup.events",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    );
    let mut text = [0u8; 128];
    events
        .ok()
        .and_then(|fd| io::Read::read(&mut fs::File::from(fd), &mut text).ok())
        .is_some_and(|n| text[..n].split(|&b| b == b'\n').any(|line| line == b"populated 0"))
}

/// Removes a command's cgroup, and the cgroups the command made below it; EBUSY while a process
/// remains in any of them.
fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_dir(path) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
            for below in cgroups_below(path)? {
                let _ = remove(&below);
            }
            fs::remove_dir(path)
        }
        result => result,
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_DIRECTORY).open(path)?.into())
}

/// Removes the empty command cgroups in `dir` whose guestd is no longer running. (One that still
/// holds a process stays: removing fails.)
fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("guestd-")?.split_once("-cmd-")) else { continue };
        if pid.0 != std::process::id().to_string() && !Path::new("/proc").join(pid.0).exists() {
            let _ = remove(&entry.path());
        }
    }
}

/// The cgroup v2 path from `/proc/self/cgroup` (its `0::PATH` line).
fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|line| line.strip_prefix("0::"))
}

/// Where `own` (a cgroup v2 path) is visible through a cgroup2 mount in `mountinfo`.
fn cgroup2_dir(mountinfo: &str, own: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut fields = fields.split(' ');
        let root = fields.nth(3)?;
        let mount_point = unescape(fields.next()?);
        let below = if root == "/" {
            Some(own)
        } else {
            own.strip_prefix(root).filter(|r| r.is_empty() || r.starts_with('/'))
        }?;
        Some(Path::new(&mount_point).join(below.trim_start_matches('/')))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn the_own_cgroup_is_found_under_the_cgroup2_mount() {
        assert_eq!(unified_path("1:cpu:/\n0::/system.slice/guestd.service\n"), Some("/system.slice/guestd.service"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
        assert_eq!(cgroup2_dir(MOUNTINFO, "/"), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            cgroup2_dir(MOUNTINFO, "/system.slice/guestd.service"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/system.slice/guestd.service"))
        );
        assert_eq!(cgroup2_dir("25 30 0:23 / /sys rw - sysfs sysfs rw\n", "/"), None);
    }

    /// Linux 6.18 kills a child started in a cgroup that has been through `cgroup.kill` before
    /// it runs an instruction. The spawn sees that the child never ran and says so (the caller
    /// then starts it elsewhere, see `Cgroups::refused`), instead of passing off a dead child as
    /// started.
    #[test]
    fn a_child_killed_at_birth_in_its_cgroup_is_a_refusal_not_a_start() {
        let Ok(cgroups) = Cgroups::detect().map(Arc::new) else {
            eprintln!("SKIPPED a_child_killed_at_birth_in_its_cgroup_is_a_refusal_not_a_start: no writable cgroup v2");
            return;
        };
        let cgroup = cgroups.create().unwrap();
        cgroup.signal(Signal::SIGKILL).unwrap(); // empty: only the kernel's kill count changes
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let exec = crate::sys::spawn::Exec { path: c("/bin/true"), argv: vec![c("true")], env: vec![] };
        let setup =
            crate::sys::spawn::ChildSetup { controlling_tty: false, credentials: None, cwd: c("/"), nofile: None };
        let null: OwnedFd = fs::File::open("/dev/null").unwrap().into();
        let stdio = [std::os::fd::AsFd::as_fd(&null); 3];
        match crate::sys::spawn::spawn(&exec, stdio, &setup, Some(cgroup.fd()), &std::sync::atomic::AtomicI32::new(0)) {
            Ok(pid) => {
                // A kernel without that behaviour: the child must really have run.
                let status = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(Pid::from_raw(pid as i32), 0));
            }
            Err(error) => {
                assert!(error.get_ref().is_some_and(|e| e.is::<IntoCgroupError>()), "{error}");
                assert!(error.to_string().contains("killed before it ran"), "{error}");
            }
        }
    }

    /// Before Linux 5.14 there is no `cgroup.kill`: SIGKILL then goes to each member. (A plain
    /// directory stands in for such a cgroup; it can hold no `cgroup.kill`, as cgroupfs cannot.)
    #[test]
    fn without_cgroup_kill_sigkill_goes_to_each_member() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = Arc::new(Cgroups::at(dir.path().to_owned())).create().unwrap();
        let mut sleep = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
        fs::write(cgroup.path().join("cgroup.procs"), format!("{}\n", sleep.id())).unwrap();
        let signalled = cgroup.signal(Signal::SIGKILL);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while sleep.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = kill(Pid::from_raw(sleep.id() as i32), Signal::SIGTERM); // if it is still there
        let status = sleep.wait().unwrap();
        signalled.unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "SIGKILL reached the member");
    }

    /// A spawn that hits a limit (the commands' `pids.max`: EAGAIN) fails as a fork would; it
    /// neither turns cgroups off nor starts the command outside the limit. Anything else does.
    #[test]
    fn a_limit_reached_fails_the_spawn_and_leaves_cgroups_on() {
        let dir = tempfile::tempdir().unwrap();
        let cgroups = Arc::new(Cgroups::at(dir.path().to_owned()));
        for errno in [nix::libc::EAGAIN, nix::libc::ENOMEM] {
            let cgroup = cgroups.create().unwrap();
            let error = IntoCgroupError { source: io::Error::from_raw_os_error(errno) };
            assert!(matches!(cgroups.refused(cgroup, &error), Refused::Fail), "{error}");
            assert!(cgroups.active(), "{error}");
        }
        let cgroup = cgroups.create().unwrap();
        let error = IntoCgroupError { source: io::Error::from_raw_os_error(nix::libc::ENOSYS) };
        assert!(matches!(cgroups.refused(cgroup, &error), Refused::Retry(None)));
        assert!(!cgroups.active());
    }

    #[test]
    fn command_limits_leave_the_agent_memory_and_task_slots() {
        let limits = command_limits(256 << 20, 2000);
        assert_eq!(limits[0], ("memory.high", (224u64 << 20).to_string()));
        assert_eq!(limits[1], ("memory.max", (224u64 << 20).to_string()));
        assert_eq!(limits[2], ("cpu.weight", "50".to_owned()));
        assert_eq!(limits[3], ("pids.max", "1875".to_owned()));
        let big = command_limits(16 << 30, 100_000);
        assert_eq!(big[0].1, ((16u64 << 30) - (128 << 20)).to_string(), "at most 128 MiB is kept back");
        assert_eq!(big[3].1, (100_000 - 6250).to_string());
        assert_eq!(command_limits(1 << 30, 100)[3].1, "50", "at most half the task slots are kept back");
    }

    /// Commands go into `guestd-commands` wherever guestd runs; whether they get limits depends
    /// on where that is.
    #[test]
    fn commands_go_into_guestd_commands_below_guestds_home() {
        let dir = tempfile::tempdir().unwrap();
        let cgroups = Cgroups::for_guestd_in(Home::of(dir.path().to_owned()));
        assert_eq!(cgroups.dir(), dir.path().join(COMMANDS));
        assert_eq!(cgroups.home.as_ref().map(|h| (h.dir.as_path(), h.kind)), Some((dir.path(), HomeKind::Root)));
        // Where it cannot be made, beside guestd, and without limits.
        let file = dir.path().join("not-a-directory");
        fs::write(&file, "").unwrap();
        let beside = Cgroups::for_guestd_in(Home::of(file.clone()));
        assert_eq!((beside.dir(), beside.home.is_none()), (file.as_path(), true));
        assert!(beside.limit().unwrap_err().contains("beside guestd"));
    }

    /// Only the root cgroup has no `cgroup.type`; a cgroup named `guestd-agent` is where a
    /// service manager that delegated the one above started guestd; anything else gets no
    /// limits, and is left untouched.
    #[test]
    fn guestds_home_is_the_root_a_delegated_cgroup_or_shared() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(Home::of(root.path().to_owned()).kind, HomeKind::Root);
        let service = root.path().join("guestd.service");
        let agent = service.join(AGENT);
        fs::create_dir_all(&agent).unwrap();
        for dir in [&service, &agent] {
            fs::write(dir.join("cgroup.type"), "domain\n").unwrap();
        }
        let home = Home::of(agent.clone());
        assert_eq!((home.dir.as_path(), home.kind), (service.as_path(), HomeKind::Delegated));
        let home = Home::of(service.clone());
        assert_eq!((home.dir.as_path(), home.kind), (service.as_path(), HomeKind::Shared));
        let shared = Cgroups::for_guestd_in(home);
        assert_eq!(shared.dir(), service.join(COMMANDS), "commands still get cgroups of their own");
        let refusal = shared.limit().unwrap_err();
        assert!(refusal.contains("not delegated"), "{refusal}");
        assert!(!service.join("cgroup.subtree_control").exists(), "nothing enabled");
    }

    /// A service's own limits, where lower than the machine's, are what the commands' share is
    /// taken from (systemd's TasksMax is far below `threads-max`).
    #[test]
    fn a_cgroups_own_limits_are_read_as_numbers_or_none() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pids.max"), "4915\n").unwrap();
        fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(limit_of(dir.path(), "pids.max"), 4915);
        assert_eq!(limit_of(dir.path(), "memory.max"), u64::MAX);
        assert_eq!(limit_of(dir.path(), "cpu.max"), u64::MAX, "no such file: no limit");
    }

    /// A mount of a subtree (a container's cgroup namespace seen from outside, a bind mount)
    /// shows only cgroups below its root.
    #[test]
    fn a_subtree_mount_is_used_only_for_cgroups_below_its_root() {
        let info = "50 40 0:30 /payload /mnt/cg\\040x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_dir(info, "/payload/job"), Some(PathBuf::from("/mnt/cg x/job")));
        assert_eq!(cgroup2_dir(info, "/payload"), Some(PathBuf::from("/mnt/cg x")));
        assert_eq!(cgroup2_dir(info, "/payloads"), None);
        assert_eq!(cgroup2_dir(info, "/other"), None);
    }
}
