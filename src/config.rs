//! Command line → validated [`Config`].
//!
//! Phased startup (linkerd style): `Args` (clap) is parsed, then turned into a `Config` by
//! `Config::from_args`, which reads the process environment only through the [`Environment`]
//! trait so tests never touch the real one. Nothing here binds sockets or spawns tasks.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use clap::{Parser, ValueEnum};

/// Port E2B's SDKs and orchestrator expect the agent on.
pub const DEFAULT_PORT: u16 = 49983;

/// `$PATH` for children when guestd itself has none (e.g. started as PID 1 by the kernel).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The agent inside a sandbox: runs commands, moves files, speaks E2B envd's Connect protocol and gRPC.
#[derive(Debug, Parser)]
#[command(name = "guestd", version, about)]
pub struct Args {
    /// Address to serve on: `HOST:PORT` (TCP) or `vsock://CID:PORT` (AF_VSOCK; CID `-1` or `any`
    /// for any). Repeat to serve on several.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:49983")]
    pub listen: Vec<ListenAddr>,

    /// User for requests that name none [default: root when running as root, else the current user].
    #[arg(long, value_name = "NAME")]
    pub default_user: Option<String>,

    /// Log format on stderr. The filter comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where guestd accepts connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Vsock { cid: u32, port: u32 },
}

/// `VMADDR_CID_ANY`: accept connections addressed to any CID of this guest.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// A `--listen` value that is neither `HOST:PORT` nor `vsock://CID:PORT`.
#[derive(Debug, thiserror::Error)]
#[error("invalid listen address '{addr}': {reason}")]
pub struct ListenAddrError {
    addr: String,
    reason: &'static str,
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ListenAddrError { addr: s.to_owned(), reason };
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.rsplit_once(':').ok_or_else(|| err("expected vsock://CID:PORT"))?;
            let cid = match cid {
                "-1" | "any" => VSOCK_CID_ANY,
                n => n.parse().map_err(|_| err("CID must be a number, -1 or any"))?,
            };
            let port = port.parse().map_err(|_| err("port must be a number"))?;
            return Ok(ListenAddr::Vsock { cid, port });
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return rest.parse().map(ListenAddr::Tcp).map_err(|_| err("expected tcp://HOST:PORT"));
        }
        s.parse().map(ListenAddr::Tcp).map_err(|_| err("expected HOST:PORT or vsock://CID:PORT"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Vsock { cid: VSOCK_CID_ANY, port } => write!(f, "vsock://any:{port}"),
            ListenAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

/// Read-only view of the process environment, so configuration can be tested without it.
pub trait Environment {
    fn var(&self, key: &str) -> Option<String>;
    fn is_root(&self) -> bool;
    fn current_user(&self) -> Option<String>;
}

/// The real environment of the guestd process.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }

    fn is_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn current_user(&self) -> Option<String> {
        nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten().map(|u| u.name)
    }
}

/// Validated configuration of one guestd instance.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<ListenAddr>,
    /// User for requests that name none, until `POST /init` changes it.
    pub default_user: String,
    /// `$PATH` given to every child process.
    pub path_env: String,
    pub log_format: LogFormat,
}

/// Configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no --default-user given and the current user has no passwd entry")]
    NoDefaultUser,
}

impl Config {
    pub fn from_args(args: Args, env: &impl Environment) -> Result<Config, ConfigError> {
        let default_user = match args.default_user {
            Some(u) => u,
            None if env.is_root() => "root".to_owned(),
            None => env.current_user().ok_or(ConfigError::NoDefaultUser)?,
        };
        Ok(Config {
            listen: args.listen,
            default_user,
            path_env: env.var("PATH").filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_PATH.to_owned()),
            log_format: args.log_format,
        })
    }

    /// A configuration for tests and embedding: TCP on an ephemeral loopback port.
    pub fn loopback(default_user: &str) -> Config {
        Config {
            listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))],
            default_user: default_user.to_owned(),
            path_env: DEFAULT_PATH.to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeEnv {
        root: bool,
        path: Option<&'static str>,
    }

    impl Environment for FakeEnv {
        fn var(&self, key: &str) -> Option<String> {
            (key == "PATH").then(|| self.path.map(str::to_owned)).flatten()
        }
        fn is_root(&self) -> bool {
            self.root
        }
        fn current_user(&self) -> Option<String> {
            Some("alice".into())
        }
    }

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("127.0.0.1:49983".parse::<ListenAddr>().unwrap(), ListenAddr::Tcp(([127, 0, 0, 1], 49983).into()));
        assert_eq!("tcp://[::1]:5".parse::<ListenAddr>().unwrap(), ListenAddr::Tcp("[::1]:5".parse().unwrap()));
        assert_eq!(
            "vsock://-1:49983".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock { cid: VSOCK_CID_ANY, port: 49983 }
        );
        assert_eq!("vsock://any:1".parse::<ListenAddr>().unwrap(), ListenAddr::Vsock { cid: VSOCK_CID_ANY, port: 1 });
        assert_eq!("vsock://3:1024".parse::<ListenAddr>().unwrap(), ListenAddr::Vsock { cid: 3, port: 1024 });
        for bad in ["", "localhost", "vsock://x:1", "vsock://3", "1.2.3.4:99999"] {
            let err = bad.parse::<ListenAddr>().unwrap_err().to_string();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn default_user_follows_who_runs_guestd() {
        let args = || Args::parse_from(["guestd"]);
        let root = Config::from_args(args(), &FakeEnv { root: true, path: None }).unwrap();
        assert_eq!(root.default_user, "root");
        assert_eq!(root.path_env, DEFAULT_PATH);
        assert_eq!(root.listen, vec![ListenAddr::Tcp(([127, 0, 0, 1], DEFAULT_PORT).into())]);
        let user = Config::from_args(args(), &FakeEnv { root: false, path: Some("/bin") }).unwrap();
        assert_eq!(user.default_user, "alice");
        assert_eq!(user.path_env, "/bin");
        let named = Config::from_args(
            Args::parse_from(["guestd", "--default-user", "bob"]),
            &FakeEnv { root: true, path: None },
        );
        assert_eq!(named.unwrap().default_user, "bob");
    }
}
