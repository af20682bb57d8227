//! Figures for a built guestd binary: `/bin/true` round trips and stdout throughput over Connect
//! (JSON and proto, HTTP/1.1) and native gRPC (h2c), each next to the same work done locally, plus
//! the agent's resident memory and binary size.
//!
//! Builds nothing: it starts the binary named by `GUESTD_BIN` (default: the static musl release
//! build if it exists, else `target/release/guestd`) on a free loopback port and talks to it the way
//! E2B's SDK does. It prints figures and never asserts timings; it fails only when the agent answers
//! wrongly (an error, a missing start or end event, a byte count that does not add up).
//!
//! ```text
//! cargo bench --bench agent -- [--quick]     # --quick: 100 round trips, 128 MiB instead of 1000, 1 GiB
//! scripts/bench.sh [--quick]                 # static build + this + ../shared/bench/connect_bench.py
//! ```
//!
//! The Connect client is hand-rolled — blocking HTTP/1.1 on one keep-alive `TcpStream`, envelopes
//! by hand — like `connect_bench.py` (the script the E2B envd reference figures were taken with),
//! so the client's own cost stays small and nothing in it can hide a server problem. gRPC goes
//! through tonic's `Channel` on a current-thread runtime, as a Rust host would use it.
//!
//! Agent CPU time (utime + stime from `/proc/PID/stat`) is recorded beside each phase, and the
//! client's own beside each transfer: on a small machine a throughput figure alone does not say
//! whether the agent or the client was the limit.

#![allow(clippy::print_stdout, reason = "a benchmark's output is its figures")]

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use guestd::proto::process::process_client::ProcessClient;
use guestd::proto::process::process_event::Event;
use guestd::proto::process::process_event::data_event::Output;
use guestd::proto::process::{ProcessConfig, StartRequest, StartResponse};
use prost::Message as _;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

const START_PATH: &str = "/process.Process/Start";

/// Calls of each kind before anything is timed: first-use costs (page faults, lazy allocations,
/// the h2 connection's window growth) are not what a steady-state figure should show.
const WARMUP: usize = 10;

/// How long the agent sits idle before the last RSS reading (as `connect_bench.py` does), so
/// memory freed lazily after the load has had its chance to go.
const IDLE_AFTER_LOAD: Duration = Duration::from_secs(2);

/// How long guestd gets to answer `GET /health` after it was started.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Read timeout on the Connect connection: generous, a 1 GiB stream on a slow machine takes long,
/// but a hung agent must not hang the benchmark forever.
const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// The port range the agent is started in: below Linux's default ephemeral range (32768–60999),
/// so it cannot collide with the source port of some outgoing connection made meanwhile.
const PORT_RANGE: std::ops::Range<u16> = 20000..32768;

fn main() -> Result<()> {
    let plan = Plan::from_args(std::env::args().skip(1));
    let bin = guestd_bin();
    let bin_bytes = std::fs::metadata(&bin)
        .with_context(|| format!("no guestd binary at {} (set GUESTD_BIN or build it first)", bin.display()))?
        .len();

    let load_before = load_average()?;
    let mut agent = Agent::start(&bin)?;
    let rss_idle_start = agent.status_kb("VmRSS")?;
    let rss_anon_idle_start = agent.status_kb("RssAnon")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut http = Http1::connect(agent.addr)?;
    let mut grpc = rt.block_on(grpc_client(agent.addr))?;
    let mut scratch = Scratch::default();
    let true_cmd = Cmd::new("/bin/true", &[]);

    eprintln!("guestd bench: {} (pid {}, {})", bin.display(), agent.pid(), agent.addr);
    eprintln!("round trips: warm-up");
    for _ in 0..WARMUP {
        raw_true()?;
        connect_start(&mut http, Codec::Json, &true_cmd, &mut scratch)?.expect_true()?;
        connect_start(&mut http, Codec::Proto, &true_cmd, &mut scratch)?.expect_true()?;
        rt.block_on(grpc_start(&mut grpc, &true_cmd))?.expect_true()?;
    }

    let n = plan.round_trips;
    eprintln!("round trips: {n} × raw fork+exec+wait");
    let raw = sample(n, raw_true)?;
    let mut rt_rows = Vec::new();
    for transport in Transport::ALL {
        eprintln!("round trips: {n} × {transport}");
        let cpu0 = agent.cpu_seconds()?;
        let lat = sample(n, || match transport {
            Transport::ConnectJson => connect_start(&mut http, Codec::Json, &true_cmd, &mut scratch)?.expect_true(),
            Transport::ConnectProto => connect_start(&mut http, Codec::Proto, &true_cmd, &mut scratch)?.expect_true(),
            Transport::Grpc => rt.block_on(grpc_start(&mut grpc, &true_cmd))?.expect_true(),
        })?;
        let cpu = agent.cpu_seconds()? - cpu0;
        rt_rows.push((transport, lat, cpu));
    }
    let commands_run = Transport::ALL.len() * (WARMUP + n);
    let rss_after_round_trips = agent.status_kb("VmRSS")?;

    let bytes = plan.throughput_bytes;
    let head_cmd = Cmd::new("/usr/bin/head", &["-c", &bytes.to_string(), "/dev/zero"]);
    let mut pipe_s = Vec::new();
    let mut relay_s = Vec::new();
    let mut tp_samples: Vec<(Transport, Vec<TpSample>)> = Transport::ALL.iter().map(|&t| (t, Vec::new())).collect();
    // Rounds interleave the baselines and the transports, so a change in the shared host's speed
    // moves all of them together; each row reports its median round.
    for round in 1..=plan.throughput_rounds {
        eprintln!("throughput, round {round}/{}: {} MiB through a local pipe", plan.throughput_rounds, bytes >> 20);
        pipe_s.push(pipe_throughput(bytes)?);
        eprintln!("throughput, round {round}: {} MiB through a pipe and a loopback TCP relay", bytes >> 20);
        relay_s.push(relay_throughput(bytes)?);
        for (transport, samples) in &mut tp_samples {
            let transport = *transport;
            eprintln!("throughput, round {round}: {} MiB over {transport}", bytes >> 20);
            let cpu0 = agent.cpu_seconds()?;
            let client_cpu0 = cpu_seconds("/proc/self/stat")?;
            let t0 = Instant::now();
            let out = match transport {
                Transport::ConnectJson => connect_start(&mut http, Codec::Json, &head_cmd, &mut scratch)?,
                Transport::ConnectProto => connect_start(&mut http, Codec::Proto, &head_cmd, &mut scratch)?,
                Transport::Grpc => rt.block_on(grpc_start(&mut grpc, &head_cmd))?,
            };
            let secs = t0.elapsed().as_secs_f64();
            let cpu = agent.cpu_seconds()? - cpu0;
            let client_cpu = cpu_seconds("/proc/self/stat")? - client_cpu0;
            ensure!(out.exit_code == 0, "{transport}: head exited with {}", out.exit_code);
            ensure!(out.stderr == 0, "{transport}: {} unexpected stderr bytes", out.stderr);
            ensure!(out.stdout == bytes, "{transport}: decoded {} stdout bytes, expected {bytes}", out.stdout);
            let rss_after = agent.status_kb("VmRSS")?;
            samples.push(TpSample { secs, cpu, client_cpu, messages: out.messages, rss_after });
        }
    }
    let tp_rows = tp_samples.into_iter().map(|(transport, samples)| TpRow::median(transport, samples)).collect();
    drop(http);
    drop(grpc);
    std::thread::sleep(IDLE_AFTER_LOAD);
    let rss_idle_after = agent.status_kb("VmRSS")?;
    let rss_peak = agent.status_kb("VmHWM")?;
    agent.stop();
    let load_after = load_average()?;

    let report = Report {
        plan,
        bin,
        bin_bytes,
        raw,
        rt_rows,
        commands_run,
        pipe_s: median(&pipe_s),
        relay_s: median(&relay_s),
        tp_rows,
        rss_idle_start,
        rss_anon_idle_start,
        rss_after_round_trips,
        rss_idle_after,
        rss_peak,
        load: [load_before, load_after],
    };
    print!("{report}");
    println!("{}", report.json());
    Ok(())
}

/// Sizes of one run; `--quick` is for a first look, the full run for figures worth quoting.
#[derive(Debug, Clone, Copy)]
struct Plan {
    quick: bool,
    round_trips: usize,
    throughput_bytes: u64,
    /// Rounds of the throughput phase (every baseline and transport once per round).
    throughput_rounds: usize,
}

impl Plan {
    /// `cargo bench` passes `--bench` (and any filter) to every target; only `--quick` means
    /// something here.
    fn from_args(mut args: impl Iterator<Item = String>) -> Plan {
        let quick = args.any(|a| a == "--quick");
        if quick {
            Plan { quick, round_trips: 100, throughput_bytes: 128 << 20, throughput_rounds: 1 }
        } else {
            Plan { quick, round_trips: 1000, throughput_bytes: 1 << 30, throughput_rounds: 3 }
        }
    }
}

/// `GUESTD_BIN`, else the static musl release build if it exists, else the host release build.
fn guestd_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("GUESTD_BIN") {
        return bin.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let musl = target.join("x86_64-unknown-linux-musl/release/guestd");
    if musl.exists() { musl } else { target.join("release/guestd") }
}

// ---------------------------------------------------------------------------------------------
// The agent under test

/// A guestd child process on a loopback port; killed when dropped.
struct Agent {
    child: Child,
    addr: SocketAddr,
    /// guestd's stderr, shown when it fails to come up.
    log: File,
}

impl Agent {
    fn start(bin: &Path) -> Result<Agent> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let log = tempfile::tempfile()?;
        let child = Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone()?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut agent = Agent { child, addr, log };
        agent.wait_healthy()?;
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("guestd exited during startup ({status}); its stderr:\n{}", self.log_text());
            }
            // Connection refused until guestd has bound its port; any answer but 204 is a bug.
            if let Ok(status) = Http1::connect(self.addr).and_then(|mut c| c.get_status("/health")) {
                ensure!(status == 204, "GET /health answered {status}, expected 204");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("guestd did not answer GET /health within {STARTUP_TIMEOUT:?}; its stderr:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&mut self) -> String {
        let mut text = String::new();
        let _ = self.log.rewind().and_then(|()| self.log.read_to_string(&mut text));
        text
    }

    /// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`).
    fn status_kb(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {field} in /proc/{}/status", self.pid()))
    }

    /// User + system CPU time the agent has used so far (its own threads, not its children).
    fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(&format!("/proc/{}/stat", self.pid()))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// utime + stime of the process whose `stat` file is at `path`.
fn cpu_seconds(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the parenthesised comm, which may itself contain spaces: state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').with_context(|| format!("malformed {path}"))?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> { Ok(fields.get(i - 3).with_context(|| format!("short {path}"))?.parse()?) };
    // USER_HZ is 100 on every Linux ABI that matters here (x86_64, aarch64).
    Ok((ticks(14)? + ticks(15)?) as f64 / 100.0)
}

fn free_port() -> Result<u16> {
    let span = u64::from(PORT_RANGE.end - PORT_RANGE.start);
    let seed = u64::from(std::process::id()) ^ u64::from(std::time::UNIX_EPOCH.elapsed()?.subsec_nanos());
    for i in 0..span {
        // 7919 is prime, hence coprime to the span: the walk visits every port once.
        let port = PORT_RANGE.start + ((seed + i * 7919) % span) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {PORT_RANGE:?}")
}

// ---------------------------------------------------------------------------------------------
// What is run

/// A command as `Start` takes it; stdin is always `/dev/null` (`stdin: false`), as the SDKs send.
struct Cmd {
    cmd: String,
    args: Vec<String>,
}

impl Cmd {
    fn new(cmd: &str, args: &[&str]) -> Cmd {
        Cmd { cmd: cmd.to_owned(), args: args.iter().map(|a| (*a).to_owned()).collect() }
    }

    fn proto(&self) -> StartRequest {
        StartRequest {
            process: Some(ProcessConfig { cmd: self.cmd.clone(), args: self.args.clone(), ..Default::default() }),
            stdin: Some(false),
            ..Default::default()
        }
    }

    /// The same JSON `connect_bench.py` sends (`args` only when there are some).
    fn json(&self) -> Vec<u8> {
        let mut process = json!({ "cmd": self.cmd });
        if !self.args.is_empty() {
            process["args"] = json!(self.args);
        }
        serde_json::to_vec(&json!({ "process": process, "stdin": false })).expect("a json! value serializes")
    }
}

/// One `Start` stream, checked and counted.
#[derive(Debug, Default)]
struct Outcome {
    started: bool,
    ended: bool,
    exit_code: i32,
    stdout: u64,
    stderr: u64,
    /// Stream messages received, keepalives included.
    messages: u64,
}

impl Outcome {
    fn start(&mut self) -> Result<()> {
        ensure!(!self.started, "second start event");
        self.started = true;
        Ok(())
    }

    fn data(&mut self, stderr: bool, n: usize) -> Result<()> {
        ensure!(self.started && !self.ended, "data event outside start..end");
        *(if stderr { &mut self.stderr } else { &mut self.stdout }) += n as u64;
        Ok(())
    }

    fn end(&mut self, exit_code: i32) -> Result<()> {
        ensure!(self.started && !self.ended, "end event outside start..end");
        self.ended = true;
        self.exit_code = exit_code;
        Ok(())
    }

    fn proto_event(&mut self, msg: StartResponse) -> Result<()> {
        self.messages += 1;
        match msg.event.and_then(|e| e.event) {
            Some(Event::Start(_)) => self.start(),
            Some(Event::Data(d)) => match d.output {
                Some(Output::Stdout(b)) => self.data(false, b.len()),
                Some(Output::Stderr(b)) | Some(Output::Pty(b)) => self.data(true, b.len()),
                None => Ok(()),
            },
            Some(Event::End(end)) => self.end(end.exit_code),
            Some(Event::Keepalive(_)) | None => Ok(()),
        }
    }

    fn finished(self) -> Result<Outcome> {
        ensure!(self.started, "stream completed without a start event");
        ensure!(self.ended, "stream completed without an end event");
        Ok(self)
    }

    fn expect_true(self) -> Result<()> {
        ensure!(self.exit_code == 0, "/bin/true exited with {}", self.exit_code);
        ensure!(self.stdout + self.stderr == 0, "/bin/true printed {} bytes", self.stdout + self.stderr);
        Ok(())
    }
}

fn raw_true() -> Result<()> {
    let status = Command::new("/bin/true").status()?;
    ensure!(status.success(), "/bin/true: {status}");
    Ok(())
}

/// `head -c N /dev/zero | cat > /dev/null` through `sh`, as `connect_bench.py` does it.
fn pipe_throughput(bytes: u64) -> Result<f64> {
    let t0 = Instant::now();
    let status =
        Command::new("/bin/sh").arg("-c").arg(format!("head -c {bytes} /dev/zero | cat > /dev/null")).status()?;
    let secs = t0.elapsed().as_secs_f64();
    ensure!(status.success(), "local pipe: {status}");
    Ok(secs)
}

/// Read size of the relay baseline: guestd's largest output read.
const RELAY_READ: usize = guestd::process::READ_CHUNK;

/// The same bytes through a pipe *and a loopback TCP connection*, with no agent: a thread reads
/// `head`'s stdout (grown to guestd's pipe size) and writes every read to a socket; this thread
/// reads the socket and discards. That is the kernel's share of any agent's stream on this
/// machine — pipe read, TCP send, TCP receive — so an agent's figure is read against it.
fn relay_throughput(bytes: u64) -> Result<f64> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let t0 = Instant::now();
    let mut head = Command::new("/usr/bin/head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning head for the relay baseline")?;
    let mut output = head.stdout.take().context("head's stdout")?;
    nix::fcntl::fcntl(&output, nix::fcntl::FcntlArg::F_SETPIPE_SZ(guestd::process::PIPE_SIZE as i32))?;
    let relay = std::thread::spawn(move || -> io::Result<()> {
        let mut socket = TcpStream::connect(addr)?;
        socket.set_nodelay(true)?;
        let mut buf = vec![0; RELAY_READ];
        loop {
            match output.read(&mut buf)? {
                0 => return Ok(()),
                n => socket.write_all(&buf[..n])?,
            }
        }
    });
    let (mut conn, _) = listener.accept()?;
    let mut buf = vec![0; RELAY_READ];
    let mut received = 0;
    loop {
        match conn.read(&mut buf)? {
            0 => break,
            n => received += n as u64,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    relay.join().map_err(|_| anyhow::anyhow!("the relay thread panicked"))?.context("relaying")?;
    let status = head.wait()?;
    ensure!(status.success(), "relay baseline: head {status}");
    ensure!(received == bytes, "relay baseline: received {received} bytes, expected {bytes}");
    Ok(secs)
}

/// Runs `f` `n` times, returning each call's wall time in seconds.
fn sample(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        f()?;
        out.push(t0.elapsed().as_secs_f64());
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    ConnectJson,
    ConnectProto,
    Grpc,
}

impl Transport {
    const ALL: [Transport; 3] = [Transport::ConnectJson, Transport::ConnectProto, Transport::Grpc];

    fn key(self) -> &'static str {
        match self {
            Transport::ConnectJson => "connect_json",
            Transport::ConnectProto => "connect_proto",
            Transport::Grpc => "grpc",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::ConnectJson => "connect+json (http/1.1)",
            Transport::ConnectProto => "connect+proto (http/1.1)",
            Transport::Grpc => "grpc (h2c, tonic)",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Connect over a hand-rolled HTTP/1.1 client

#[derive(Debug, Clone, Copy)]
enum Codec {
    Json,
    Proto,
}

/// Reusable buffers, so the client allocates nothing per message on the JSON path.
#[derive(Default)]
struct Scratch {
    msg: Vec<u8>,
    decoded: Vec<u8>,
}

/// `Start` over Connect: one request envelope out, envelopes in until end-of-stream.
fn connect_start(http: &mut Http1, codec: Codec, cmd: &Cmd, scratch: &mut Scratch) -> Result<Outcome> {
    let (content_type, payload) = match codec {
        Codec::Json => ("application/connect+json", cmd.json()),
        Codec::Proto => ("application/connect+proto", cmd.proto().encode_to_vec()),
    };
    let mut body = Vec::with_capacity(5 + payload.len());
    body.push(0);
    body.extend_from_slice(&u32::try_from(payload.len())?.to_be_bytes());
    body.extend_from_slice(&payload);

    let mut resp = http.post(START_PATH, content_type, &body)?;
    if resp.status != 200 {
        let mut text = Vec::new();
        resp.body.read_to_end(&mut text)?;
        bail!("Start ({codec:?}): HTTP {}: {}", resp.status, String::from_utf8_lossy(&text));
    }
    let mut out = Outcome::default();
    loop {
        let mut head = [0u8; 5];
        resp.body.read_exact(&mut head).context("Connect stream ended before its end-of-stream envelope")?;
        let flags = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        ensure!(flags & 0x01 == 0, "compressed envelope, though none was asked for");
        if flags & 0x02 != 0 {
            let mut trailer = vec![0; len];
            resp.body.read_exact(&mut trailer)?;
            let trailer: Value = if trailer.is_empty() { json!({}) } else { serde_json::from_slice(&trailer)? };
            ensure!(trailer.get("error").is_none(), "Start ({codec:?}) ended with {trailer}");
            break;
        }
        match codec {
            Codec::Json => {
                scratch.msg.resize(len, 0);
                resp.body.read_exact(&mut scratch.msg)?;
                json_event(&scratch.msg, &mut scratch.decoded, &mut out)?;
            }
            Codec::Proto => {
                // Into a fresh buffer so prost slices the data out of it instead of copying.
                let mut msg = vec![0; len];
                resp.body.read_exact(&mut msg)?;
                out.proto_event(StartResponse::decode(Bytes::from(msg))?)?;
            }
        }
    }
    let mut rest = Vec::new();
    resp.body.read_to_end(&mut rest)?;
    ensure!(rest.is_empty(), "{} bytes after the end-of-stream envelope", rest.len());
    ensure!(!resp.close, "guestd closed the keep-alive connection after a Start stream");
    out.finished()
}

#[derive(Deserialize)]
struct JsonStartResponse<'a> {
    #[serde(borrow)]
    event: JsonEvent<'a>,
}

#[derive(Deserialize)]
struct JsonEvent<'a> {
    start: Option<IgnoredAny>,
    #[serde(borrow)]
    data: Option<JsonData<'a>>,
    end: Option<JsonEnd>,
}

#[derive(Deserialize)]
struct JsonData<'a> {
    #[serde(borrow)]
    stdout: Option<Cow<'a, str>>,
    #[serde(borrow)]
    stderr: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pty: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct JsonEnd {
    #[serde(default, rename = "exitCode")]
    exit_code: i32,
}

/// One JSON `StartResponse`; data is base64-decoded for real, so the byte count is exact and the
/// encoding checked.
fn json_event(msg: &[u8], decoded: &mut Vec<u8>, out: &mut Outcome) -> Result<()> {
    out.messages += 1;
    let JsonStartResponse { event } = serde_json::from_slice(msg).context("malformed JSON StartResponse")?;
    if event.start.is_some() {
        out.start()?;
    }
    if let Some(data) = event.data {
        let (b64, stderr) = match (data.stdout, data.stderr, data.pty) {
            (Some(s), None, None) => (s, false),
            (None, Some(s), None) | (None, None, Some(s)) => (s, true),
            _ => bail!("data event without exactly one of stdout, stderr, pty"),
        };
        // The SIMD decoder guestd encodes with: the client's share of the 2 cores stays small.
        let engine = base64_simd::STANDARD;
        decoded.resize(engine.estimated_decoded_length(b64.len()), 0);
        let n = engine.decode(b64.as_bytes(), base64_simd::Out::from_slice(decoded)).context("bad base64")?.len();
        out.data(stderr, n)?;
    }
    if let Some(end) = event.end {
        out.end(end.exit_code)?;
    }
    Ok(())
}

/// A blocking HTTP/1.1 client on one keep-alive connection: just what Connect streaming needs.
struct Http1 {
    addr: SocketAddr,
    conn: BufReader<TcpStream>,
}

struct Response<'a> {
    status: u16,
    /// The server said `Connection: close`.
    close: bool,
    body: Body<'a>,
}

impl Http1 {
    fn connect(addr: SocketAddr) -> io::Result<Http1> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        // Large enough that a 32 KiB output chunk (43 KiB as JSON) usually arrives in one read.
        Ok(Http1 { addr, conn: BufReader::with_capacity(256 << 10, stream) })
    }

    fn post(&mut self, path: &str, content_type: &str, body: &[u8]) -> io::Result<Response<'_>> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        // Headers and body in one write, so Nagle and delayed ACK never meet.
        self.conn.get_mut().write_all(&req)?;
        self.read_head()
    }

    /// GET `path`, drain the body, return the status.
    fn get_status(&mut self, path: &str) -> io::Result<u16> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr);
        self.conn.get_mut().write_all(req.as_bytes())?;
        let mut resp = self.read_head()?;
        io::copy(&mut resp.body, &mut io::sink())?;
        Ok(resp.status)
    }

    fn read_head(&mut self) -> io::Result<Response<'_>> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut line = String::new();
        self.conn.read_line(&mut line)?;
        let status = line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3)?.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
        let (mut chunked, mut length, mut close) = (false, None, false);
        loop {
            line.clear();
            if self.conn.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').ok_or_else(|| bad(format!("bad header {line:?}")))?;
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "content-length" => length = Some(value.parse().map_err(|_| bad(format!("bad length {value:?}")))?),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let framing = match (chunked, length) {
            (true, _) => Framing::Chunked { left: 0, done: false },
            (false, Some(n)) => Framing::Length(n),
            // Neither: the body runs to connection close, which ends keep-alive anyway.
            (false, None) if status == 204 || status == 304 => Framing::Length(0),
            (false, None) => return Err(bad(format!("HTTP {status} response without framing"))),
        };
        Ok(Response { status, close, body: Body { conn: &mut self.conn, framing } })
    }
}

enum Framing {
    Length(u64),
    /// `left`: bytes still to come in the current chunk; `done`: the last chunk has been read.
    Chunked {
        left: u64,
        done: bool,
    },
}

/// A response body, read straight from the connection's buffer.
struct Body<'a> {
    conn: &'a mut BufReader<TcpStream>,
    framing: Framing,
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let eof = || io::Error::from(io::ErrorKind::UnexpectedEof);
        match &mut self.framing {
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.conn.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(eof());
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::Chunked { left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut line = String::new();
                    if self.conn.read_line(&mut line)? == 0 {
                        return Err(eof());
                    }
                    let size = line.trim_end().split(';').next().unwrap_or_default();
                    *left = u64::from_str_radix(size, 16)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {line:?}")))?;
                    if *left == 0 {
                        // Trailer fields (none expected) up to the empty line.
                        loop {
                            line.clear();
                            if self.conn.read_line(&mut line)? == 0 {
                                return Err(eof());
                            }
                            if line.trim_end().is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.conn.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(eof());
                }
                *left -= n as u64;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    self.conn.read_exact(&mut crlf)?;
                    if crlf != *b"\r\n" {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk not followed by CRLF"));
                    }
                }
                Ok(n)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC

async fn grpc_client(addr: SocketAddr) -> Result<ProcessClient<Channel>> {
    // The frame size guestd's own client library asks for (see `MAX_FRAME_SIZE`).
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .max_frame_size(guestd::client::MAX_FRAME_SIZE)
        .connect()
        .await?;
    Ok(ProcessClient::new(channel))
}

async fn grpc_start(client: &mut ProcessClient<Channel>, cmd: &Cmd) -> Result<Outcome> {
    let mut stream = client.start(cmd.proto()).await.context("gRPC Start")?.into_inner();
    let mut out = Outcome::default();
    while let Some(msg) = stream.message().await.context("gRPC Start stream")? {
        out.proto_event(msg)?;
    }
    out.finished()
}

// ---------------------------------------------------------------------------------------------
// Figures

/// One transfer of one round.
struct TpSample {
    secs: f64,
    /// Agent CPU seconds during the transfer.
    cpu: f64,
    /// This benchmark's own CPU seconds (the client) during the transfer.
    client_cpu: f64,
    messages: u64,
    rss_after: u64,
}

/// A transport's median round, and the agent's RSS after its last one.
struct TpRow {
    transport: Transport,
    median: TpSample,
    rounds: Vec<f64>,
    rss_after: u64,
}

impl TpRow {
    fn median(transport: Transport, mut samples: Vec<TpSample>) -> TpRow {
        let rss_after = samples.last().map_or(0, |s| s.rss_after);
        let rounds = samples.iter().map(|s| s.secs).collect();
        samples.sort_by(|a, b| a.secs.total_cmp(&b.secs));
        let median = samples.swap_remove(samples.len() / 2);
        TpRow { transport, median, rounds, rss_after }
    }
}

/// The median of a non-empty list (the upper one of an even count).
fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

struct Report {
    plan: Plan,
    bin: PathBuf,
    bin_bytes: u64,
    raw: Vec<f64>,
    /// Latencies and agent CPU seconds per transport.
    rt_rows: Vec<(Transport, Vec<f64>, f64)>,
    commands_run: usize,
    /// Median seconds of the two baselines: a local pipe, and a pipe plus a loopback TCP relay.
    pipe_s: f64,
    relay_s: f64,
    tp_rows: Vec<TpRow>,
    rss_idle_start: u64,
    /// The anonymous part of `rss_idle_start` (`RssAnon`): the rest is the binary's own pages,
    /// mapped from the page cache (shared, reclaimable) as its code runs.
    rss_anon_idle_start: u64,
    rss_after_round_trips: u64,
    rss_idle_after: u64,
    rss_peak: u64,
    /// 1-minute load average before and after the run: other work on the machine skews every
    /// figure, and on a shared builder it is the first thing to check when figures disagree.
    load: [f64; 2],
}

/// The 1-minute load average from `/proc/loadavg`.
fn load_average() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/loadavg")?;
    Ok(text.split_whitespace().next().context("empty /proc/loadavg")?.parse()?)
}

/// Nearest-rank percentile, in milliseconds.
fn pct_ms(xs: &[f64], p: f64) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let k = ((p / 100.0 * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[k] * 1000.0
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

impl Report {
    fn json(&self) -> Value {
        let bytes = self.plan.throughput_bytes;
        let raw50 = pct_ms(&self.raw, 50.0);
        let pipe = mb_per_s(bytes, self.pipe_s);
        let mut rt = json!({
            "raw_fork_exec": { "p50_ms": round(raw50, 3), "p99_ms": round(pct_ms(&self.raw, 99.0), 3) },
        });
        for (t, lat, cpu) in &self.rt_rows {
            let p50 = pct_ms(lat, 50.0);
            rt[t.key()] = json!({
                "p50_ms": round(p50, 3),
                "p99_ms": round(pct_ms(lat, 99.0), 3),
                "x_raw_p50": round(p50 / raw50, 2),
                "agent_cpu_us_per_call": round(cpu / lat.len() as f64 * 1e6, 0),
            });
        }
        let relay = mb_per_s(bytes, self.relay_s);
        let mut tp = json!({
            "rounds": self.plan.throughput_rounds,
            "pipe": { "s": round(self.pipe_s, 3), "MB_per_s": round(pipe, 1) },
            "relay": { "s": round(self.relay_s, 3), "MB_per_s": round(relay, 1) },
        });
        let mut rss = json!({
            "idle_start": self.rss_idle_start,
            "idle_start_anon": self.rss_anon_idle_start,
            "after_round_trips": self.rss_after_round_trips,
            "idle_2s_after": self.rss_idle_after,
            "peak_hwm": self.rss_peak,
        });
        for r in &self.tp_rows {
            let m = &r.median;
            let mbs = mb_per_s(bytes, m.secs);
            tp[r.transport.key()] = json!({
                "s": round(m.secs, 3),
                "MB_per_s": round(mbs, 1),
                "rounds_MB_per_s": r.rounds.iter().map(|&s| round(mb_per_s(bytes, s), 1)).collect::<Vec<_>>(),
                "x_pipe": round(mbs / pipe, 3),
                "x_relay": round(mbs / relay, 3),
                "agent_cpu_s": round(m.cpu, 2),
                "client_cpu_s": round(m.client_cpu, 2),
                "messages": m.messages,
            });
            rss[format!("after_throughput_{}", r.transport.key())] = json!(r.rss_after);
        }
        json!({
            "bench": "guestd-agent",
            "mode": if self.plan.quick { "quick" } else { "full" },
            "bin": self.bin.display().to_string(),
            "bin_bytes": self.bin_bytes,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_1m": { "before": self.load[0], "after": self.load[1] },
            "round_trip_n": self.plan.round_trips,
            "round_trip": rt,
            "commands_before_rss": self.commands_run,
            "throughput_bytes": bytes,
            "throughput": tp,
            "rss_kb": rss,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.plan.throughput_bytes;
        let raw50 = pct_ms(&self.raw, 50.0);
        let pipe = mb_per_s(bytes, self.pipe_s);
        writeln!(
            f,
            "\nguestd {} ({:.2} MiB), {} mode; {} CPUs, load average {:.2} before, {:.2} after",
            self.bin.display(),
            self.bin_bytes as f64 / 1048576.0,
            if self.plan.quick { "quick" } else { "full" },
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            self.load[0],
            self.load[1],
        )?;
        writeln!(
            f,
            "\n/bin/true round trip, n={:<6}     p50 ms   p99 ms  ×raw p50  agent CPU µs/call",
            self.plan.round_trips
        )?;
        writeln!(f, "  {:<30} {:>8.3} {:>8.3} {:>9.2}", "raw fork+exec+wait", raw50, pct_ms(&self.raw, 99.0), 1.0)?;
        for (t, lat, cpu) in &self.rt_rows {
            let p50 = pct_ms(lat, 50.0);
            let cpu_us = cpu / lat.len() as f64 * 1e6;
            writeln!(
                f,
                "  {:<30} {:>8.3} {:>8.3} {:>9.2} {:>18.0}",
                t.to_string(),
                p50,
                pct_ms(lat, 99.0),
                p50 / raw50,
                cpu_us
            )?;
        }
        let relay = mb_per_s(bytes, self.relay_s);
        writeln!(
            f,
            "\nstdout throughput, {:>5} MiB, median of {}   s      MB/s   ×pipe  ×relay  CPU s agent/client  messages",
            bytes >> 20,
            self.plan.throughput_rounds,
        )?;
        writeln!(
            f,
            "  {:<38} {:>7.3} {:>9.1} {:>7.3} {:>7.3}",
            "local pipe (head | cat)",
            self.pipe_s,
            pipe,
            1.0,
            pipe / relay
        )?;
        writeln!(
            f,
            "  {:<38} {:>7.3} {:>9.1} {:>7.3} {:>7.3}",
            "pipe + loopback TCP relay, no agent",
            self.relay_s,
            relay,
            relay / pipe,
            1.0
        )?;
        for r in &self.tp_rows {
            let m = &r.median;
            let mbs = mb_per_s(bytes, m.secs);
            writeln!(
                f,
                "  {:<38} {:>7.3} {:>9.1} {:>7.3} {:>7.3} {:>11.2} / {:<5.2} {:>9}",
                r.transport.to_string(),
                m.secs,
                mbs,
                mbs / pipe,
                mbs / relay,
                m.cpu,
                m.client_cpu,
                m.messages
            )?;
        }
        if self.plan.throughput_rounds > 1 {
            writeln!(f, "  rounds, MB/s:")?;
            for r in &self.tp_rows {
                let rounds: Vec<String> = r.rounds.iter().map(|&s| format!("{:.0}", mb_per_s(bytes, s))).collect();
                writeln!(f, "    {:<36} {}", r.transport.to_string(), rounds.join(" "))?;
            }
        }
        writeln!(f, "\nagent VmRSS kB")?;
        writeln!(
            f,
            "  idle after start               {:>8}   (anonymous {}; the rest is the binary's pages)",
            self.rss_idle_start, self.rss_anon_idle_start
        )?;
        writeln!(f, "  after {:>5} commands           {:>8}", self.commands_run, self.rss_after_round_trips)?;
        for r in &self.tp_rows {
            writeln!(f, "  after throughput, {:<13}{:>8}", r.transport.key(), r.rss_after)?;
        }
        writeln!(f, "  idle {:>2} s after the load        {:>8}", IDLE_AFTER_LOAD.as_secs(), self.rss_idle_after)?;
        writeln!(f, "  peak (VmHWM)                   {:>8}", self.rss_peak)?;
        writeln!(f)
    }
}
