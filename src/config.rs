//! Command line → validated [`Config`].
//!
//! Phased startup (linkerd style): `Args` (clap) is parsed, then turned into a `Config` by
//! `Config::from_args`, which reads the process environment only through the [`Environment`]
//! trait so tests never touch the real one. Nothing here binds sockets or spawns tasks.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::boot::{StartConfig, StartConfigError};

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

    /// Kernel module (`.ko` file) to load before listening, in the order given; one already
    /// loaded is fine. For guestd as PID 1 of a kernel whose vsock transport is modular, e.g.
    /// `--kernel-module /lib/modules/vsock.ko --kernel-module …/vmw_vsock_virtio_transport.ko`.
    #[arg(long, value_name = "PATH")]
    pub kernel_module: Vec<PathBuf>,

    /// Log format on stderr. The filter comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The template's start command, run once per boot as `bash -l -c CMD` with tag `start_cmd`.
    #[arg(long, value_name = "CMD")]
    pub start_cmd: Option<String>,

    /// Working directory of the start command [default: the user's home].
    #[arg(long, value_name = "DIR")]
    pub start_cwd: Option<String>,

    /// User the start command runs as [default: the default user].
    #[arg(long, value_name = "NAME")]
    pub start_user: Option<String>,

    /// Command polled every second (up to 10 min) until it exits 0; then `/ready` answers 200.
    #[arg(long, value_name = "CMD")]
    pub ready_cmd: Option<String>,

    /// Start the start command only after the first `POST /init` (so its env vars reach it),
    /// waiting at most TIMEOUT (`90`, `90s`, `2m`; default 60s).
    #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, default_missing_value = "60s", value_parser = parse_duration)]
    pub start_after_init: Option<Duration>,

    /// Start-command config file (`key = value` lines: cmd, cwd, user, ready_cmd).
    #[arg(long, value_name = "PATH", default_value = crate::boot::CONFIG_FILE)]
    pub start_config: PathBuf,

    /// Run commands in guestd's own cgroup instead of one each. Without a cgroup of its own, a
    /// command's processes that leave its process group (`setsid`, daemons) escape its kill.
    #[arg(long)]
    pub no_cgroups: bool,

    /// envd drop-in (`-port N`): serve TCP on 0.0.0.0:N instead of the --listen addresses.
    #[arg(long, hide = true, value_name = "N")]
    pub port: Option<u16>,

    /// envd drop-in (`-isnotfc`): not in Firecracker; sets E2B_SANDBOX=false.
    #[arg(long, hide = true)]
    pub isnotfc: bool,

    /// envd drop-in (`-version`): print the envd protocol version guestd implements and exit.
    #[arg(long, hide = true)]
    pub envd_version: bool,
}

/// Rewrites envd's Go-style single-dash flags (`-port 49983`, `-port=49983`, `-isnotfc`,
/// `-no-cgroups`, `-version`, `-cmd CMD`) into guestd's, so a template that runs `/usr/bin/envd` works with
/// guestd in its place.
pub fn translate_envd_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|arg| {
            let Some(flag) = arg.strip_prefix('-').filter(|f| !f.starts_with('-')) else { return arg };
            let (name, value) = flag.split_once('=').map_or((flag, None), |(n, v)| (n, Some(v)));
            let mapped = match name {
                "port" => "--port",
                "isnotfc" => "--isnotfc",
                "no-cgroups" => "--no-cgroups",
                "version" => "--envd-version",
                "cmd" => "--start-cmd",
                _ => return arg,
            };
            value.map_or_else(|| mapped.to_owned(), |v| format!("{mapped}={v}"))
        })
        .collect()
}

/// A once-per-boot marker path of its own for each embedded instance (tests run many at once).
fn unique_marker() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("guestd-start-{}-{n}", std::process::id()))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = number.parse().map_err(|_| format!("invalid duration '{s}': expected e.g. 90, 90s or 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(|| format!("duration '{s}' is too long")),
        _ => Err(format!("invalid duration unit in '{s}': use ms, s or m")),
    }
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
    /// The kernel command line, when guestd runs in a VM.
    fn kernel_cmdline(&self) -> Option<String>;
    /// Whether guestd runs inside a container (rather than a VM or on bare metal).
    fn in_container(&self) -> bool;
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

    fn kernel_cmdline(&self) -> Option<String> {
        std::fs::read_to_string("/proc/cmdline").ok()
    }

    fn in_container(&self) -> bool {
        // Docker and Podman mark their containers so; `container=` is set by systemd-nspawn, LXC, Podman.
        std::path::Path::new("/.dockerenv").exists()
            || std::path::Path::new("/run/.containerenv").exists()
            || std::env::var_os("container").is_some()
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
    /// Value of the internal `E2B_SANDBOX` env var (false with envd's `-isnotfc`).
    pub in_sandbox: bool,
    /// The start command as configured at startup (flags > config file > kernel command line).
    pub start: StartConfig,
    /// Give each command a cgroup of its own where the machine allows it (not `--no-cgroups`).
    pub cgroups: bool,
}

/// Configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no --default-user given and the current user has no passwd entry")]
    NoDefaultUser,
    #[error("start command configuration")]
    StartConfig(#[from] StartConfigError),
}

impl Config {
    pub fn from_args(args: Args, env: &impl Environment) -> Result<Config, ConfigError> {
        let default_user = match args.default_user {
            Some(u) => u,
            None if env.is_root() => "root".to_owned(),
            None => env.current_user().ok_or(ConfigError::NoDefaultUser)?,
        };
        let flags = StartConfig {
            cmd: args.start_cmd,
            cwd: args.start_cwd,
            user: args.start_user,
            ready_cmd: args.ready_cmd,
            ..StartConfig::default()
        };
        let file = crate::boot::read_config_file(&args.start_config)?;
        // The kernel command line is the VM's; a container shares its host's and must ignore it.
        let kernel = match env.in_container() {
            false => env.kernel_cmdline().map(|c| crate::boot::from_kernel_cmdline(&c)).unwrap_or_default(),
            true => StartConfig::default(),
        };
        let start = StartConfig {
            after_init: args.start_after_init,
            marker: PathBuf::from(crate::boot::RAN_MARKER),
            ..flags.or(file).or(kernel)
        };
        let listen = match args.port {
            Some(port) => vec![ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], port)))],
            None => args.listen,
        };
        Ok(Config {
            listen,
            default_user,
            path_env: env.var("PATH").filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_PATH.to_owned()),
            log_format: args.log_format,
            in_sandbox: !args.isnotfc,
            start,
            cgroups: !args.no_cgroups,
        })
    }

    /// A configuration for tests and embedding: TCP on an ephemeral loopback port.
    pub fn loopback(default_user: &str) -> Config {
        Config {
            listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))],
            default_user: default_user.to_owned(),
            path_env: DEFAULT_PATH.to_owned(),
            log_format: LogFormat::Text,
            in_sandbox: true,
            start: StartConfig { marker: unique_marker(), ..StartConfig::default() },
            cgroups: true,
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
        fn kernel_cmdline(&self) -> Option<String> {
            Some("console=ttyS0 guestd.start_cmd=\"sleep 5\"".into())
        }
        fn in_container(&self) -> bool {
            !self.root
        }
    }

    /// A template that starts `envd -port 49983 -isnotfc -no-cgroups` runs guestd the same way.
    #[test]
    fn envd_flags_map_to_guestd_flags() {
        let argv = ["guestd", "-port=49983", "-isnotfc", "-no-cgroups", "-cmd", "sleep 1", "--listen", "127.0.0.1:1"];
        let args = translate_envd_flags(argv.map(str::to_owned));
        assert_eq!(args[1..5], ["--port=49983", "--isnotfc", "--no-cgroups", "--start-cmd"]);
        let env = FakeEnv { root: true, path: None };
        let config = Config::from_args(Args::parse_from(args), &env).unwrap();
        assert_eq!(config.listen, vec![ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], 49983)))]);
        assert!(!config.in_sandbox);
        assert!(!config.cgroups);
        assert_eq!(config.start.cmd.as_deref(), Some("sleep 1"));
        let config = Config::from_args(Args::parse_from(["guestd"]), &env).unwrap();
        assert!(config.cgroups && config.in_sandbox);
    }

    #[test]
    fn durations_parse_and_overflow_is_an_error() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        // u64::MAX / 60 + 1 minutes: multiplying by 60 overflows (a panic in a debug build, a
        // silently wrapped, much shorter wait in release).
        let err = parse_duration("307445734561825861m").unwrap_err();
        assert!(err.contains("307445734561825861m"), "{err}");
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("").is_err());
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
