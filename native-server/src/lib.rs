//! rollgate-proxy's native server: tokio + axum around `rollgate-proxy-core`.
//!
//! `main.rs` parses the configuration, sets up logging and binds; [`run`] does the rest: it
//! builds the shared state, starts the flag source (a watched local rules file, or the one
//! upstream connection driven by core's `Upstream` machine), serves HTTP, and shuts down
//! gracefully.

pub mod config;
pub mod driver;
pub mod environments;
pub mod forward;
pub mod identify;
pub mod lean;
pub mod local;
pub mod persist;
pub mod refresh;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod sse;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod users;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rollgate_proxy_core::upstream::Upstream;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Mode, Settings};
use crate::forward::Intervals;
use crate::local::LocalSource;
use crate::persist::Persister;
use crate::runtime::now;
use crate::state::{App, LocalStatus, Source};
use crate::upstream::UpstreamHandle;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The local rules file is unusable.
    #[error("invalid --flags-file (ROLLGATE_PROXY_FLAGS_FILE): {0}")]
    FlagsFile(#[from] local::LocalError),
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(String),
    /// The environments file is unusable.
    #[error("invalid --config (ROLLGATE_PROXY_CONFIG): {0}")]
    Config(String),
}

/// A started proxy: its state and background tasks (not yet serving HTTP).
#[derive(Debug)]
pub struct Started {
    /// Shared state.
    pub app: Arc<App>,
    /// Background tasks to await at shutdown (driver, persister, forwarder, watcher).
    pub tasks: Vec<JoinHandle<()>>,
}

/// Builds the state and starts the flag source. Cancelling `shutdown` stops every task.
///
/// # Errors
/// [`StartError`] when the flags file (local mode) or the HTTP client cannot be used.
pub fn start(settings: Settings, shutdown: CancellationToken) -> Result<Started, StartError> {
    start_sharing(settings, shutdown, Arc::default())
}

/// [`start`] with the requests-in-flight counter `in_flight` shared with other states (the
/// environments of one process), so the overload bound holds for the process.
///
/// # Errors
/// [`StartError`] when the flags file (local mode) or the HTTP client cannot be used.
pub fn start_sharing(
    settings: Settings,
    shutdown: CancellationToken,
    in_flight: Arc<AtomicUsize>,
) -> Result<Started, StartError> {
    let mut tasks = Vec::new();
    match settings.mode.clone() {
        Mode::Local { flags_file } => {
            let status = Arc::new(LocalStatus::default());
            let mut app = App::new(
                settings,
                Source::Local(Arc::clone(&status)),
                shutdown.clone(),
            );
            app.in_flight = in_flight;
            let app = Arc::new(app);
            let source = LocalSource::start(flags_file, app.snapshots.clone(), status)?;
            tasks.push(tokio::spawn(source.watch(shutdown)));
            Ok(Started { app, tasks })
        }
        Mode::Upstream { api_key, base_url } => {
            let http = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .user_agent(concat!("rollgate-proxy/", env!("CARGO_PKG_VERSION")))
                // A 3xx from Rollgate is a failed request: following it would send the key
                // to wherever the redirect points.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|error| StartError::Client(api_key.redact(&error.to_string())))?;
            let machine = Upstream::new(settings.core.upstream.clone(), now());
            let upstream = Arc::new(UpstreamHandle::new(
                machine,
                http,
                base_url,
                api_key,
                settings.core.upstream_timeout,
            ));
            let persister = settings.snapshot_file.clone().map(|path| {
                let restored = driver::restore(&upstream, persist::load(&path));
                let (persister, task) = Persister::start(path, shutdown.clone());
                if let Some(revision) = restored {
                    // What the file holds is this snapshot until the next write.
                    persister.written().restored(revision);
                }
                tasks.push(task);
                persister
            });
            let intervals = Intervals {
                events: settings.events_flush_interval,
                telemetry: settings.telemetry_flush_interval,
            };
            let mut app = App::new(
                settings,
                Source::Upstream(Arc::clone(&upstream)),
                shutdown.clone(),
            );
            app.in_flight = in_flight;
            app.persisted = persister.as_ref().map(Persister::written);
            let app = Arc::new(app);
            tasks.push(tokio::spawn(driver::run(
                Arc::clone(&upstream),
                app.snapshots.clone(),
                persister,
                shutdown.clone(),
            )));
            tasks.push(tokio::spawn(refresh::run(Arc::clone(&app))));
            let recorder = Arc::clone(&app);
            tasks.push(tokio::spawn(forward::run(
                Arc::clone(&app.outbox),
                upstream,
                intervals,
                shutdown,
                move |kind, outcome| recorder.downstream.metrics.side_request(kind, outcome),
            )));
            Ok(Started { app, tasks })
        }
    }
}

/// Runs the proxy on `listener` until `signal` resolves, then shuts down gracefully.
///
/// # Errors
/// [`StartError`] when the proxy cannot start.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let shutdown = CancellationToken::new();
    if let Some(path) = settings.config_file.clone() {
        return run_environments(listener, settings, path, shutdown, signal).await;
    }
    let Started { app, tasks } = start(settings, shutdown.clone())?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        trigger.cancel();
    });
    server::serve(listener, Arc::clone(&app), &app.settings, shutdown).await;
    // Background tasks flush (snapshot file, events, telemetry) within the same bound.
    let flush = futures_util::future::join_all(tasks);
    if tokio::time::timeout(app.settings.shutdown_timeout, flush)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not finish in time");
    }
    tracing::info!("stopped");
    Ok(())
}

/// [`run`] with several environments from the file at `path`, reloaded while serving.
async fn run_environments(
    listener: TcpListener,
    settings: Settings,
    path: std::path::PathBuf,
    shutdown: CancellationToken,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let (text, configured) = environments::read(&path).map_err(StartError::Config)?;
    let names: Vec<&str> = configured.list().iter().map(|e| e.name.as_str()).collect();
    tracing::info!("environments from {}: {}", path.display(), names.join(", "));
    let fleet = environments::Fleet::start(settings, configured, shutdown.clone())?;
    let watcher = tokio::spawn(Arc::clone(&fleet).watch(path, text));
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        trigger.cancel();
    });
    server::serve(listener, Arc::clone(&fleet), &fleet.settings, shutdown).await;
    let mut tasks = fleet.take_tasks();
    tasks.push(watcher);
    let flush = futures_util::future::join_all(tasks);
    if tokio::time::timeout(fleet.settings.shutdown_timeout, flush)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not finish in time");
    }
    tracing::info!("stopped");
    Ok(())
}
