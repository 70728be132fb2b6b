//! Several environments in one process: one proxy state per environment behind core's key router, reloaded from the environments file without a restart.
//!
//! Each environment is what one process used to be ([`crate::start`]: its upstream driver and
//! single stream, snapshot file, breaker, per-user cache, outbox), cancelled through its own
//! child token. What is per process: the overload bound (one requests-in-flight counter shared
//! by every environment's state) and the counts of requests answered before routing (their own
//! [`Metrics`], labelled [`UNROUTED_ENVIRONMENT`]).
//!
//! A reload starts what core's diff says was added, stops each restarted environment (server
//! key or base URL changed) and waits for its tasks (its upstream stream dropped, its last
//! snapshot write done) before starting its successor, swaps the router and the list in one
//! step, then stops what was removed: there is never more than one upstream stream task or
//! snapshot writer per environment. (The dropped stream's socket is closed by the HTTP client's
//! connection task, which can run a few milliseconds after the successor has connected: the e2e
//! suite saw Rollgate's side hold both for that moment under load.) Clients of an unchanged or re-keyed (client keys only) environment
//! keep their connection, since its state is the same `Arc`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderName, Method, Uri, header};
use rollgate_proxy_core::api::{self, ApiError, ApiResponse, ClientKeys, Route};
use rollgate_proxy_core::environments::{
    EnvironmentConfig, Environments, EnvironmentsDiff, KeyRouter, UNROUTED_ENVIRONMENT, diff,
    merge_metrics,
};
use rollgate_proxy_core::metrics::Metrics;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Mode, Settings};
use crate::routes::{Admission, from_api, handle_counted, handle_in, health_of, metrics_of};
use crate::runtime::{lock, now, random_u64};
use crate::state::App;
use crate::{StartError, Started};

/// How often the environments file is checked for changes (SIGHUP reloads at once).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Largest environments file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// One configuration's environments, running.
#[derive(Debug)]
pub struct Generation {
    /// The configuration.
    pub environments: Environments,
    /// Requests to environments, by client key.
    pub router: KeyRouter,
    /// One state per environment, in [`Environments::list`] order.
    pub apps: Vec<Arc<App>>,
    tokens: Vec<CancellationToken>,
    /// Which start each state is (its tasks in [`Fleet::tasks`] carry the same id).
    ids: Vec<u64>,
}

/// Every environment of the process and the file they come from.
#[derive(Debug)]
pub struct Fleet {
    /// The process's settings; each environment's derive from them.
    pub settings: Settings,
    current: RwLock<Arc<Generation>>,
    shutdown: CancellationToken,
    /// Background tasks of every environment started, by start id.
    tasks: Mutex<Vec<(u64, JoinHandle<()>)>>,
    /// The next start id.
    next_id: AtomicU64,
    /// Requests being handled now, by every environment: `--max-concurrent-requests` bounds
    /// the process.
    pub in_flight: Arc<AtomicUsize>,
    /// Requests answered before routing (see [`UNROUTED_ENVIRONMENT`]).
    pub unrouted: Metrics,
    /// Reloads applied.
    pub reloads: AtomicU64,
    /// Reloads refused (the old configuration kept).
    pub reload_errors: AtomicU64,
}

/// Reads the environments file (`*_env` fields from the process environment).
///
/// # Errors
/// A message naming the file and the field.
pub fn read(path: &Path) -> Result<(String, Environments), String> {
    let shown = path.display();
    let size = std::fs::metadata(path)
        .map_err(|error| format!("cannot read {shown}: {error}"))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(format!("{shown} is larger than {MAX_FILE_BYTES} bytes"));
    }
    let text =
        std::fs::read_to_string(path).map_err(|error| format!("cannot read {shown}: {error}"))?;
    let environments = Environments::from_toml(&text, |name| std::env::var(name).ok())
        .map_err(|error| format!("{shown}: {error}"))?;
    Ok((text, environments))
}

/// The snapshot file of one environment: `name` before the extension of the process's.
fn snapshot_path(base: &Path, name: &str) -> PathBuf {
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = match base.extension() {
        Some(ext) => format!("{stem}.{name}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{name}"),
    };
    base.with_file_name(file)
}

/// Starts one environment under a child of `shutdown`, sharing the `in_flight` counter.
fn start_one(
    base: &Settings,
    env: &EnvironmentConfig,
    shutdown: &CancellationToken,
    in_flight: &Arc<AtomicUsize>,
) -> Result<(Started, CancellationToken), StartError> {
    let mut settings = base.clone();
    settings.core = env.settings(&base.core);
    // The router checked the key already; the environment's state serves whoever it routes.
    settings.core.client_keys = ClientKeys::default();
    // Environments must not reconnect in lockstep either.
    settings.core.upstream.jitter_seed = random_u64();
    if let Some(key) = &env.server_key {
        settings.mode = Mode::Upstream {
            api_key: key.clone(),
            base_url: settings.core.base_url.clone(),
        };
    }
    settings.snapshot_file = base
        .snapshot_file
        .as_deref()
        .map(|path| snapshot_path(path, &env.name));
    let token = shutdown.child_token();
    let started = crate::start_sharing(settings, token.clone(), Arc::clone(in_flight))?;
    tracing::info!(environment = %env.name, "environment started");
    Ok((started, token))
}

impl Fleet {
    /// Starts every environment of `environments`.
    ///
    /// # Errors
    /// [`StartError`] when one cannot start (those already started are stopped).
    pub fn start(
        settings: Settings,
        environments: Environments,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StartError> {
        let in_flight: Arc<AtomicUsize> = Arc::default();
        let mut apps = Vec::new();
        let mut tokens = Vec::new();
        let mut ids = Vec::new();
        let mut tasks = Vec::new();
        for (id, env) in (0u64..).zip(environments.list()) {
            match start_one(&settings, env, &shutdown, &in_flight) {
                Ok((started, token)) => {
                    apps.push(started.app);
                    tasks.extend(started.tasks.into_iter().map(|task| (id, task)));
                    tokens.push(token);
                    ids.push(id);
                }
                Err(error) => {
                    tokens.iter().for_each(CancellationToken::cancel);
                    return Err(error);
                }
            }
        }
        let started = ids.len() as u64;
        let generation = Generation {
            router: KeyRouter::new(&environments),
            environments,
            apps,
            tokens,
            ids,
        };
        Ok(Arc::new(Self {
            settings,
            current: RwLock::new(Arc::new(generation)),
            shutdown,
            tasks: Mutex::new(tasks),
            next_id: AtomicU64::new(started),
            in_flight,
            unrouted: Metrics::new(),
            reloads: AtomicU64::new(0),
            reload_errors: AtomicU64::new(0),
        }))
    }

    /// The running configuration.
    pub fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Starts `env` under a new start id, its tasks recorded under that id.
    fn start_env(
        &self,
        env: &EnvironmentConfig,
    ) -> Result<(Arc<App>, CancellationToken, u64), String> {
        let (started, token) = start_one(&self.settings, env, &self.shutdown, &self.in_flight)
            .map_err(|error| format!("environment {}: {error}", env.name))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut all = lock(&self.tasks);
            all.retain(|(_, task)| !task.is_finished());
            all.extend(started.tasks.into_iter().map(|task| (id, task)));
        }
        Ok((started.app, token, id))
    }

    /// Stops the environment started as `id`: cancels it and waits (at most the shutdown
    /// timeout) until its tasks are done, its upstream stream closed and its snapshot file
    /// written for the last time.
    async fn stop_env(&self, name: &str, token: &CancellationToken, id: u64) {
        token.cancel();
        let tasks: Vec<JoinHandle<()>> = {
            let mut all = lock(&self.tasks);
            let (mine, others) = std::mem::take(&mut *all)
                .into_iter()
                .partition(|(task_id, _)| *task_id == id);
            *all = others;
            mine.into_iter().map(|(_, task)| task).collect()
        };
        let done = futures_util::future::join_all(tasks);
        if tokio::time::timeout(self.settings.shutdown_timeout, done)
            .await
            .is_err()
        {
            tracing::warn!(environment = %name, "environment did not stop in time");
        }
        tracing::info!(environment = %name, "environment stopped");
    }

    /// Applies `new`: starts added environments, then replaces each restarted one (the old
    /// stopped before the new starts), swaps, and stops removed ones.
    ///
    /// # Errors
    /// When an added environment cannot start (the old configuration keeps running), or a
    /// restarted one cannot (it keeps its previous state, stopped, until the next reload
    /// changes it: the HTTP client's setup, the only start error of an upstream environment,
    /// already passed when it first started).
    pub async fn apply(&self, new: Environments) -> Result<EnvironmentsDiff, String> {
        let old = self.current();
        let changes = diff(&old.environments, &new);
        if changes.is_empty() {
            return Ok(changes);
        }
        let position = |name: &str| old.environments.list().iter().position(|e| e.name == name);
        // Added environments first: a failure there leaves everything as it was.
        let mut added = Vec::new();
        for env in new.list() {
            if position(&env.name).is_none() {
                match self.start_env(env) {
                    Ok(started) => added.push((env.name.clone(), started)),
                    Err(error) => {
                        for (name, (_, token, id)) in &added {
                            self.stop_env(name, token, *id).await;
                        }
                        return Err(error);
                    }
                }
            }
        }
        let mut slots = Vec::new();
        let mut failed = None;
        for env in new.list() {
            let slot = match position(&env.name) {
                None => {
                    let index = added.iter().position(|(name, _)| *name == env.name);
                    match index.map(|i| added[i].1.clone()) {
                        Some(started) => started,
                        None => continue,
                    }
                }
                Some(i) if changes.restarted.contains(&env.name) => {
                    // One upstream stream and one snapshot writer per environment: the old
                    // one is gone before its successor starts (it serves its last data to
                    // requests meanwhile; its streams end and their clients reconnect).
                    self.stop_env(&env.name, &old.tokens[i], old.ids[i]).await;
                    match self.start_env(env) {
                        Ok(started) => started,
                        Err(error) => {
                            failed.get_or_insert(error);
                            (Arc::clone(&old.apps[i]), old.tokens[i].clone(), old.ids[i])
                        }
                    }
                }
                Some(i) => (Arc::clone(&old.apps[i]), old.tokens[i].clone(), old.ids[i]),
            };
            slots.push(slot);
        }
        let (mut apps, mut tokens, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for (app, token, id) in slots {
            apps.push(app);
            tokens.push(token);
            ids.push(id);
        }
        let generation = Arc::new(Generation {
            router: KeyRouter::new(&new),
            environments: new,
            apps,
            tokens,
            ids,
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = generation;
        for (i, env) in old.environments.list().iter().enumerate() {
            if changes.removed.contains(&env.name) {
                self.stop_env(&env.name, &old.tokens[i], old.ids[i]).await;
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(changes),
        }
    }

    /// Reads `path` and applies it; a bad file keeps the old configuration, is logged and
    /// counted.
    pub async fn reload(&self, path: &Path) {
        let result = match read(path) {
            Ok((_, environments)) => self.apply(environments).await,
            Err(error) => Err(error),
        };
        self.record(result);
    }

    fn record(&self, result: Result<EnvironmentsDiff, String>) {
        match result {
            Ok(changes) if changes.is_empty() => {}
            Ok(changes) => {
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    added = ?changes.added,
                    removed = ?changes.removed,
                    restarted = ?changes.restarted,
                    rekeyed = ?changes.rekeyed,
                    "environments reloaded"
                );
            }
            Err(error) => {
                self.reload_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "environments not reloaded, the previous configuration stays: {error}"
                );
            }
        }
    }

    /// Watches `path` (content checked every [`WATCH_INTERVAL`]) and SIGHUP until shutdown.
    pub async fn watch(self: Arc<Self>, path: PathBuf, mut last: String) {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<Option<()>>();
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = sighup => {
                    tracing::info!("SIGHUP received: reloading {}", path.display());
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        last = text;
                    }
                    self.reload(&path).await;
                }
                () = tokio::time::sleep(WATCH_INTERVAL) => {
                    // An unreadable file is reported once it changes (or on SIGHUP), not
                    // every second.
                    let Ok(text) = std::fs::read_to_string(&path) else { continue };
                    if text != last {
                        last = text;
                        self.reload(&path).await;
                    }
                }
            }
        }
    }

    /// The background tasks of every environment ever started (for the shutdown flush).
    pub fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *lock(&self.tasks))
            .into_iter()
            .map(|(_, task)| task)
            .collect()
    }
}

/// The application of several environments: one fallback handler that routes.
pub fn router(fleet: Arc<Fleet>) -> Router {
    Router::new().fallback(handle).with_state(fleet)
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

async fn handle(State(fleet): State<Arc<Fleet>>, request: Request) -> Response {
    handle_fleet(&fleet, request).await
}

/// What the server calls: the same handler as [`router`]'s, without a router per request.
impl crate::server::Handler for Arc<Fleet> {
    fn call(&self, request: Request) -> impl Future<Output = Response> + Send {
        handle_fleet(self, request)
    }
}

/// One request to the environments: routed by its key (or path) to one environment's handler.
async fn handle_fleet(fleet: &Arc<Fleet>, mut request: Request) -> Response {
    let generation = fleet.current();
    // There is always at least one environment (core's validation).
    let Some(first) = generation.apps.first() else {
        return from_api(ApiError::not_ready().into());
    };
    // Requests answered before routing are the process's, counted apart from any
    // environment's; `first` only lends its (shared) limits and CORS policy.
    let unrouted = &fleet.unrouted;
    if request.method() == Method::OPTIONS {
        return handle_counted(first, request, Admission::Core, unrouted).await;
    }
    let path = request.uri().path().to_owned();
    let (bare, named) = match KeyRouter::split_path(&path) {
        Some((name, rest)) => (rest.to_owned(), Some(name)),
        None => (path.clone(), None),
    };
    if named.is_some_and(|name| !generation.router.names().iter().any(|n| n == name)) {
        let error = ApiError::not_found(&path);
        return handle_counted(first, request, Admission::Rejected(error), unrouted).await;
    }
    match Route::parse(request.method().as_str(), &bare) {
        Ok(route) if !route.needs_client_key() => {
            // The demo page under /env/<name>/ (its requests then carry the prefix too).
            set_path(&mut request, &bare);
            let answer = match route {
                Route::Health => Some(health(&generation)),
                Route::Ready => Some(ready(&generation)),
                Route::Metrics => Some(metrics(fleet, &generation)),
                _ => None,
            };
            let admission = match answer {
                Some(response) => Admission::Answered(response),
                // Live, the demo page and its files: the same everywhere.
                None => Admission::Core,
            };
            // Counted once, as the process's, with CORS and the request id.
            handle_counted(first, request, admission, unrouted).await
        }
        // Not a route (404, 405, 400): any environment answers the same.
        Err(_) => handle_counted(first, request, Admission::Core, unrouted).await,
        Ok(_) => {
            let headers = request.headers();
            let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
            let routed = generation.router.route(
                now(),
                &path,
                text(&header::AUTHORIZATION),
                text(&X_API_KEY),
                request.uri().query().unwrap_or(""),
            );
            match routed {
                Ok(routed) => {
                    let Some(app) = generation.apps.get(routed.index) else {
                        return from_api(ApiError::not_ready().into());
                    };
                    if routed.path != path {
                        set_path(&mut request, routed.path);
                    }
                    handle_in(app, request, Admission::Routed(routed.key)).await
                }
                // Counted (and given CORS headers) like any refused request.
                Err(error) => {
                    handle_counted(first, request, Admission::Rejected(error), unrouted).await
                }
            }
        }
    }
}

/// Replaces the request's path, keeping its query.
fn set_path(request: &mut Request, path: &str) {
    let uri = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    if let Ok(uri) = uri.parse::<Uri>() {
        *request.uri_mut() = uri;
    }
}

/// Ready when every environment has data; else core's 503 naming those that do not.
fn ready(generation: &Generation) -> ApiResponse {
    let missing: Vec<&str> = generation
        .environments
        .list()
        .iter()
        .zip(&generation.apps)
        .filter(|(_, app)| app.current().is_none())
        .map(|(env, _)| env.name.as_str())
        .collect();
    if missing.is_empty() {
        ApiResponse::json(Bytes::from_static(api::READY_BODY))
    } else {
        let mut error = ApiError::not_ready();
        error.message = format!(
            "{} (environments without data: {})",
            error.message,
            missing.join(", ")
        );
        error.into()
    }
}

/// Every environment's health under its name; degraded when any is.
fn health(generation: &Generation) -> ApiResponse {
    let mut environments = serde_json::Map::new();
    let mut degraded = false;
    for (env, app) in generation.environments.list().iter().zip(&generation.apps) {
        let body = health_of(app).body;
        let report: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        degraded |= report.get("status").and_then(|s| s.as_str()) != Some("healthy");
        environments.insert(env.name.clone(), report);
    }
    let body = serde_json::json!({
        "status": if degraded { "degraded" } else { "healthy" },
        "environments": environments,
    });
    ApiResponse::json(Bytes::from(body.to_string()))
}

/// Every environment's metrics, each sample labelled `environment`; the requests answered
/// before routing under [`UNROUTED_ENVIRONMENT`]; the reload counters.
fn metrics(fleet: &Fleet, generation: &Generation) -> ApiResponse {
    let rendered: Vec<(String, ApiResponse)> = generation
        .environments
        .list()
        .iter()
        .zip(&generation.apps)
        .map(|(env, app)| (env.name.clone(), metrics_of(app)))
        .collect();
    let unrouted = fleet.unrouted.render_requests();
    let mut text = merge_metrics(
        rendered
            .iter()
            .map(|(name, r)| (name.as_str(), std::str::from_utf8(&r.body).unwrap_or("")))
            .chain([(UNROUTED_ENVIRONMENT, unrouted.as_str())]),
    );
    text.push_str(&format!(
        "# HELP rollgate_proxy_environments Environments configured.\n\
         # TYPE rollgate_proxy_environments gauge\n\
         rollgate_proxy_environments {}\n\
         # HELP rollgate_proxy_config_reloads_total Environments file reloads, applied or refused (the previous configuration kept).\n\
         # TYPE rollgate_proxy_config_reloads_total counter\n\
         rollgate_proxy_config_reloads_total{{result=\"applied\"}} {}\n\
         rollgate_proxy_config_reloads_total{{result=\"error\"}} {}\n",
        generation.apps.len(),
        fleet.reloads.load(Ordering::Relaxed),
        fleet.reload_errors.load(Ordering::Relaxed),
    ));
    let mut response = rendered
        .into_iter()
        .next()
        .map(|(_, r)| r)
        .unwrap_or_else(|| ApiResponse::json(Bytes::new()));
    response.body = Bytes::from(text);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_files_are_per_environment() {
        assert_eq!(
            snapshot_path(Path::new("/data/rollgate-proxy-snapshot.json"), "prod"),
            Path::new("/data/rollgate-proxy-snapshot.prod.json")
        );
        assert_eq!(
            snapshot_path(Path::new("snap"), "dev"),
            Path::new("snap.dev")
        );
    }
}
