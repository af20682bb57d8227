//! guestd — the agent inside a sandbox (micro-VM or container) that lets the host drive it:
//! run commands, move files, inject environment. It speaks E2B envd's Connect protocol (so the
//! E2B SDKs work unchanged) and gRPC, on one port, over TCP or AF_VSOCK.
//!
//! Module map (transport adapters on top, domain below; see ARCHITECTURE.md):
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | command line → validated `Config` |
//! | [`server`] | binding TCP/vsock listeners, the accept loop, the service stack, shutdown |
//! | [`connect`] | the Connect protocol (JSON/proto, unary/streams) translated to gRPC in front of tonic |
//! | [`rpc`] | tonic service implementations: decode → authorize → call domain → encode |
//! | [`http`] | plain HTTP routes on the same port (`/health`, `/ready`, `/init`, `/envs`, `/metrics`, `/files`) and the access-token gate |
//! | [`pid1`] | PID-1 duties: mounts, orphan reaping, shutdown, power off |
//! | [`boot`] | the template's start command: once per boot, ready command, `/ready` |
//! | [`host`] | machine facts for `/metrics` |
//! | [`fs`] | the filesystem domain: EntryInfo, stat/list/mkdir/move/remove, xattr metadata, atomic uploads, streamed reads |
//! | [`watch`] | directory watches (WatchDir, polling watchers): one shared inotify instance, per-watcher bounded queues |
//! | [`process`] | the process table: spawn, PTY, output fan-out, signals, the one owner of `wait()` |
//! | [`session`] | sandbox-wide defaults: default user, workdir, env vars |
//! | [`users`], [`paths`] | passwd/group lookups; E2B's path resolution rules |
//! | [`client`] | the host side: dial a guest (TCP, vsock, hybrid vsock), typed calls; used by `guestctl` |
//! | [`body`] | reading a whole request body into one buffer, bounded |
//! | [`sys`] | the only module with `unsafe`: raw syscalls — the spawn (what runs between clone and exec), the allocator, vsock streams, PTYs, mounts, limits, the clock |
//! | [`proto`] | generated protobuf/tonic code (adapters only) |

pub mod body;
pub mod boot;
pub mod client;
pub mod config;
pub mod connect;
pub mod fs;
pub mod host;
pub mod http;
pub mod paths;
pub mod pid1;
pub mod process;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod session;
pub mod sys;
pub mod users;
pub mod watch;

/// Shutdown's one grace period: connections draining, guestd's processes between SIGTERM and
/// SIGKILL and, as PID 1, every other process — all at once, so a stop timeout covers one grace.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The domain state every request works on.
pub struct Agent {
    pub processes: process::ProcessManager,
    pub session: session::Session,
    /// The guest clock `/init` steps (a trait object so tests can use a fake).
    pub clock: std::sync::Arc<dyn session::Clock>,
    pub boot: std::sync::Arc<boot::Boot>,
    pub metrics: host::MetricsSource,
    /// Directory watches; the error is kept (and returned by every watch RPC) when inotify
    /// could not be set up.
    pub watches: Result<watch::WatchManager, watch::WatchError>,
}

/// "what failed: why: root cause": an error and every `source()` below it, for messages a user
/// reads and for logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
