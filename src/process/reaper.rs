//! The one owner of `wait()` for every child guestd spawns.
//!
//! A process-global reaper runs on its own OS thread (not a tokio task: tests and embedders run
//! many runtimes, and a reaper must outlive all of them). SIGCHLD wakes it through
//! `signal_hook::iterator::Signals`; it then calls `waitpid(pid, WNOHANG)` for every registered
//! pid and hands each status to that process's oneshot channel (which works across runtimes).
//!
//! The fast path: [`Exit::wait`] also watches a pidfd of the child in the caller's event loop and,
//! when it turns readable, collects that one child itself ([`collect_one`], the same `waitpid` under
//! the same lock). The exit then reaches the waiting task in the `epoll_wait` that also reports
//! the child's pipes closing, instead of after a signal handler, a wake-up of the reaper thread
//! and a wake-up back (two thread hops on every command's round trip). Whichever of the two
//! collects the child first sends the status; the other finds nothing to do.
//!
//! Invariant: every `waitpid` happens under the table mutex, and a child is registered in the
//! table before anyone but its spawner may reap it. The fork and exec themselves run *without*
//! the lock: an exec can hang (a binary or a cwd on a stuck FUSE or NFS mount), and the lock
//! must never wait for it, or every other process's exit and signal would. The kernel stores each
//! new child's pid in its spawn's slot ([`Table::spawning`]) before the child runs, and the PID-1
//! reaper leaves those children alone (one may have ended before it was registered, or failed
//! its exec, which `sys::spawn` collects itself); each spawn, when done, reaps the orphans its
//! child may have held up. Orphans are never held up by a spawn whose exec hangs: its child has
//! not ended. A registered pid is unreaped, so it is never reused while registered, and
//! [`signal_group`] (under the lock) cannot hit a stranger's group; once a leader is reaped,
//! its registration number ([`Leader`]) tells its group from a later child's that got its pid.
//!
//! In PID-1 mode ([`set_adopt_orphans`]) the reaper also reaps children it does not know, so
//! orphaned grandchildren re-parented to guestd do not pile up as zombies; unknown pids are
//! reaped silently. Nothing else in guestd may then wait for children: `tokio::process` is
//! banned in `clippy.toml` for exactly this reason.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock, PoisonError};
use std::time::Duration;

use nix::sys::signal::{Signal as NixSignal, killpg};
use nix::unistd::Pid;
use signal_hook::consts::SIGCHLD;
use signal_hook::iterator::Signals;
use tokio::sync::oneshot;

use crate::sys::wait::{self, WaitStatus};

/// How a registered child ended, as far as the reaper knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ended(WaitStatus),
    /// `waitpid` said ECHILD for a registered pid: something outside the reaper collected it.
    /// Only possible if code elsewhere breaks the "one owner of wait()" rule.
    Lost,
}

/// One registration of a child: its pid and a number no other registration gets, so a pid the
/// kernel reused for a later child is never taken for this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leader {
    pub pid: u32,
    generation: u64,
}

/// A registered child's exit, to be awaited once.
#[derive(Debug)]
pub struct Exit {
    pid: i32,
    leader: Leader,
    reaped: oneshot::Receiver<Outcome>,
    /// None where the kernel has no pidfds (< 5.3): the reaper thread alone then reports.
    pidfd: Option<OwnedFd>,
}

impl Exit {
    /// The registration this exit belongs to.
    pub fn leader(&self) -> Leader {
        self.leader
    }

    /// Resolves once the child has been reaped, by this task (pidfd) or by the reaper thread.
    /// Must run inside a tokio runtime with I/O enabled (the pidfd joins its reactor).
    pub async fn wait(mut self) -> Outcome {
        if let Some(pidfd) = self.pidfd.take() {
            tokio::select! {
                biased;
                outcome = &mut self.reaped => return outcome.unwrap_or(Outcome::Lost),
                // If the pidfd cannot be watched (epoll_ctl failed), the reaper thread reports.
                exited = wait::pidfd_exited(pidfd) => {
                    if exited.is_ok() {
                        collect_one(self.pid);
                    }
                }
            }
        }
        self.reaped.await.unwrap_or(Outcome::Lost)
    }
}

/// How often the reaper scans when SIGCHLD delivery could not be set up (it always can on
/// Linux; this only keeps guestd working, slowly, if signal registration ever fails).
const FALLBACK_POLL: Duration = Duration::from_millis(50);

/// The registered children and the spawns in flight.
#[derive(Default)]
struct Table {
    /// Registered (hence unreaped) children: their registration number and where their outcome
    /// goes.
    children: HashMap<i32, (u64, oneshot::Sender<Outcome>)>,
    /// The number of the next registration.
    next_generation: u64,
    /// Spawns in flight, each with the slot the kernel writes its child's pid into at clone
    /// time (0 until then): until the spawn is done, that child is its spawner's to reap.
    spawning: Vec<Arc<AtomicI32>>,
}

impl Table {
    /// Whether `pid` is the child of a spawn in flight (or was, and its spawner has reaped it:
    /// then the pid is left alone until that spawn is done, which reaps it if needed).
    fn spawning(&self, pid: i32) -> bool {
        self.spawning.iter().any(|slot| slot.load(Ordering::SeqCst) == pid)
    }
}

static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
static ADOPT_ORPHANS: AtomicBool = AtomicBool::new(false);
static START: Once = Once::new();

fn table() -> MutexGuard<'static, Table> {
    TABLE.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the reaper thread once per process. The SIGCHLD handler is installed before this
/// returns, so no child spawned afterwards can exit unnoticed.
fn ensure_started() {
    START.call_once(|| {
        let signals = match Signals::new([SIGCHLD]) {
            Ok(signals) => Some(signals),
            Err(error) => {
                tracing::error!(%error, "cannot watch SIGCHLD; reaper falls back to polling");
                None
            }
        };
        let spawned = std::thread::Builder::new().name("guestd-reaper".into()).spawn(move || run(signals));
        if let Err(error) = spawned {
            // Without a reaper no End event would ever be produced: nothing sensible remains.
            panic!("cannot start the child reaper thread: {error}");
        }
    });
}

fn run(signals: Option<Signals>) {
    match signals {
        Some(mut signals) => loop {
            reap();
            // Blocks until at least one SIGCHLD arrived since the last call; several exits may
            // coalesce into one wake-up, which is why `reap` scans everything.
            let _ = signals.wait().count();
        },
        None => loop {
            reap();
            std::thread::sleep(FALLBACK_POLL);
        },
    }
}

/// PID-1 mode: reap every child, including orphans re-parented to guestd.
pub fn set_adopt_orphans(adopt: bool) {
    ADOPT_ORPHANS.store(adopt, Ordering::SeqCst);
    ensure_started();
}

/// Runs `start` (which spawns a child, has the kernel store its pid in the given slot before the
/// child runs, and returns that pid; it may itself reap a child whose exec failed) and registers
/// the child. `start` runs without the table lock, so a hanging exec holds up only its own caller.
pub fn spawn(start: impl FnOnce(&AtomicI32) -> io::Result<u32>) -> io::Result<(u32, Exit)> {
    ensure_started();
    let in_flight = InFlight::begin();
    let pid = start(&in_flight.child)?;
    let raw = i32::try_from(pid).map_err(io::Error::other)?;
    // Nobody reaps an unregistered child while this spawn is in flight: the pid still names it.
    let pidfd = wait::pidfd_open(raw)
        .inspect_err(|error| tracing::debug!(pid, %error, "no pidfd; the reaper thread reports this exit"))
        .ok();
    let (tx, reaped) = oneshot::channel();
    let generation = in_flight.register(raw, tx);
    Ok((pid, Exit { pid: raw, leader: Leader { pid, generation }, reaped, pidfd }))
}

/// One spawn in flight ([`Table::spawning`]); ends by registering its child, or on drop (the
/// spawn failed). Either way it then reaps the orphans the reaper may have left alone behind its
/// ended child (PID-1 mode).
struct InFlight {
    child: Arc<AtomicI32>,
    /// Ended by `register`: nothing left for `drop` to do.
    done: bool,
}

impl InFlight {
    fn begin() -> InFlight {
        let child = Arc::new(AtomicI32::new(0));
        table().spawning.push(Arc::clone(&child));
        InFlight { child, done: false }
    }

    fn register(mut self, pid: i32, tx: oneshot::Sender<Outcome>) -> u64 {
        let mut table = table();
        let generation = table.next_generation;
        table.next_generation += 1;
        table.children.insert(pid, (generation, tx));
        // Its SIGCHLD may have been handled before it was registered.
        if let Some(outcome) = try_collect(pid) {
            report(&mut table, pid, outcome);
        }
        self.finish(&mut table);
        generation
    }

    fn finish(&mut self, table: &mut Table) {
        self.done = true;
        if let Some(at) = table.spawning.iter().position(|slot| Arc::ptr_eq(slot, &self.child)) {
            table.spawning.swap_remove(at);
        }
        if ADOPT_ORPHANS.load(Ordering::SeqCst) {
            reap_locked(table);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.finish(&mut table());
        }
    }
}

/// Collects `pid` if it has ended and is still registered (a registered pid is unreaped, so it
/// cannot have been recycled), and sends its outcome to its [`Exit`].
fn collect_one(pid: i32) {
    let mut table = table();
    if !table.children.contains_key(&pid) {
        return; // the reaper thread was first
    }
    if let Some(outcome) = try_collect(pid) {
        report(&mut table, pid, outcome);
    }
}

/// Unregisters `pid` and hands its outcome to its [`Exit`]. The receiver is gone only if its
/// runtime shut down; the child is reaped anyway.
fn report(table: &mut Table, pid: i32, outcome: Outcome) {
    if let Some((_, tx)) = table.children.remove(&pid) {
        let _ = tx.send(outcome);
    }
}

/// `waitpid(pid, WNOHANG)` for a registered pid (the caller holds the table lock): None while it
/// runs (or when waitpid failed oddly, logged; the next scan retries).
fn try_collect(pid: i32) -> Option<Outcome> {
    match wait::try_wait(pid) {
        Ok(status) => status.map(Outcome::Ended),
        Err(e) if e.raw_os_error() == Some(nix::libc::ECHILD) => {
            tracing::error!(pid, "registered child was reaped by someone else");
            Some(Outcome::Lost)
        }
        Err(error) => {
            tracing::warn!(pid, %error, "waitpid failed");
            None
        }
    }
}

/// Sends `signal` to the process group `leader` leads (`kill(-pgid)`; its pgid is its pid).
///
/// Under the table lock: while `leader` is registered it is unreaped, so its pid still names
/// this group. Once it has been reaped, its pid is reused only after every member of the group
/// has gone too (the kernel keeps a pid while it names a group): if a later child of guestd now
/// has it (registered, or a spawn in flight), nothing of this command is in that group and
/// nothing is sent. Otherwise the group may be empty (ESRCH, success: the command only waits for
/// a descendant that left the group to close its output) or still hold members.
pub fn signal_group(leader: Leader, signal: NixSignal) -> io::Result<()> {
    let pgid = i32::try_from(leader.pid).map_err(io::Error::other)?;
    let table = table();
    let ours = match table.children.get(&pgid) {
        Some((generation, _)) => *generation == leader.generation,
        None => !table.spawning(pgid),
    };
    if !ours {
        return Ok(());
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Err(nix::errno::Errno::ESRCH) if !table.children.contains_key(&pgid) => Ok(()),
        result => Ok(result?),
    }
}

/// One scan: collect every ended child and notify its owner.
fn reap() {
    reap_locked(&mut table());
}

fn reap_locked(table: &mut Table) {
    if ADOPT_ORPHANS.load(Ordering::SeqCst) {
        loop {
            // Peek first: an unknown child may belong to a spawn in flight.
            let pid = match wait::peek_ended() {
                Ok(Some(pid)) => pid,
                Ok(None) => return,
                Err(e) if e.raw_os_error() == Some(nix::libc::ECHILD) => return,
                Err(error) => {
                    tracing::warn!(%error, "waitid(P_ALL) failed");
                    return;
                }
            };
            if !table.children.contains_key(&pid) && table.spawning(pid) {
                // The peek keeps naming this child until it is reaped: collect the registered
                // ones one by one, and leave the rest to its spawn, which reaps them when done.
                break;
            }
            match try_collect(pid) {
                Some(outcome) if table.children.contains_key(&pid) => report(table, pid, outcome),
                Some(outcome) => tracing::debug!(pid, ?outcome, "reaped an adopted orphan"),
                // It ended (the peek said so) yet waitpid did not report it: stop rather than spin.
                None => return,
            }
        }
    }
    let ended: Vec<(i32, Outcome)> =
        table.children.keys().filter_map(|&pid| try_collect(pid).map(|outcome| (pid, outcome))).collect();
    for (pid, outcome) in ended {
        report(table, pid, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Command;

    /// std's spawn, for these tests only (guestd spawns through `sys::spawn`).
    fn std_spawn(cmd: &mut Command) -> io::Result<(u32, Exit)> {
        spawn(|_| cmd.spawn().map(|child| child.id()))
    }

    #[tokio::test]
    async fn exit_status_reaches_the_spawner() {
        let (_pid, exit) = std_spawn(Command::new("/bin/sh").args(["-c", "exit 7"])).unwrap();
        assert_eq!(exit.wait().await, Outcome::Ended(WaitStatus::Exited(7)));
    }

    #[tokio::test]
    async fn failed_exec_is_a_spawn_error() {
        // std's Command collects a child whose exec failed itself: nothing is left to reap.
        let err = std_spawn(&mut Command::new("/nonexistent/guestd-test")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn signal_death_is_reported_with_its_number() {
        let (_pid, exit) = std_spawn(Command::new("/bin/sh").args(["-c", "kill -KILL $$"])).unwrap();
        assert_eq!(exit.wait().await, Outcome::Ended(WaitStatus::Signaled { signal: 9, core_dumped: false }));
    }
}
