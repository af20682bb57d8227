//! `guestd` binary: parse the command line, set up logging, serve until SIGTERM/SIGINT.
//! Everything else lives in the library (`guestd::server`).

use anyhow::Context;
use clap::Parser;
use guestd::config::{Args, Config, LogFormat, ProcessEnvironment, translate_envd_flags};
use tracing_subscriber::EnvFilter;

/// The C library's malloc with large blocks parked for reuse (`guestd::sys::alloc` says why).
#[cfg(not(feature = "mimalloc"))]
#[global_allocator]
static GLOBAL: guestd::sys::alloc::CachingAlloc = guestd::sys::alloc::CachingAlloc;

/// Opt-in alternative, measured in the closing notes: faster streams, twice the idle memory.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse_from(translate_envd_flags(std::env::args()));
    if args.envd_version {
        // The template builder runs `envd -version` and gates SDK features on the answer.
        #[allow(clippy::print_stdout, reason = "the answer goes to stdout, as envd's does")]
        {
            println!("{}", guestd::http::ENVD_VERSION);
        }
        return Ok(());
    }
    let config = Config::from_args(args, &ProcessEnvironment)?;
    init_logging(config.log_format);
    // PID 1 mounts and adopts orphans before anything can spawn.
    let pid1 = guestd::pid1::is_pid1().then(|| std::sync::Arc::new(guestd::pid1::setup()));
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
    drop(runtime);
    if let Err(err) = &served {
        tracing::error!(error = format!("{err:#}"), "guestd failed");
    }
    if let Some(pid1) = pid1.and_then(std::sync::Arc::into_inner) {
        pid1.finish();
    }
    served
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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
