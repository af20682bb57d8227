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
//! | [`http`] | plain HTTP routes on the same port (`/health`) |
//! | [`fs`] | the filesystem domain: EntryInfo, stat/list/mkdir/move/remove, xattr metadata, atomic uploads, streamed reads |
//! | [`process`] | the process table: spawn, PTY, output fan-out, signals, the one owner of `wait()` |
//! | [`session`] | sandbox-wide defaults: default user, workdir, env vars |
//! | [`users`], [`paths`] | passwd/group lookups; E2B's path resolution rules |
//! | [`sys`] | the only module with `unsafe`: what runs between fork and exec |
//! | [`proto`] | generated protobuf/tonic code (adapters only) |

pub mod config;
pub mod connect;
pub mod fs;
pub mod http;
pub mod paths;
pub mod process;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod session;
pub mod sys;
pub mod users;

/// The domain state every request works on.
pub struct Agent {
    pub processes: process::ProcessManager,
    pub session: session::Session,
}
