//! `rollgate-proxy`: parse the configuration, set up logging, bind, and run until SIGTERM/SIGINT.

mod healthcheck;

use std::io::IsTerminal;

use anyhow::Context as _;
use rollgate_proxy_server::config::{self, Invocation, LogFormat, Mode};
use rollgate_proxy_server::runtime::random_u64;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let settings = match config::invocation_from(std::env::args_os(), random_u64()) {
        Ok(Ok(Invocation::Serve(settings))) => *settings,
        // Before anything else: the probe needs only the address, and must not log or start
        // anything.
        Ok(Ok(Invocation::Healthcheck {
            addr,
            timeout,
            tls_cert,
        })) => match healthcheck::probe(addr, timeout, tls_cert.as_deref()) {
            Ok(()) => std::process::exit(0),
            Err(error) => {
                eprintln!("rollgate-proxy healthcheck: {error}");
                std::process::exit(1);
            }
        },
        Ok(Err(error)) => {
            eprintln!("rollgate-proxy: {error}");
            std::process::exit(2);
        }
        // --help, --version, or an unknown flag: clap prints and picks the exit code.
        Err(error) => error.exit(),
    };
    let filter = match EnvFilter::try_new(&settings.log_level) {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!("rollgate-proxy: invalid --log-level (ROLLGATE_PROXY_LOG_LEVEL): {error}");
            std::process::exit(2);
        }
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal())
        // A log write that fails (stdout's reader is gone) must not `eprintln!` a report: that
        // panics on the same broken pipe, in whichever task logged, and a panic in the task that
        // logged "SIGTERM received" left the process deaf to SIGTERM.
        .log_internal_errors(false);
    match settings.log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().flatten_event(true).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        match &settings.mode {
            _ if settings.config_file.is_some() => {}
            Mode::Local { flags_file } => tracing::info!(
                "local mode: serving {} (no ROLLGATE_API_KEY)",
                flags_file.display()
            ),
            Mode::Upstream { base_url, .. } => tracing::info!(
                "upstream mode: {base_url} (streaming {})",
                if settings.core.upstream.streaming {
                    "on"
                } else {
                    "off"
                }
            ),
        }
        let signal = shutdown_signal()?;
        // With --config, SIGHUP means "reload": take it from its default (terminate) before the
        // address is reported, as for SIGTERM; the reloader listens once the environments run
        // (and re-reads a changed file within a second anyway).
        #[cfg(unix)]
        if settings.config_file.is_some() {
            drop(
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                    .context("cannot handle SIGHUP")?,
            );
        }
        let addr = settings.addr;
        let listener = rollgate_proxy_server::server::bind(addr)
            .with_context(|| format!("cannot listen on {addr} (--bind/--port)"))?;
        let local = listener.local_addr().context("no local address")?;
        let scheme = if settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        tracing::info!("listening on {scheme}://{local}");
        rollgate_proxy_server::run(listener, settings, signal).await?;
        Ok(())
    })
}

/// Installs the SIGINT and SIGTERM handlers now and returns a future that resolves on either.
///
/// The handlers are registered before the proxy reports its address: a future that registered
/// them on its first poll left a window after start-up where a SIGTERM (a rolling update that
/// stops a pod right after it started) took the default action and killed the process uncleanly.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot install the SIGINT handler")?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received");
        } else {
            std::future::pending::<()>().await;
        }
    })
}
