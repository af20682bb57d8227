//! guestd's open-file limit. Every command holds four of guestd's descriptors (three pipes and a
//! pidfd), every connection and directory watch more: the usual soft limit of 1024 would cap a
//! busy sandbox at a few hundred commands. Like every Go program (envd included), guestd raises
//! its soft limit to the hard one at start, and gives each child the original soft limit back:
//! programs that use `select(2)` break on descriptors ≥ 1024, and a workload must see the limits
//! its image was built for.

use std::io;
use std::sync::OnceLock;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// What children get: (soft, hard) as guestd found them, set only if guestd raised its own.
static CHILD_NOFILE: OnceLock<[u64; 2]> = OnceLock::new();

/// The kernel's ceiling for any open-file limit (`fs.nr_open`, 1 MiB by default): a hard limit
/// of "unlimited" cannot be used as a soft limit.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20)
}

/// Raises `RLIMIT_NOFILE`'s soft limit to the hard one (at most `fs.nr_open`) and remembers the
/// original for children. Returns `(old, new)` soft limits when it raised anything.
pub fn raise_nofile() -> io::Result<Option<(u64, u64)>> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = hard.min(nr_open());
    if soft >= target {
        return Ok(None);
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    let _ = CHILD_NOFILE.set([soft, hard]);
    Ok(Some((soft, target)))
}

/// The `RLIMIT_NOFILE` (soft, hard) a child gets back, or None when guestd left its own alone.
pub fn child_nofile() -> Option<[u64; 2]> {
    CHILD_NOFILE.get().copied()
}

/// The calling thread's nice value (threads have their own on Linux), if it can be read.
pub fn this_threads_nice() -> Option<i32> {
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes no pointers; PRIO_PROCESS with who = 0 names the calling thread.
    let nice = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS as _, 0) };
    // -1 is a valid nice value: only errno tells an error apart.
    (nice != -1 || nix::errno::Errno::last_raw() == 0).then_some(nice)
}

/// Sets the calling thread's nice value, best effort: raising a priority back needs
/// CAP_SYS_NICE, which guestd has where it lowers one (as PID 1).
pub fn set_this_threads_nice(nice: i32) {
    // SAFETY: setpriority takes no pointers; PRIO_PROCESS with who = 0 names the calling thread,
    // so no other thread of guestd is affected.
    let rc = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS as _, 0, nice) };
    if rc != 0 {
        tracing::debug!(nice, error = %io::Error::last_os_error(), "cannot change this thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_nice_value_is_its_own() {
        let mine = this_threads_nice();
        let (own, other) = std::thread::spawn(|| {
            let before = this_threads_nice().unwrap();
            set_this_threads_nice(before + 3);
            let own = this_threads_nice();
            let other = std::thread::spawn(this_threads_nice).join().unwrap();
            (own.map(|n| n - before), other.map(|n| n - before))
        })
        .join()
        .unwrap();
        assert_eq!(own, Some(3), "lowered");
        assert_eq!(other, Some(3), "a new thread inherits its creator's value");
        assert_eq!(this_threads_nice(), mine, "and this thread kept its own");
    }
}
