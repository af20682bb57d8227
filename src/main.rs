//! `guestd` binary: parse the command line, set up logging, serve until SIGTERM/SIGINT.
//! Everything else lives in the library (`guestd::server`).

use anyhow::Context;
use clap::Parser;
use guestd::config::{Args, Config, LogFormat, ProcessEnvironment, translate_envd_flags};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The C library's malloc with large blocks parked for reuse (`guestd::sys::alloc` says why).
#[cfg(not(feature = "mimalloc"))]
#[global_allocator]
static GLOBAL: guestd::sys::alloc::CachingAlloc = guestd::sys::alloc::CachingAlloc;

/// Opt-in alternative (see the README): faster streams, several times the idle memory.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long the runtime waits for blocking tasks once serving has ended (connections and
/// processes have had their grace period by then).
const RUNTIME_SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse_from(translate_envd_flags(std::env::args()));
    if args.envd_version {
        // The template builder runs `envd -version` and gates SDK features on the answer.
        #[allow(clippy::print_stdout, reason = "the answer goes to stdout, as envd's does")]
        {
            println!("{}", guestd::http::ENVD_VERSION);
        }
        return Ok(());
    }
    let modules = std::mem::take(&mut args.kernel_module);
    init_logging(args.log_format);
    // PID 1 mounts and adopts orphans before anything can spawn, and before the configuration is
    // read: it includes the kernel command line, and the kernel starts its init without /proc.
    let pid1 = guestd::pid1::is_pid1().then(|| std::sync::Arc::new(guestd::pid1::setup()));
    let config = match Config::from_args(args, &ProcessEnvironment) {
        Ok(config) => config,
        Err(err) => {
            // As PID 1, exiting would panic the kernel: say why and power the machine off instead.
            if let Some(pid1) = pid1.and_then(std::sync::Arc::into_inner) {
                tracing::error!(error = format!("{:#}", anyhow::Error::from(err)), "invalid configuration");
                pid1.finish();
                std::process::exit(1);
            }
            return Err(err.into());
        }
    };
    load_kernel_modules(&modules);
    match guestd::sys::limits::raise_nofile() {
        Ok(Some((from, to))) => tracing::info!(from, to, "raised the open-file limit; children get the original back"),
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let served = runtime.block_on(async {
        let server = guestd::server::Server::bind(&config).await?;
        let pid1 = pid1.clone();
        server
            .serve(async move {
                shutdown_signal().await;
                if let Some(pid1) = pid1 {
                    pid1.begin_shutdown();
                }
            })
            .await;
        anyhow::Ok(())
    });
    // Blocking tasks still running now are stuck (an exec or a read on a hung mount): do not
    // wait for them, or a stuck mount would keep PID 1 from ever powering off.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_LIMIT);
    if let Err(err) = &served {
        tracing::error!(error = format!("{err:#}"), "guestd failed");
    }
    if let Some(pid1) = pid1.and_then(std::sync::Arc::into_inner) {
        pid1.finish();
    }
    served
}

/// Loads `--kernel-module`s in order. A failure is logged and the rest still load: a listener
/// that needed the module then fails to bind with its own error, and as PID 1 guestd powers the
/// machine off rather than leave a guest nobody can reach.
fn load_kernel_modules(modules: &[std::path::PathBuf]) {
    for path in modules {
        let started = std::time::Instant::now();
        match guestd::sys::kmod::load(path) {
            Ok(loaded) => tracing::info!(module = %path.display(), ?loaded, took = ?started.elapsed(), "kernel module"),
            Err(error) => tracing::error!(module = %path.display(), %error, "cannot load kernel module"),
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (`info` when unset): a default level and/or
/// `target=level` pairs, e.g. `guestd=debug,hyper=info` (`tracing_subscriber`'s `Targets`, the
/// `EnvFilter` syntax without span and field filters, which would cost guestd a regex engine).
fn init_logging(format: LogFormat) {
    let spec = std::env::var("RUST_LOG").ok().filter(|s| !s.trim().is_empty());
    let (filter, bad_spec) = match spec.as_deref().map(str::parse::<Targets>) {
        None => (Targets::new().with_default(tracing::Level::INFO), None),
        Some(Ok(targets)) => (targets, None),
        Some(Err(error)) => (Targets::new().with_default(tracing::Level::INFO), Some(error)),
    };
    // Colours only for a person at a terminal, not in journals, consoles or log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    if let Some(error) = bad_spec {
        tracing::warn!(rust_log = spec.as_deref().unwrap_or_default(), %error, "ignoring RUST_LOG; logging at info");
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop guestd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
