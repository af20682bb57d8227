//! `process.Process` over gRPC (and Connect, via `crate::connect`): decode → authorize → call
//! `crate::process::ProcessManager` → encode. Stream methods turn a domain `Subscription` into
//! `start`, `data`/`keepalive`…, `end` events.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::request_user;
use super::metadata::{Step, grpc_timeout, keepalive_interval, with_keepalives};
use crate::Agent;
use crate::process::{self as domain, Attached, CommandSpec, Event, ExitStatus, PtySize, Selector, StartSpec};
use crate::proto::process::process_server::Process;
use crate::proto::process::*;
use process_event::data_event::Output;

pub(crate) struct ProcessRpc {
    agent: Arc<Agent>,
}

impl ProcessRpc {
    pub(crate) fn new(agent: Arc<Agent>) -> ProcessRpc {
        ProcessRpc { agent }
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Process for ProcessRpc {
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let processes = self
            .agent
            .processes
            .list()
            .into_iter()
            .map(|p| ProcessInfo { config: Some(config_from(p.command)), pid: p.pid, tag: p.tag })
            .collect();
        Ok(Response::new(ListResponse { processes }))
    }

    type ConnectStream = EventStream<ConnectResponse>;

    async fn connect(&self, request: Request<ConnectRequest>) -> Result<Response<Self::ConnectStream>, Status> {
        let keepalive = keepalive_interval(request.metadata());
        let selector = selector(request.into_inner().process)?;
        let attached = self.agent.processes.connect(&selector)?;
        let events = process_events(attached, keepalive).map(|e| e.map(|event| ConnectResponse { event: Some(event) }));
        Ok(Response::new(Box::pin(events)))
    }

    type StartStream = EventStream<StartResponse>;

    async fn start(&self, request: Request<StartRequest>) -> Result<Response<Self::StartStream>, Status> {
        let defaults = self.agent.session.defaults();
        let user = request_user(&request, &defaults)?;
        let keepalive = keepalive_interval(request.metadata());
        let timeout = grpc_timeout(request.metadata());
        let req = request.into_inner();
        let config = req.process.ok_or_else(|| Status::invalid_argument("StartRequest.process is required"))?;
        let spec = StartSpec {
            command: command_from(config),
            user,
            default_workdir: defaults.workdir,
            sandbox_env: defaults.env,
            pty: req.pty.map(|p| pty_size(p.size)),
            tag: req.tag,
            // envd: an absent `stdin` means a pipe, for clients older than the flag.
            stdin: req.stdin.unwrap_or(true),
            timeout,
            replay: false,
        };
        let attached = self.agent.processes.start(spec).await?;
        let events = process_events(attached, keepalive).map(|e| e.map(|event| StartResponse { event: Some(event) }));
        Ok(Response::new(Box::pin(events)))
    }

    async fn update(&self, request: Request<UpdateRequest>) -> Result<Response<UpdateResponse>, Status> {
        let req = request.into_inner();
        let selector = selector(req.process)?;
        if let Some(pty) = req.pty {
            self.agent.processes.resize(&selector, pty_size(pty.size))?;
        }
        Ok(Response::new(UpdateResponse {}))
    }

    async fn stream_input(
        &self,
        request: Request<Streaming<StreamInputRequest>>,
    ) -> Result<Response<StreamInputResponse>, Status> {
        let mut inputs = request.into_inner();
        let mut target: Option<Selector> = None;
        while let Some(message) = inputs.message().await? {
            match message.event {
                Some(stream_input_request::Event::Start(start)) => target = Some(selector(start.process)?),
                Some(stream_input_request::Event::Data(data)) => {
                    let target = target.as_ref().ok_or_else(|| {
                        Status::failed_precondition(
                            "StreamInput: a data event arrived before the start event that selects the process",
                        )
                    })?;
                    self.write_input(target, data.input).await?;
                }
                Some(stream_input_request::Event::Keepalive(_)) => {}
                None => return Err(Status::unimplemented("StreamInput: event without start, data or keepalive")),
            }
        }
        Ok(Response::new(StreamInputResponse {}))
    }

    async fn send_input(&self, request: Request<SendInputRequest>) -> Result<Response<SendInputResponse>, Status> {
        let req = request.into_inner();
        self.write_input(&selector(req.process)?, req.input).await?;
        Ok(Response::new(SendInputResponse {}))
    }

    async fn send_signal(&self, request: Request<SendSignalRequest>) -> Result<Response<SendSignalResponse>, Status> {
        let req = request.into_inner();
        let target = selector(req.process)?;
        let signal = match Signal::try_from(req.signal) {
            Ok(Signal::Sigterm) => domain::Signal::Term,
            Ok(Signal::Sigkill) => domain::Signal::Kill,
            Ok(Signal::Unspecified) => return Err(Status::unimplemented("invalid signal: SIGNAL_UNSPECIFIED")),
            Err(_) => return Err(Status::unimplemented(format!("invalid signal: {}", req.signal))),
        };
        self.agent.processes.signal(&target, signal)?;
        Ok(Response::new(SendSignalResponse {}))
    }

    async fn close_stdin(&self, request: Request<CloseStdinRequest>) -> Result<Response<CloseStdinResponse>, Status> {
        self.agent.processes.close_stdin(&selector(request.into_inner().process)?)?;
        Ok(Response::new(CloseStdinResponse {}))
    }
}

impl ProcessRpc {
    async fn write_input(&self, target: &Selector, input: Option<ProcessInput>) -> Result<(), Status> {
        match input.and_then(|i| i.input) {
            Some(process_input::Input::Stdin(data)) => Ok(self.agent.processes.write_stdin(target, data).await?),
            Some(process_input::Input::Pty(data)) => Ok(self.agent.processes.write_pty(target, data).await?),
            None => Err(Status::unimplemented("invalid input: neither stdin nor pty set")),
        }
    }
}

fn selector(selector: Option<ProcessSelector>) -> Result<Selector, Status> {
    match selector.and_then(|s| s.selector) {
        Some(process_selector::Selector::Pid(pid)) => Ok(Selector::Pid(pid)),
        Some(process_selector::Selector::Tag(tag)) => Ok(Selector::Tag(tag)),
        None => Err(Status::unimplemented("invalid process selector: neither pid nor tag set")),
    }
}

fn pty_size(size: Option<pty::Size>) -> PtySize {
    let size = size.unwrap_or_default();
    let clamp = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
    PtySize { cols: clamp(size.cols), rows: clamp(size.rows) }
}

fn command_from(config: ProcessConfig) -> CommandSpec {
    let mut envs: Vec<(String, String)> = config.envs.into_iter().collect();
    // Proto maps are unordered; sort so the child's environment is deterministic.
    envs.sort();
    CommandSpec { cmd: config.cmd, args: config.args, envs, cwd: config.cwd }
}

fn config_from(command: CommandSpec) -> ProcessConfig {
    ProcessConfig { cmd: command.cmd, args: command.args, envs: command.envs.into_iter().collect(), cwd: command.cwd }
}

/// `start{pid}`, then output and keepalives, then `end`. A keepalive goes out after `keepalive`
/// without any event; the timer restarts after every data event (envd's rule).
fn process_events(attached: Attached, keepalive: Duration) -> impl Stream<Item = Result<ProcessEvent, Status>> {
    let Attached { pid, events } = attached;
    let start = ProcessEvent { event: Some(process_event::Event::Start(process_event::StartEvent { pid })) };
    let keepalive_event = || ProcessEvent { event: Some(process_event::Event::Keepalive(process_event::KeepAlive {})) };
    let events = futures_util::stream::unfold(events, |mut events| async move { Some((events.next().await?, events)) });
    with_keepalives(start, events, keepalive, keepalive_event, |next| match next {
        Ok(event) => match output_or_end(event) {
            Ok(output) => Step::Next(data_event(output)),
            Err(status) => Step::Last(Ok(end_event(status))),
        },
        Err(evicted) => Step::Last(Err(Status::aborted(evicted.to_string()))),
    })
}

/// A domain event as proto output, or the exit status that ends the stream.
fn output_or_end(event: Event) -> Result<Output, ExitStatus> {
    match event {
        Event::Stdout(b) => Ok(Output::Stdout(b)),
        Event::Stderr(b) => Ok(Output::Stderr(b)),
        Event::Pty(b) => Ok(Output::Pty(b)),
        Event::End(status) => Err(status),
    }
}

fn data_event(output: Output) -> ProcessEvent {
    ProcessEvent { event: Some(process_event::Event::Data(process_event::DataEvent { output: Some(output) })) }
}

fn end_event(status: ExitStatus) -> ProcessEvent {
    let end = process_event::EndEvent {
        exit_code: status.exit_code,
        exited: status.exited,
        status: status.status,
        error: status.error,
    };
    ProcessEvent { event: Some(process_event::Event::End(end)) }
}
