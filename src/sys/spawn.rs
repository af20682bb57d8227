//! Starting a child: `clone(CLONE_VM | CLONE_VFORK)`, a few raw syscalls, `execve`.
//!
//! `fork` copies guestd's page tables and write-protects every page, so after each spawn guestd
//! takes a copy-on-write fault (and a TLB shootdown) for every page it touches until the child
//! has exec'd: measured, that was a quarter of guestd's CPU time per `/bin/true` round trip.
//! A vfork-style child shares guestd's memory instead, and guestd's calling thread sleeps until
//! the child has exec'd or exited (the other threads run on). std's `Command` can only do this
//! through `posix_spawn`, which cannot set supplementary groups, uid or gid, and std's own
//! `uid()/gid()` drop every supplementary group; so guestd does the child's part itself.
//!
//! Everything the child needs (paths, argv, envp, group list) is prepared in the parent. Because
//! the child runs on guestd's memory, it may only make raw system calls on that prepared data:
//! no allocation, no lock, no libc wrapper with process-wide effects (musl's `setuid` and
//! `setgroups` signal every thread of the caller: in this child they would signal guestd's).
//! Signals are blocked in the parent around the clone (every signal but the three musl reserves
//! for itself, which guestd never receives), so no guestd handler can run on the child's stack;
//! the child resets every disposition to the default before unblocking.
//! A failing step writes which step and errno into the parent's frame and exits with 127; the
//! parent reaps it and returns the error naming the step.
//!
//! A child meant for a cgroup of its own is started with `clone3(CLONE_INTO_CGROUP)`: the kernel
//! puts it there before it runs, so it and everything it forks are inside from the start. (Moving
//! it afterwards, by writing its pid to `cgroup.procs`, takes a lock whose first use after a
//! quiet spell waits for an RCU grace period: measured 5-19 ms per spawn on an idle machine.)
//! `clone3` returns in the child on the new stack, so the call and the child's jump into
//! `child_main` are one piece of assembly ([`clone3_vfork`]).

use std::ffi::{CString, c_int, c_void};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::AtomicI32;
use std::sync::{Mutex, PoisonError};

use nix::libc;

/// The identity the child switches to before `exec`.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// The full supplementary group list (`setgroups`), resolved before the spawn.
    pub groups: Vec<u32>,
}

/// Everything the child does to itself before `exec`, in this order:
/// 1. installs the given descriptors as 0, 1 and 2 and closes every other descriptor (they are
///    all close-on-exec, but an exec from a hung mount never gets that far, and a child must not
///    keep guestd's connections open while it hangs);
/// 2. `setsid()`: its own session and process group (pgid == pid), so signals and the timeout
///    reach every descendant with `kill(-pgid)`;
/// 3. with a PTY, `TIOCSCTTY` on fd 0 (the slave) to make it the controlling terminal;
/// 4. `oom_score_adj = 100`, best effort, like envd: user code dies before the agent under
///    memory pressure (done while still privileged: lowering needs CAP_SYS_RESOURCE);
/// 5. `setgroups` -> `setgid` -> `setuid` (in that order: after setuid the others fail);
/// 6. `chdir(cwd)`, after the switch, so the user's own permissions decide;
/// 7. with `nofile`, `prlimit64(RLIMIT_NOFILE)`: the open-file limit guestd was started with
///    (it raises its own, `sys::limits`);
/// 8. default dispositions for every signal and an empty signal mask (std's children get the
///    same: guestd ignores SIGPIPE, which would otherwise be inherited);
/// 9. `execve`.
#[derive(Debug)]
pub struct ChildSetup {
    pub controlling_tty: bool,
    /// `None`: keep guestd's identity (guestd is not root and the user is guestd's own).
    pub credentials: Option<Credentials>,
    pub cwd: CString,
    /// `RLIMIT_NOFILE` (soft, hard) to set in the child; None: inherit guestd's.
    pub nofile: Option<[u64; 2]>,
}

/// The program image: an absolute (or cwd-relative) path, argv (argv[0] included) and the
/// complete environment as `KEY=VALUE` strings.
#[derive(Debug)]
pub struct Exec {
    pub path: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
}

/// The child step that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Stdio,
    Setsid,
    ControllingTty,
    Setgroups,
    Setgid,
    Setuid,
    Chdir,
    OpenFileLimit,
    Exec,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Stdio => "installing stdin/stdout/stderr",
            Step::Setsid => "setsid",
            Step::ControllingTty => "making the PTY the controlling terminal",
            Step::Setgroups => "setgroups",
            Step::Setgid => "setgid",
            Step::Setuid => "setuid",
            Step::Chdir => "chdir to the working directory",
            Step::OpenFileLimit => "restoring the open-file limit",
            Step::Exec => "execve",
        })
    }
}

/// A child step failed: the step and the OS error. `io::Error::kind` of the whole error is the
/// OS error's kind, so callers can still tell "not found" from "permission denied".
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct StepError {
    pub step: Step,
    #[source]
    pub source: io::Error,
}

/// `clone3` refused to start the child in the given cgroup (an old kernel, a seccomp filter that
/// hides `clone3`, a cgroup removed or not writable): no child exists. The `io::ErrorKind` of the
/// whole error is the OS error's kind.
#[derive(Debug, thiserror::Error)]
#[error("starting the child in its cgroup (clone3): {source}")]
pub struct IntoCgroupError {
    #[source]
    pub source: io::Error,
}

/// What the child writes into the parent's frame: that it runs, then, if a step fails, the step
/// and its errno.
#[derive(Clone, Copy)]
enum Report {
    /// The child never ran an instruction: something killed it at birth.
    NotRun,
    Running,
    Failed(Step, c_int),
}

/// What the child reads: raw pointers into data the parent keeps alive across the clone.
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdio: [c_int; 3],
    controlling_tty: bool,
    /// (uid, gid, groups pointer, group count)
    credentials: Option<(libc::uid_t, libc::gid_t, *const libc::gid_t, usize)>,
    cwd: *const libc::c_char,
    nofile: Option<[u64; 2]>,
    report: *mut Report,
}

/// Stack of the child: it runs only `child_main` and raw syscalls (a few hundred bytes).
const CHILD_STACK: usize = 64 * 1024;

/// A child's stack, with an inaccessible guard page below it, so a child that somehow ran off
/// its stack would fault instead of writing over guestd's heap. Each spawn in flight has its
/// own: the calling thread sleeps until its child has exec'd or exited, which may take long (an
/// exec from a stuck FUSE or NFS mount), and other spawns must not wait for it. Stacks are
/// reused: up to [`SPARE_CHILD_STACKS`] wait in [`CHILD_STACKS`] for the next spawn.
struct ChildStack {
    base: *mut c_void,
}

// SAFETY: a private mapping with no shared references; whoever holds the value owns it.
unsafe impl Send for ChildStack {}

/// Stacks kept mapped between spawns (more than this only while spawns run concurrently).
const SPARE_CHILD_STACKS: usize = 4;

static CHILD_STACKS: Mutex<Vec<ChildStack>> = Mutex::new(Vec::new());

impl ChildStack {
    fn map() -> io::Result<ChildStack> {
        let page = page_size();
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK + page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the lowest page of the mapping just made.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            let error = io::Error::last_os_error();
            // SAFETY: unmapping what we mapped above.
            unsafe { libc::munmap(base, CHILD_STACK + page) };
            return Err(error);
        }
        Ok(ChildStack { base })
    }

    /// A spare stack, or a new one.
    fn take() -> io::Result<ChildStack> {
        let spare = CHILD_STACKS.lock().unwrap_or_else(PoisonError::into_inner).pop();
        spare.map_or_else(ChildStack::map, Ok)
    }

    /// Back to the spares (or unmapped when there are enough).
    fn give_back(self) {
        let mut spares = CHILD_STACKS.lock().unwrap_or_else(PoisonError::into_inner);
        if spares.len() < SPARE_CHILD_STACKS {
            spares.push(self);
        }
    }

    /// The lowest usable address (above the guard page), page aligned.
    fn lowest(&self) -> *mut c_void {
        (self.base as usize + page_size()) as *mut c_void
    }

    /// The 16-byte aligned top (stacks grow down).
    fn top(&self) -> *mut c_void {
        ((self.base as usize + page_size() + CHILD_STACK) & !15) as *mut c_void
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`; no child runs on it any more (its spawn returned).
        unsafe { libc::munmap(self.base, CHILD_STACK + page_size()) };
    }
}

/// The MMU page size (4 KiB on x86_64; 4, 16 or 64 KiB on aarch64 kernels).
fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

/// Starts `exec` with `stdio` as its fds 0, 1, 2 after `setup`; returns the child's pid.
///
/// With `cgroup` (a cgroup v2 directory) the child starts in that cgroup
/// (`clone3(CLONE_INTO_CGROUP)`), else in guestd's. If the kernel refuses, the spawn fails with
/// an [`IntoCgroupError`] and nothing was started.
///
/// The child's pid is stored in `child` by the kernel before the child runs (`CLONE_PARENT_SETTID`),
/// so another thread can tell this spawn's child from any other while the spawn is in flight (an
/// exec may take long). The caller must make sure nothing else reaps the child in the meantime
/// (guestd's PID-1 reaper leaves the children of spawns in flight alone): when a step fails, the
/// exited child is reaped here. Concurrent calls do not wait for each other.
pub fn spawn(
    exec: &Exec,
    stdio: [BorrowedFd<'_>; 3],
    setup: &ChildSetup,
    cgroup: Option<BorrowedFd<'_>>,
    child: &AtomicI32,
) -> io::Result<u32> {
    // Descriptors below 3 would be overwritten while installing the others: move them up
    // first (guestd normally has 0-2 open, so this only happens when it was started without).
    // (`try_clone_to_owned` is F_DUPFD_CLOEXEC from 3 up; the copies close when `moved` drops.)
    let mut moved: Vec<std::os::fd::OwnedFd> = Vec::new();
    let mut fds = [0; 3];
    for (slot, fd) in fds.iter_mut().zip(stdio) {
        *slot = if fd.as_raw_fd() < 3 {
            let high = fd.try_clone_to_owned()?;
            let raw = high.as_raw_fd();
            moved.push(high);
            raw
        } else {
            fd.as_raw_fd()
        };
    }
    let argv: Vec<*const libc::c_char> =
        exec.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp: Vec<*const libc::c_char> =
        exec.env.iter().map(|e| e.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let mut report = Report::NotRun;
    let args = ChildArgs {
        path: exec.path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdio: fds,
        controlling_tty: setup.controlling_tty,
        credentials: setup.credentials.as_ref().map(|c| (c.uid, c.gid, c.groups.as_ptr(), c.groups.len())),
        cwd: setup.cwd.as_ptr(),
        nofile: setup.nofile,
        report: &mut report,
    };
    let stack = ChildStack::take()?;
    let top = stack.top();

    let pid = {
        let _blocked = BlockedSignals::new()?;
        let arg = (&args as *const ChildArgs).cast_mut().cast();
        let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID;
        match cgroup {
            // SAFETY: `child_main` only makes raw syscalls on `args`, which (with everything it
            // points to) lives in this frame until clone returns; CLONE_VFORK suspends this
            // thread until the child has exec'd or exited, so the child's use of this memory
            // ends before we go on. `top` is the aligned end of the guarded child stack `stack`,
            // ours until returned. All signals are blocked, so no handler runs on the child's
            // stack. The kernel stores the child's pid into `child`, an AtomicI32 (the layout of
            // a pid_t) borrowed for the call; no TLS and no child tid are passed (their flags
            // are not set).
            None => match unsafe {
                libc::clone(
                    child_main,
                    top,
                    flags | libc::SIGCHLD,
                    arg,
                    child.as_ptr(),
                    std::ptr::null_mut::<c_void>(),
                    std::ptr::null_mut::<libc::pid_t>(),
                )
            } {
                -1 => Err(io::Error::last_os_error()),
                pid => Ok(pid),
            },
            Some(cgroup) => {
                let mut clone_args = CloneArgs {
                    flags: (flags as u64) | CLONE_INTO_CGROUP,
                    parent_tid: child.as_ptr() as u64,
                    exit_signal: libc::SIGCHLD as u64,
                    stack: stack.lowest() as u64,
                    stack_size: CHILD_STACK as u64,
                    cgroup: cgroup.as_raw_fd() as u64,
                    ..CloneArgs::default()
                };
                // SAFETY: as for `clone` above: the same child, arguments, stack (`lowest` and
                // CHILD_STACK span the same guarded region whose end is `top`) and pid slot;
                // `clone_args` lives in this frame for the call.
                let ret = unsafe { clone3_vfork(&mut clone_args, child_main, arg) };
                check(ret).map(|pid| pid as libc::pid_t).map_err(|errno| {
                    let source = io::Error::from_raw_os_error(errno);
                    io::Error::new(source.kind(), IntoCgroupError { source })
                })
            }
        }
    };
    stack.give_back();
    drop(moved);
    let pid = pid?;
    let error = match report {
        Report::Running => return Ok(pid as u32),
        Report::Failed(step, errno) => {
            let source = io::Error::from_raw_os_error(errno);
            io::Error::new(source.kind(), StepError { step, source })
        }
        // Seen with CLONE_INTO_CGROUP: Linux (6.18) kills a child started in a cgroup whose
        // `cgroup.kill` count differs from that of the parent's cgroup (`kill_seq`).
        Report::NotRun => {
            let source = io::Error::other("the child was killed before it ran");
            match cgroup {
                Some(_) => io::Error::other(IntoCgroupError { source }),
                None => source,
            }
        }
    };
    // The child has exited (after writing the report, or killed); collect it (see the doc comment).
    let pid = nix::unistd::Pid::from_raw(pid);
    while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(pid, None) {}
    Err(error)
}

/// `clone3`'s flag: start the child in the cgroup `CloneArgs::cgroup` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The kernel's `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `clone3(args)` whose child calls `child(arg)` on the stack `args` gives it and exits with its
/// return value; returns the raw result in the parent (the child's pid, or `-errno`).
///
/// The child comes back from the system call inside this assembly, on its own stack, and never
/// returns to Rust code that was compiled for the parent's frame: it calls `child` and then
/// `exit`s. The parent only loses the registers the system call itself clobbers.
///
/// # Safety
/// `args` must describe a valid clone whose `stack`/`stack_size` span memory the child may use
/// (16-byte aligned end); `child` must be safe to run there with `arg` (see `child_main`).
unsafe fn clone3_vfork(
    args: &mut CloneArgs,
    child: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
) -> libc::c_long {
    let ret: libc::c_long;
    // SAFETY: the caller vouches for `args`, `child` and `arg`; the child path ends in `exit`.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            // The child: rsp is the top of its stack (16-byte aligned, as `call` expects).
            "xor ebp, ebp",
            "mov rdi, r13",
            "call r12",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") child,
            in("r13") arg,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
        #[cfg(target_arch = "aarch64")]
        std::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            // The child: sp is the top of its stack (16-byte aligned).
            "mov x29, xzr",
            "mov x0, x21",
            "blr x20",
            "mov x8, {exit}",
            "svc 0",
            "brk #0",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("x0") args as *mut CloneArgs => ret,
            in("x1") std::mem::size_of::<CloneArgs>(),
            in("x8") libc::SYS_clone3,
            in("x20") child,
            in("x21") arg,
            options(nostack),
        );
    }
    ret
}

/// Blocks every signal in the calling thread until dropped.
struct BlockedSignals(libc::sigset_t);

impl BlockedSignals {
    fn new() -> io::Result<Self> {
        // SAFETY: plain sigset manipulation on locals; pthread_sigmask only affects this thread.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(Self(old))
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new` for this same thread.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}

/// The kernel's `struct sigaction` for `rt_sigaction` (not libc's, whose layout differs).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// A raw syscall's result: `Err(errno)` on failure. Reads errno from the return value, never
/// from the (parent thread's) `errno` variable.
fn check(ret: libc::c_long) -> Result<libc::c_long, c_int> {
    if (-4095..0).contains(&ret) { Err(-ret as c_int) } else { Ok(ret) }
}

/// Raw syscall without libc's errno handling.
///
/// # Safety
/// The arguments must be valid for syscall `nr`.
unsafe fn raw(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> Result<libc::c_long, c_int> {
    let ret: libc::c_long;
    // SAFETY: the x86_64/aarch64 Linux syscall ABI; the caller vouches for the arguments.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
        #[cfg(target_arch = "aarch64")]
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a => ret,
            in("x1") b, in("x2") c, in("x3") d,
            options(nostack),
        );
    }
    check(ret)
}

/// The child: runs on its own small stack inside guestd's memory until `execve`.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive until this child execs or exits.
    let a = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: `report` points into the parent's frame, which is suspended until we exec or exit.
    unsafe { *a.report = Report::Running };
    // SAFETY: every call below is a raw syscall on data prepared by the parent (see `spawn`).
    let result = unsafe { child_steps(a) };
    let Err((step, errno)) = result;
    // SAFETY: as above for `report`; exit ends this child.
    unsafe {
        *a.report = Report::Failed(step, errno);
        let _ = raw(libc::SYS_exit, 127, 0, 0, 0);
    }
    127
}

/// # Safety
/// Only from `child_main`, with the parent's `ChildArgs`.
unsafe fn child_steps(a: &ChildArgs) -> Result<std::convert::Infallible, (Step, c_int)> {
    use libc::*;
    // SAFETY: raw syscalls whose pointer arguments point to NUL-terminated strings, arrays and
    // structs the parent keeps alive and unmodified while we run.
    unsafe {
        for (target, &fd) in a.stdio.iter().enumerate() {
            raw(SYS_dup3, fd as usize, target, 0, 0).map_err(|e| (Step::Stdio, e))?;
        }
        // Best effort: close_range is Linux 5.9; without it exec closes them (all close-on-exec).
        let _ = raw(SYS_close_range, 3, u32::MAX as usize, 0, 0);
        raw(SYS_setsid, 0, 0, 0, 0).map_err(|e| (Step::Setsid, e))?;
        if a.controlling_tty {
            // 0: do not steal a terminal that is already some other session's.
            raw(SYS_ioctl, 0, TIOCSCTTY as usize, 0, 0).map_err(|e| (Step::ControllingTty, e))?;
        }
        // Best effort: no /proc (or a read-only one) must not fail the spawn.
        let path = c"/proc/self/oom_score_adj".as_ptr() as usize;
        if let Ok(fd) = raw(SYS_openat, AT_FDCWD as isize as usize, path, (O_WRONLY | O_CLOEXEC) as usize, 0) {
            let _ = raw(SYS_write, fd as usize, b"100".as_ptr() as usize, 3, 0);
            let _ = raw(SYS_close, fd as usize, 0, 0, 0);
        }
        if let Some((uid, gid, groups, count)) = a.credentials {
            raw(SYS_setgroups, count, groups as usize, 0, 0).map_err(|e| (Step::Setgroups, e))?;
            raw(SYS_setgid, gid as usize, 0, 0, 0).map_err(|e| (Step::Setgid, e))?;
            raw(SYS_setuid, uid as usize, 0, 0, 0).map_err(|e| (Step::Setuid, e))?;
        }
        raw(SYS_chdir, a.cwd as usize, 0, 0, 0).map_err(|e| (Step::Chdir, e))?;
        if let Some(limit) = &a.nofile {
            // `struct rlimit64` is two u64s; pid 0 is this process.
            let limit = limit as *const [u64; 2] as usize;
            raw(SYS_prlimit64, 0, RLIMIT_NOFILE as usize, limit, 0).map_err(|e| (Step::OpenFileLimit, e))?;
        }
        let default = KernelSigaction { handler: SIG_DFL, flags: 0, restorer: 0, mask: 0 };
        for signal in 1..=64 {
            if signal != SIGKILL && signal != SIGSTOP {
                let _ = raw(SYS_rt_sigaction, signal as usize, &default as *const _ as usize, 0, 8);
            }
        }
        let empty: u64 = 0;
        let _ = raw(SYS_rt_sigprocmask, SIG_SETMASK as usize, &empty as *const u64 as usize, 0, 8);
        let errno = raw(SYS_execve, a.path as usize, a.argv as usize, a.envp as usize, 0).err().unwrap_or(0);
        Err((Step::Exec, errno))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::{AsFd, OwnedFd};

    use super::*;

    fn exec(argv: &[&str]) -> Exec {
        let c = |s: &str| CString::new(s).unwrap();
        Exec { path: c(argv[0]), argv: argv.iter().map(|a| c(a)).collect(), env: vec![c("GUESTD_TEST=1")] }
    }

    fn setup(cwd: &str) -> ChildSetup {
        ChildSetup { controlling_tty: false, credentials: None, cwd: CString::new(cwd).unwrap(), nofile: None }
    }

    /// Spawns with stdout and stderr on one pipe; returns what the child wrote and its status.
    /// (These children are not registered with the reaper, which waits only for its own pids.)
    fn run(exec: &Exec, setup: &ChildSetup) -> io::Result<(String, i32)> {
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let (read, write) = crate::sys::fd::pipe().unwrap(); // close-on-exec: other tests spawn too
        let slot = AtomicI32::new(0);
        let pid = spawn(exec, [null.as_fd(), write.as_fd(), write.as_fd()], setup, None, &slot)?;
        assert_eq!(slot.load(std::sync::atomic::Ordering::SeqCst), pid as i32, "the pid is announced in the slot");
        drop(write);
        let mut out = String::new();
        std::fs::File::from(read).read_to_string(&mut out).unwrap();
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None).unwrap();
        let nix::sys::wait::WaitStatus::Exited(_, code) = status else { panic!("{status:?}") };
        Ok((out, code))
    }

    #[test]
    fn child_gets_its_stdio_cwd_env_session_and_a_clean_signal_state() {
        // SIGPIPE is ignored in Rust programs (guestd too): the child must not inherit that.
        let script = "echo out; echo err >&2; pwd; echo $GUESTD_TEST; \
                      read -r pid _ _ _ _ sid _ < /proc/self/stat; test $sid = $pid && echo session; \
                      grep -E '^Sig(Ign|Blk)' /proc/self/status";
        let (out, code) = run(&exec(&["/bin/sh", "-c", script]), &setup("/tmp")).unwrap();
        assert_eq!(code, 0, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..4], ["out", "err", "/tmp", "1"], "{out}");
        assert!(out.contains("session"), "the child leads its own session: {out}");
        assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    }

    /// Spawns from many threads at once share the one child stack safely.
    #[test]
    fn concurrent_spawns_each_run_their_own_program() {
        let threads: Vec<_> = (0..8)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..10 {
                        let word = format!("t{t}i{i}");
                        let (out, code) = run(&exec(&["/bin/echo", &word]), &setup("/")).unwrap();
                        assert_eq!((out.trim(), code), (word.as_str(), 0));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A source descriptor below 3 (guestd started with 0-2 closed, so its own pipes got those
    /// numbers) is moved out of the way first, and the copy is not leaked.
    #[test]
    fn low_source_descriptors_are_installed_correctly() {
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let (read, write) = crate::sys::fd::pipe().unwrap();
        // The test's own fd 2 stands in for a low-numbered source: the child's stderr.
        // SAFETY: fd 2 is open for the whole test process and outlives this borrow.
        let low = unsafe { BorrowedFd::borrow_raw(2) };
        let pid = spawn(
            &exec(&["/bin/sh", "-c", "echo moved"]),
            [null.as_fd(), write.as_fd(), low],
            &setup("/"),
            None,
            &AtomicI32::new(0),
        )
        .unwrap();
        drop(write);
        let mut out = String::new();
        std::fs::File::from(read).read_to_string(&mut out).unwrap();
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None).unwrap();
        assert_eq!(out, "moved\n");
    }

    /// The child keeps only its stdio: not even a descriptor guestd holds without close-on-exec
    /// (inherited from whoever started guestd) reaches it, and it holds none of guestd's while
    /// its exec is still under way.
    #[test]
    fn the_child_gets_no_descriptor_but_its_stdio() {
        let file = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: F_DUPFD (no close-on-exec) on a descriptor we own; the copy is closed below.
        let inheritable = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD, 200) };
        assert!(inheritable >= 200);
        let script = format!("test -e /proc/self/fd/{inheritable} && echo leaked || echo closed");
        let result = run(&exec(&["/bin/sh", "-c", &script]), &setup("/"));
        // SAFETY: the descriptor made above, closed once.
        unsafe { libc::close(inheritable) };
        let (out, code) = result.unwrap();
        assert_eq!((out.trim(), code), ("closed", 0));
    }

    /// The open-file limit guestd raised for itself goes back to what the child should see.
    #[test]
    fn the_child_gets_the_given_open_file_limit() {
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let soft = hard.min(256);
        let setup = ChildSetup { nofile: Some([soft, hard]), ..setup("/") };
        let (out, code) = run(&exec(&["/bin/sh", "-c", "ulimit -Sn"]), &setup).unwrap();
        assert_eq!((out.trim(), code), (soft.to_string().as_str(), 0));
    }

    #[test]
    fn a_failing_step_is_named() {
        let err = run(&exec(&["/bin/true"]), &setup("/nonexistent-guestd-dir")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(err.to_string(), "chdir to the working directory: No such file or directory (os error 2)");

        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("bad-interpreter");
        std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let err = run(&exec(&[script.to_str().unwrap()]), &setup("/")).unwrap_err();
        assert!(err.to_string().starts_with("execve: "), "{err}");
    }
}
