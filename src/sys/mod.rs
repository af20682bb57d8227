//! The only place in guestd with `unsafe` code and raw syscalls.
//!
//! Everything here is a thin, documented wrapper that the domain modules call through a safe
//! signature: the vfork-style spawn and the child's steps up to `exec` ([`spawn`]), the global
//! allocator ([`alloc`]), non-blocking file descriptors registered with the tokio reactor
//! ([`fd`]), vsock connections with vectored writes ([`stream`]), PTY allocation and window
//! sizes ([`pty`]), `waitpid` with the raw status decoded and pidfds ([`wait`]), kernel module
//! loading ([`kmod`]) and the open-file limit and thread priority ([`limits`]). Nothing in here
//! knows about processes as guestd sees them (tags, subscribers, retention): that lives in
//! `process`.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment; `clippy::undocumented_unsafe_blocks` is
//! denied crate-wide.

pub mod alloc;
pub mod clock;
pub mod entropy;
pub mod fd;
pub mod init;
pub mod kmod;
pub mod limits;
pub mod pty;
pub mod spawn;
pub mod stream;
pub mod wait;
