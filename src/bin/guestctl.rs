//! `guestctl`: drive a guestd from the host shell — run commands, copy files, look around.
//! A thin shell over `guestd::client`; everything it does, a Rust program can do with that
//! module.
//!
//! Exit status: `run` and `attach` exit with the command's code (128 + N when signal N killed
//! it) and 255 when guestctl itself fails, as ssh does; every other subcommand exits 0 on
//! success and 1 on failure. Errors go to stderr as `guestctl: what failed: why: root cause`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use guestd::client::{
    Client, ClientOptions, Command, ConnectOptions, EntryInfo, FileType, GuestAddr, InitRequest, Input, NoProgress,
    Progress, PtySize, RunEvent, Selector, Signal,
};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncReadExt;

/// guestd's allocator (`guestd::sys::alloc` says why): under musl, plain `malloc` maps and unmaps
/// every received message of 128 KiB or more, which held a 1 GiB `run` to a third of its speed.
#[global_allocator]
static GLOBAL: guestd::sys::alloc::CachingAlloc = guestd::sys::alloc::CachingAlloc;

/// Exit code of `run`/`attach` when guestctl itself fails (ssh's convention).
const OWN_FAILURE: u8 = 255;

/// How much of stdin is forwarded per message: small enough for interactive latency, large
/// enough that piping a file in is not message-bound.
const STDIN_CHUNK: usize = 32 * 1024;

/// Drive a guestd from the host: run commands, copy files, look around.
#[derive(Debug, Parser)]
#[command(
    name = "guestctl",
    version,
    about,
    after_help = "Power a micro-VM guest off cleanly: `guestctl run -- kill -TERM 1` (guestd, as PID 1, stops \
                  serving, ends its processes and powers the machine off)."
)]
struct Cli {
    /// Where guestd is: tcp://HOST:PORT, vsock://CID:PORT, or unix:///path/to/v.sock:PORT (the
    /// hybrid-vsock socket of Firecracker, Cloud Hypervisor or vhost-device-vsock).
    #[arg(long, global = true, env = "GUESTD_ADDR", default_value = "tcp://127.0.0.1:49983")]
    addr: GuestAddr,

    /// Keep retrying the connection this long while the guest is not listening yet (e.g. 500ms,
    /// 30s, 2m; 0 = one attempt).
    #[arg(long, global = true, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    wait: Duration,

    /// Act as this guest user [default: guestd's default user].
    #[arg(long, global = true, env = "GUESTD_USER")]
    user: Option<String>,

    /// Access token, once `init --access-token` has set one.
    #[arg(long, global = true, env = "GUESTD_ACCESS_TOKEN", hide_env_values = true)]
    token: Option<String>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a command; stream its output; exit with its exit code.
    Run(RunArgs),
    /// Re-attach to a running process (or the retained output of a finished one) by pid or tag.
    Attach(Target),
    /// Copy a file between host and guest. Mark the guest side with `guest:` (e.g.
    /// `cp ./a guest:/tmp/a`, `cp guest:/etc/os-release .`); `-` is stdin or stdout.
    Cp {
        src: String,
        dst: String,
        /// No progress bar and no summary.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List a guest directory.
    Ls {
        #[arg(default_value = ".")]
        path: String,
        /// How many levels deep.
        #[arg(short, long, default_value_t = 1)]
        depth: u32,
    },
    /// Show a guest file's metadata.
    Stat { path: String },
    /// Print changes under a guest directory until interrupted.
    Watch {
        path: String,
        #[arg(short, long)]
        recursive: bool,
    },
    /// List the processes guestd runs.
    Ps,
    /// Signal a process (its whole process group).
    Kill {
        #[command(flatten)]
        target: Target,
        /// TERM or KILL.
        #[arg(short, long, default_value = "TERM", value_parser = parse_signal)]
        signal: Signal,
    },
    /// Configure the sandbox (POST /init): env vars for every later process, defaults, token.
    Init(InitArgs),
    /// Check that guestd answers (GET /health).
    Health,
    /// Show whether the start command is ready (GET /ready); exits 1 while it is not.
    Ready,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Allocate a PTY: raw local terminal (restored on exit), stdin forwarded, resized on SIGWINCH.
    #[arg(short = 't', long)]
    tty: bool,
    /// Forward stdin (without -t: to the command's stdin pipe, closed at EOF).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Working directory in the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Extra environment variable for this command (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Tag to find the process by (`attach --tag`, `kill --tag`).
    #[arg(long)]
    tag: Option<String>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// Process id in the guest.
    #[arg(long, conflicts_with = "tag")]
    pid: Option<u32>,
    /// Process tag (the start command's is `start_cmd`).
    #[arg(long)]
    tag: Option<String>,
}

impl Target {
    fn selector(&self) -> Selector {
        match (&self.pid, &self.tag) {
            (Some(pid), _) => Selector::Pid(*pid),
            (None, Some(tag)) => Selector::Tag(tag.clone()),
            // clap's group makes one of them required.
            (None, None) => Selector::Pid(0),
        }
    }
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Environment variable for every later process (repeatable; replaces the set of any earlier init).
    #[arg(short, long = "env", value_name = "K=V", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Require this token on every later request.
    #[arg(long)]
    access_token: Option<String>,
    /// User for requests that name none.
    #[arg(long)]
    default_user: Option<String>,
    /// Working directory for requests that name none.
    #[arg(long)]
    default_workdir: Option<String>,
    /// Start command, if the guest's has not started yet.
    #[arg(long)]
    start_cmd: Option<String>,
    /// Step the guest clock to the host's.
    #[arg(long)]
    sync_clock: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let own_failure = if matches!(cli.command, Cmd::Run(_) | Cmd::Attach(_)) { OWN_FAILURE } else { 1 };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("guestctl: cannot start the async runtime: {err}");
            return ExitCode::from(own_failure);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("guestctl: {}", guestd::error_chain(err.as_ref()));
            own_failure
        }
    };
    // A blocked stdin reader thread would keep the runtime from shutting down: exit directly.
    let _ = std::io::stdout().flush();
    std::process::exit(code.into());
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    let options = ClientOptions {
        connect: ConnectOptions { deadline: cli.wait, ..ConnectOptions::default() },
        user: cli.user,
        access_token: cli.token,
    };
    if let Cmd::Cp { src, dst, .. } = &cli.command {
        // Refuse a meaningless copy before dialing anything.
        copy_direction(src, dst)?;
    }
    let client = Client::connect(cli.addr, options).await?;
    match cli.command {
        Cmd::Run(args) => run(&client, args).await,
        Cmd::Attach(target) => {
            let execution = client.attach(&target.selector()).await?;
            stream_output(execution, None).await
        }
        Cmd::Cp { src, dst, quiet } => copy(&client, &src, &dst, quiet).await.map(|()| 0),
        Cmd::Ls { path, depth } => {
            let mut entries = client.list(&path, depth).await?;
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            let mut out = std::io::stdout().lock();
            for entry in &entries {
                writeln!(out, "{}", ls_line(entry))?;
            }
            Ok(0)
        }
        Cmd::Stat { path } => {
            let entry = client.stat(&path).await?;
            write_stat(&entry)?;
            Ok(0)
        }
        Cmd::Watch { path, recursive } => {
            let mut watcher = client.watch(&path, recursive).await?;
            let mut out = std::io::stdout();
            while let Some(event) = watcher.next().await {
                let event = event?;
                writeln!(out, "{} {}", event.kind.as_str_name().trim_start_matches("EVENT_TYPE_"), event.name)?;
                out.flush()?;
            }
            Ok(0)
        }
        Cmd::Ps => {
            let mut processes = client.processes().await?;
            processes.sort_by_key(|p| p.pid);
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:>7}  {:<12}  COMMAND", "PID", "TAG")?;
            for p in processes {
                let command = p.config.map(|c| std::iter::once(c.cmd).chain(c.args).collect::<Vec<_>>().join(" "));
                writeln!(out, "{:>7}  {:<12}  {}", p.pid, p.tag.unwrap_or_default(), command.unwrap_or_default())?;
            }
            Ok(0)
        }
        Cmd::Kill { target, signal } => {
            client.signal(&target.selector(), signal).await?;
            Ok(0)
        }
        Cmd::Init(args) => {
            let request = InitRequest {
                env_vars: (!args.env.is_empty()).then(|| args.env.into_iter().collect::<BTreeMap<_, _>>()),
                access_token: args.access_token,
                timestamp: args.sync_clock.then(SystemTime::now),
                default_user: args.default_user,
                default_workdir: args.default_workdir,
                start_cmd: args.start_cmd,
            };
            client.init(&request).await?;
            Ok(0)
        }
        Cmd::Ready => {
            let readiness = client.ready().await?;
            writeln!(std::io::stdout(), "{}", readiness.detail)?;
            Ok(if readiness.ready { 0 } else { 1 })
        }
        Cmd::Health => {
            let start = Instant::now();
            client.health().await?;
            writeln!(
                std::io::stdout(),
                "ok: {} answered in {:.1} ms",
                client.addr(),
                start.elapsed().as_secs_f64() * 1e3
            )?;
            Ok(0)
        }
    }
}

// ---- run / attach ------------------------------------------------------------------------

async fn run(client: &Client, args: RunArgs) -> Result<u8, Failure> {
    let mut parts = args.command.into_iter();
    let mut command = Command::new(parts.next().unwrap_or_default()).args(parts);
    command.envs = args.env.into_iter().collect();
    command.cwd = args.cwd;
    command.tag = args.tag;
    if args.tty {
        let local_tty = std::io::stdin().is_terminal();
        command = command.pty(terminal_size().unwrap_or(PtySize { cols: 80, rows: 24 })).stdin(true);
        // Raw mode before the process starts, so no keystroke is cooked locally.
        let raw = if local_tty { Some(RawMode::enable()?) } else { None };
        let execution = client.run(&command).await?;
        let selector = Selector::Pid(execution.pid);
        spawn_stdin_forwarder(client.clone(), selector.clone(), true);
        spawn_resizer(client.clone(), selector);
        let code = stream_output(execution, None).await;
        drop(raw);
        return code;
    }
    command = command.stdin(args.interactive);
    let execution = client.run(&command).await?;
    let selector = Selector::Pid(execution.pid);
    if args.interactive {
        spawn_stdin_forwarder(client.clone(), selector.clone(), false);
    }
    stream_output(execution, Some((client.clone(), selector))).await
}

/// Copies output to stdout/stderr until the process exits; returns its shell exit code. With
/// `signals`, the first SIGINT/SIGTERM to guestctl sends SIGTERM to the process, the next SIGKILL.
async fn stream_output(
    execution: guestd::client::Execution,
    signals: Option<(Client, Selector)>,
) -> Result<u8, Failure> {
    let output = OutputWriter::start()?;
    let result = copy_output(execution, signals, &output).await;
    // Everything received is written before guestctl exits; a write error (say, a closed pipe)
    // is what ended the copy if it failed.
    output.finish()?;
    result
}

async fn copy_output(
    mut execution: guestd::client::Execution,
    signals: Option<(Client, Selector)>,
    output: &OutputWriter,
) -> Result<u8, Failure> {
    let (interrupts_tx, mut interrupts) = tokio::sync::mpsc::channel::<()>(4);
    if signals.is_some() {
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
                if interrupts_tx.send(()).await.is_err() {
                    return;
                }
            }
        });
    }
    let mut interrupted = 0;
    loop {
        let event = tokio::select! {
            event = execution.next() => event,
            Some(()) = interrupts.recv() => {
                if let Some((client, selector)) = &signals {
                    let signal = if interrupted == 0 { Signal::Term } else { Signal::Kill };
                    interrupted += 1;
                    if let Err(err) = client.signal(selector, signal).await {
                        eprintln!("guestctl: {}", guestd::error_chain(&err));
                    }
                }
                continue;
            }
        };
        match event {
            Some(Ok(RunEvent::Stdout(b) | RunEvent::Pty(b))) => output.write(Sink::Stdout, b).await?,
            Some(Ok(RunEvent::Stderr(b))) => output.write(Sink::Stderr, b).await?,
            Some(Ok(RunEvent::Exited(status))) => {
                return Ok(u8::try_from(status.shell_code().rem_euclid(256)).unwrap_or(OWN_FAILURE));
            }
            Some(Err(err)) => return Err(err.into()),
            None => return Err("the process stream ended without an exit status".into()),
        }
    }
}

#[derive(Clone, Copy)]
enum Sink {
    Stdout,
    Stderr,
}

/// Writes process output to guestctl's stdout and stderr from one thread of its own. tokio's
/// `stdout()` hands every write and every flush to the blocking pool — two thread hops per
/// output message —, which held a 1 GiB stream to ~550 MB/s and left guestd waking up for a
/// client that could not keep up.
struct OutputWriter {
    queue: tokio::sync::mpsc::Sender<(Sink, Bytes)>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl OutputWriter {
    /// Messages waiting for the thread; when they are this many, the stream is not read further,
    /// so a slow terminal holds back guestd (flow control) rather than filling guestctl's memory.
    const QUEUE: usize = 16;

    fn start() -> Result<OutputWriter, Failure> {
        let (queue, mut messages) = tokio::sync::mpsc::channel::<(Sink, Bytes)>(Self::QUEUE);
        let thread = std::thread::Builder::new().name("output".into()).spawn(move || {
            let mut stdout = std::io::stdout().lock();
            let mut stderr = std::io::stderr().lock();
            while let Some((sink, data)) = messages.blocking_recv() {
                match sink {
                    Sink::Stdout => stdout.write_all(&data)?,
                    Sink::Stderr => stderr.write_all(&data)?,
                }
                // Flushed whenever the queue runs dry: a terminal shows output at once.
                if messages.is_empty() {
                    stdout.flush()?;
                }
            }
            stdout.flush()
        })?;
        Ok(OutputWriter { queue, thread })
    }

    /// Queues `data`; fails only when the thread has stopped on a write error (which `finish`
    /// then reports, e.g. a closed pipe).
    async fn write(&self, sink: Sink, data: Bytes) -> Result<(), Failure> {
        self.queue.send((sink, data)).await.map_err(|_| "writing the output failed".into())
    }

    /// Waits until everything queued is written; the first write error, if any.
    fn finish(self) -> Result<(), Failure> {
        drop(self.queue);
        match self.thread.join() {
            Ok(written) => written.map_err(|err| format!("writing the output: {err}").into()),
            Err(_) => Err("the output thread panicked".into()),
        }
    }
}

/// Forwards guestctl's stdin to the process: PTY input, or its stdin pipe (closed at EOF).
fn spawn_stdin_forwarder(client: Client, selector: Selector, pty: bool) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Input>(16);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    let input = if pty { Input::Pty(data) } else { Input::Stdin(data) };
                    if tx.send(input).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        let input = tokio_stream::wrappers::ReceiverStream::new(rx);
        // The process may exit before its input ends; that error is not worth reporting.
        if client.stream_input(&selector, input).await.is_ok() && !pty {
            let _ = client.close_stdin(&selector).await;
        }
    });
}

/// Tells guestd the new terminal size on every SIGWINCH.
fn spawn_resizer(client: Client, selector: Selector) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut winch) = signal(SignalKind::window_change()) else { return };
        while winch.recv().await.is_some() {
            if let Some(size) = terminal_size()
                && client.resize(&selector, size).await.is_err()
            {
                return;
            }
        }
    });
}

fn terminal_size() -> Option<PtySize> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (size.ws_col > 0 && size.ws_row > 0).then_some(PtySize { cols: size.ws_col, rows: size.ws_row })
}

/// The local terminal in raw mode; the saved mode comes back on drop.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enable() -> Result<RawMode, Failure> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).map_err(|e| format!("reading the terminal mode: {e}"))?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .map_err(|e| format!("switching the terminal to raw mode: {e}"))?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &self.saved);
    }
}

// ---- cp ------------------------------------------------------------------------------------

/// Marks the guest side of `cp`.
const GUEST_PREFIX: &str = "guest:";

async fn copy(client: &Client, src: &str, dst: &str, quiet: bool) -> Result<(), Failure> {
    let start = Instant::now();
    let bar = progress_bar(quiet);
    let progress: Arc<dyn Progress> = match &bar {
        Some(bar) => Arc::new(Bar(bar.clone())),
        None => Arc::new(NoProgress),
    };
    let (bytes, what) = match (src.strip_prefix(GUEST_PREFIX), dst.strip_prefix(GUEST_PREFIX)) {
        (None, Some(remote)) => {
            let remote =
                if remote.ends_with('/') { format!("{remote}{}", local_name(src)?) } else { remote.to_owned() };
            let bytes = if src == "-" {
                client.upload(tokio::io::stdin(), None, &remote, progress).await?
            } else {
                client.upload_file(Path::new(src), &remote, progress).await?
            };
            (bytes, format!("{src} -> guest:{remote}"))
        }
        (Some(remote), None) => {
            let bytes = if dst == "-" {
                client.download(remote, &mut tokio::io::stdout(), progress).await?
            } else {
                let local = local_target(dst, remote);
                client.download_file(remote, &local, progress).await?
            };
            (bytes, format!("guest:{remote} -> {dst}"))
        }
        _ => return copy_direction(src, dst).map(drop),
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{what}: {} in {secs:.2} s ({}/s)",
            indicatif::HumanBytes(bytes),
            indicatif::HumanBytes((bytes as f64 / secs) as u64)
        );
    }
    Ok(())
}

/// Checks that exactly one side of `cp` is in the guest; true when uploading.
fn copy_direction(src: &str, dst: &str) -> Result<bool, Failure> {
    match (src.starts_with(GUEST_PREFIX), dst.starts_with(GUEST_PREFIX)) {
        (false, true) => Ok(true),
        (true, false) => Ok(false),
        (true, true) => Err("both sides are in the guest; use `run -- cp SRC DST` there".into()),
        (false, false) => Err(format!("neither side is in the guest: prefix one with `{GUEST_PREFIX}`").into()),
    }
}

/// Host file name used when the guest destination is a directory (`guest:/tmp/`).
fn local_name(src: &str) -> Result<String, Failure> {
    Path::new(src)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("cannot name the guest file after '{src}': give a full guest path").into())
}

/// `dst`, or `dst/<guest file name>` when `dst` is a directory.
fn local_target(dst: &str, remote: &str) -> PathBuf {
    let dst = Path::new(dst);
    let name = remote.rsplit('/').find(|s| !s.is_empty()).unwrap_or("download");
    if dst.is_dir() { dst.join(name) } else { dst.to_path_buf() }
}

fn progress_bar(quiet: bool) -> Option<ProgressBar> {
    if quiet {
        return None;
    }
    let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{bytes:>10}/{total_bytes:<10} [{wide_bar}] {binary_bytes_per_sec:>12} {eta}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

/// Feeds a transfer's progress to the bar.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, total: Option<u64>) {
        if let Some(total) = total {
            self.0.set_length(total);
        }
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

// ---- ls / stat -----------------------------------------------------------------------------

fn ls_line(entry: &EntryInfo) -> String {
    let suffix = match entry.r#type() {
        FileType::Directory => "/",
        _ => "",
    };
    let target = entry.symlink_target.as_deref().map(|t| format!(" -> {t}")).unwrap_or_default();
    format!(
        "{} {:<8} {:<8} {:>10} {} {}{suffix}{target}",
        entry.permissions,
        entry.owner,
        entry.group,
        entry.size,
        modified(entry),
        entry.path
    )
}

fn write_stat(entry: &EntryInfo) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "path:        {}", entry.path)?;
    writeln!(out, "type:        {}", entry.r#type().as_str_name().trim_start_matches("FILE_TYPE_").to_lowercase())?;
    writeln!(out, "size:        {}", entry.size)?;
    writeln!(out, "mode:        {:o} ({})", entry.mode, entry.permissions)?;
    writeln!(out, "owner:       {}:{}", entry.owner, entry.group)?;
    writeln!(out, "modified:    {}", modified(entry))?;
    if let Some(target) = &entry.symlink_target {
        writeln!(out, "symlink to:  {target}")?;
    }
    for (key, value) in &entry.metadata {
        writeln!(out, "metadata:    {key}={value}")?;
    }
    Ok(())
}

fn modified(entry: &EntryInfo) -> String {
    let Some(ts) = &entry.modified_time else { return "-".into() };
    time::OffsetDateTime::from_unix_timestamp(ts.seconds)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ts.seconds.to_string())
}

// ---- argument parsing ----------------------------------------------------------------------

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map_or((s, ""), |i| s.split_at(i));
    let n: f64 = number.parse().map_err(|_| format!("invalid duration '{s}': expected e.g. 500ms, 30s or 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in '{s}': use ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration '{s}': {e}"))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

fn parse_signal(s: &str) -> Result<Signal, String> {
    match s.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
        "TERM" | "15" => Ok(Signal::Term),
        "KILL" | "9" => Ok(Signal::Kill),
        _ => Err(format!("unsupported signal '{s}': guestd forwards TERM and KILL")),
    }
}
