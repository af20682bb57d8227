//! Where a guest's guestd is reached: [`GuestAddr`], parsed from the three URL forms guestctl's
//! `--addr` takes.
//!
//! | form | transport |
//! |---|---|
//! | `tcp://HOST:PORT` (or bare `HOST:PORT`) | TCP, e.g. a container's published port or a VM's port forward |
//! | `vsock://CID:PORT` | AF_VSOCK from the host (the kernel's vhost-vsock; CID 3 and up are guests) |
//! | `unix:///path/to/v.sock:PORT` | hybrid vsock: the Unix socket Firecracker, Cloud Hypervisor or vhost-device-vsock expose for a guest, plus the guest port to `CONNECT` to |

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The port guestd listens on inside a guest (E2B's envd port).
pub const DEFAULT_GUEST_PORT: u32 = 49983;

/// An address of a guestd, host side.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GuestAddr {
    /// `tcp://HOST:PORT`; `host` is a name or an IP literal (IPv6 without brackets).
    Tcp { host: String, port: u16 },
    /// `vsock://CID:PORT`.
    Vsock { cid: u32, port: u32 },
    /// `unix:///path:PORT`: connect to `path`, then `CONNECT port` (Firecracker's hybrid vsock).
    HybridVsock { path: PathBuf, port: u32 },
}

/// A `--addr` value in none of the three forms.
#[derive(Debug, thiserror::Error)]
#[error("invalid guest address '{addr}': {reason}")]
pub struct AddrError {
    addr: String,
    reason: &'static str,
}

impl FromStr for GuestAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| AddrError { addr: s.to_owned(), reason };
        if let Some(rest) = s.strip_prefix("unix://") {
            // The path may contain ':' itself; the port is what follows the last one.
            let (path, port) = rest.rsplit_once(':').ok_or_else(|| err("expected unix:///path/to/v.sock:PORT"))?;
            if path.is_empty() {
                return Err(err("the socket path is empty"));
            }
            let port = port.parse().map_err(|_| err("the vsock port must be a number (unix:///path:PORT)"))?;
            return Ok(GuestAddr::HybridVsock { path: PathBuf::from(path), port });
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.rsplit_once(':').ok_or_else(|| err("expected vsock://CID:PORT"))?;
            let cid = cid.parse().map_err(|_| err("the CID must be a number"))?;
            let port = port.parse().map_err(|_| err("the port must be a number"))?;
            return Ok(GuestAddr::Vsock { cid, port });
        }
        let rest = s.strip_prefix("tcp://").unwrap_or(s);
        if rest.contains("://") {
            return Err(err("expected tcp://HOST:PORT, vsock://CID:PORT or unix:///path:PORT"));
        }
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| err("expected tcp://HOST:PORT"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return Err(err("the host is empty"));
        }
        if host.contains(':') && !rest.starts_with('[') {
            return Err(err("write an IPv6 host in brackets: tcp://[::1]:PORT"));
        }
        let port = port.parse().map_err(|_| err("the port must be a number from 0 to 65535"))?;
        Ok(GuestAddr::Tcp { host: host.to_owned(), port })
    }
}

impl fmt::Display for GuestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestAddr::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            GuestAddr::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            GuestAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            GuestAddr::HybridVsock { path, port } => write!(f, "unix://{}:{port}", path.display()),
        }
    }
}

impl GuestAddr {
    /// The `:authority` requests carry: the TCP address, else a name that says which guest.
    pub(crate) fn authority(&self) -> String {
        match self {
            GuestAddr::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            GuestAddr::Tcp { host, port } => format!("{host}:{port}"),
            GuestAddr::Vsock { cid, port } => format!("vsock-{cid}:{port}"),
            GuestAddr::HybridVsock { port, .. } => format!("vsock:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> GuestAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn three_forms() {
        assert_eq!(parse("tcp://127.0.0.1:49983"), GuestAddr::Tcp { host: "127.0.0.1".into(), port: 49983 });
        assert_eq!(parse("localhost:1"), GuestAddr::Tcp { host: "localhost".into(), port: 1 });
        assert_eq!(parse("tcp://[::1]:80"), GuestAddr::Tcp { host: "::1".into(), port: 80 });
        assert_eq!(parse("vsock://3:49983"), GuestAddr::Vsock { cid: 3, port: 49983 });
        assert_eq!(
            parse("unix:///run/fc/v.sock:49983"),
            GuestAddr::HybridVsock { path: "/run/fc/v.sock".into(), port: 49983 }
        );
        assert_eq!(
            parse("unix:///tmp/a:b/v.sock:7"),
            GuestAddr::HybridVsock { path: "/tmp/a:b/v.sock".into(), port: 7 }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["tcp://127.0.0.1:49983", "tcp://[::1]:80", "vsock://3:1024", "unix:///run/v.sock:49983"] {
            assert_eq!(parse(s).to_string(), s);
        }
    }

    #[test]
    fn bad_forms_say_why() {
        for (s, why) in [
            ("unix:///run/v.sock", "unix:///path/to/v.sock:PORT"),
            ("unix://:5", "path is empty"),
            ("vsock://any:5", "CID must be a number"),
            ("tcp://host", "tcp://HOST:PORT"),
            ("tcp://host:99999", "0 to 65535"),
            ("::1:80", "brackets"),
            ("http://x:1", "expected tcp://"),
        ] {
            let err = s.parse::<GuestAddr>().unwrap_err().to_string();
            assert!(err.contains(why), "{s}: {err}");
        }
    }
}
