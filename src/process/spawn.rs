//! Turning a [`StartSpec`] into a running child.
//!
//! Everything that can be checked is checked in the parent before the fork, so errors name their
//! cause (missing cwd, executable not in the child's PATH, permission denied for the user)
//! instead of surfacing as a bare errno from `exec`. The spawn itself (`sys::spawn`, a
//! vfork-style clone) is registered with the reaper ([`reaper::spawn`]). All of it runs on the
//! blocking pool (see `ProcessManager::start`). The child's environment is an explicit value
//! built here: nothing is inherited from guestd's own environment.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, Metadata};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::unistd::Uid;

use super::cgroup::{Cgroup, Cgroups, Refused};
use super::reaper::{self, Exit};
use super::{ProcessError, StartSpec};
use crate::paths;
use crate::sys::fd::{self as sysfd, AsyncRawFd};
use crate::sys::pty;
use crate::sys::spawn::{self as sys_spawn, ChildSetup, Credentials, Exec, IntoCgroupError};
use crate::users::User;

/// A spawned, registered child and guestd's ends of its I/O.
pub(super) struct Launched {
    pub pid: u32,
    pub exit: Exit,
    pub io: ParentIo,
    /// The cgroup the child started in, if any.
    pub cgroup: Option<Cgroup>,
}

pub(super) enum ParentIo {
    Pipes { stdin: Option<Arc<AsyncRawFd>>, stdout: Arc<AsyncRawFd>, stderr: Arc<AsyncRawFd> },
    Pty { master: Arc<AsyncRawFd> },
}

pub(super) fn launch(
    path_env: &str,
    cgroups: Option<&Arc<Cgroups>>,
    spec: &StartSpec,
) -> Result<Launched, ProcessError> {
    let user = &spec.user;
    let name = &spec.command.cmd;
    let spawn_error = |source: io::Error| ProcessError::Spawn { cmd: name.clone(), source };

    let cwd = paths::resolve(spec.command.cwd.as_deref().unwrap_or(""), user, spec.default_workdir.as_deref())?;
    check_cwd(&cwd, user, name)?;
    let env = child_env(path_env, spec);
    let child_path = env.iter().find(|(key, _)| key == "PATH").map_or("", |(_, value)| value.as_str());
    let exe = find_executable(name, child_path, &cwd, user)?;
    let exec = program(&exe, name, &spec.command.args, &env).map_err(spawn_error)?;

    // Every descriptor guestd creates is close-on-exec; the child's ends are installed as its
    // 0/1/2 by the spawn and guestd's copies close when this function returns, so EOF/EIO
    // arrive when the child's side closes.
    let (child_stdio, io): ([OwnedFd; 3], ParentIo) = match spec.pty {
        Some(size) => {
            let pair = pty::open_pty(size.cols, size.rows).map_err(ProcessError::Pty)?;
            let slave = || pair.slave.try_clone().map_err(ProcessError::Pty);
            let stdio = [slave()?, slave()?, slave()?];
            (stdio, ParentIo::Pty { master: Arc::new(AsyncRawFd::new(pair.master).map_err(ProcessError::Pty)?) })
        }
        None => {
            let (child_stdin, stdin) = if spec.stdin {
                let (read, write) = sysfd::pipe().map_err(spawn_error)?;
                (read, Some(Arc::new(AsyncRawFd::new(write).map_err(spawn_error)?)))
            } else {
                (dev_null().map_err(spawn_error)?, None)
            };
            // The pump enlarges an output pipe once it finds it full (`io::PIPE_SIZE`).
            let output = || -> io::Result<(Arc<AsyncRawFd>, OwnedFd)> {
                let (read, write) = sysfd::pipe()?;
                Ok((Arc::new(AsyncRawFd::new(read)?), write))
            };
            let (stdout, child_stdout) = output().map_err(spawn_error)?;
            let (stderr, child_stderr) = output().map_err(spawn_error)?;
            ([child_stdin, child_stdout, child_stderr], ParentIo::Pipes { stdin, stdout, stderr })
        }
    };

    let credentials =
        needs_switch(user).then(|| Credentials { uid: user.uid, gid: user.gid, groups: user.groups.clone() });
    let cwd_c = CString::new(cwd.as_os_str().as_bytes()).map_err(|e| spawn_error(e.into()))?;
    let setup = ChildSetup {
        controlling_tty: spec.pty.is_some(),
        credentials,
        cwd: cwd_c,
        nofile: crate::sys::limits::child_nofile(),
    };
    let stdio = [child_stdio[0].as_fd(), child_stdio[1].as_fd(), child_stdio[2].as_fd()];
    let start = |cgroup: Option<&Cgroup>| {
        reaper::spawn(|child| sys_spawn::spawn(&exec, stdio, &setup, cgroup.map(Cgroup::fd), child))
    };
    let mut cgroup = cgroups.and_then(|c| c.create());
    let mut spawned = start(cgroup.as_ref());
    // Nothing was started: start it again elsewhere, or fail (see `Cgroups::refused`).
    while let (Err(error), Some(cgroups)) = (&spawned, cgroups)
        && let Some(refusal) = error.get_ref().and_then(|e| e.downcast_ref::<IntoCgroupError>())
        && let Some(refused) = cgroup.take()
        && let Refused::Retry(next) = cgroups.refused(refused, refusal)
    {
        cgroup = next;
        spawned = start(cgroup.as_ref());
    }
    let (pid, exit) = spawned.map_err(spawn_error)?;
    Ok(Launched { pid, exit, io, cgroup })
}

/// The image to exec: `exe` with argv[0] as the client named it, and the environment.
fn program(exe: &Path, name: &str, args: &[String], env: &[(String, String)]) -> io::Result<Exec> {
    let c = |bytes: Vec<u8>, what: &str| {
        CString::new(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} contains a NUL byte")))
    };
    let path = c(exe.as_os_str().as_bytes().to_vec(), "the command")?;
    let argv = std::iter::once(name)
        .chain(args.iter().map(String::as_str))
        .map(|arg| c(arg.as_bytes().to_vec(), "an argument"))
        .collect::<io::Result<_>>()?;
    let env = env
        .iter()
        .map(|(key, value)| c(format!("{key}={value}").into_bytes(), "an env var"))
        .collect::<io::Result<_>>()?;
    Ok(Exec { path, argv, env })
}

fn dev_null() -> io::Result<OwnedFd> {
    Ok(fs::File::open("/dev/null")?.into())
}

/// Root switches to every user (including root, to get root's own groups); a non-root guestd can
/// only run processes as itself and keeps its identity.
fn needs_switch(user: &User) -> bool {
    let me = Uid::effective();
    me.is_root() || me.as_raw() != user.uid
}

/// PATH, HOME, USER, LOGNAME, then the sandbox env, then the request's; later duplicates win and
/// take the position of their last occurrence (Go's `dedupEnv`, which envd relies on).
fn child_env(path_env: &str, spec: &StartSpec) -> Vec<(String, String)> {
    let user = &spec.user;
    let base = [
        ("PATH".to_owned(), path_env.to_owned()),
        ("HOME".to_owned(), user.home.to_string_lossy().into_owned()),
        ("USER".to_owned(), user.name.clone()),
        ("LOGNAME".to_owned(), user.name.clone()),
    ];
    let all: Vec<(String, String)> =
        base.into_iter().chain(spec.sandbox_env.iter().cloned()).chain(spec.command.envs.iter().cloned()).collect();
    let mut seen = HashSet::new();
    let mut deduped: Vec<(String, String)> =
        all.into_iter().rev().filter(|(key, _)| seen.insert(key.clone())).collect();
    deduped.reverse();
    deduped
}

fn check_cwd(cwd: &Path, user: &User, cmd: &str) -> Result<(), ProcessError> {
    let shown = || cwd.display().to_string();
    match fs::metadata(cwd) {
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
            Err(ProcessError::CwdMissing { cwd: shown() })
        }
        Err(source) => Err(ProcessError::Spawn { cmd: cmd.to_owned(), source }),
        Ok(meta) if !meta.is_dir() => Err(ProcessError::CwdNotDirectory { cwd: shown() }),
        Ok(_) => {
            // chdir needs search permission on the directory and every ancestor.
            let Ok(real) = fs::canonicalize(cwd) else {
                return Ok(()); // raced with a removal: the child's chdir reports it
            };
            for dir in real.ancestors() {
                if let Ok(meta) = fs::metadata(dir)
                    && !may_search_or_execute(user, &meta)
                {
                    return Err(ProcessError::PermissionDenied {
                        what: format!("access cwd '{}'", shown()),
                        user: user.name.clone(),
                    });
                }
            }
            Ok(())
        }
    }
}

enum Access {
    Granted,
    Denied,
    Missing,
}

/// Resolves `cmd` like `execvp` would in the child: a name with a `/` is taken as a path
/// (relative to the cwd), otherwise each PATH entry is tried in order (an empty entry means the
/// cwd); a match the user may not execute is skipped, and reported only if nothing better is
/// found.
fn find_executable(cmd: &str, path_env: &str, cwd: &Path, user: &User) -> Result<PathBuf, ProcessError> {
    let not_found = || ProcessError::ExecutableNotFound { cmd: cmd.to_owned(), path_env: path_env.to_owned() };
    let denied = |path: &Path| ProcessError::PermissionDenied {
        what: format!("execute '{}'", path.display()),
        user: user.name.clone(),
    };
    if cmd.is_empty() {
        return Err(not_found());
    }
    if cmd.contains('/') {
        let candidate = cwd.join(cmd); // join keeps an absolute `cmd` as is
        return match executable(&candidate, user) {
            Access::Granted => Ok(candidate),
            Access::Denied => Err(denied(&candidate)),
            Access::Missing => Err(not_found()),
        };
    }
    let mut first_denied = None;
    for dir in path_env.split(':') {
        let candidate = cwd.join(dir).join(cmd);
        match executable(&candidate, user) {
            Access::Granted => return Ok(candidate),
            Access::Denied => {
                first_denied.get_or_insert(candidate);
            }
            Access::Missing => {}
        }
    }
    match first_denied {
        Some(path) => Err(denied(&path)),
        None => Err(not_found()),
    }
}

fn executable(path: &Path, user: &User) -> Access {
    match fs::metadata(path) {
        Err(_) => Access::Missing,
        // execve on a directory fails with EACCES, and execvp keeps searching.
        Ok(meta) if meta.is_dir() => Access::Denied,
        Ok(meta) if may_search_or_execute(user, &meta) => Access::Granted,
        Ok(_) => Access::Denied,
    }
}

/// The Unix permission check of the `x` bit for `user`: search for a directory, execute for a
/// file. Root may search any directory but execute only files with some execute bit set.
fn may_search_or_execute(user: &User, meta: &Metadata) -> bool {
    let mode = meta.mode();
    if user.uid == 0 {
        return meta.is_dir() || mode & 0o111 != 0;
    }
    let shift = if meta.uid() == user.uid {
        6
    } else if user.groups.contains(&meta.gid()) {
        3
    } else {
        0
    };
    (mode >> shift) & 0o1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::CommandSpec;

    fn spec(envs: Vec<(&str, &str)>, sandbox: Vec<(&str, &str)>) -> StartSpec {
        let owned = |v: Vec<(&str, &str)>| v.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        StartSpec {
            command: CommandSpec { cmd: "env".into(), args: vec![], envs: owned(envs), cwd: None },
            user: crate::users::lookup("root").unwrap(),
            default_workdir: None,
            sandbox_env: owned(sandbox),
            pty: None,
            tag: None,
            stdin: false,
            timeout: None,
            replay: false,
        }
    }

    #[test]
    fn env_order_and_last_duplicate_wins() {
        let env = child_env(
            "/bin",
            &spec(vec![("A", "req"), ("HOME", "/h"), ("A", "req2")], vec![("A", "sandbox"), ("B", "sandbox")]),
        );
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            vec![
                ("PATH", "/bin"),
                ("USER", "root"),
                ("LOGNAME", "root"),
                ("B", "sandbox"),
                ("HOME", "/h"),
                ("A", "req2"),
            ]
        );
    }

    #[test]
    fn executable_lookup_uses_the_given_path_in_order() {
        let root = crate::users::lookup("root").unwrap();
        let found = find_executable("sh", "/nonexistent:/bin:/usr/bin", Path::new("/"), &root);
        assert_eq!(found.unwrap(), PathBuf::from("/bin/sh"));
        let missing = find_executable("sh", "/nonexistent", Path::new("/"), &root);
        assert!(matches!(missing, Err(ProcessError::ExecutableNotFound { .. })));
    }

    #[test]
    fn non_executable_file_is_permission_denied_not_missing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("script");
        fs::write(&file, "#!/bin/sh\n").unwrap();
        let root = crate::users::lookup("root").unwrap();
        let err = find_executable(file.to_str().unwrap(), "", Path::new("/"), &root).unwrap_err();
        assert!(matches!(err, ProcessError::PermissionDenied { .. }), "{err}");
    }
}
