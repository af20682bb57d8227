//! Processes in the guest: start one and stream its events ([`Client::run`]), re-attach to a
//! running or recently finished one by pid or tag ([`Client::attach`]), list, signal, feed
//! input, resize its PTY.

use std::collections::BTreeMap;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::{Client, ClientError};
use crate::proto::process::process_event::{self, data_event::Output as Data};
use crate::proto::process::{self as pb, ProcessEvent, ProcessInfo};

/// A command to start in the guest.
#[derive(Debug, Clone, Default)]
pub struct Command {
    pub cmd: String,
    pub args: Vec<String>,
    /// Added to the sandbox's environment for this process.
    pub envs: BTreeMap<String, String>,
    /// Working directory; the user's home (or the sandbox's default workdir) when unset.
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal of this size; output then arrives as [`RunEvent::Pty`].
    pub pty: Option<PtySize>,
    /// A name to find the process by later ([`Selector::Tag`]).
    pub tag: Option<String>,
    /// Keep stdin open for [`Client::send_input`]; otherwise the process reads EOF at once.
    pub stdin: bool,
}

impl Command {
    pub fn new(cmd: impl Into<String>) -> Command {
        Command { cmd: cmd.into(), ..Command::default() }
    }

    /// `/bin/sh -c SCRIPT`.
    pub fn shell(script: impl Into<String>) -> Command {
        Command::new("/bin/sh").arg("-c").arg(script)
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Command {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Command {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Command {
        self.envs.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Command {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn pty(mut self, size: PtySize) -> Command {
        self.pty = Some(size);
        self
    }

    pub fn tag(mut self, tag: impl Into<String>) -> Command {
        self.tag = Some(tag.into());
        self
    }

    pub fn stdin(mut self, open: bool) -> Command {
        self.stdin = open;
        self
    }

    fn to_request(&self) -> pb::StartRequest {
        pb::StartRequest {
            process: Some(pb::ProcessConfig {
                cmd: self.cmd.clone(),
                args: self.args.clone(),
                envs: self.envs.clone().into_iter().collect(),
                cwd: self.cwd.clone(),
            }),
            pty: self.pty.map(PtySize::to_proto),
            tag: self.tag.clone(),
            stdin: Some(self.stdin),
        }
    }
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

impl PtySize {
    fn to_proto(self) -> pb::Pty {
        pb::Pty { size: Some(pb::pty::Size { cols: self.cols.into(), rows: self.rows.into() }) }
    }
}

/// Which process a call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Pid(u32),
    Tag(String),
}

impl Selector {
    fn to_proto(&self) -> Option<pb::ProcessSelector> {
        let selector = match self {
            Selector::Pid(pid) => pb::process_selector::Selector::Pid(*pid),
            Selector::Tag(tag) => pb::process_selector::Selector::Tag(tag.clone()),
        };
        Some(pb::ProcessSelector { selector: Some(selector) })
    }
}

/// Signals guestd forwards (to the whole process group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// Bytes for a process: to its stdin pipe, or typed into its PTY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin(Bytes),
    Pty(Bytes),
}

impl Input {
    fn to_proto(&self) -> pb::ProcessInput {
        let input = match self {
            Input::Stdin(b) => pb::process_input::Input::Stdin(b.clone()),
            Input::Pty(b) => pb::process_input::Input::Pty(b.clone()),
        };
        pb::ProcessInput { input: Some(input) }
    }
}

/// How a process ended, as guestd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code; -1 when killed by a signal.
    pub code: i32,
    /// True when the process exited on its own (not by a signal).
    pub exited: bool,
    /// Go's `ProcessState.String()`: `exit status 3`, `signal: killed`.
    pub status: String,
    pub error: Option<String>,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.exited && self.code == 0
    }

    /// The signal that killed the process, parsed from guestd's status text.
    pub fn signal(&self) -> Option<i32> {
        let name = self.status.strip_prefix("signal: ")?;
        let name = name.strip_suffix(" (core dumped)").unwrap_or(name);
        if let Some(n) = name.strip_prefix("signal ") {
            return n.parse().ok();
        }
        SIGNAL_NAMES.iter().position(|n| *n == name).map(|i| i as i32 + 1)
    }

    /// What a shell would report: the exit code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match self.signal() {
            Some(signal) if !self.exited => 128 + signal,
            _ if self.exited => self.code,
            _ => 255,
        }
    }
}

/// Go's signal names for 1..=31, as guestd prints them (`src/process/status.rs`).
const SIGNAL_NAMES: [&str; 31] = [
    "hangup",
    "interrupt",
    "quit",
    "illegal instruction",
    "trace/breakpoint trap",
    "aborted",
    "bus error",
    "floating point exception",
    "killed",
    "user defined signal 1",
    "segmentation fault",
    "user defined signal 2",
    "broken pipe",
    "alarm clock",
    "terminated",
    "stack fault",
    "child exited",
    "continued",
    "stopped (signal)",
    "stopped",
    "stopped (tty input)",
    "stopped (tty output)",
    "urgent I/O condition",
    "CPU time limit exceeded",
    "file size limit exceeded",
    "virtual timer expired",
    "profiling timer expired",
    "window changed",
    "I/O possible",
    "power failure",
    "bad system call",
];

/// One event of a running process, in the order guestd saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    /// The last event.
    Exited(ExitStatus),
}

/// Everything a finished process wrote, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub status: ExitStatus,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Option<ProcessEvent>, tonic::Status>> + Send>>;

/// A started (or attached) process: its pid and its event stream. Dropping it detaches; the
/// process keeps running.
pub struct Execution {
    pub pid: u32,
    method: &'static str,
    events: EventStream,
    done: bool,
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution").field("pid", &self.pid).field("done", &self.done).finish_non_exhaustive()
    }
}

impl Execution {
    /// Waits for the `start` event that opens every process stream.
    async fn open(method: &'static str, mut events: EventStream) -> Result<Execution, ClientError> {
        loop {
            let event = match events.next().await {
                Some(Ok(event)) => event.and_then(|e| e.event),
                Some(Err(status)) => return Err(ClientError::rpc(method, status)),
                None => {
                    return Err(ClientError::Protocol {
                        what: method,
                        detail: "stream ended before the start event".into(),
                    });
                }
            };
            match event {
                Some(process_event::Event::Start(start)) => {
                    return Ok(Execution { pid: start.pid, method, events, done: false });
                }
                Some(process_event::Event::Keepalive(_)) => {}
                other => {
                    return Err(ClientError::Protocol {
                        what: method,
                        detail: format!("expected the start event first, got {other:?}"),
                    });
                }
            }
        }
    }

    /// The next output or the exit; `None` after [`RunEvent::Exited`]. Keepalives are skipped.
    pub async fn next(&mut self) -> Option<Result<RunEvent, ClientError>> {
        if self.done {
            return None;
        }
        loop {
            let event = match self.events.next().await {
                Some(Ok(event)) => event.and_then(|e| e.event),
                Some(Err(status)) => {
                    self.done = true;
                    return Some(Err(ClientError::rpc(self.method, status)));
                }
                None => {
                    self.done = true;
                    return Some(Err(ClientError::Protocol {
                        what: self.method,
                        detail: "stream ended without an end event".into(),
                    }));
                }
            };
            let event = match event {
                Some(process_event::Event::Data(data)) => match data.output {
                    Some(Data::Stdout(b)) => RunEvent::Stdout(b),
                    Some(Data::Stderr(b)) => RunEvent::Stderr(b),
                    Some(Data::Pty(b)) => RunEvent::Pty(b),
                    None => continue,
                },
                Some(process_event::Event::End(end)) => {
                    self.done = true;
                    RunEvent::Exited(ExitStatus {
                        code: end.exit_code,
                        exited: end.exited,
                        status: end.status,
                        error: end.error,
                    })
                }
                Some(process_event::Event::Keepalive(_)) | None => continue,
                Some(process_event::Event::Start(_)) => {
                    self.done = true;
                    return Some(Err(ClientError::Protocol {
                        what: self.method,
                        detail: "a second start event".into(),
                    }));
                }
            };
            return Some(Ok(event));
        }
    }

    /// Collects all output until the process exits.
    pub async fn wait(mut self) -> Result<Output, ClientError> {
        let (mut stdout, mut stderr, mut pty) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(event) = self.next().await {
            match event? {
                RunEvent::Stdout(b) => stdout.extend_from_slice(&b),
                RunEvent::Stderr(b) => stderr.extend_from_slice(&b),
                RunEvent::Pty(b) => pty.extend_from_slice(&b),
                RunEvent::Exited(status) => return Ok(Output { pid: self.pid, stdout, stderr, pty, status }),
            }
        }
        Err(ClientError::Protocol { what: self.method, detail: "stream ended without an end event".into() })
    }
}

impl Client {
    /// Starts `command`; returns once guestd reports its pid.
    #[tracing::instrument(name = "client.run", skip_all, fields(cmd = %command.cmd))]
    pub async fn run(&self, command: &Command) -> Result<Execution, ClientError> {
        const METHOD: &str = "Start";
        let stream = self
            .process_rpc()
            .start(command.to_request())
            .await
            .map_err(|s| ClientError::rpc(METHOD, s))?
            .into_inner()
            .map(|r| r.map(|m| m.event));
        Execution::open(METHOD, Box::pin(stream)).await
    }

    /// Starts `command` and collects its output until it exits.
    pub async fn output(&self, command: &Command) -> Result<Output, ClientError> {
        self.run(command).await?.wait().await
    }

    /// Attaches to a running (or just finished and retained) process. A process started with
    /// `replay` (the start command) delivers its output from the beginning.
    pub async fn attach(&self, process: &Selector) -> Result<Execution, ClientError> {
        const METHOD: &str = "Connect";
        let request = pb::ConnectRequest { process: process.to_proto() };
        let stream = self
            .process_rpc()
            .connect(request)
            .await
            .map_err(|s| ClientError::rpc(METHOD, s))?
            .into_inner()
            .map(|r| r.map(|m| m.event));
        Execution::open(METHOD, Box::pin(stream)).await
    }

    /// The processes guestd is running.
    pub async fn processes(&self) -> Result<Vec<ProcessInfo>, ClientError> {
        let response = self.process_rpc().list(pb::ListRequest {}).await.map_err(|s| ClientError::rpc("List", s))?;
        Ok(response.into_inner().processes)
    }

    /// Sends a signal to the process's group.
    pub async fn signal(&self, process: &Selector, signal: Signal) -> Result<(), ClientError> {
        let signal = match signal {
            Signal::Term => pb::Signal::Sigterm,
            Signal::Kill => pb::Signal::Sigkill,
        };
        let request = pb::SendSignalRequest { process: process.to_proto(), signal: signal.into() };
        self.process_rpc().send_signal(request).await.map_err(|s| ClientError::rpc("SendSignal", s))?;
        Ok(())
    }

    /// One piece of input (one RPC). For a steady stream use [`Client::stream_input`].
    pub async fn send_input(&self, process: &Selector, input: Input) -> Result<(), ClientError> {
        let request = pb::SendInputRequest { process: process.to_proto(), input: Some(input.to_proto()) };
        self.process_rpc().send_input(request).await.map_err(|s| ClientError::rpc("SendInput", s))?;
        Ok(())
    }

    /// Feeds `input` to the process over one client stream, in order; returns when `input` ends.
    pub async fn stream_input(
        &self,
        process: &Selector,
        input: impl Stream<Item = Input> + Send + 'static,
    ) -> Result<(), ClientError> {
        use pb::stream_input_request::{DataEvent, Event, StartEvent};
        let start = pb::StreamInputRequest { event: Some(Event::Start(StartEvent { process: process.to_proto() })) };
        let data =
            input.map(|i| pb::StreamInputRequest { event: Some(Event::Data(DataEvent { input: Some(i.to_proto()) })) });
        let requests = futures_util::stream::iter([start]).chain(data);
        self.process_rpc().stream_input(requests).await.map_err(|s| ClientError::rpc("StreamInput", s))?;
        Ok(())
    }

    /// Closes the process's stdin pipe (it reads EOF).
    pub async fn close_stdin(&self, process: &Selector) -> Result<(), ClientError> {
        let request = pb::CloseStdinRequest { process: process.to_proto() };
        self.process_rpc().close_stdin(request).await.map_err(|s| ClientError::rpc("CloseStdin", s))?;
        Ok(())
    }

    /// Resizes the process's PTY (the process gets SIGWINCH).
    pub async fn resize(&self, process: &Selector, size: PtySize) -> Result<(), ClientError> {
        let request = pb::UpdateRequest { process: process.to_proto(), pty: Some(size.to_proto()) };
        self.process_rpc().update(request).await.map_err(|s| ClientError::rpc("Update", s))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: i32, exited: bool, status: &str) -> ExitStatus {
        ExitStatus { code, exited, status: status.into(), error: None }
    }

    #[test]
    fn shell_codes() {
        assert_eq!(status(0, true, "exit status 0").shell_code(), 0);
        assert_eq!(status(3, true, "exit status 3").shell_code(), 3);
        assert_eq!(status(-1, false, "signal: killed").shell_code(), 137);
        assert_eq!(status(-1, false, "signal: terminated").shell_code(), 143);
        assert_eq!(status(-1, false, "signal: segmentation fault (core dumped)").shell_code(), 139);
        assert_eq!(status(-1, false, "signal 34").signal(), None);
        assert_eq!(status(-1, false, "signal: signal 34").shell_code(), 162);
        assert_eq!(status(-1, false, "wait: no child processes").shell_code(), 255);
    }
}
