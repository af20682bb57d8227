//! Duties of guestd when it is PID 1 (the kernel's `init` in a micro-VM, or a container's first
//! process): mount what a bare root lacks, reap orphans, and on the way out signal everything,
//! wait a grace period, and — in a VM — sync and power off.
//!
//! Orphan reaping goes through the one reaper (`process::reaper`) switched to adopt orphans, so
//! a status guestd is waiting for is never stolen.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::mount::MsFlags;
use nix::sys::signal::Signal;

use crate::SHUTDOWN_GRACE;
use crate::process::reaper;
use crate::sys::init as sys;

/// API filesystems a bare root needs, mounted only where nothing is mounted yet.
const MOUNTS: &[(&str, &str, &str)] = &[
    ("proc", "/proc", ""),
    ("sysfs", "/sys", ""),
    // Where commands get cgroups of their own (`process::cgroup`).
    ("cgroup2", "/sys/fs/cgroup", ""),
    ("devtmpfs", "/dev", "mode=0755"),
    ("devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666"),
    ("tmpfs", "/dev/shm", "mode=1777"),
    ("tmpfs", "/run", "mode=0755"),
    ("tmpfs", "/tmp", "mode=1777"),
];

/// `kernel.pid_max` in a VM, as systemd sets it (`50-pid-max.conf`); the kernel's default on a
/// small machine is 32768. A process stays listed after its leader is reaped while an escaped
/// descendant holds its output, and signals then go to its group by number: the later pids
/// wrap around, the less likely that number names a newer group by then.
const PID_MAX: u64 = 4_194_304;

const PID_MAX_PATH: &str = "/proc/sys/kernel/pid_max";

/// True when this process is PID 1 of its PID namespace.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// PID-1 state kept for shutdown.
#[derive(Debug)]
pub struct Pid1 {
    /// The initial PID namespace of a machine (a VM): power off when guestd exits.
    power_off: bool,
    /// When the shared grace period ends: set once, by the first of `begin_shutdown`/`finish`.
    deadline: OnceLock<Instant>,
}

/// Mounts what is missing and starts adopting orphans. Call before serving.
pub fn setup() -> Pid1 {
    let mounted = mount_points();
    for (fstype, target, data) in MOUNTS {
        if mounted.contains(*target) {
            continue;
        }
        let flags = MsFlags::MS_NOSUID
            | if *fstype == "devtmpfs" || *fstype == "devpts" { MsFlags::empty() } else { MsFlags::MS_NODEV };
        let data = (!data.is_empty()).then_some(*data);
        match sys::mount_fs(fstype, Path::new(target), flags, data) {
            Ok(()) => tracing::info!(fstype, target, "mounted"),
            Err(err) => tracing::warn!(fstype, target, error = %err, "cannot mount"),
        }
    }
    reaper::set_adopt_orphans(true);
    // Kernel threads live only in the initial PID namespace: kthreadd is always pid 2 there.
    let power_off = std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    if power_off {
        // The machine is ours (a container shares the host's, which is not ours to change).
        raise_pid_max();
    }
    tracing::info!(power_off, "running as PID 1");
    Pid1 { power_off, deadline: OnceLock::new() }
}

/// Raises `kernel.pid_max` to [`PID_MAX`] unless it is already that high.
fn raise_pid_max() {
    let current = std::fs::read_to_string(PID_MAX_PATH).ok().and_then(|v| v.trim().parse::<u64>().ok());
    if current.is_some_and(|current| current >= PID_MAX) {
        return;
    }
    match std::fs::write(PID_MAX_PATH, PID_MAX.to_string()) {
        Ok(()) => tracing::info!(from = ?current, to = PID_MAX, "raised kernel.pid_max"),
        Err(err) => tracing::warn!(error = %err, "cannot raise kernel.pid_max"),
    }
}

impl Pid1 {
    /// Shutdown starts: SIGTERM to every process at once (guestd's own commands and orphans
    /// alike), so everything shares one grace period — a container manager's stop timeout
    /// (Docker: 10 s) must cover one grace, not two.
    pub fn begin_shutdown(&self) {
        if self.deadline.set(Instant::now() + SHUTDOWN_GRACE).is_ok()
            && let Err(err) = sys::signal_all(Signal::SIGTERM)
        {
            tracing::warn!(error = %err, "cannot signal remaining processes");
        }
    }

    /// Waits for what is left until the shared grace period ends, SIGKILLs the rest; then sync
    /// and power off in a VM. Returns only where there is no machine to power off.
    pub fn finish(self) {
        self.begin_shutdown();
        let deadline = *self.deadline.get().unwrap_or(&Instant::now());
        while Instant::now() < deadline && other_processes_exist() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = sys::signal_all(Signal::SIGKILL);
        if self.power_off {
            tracing::info!("powering off");
            let err = sys::power_off();
            tracing::error!(error = %err, "power off failed");
        }
    }
}

/// Whether any process other than PID 1 is left (zombies are reaped by the reaper thread).
/// Kernel threads (kthreadd, pid 2, and its children) never go away and do not count.
fn other_processes_exist() -> bool {
    std::fs::read_dir("/proc").is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { return false };
            pid > 2 && parent_of(pid).is_some_and(|ppid| ppid != 2)
        })
    })
}

/// The parent pid from `/proc/PID/stat` (the field after the parenthesized command name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Mount points from /proc/self/mountinfo (empty when /proc is not mounted yet).
fn mount_points() -> HashSet<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| info.lines().filter_map(|l| l.split(' ').nth(4)).map(str::to_owned).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_is_read_from_proc() {
        let me = std::process::id();
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw() as u32));
        assert_eq!(parent_of(u32::MAX), None);
    }
}
