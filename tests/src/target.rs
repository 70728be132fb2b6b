//! The proxy under test as a black box: start it on 127.0.0.1 with a [`ProxyConfig`], talk to
//! its `base_url`, stop, restart or kill it, read its logs.
//!
//! One suite, two targets: [`TargetKind::Native`] spawns the `rollgate-proxy` binary;
//! [`TargetKind::Edge`] runs the prebuilt Cloudflare Worker under `wrangler dev` (see the
//! `edge` module; build it first with `scripts/build-edge.sh`). Select with
//! `E2E_TARGET=native|edge|parity` (default native; `parity` runs only the scenario that
//! compares a native proxy and a Worker on one mock, see [`parity_from_env`]).
//!
//! Native binary: `ROLLGATE_PROXY_BIN=<path>` uses that file as is; otherwise [`prepare`] (or,
//! failing that, the first start) runs `cargo build -p rollgate-proxy-server --bin
//! rollgate-proxy` (a no-op when up to date) and uses `$CARGO_TARGET_DIR/debug/rollgate-proxy`.
//! A suite calls [`prepare`] once before any scenario's time limit starts. `E2E_DEBUG_BUILD_LOG=<file>` saves that
//! build's stderr (to see why it rebuilt).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

/// Which implementation of the proxy the suite drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// The native server binary `rollgate-proxy` (`native-server/`).
    Native,
    /// The Cloudflare Worker under `wrangler dev` (`edge-worker/`).
    Edge,
}

impl TargetKind {
    /// From `E2E_TARGET` (`native`, the default, `edge`, or `parity`, which needs the edge
    /// build too and so counts as edge).
    ///
    /// # Errors
    /// An unknown value.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::parse(std::env::var("E2E_TARGET").ok().as_deref())
    }

    /// The rule of [`Self::from_env`] on a value.
    ///
    /// # Errors
    /// An unknown value.
    pub fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value.map(str::trim) {
            None | Some("" | "native") => Ok(Self::Native),
            Some("edge" | "parity") => Ok(Self::Edge),
            Some(other) => bail!("E2E_TARGET={other:?}: expected native, edge or parity"),
        }
    }

    /// Whether the target is one OS process the suite owns, so signals, restarts with a
    /// snapshot file on disk and log capture are meaningful.
    pub fn is_process(self) -> bool {
        matches!(self, Self::Native)
    }
}

/// Whether `E2E_TARGET=parity`: run only the native-vs-Worker parity scenario.
pub fn parity_from_env() -> bool {
    std::env::var("E2E_TARGET").is_ok_and(|v| v.trim() == "parity")
}

/// How to start the proxy. Target-neutral: each target maps it onto its own flags or vars.
/// `None` means the target's default.
#[derive(Clone, Debug, Default)]
pub struct ProxyConfig {
    /// Rollgate base URL (the mock's); `None` with no `api_key` is local mode.
    pub base_url: Option<String>,
    /// Server API key (upstream mode); passed through the environment, never on the command line.
    pub api_key: Option<String>,
    /// Hold an upstream stream (`true`) or only poll.
    pub streaming: Option<bool>,
    /// Poll interval / per-user cache TTL.
    pub refresh_interval: Option<Duration>,
    /// Reconnect an upstream stream idle this long.
    pub stream_idle_timeout: Option<Duration>,
    /// Breaker: failures that open it.
    pub breaker_threshold: Option<u32>,
    /// Breaker: how long failures count.
    pub breaker_window: Option<Duration>,
    /// Breaker: how long it stays open.
    pub breaker_open_timeout: Option<Duration>,
    /// Breaker: half-open successes that close it.
    pub breaker_success_threshold: Option<u32>,
    /// Persisted snapshot; `None` disables persistence (so tests never share a file).
    pub snapshot_file: Option<PathBuf>,
    /// Rules file for local mode.
    pub flags_file: Option<PathBuf>,
    /// CORS allow-list (`*` or comma-separated origins).
    pub cors_origins: Option<String>,
    /// Client keys; empty leaves the API open.
    pub client_keys: Vec<String>,
    /// Frontend / OFREP stream keepalive.
    pub keepalive: Option<Duration>,
    /// SDK stream keepalive.
    pub sdk_keepalive: Option<Duration>,
    /// Events flush interval.
    pub events_flush_interval: Option<Duration>,
    /// Telemetry flush interval.
    pub telemetry_flush_interval: Option<Duration>,
    /// Graceful shutdown bound.
    pub shutdown_timeout: Option<Duration>,
    /// Largest request body.
    pub body_limit: Option<usize>,
    /// Log level / filter.
    pub log_level: Option<String>,
    /// Timeout of one upstream HTTP request.
    pub upstream_timeout: Option<Duration>,
    /// Users whose upstream-evaluated answers are cached (evaluated mode).
    pub user_cache_size: Option<usize>,
    /// Users whose `/identify` attributes are kept.
    pub identify_store_size: Option<usize>,
    /// Age after which SSE connections are closed (`Some(ZERO)`: off).
    pub sse_max_age: Option<Duration>,
    /// Settings by name (`ROLLGATE_PROXY_STALE_AFTER` = `2s`), passed verbatim to either target
    /// after the mapped fields, so they win: env on native, `--var` on the Worker.
    pub settings: Vec<(String, String)>,
    /// Extra target-specific arguments, appended verbatim.
    pub extra_args: Vec<String>,
}

impl ProxyConfig {
    /// Upstream mode against `base_url` with `api_key`.
    pub fn upstream(base_url: impl Into<String>, api_key: impl Into<String>) -> Self {
        Self {
            base_url: Some(base_url.into()),
            api_key: Some(api_key.into()),
            ..Self::default()
        }
    }

    /// Adds one setting by name (see [`Self::settings`]).
    #[must_use]
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// The settings both targets read, by their shared names (durations with a unit), then
    /// [`Self::settings`]. Secrets (the server key, client keys) are not in here: see
    /// [`Self::secrets`].
    pub fn shared_settings(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut push = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                out.push((name.to_owned(), value));
            }
        };
        push("ROLLGATE_BASE_URL", self.base_url.clone());
        push(
            "ROLLGATE_PROXY_STREAMING",
            self.streaming.map(|s| s.to_string()),
        );
        push(
            "ROLLGATE_PROXY_REFRESH_INTERVAL",
            self.refresh_interval.map(duration),
        );
        push(
            "ROLLGATE_PROXY_STREAM_IDLE_TIMEOUT",
            self.stream_idle_timeout.map(duration),
        );
        push(
            "ROLLGATE_PROXY_UPSTREAM_TIMEOUT",
            self.upstream_timeout.map(duration),
        );
        push(
            "ROLLGATE_PROXY_BREAKER_THRESHOLD",
            self.breaker_threshold.map(|n| n.to_string()),
        );
        push(
            "ROLLGATE_PROXY_BREAKER_WINDOW",
            self.breaker_window.map(duration),
        );
        push(
            "ROLLGATE_PROXY_BREAKER_OPEN_TIMEOUT",
            self.breaker_open_timeout.map(duration),
        );
        push(
            "ROLLGATE_PROXY_BREAKER_SUCCESS_THRESHOLD",
            self.breaker_success_threshold.map(|n| n.to_string()),
        );
        push("ROLLGATE_PROXY_CORS_ORIGINS", self.cors_origins.clone());
        push("ROLLGATE_PROXY_KEEPALIVE", self.keepalive.map(duration));
        push(
            "ROLLGATE_PROXY_SDK_KEEPALIVE",
            self.sdk_keepalive.map(duration),
        );
        push("ROLLGATE_PROXY_SSE_MAX_AGE", self.sse_max_age.map(duration));
        push(
            "ROLLGATE_PROXY_BODY_LIMIT",
            self.body_limit.map(|n| n.to_string()),
        );
        push(
            "ROLLGATE_PROXY_USER_CACHE_SIZE",
            self.user_cache_size.map(|n| n.to_string()),
        );
        push(
            "ROLLGATE_PROXY_IDENTIFY_STORE_SIZE",
            self.identify_store_size.map(|n| n.to_string()),
        );
        out.extend(self.settings.iter().cloned());
        out
    }

    /// The server key and client keys, by their shared names: env on native, an env file on
    /// the Worker (never a command line).
    pub fn secrets(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(key) = &self.api_key {
            out.push(("ROLLGATE_API_KEY".to_owned(), key.clone()));
        }
        if !self.client_keys.is_empty() {
            out.push((
                "ROLLGATE_PROXY_CLIENT_KEYS".to_owned(),
                self.client_keys.join(","),
            ));
        }
        out
    }
}

/// Starts the proxy on the selected target.
///
/// # Errors
/// The target cannot start, or it did not report its address in time.
pub async fn start(kind: TargetKind, config: ProxyConfig) -> anyhow::Result<ProxyHandle> {
    match kind {
        TargetKind::Native => native::start(config, None).await,
        TargetKind::Edge => edge::start(config, None, None).await,
    }
}

/// A running proxy. Dropping it kills the process (and prints its log tail if a test is
/// panicking, so failures come with the proxy's side of the story).
#[derive(Debug)]
pub struct ProxyHandle {
    kind: TargetKind,
    config: ProxyConfig,
    base_url: String,
    port: u16,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
    /// Edge only: the instance directory (persisted state, env file), kept across restarts.
    edge_dir: Option<Arc<TempDir>>,
}

impl ProxyHandle {
    /// One step of waiting for a start: fails when the process already exited or `deadline`
    /// passed (with the logs so far), else sleeps `poll` so the caller can check again.
    async fn still_starting(
        &mut self,
        what: &str,
        waiting_for: &str,
        deadline: Instant,
        poll: Duration,
    ) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.exit = Some(status);
            // Give the reader threads a moment to collect the last lines.
            tokio::time::sleep(Duration::from_millis(100)).await;
            bail!(
                "{what} exited with {status} before {waiting_for}:\n{}",
                self.logs()
            );
        }
        if Instant::now() >= deadline {
            bail!("{what} did not {waiting_for} in time:\n{}", self.logs());
        }
        tokio::time::sleep(poll).await;
        Ok(())
    }

    /// `http://127.0.0.1:PORT` (the same across [`Self::restart`], unless a Worker restart
    /// found its old port taken by another process several times and took a new one).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `base_url` + `path` (`path` starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The target kind.
    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Everything the process wrote to stdout and stderr so far, one line each, in arrival order
    /// (stdout and stderr interleaved as read).
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Waits (at most `timeout`) until a line containing `needle` has been read from the
    /// process's output, and says whether it was. The output is read by other threads, so a
    /// line the process has written may arrive here a moment after what it logged shows
    /// elsewhere (a metric, a health field): check logs with this, not with [`Self::logs`] alone.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id (native only).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and returns at once (edge: to wrangler's whole process group).
    ///
    /// # Errors
    /// No process, or `kill` failed.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("no process to signal"))?;
        match self.kind {
            TargetKind::Native => signal(pid, "TERM"),
            TargetKind::Edge => signal_group(pid, "TERM"),
        }
    }

    /// Sends SIGHUP (native: reload the environments file).
    ///
    /// # Errors
    /// No process, or `kill` failed.
    pub fn hangup(&self) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("no process to signal"))?;
        signal(pid, "HUP")
    }

    /// Waits for the process to exit, at most `timeout`.
    ///
    /// # Errors
    /// It did not exit in time.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let child = self
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("no process to wait for"))?;
            if let Some(status) = child.try_wait()? {
                self.exit = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("the proxy did not exit within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful stop: SIGTERM, then wait (at most `timeout`) for the exit status.
    ///
    /// # Errors
    /// The signal failed or the process outlived `timeout`.
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if self.exit.is_none() {
            self.terminate()?;
        }
        self.wait_exit(timeout).await
    }

    /// SIGKILL and reap.
    ///
    /// # Errors
    /// The process could not be killed.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        if let Some(child) = self.child.as_mut() {
            if self.kind == TargetKind::Edge {
                let _ = signal_group(child.id(), "KILL");
            }
            let _ = child.kill();
        }
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// Graceful stop, then a new process with the same configuration on the same port. The
    /// old logs are kept, followed by a marker line and the new process's output.
    ///
    /// # Errors
    /// Stopping or starting failed.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop(Duration::from_secs(15)).await?;
        let next = match self.kind {
            TargetKind::Native => {
                // Another process may have taken the port meanwhile: a few bounded tries.
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match native::start(self.config.clone(), Some(self.port)).await {
                        Ok(next) => break next,
                        Err(e)
                            if attempt < 5
                                && format!("{e:#}").contains("Address already in use") =>
                        {
                            tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            TargetKind::Edge => {
                // wrangler has exited; make sure workerd (same group) is gone too before the
                // next one opens the same state directory and port.
                if let Some(child) = self.child.as_ref() {
                    let _ = signal_group(child.id(), "KILL");
                }
                edge::start(self.config.clone(), self.edge_dir.clone(), Some(self.port)).await?
            }
        };
        let mut next = next;
        let old = std::mem::take(&mut *self.logs.lock().map_err(|_| anyhow!("poisoned"))?);
        {
            let mut lines = next.logs.lock().map_err(|_| anyhow!("poisoned"))?;
            let mut merged = old;
            merged.push("---- e2e: restarted ----".to_owned());
            merged.append(&mut lines);
            *lines = merged;
        }
        // Swap the new process in; the old (exited) child is dropped with `next`.
        std::mem::swap(self, &mut next);
        Ok(())
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.kind == TargetKind::Edge {
                // workerd and esbuild are wrangler's children: take down the whole group.
                let _ = signal_group(child.id(), "KILL");
            }
            if self.exit.is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!(
                "---- proxy {} log tail ({} lines) ----",
                self.base_url,
                tail.len()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            eprintln!("---- end of proxy log ----");
        }
    }
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed: {status}");
    }
    Ok(())
}

/// Signals the process group led by `pgid` (children spawned with `process_group(0)`).
fn signal_group(pgid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} -- -{pgid} failed: {status}");
    }
    Ok(())
}

/// A fresh directory under the system temp dir (`rollgate-e2e-<label>-…`), removed on drop.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// Creates a fresh directory.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("rollgate-e2e-{label}-"))
            .tempdir()
            .context("creating a temp dir")?;
        Ok(Self(dir))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// A duration as both targets read it: `0` or whole milliseconds with their unit (`250ms`).
pub fn duration(d: Duration) -> String {
    if d.is_zero() {
        "0".to_owned()
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The native target: the `rollgate-proxy` binary, built on first use.
mod native {
    use super::*;

    /// `ROLLGATE_PROXY_BIN` if set; otherwise `cargo build -p rollgate-proxy-server --bin
    /// rollgate-proxy` once per test process (a no-op when fresh, so a stale binary is never
    /// tested) and the path in the workspace target dir.
    pub(super) fn binary() -> anyhow::Result<PathBuf> {
        static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        BIN.get_or_init(|| locate().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| anyhow!(e))
    }

    fn locate() -> anyhow::Result<PathBuf> {
        if let Some(bin) = std::env::var_os("ROLLGATE_PROXY_BIN") {
            return Ok(PathBuf::from(bin));
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| anyhow!("tests/ has no parent"))?
            .to_path_buf();
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|d| {
                if d.is_relative() {
                    workspace.join(d)
                } else {
                    d
                }
            })
            .unwrap_or_else(|| workspace.join("target"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // cargo releases its build lock before running test binaries, so this nested build
        // does not deadlock; it shares the target dir and so costs nothing when up to date.
        let mut command = Command::new(cargo);
        // Variables cargo sets for the test process would leak into build scripts'
        // `rerun-if-env-changed` fingerprints and force a rebuild on every run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let per_crate = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_BIN_",
                "CARGO_CRATE_",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "CARGO_MAKEFLAGS",
                "__CARGO",
                "OUT_DIR",
            ];
            if per_crate.iter().any(|p| name.starts_with(p)) {
                command.env_remove(name.as_ref());
            }
        }
        let output = command
            .current_dir(&workspace)
            .args([
                "build",
                "-p",
                "rollgate-proxy-server",
                "--bin",
                "rollgate-proxy",
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            .stdin(Stdio::null())
            .output()
            .context("running cargo build for the proxy binary")?;
        if let Ok(path) = std::env::var("E2E_DEBUG_BUILD_LOG") {
            let _ = std::fs::write(path, &output.stderr);
        }
        if !output.status.success() {
            bail!(
                "cargo build -p rollgate-proxy-server failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let bin = target_dir
            .join("debug")
            .join(format!("rollgate-proxy{}", std::env::consts::EXE_SUFFIX));
        if !bin.is_file() {
            bail!("built, but {} does not exist", bin.display());
        }
        Ok(bin)
    }

    /// Command-line flags: only the native-only listener and persistence settings, then
    /// `extra_args`. Every other setting travels in [`env`] under the shared names.
    pub(super) fn args(config: &ProxyConfig, port: Option<u16>) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.unwrap_or(0).to_string(),
            // A flag, not env: an empty value (persistence off) must count as given.
            "--snapshot-file".into(),
            config
                .snapshot_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ];
        args.extend(config.extra_args.iter().cloned());
        args
    }

    /// Environment: the native-only settings, the shared ones (names of the spec), then the
    /// secrets.
    pub(super) fn env(config: &ProxyConfig) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut push = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                out.push((name.to_owned(), value));
            }
        };
        push(
            "ROLLGATE_PROXY_FLAGS_FILE",
            config.flags_file.as_ref().map(|p| p.display().to_string()),
        );
        push(
            "ROLLGATE_PROXY_EVENTS_FLUSH_INTERVAL",
            config.events_flush_interval.map(duration),
        );
        push(
            "ROLLGATE_PROXY_TELEMETRY_FLUSH_INTERVAL",
            config.telemetry_flush_interval.map(duration),
        );
        push(
            "ROLLGATE_PROXY_SHUTDOWN_TIMEOUT",
            config.shutdown_timeout.map(duration),
        );
        push("ROLLGATE_PROXY_LOG_LEVEL", config.log_level.clone());
        out.extend(config.shared_settings());
        out.extend(config.secrets());
        out
    }

    pub(super) async fn start(
        config: ProxyConfig,
        port: Option<u16>,
    ) -> anyhow::Result<ProxyHandle> {
        let bin = tokio::task::spawn_blocking(binary).await??;
        let mut command = Command::new(&bin);
        command.args(args(&config, port));
        // Nothing from the developer's environment may change the configuration under test.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("ROLLGATE_") || name == "PORT" || name == "RUST_LOG" {
                command.env_remove(name.as_ref());
            }
        }
        command.env("NO_COLOR", "1");
        command.env("RUST_BACKTRACE", "1");
        command.envs(env(&config));
        // The repository root, like the Worker's: relative defaults (examples/flags.json)
        // resolve as they do for `cargo run` there.
        command.current_dir(edge::workspace()?);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            capture(out, Arc::clone(&logs));
        }
        if let Some(err) = child.stderr.take() {
            capture(err, Arc::clone(&logs));
        }
        let mut handle = ProxyHandle {
            kind: TargetKind::Native,
            config,
            base_url: String::new(),
            port: 0,
            child: Some(child),
            logs,
            exit: None,
            edge_dir: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(url) = listening_url(&handle.logs()) {
                let port = url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| anyhow!("no port in {url}"))?;
                handle.base_url = url;
                handle.port = port;
                return Ok(handle);
            }
            handle
                .still_starting(
                    "the proxy",
                    "report `listening on http://...`",
                    deadline,
                    Duration::from_millis(20),
                )
                .await?;
        }
    }

    pub(super) fn capture(stream: impl Read + Send + 'static, logs: Arc<Mutex<Vec<String>>>) {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while let Ok(n) = reader.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                if let Ok(mut logs) = logs.lock() {
                    logs.push(text);
                }
                line.clear();
            }
        });
    }

    /// The first `http://127.0.0.1:PORT` (or `https://`, with TLS) after "listening on" (text
    /// or JSON logs).
    pub(super) fn listening_url(logs: &str) -> Option<String> {
        url_after(logs, "listening on")
    }

    /// The first `http://HOST:PORT` after `marker` on a line, with a numeric port.
    pub(super) fn url_after(logs: &str, marker: &str) -> Option<String> {
        logs.lines().find_map(|line| {
            let rest = &line[line.find(marker)?..];
            let start = rest.find("http://").or_else(|| rest.find("https://"))?;
            let url: String = rest[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '/' | '.'))
                .collect();
            let url = url.trim_end_matches('/').to_owned();
            url.rsplit(':')
                .next()
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .then_some(url)
        })
    }
}

/// The edge target: the prebuilt Worker (`edge-worker/build/`, from `scripts/build-edge.sh`)
/// under `wrangler dev -c wrangler.nobuild.toml` (workerd from npm) on 127.0.0.1.
///
/// [`ProxyConfig`] maps onto the Worker's vars under the names both targets share
/// ([`ProxyConfig::shared_settings`]). The server key and client keys are secrets there; here they go in a per-instance `--env-file` (mode 0600) so
/// they are not on a command line. Every instance has its own directory: `state/` is
/// `--persist-to` (Durable Object storage, so a restart — stop, then start with the same
/// directory and port — reloads the relay's persisted snapshot), `secrets.env` the env file.
/// wrangler runs in its own process group; stop/kill/drop signal the whole group (workerd
/// included). Settings the Worker does not have (snapshot file, flags file, flush intervals,
/// shutdown timeout, log level) are ignored; scenarios that need them skip on this target.
mod edge {
    use std::os::unix::process::CommandExt as _;

    use super::*;

    /// The repository root (wrangler's working directory).
    pub(super) fn workspace() -> anyhow::Result<PathBuf> {
        Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| anyhow!("tests/ has no parent"))?
            .to_path_buf())
    }

    /// `--var NAME:VALUE` pairs for `config`: the shared settings under their shared names
    /// (secrets excluded: see [`secrets`]). The native-only ones do not exist on a Worker.
    pub(super) fn vars(config: &ProxyConfig) -> Vec<(String, String)> {
        config.shared_settings()
    }

    /// The env file's lines: the server key and client keys.
    pub(super) fn secrets(config: &ProxyConfig) -> String {
        config
            .secrets()
            .iter()
            .map(|(name, value)| format!("{name}={value}\n"))
            .collect()
    }

    /// Whether wrangler's output says a socket it wanted was taken.
    pub(super) fn address_in_use(logs: &str) -> bool {
        logs.contains("Address already in use") || logs.contains("EADDRINUSE")
    }

    /// How many times a start that lost a port race is retried.
    const START_ATTEMPTS: u32 = 5;

    /// Starts wrangler in `dir` (fresh when `None`) on `port`, or on a port the server binds
    /// itself and reports (`--port 0`, read back from its "Ready on" line) when `None`: a port
    /// picked free here and bound later by wrangler could be taken in between by another
    /// process. A start that still loses a port race (a restart asks for its old port, and the
    /// internal sockets of workerd are wrangler's) is retried a bounded number of times; a
    /// restart that cannot have its old port back after that takes a new one.
    pub(super) async fn start(
        config: ProxyConfig,
        dir: Option<Arc<TempDir>>,
        port: Option<u16>,
    ) -> anyhow::Result<ProxyHandle> {
        let root = workspace()?;
        check_prepared(&root)?;
        let dir = match dir {
            Some(dir) => dir,
            None => Arc::new(TempDir::new("edge")?),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The last try of a restart gives up on the old port rather than fail.
            let want = if attempt == START_ATTEMPTS {
                None
            } else {
                port
            };
            match start_once(&root, config.clone(), Arc::clone(&dir), want).await? {
                Ok(handle) => return Ok(handle),
                Err(logs) if attempt < START_ATTEMPTS => {
                    let tail: Vec<&str> = logs.lines().rev().take(3).collect();
                    eprintln!(
                        "e2e: wrangler dev lost a port race (attempt {attempt}/{START_ATTEMPTS}), retrying: {tail:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
                }
                Err(logs) => {
                    bail!("wrangler dev found its ports in use {START_ATTEMPTS} times:\n{logs}")
                }
            }
        }
    }

    /// Fails unless the Worker bundle and wrangler are there (`scripts/build-edge.sh`).
    pub(super) fn check_prepared(root: &Path) -> anyhow::Result<()> {
        let bundle = root.join("edge-worker/build/index.js");
        if !bundle.is_file() {
            bail!(
                "E2E_TARGET=edge needs the built Worker ({} is missing): run scripts/build-edge.sh first",
                bundle.display()
            );
        }
        let wrangler = root.join("node_modules/.bin/wrangler");
        if !wrangler.is_file() {
            bail!(
                "E2E_TARGET=edge needs wrangler ({} is missing): run scripts/build-edge.sh (it runs npm ci)",
                wrangler.display()
            );
        }
        Ok(())
    }

    /// One wrangler start. `Ok(Err(logs))`: it exited because an address was in use (worth
    /// another try); `Err`: any other failure.
    async fn start_once(
        root: &Path,
        config: ProxyConfig,
        dir: Arc<TempDir>,
        port: Option<u16>,
    ) -> anyhow::Result<Result<ProxyHandle, String>> {
        let wrangler = root.join("node_modules/.bin/wrangler");
        let env_file = dir.join("secrets.env");
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&env_file)
                .context("writing the env file")?;
            file.write_all(secrets(&config).as_bytes())?;
        }
        let project = isolated_project(root, dir.path())?;
        let mut command = Command::new(&wrangler);
        command.current_dir(&project).args([
            "dev",
            "-c",
            "wrangler.nobuild.toml",
            "--ip",
            "127.0.0.1",
            "--port",
            &port.unwrap_or(0).to_string(),
            "--inspector-port",
            "0",
            "--persist-to",
        ]);
        command.arg(dir.join("state"));
        command.arg("--env-file").arg(&env_file);
        command.args(["--show-interactive-dev-session=false", "--log-level", "log"]);
        for (name, value) in vars(&config) {
            command.arg("--var").arg(format!("{name}:{value}"));
        }
        command.args(&config.extra_args);
        let mut path = std::ffi::OsString::from(root.join("node_modules/.bin"));
        if let Some(old) = std::env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("ROLLGATE_") || name.starts_with("CLOUDFLARE_") {
                command.env_remove(name.as_ref());
            }
        }
        command
            .env("PATH", path)
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CI", "true")
            .env("NO_COLOR", "1")
            .env("FORCE_COLOR", "0")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("spawning wrangler dev")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            native::capture(out, Arc::clone(&logs));
        }
        if let Some(err) = child.stderr.take() {
            native::capture(err, Arc::clone(&logs));
        }
        let mut handle = ProxyHandle {
            kind: TargetKind::Edge,
            config,
            base_url: String::new(),
            port: 0,
            child: Some(child),
            logs,
            exit: None,
            edge_dir: Some(dir),
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Only our wrangler's own "Ready on" line names the port: a /live answer alone
            // could come from another process that holds the port we asked for.
            if handle.base_url.is_empty()
                && let Some(url) = native::url_after(&handle.logs(), "Ready on")
            {
                handle.port = url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| anyhow!("no port in {url}"))?;
                handle.base_url = url;
            }
            if !handle.base_url.is_empty()
                && let Ok(resp) = client.get(handle.url("/live")).send().await
                && resp.status().is_success()
            {
                return Ok(Ok(handle));
            }
            if let Err(e) = handle
                .still_starting(
                    "wrangler dev",
                    "report `Ready on http://...` and answer /live",
                    deadline,
                    Duration::from_millis(100),
                )
                .await
            {
                let logs = handle.logs();
                if handle.exit.is_some() && address_in_use(&logs) {
                    // Take down workerd too before the next try.
                    if let Some(child) = handle.child.as_ref() {
                        let _ = signal_group(child.id(), "KILL");
                    }
                    return Ok(Err(logs));
                }
                return Err(e);
            }
        }
    }
}

/// A private copy of the built Worker and its wrangler config in the instance directory, made
/// once per instance (restarts reuse it), from which `wrangler dev` runs.
///
/// `wrangler dev` watches its bundle's files and config and reloads the Worker when any changes,
/// which resets every Durable Object (state, streams, timers): a rebuild, a checkout or anything
/// else touching `edge-worker/build/` or `wrangler.nobuild.toml` during a run would break the
/// scenarios running then (seen as streams cut and a relay that forgot its `Retry-After`). A copy
/// nothing else writes to cannot change under a running scenario; wrangler's own `.wrangler/`
/// scratch files land in the instance directory too, not in the repository.
fn isolated_project(root: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let project = dir.join("project");
    let build = project.join("edge-worker/build");
    if build.join("index.js").is_file() {
        return Ok(project);
    }
    copy_tree(&root.join("edge-worker/build"), &build)
        .context("copying edge-worker/build for wrangler dev")?;
    std::fs::copy(
        root.join("wrangler.nobuild.toml"),
        project.join("wrangler.nobuild.toml"),
    )
    .context("copying wrangler.nobuild.toml")?;
    Ok(project)
}

/// Copies the files under `from` into `to` (created), recursively.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Prepares `kind` once, before any scenario's clock starts: builds the native binary (the
/// parity scenario starts it with the Worker too) and, for the Worker, checks the bundle and
/// wrangler and starts one throwaway `wrangler dev` (against a throwaway mock) so the first
/// scenarios do not pay for a cold node/workerd start inside their time limits. Call it before
/// any scenario's deadline starts: no scenario may time a build.
///
/// # Errors
/// The build failed, the Worker is not built, or the throwaway Worker did not start.
pub async fn prepare(kind: TargetKind) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(native::binary).await??;
    if kind == TargetKind::Edge {
        edge::check_prepared(&edge::workspace()?)?;
        let mock =
            crate::mock::MockUpstream::start(crate::mock::MockConfig::basic().api_key("warm-up"))
                .await
                .context("warm-up mock")?;
        let mut warm = edge::start(
            ProxyConfig::upstream(mock.base_url(), "warm-up"),
            None,
            None,
        )
        .await
        .context("warm-up start of wrangler dev")?;
        warm.kill().await?;
        mock.stop().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_listening_line() {
        let cases = [
            (
                "listening on http://127.0.0.1:4321",
                Some("http://127.0.0.1:4321"),
            ),
            (
                "2026-01-01T00:00:00Z  INFO rollgate_proxy: listening on http://127.0.0.1:80/ x",
                Some("http://127.0.0.1:80"),
            ),
            (
                r#"{"level":"INFO","fields":{"message":"listening on http://127.0.0.1:5555"}}"#,
                Some("http://127.0.0.1:5555"),
            ),
            ("upstream mode: http://127.0.0.1:9", None),
            ("listening on http://127.0.0.1:", None),
        ];
        for (line, want) in cases {
            assert_eq!(native::listening_url(line).as_deref(), want, "{line}");
        }
    }

    #[test]
    fn native_env_uses_the_shared_names() {
        let config = ProxyConfig {
            refresh_interval: Some(Duration::from_millis(250)),
            client_keys: vec!["k".into()],
            streaming: Some(false),
            sse_max_age: Some(Duration::ZERO),
            upstream_timeout: Some(Duration::from_secs(3)),
            flags_file: Some(PathBuf::from("f.json")),
            settings: vec![("ROLLGATE_PROXY_STALE_AFTER".into(), "2s".into())],
            ..ProxyConfig::upstream("http://127.0.0.1:9", "secret-key")
        };
        let args = native::args(&config, Some(7)).join(" ");
        assert!(args.contains("--port 7"), "{args}");
        assert!(args.contains("--snapshot-file "), "{args}");
        // Settings and secrets travel through the environment only.
        assert!(!args.contains("secret-key"), "{args}");
        assert!(!args.contains("250ms"), "{args}");
        let env = native::env(&config);
        let find = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(find("ROLLGATE_PROXY_REFRESH_INTERVAL"), Some("250ms"));
        assert_eq!(find("ROLLGATE_PROXY_STREAMING"), Some("false"));
        assert_eq!(find("ROLLGATE_PROXY_SSE_MAX_AGE"), Some("0"));
        assert_eq!(find("ROLLGATE_PROXY_UPSTREAM_TIMEOUT"), Some("3000ms"));
        assert_eq!(find("ROLLGATE_PROXY_FLAGS_FILE"), Some("f.json"));
        assert_eq!(find("ROLLGATE_PROXY_STALE_AFTER"), Some("2s"));
        assert_eq!(find("ROLLGATE_API_KEY"), Some("secret-key"));
        assert_eq!(find("ROLLGATE_PROXY_CLIENT_KEYS"), Some("k"));
    }

    #[test]
    fn target_from_env_value() {
        // Only the parser: the env var itself is left alone (tests run in parallel).
        assert!(TargetKind::Native.is_process());
        assert!(!TargetKind::Edge.is_process());
        assert_eq!(TargetKind::parse(None).unwrap(), TargetKind::Native);
        assert_eq!(TargetKind::parse(Some(" edge")).unwrap(), TargetKind::Edge);
        assert_eq!(TargetKind::parse(Some("parity")).unwrap(), TargetKind::Edge);
        assert!(TargetKind::parse(Some("wasm")).is_err());
    }

    #[test]
    fn edge_vars_map_settings_and_keep_secrets_off_the_command_line() {
        let config = ProxyConfig {
            refresh_interval: Some(Duration::from_millis(250)),
            client_keys: vec!["k1".into(), "k2".into()],
            streaming: Some(false),
            breaker_threshold: Some(2),
            cors_origins: Some("https://a.example".into()),
            identify_store_size: Some(3),
            flags_file: Some(PathBuf::from("native-only.json")),
            ..ProxyConfig::upstream("http://127.0.0.1:9", "secret-key")
        }
        .setting("ROLLGATE_PROXY_SSE_SHARDS", "2");
        let vars = edge::vars(&config);
        let find = |n: &str| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(find("ROLLGATE_BASE_URL"), Some("http://127.0.0.1:9"));
        assert_eq!(find("ROLLGATE_PROXY_REFRESH_INTERVAL"), Some("250ms"));
        assert_eq!(find("ROLLGATE_PROXY_STREAMING"), Some("false"));
        assert_eq!(find("ROLLGATE_PROXY_BREAKER_THRESHOLD"), Some("2"));
        assert_eq!(
            find("ROLLGATE_PROXY_CORS_ORIGINS"),
            Some("https://a.example")
        );
        assert_eq!(find("ROLLGATE_PROXY_IDENTIFY_STORE_SIZE"), Some("3"));
        assert_eq!(find("ROLLGATE_PROXY_SSE_SHARDS"), Some("2"));
        assert_eq!(find("ROLLGATE_PROXY_FLAGS_FILE"), None);
        assert!(
            vars.iter()
                .all(|(_, v)| !v.contains("secret-key") && v != "k1,k2")
        );
        assert_eq!(
            edge::secrets(&config),
            "ROLLGATE_API_KEY=secret-key\nROLLGATE_PROXY_CLIENT_KEYS=k1,k2\n"
        );
    }

    #[test]
    fn durations_carry_a_unit() {
        assert_eq!(duration(Duration::ZERO), "0");
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_secs(30)), "30000ms");
    }
}
