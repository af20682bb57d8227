//! Behaviour tests of the process manager against real processes (they run as root: users are
//! switched, groups created).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use super::cgroup::Cgroups;
use super::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// A manager as guestd runs it: a cgroup per command where this machine allows it.
fn manager() -> ProcessManager {
    manager_with(Cgroups::detect().ok().map(Arc::new))
}

/// A manager whose commands share the test's cgroup: signals go to process groups.
fn manager_without_cgroups() -> ProcessManager {
    manager_with(None)
}

fn manager_with(cgroups: Option<Arc<Cgroups>>) -> ProcessManager {
    ProcessManager::new(ManagerConfig {
        path_env: crate::config::DEFAULT_PATH.into(),
        retention: Duration::from_secs(30),
        cgroups: CgroupSource::known(cgroups),
    })
}

/// The cgroups the cgroup tests use; None (saying why) where this machine has no writable
/// cgroup v2 hierarchy.
fn cgroups(test: &str) -> Option<Arc<Cgroups>> {
    Cgroups::detect().inspect_err(|reason| eprintln!("SKIPPED {test}: {reason}")).ok().map(Arc::new)
}

/// The user the tests run as: spawning as yourself needs no privileges.
fn me() -> User {
    crate::users::current().expect("the test user has a passwd entry")
}

/// Tests that switch to another user need root; elsewhere they skip, saying why.
fn running_as_root(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("SKIPPED {test}: switching users needs root");
    }
    root
}

fn spec(cmd: &str, args: &[&str]) -> StartSpec {
    StartSpec {
        command: CommandSpec {
            cmd: cmd.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            envs: vec![],
            cwd: None,
        },
        user: me(),
        default_workdir: None,
        sandbox_env: vec![],
        pty: None,
        tag: None,
        stdin: false,
        timeout: None,
        replay: false,
    }
}

fn sh(script: &str) -> StartSpec {
    spec("sh", &["-c", script])
}

#[derive(Debug, Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    end: Option<ExitStatus>,
}

impl Collected {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn end(&self) -> &ExitStatus {
        self.end.as_ref().expect("End received")
    }
}

/// Reads a subscription to its end (bounded by DEADLINE).
async fn collect(events: &mut Subscription) -> Collected {
    let mut out = Collected::default();
    tokio::time::timeout(DEADLINE, async {
        while let Some(event) = events.next().await {
            match event.expect("not evicted") {
                Event::Stdout(b) => out.stdout.extend_from_slice(&b),
                Event::Stderr(b) => out.stderr.extend_from_slice(&b),
                Event::Pty(b) => out.pty.extend_from_slice(&b),
                Event::End(status) => out.end = Some(status),
            }
        }
    })
    .await
    .expect("process ended in time");
    out
}

/// Reads output (any stream) until `needle` has appeared; returns everything read so far.
async fn read_until(events: &mut Subscription, needle: &str) -> String {
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            match events.next().await {
                Some(Ok(Event::Stdout(b) | Event::Stderr(b) | Event::Pty(b))) => seen.extend_from_slice(&b),
                other => panic!(
                    "stream ended before {needle:?} (got {other:?}); output so far: {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {needle:?}"));
    String::from_utf8_lossy(&seen).into_owned()
}

/// True when `pid` is gone or a zombie (dead, waiting for a reaper that is not us).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// The pid a command printed on its first line (`… & echo $!`).
async fn read_pid(events: &mut Subscription) -> u32 {
    read_until(events, "\n").await.trim().parse().expect("a pid on the first line")
}

/// SIGKILLs a process a test may have left behind (it may be gone already).
fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}

/// The name of the cgroup a new command of `pm` runs in (the last part of its `0::` line).
async fn cgroup_of_a_command(pm: &ProcessManager) -> String {
    let mut p = pm.start(sh("grep ^0:: /proc/self/cgroup")).await.unwrap();
    let out = String::from_utf8(collect(&mut p.events).await.stdout).unwrap();
    out.trim().rsplit('/').next().unwrap().to_owned()
}

async fn wait_dead(pid: u32) -> bool {
    for _ in 0..100 {
        if dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn exit_codes_and_status_text() {
    let pm = manager();
    let mut ok = pm.start(spec("true", &[])).await.unwrap();
    let ok_end = collect(&mut ok.events).await;
    assert_eq!(ok_end.end(), &ExitStatus { exit_code: 0, exited: true, status: "exit status 0".into(), error: None });
    let mut failed = pm.start(sh("exit 3")).await.unwrap();
    let end = collect(&mut failed.events).await;
    assert_eq!(end.end().exit_code, 3);
    assert!(end.end().exited);
    assert_eq!(end.end().error.as_deref(), Some("exit status 3"));
}

#[tokio::test]
async fn signal_deaths_are_reported_like_go() {
    let pm = manager();
    for (script, text) in [
        ("kill -TERM $$", "signal: terminated"),
        ("kill -HUP $$", "signal: hangup"),
        ("kill -INT $$", "signal: interrupt"),
        ("kill -PIPE $$", "signal: broken pipe"),
    ] {
        let mut p = pm.start(sh(script)).await.unwrap();
        let end = collect(&mut p.events).await;
        assert_eq!(end.end().status, text);
        assert_eq!(end.end().exit_code, -1);
        assert!(!end.end().exited);
    }
}

#[tokio::test]
async fn stdout_and_stderr_are_separate() {
    let pm = manager();
    let mut p = pm.start(sh("echo out; echo err >&2; echo out2")).await.unwrap();
    let out = collect(&mut p.events).await;
    assert_eq!(out.stdout(), "out\nout2\n");
    assert_eq!(out.stderr, b"err\n");
}

fn seq_output(n: u32) -> Vec<u8> {
    let mut expected = Vec::new();
    for i in 1..=n {
        expected.extend_from_slice(format!("{i}\n").as_bytes());
    }
    expected
}

#[tokio::test]
async fn twenty_megabytes_arrive_intact() {
    let pm = manager();
    let mut p = pm.start(spec("seq", &["1", "3000000"])).await.unwrap();
    let out = collect(&mut p.events).await;
    let expected = seq_output(3_000_000);
    assert!(expected.len() > 20_000_000);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected, "content differs");
    assert_eq!(out.end().exit_code, 0);
}

#[tokio::test]
async fn a_stalled_subscriber_is_evicted_and_does_not_hold_back_the_other() {
    let pm = manager();
    let mut reader = pm.start(spec("seq", &["1", "3000000"])).await.unwrap();
    let mut stalled = pm.connect(&Selector::Pid(reader.pid)).unwrap();
    let out = collect(&mut reader.events).await;
    assert!(out.stdout == seq_output(3_000_000), "reader got everything");
    assert_eq!(out.end().exit_code, 0);
    match stalled.events.next().await {
        Some(Err(SubscriptionError::Evicted { pid, behind_bytes })) => {
            assert_eq!(pid, reader.pid);
            assert!(behind_bytes > output::SUBSCRIBER_WINDOW);
        }
        other => panic!("expected eviction, got {other:?}"),
    }
    assert!(stalled.events.next().await.is_none());
}

#[tokio::test]
async fn dropped_subscriber_never_blocks_the_process() {
    let pm = manager();
    let p = pm.start(spec("seq", &["1", "3000000"])).await.unwrap();
    let pid = p.pid;
    drop(p.events);
    // Nobody is subscribed: the pumps keep reading, so the child finishes on its own.
    assert!(wait_for_exit(&pm, pid).await, "seq finished without readers");
}

async fn wait_for_exit(pm: &ProcessManager, pid: u32) -> bool {
    for _ in 0..500 {
        if !pm.list().iter().any(|p| p.pid == pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn stdin_is_echoed_by_cat_and_close_gives_eof() {
    let pm = manager();
    let mut s = spec("cat", &[]);
    s.stdin = true;
    let mut p = pm.start(s).await.unwrap();
    let sel = Selector::Pid(p.pid);
    pm.write_stdin(&sel, Bytes::from_static(b"hello\n")).await.unwrap();
    assert_eq!(read_until(&mut p.events, "hello\n").await, "hello\n");
    pm.close_stdin(&sel).unwrap();
    pm.close_stdin(&sel).unwrap_or_else(|e| {
        // Idempotent while the process lives; NotFound once it has already exited.
        assert!(matches!(e, ProcessError::NotFound(_)), "{e}");
    });
    let rest = collect(&mut p.events).await;
    assert_eq!(rest.end().exit_code, 0, "cat saw EOF and exited");
}

#[tokio::test]
async fn stdin_errors_name_the_cause() {
    let pm = manager();
    let p = pm.start(spec("sleep", &["1000"])).await.unwrap();
    let sel = Selector::Pid(p.pid);
    let err = pm.write_stdin(&sel, Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, ProcessError::StdinClosed { .. }), "{err}");
    pm.close_stdin(&sel).expect("closing a disabled stdin is fine");
    let err = pm.write_pty(&sel, Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, ProcessError::NotPty { .. }), "{err}");
    let err = pm.resize(&sel, PtySize { cols: 1, rows: 1 }).unwrap_err();
    assert!(matches!(err, ProcessError::NotPty { .. }), "{err}");
    pm.signal(&sel, Signal::Kill).unwrap();
}

#[tokio::test]
async fn a_full_stdin_pipe_makes_the_write_wait_not_fail() {
    let pm = manager();
    let mut s = sh("sleep 0.3; cat >/dev/null; echo done");
    s.stdin = true;
    let mut p = pm.start(s).await.unwrap();
    let sel = Selector::Pid(p.pid);
    // Far more than a pipe buffer: completes only once cat drains it.
    pm.write_stdin(&sel, Bytes::from(vec![b'x'; 8 << 20])).await.unwrap();
    pm.close_stdin(&sel).unwrap();
    let out = collect(&mut p.events).await;
    assert_eq!(out.stdout(), "done\n");
}

fn pty_spec(script: &str, cols: u16, rows: u16) -> StartSpec {
    let mut s = sh(script);
    s.pty = Some(PtySize { cols, rows });
    s
}

#[tokio::test]
async fn pty_is_a_terminal_of_the_requested_size() {
    let pm = manager();
    let mut p = pm.start(pty_spec("tty; stty size", 100, 30)).await.unwrap();
    let out = collect(&mut p.events).await;
    let text = String::from_utf8_lossy(&out.pty).into_owned();
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert!(text.contains("30 100\r\n"), "ONLCR and rows/cols: {text:?}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_eq!(out.end().exit_code, 0);
}

#[tokio::test]
async fn pty_resize_and_input_are_visible_to_the_child() {
    let pm = manager();
    let mut p = pm.start(pty_spec("stty size; read line; stty size", 80, 24)).await.unwrap();
    let sel = Selector::Pid(p.pid);
    read_until(&mut p.events, "24 80").await;
    pm.resize(&sel, PtySize { cols: 120, rows: 50 }).unwrap();
    pm.write_pty(&sel, Bytes::from_static(b"go\n")).await.unwrap();
    read_until(&mut p.events, "50 120").await;
    let err = pm.write_stdin(&sel, Bytes::from_static(b"x")).await.map(|()| "accepted").unwrap_or_else(|e| {
        if matches!(e, ProcessError::IsPty { .. } | ProcessError::NotFound(_)) { "rejected" } else { panic!("{e}") }
    });
    assert_eq!(err, "rejected");
    assert!(collect(&mut p.events).await.end.is_some());
}

#[tokio::test]
async fn pty_process_rejects_stdin_operations() {
    let pm = manager();
    let p = pm.start(pty_spec("sleep 1000", 80, 24)).await.unwrap();
    let sel = Selector::Pid(p.pid);
    let err = pm.close_stdin(&sel).unwrap_err();
    assert!(matches!(err, ProcessError::IsPty { .. }), "{err}");
    assert!(err.to_string().contains("Ctrl+D"));
    let err = pm.write_stdin(&sel, Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, ProcessError::IsPty { .. }), "{err}");
    pm.signal(&sel, Signal::Kill).unwrap();
}

#[tokio::test]
async fn signal_kills_the_whole_group() {
    for pm in [manager(), manager_without_cgroups()] {
        let mut p = pm.start(sh("sleep 1000 & echo $!; wait")).await.unwrap();
        let grandchild = read_pid(&mut p.events).await;
        assert!(!dead(grandchild));
        pm.signal(&Selector::Pid(p.pid), Signal::Kill).unwrap();
        let out = collect(&mut p.events).await;
        assert_eq!(out.end().status, "signal: killed");
        assert!(wait_dead(grandchild).await, "background sleep was killed too");
    }
}

/// With a cgroup per command, SIGTERM and SIGKILL also reach what left the process group
/// (`setsid`), and the End does not wait for the drain grace: nothing holds the pipe any more.
#[tokio::test]
async fn with_cgroups_a_signal_reaches_descendants_that_left_the_group() {
    let Some(cgroups) = cgroups("with_cgroups_a_signal_reaches_descendants_that_left_the_group") else { return };
    let pm = manager_with(Some(cgroups));
    for signal in [Signal::Term, Signal::Kill] {
        let mut p = pm.start(sh("setsid sleep 1000 & echo $!; wait")).await.unwrap();
        let escaped = read_pid(&mut p.events).await;
        pm.signal(&Selector::Pid(p.pid), signal).unwrap();
        let out = collect(&mut p.events).await;
        let killed = wait_dead(escaped).await;
        if !killed {
            sigkill(escaped);
        }
        assert!(killed, "{signal:?} reached the sleep that called setsid");
        assert!(out.end.is_some());
    }
}

#[tokio::test]
async fn with_cgroups_the_timeout_reaches_descendants_that_left_the_group() {
    let Some(cgroups) = cgroups("with_cgroups_the_timeout_reaches_descendants_that_left_the_group") else { return };
    let pm = manager_with(Some(cgroups));
    let mut s = sh("setsid sleep 1000 & echo $!; wait");
    s.timeout = Some(Duration::from_millis(300));
    let mut p = pm.start(s).await.unwrap();
    let escaped = read_pid(&mut p.events).await;
    let out = collect(&mut p.events).await;
    assert_eq!(out.end().status, "signal: killed");
    assert!(wait_dead(escaped).await, "the timeout reached the sleep that called setsid");
}

/// Each command starts in a cgroup of its own, in `guestd-commands`. An ended command's empty cgroup
/// serves a later command; shutdown removes them all.
#[tokio::test]
async fn with_cgroups_each_command_has_a_cgroup_of_its_own() {
    let Some(cgroups) = cgroups("with_cgroups_each_command_has_a_cgroup_of_its_own") else { return };
    let pm = manager_with(Some(Arc::clone(&cgroups)));
    let waiting = || StartSpec { stdin: true, ..sh("grep ^0:: /proc/self/cgroup; read -r _") };
    let (mut first, mut second) = (pm.start(waiting()).await.unwrap(), pm.start(waiting()).await.unwrap());
    let mut names = Vec::new();
    for p in [&mut first, &mut second] {
        let line = read_until(&mut p.events, "\n").await;
        let name = line.trim().rsplit('/').next().unwrap().to_owned();
        assert!(name.starts_with(&format!("guestd-{}-cmd-", std::process::id())), "{line}");
        assert!(cgroups.dir().join(&name).is_dir());
        names.push(name);
    }
    assert_ne!(names[0], names[1], "two commands at once, two cgroups");
    for p in [&first, &second] {
        pm.close_stdin(&Selector::Pid(p.pid)).unwrap();
    }
    collect(&mut first.events).await;
    collect(&mut second.events).await;
    drop((first, second));
    tokio::time::sleep(Duration::from_millis(100)).await; // the supervisors let go of them

    let third = cgroup_of_a_command(&pm).await;
    assert!(names.contains(&third), "an emptied cgroup is reused: {third}");
    pm.shutdown(Duration::from_secs(1)).await;
    for name in &names {
        assert!(!cgroups.dir().join(name).exists(), "{name} removed at shutdown");
    }
}

/// A daemon the command left running keeps its cgroup, which no other command gets; once the
/// daemon has gone, a later spawn removes the cgroup.
#[tokio::test]
async fn with_cgroups_a_cgroup_still_in_use_is_removed_by_a_later_spawn() {
    let Some(cgroups) = cgroups("with_cgroups_a_cgroup_still_in_use_is_removed_by_a_later_spawn") else { return };
    let pm = manager_with(Some(Arc::clone(&cgroups)));
    let mut p = pm
        .start(sh("setsid sleep 1000 >/dev/null 2>&1 </dev/null & echo $!; grep ^0:: /proc/self/cgroup"))
        .await
        .unwrap();
    let out = collect(&mut p.events).await;
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let daemon: u32 = lines.next().unwrap().parse().unwrap();
    let name = lines.next().unwrap().rsplit('/').next().unwrap().to_owned();
    drop(p);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let path = cgroups.dir().join(&name);
    assert!(path.exists(), "the daemon keeps {} in use", path.display());
    let other = cgroup_of_a_command(&pm).await;
    assert_ne!(other, name, "the daemon's cgroup is not reused");

    sigkill(daemon);
    assert!(wait_dead(daemon).await);
    let mut r = pm.start(spec("true", &[])).await.unwrap();
    collect(&mut r.events).await;
    assert!(!path.exists(), "a later spawn removed {}", path.display());
}

/// Starts a command that moves a process into a cgroup below its own (as a nested container
/// runtime does), then runs `rest`; returns it once it got so far, that process's pid and the
/// name of the command's cgroup.
async fn start_with_a_cgroup_below(pm: &ProcessManager, cgroups: &Cgroups, rest: &str) -> (Attached, u32, String) {
    let script = format!(
        "name=$(sed -n 's|^0::.*/||p' /proc/self/cgroup); mkdir {dir}/$name/below; \
         sleep 1000 >/dev/null 2>&1 </dev/null & echo $! > {dir}/$name/below/cgroup.procs; echo $! $name; {rest}",
        dir = cgroups.dir().display()
    );
    let mut p = pm.start(StartSpec { stdin: true, ..sh(&script) }).await.unwrap();
    let line = read_until(&mut p.events, "\n").await;
    let (below, name) = line.lines().next().unwrap().split_once(' ').unwrap();
    (p, below.parse().unwrap(), name.to_owned())
}

/// A process in a cgroup below the command's keeps the command's cgroup from being handed to a
/// later command; once it has gone, a later spawn removes both cgroups.
#[tokio::test]
async fn with_cgroups_a_process_in_a_cgroup_below_keeps_it_in_use() {
    let Some(cgroups) = cgroups("with_cgroups_a_process_in_a_cgroup_below_keeps_it_in_use") else { return };
    let pm = manager_with(Some(Arc::clone(&cgroups)));
    let (mut p, below, name) = start_with_a_cgroup_below(&pm, &cgroups, "true").await;
    collect(&mut p.events).await;
    drop(p);
    tokio::time::sleep(Duration::from_millis(100)).await; // released
    let other = cgroup_of_a_command(&pm).await;
    sigkill(below);
    assert_ne!(other, name, "{name} still holds a process below");

    assert!(wait_dead(below).await);
    let mut r = pm.start(spec("true", &[])).await.unwrap();
    collect(&mut r.events).await;
    assert!(!cgroups.dir().join(&name).exists(), "a later spawn removed {name} and the cgroup below");
}

/// SIGTERM reaches a process in a cgroup below the command's, as SIGKILL (`cgroup.kill`) does.
#[tokio::test]
async fn with_cgroups_sigterm_reaches_a_process_in_a_cgroup_below() {
    let Some(cgroups) = cgroups("with_cgroups_sigterm_reaches_a_process_in_a_cgroup_below") else { return };
    let pm = manager_with(Some(Arc::clone(&cgroups)));
    let (mut p, below, _) = start_with_a_cgroup_below(&pm, &cgroups, "read -r _").await;
    pm.signal(&Selector::Pid(p.pid), Signal::Term).unwrap();
    collect(&mut p.events).await;
    let reached = wait_dead(below).await;
    if !reached {
        sigkill(below);
    }
    assert!(reached, "SIGTERM reached the process below");
}

/// A killed command's cgroup is never handed to a later command (Linux would kill it at birth,
/// see `sys::spawn`): commands after a kill run, in cgroups of their own.
#[tokio::test]
async fn with_cgroups_commands_after_a_kill_run_normally() {
    let Some(cgroups) = cgroups("with_cgroups_commands_after_a_kill_run_normally") else { return };
    let pm = manager_with(Some(Arc::clone(&cgroups)));
    let mut p = pm.start(sh("echo up; sleep 1000")).await.unwrap();
    read_until(&mut p.events, "up\n").await;
    pm.signal(&Selector::Pid(p.pid), Signal::Kill).unwrap();
    assert_eq!(collect(&mut p.events).await.end().status, "signal: killed");
    drop(p);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await; // the killed one is released
        let mut q = pm.start(sh("echo ok")).await.unwrap();
        let out = collect(&mut q.events).await;
        assert_eq!((out.stdout.as_slice(), out.end().exit_code), (&b"ok\n"[..], 0));
    }
    assert!(cgroups.active());
}

/// A spare cgroup that went away meanwhile (another guestd's stale-cgroup sweep) is skipped.
#[tokio::test]
async fn with_cgroups_a_spare_removed_meanwhile_is_skipped() {
    let Some(cgroups) = cgroups("with_cgroups_a_spare_removed_meanwhile_is_skipped") else { return };
    let pm = manager_with(Some(Arc::clone(&cgroups)));
    let first = cgroup_of_a_command(&pm).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // released as a spare
    std::fs::remove_dir(cgroups.dir().join(&first)).unwrap();
    let second = cgroup_of_a_command(&pm).await;
    assert_ne!(first, second);
    assert!(second.starts_with("guestd-") && cgroups.active(), "{second}");
}

/// A spare killed from outside (a `cgroup.kill` on it, or on `guestd-commands` above it) can start
/// no child any more (Linux kills it at birth): the command starts in a new cgroup, and cgroups
/// stay on.
#[tokio::test]
async fn with_cgroups_a_spare_killed_from_outside_is_replaced() {
    let Some(cgroups) = cgroups("with_cgroups_a_spare_killed_from_outside_is_replaced") else { return };
    let pm = manager_with(Some(Arc::clone(&cgroups)));
    let first = cgroup_of_a_command(&pm).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // released as a spare
    std::fs::write(cgroups.dir().join(&first).join("cgroup.kill"), "1").unwrap();
    let second = cgroup_of_a_command(&pm).await;
    assert!(second.starts_with("guestd-") && second != first && cgroups.active(), "{first} then {second}");
    assert!(!cgroups.dir().join(&first).exists(), "the killed spare is removed");
}

/// A directory that is no cgroup: the kernel refuses to start the child there, the command
/// starts anyway (in guestd's cgroup), and later commands do not try again.
#[tokio::test]
async fn a_command_the_kernel_cannot_start_in_a_cgroup_starts_without() {
    let dir = tempfile::tempdir().unwrap();
    let cgroups = Arc::new(Cgroups::at(dir.path().to_owned()));
    let pm = manager_with(Some(Arc::clone(&cgroups)));
    for _ in 0..2 {
        let mut p = pm.start(sh("echo started")).await.unwrap();
        let out = collect(&mut p.events).await;
        assert_eq!(out.stdout, b"started\n");
        assert!(!cgroups.active(), "cgroups are off after the refusal");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left in the directory");
}

#[tokio::test]
async fn sigterm_is_reported_as_terminated() {
    let pm = manager();
    let mut p = pm.start(spec("sleep", &["1000"])).await.unwrap();
    pm.signal(&Selector::Pid(p.pid), Signal::Term).unwrap();
    let out = collect(&mut p.events).await;
    assert_eq!(out.end().status, "signal: terminated");
    assert_eq!(out.end().error.as_deref(), Some("signal: terminated"));
}

#[tokio::test]
async fn end_follows_the_signal_even_if_an_escaped_descendant_holds_the_pipe() {
    let pm = manager_without_cgroups();
    // setsid moves the sleep out of the group, so the group kill misses it and it keeps stdout.
    let mut p = pm.start(sh("setsid sleep 1000 & echo $!; echo ready; wait")).await.unwrap();
    let text = read_until(&mut p.events, "ready\n").await;
    let escaped: u32 = text.lines().next().unwrap().trim().parse().unwrap();
    pm.signal(&Selector::Pid(p.pid), Signal::Kill).unwrap();
    let started = std::time::Instant::now();
    let out = collect(&mut p.events).await;
    assert_eq!(out.end().status, "signal: killed");
    assert!(started.elapsed() < Duration::from_secs(5));
    sigkill(escaped);
}

#[tokio::test]
async fn timeout_kills_the_group() {
    let pm = manager();
    let mut s = sh("sleep 1000 & echo $!; wait");
    s.timeout = Some(Duration::from_millis(300));
    let mut p = pm.start(s).await.unwrap();
    let grandchild = read_pid(&mut p.events).await;
    let out = collect(&mut p.events).await;
    assert_eq!(out.end().status, "signal: killed");
    assert!(wait_dead(grandchild).await);
}

#[tokio::test]
async fn the_child_is_reaped_before_end() {
    let pm = manager();
    let mut p = pm.start(spec("true", &[])).await.unwrap();
    let out = collect(&mut p.events).await;
    assert!(out.end.is_some());
    assert!(!std::path::Path::new(&format!("/proc/{}", p.pid)).exists(), "no zombie left behind");
    assert!(pm.list().iter().all(|s| s.pid != p.pid));
}

#[tokio::test]
async fn environment_is_built_from_scratch_in_order() {
    let pm = manager();
    let mut s = spec("env", &[]);
    s.sandbox_env = vec![("A".into(), "sandbox".into()), ("B".into(), "sandbox".into())];
    s.command.envs = vec![("A".into(), "request".into())];
    let mut p = pm.start(s).await.unwrap();
    let out = collect(&mut p.events).await;
    let lines: HashSet<String> = out.stdout().lines().map(str::to_owned).collect();
    let me = me();
    let expected: HashSet<String> = [
        format!("PATH={}", crate::config::DEFAULT_PATH),
        format!("HOME={}", me.home.display()),
        format!("USER={}", me.name),
        format!("LOGNAME={}", me.name),
        "A=request".into(),
        "B=sandbox".into(),
    ]
    .into_iter()
    .collect();
    assert_eq!(lines, expected, "nothing inherited from guestd's environment");
}

#[tokio::test]
async fn cwd_defaults_to_workdir_then_home() {
    let pm = manager();
    let mut p = pm.start(spec("pwd", &[])).await.unwrap();
    assert_eq!(collect(&mut p.events).await.stdout(), format!("{}\n", me().home.display()));
    let mut s = spec("pwd", &[]);
    s.default_workdir = Some(PathBuf::from("/tmp"));
    let mut p = pm.start(s).await.unwrap();
    assert_eq!(collect(&mut p.events).await.stdout(), "/tmp\n");
    let mut s = spec("pwd", &[]);
    s.default_workdir = Some(PathBuf::from("/tmp"));
    s.command.cwd = Some("/usr".into());
    let mut p = pm.start(s).await.unwrap();
    assert_eq!(collect(&mut p.events).await.stdout(), "/usr\n");
}

#[tokio::test]
async fn runs_as_the_requested_user_as_root() {
    if !running_as_root("runs_as_the_requested_user_as_root") {
        return;
    }
    let pm = manager();
    let mut s = sh("id -u; id -g; echo $HOME $USER; pwd");
    s.user = crate::users::lookup("nobody").unwrap();
    s.default_workdir = Some(PathBuf::from("/tmp"));
    let mut p = pm.start(s).await.unwrap();
    let out = collect(&mut p.events).await;
    let nobody = crate::users::lookup("nobody").unwrap();
    assert_eq!(out.stdout(), format!("{}\n{}\n{} nobody\n/tmp\n", nobody.uid, nobody.gid, nobody.home.display()));
}

#[tokio::test]
async fn supplementary_groups_are_kept_as_root() {
    if !running_as_root("supplementary_groups_are_kept_as_root") {
        return;
    }
    let temp = crate::users::testing::TempUser::create("grp", true);
    let user = crate::users::lookup(&temp.name).unwrap();
    let extra = nix::unistd::Group::from_name(&temp.group).unwrap().unwrap().gid.as_raw();
    assert_eq!(user.groups.first(), Some(&user.gid));
    assert!(user.groups.contains(&extra));
    let pm = manager();
    let mut s = spec("id", &["-G"]);
    s.user = user.clone();
    s.default_workdir = Some(PathBuf::from("/tmp"));
    let mut p = pm.start(s).await.unwrap();
    let out = collect(&mut p.events).await;
    let groups: HashSet<u32> = out.stdout().split_whitespace().map(|g| g.parse().unwrap()).collect();
    assert_eq!(groups, user.groups.iter().copied().collect());
}

#[tokio::test]
async fn spawn_errors_name_their_cause_and_register_nothing() {
    let pm = manager();
    let err = pm.start(spec("definitely-not-a-command", &[])).await.err().unwrap();
    assert!(matches!(err, ProcessError::ExecutableNotFound { .. }), "{err}");
    assert_eq!(err.to_string(), "executable 'definitely-not-a-command' not found in PATH");

    let mut s = spec("true", &[]);
    s.command.cwd = Some("/nonexistent/dir".into());
    let err = pm.start(s).await.err().unwrap();
    assert_eq!(err.to_string(), "cwd '/nonexistent/dir' does not exist");

    let mut s = spec("true", &[]);
    s.command.cwd = Some("/etc/passwd".into());
    let err = pm.start(s).await.err().unwrap();
    assert_eq!(err.to_string(), "cwd '/etc/passwd' is not a directory");

    let mut s = spec("true", &[]);
    s.command.cwd = Some("~root/x".into());
    let err = pm.start(s).await.err().unwrap();
    assert!(matches!(err, ProcessError::Path(_)), "{err}");

    let mut s = spec("true", &[]);
    s.user = crate::users::lookup("nobody").unwrap();
    s.command.cwd = Some("/root".into());
    let err = pm.start(s).await.err().unwrap();
    assert_eq!(err.to_string(), "permission denied: user 'nobody' cannot access cwd '/root'");

    let mut s = spec("/etc/passwd", &[]);
    s.default_workdir = Some(PathBuf::from("/tmp"));
    let err = pm.start(s).await.err().unwrap();
    assert!(matches!(err, ProcessError::PermissionDenied { .. }), "{err}");

    assert!(pm.list().is_empty());
}

#[tokio::test]
async fn tag_lookup_finds_the_newest_live_match() {
    let pm = manager();
    let mut pids = Vec::new();
    for tag in ["a", "b", "a"] {
        let mut s = spec("sleep", &["1000"]);
        s.tag = Some(tag.into());
        pids.push(pm.start(s).await.unwrap().pid);
    }
    assert_eq!(pm.connect(&Selector::Tag("a".into())).unwrap().pid, pids[2]);
    assert_eq!(pm.connect(&Selector::Tag("b".into())).unwrap().pid, pids[1]);
    let err = pm.connect(&Selector::Tag("c".into())).err().unwrap();
    assert_eq!(err.to_string(), "process with tag 'c' not found");
    let listed: Vec<u32> = pm.list().iter().map(|p| p.pid).collect();
    assert_eq!(listed, pids, "list is in start order");
    assert_eq!(pm.list()[0].command.args, vec!["1000".to_owned()]);

    // With the newest "a" gone, the older one is found.
    let mut newest = pm.connect(&Selector::Pid(pids[2])).unwrap();
    pm.signal(&Selector::Pid(pids[2]), Signal::Kill).unwrap();
    collect(&mut newest.events).await;
    assert_eq!(pm.connect(&Selector::Tag("a".into())).unwrap().pid, pids[0]);
    for pid in [pids[0], pids[1]] {
        pm.signal(&Selector::Pid(pid), Signal::Kill).unwrap();
    }
}

#[tokio::test]
async fn finished_processes_are_retained_then_forgotten() {
    let pm = manager();
    let mut s = sh("exit 4");
    s.tag = Some("job".into());
    let mut p = pm.start(s).await.unwrap();
    let first = collect(&mut p.events).await;

    for sel in [Selector::Pid(p.pid), Selector::Tag("job".into())] {
        let mut again = pm.connect(&sel).unwrap();
        assert_eq!(again.pid, p.pid);
        let replay = collect(&mut again.events).await;
        assert!(replay.stdout.is_empty());
        assert_eq!(replay.end, first.end, "connect returns just the End");
    }
    assert!(pm.list().is_empty());

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(31)).await;
    let err = pm.connect(&Selector::Pid(p.pid)).err().unwrap();
    assert!(matches!(err, ProcessError::NotFound(_)));
    let err = pm.signal(&Selector::Pid(p.pid), Signal::Kill).unwrap_err();
    assert_eq!(err.to_string(), format!("process with pid {} not found", p.pid));
}

#[tokio::test]
async fn connect_to_a_live_process_sees_only_new_output() {
    let pm = manager();
    let mut s = sh("echo before; read x; echo after");
    s.stdin = true;
    let mut p = pm.start(s).await.unwrap();
    read_until(&mut p.events, "before\n").await;
    let mut late = pm.connect(&Selector::Pid(p.pid)).unwrap();
    pm.write_stdin(&Selector::Pid(p.pid), Bytes::from_static(b"\n")).await.unwrap();
    let out = collect(&mut late.events).await;
    assert_eq!(out.stdout(), "after\n");
    assert_eq!(collect(&mut p.events).await.stdout(), "after\n");
}

#[tokio::test]
async fn shutdown_terminates_then_kills_everything() {
    let pm = manager();
    let mut polite = pm.start(spec("sleep", &["1000"])).await.unwrap();
    let mut stubborn = pm.start(sh("trap '' TERM; echo ready; while :; do sleep 0.05; done")).await.unwrap();
    read_until(&mut stubborn.events, "ready").await;
    pm.shutdown(Duration::from_millis(300)).await;
    assert_eq!(collect(&mut polite.events).await.end().status, "signal: terminated");
    assert_eq!(collect(&mut stubborn.events).await.end().status, "signal: killed");
    assert!(pm.list().is_empty());
    assert!(pm.start(spec("true", &[])).await.is_err(), "no starts after shutdown");
}

/// Throughput of the whole domain path (pipe -> pump -> log -> subscription). Run with
/// `cargo test --release --lib throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run in release mode"]
async fn throughput_one_gib() {
    let pm = manager();
    let mut p = pm.start(spec("dd", &["if=/dev/zero", "bs=1M", "count=1024", "status=none"])).await.unwrap();
    let started = std::time::Instant::now();
    let mut total = 0usize;
    while let Some(event) = p.events.next().await {
        if let Event::Stdout(b) = event.unwrap() {
            total += b.len();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(total, 1 << 30);
    eprintln!("1 GiB in {secs:.3} s = {:.2} GB/s", total as f64 / secs / 1e9);
}

/// A start racing with shutdown (spawned after shutdown listed the processes) is ended too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_racing_shutdown_leaves_nothing_running() {
    let pm = manager();
    let starter = {
        let pm = pm.clone();
        tokio::spawn(async move {
            let mut pids = Vec::new();
            let mut subs = Vec::new();
            while let Ok(a) = pm.start(spec("sleep", &["1000"])).await {
                pids.push(a.pid);
                subs.push(a.events);
            }
            (pids, subs)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    pm.shutdown(Duration::from_millis(200)).await;
    let (pids, _subs) = starter.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alive: Vec<u32> = pids.iter().copied().filter(|&p| !dead(p)).collect();
    for &p in &alive {
        sigkill(p);
    }
    assert!(alive.is_empty(), "{} of {} still running after shutdown: {alive:?}", alive.len(), pids.len());
}

/// The leader exited and a descendant that left the group still holds stdout, so the process is
/// still live (no End yet): signalling it succeeds (as with envd, whose leader stays unreaped)
/// rather than failing with ESRCH, and the End follows.
#[tokio::test]
async fn a_kill_after_the_leader_exited_succeeds_while_an_escaped_descendant_holds_the_output() {
    let pm = manager_without_cgroups();
    let mut p = pm.start(sh("setsid sleep 1000 & echo $!")).await.unwrap();
    let escaped = read_pid(&mut p.events).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // sh has exited and been reaped
    assert!(dead(p.pid));
    assert_eq!(pm.list().len(), 1, "still live: the pipe is held");
    let result = pm.signal(&Selector::Pid(p.pid), Signal::Kill);
    let end = collect(&mut p.events).await;
    sigkill(escaped);
    assert!(end.end.is_some());
    result.expect("SendSignal on a live process");
}

/// A process that survives SIGTERM (handles it) and later exits normally keeps all its output,
/// even for a reader slower than the writer: the short drain is for killed leaders only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_after_a_survived_sigterm_is_complete() {
    let pm = manager();
    let mut p =
        pm.start(sh("trap 'echo got-term' TERM; echo ready; sleep 0.5; head -c 8000000 /dev/zero")).await.unwrap();
    read_until(&mut p.events, "ready").await;
    pm.signal(&Selector::Pid(p.pid), Signal::Term).unwrap();
    let mut n = 0usize;
    let mut end = None;
    while let Some(ev) = p.events.next().await {
        match ev.expect("not evicted") {
            Event::Stdout(b) => {
                n += b.iter().filter(|&&c| c == 0).count();
                tokio::time::sleep(Duration::from_millis(20)).await; // a slow client
            }
            Event::End(s) => end = Some(s),
            _ => {}
        }
    }
    assert_eq!(end.unwrap().exit_code, 0);
    assert_eq!(n, 8_000_000, "bytes received before End");
}

#[tokio::test]
async fn nothing_starts_once_shutdown_began() {
    let m = manager_without_cgroups();
    m.shutdown(Duration::from_millis(100)).await;
    let err = m.start(spec("/bin/true", &[])).await.err().expect("refused");
    assert!(matches!(&err, ProcessError::ShuttingDown { cmd } if cmd == "/bin/true"), "{err:?}");
    assert_eq!(err.to_string(), "cannot start '/bin/true': guestd is shutting down");
    assert!(m.list().is_empty());
}
