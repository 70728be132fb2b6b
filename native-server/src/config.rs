//! Command-line and environment configuration, validated once into typed [`Settings`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use rollgate_proxy_core::api::ClientKeys;
use rollgate_proxy_core::backoff::{ReconnectPolicy, RetryPolicy};
use rollgate_proxy_core::breaker::BreakerConfig;
use rollgate_proxy_core::sse::decode::DecoderLimits;
use rollgate_proxy_core::upstream::UpstreamConfig;

/// A secret (the Rollgate server key): printed as `[redacted]` by `Debug` and `Display`, so no
/// log line, error or panic message can carry it by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it (the upstream request).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Replaces every occurrence of the secret in `text` (for error strings from libraries
    /// that might include a URL with `?token=`).
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            return text.to_owned();
        }
        text.replace(&self.0, "[redacted]")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// `rollgate-proxy`: a feature-flag relay for Rollgate. One upstream connection per process,
/// every flag answer from memory.
///
/// Without ROLLGATE_API_KEY it runs in local mode on a rules file (default
/// examples/flags.json) and pushes edits of that file to clients.
#[derive(Clone, Parser)]
#[command(name = "rollgate-proxy", version, about, long_about = None)]
pub struct Config {
    /// TCP port to listen on (0: any free port; the bound address is logged).
    #[arg(long, env = "PORT", default_value_t = 3001)]
    pub port: u16,

    /// Address to bind.
    #[arg(long, env = "ROLLGATE_PROXY_BIND", default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Rollgate server API key. Without it the proxy runs in local mode.
    #[arg(long, env = "ROLLGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Rollgate base URL.
    #[arg(
        long,
        env = "ROLLGATE_BASE_URL",
        default_value = "https://api.rollgate.io"
    )]
    pub base_url: String,

    /// Hold one upstream SSE stream (true) or only poll (false).
    #[arg(long, env = "ROLLGATE_PROXY_STREAMING", default_value_t = true, action = clap::ArgAction::Set)]
    pub streaming: bool,

    /// Poll interval while the stream is down or streaming is off; also the TTL of per-user
    /// answers in evaluated mode.
    #[arg(long, env = "ROLLGATE_PROXY_REFRESH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub refresh_interval: Duration,

    /// Reconnect an upstream stream that sent no byte for this long.
    #[arg(long, env = "ROLLGATE_PROXY_STREAM_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    pub stream_idle_timeout: Duration,

    /// Data not confirmed by upstream for this long is reported stale (still served).
    #[arg(long, env = "ROLLGATE_PROXY_STALE_AFTER", default_value = "5m", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,

    /// Timeout of one upstream HTTP request (flags fetch, per-user fetch, forwarding).
    #[arg(long, env = "ROLLGATE_PROXY_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,

    /// Circuit breaker: failures within the window that open the circuit.
    #[arg(long, env = "ROLLGATE_PROXY_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,

    /// Circuit breaker: how long a failure counts.
    #[arg(long, env = "ROLLGATE_PROXY_BREAKER_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub breaker_window: Duration,

    /// Circuit breaker: how long the circuit stays open.
    #[arg(long, env = "ROLLGATE_PROXY_BREAKER_OPEN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub breaker_open_timeout: Duration,

    /// Circuit breaker: half-open successes that close it again.
    #[arg(
        long,
        env = "ROLLGATE_PROXY_BREAKER_SUCCESS_THRESHOLD",
        default_value_t = 3
    )]
    pub breaker_success_threshold: u32,

    /// Where the last good snapshot is persisted (written atomically, loaded at start). Empty
    /// disables persistence.
    #[arg(
        long,
        env = "ROLLGATE_PROXY_SNAPSHOT_FILE",
        default_value = "./rollgate-proxy-snapshot.json"
    )]
    pub snapshot_file: String,

    /// Rules file served in local mode (no API key); edits are pushed to clients.
    #[arg(
        long,
        env = "ROLLGATE_PROXY_FLAGS_FILE",
        default_value = "examples/flags.json"
    )]
    pub flags_file: PathBuf,

    /// Allowed CORS origins, comma-separated, or `*` for any.
    #[arg(long, env = "ROLLGATE_PROXY_CORS_ORIGINS", default_value = "*")]
    pub cors_origins: String,

    /// Client keys, comma-separated. When set, every data route needs one (Bearer,
    /// X-API-Key or ?token=).
    #[arg(
        long,
        env = "ROLLGATE_PROXY_CLIENT_KEYS",
        hide_env_values = true,
        default_value = ""
    )]
    pub client_keys: String,

    /// Keepalive comment interval of the frontend and OFREP streams.
    #[arg(long, env = "ROLLGATE_PROXY_KEEPALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,

    /// Keepalive comment interval of the SDK stream (at most 4s: the Python SDK's read
    /// timeout is 5s).
    #[arg(long, env = "ROLLGATE_PROXY_SDK_KEEPALIVE", default_value = "4s", value_parser = humantime::parse_duration)]
    pub sdk_keepalive: Duration,

    /// Close SSE connections after this age (±10 % jitter) so load rebalances across
    /// replicas; clients reconnect without missing a change. 0 disables.
    #[arg(long, env = "ROLLGATE_PROXY_SSE_MAX_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub sse_max_age: Duration,

    /// Time a client has to send its request head and body (not applied to SSE streams).
    #[arg(long, env = "ROLLGATE_PROXY_REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Largest request body in bytes (413 above).
    #[arg(long, env = "ROLLGATE_PROXY_BODY_LIMIT", default_value_t = 65_536)]
    pub body_limit: usize,

    /// Largest total size of request headers in bytes (431 above).
    #[arg(
        long,
        env = "ROLLGATE_PROXY_MAX_HEADER_BYTES",
        default_value_t = 16_384
    )]
    pub max_header_bytes: usize,

    /// Longest request URI in bytes (414 above).
    #[arg(long, env = "ROLLGATE_PROXY_MAX_URI_LENGTH", default_value_t = 8_192)]
    pub max_uri_length: usize,

    /// Users whose upstream-evaluated flags are cached (evaluated mode).
    #[arg(long, env = "ROLLGATE_PROXY_USER_CACHE_SIZE", default_value_t = 10_000)]
    pub user_cache_size: usize,

    /// Users whose `/identify` attributes are kept.
    #[arg(
        long,
        env = "ROLLGATE_PROXY_IDENTIFY_STORE_SIZE",
        default_value_t = 10_000
    )]
    pub identify_store_size: usize,

    /// How often buffered SDK events are forwarded upstream.
    #[arg(long, env = "ROLLGATE_PROXY_EVENTS_FLUSH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub events_flush_interval: Duration,

    /// How often aggregated SDK telemetry is forwarded upstream.
    #[arg(long, env = "ROLLGATE_PROXY_TELEMETRY_FLUSH_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub telemetry_flush_interval: Duration,

    /// Longest a graceful shutdown may take before remaining connections are dropped.
    #[arg(long, env = "ROLLGATE_PROXY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log format.
    #[arg(
        long,
        env = "ROLLGATE_PROXY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log level or filter (`info`, `debug`, `rollgate_proxy_server=debug,info`).
    #[arg(long, env = "ROLLGATE_PROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Serve HTTPS with this PEM certificate chain (needs --tls-key); reloaded when it changes.
    #[arg(long, env = "ROLLGATE_PROXY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1); reloaded when it changes.
    #[arg(long, env = "ROLLGATE_PROXY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// What to do instead of serving (none: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands of `rollgate-proxy`; without one it serves.
#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Ask `GET /ready` of the proxy on the configured --bind/--port (PORT) and exit 0 when it
    /// answers 200, 1 otherwise: a container health check that needs no shell or wget.
    Healthcheck {
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

impl Config {
    /// The address a local health check connects to: the bound address, or loopback when the
    /// proxy binds every address (`0.0.0.0`, `::`).
    pub fn probe_addr(&self) -> SocketAddr {
        let ip = match self.bind {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, self.port)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key or the client keys; the rest is useful at debug level.
        f.debug_struct("Config")
            .field("port", &self.port)
            .field("bind", &self.bind)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("base_url", &self.base_url)
            .field("streaming", &self.streaming)
            .finish_non_exhaustive()
    }
}

/// Where the flags come from.
#[derive(Clone, Debug)]
pub enum Mode {
    /// A local rules file, watched for changes.
    Local {
        /// The rules file.
        flags_file: PathBuf,
    },
    /// Rollgate, through one upstream connection.
    Upstream {
        /// The server key.
        api_key: Secret,
        /// Base URL without a trailing slash.
        base_url: String,
    },
}

/// Allowed CORS origins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`.
    Any,
    /// Exactly these origins.
    List(Vec<String>),
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Local or upstream.
    pub mode: Mode,
    /// Upstream machine settings (also used for per-user answers).
    pub upstream: UpstreamConfig,
    /// Timeout of one upstream request.
    pub upstream_timeout: Duration,
    /// Persisted snapshot path; `None`: persistence off.
    pub snapshot_file: Option<PathBuf>,
    /// CORS allow-list.
    pub cors: CorsOrigins,
    /// Client keys (empty: open).
    pub client_keys: ClientKeys,
    /// Frontend and OFREP stream keepalive.
    pub keepalive: Duration,
    /// SDK stream keepalive.
    pub sdk_keepalive: Duration,
    /// SSE max connection age; `None`: unlimited.
    pub sse_max_age: Option<Duration>,
    /// Slow-client timeout for request heads and bodies.
    pub request_timeout: Duration,
    /// Largest request body.
    pub body_limit: usize,
    /// Largest total header size.
    pub max_header_bytes: usize,
    /// Longest URI.
    pub max_uri_length: usize,
    /// Per-user cache capacity.
    pub user_cache_size: usize,
    /// Identify store capacity.
    pub identify_store_size: usize,
    /// Events flush interval.
    pub events_flush_interval: Duration,
    /// Telemetry flush interval.
    pub telemetry_flush_interval: Duration,
    /// Graceful shutdown bound.
    pub shutdown_timeout: Duration,
    /// TLS termination; `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsSettings>,
}

/// A setting that failed validation; the message names the flag and its env var.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} ({env}): {message}")]
pub struct ConfigError {
    /// The flag, e.g. `--refresh-interval`.
    pub flag: &'static str,
    /// Its environment variable.
    pub env: &'static str,
    /// What is wrong.
    pub message: String,
}

fn invalid(flag: &'static str, env: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        env,
        message: message.into(),
    }
}

/// Longest SDK keepalive: the Python SDK reads with a 5 s timeout.
const MAX_SDK_KEEPALIVE: Duration = Duration::from_secs(4);

impl Config {
    /// Validates every setting.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid setting.
    pub fn validate(&self, jitter_seed: u64) -> Result<Settings, ConfigError> {
        let mode = match self.api_key.as_deref().map(str::trim) {
            None | Some("") => Mode::Local {
                flags_file: self.flags_file.clone(),
            },
            Some(key) => {
                if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(invalid(
                        "--api-key",
                        "ROLLGATE_API_KEY",
                        "contains whitespace or control characters",
                    ));
                }
                Mode::Upstream {
                    api_key: Secret::new(key),
                    base_url: validate_base_url(&self.base_url)?,
                }
            }
        };
        let upstream = UpstreamConfig {
            streaming: self.streaming,
            refresh_interval: self.refresh_interval,
            stream_idle_timeout: self.stream_idle_timeout,
            stale_after: self.stale_after,
            breaker: BreakerConfig {
                failure_threshold: self.breaker_threshold,
                failure_window: self.breaker_window,
                open_timeout: self.breaker_open_timeout,
                success_threshold: self.breaker_success_threshold,
            },
            retry: RetryPolicy::default(),
            reconnect: ReconnectPolicy::default(),
            decoder_limits: DecoderLimits::default(),
            jitter_seed,
        };
        upstream.validate().map_err(|error| {
            use rollgate_proxy_core::upstream::ConfigError as Core;
            let (flag, env) = match &error {
                Core::TooShort {
                    setting: "refresh_interval",
                    ..
                } => ("--refresh-interval", "ROLLGATE_PROXY_REFRESH_INTERVAL"),
                Core::TooShort {
                    setting: "stream_idle_timeout",
                    ..
                } => (
                    "--stream-idle-timeout",
                    "ROLLGATE_PROXY_STREAM_IDLE_TIMEOUT",
                ),
                Core::Breaker(_) => ("--breaker-*", "ROLLGATE_PROXY_BREAKER_*"),
                _ => ("upstream settings", "ROLLGATE_PROXY_*"),
            };
            invalid(flag, env, error.to_string())
        })?;
        let positive = |value: Duration, flag, env| {
            if value.is_zero() {
                Err(invalid(flag, env, "must be greater than 0"))
            } else {
                Ok(value)
            }
        };
        positive(
            self.upstream_timeout,
            "--upstream-timeout",
            "ROLLGATE_PROXY_UPSTREAM_TIMEOUT",
        )?;
        positive(self.keepalive, "--keepalive", "ROLLGATE_PROXY_KEEPALIVE")?;
        positive(
            self.sdk_keepalive,
            "--sdk-keepalive",
            "ROLLGATE_PROXY_SDK_KEEPALIVE",
        )?;
        if self.sdk_keepalive > MAX_SDK_KEEPALIVE {
            return Err(invalid(
                "--sdk-keepalive",
                "ROLLGATE_PROXY_SDK_KEEPALIVE",
                "must be at most 4s (the Python SDK reconnects after 5s of silence)",
            ));
        }
        positive(
            self.request_timeout,
            "--request-timeout",
            "ROLLGATE_PROXY_REQUEST_TIMEOUT",
        )?;
        positive(
            self.events_flush_interval,
            "--events-flush-interval",
            "ROLLGATE_PROXY_EVENTS_FLUSH_INTERVAL",
        )?;
        positive(
            self.telemetry_flush_interval,
            "--telemetry-flush-interval",
            "ROLLGATE_PROXY_TELEMETRY_FLUSH_INTERVAL",
        )?;
        positive(
            self.shutdown_timeout,
            "--shutdown-timeout",
            "ROLLGATE_PROXY_SHUTDOWN_TIMEOUT",
        )?;
        let at_least = |value: usize, min: usize, flag, env| {
            if value < min {
                Err(invalid(flag, env, format!("must be at least {min}")))
            } else {
                Ok(value)
            }
        };
        at_least(
            self.body_limit,
            1024,
            "--body-limit",
            "ROLLGATE_PROXY_BODY_LIMIT",
        )?;
        at_least(
            self.max_header_bytes,
            1024,
            "--max-header-bytes",
            "ROLLGATE_PROXY_MAX_HEADER_BYTES",
        )?;
        at_least(
            self.max_uri_length,
            256,
            "--max-uri-length",
            "ROLLGATE_PROXY_MAX_URI_LENGTH",
        )?;
        at_least(
            self.user_cache_size,
            1,
            "--user-cache-size",
            "ROLLGATE_PROXY_USER_CACHE_SIZE",
        )?;
        at_least(
            self.identify_store_size,
            1,
            "--identify-store-size",
            "ROLLGATE_PROXY_IDENTIFY_STORE_SIZE",
        )?;
        let cors = parse_cors(&self.cors_origins)?;
        let client_keys = ClientKeys::new(
            self.client_keys
                .split(',')
                .map(|key| key.trim().to_owned())
                .filter(|key| !key.is_empty()),
        );
        let snapshot_file = match self.snapshot_file.trim() {
            "" => None,
            path => Some(PathBuf::from(path)),
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                crate::tls::TlsSettings::load(cert.clone(), key.clone()).map_err(|error| {
                    invalid("--tls-cert", "ROLLGATE_PROXY_TLS_CERT", error.to_string())
                })?,
            ),
            _ => None,
        };
        Ok(Settings {
            addr: SocketAddr::new(self.bind, self.port),
            mode,
            upstream,
            upstream_timeout: self.upstream_timeout,
            snapshot_file,
            cors,
            client_keys,
            keepalive: self.keepalive,
            sdk_keepalive: self.sdk_keepalive,
            sse_max_age: (!self.sse_max_age.is_zero()).then_some(self.sse_max_age),
            request_timeout: self.request_timeout,
            body_limit: self.body_limit,
            max_header_bytes: self.max_header_bytes,
            max_uri_length: self.max_uri_length,
            user_cache_size: self.user_cache_size,
            identify_store_size: self.identify_store_size,
            events_flush_interval: self.events_flush_interval,
            telemetry_flush_interval: self.telemetry_flush_interval,
            shutdown_timeout: self.shutdown_timeout,
            tls,
        })
    }
}

fn validate_base_url(raw: &str) -> Result<String, ConfigError> {
    let flag = "--base-url";
    let env = "ROLLGATE_BASE_URL";
    let url = reqwest::Url::parse(raw.trim())
        .map_err(|error| invalid(flag, env, format!("not a URL: {error}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(flag, env, "must start with http:// or https://"));
    }
    if url.host_str().is_none() {
        return Err(invalid(flag, env, "has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(flag, env, "must not have a query or fragment"));
    }
    // Paths are appended verbatim (as the SDKs do), so drop a trailing slash.
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn parse_cors(raw: &str) -> Result<CorsOrigins, ConfigError> {
    let origins: Vec<String> = raw
        .split(',')
        .map(|origin| origin.trim().trim_end_matches('/').to_owned())
        .filter(|origin| !origin.is_empty())
        .collect();
    if origins.is_empty() || origins.iter().any(|origin| origin == "*") {
        return Ok(CorsOrigins::Any);
    }
    for origin in &origins {
        let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
            && http::HeaderValue::from_str(origin).is_ok();
        if !ok {
            return Err(invalid(
                "--cors-origins",
                "ROLLGATE_PROXY_CORS_ORIGINS",
                format!("{origin:?} is not an origin like https://app.example.com"),
            ));
        }
    }
    Ok(CorsOrigins::List(origins))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["rollgate-proxy"];
        argv.extend_from_slice(args);
        let config = Config::try_parse_from(argv).map_err(|e| e.to_string())?;
        config.validate(1).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_local_mode_on_port_3001() {
        // Env vars could leak in from the test environment; clap reads them. The defaults
        // below are only checked where no such variable is usually set.
        let settings = parse(&["--api-key", ""]).unwrap();
        assert!(matches!(settings.mode, Mode::Local { .. }));
        assert_eq!(settings.upstream.refresh_interval, Duration::from_secs(30));
        assert_eq!(settings.cors, CorsOrigins::Any);
        assert!(!settings.client_keys.is_enabled());
        assert_eq!(settings.sse_max_age, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn upstream_mode_and_base_url() {
        let settings = parse(&[
            "--api-key",
            "rg_server_x",
            "--base-url",
            "http://127.0.0.1:9/",
        ])
        .unwrap();
        let Mode::Upstream { api_key, base_url } = settings.mode else {
            panic!("expected upstream mode");
        };
        assert_eq!(api_key.expose(), "rg_server_x");
        assert_eq!(base_url, "http://127.0.0.1:9");
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let cases: &[(&[&str], &str)] = &[
            (&["--refresh-interval", "10ms"], "--refresh-interval"),
            (&["--refresh-interval", "soon"], "--refresh-interval"),
            (&["--sdk-keepalive", "10s"], "--sdk-keepalive"),
            (&["--breaker-threshold", "0"], "--breaker"),
            (&["--cors-origins", "example.com"], "--cors-origins"),
            (&["--body-limit", "10"], "--body-limit"),
            (&["--port", "70000"], "--port"),
            (&["--log-format", "xml"], "--log-format"),
            (
                &["--api-key", "k", "--base-url", "ftp://x"],
                "ROLLGATE_BASE_URL",
            ),
        ];
        for (args, needle) in cases {
            let error = parse(args).expect_err("must fail");
            assert!(error.contains(needle), "{args:?}: {error}");
        }
    }

    #[test]
    fn client_keys_and_cors_lists() {
        let settings = parse(&[
            "--client-keys",
            "a, b,,",
            "--cors-origins",
            "https://a.example, http://localhost:5173/",
        ])
        .unwrap();
        assert_eq!(
            format!("{:?}", settings.client_keys),
            "ClientKeys(2 configured)"
        );
        assert_eq!(
            settings.cors,
            CorsOrigins::List(vec![
                "https://a.example".into(),
                "http://localhost:5173".into()
            ])
        );
    }

    #[test]
    fn healthcheck_subcommand_and_probe_address() {
        let config = Config::try_parse_from(["x", "--port", "8080", "healthcheck"]).unwrap();
        assert_eq!(
            config.command,
            Some(Command::Healthcheck {
                timeout: Duration::from_secs(3)
            })
        );
        assert_eq!(config.probe_addr(), "127.0.0.1:8080".parse().unwrap());
        let config =
            Config::try_parse_from(["x", "--bind", "::", "healthcheck", "--timeout", "1s"])
                .unwrap();
        assert_eq!(
            config.probe_addr().ip(),
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        );
        let config = Config::try_parse_from(["x", "--bind", "10.1.2.3"]).unwrap();
        assert_eq!(config.command, None);
        assert_eq!(config.probe_addr().ip().to_string(), "10.1.2.3");
    }

    #[test]
    fn tls_needs_both_files_that_load() {
        let error = parse(&["--tls-cert", "/nonexistent/cert.pem"]).unwrap_err();
        assert!(error.contains("--tls-key"), "{error}");
        let error = parse(&[
            "--tls-cert",
            "/nonexistent/c.pem",
            "--tls-key",
            "/nonexistent/k.pem",
        ])
        .unwrap_err();
        assert!(
            error.contains("invalid --tls-cert (ROLLGATE_PROXY_TLS_CERT)"),
            "{error}"
        );
        assert!(error.contains("/nonexistent/c.pem"), "{error}");
        assert!(parse(&[]).unwrap().tls.is_none());
    }

    #[test]
    fn version_flag_prints_the_crate_version() {
        let error = Config::try_parse_from(["x", "--version"])
            .map(|_| ())
            .unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            error.to_string().trim(),
            format!("rollgate-proxy {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let secret = Secret::new("rg_server_topsecret");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(
            secret.redact("GET https://x/stream?token=rg_server_topsecret failed"),
            "GET https://x/stream?token=[redacted] failed"
        );
        let config = Config::try_parse_from(["x", "--api-key", "rg_server_topsecret"]).unwrap();
        assert!(!format!("{config:?}").contains("topsecret"));
        let settings = config.validate(1).unwrap();
        assert!(!format!("{settings:?}").contains("topsecret"));
    }
}
