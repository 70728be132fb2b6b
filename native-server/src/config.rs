//! The command line: core's settings schema plus the native-only settings, as flags with an
//! environment variable each, validated once into typed [`Settings`].

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Arg, ArgMatches, Command};
use rollgate_proxy_core::secret::Secret;
use rollgate_proxy_core::settings::{self, SCHEMA, SettingsError, Spec, Target, Values};

/// TCP port.
pub const PORT: Spec = Spec::new(
    "port",
    "PORT",
    Some("3001"),
    Target::Native,
    "TCP port to listen on; 0 picks a free one (the bound address is logged)",
);
/// Bind address.
pub const BIND: Spec = Spec::new(
    "bind",
    "ROLLGATE_PROXY_BIND",
    Some("0.0.0.0"),
    Target::Native,
    "Address to bind",
);
/// Persisted snapshot path.
pub const SNAPSHOT_FILE: Spec = Spec::new(
    "snapshot-file",
    "ROLLGATE_PROXY_SNAPSHOT_FILE",
    Some("./rollgate-proxy-snapshot.json"),
    Target::Native,
    "Last good snapshot (upstream mode): written atomically, loaded at start; empty disables it",
);
/// Local mode's rules file.
pub const FLAGS_FILE: Spec = Spec::new(
    "flags-file",
    "ROLLGATE_PROXY_FLAGS_FILE",
    Some("examples/flags.json"),
    Target::Native,
    "Rules file of local mode (no API key); edits are pushed to clients",
);
/// Slow-client bound.
pub const REQUEST_TIMEOUT: Spec = Spec::new(
    "request-timeout",
    "ROLLGATE_PROXY_REQUEST_TIMEOUT",
    Some("5s"),
    Target::Native,
    "Time a client has to send its request head and body (SSE responses are not limited)",
);
/// Header size limit.
pub const MAX_HEADER_BYTES: Spec = Spec::new(
    "max-header-bytes",
    "ROLLGATE_PROXY_MAX_HEADER_BYTES",
    Some("16384"),
    Target::Native,
    "Largest total request header size in bytes (431 HEADERS_TOO_LARGE)",
);
/// URI length limit.
pub const MAX_URI_LENGTH: Spec = Spec::new(
    "max-uri-length",
    "ROLLGATE_PROXY_MAX_URI_LENGTH",
    Some("8192"),
    Target::Native,
    "Longest request URI in bytes (414 URI_TOO_LONG)",
);
/// Overload bound.
pub const MAX_CONCURRENT_REQUESTS: Spec = Spec::new(
    "max-concurrent-requests",
    "ROLLGATE_PROXY_MAX_CONCURRENT_REQUESTS",
    Some("4096"),
    Target::Native,
    "Requests handled at once by the process (all environments together) before new ones are shed with 503 OVERLOADED and a jittered Retry-After (probes, health and metrics never are; open SSE streams do not count); 0 disables",
);
/// Events flush interval.
pub const EVENTS_FLUSH_INTERVAL: Spec = Spec::new(
    "events-flush-interval",
    "ROLLGATE_PROXY_EVENTS_FLUSH_INTERVAL",
    Some("30s"),
    Target::Native,
    "How often buffered SDK events are forwarded upstream",
);
/// Telemetry flush interval.
pub const TELEMETRY_FLUSH_INTERVAL: Spec = Spec::new(
    "telemetry-flush-interval",
    "ROLLGATE_PROXY_TELEMETRY_FLUSH_INTERVAL",
    Some("60s"),
    Target::Native,
    "How often aggregated SDK telemetry is forwarded upstream",
);
/// Graceful shutdown bound.
pub const SHUTDOWN_TIMEOUT: Spec = Spec::new(
    "shutdown-timeout",
    "ROLLGATE_PROXY_SHUTDOWN_TIMEOUT",
    Some("10s"),
    Target::Native,
    "Upper bound of a graceful shutdown",
);
/// Log format.
pub const LOG_FORMAT: Spec = Spec::new(
    "log-format",
    "ROLLGATE_PROXY_LOG_FORMAT",
    Some("text"),
    Target::Native,
    "Log format: text or json (one object per line)",
);
/// Log filter.
pub const LOG_LEVEL: Spec = Spec::new(
    "log-level",
    "ROLLGATE_PROXY_LOG_LEVEL",
    Some("info"),
    Target::Native,
    "Log level or filter, e.g. debug or rollgate_proxy_server=debug,info",
);

/// TLS certificate chain.
pub const TLS_CERT: Spec = Spec::new(
    "tls-cert",
    "ROLLGATE_PROXY_TLS_CERT",
    None,
    Target::Native,
    "Serve HTTPS with this PEM certificate chain (needs --tls-key); reloaded when it changes",
);
/// TLS private key.
pub const TLS_KEY: Spec = Spec::new(
    "tls-key",
    "ROLLGATE_PROXY_TLS_KEY",
    None,
    Target::Native,
    "The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1); reloaded when it changes",
);

/// Several environments from a file.
pub const CONFIG: Spec = Spec::new(
    "config",
    "ROLLGATE_PROXY_CONFIG",
    None,
    Target::Native,
    "TOML file of several environments (name, server key, base URL, client keys with expiry); reloaded on change and SIGHUP. Without it, one environment from the flags above",
);

/// The native server's own settings, after core's [`SCHEMA`] in `--help`.
pub const NATIVE_SCHEMA: &[&Spec] = &[
    &PORT,
    &BIND,
    &SNAPSHOT_FILE,
    &FLAGS_FILE,
    &REQUEST_TIMEOUT,
    &MAX_HEADER_BYTES,
    &MAX_URI_LENGTH,
    &MAX_CONCURRENT_REQUESTS,
    &EVENTS_FLUSH_INTERVAL,
    &TELEMETRY_FLUSH_INTERVAL,
    &SHUTDOWN_TIMEOUT,
    &LOG_FORMAT,
    &LOG_LEVEL,
    &TLS_CERT,
    &TLS_KEY,
    &CONFIG,
];

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
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

/// Validated settings: core's shared ones and the native server's own.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The settings both adapters share (upstream, CORS, client keys, streams, caches).
    pub core: settings::Settings,
    /// Address to bind.
    pub addr: SocketAddr,
    /// Local or upstream.
    pub mode: Mode,
    /// Persisted snapshot path; `None`: persistence off.
    pub snapshot_file: Option<PathBuf>,
    /// Slow-client timeout for request heads and bodies.
    pub request_timeout: Duration,
    /// Largest total header size.
    pub max_header_bytes: usize,
    /// Longest URI.
    pub max_uri_length: usize,
    /// Requests handled at once before shedding; `None`: unlimited.
    pub max_concurrent_requests: Option<usize>,
    /// Events flush interval.
    pub events_flush_interval: Duration,
    /// Telemetry flush interval.
    pub telemetry_flush_interval: Duration,
    /// Graceful shutdown bound.
    pub shutdown_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level or filter.
    pub log_level: String,
    /// TLS termination; `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsSettings>,
    /// The environments file; `None`: one environment from the settings above.
    pub config_file: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Run the proxy.
    Serve(Box<Settings>),
    /// `rollgate-proxy healthcheck`: ask `GET /ready` of the proxy on the configured address and
    /// exit 0 or 1 (a container health check that needs no shell or wget).
    Healthcheck {
        /// The address to probe: the bound one, or loopback when the proxy binds every address.
        addr: SocketAddr,
        /// How long to wait for the answer.
        timeout: Duration,
        /// The certificate to pin when the proxy terminates TLS.
        tls_cert: Option<PathBuf>,
    },
}

/// The command line: every setting of core's schema and the native one.
pub fn command() -> Command {
    let mut command = Command::new("rollgate-proxy")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "rollgate-proxy: a feature-flag relay for Rollgate. One upstream connection per \
             process, every flag answer from memory.",
        )
        .after_help(
            "Without ROLLGATE_API_KEY it runs in local mode on a rules file (default \
             examples/flags.json) and pushes edits of that file to clients. Durations take a \
             unit: 500ms, 30s, 5m, 1h.",
        );
    for spec in SCHEMA.iter().chain(NATIVE_SCHEMA) {
        let mut arg = Arg::new(spec.flag)
            .long(spec.flag)
            .env(spec.env)
            .help(spec.help)
            .num_args(1)
            .hide_env_values(spec.secret);
        if let Some(default) = spec.default {
            arg = arg.default_value(default);
        }
        command = command.arg(arg);
    }
    command.subcommand(
        Command::new("healthcheck")
            .about(
                "Ask GET /ready of the proxy on the configured --bind/--port (PORT) and exit 0 \
                 when it answers 200, 1 otherwise: a container health check with no shell",
            )
            .arg(
                Arg::new("timeout")
                    .long("timeout")
                    .num_args(1)
                    .default_value("3s")
                    .help("How long to wait for the answer"),
            ),
    )
}

/// Parses and validates `args` (the first is the program name) and the environment.
///
/// # Errors
/// `Err(clap::Error)` for `--help`, `--version` or unknown flags (print it and exit with its
/// code); `Ok(Err(SettingsError))` for an invalid value.
pub fn parse_from<I, T>(
    args: I,
    jitter_seed: u64,
) -> Result<Result<Settings, SettingsError>, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    Ok(
        invocation_from(args, jitter_seed)?.and_then(|invocation| match invocation {
            Invocation::Serve(settings) => Ok(*settings),
            Invocation::Healthcheck { .. } => Err(SettingsError::new(
                &PORT,
                "the healthcheck subcommand does not serve",
            )),
        }),
    )
}

/// What `args` (the first is the program name) and the environment ask for: serve (validated
/// settings) or a health check (only the address is read, nothing else is validated).
///
/// # Errors
/// As [`parse_from`].
pub fn invocation_from<I, T>(
    args: I,
    jitter_seed: u64,
) -> Result<Result<Invocation, SettingsError>, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let Some(healthcheck) = matches.subcommand_matches("healthcheck") else {
        return Ok(
            Settings::from_matches(&matches, jitter_seed).map(|s| Invocation::Serve(Box::new(s)))
        );
    };
    let lookup = |spec: &'static Spec| matches.get_one::<String>(spec.flag).cloned();
    let values = Values::new(lookup);
    Ok((|| {
        let (bind, port) = address(&values)?;
        let timeout = healthcheck
            .get_one::<String>("timeout")
            .map(|t| settings::parse_duration(t))
            .transpose()
            .map_err(|message| {
                SettingsError::new(&PORT, format!("healthcheck --timeout: {message}"))
            })?
            .unwrap_or(Duration::from_secs(3));
        Ok(Invocation::Healthcheck {
            addr: probe_addr(SocketAddr::new(bind, port)),
            timeout,
            tls_cert: values.text(&TLS_CERT).map(PathBuf::from),
        })
    })())
}

/// The address a local health check connects to: the bound address, or loopback when the
/// proxy binds every address (`0.0.0.0`, `::`).
pub fn probe_addr(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

fn address<F: Fn(&'static Spec) -> Option<String>>(
    values: &Values<F>,
) -> Result<(IpAddr, u16), SettingsError> {
    let port = u16::try_from(values.number(&PORT, 0, u64::from(u16::MAX))?).unwrap_or(0);
    let bind_text = values.text(&BIND).unwrap_or_default();
    let bind: IpAddr = bind_text
        .parse()
        .map_err(|_| SettingsError::new(&BIND, format!("{bind_text:?} is not an IP address")))?;
    Ok((bind, port))
}

impl Settings {
    /// Validates parsed arguments.
    ///
    /// # Errors
    /// The first invalid setting, naming its flag and variable.
    pub fn from_matches(matches: &ArgMatches, jitter_seed: u64) -> Result<Self, SettingsError> {
        let lookup = |spec: &'static Spec| matches.get_one::<String>(spec.flag).cloned();
        let core = settings::Settings::from_lookup(lookup, jitter_seed)?;
        let values = Values::new(lookup);
        let (bind, port) = address(&values)?;
        let size = |spec: &'static Spec, min: u64| -> Result<usize, SettingsError> {
            let n = values.number(spec, min, 1 << 30)?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        };
        let log_format = match values.text(&LOG_FORMAT).as_deref() {
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            other => {
                return Err(SettingsError::new(
                    &LOG_FORMAT,
                    format!("{:?} is not text or json", other.unwrap_or_default()),
                ));
            }
        };
        let mode = match &core.api_key {
            None => Mode::Local {
                flags_file: PathBuf::from(values.text(&FLAGS_FILE).unwrap_or_default()),
            },
            Some(api_key) => Mode::Upstream {
                api_key: api_key.clone(),
                base_url: core.base_url.clone(),
            },
        };
        let tls = match (values.text(&TLS_CERT), values.text(&TLS_KEY)) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(SettingsError::new(&TLS_KEY, "--tls-cert needs --tls-key"));
            }
            (None, Some(_)) => {
                return Err(SettingsError::new(&TLS_CERT, "--tls-key needs --tls-cert"));
            }
            (Some(cert), Some(key)) => Some(
                crate::tls::TlsSettings::load(PathBuf::from(cert), PathBuf::from(key))
                    .map_err(|error| SettingsError::new(&TLS_CERT, error.to_string()))?,
            ),
        };
        Ok(Self {
            tls,
            addr: SocketAddr::new(bind, port),
            mode,
            // An explicitly empty value disables persistence.
            snapshot_file: matches
                .get_one::<String>(SNAPSHOT_FILE.flag)
                .map(|path| path.trim().to_owned())
                .filter(|path| !path.is_empty())
                .map(PathBuf::from),
            request_timeout: values.positive_duration(&REQUEST_TIMEOUT)?,
            max_header_bytes: size(&MAX_HEADER_BYTES, 1024)?,
            max_uri_length: size(&MAX_URI_LENGTH, 256)?,
            max_concurrent_requests: Some(size(&MAX_CONCURRENT_REQUESTS, 0)?).filter(|n| *n > 0),
            events_flush_interval: values.positive_duration(&EVENTS_FLUSH_INTERVAL)?,
            telemetry_flush_interval: values.positive_duration(&TELEMETRY_FLUSH_INTERVAL)?,
            shutdown_timeout: values.positive_duration(&SHUTDOWN_TIMEOUT)?,
            log_format,
            log_level: values.text(&LOG_LEVEL).unwrap_or_default(),
            config_file: values
                .text(&CONFIG)
                .map(|path| path.trim().to_owned())
                .filter(|path| !path.is_empty())
                .map(PathBuf::from),
            core,
        })
    }
}

#[cfg(test)]
mod tests {
    use rollgate_proxy_core::cors::CorsPolicy;

    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["rollgate-proxy"];
        argv.extend_from_slice(args);
        parse_from(argv, 1)
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_local_mode_on_port_3001() {
        let settings = parse(&["--api-key", ""]).unwrap();
        assert!(matches!(settings.mode, Mode::Local { .. }));
        assert_eq!(
            settings.core.upstream.refresh_interval,
            Duration::from_secs(30)
        );
        assert_eq!(settings.core.cors, CorsPolicy::Any);
        assert_eq!(settings.request_timeout, Duration::from_secs(5));
        assert!(
            parse(&["--snapshot-file", ""])
                .unwrap()
                .snapshot_file
                .is_none()
        );
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
    fn invalid_values_name_the_flag_and_variable() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--refresh-interval", "10ms"],
                "invalid --refresh-interval (ROLLGATE_PROXY_REFRESH_INTERVAL)",
            ),
            (&["--refresh-interval", "soon"], "--refresh-interval"),
            (&["--sdk-keepalive", "10s"], "--sdk-keepalive"),
            (&["--breaker-threshold", "0"], "--breaker-threshold"),
            (&["--cors-origins", "example.com"], "--cors-origins"),
            (&["--body-limit", "10"], "--body-limit"),
            (&["--port", "70000"], "invalid --port (PORT)"),
            (&["--log-format", "xml"], "--log-format"),
            (&["--bind", "localhost"], "--bind"),
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
    fn healthcheck_subcommand_and_probe_address() {
        let probe = |args: &[&str]| {
            let mut argv = vec!["x"];
            argv.extend_from_slice(args);
            match invocation_from(argv, 1).unwrap().unwrap() {
                Invocation::Healthcheck { addr, timeout, .. } => (addr, timeout),
                Invocation::Serve(_) => panic!("expected a health check"),
            }
        };
        assert_eq!(
            probe(&["--port", "8080", "healthcheck"]),
            ("127.0.0.1:8080".parse().unwrap(), Duration::from_secs(3))
        );
        let (addr, timeout) = probe(&["--bind", "::", "healthcheck", "--timeout", "1s"]);
        assert_eq!(addr.ip(), IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
        assert_eq!(timeout, Duration::from_secs(1));
        assert_eq!(
            probe(&["--bind", "10.1.2.3", "healthcheck"])
                .0
                .ip()
                .to_string(),
            "10.1.2.3"
        );
        assert!(matches!(
            invocation_from(["x"], 1).unwrap().unwrap(),
            Invocation::Serve(_)
        ));
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
        let error = parse_from(["x", "--version"], 1).map(|_| ()).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            error.to_string().trim(),
            format!("rollgate-proxy {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn help_lists_every_variable_and_hides_secret_values() {
        let help = command().render_long_help().to_string();
        for spec in SCHEMA.iter().chain(NATIVE_SCHEMA) {
            assert!(help.contains(spec.env), "{}", spec.env);
        }
        let settings = parse(&["--api-key", "rg_server_topsecret"]).unwrap();
        assert!(!format!("{settings:?}").contains("topsecret"));
    }
}
