//! The template's start command: run once per boot through the process manager (tag
//! `start_cmd`, output kept for late readers), optionally after the first `POST /init`, with an
//! optional ready command polled until it passes. `GET /ready` reports the result.
//!
//! Sources, highest precedence first: `/init` `startCmd` (if it arrives before the command has
//! run), `--start-cmd`, the config file (`/etc/guestd/start.conf`), the kernel command line
//! (`guestd.start_cmd=`, `guestd.start_cwd=`, `guestd.start_user=`, `guestd.ready_cmd=`).
//!
//! "Once per boot" survives guestd restarts: a marker in `/run` (a tmpfs, empty at every boot)
//! records that the command was started. A snapshot restore resumes guestd's memory, where
//! the boot state already says "started", so nothing runs again.
//!
//! Concurrency: one small mutex-guarded state machine, and a `watch` channel that wakes the boot
//! task when `/init` arrives. The boot task is the only writer of the phase.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::process::{CommandSpec, Event, ExitStatus, ProcessManager, StartSpec};
use crate::session::Session;
use crate::users;

/// Tag of the start command in the process table (`Connect` by tag reattaches to it).
pub const START_TAG: &str = "start_cmd";
/// Tag of each ready-command run.
pub const READY_TAG: &str = "ready_cmd";
/// How often the ready command is run until it passes (envd's orchestrator uses 2 s; 1 s halves
/// the expected readiness delay for a cost of one short process per second).
pub const READY_INTERVAL: Duration = Duration::from_secs(1);
/// Give up on the ready command after this long (envd's template builder waits 10 min).
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Marker recording that this boot's start command was started (see the module docs).
pub const RAN_MARKER: &str = "/run/guestd/start_cmd.started";
/// Default path of the start-command config file.
pub const CONFIG_FILE: &str = "/etc/guestd/start.conf";

/// The start command as configured at startup (before any `/init` override).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartConfig {
    pub cmd: Option<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub ready_cmd: Option<String>,
    /// Give up on the ready command after this long; None: [`READY_TIMEOUT`].
    pub ready_timeout: Option<Duration>,
    /// Wait up to this long for the first `/init` before starting (`--start-after-init`).
    pub after_init: Option<Duration>,
    /// Where the once-per-boot marker lives (tests point it elsewhere).
    pub marker: PathBuf,
}

impl StartConfig {
    /// Fills unset fields from `other` (a lower-precedence source).
    pub fn or(mut self, other: StartConfig) -> StartConfig {
        self.cmd = self.cmd.or(other.cmd);
        self.cwd = self.cwd.or(other.cwd);
        self.user = self.user.or(other.user);
        self.ready_cmd = self.ready_cmd.or(other.ready_cmd);
        self
    }
}

/// A bad start-command config file.
#[derive(Debug, thiserror::Error)]
pub enum StartConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `key = value` with key cmd, cwd, user or ready_cmd")]
    Syntax { path: PathBuf, line: usize },
}

/// Parses the config file: `key = value` lines (keys `cmd`, `cwd`, `user`, `ready_cmd`), `#`
/// comments and blank lines ignored; the value is the rest of the line, trimmed. A missing
/// file is an empty config.
pub fn read_config_file(path: &Path) -> Result<StartConfig, StartConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(StartConfig::default()),
        Err(source) => return Err(StartConfigError::Read { path: path.to_owned(), source }),
    };
    let mut config = StartConfig::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let syntax = || StartConfigError::Syntax { path: path.to_owned(), line: n + 1 };
        let (key, value) = line.split_once('=').ok_or_else(syntax)?;
        let value = Some(value.trim().to_owned());
        match key.trim() {
            "cmd" => config.cmd = value,
            "cwd" => config.cwd = value,
            "user" => config.user = value,
            "ready_cmd" => config.ready_cmd = value,
            _ => return Err(syntax()),
        }
    }
    Ok(config)
}

/// Reads `guestd.start_cmd=`, `guestd.start_cwd=`, `guestd.start_user=` and `guestd.ready_cmd=`
/// from a kernel command line. Values with spaces are double-quoted, as the kernel allows.
pub fn from_kernel_cmdline(cmdline: &str) -> StartConfig {
    let mut config = StartConfig::default();
    for param in split_cmdline(cmdline) {
        let Some((key, value)) = param.split_once('=') else { continue };
        let value = Some(value.to_owned());
        match key {
            "guestd.start_cmd" => config.cmd = value,
            "guestd.start_cwd" => config.cwd = value,
            "guestd.start_user" => config.user = value,
            "guestd.ready_cmd" => config.ready_cmd = value,
            _ => {}
        }
    }
    config
}

/// Splits a kernel command line like the kernel does: on spaces outside double quotes, quotes
/// removed.
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    params.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        params.push(current);
    }
    params
}

/// Where the boot sequence is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting for the first `/init` (`--start-after-init`).
    WaitingForInit,
    /// No start command configured (and none arrived through `/init`).
    NoCommand,
    /// A previous guestd of this boot already started it (the marker exists).
    StartedBefore,
    /// Running; the ready command has not passed yet.
    Starting { pid: u32 },
    /// Running and ready (the ready command passed, or there is none).
    Ready { pid: u32 },
    /// Exited. Ready only if it exited 0 without a failing ready check.
    Exited { pid: u32, status: ExitStatus },
    /// Could not be started, or the ready command never passed.
    Failed { error: String },
}

/// Readiness as `GET /ready` reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Readiness {
    #[serde(skip)]
    pub ready: bool,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub restore_epoch: u64,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// `/init` `startCmd`, honoured until the command has started.
    override_cmd: Option<String>,
    started: bool,
}

/// The boot sequence's shared state; `run` drives it.
#[derive(Debug)]
pub struct Boot {
    config: StartConfig,
    state: Mutex<State>,
    init_seen: watch::Sender<bool>,
}

impl Boot {
    pub fn new(config: StartConfig) -> Boot {
        let phase = if config.after_init.is_some() { Phase::WaitingForInit } else { Phase::NoCommand };
        Boot {
            config,
            state: Mutex::new(State { phase, override_cmd: None, started: false }),
            init_seen: watch::Sender::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `/init` `startCmd`: replaces the configured command if it has not started yet.
    pub fn override_start_cmd(&self, cmd: String) {
        let mut state = self.lock();
        if state.started {
            tracing::info!("ignoring /init startCmd: the start command already ran this boot");
        } else {
            state.override_cmd = Some(cmd);
        }
        drop(state);
        // A start command that arrives after boot found none still runs (once).
        self.init_seen.send_modify(|_| {});
    }

    /// Called after every applied `/init`.
    pub fn init_received(&self) {
        self.init_seen.send_replace(true);
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase.clone()
    }

    pub fn readiness(&self, restore_epoch: u64) -> Readiness {
        let r = |ready, state| Readiness {
            ready,
            state,
            pid: None,
            exit_code: None,
            status: None,
            error: None,
            restore_epoch,
        };
        match self.phase() {
            Phase::WaitingForInit => r(false, "waiting_for_init"),
            Phase::NoCommand => r(true, "no_start_command"),
            Phase::StartedBefore => r(true, "started_by_previous_guestd"),
            Phase::Starting { pid } => Readiness { pid: Some(pid), ..r(false, "starting") },
            Phase::Ready { pid } => Readiness { pid: Some(pid), ..r(true, "ready") },
            Phase::Exited { pid, status } => Readiness {
                pid: Some(pid),
                exit_code: Some(status.exit_code),
                ..r(status.exited && status.exit_code == 0, "exited")
            }
            .with_status(status.status),
            Phase::Failed { error } => Readiness { error: Some(error), ..r(false, "failed") },
        }
    }

    fn set_phase(&self, phase: Phase) {
        tracing::info!(?phase, "start command");
        self.lock().phase = phase;
    }

    /// Drives the boot sequence to its end. Spawn it once per guestd.
    pub async fn run(self: Arc<Self>, processes: ProcessManager, session: Session) {
        let mut init_seen = self.init_seen.subscribe();
        if let Some(limit) = self.config.after_init {
            let waited = tokio::time::timeout(limit, init_seen.wait_for(|seen| *seen)).await;
            if waited.is_err() {
                tracing::warn!(?limit, "no /init arrived in time; starting without it");
            }
        }
        let cmd = loop {
            // Chosen and marked started in one critical section: an /init startCmd arriving from
            // then on is refused as too late, never stored and silently dropped.
            let chosen = {
                let mut state = self.lock();
                let cmd = state.override_cmd.clone().or_else(|| self.config.cmd.clone());
                state.started = cmd.is_some();
                cmd
            };
            match chosen {
                Some(cmd) => break cmd,
                None => {
                    self.set_phase(Phase::NoCommand);
                    // A later /init may still bring one.
                    if init_seen.changed().await.is_err() {
                        return;
                    }
                }
            }
        };
        if self.config.marker.exists() {
            self.set_phase(Phase::StartedBefore);
            return;
        }
        let defaults = session.defaults();
        let user_name = self.config.user.clone().unwrap_or_else(|| defaults.user.clone());
        let user = match users::lookup(&user_name) {
            Ok(user) => user,
            Err(err) => return self.set_phase(Phase::Failed { error: format!("start command user: {err}") }),
        };
        let spec = StartSpec {
            command: shell_command(&cmd, self.config.cwd.clone()),
            user: user.clone(),
            default_workdir: defaults.workdir.clone(),
            sandbox_env: defaults.env.clone(),
            pty: None,
            tag: Some(START_TAG.to_owned()),
            stdin: false,
            timeout: None,
            replay: true,
        };
        mark_started(&self.config.marker);
        let mut attached = match processes.start(spec.clone()).await {
            Ok(attached) => attached,
            Err(err) => {
                return self.set_phase(Phase::Failed { error: crate::error_chain(&err) });
            }
        };
        let pid = attached.pid;
        self.set_phase(Phase::Starting { pid });
        let exited = async move {
            // Drain our own subscription: the process log keeps the output for late readers.
            while let Some(event) = attached.events.next().await {
                if let Ok(Event::End(status)) = event {
                    return Some(status);
                }
            }
            None
        };
        tokio::pin!(exited);
        let ready = self.wait_ready(&processes, &spec, pid);
        tokio::select! {
            status = &mut exited => return self.finish(pid, status),
            () = ready => {}
        }
        let status = exited.await;
        self.finish(pid, status);
    }

    /// Returns once the start command counts as ready (it may still be running).
    async fn wait_ready(&self, processes: &ProcessManager, start: &StartSpec, pid: u32) {
        let Some(ready_cmd) = &self.config.ready_cmd else {
            return self.set_phase(Phase::Ready { pid });
        };
        let limit = self.config.ready_timeout.unwrap_or(READY_TIMEOUT);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // An attempt that hangs (a probe of a port that never answers) is killed at the
            // deadline, so readiness fails on time instead of waiting for it forever. One that
            // starts just past it (after the pause below) still gets one interval.
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let spec = StartSpec {
                command: shell_command(ready_cmd, self.config.cwd.clone()),
                tag: Some(READY_TAG.to_owned()),
                replay: false,
                timeout: Some(remaining.max(READY_INTERVAL)),
                ..start.clone()
            };
            // How this attempt failed, for the error once the time is up.
            let failure = match processes.start(spec).await {
                Err(error) => crate::error_chain(&error),
                Ok(mut run) => {
                    let mut output = Vec::new();
                    loop {
                        match run.events.next().await {
                            Some(Ok(Event::Stdout(b) | Event::Stderr(b) | Event::Pty(b))) => {
                                output.extend_from_slice(&b);
                                output.drain(..output.len().saturating_sub(READY_OUTPUT_KEPT));
                            }
                            Some(Ok(Event::End(status))) if status.exited && status.exit_code == 0 => {
                                return self.set_phase(Phase::Ready { pid });
                            }
                            Some(Ok(Event::End(status)))
                                if !status.exited && tokio::time::Instant::now() >= deadline =>
                            {
                                break format!("still running at the deadline, {}", status.status);
                            }
                            Some(Ok(Event::End(status))) => break attempt_failure(&status.status, &output),
                            Some(Err(error)) => break error.to_string(),
                            None => break "its output stream ended without an exit".to_owned(),
                        }
                    }
                }
            };
            if tokio::time::Instant::now() >= deadline {
                self.set_phase(Phase::Failed {
                    error: format!(
                        "ready command did not pass within {}s; last attempt: {failure}",
                        limit.as_secs_f64()
                    ),
                });
                return std::future::pending().await;
            }
            tokio::time::sleep(READY_INTERVAL).await;
        }
    }

    fn finish(&self, pid: u32, status: Option<ExitStatus>) {
        let failed = matches!(self.phase(), Phase::Failed { .. });
        match status {
            Some(status) if !failed => self.set_phase(Phase::Exited { pid, status }),
            Some(_) => {}
            None => {
                self.set_phase(Phase::Failed { error: "start command's output stream ended without an exit".into() })
            }
        }
    }
}

impl Readiness {
    fn with_status(mut self, status: String) -> Readiness {
        self.status = Some(status);
        self
    }
}

/// The output of a ready-command attempt kept to explain its failure.
const READY_OUTPUT_KEPT: usize = 1024;

/// A failed ready-command attempt in one line: its status and the last line it printed.
fn attempt_failure(status: &str, output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    match text.lines().map(str::trim).rfind(|line| !line.is_empty()) {
        Some(line) => format!("{status}: {line}"),
        None => status.to_owned(),
    }
}

/// `/bin/bash -l -c CMD` as envd ran start commands (`/bin/sh -c` where there is no bash).
fn shell_command(cmd: &str, cwd: Option<String>) -> CommandSpec {
    let shell = if Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" };
    let mut args = Vec::new();
    if shell == "/bin/bash" {
        args.push("-l".to_owned());
    }
    args.extend(["-c".to_owned(), cmd.to_owned()]);
    CommandSpec { cmd: shell.to_owned(), args, envs: Vec::new(), cwd }
}

fn mark_started(marker: &Path) {
    let result = marker.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(marker, b""));
    if let Err(err) = result {
        tracing::warn!(marker = %marker.display(), error = %err, "cannot record that the start command ran");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cmdline_values_may_be_quoted() {
        let c = from_kernel_cmdline(
            r#"console=ttyS0 guestd.start_cmd="python3 -m http.server 8000" guestd.start_user=user quiet guestd.ready_cmd="curl -sf localhost:8000""#,
        );
        assert_eq!(c.cmd.as_deref(), Some("python3 -m http.server 8000"));
        assert_eq!(c.user.as_deref(), Some("user"));
        assert_eq!(c.ready_cmd.as_deref(), Some("curl -sf localhost:8000"));
        assert_eq!(c.cwd, None);
    }

    #[test]
    fn a_failed_ready_attempt_is_its_status_and_last_line() {
        assert_eq!(
            attempt_failure("exit status 7", b"starting\ncurl: (7) refused\n\n"),
            "exit status 7: curl: (7) refused"
        );
        assert_eq!(attempt_failure("signal: killed", b""), "signal: killed");
        assert_eq!(attempt_failure("exit status 1", b"\xff\xfe bad\n"), "exit status 1: \u{fffd}\u{fffd} bad");
    }

    #[test]
    fn config_file_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("start.conf");
        std::fs::write(
            &path,
            "# the app\ncmd = node server.js --port 3000\n\ncwd=/app\nready_cmd = curl -sf localhost:3000\n",
        )
        .unwrap();
        let c = read_config_file(&path).unwrap();
        assert_eq!(c.cmd.as_deref(), Some("node server.js --port 3000"));
        assert_eq!(c.cwd.as_deref(), Some("/app"));
        assert_eq!(c.ready_cmd.as_deref(), Some("curl -sf localhost:3000"));
        std::fs::write(&path, "command = x\n").unwrap();
        let err = read_config_file(&path).unwrap_err().to_string();
        assert!(err.contains(":1:"), "{err}");
        assert_eq!(read_config_file(&dir.path().join("missing")).unwrap(), StartConfig::default());
    }

    #[test]
    fn precedence_fills_only_unset_fields() {
        let flag = StartConfig { cmd: Some("flag".into()), ..Default::default() };
        let file = StartConfig { cmd: Some("file".into()), cwd: Some("/srv".into()), ..Default::default() };
        let merged = flag.or(file);
        assert_eq!(merged.cmd.as_deref(), Some("flag"));
        assert_eq!(merged.cwd.as_deref(), Some("/srv"));
    }
}
