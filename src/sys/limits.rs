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

/// Sets the nice value of the thread `tid` of this process (None: the calling thread); 19 is
/// the lowest priority, for work that should fill idle time. Best effort: raising a priority
/// needs CAP_SYS_NICE, which guestd has as root.
pub fn set_thread_nice(tid: Option<i32>, nice: i32) {
    let who = tid.unwrap_or(0);
    // SAFETY: setpriority takes no pointers; on Linux, PRIO_PROCESS names one thread (0: the
    // calling one), so no other thread of guestd is affected.
    let rc = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS as _, who as _, nice) };
    if rc != 0 {
        tracing::debug!(who, nice, error = %io::Error::last_os_error(), "cannot change a thread's priority");
    }
}
