//! What a child does between `fork` and `exec`.
//!
//! std's `Command::uid()/gid()` call `setgroups(0)` and so drop every supplementary group, and
//! `pre_exec` runs after std's own setuid, so guestd sets credentials itself in `pre_exec` and
//! never uses `Command::uid/gid/current_dir`. Everything the closure needs (group list, cwd as a
//! C string) is computed before the fork: after `fork` in a multi-threaded process only
//! async-signal-safe calls are allowed, so the closure allocates nothing, takes no locks and
//! reads no files except `/proc/self/oom_score_adj`.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, chdir, setgid, setgroups, setsid, setuid};

/// The identity the child switches to before `exec`.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// The full supplementary group list (`setgroups`), resolved before the fork.
    pub groups: Vec<u32>,
}

/// Everything the child does to itself before `exec`, in this order:
/// 1. `setsid()`: its own session and process group (pgid == pid), so signals and the timeout
///    reach every descendant with `kill(-pgid)`;
/// 2. with a PTY, `TIOCSCTTY` on fd 0 (the slave) to make it the controlling terminal;
/// 3. `oom_score_adj = 100`, best effort, like envd: user code dies before the agent under
///    memory pressure (done while still privileged: lowering needs CAP_SYS_RESOURCE);
/// 4. `setgroups` -> `setgid` -> `setuid` (in that order: after setuid the others fail);
/// 5. `chdir(cwd)` last, so the user's own permissions decide whether the cwd is accessible.
#[derive(Debug)]
pub struct ChildSetup {
    pub controlling_tty: bool,
    /// `None`: keep guestd's identity (guestd is not root and the user is guestd's own).
    pub credentials: Option<Credentials>,
    pub cwd: CString,
}

/// Installs `setup` as the `pre_exec` step of `cmd`.
pub fn install(cmd: &mut Command, setup: ChildSetup) {
    let groups: Vec<Gid> =
        setup.credentials.as_ref().map(|c| c.groups.iter().copied().map(Gid::from_raw).collect()).unwrap_or_default();
    let ChildSetup { controlling_tty, credentials, cwd } = setup;
    let closure = move || -> io::Result<()> {
        setsid()?;
        if controlling_tty {
            // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal a terminal that is
            // already some other session's); fd 0 is the PTY slave std installed as stdin.
            let rc = unsafe { nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        set_oom_score_adj();
        if let Some(c) = &credentials {
            setgroups(&groups)?;
            setgid(Gid::from_raw(c.gid))?;
            setuid(Uid::from_raw(c.uid))?;
        }
        chdir(cwd.as_c_str())?;
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe syscalls (setsid, ioctl, open, write,
    // close, setgroups, setgid, setuid, chdir) on data captured before the fork; it allocates
    // nothing (nix takes `&CStr` paths and borrowed slices as is, errors are plain errno values)
    // and touches no lock or global state, so it is sound to run in the forked child.
    unsafe {
        cmd.pre_exec(closure);
    }
}

/// Best effort: a failure (no /proc, read-only proc) must not fail the spawn.
fn set_oom_score_adj() {
    if let Ok(fd) = open(c"/proc/self/oom_score_adj", OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty()) {
        let _ = nix::unistd::write(&fd, b"100");
    }
}
