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
//! Invariant: the table mutex serialises *spawning* and *reaping*. A child is forked, exec'd
//! and registered while [`spawn`] holds the lock, and every `waitpid` happens under the same
//! lock, so the reaper can never reap a child before it is registered, and can never steal the
//! status `sys::spawn` collects itself when `exec` fails. For the same reason a
//! registered pid is never reused while registered, so [`signal_group`] (also under the lock)
//! cannot hit a stranger's process group.
//!
//! In PID-1 mode ([`set_adopt_orphans`]) the reaper calls `waitpid(-1)` instead, so orphaned
//! grandchildren re-parented to guestd do not pile up as zombies; unknown pids are reaped
//! silently. Nothing else in guestd may then wait for children: `tokio::process` is banned in
//! `clippy.toml` for exactly this reason.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock, PoisonError};
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

/// A registered child's exit, to be awaited once.
#[derive(Debug)]
pub struct Exit {
    pid: i32,
    reaped: oneshot::Receiver<Outcome>,
    /// None where the kernel has no pidfds (< 5.3): the reaper thread alone then reports.
    pidfd: Option<OwnedFd>,
}

impl Exit {
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

static TABLE: OnceLock<Mutex<HashMap<i32, oneshot::Sender<Outcome>>>> = OnceLock::new();
static ADOPT_ORPHANS: AtomicBool = AtomicBool::new(false);
static START: Once = Once::new();

fn table() -> MutexGuard<'static, HashMap<i32, oneshot::Sender<Outcome>>> {
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

/// Runs `start` (which spawns a child and returns its pid) and registers the child, atomically
/// with respect to the reaper: `start` may itself reap a child whose exec failed.
pub fn spawn(start: impl FnOnce() -> io::Result<u32>) -> io::Result<(u32, Exit)> {
    ensure_started();
    let mut table = table();
    let pid = start()?;
    let raw = i32::try_from(pid).map_err(io::Error::other)?;
    // Under the lock the child is unreaped, so the pid still names it.
    let pidfd = wait::pidfd_open(raw)
        .inspect_err(|error| tracing::debug!(pid, %error, "no pidfd; the reaper thread reports this exit"))
        .ok();
    let (tx, reaped) = oneshot::channel();
    table.insert(raw, tx);
    drop(table);
    // A SIGCHLD that arrived while we held the lock woke the reaper, which then waited for the
    // lock and scans after us; nothing to do here.
    Ok((pid, Exit { pid: raw, reaped, pidfd }))
}

/// Collects `pid` if it has ended and is still registered (a registered pid is unreaped, so it
/// cannot have been recycled), and sends its outcome to its [`Exit`].
fn collect_one(pid: i32) {
    let mut table = table();
    if !table.contains_key(&pid) {
        return; // the reaper thread was first
    }
    if let Some(outcome) = try_collect(pid) {
        report(&mut table, pid, outcome);
    }
}

/// Unregisters `pid` and hands its outcome to its [`Exit`]. The receiver is gone only if its
/// runtime shut down; the child is reaped anyway.
fn report(table: &mut HashMap<i32, oneshot::Sender<Outcome>>, pid: i32, outcome: Outcome) {
    if let Some(tx) = table.remove(&pid) {
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

/// Sends `signal` to the process group `pgid` (`kill(-pgid)`).
///
/// Holding the table lock guarantees that, if the group leader is still registered, it is
/// unreaped, so `pgid` still names our group and not a recycled pid. Once the leader has been
/// reaped the group may be empty (ESRCH): the process then only waits for a descendant that left
/// the group to close its output, and there is nothing left to signal, which is success.
pub fn signal_group(pgid: u32, signal: NixSignal) -> io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(io::Error::other)?;
    let table = table();
    match killpg(Pid::from_raw(pgid), signal) {
        Err(nix::errno::Errno::ESRCH) if !table.contains_key(&pgid) => Ok(()),
        result => Ok(result?),
    }
}

/// One scan: collect every ended child and notify its owner.
fn reap() {
    let mut table = table();
    if ADOPT_ORPHANS.load(Ordering::SeqCst) {
        loop {
            match wait::try_wait_any() {
                Ok(Some((pid, status))) => match table.remove(&pid) {
                    Some(tx) => {
                        let _ = tx.send(Outcome::Ended(status));
                    }
                    None => tracing::debug!(pid, ?status, "reaped an adopted orphan"),
                },
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(nix::libc::ECHILD) => break,
                Err(error) => {
                    tracing::warn!(%error, "waitpid(-1) failed");
                    break;
                }
            }
        }
        return;
    }
    let ended: Vec<(i32, Outcome)> =
        table.keys().filter_map(|&pid| try_collect(pid).map(|outcome| (pid, outcome))).collect();
    for (pid, outcome) in ended {
        report(&mut table, pid, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Command;

    /// std's spawn, for these tests only (guestd spawns through `sys::spawn`).
    fn std_spawn(cmd: &mut Command) -> io::Result<(u32, Exit)> {
        spawn(|| cmd.spawn().map(|child| child.id()))
    }

    #[tokio::test]
    async fn exit_status_reaches_the_spawner() {
        let (_pid, exit) = std_spawn(Command::new("/bin/sh").args(["-c", "exit 7"])).unwrap();
        assert_eq!(exit.wait().await, Outcome::Ended(WaitStatus::Exited(7)));
    }

    #[tokio::test]
    async fn failed_exec_is_a_spawn_error() {
        // The spawner collects the failed child itself (under our lock): nothing is left to reap.
        let err = std_spawn(&mut Command::new("/nonexistent/guestd-test")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn signal_death_is_reported_with_its_number() {
        let (_pid, exit) = std_spawn(Command::new("/bin/sh").args(["-c", "kill -KILL $$"])).unwrap();
        assert_eq!(exit.wait().await, Outcome::Ended(WaitStatus::Signaled { signal: 9, core_dumped: false }));
    }
}
