//! One settings schema, one set of names, for both adapters: the native server reads them as
//! command-line flags or environment variables, the Worker as `[vars]` and secrets.
//!
//! [`SCHEMA`] lists every setting with its flag, variable, default and help; the native server
//! builds its command line from it and the Worker looks the same variables up. Values are parsed
//! and validated here once ([`Settings::from_lookup`]), so a duration is `30s` on both targets and
//! a bad value names its flag and variable the same way everywhere.

use std::time::Duration;

use crate::api::ClientKeys;
use crate::backoff::{ReconnectPolicy, RetryPolicy};
use crate::breaker::BreakerConfig;
use crate::cors::CorsPolicy;
use crate::refresh::RefreshBudget;
use crate::secret::Secret;
use crate::sse::decode::DecoderLimits;
use crate::upstream::UpstreamConfig;

/// Which adapter reads a setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Both the native server and the Worker.
    Both,
    /// Only the native server (sockets, files, logs, process lifetime).
    Native,
    /// Only the Worker (objects, the edge cache).
    Edge,
}

impl Target {
    /// Whether an adapter of `kind` reads settings of this target.
    pub fn includes(self, kind: Self) -> bool {
        self == Self::Both || self == kind
    }
}

/// One setting: its names, default and help.
#[derive(Debug, PartialEq, Eq)]
pub struct Spec {
    /// The long flag without dashes (`refresh-interval` → `--refresh-interval`); also the
    /// setting's id.
    pub flag: &'static str,
    /// The environment variable (native) or Worker var/secret name.
    pub env: &'static str,
    /// The default as it would be typed; `None`: unset unless given.
    pub default: Option<&'static str>,
    /// One line for `--help` and the README.
    pub help: &'static str,
    /// Who reads it.
    pub target: Target,
    /// A secret: never echoed (`--help` hides its value, errors never quote it).
    pub secret: bool,
}

impl Spec {
    /// A setting that is not a secret.
    pub const fn new(
        flag: &'static str,
        env: &'static str,
        default: Option<&'static str>,
        target: Target,
        help: &'static str,
    ) -> Self {
        Self {
            flag,
            env,
            default,
            help,
            target,
            secret: false,
        }
    }
}

macro_rules! spec {
    ($flag:literal, $env:literal, $default:expr, $target:ident, $help:literal) => {
        Spec::new($flag, $env, $default, Target::$target, $help)
    };
}

/// The Rollgate server key.
pub const API_KEY: Spec = Spec {
    flag: "api-key",
    env: "ROLLGATE_API_KEY",
    default: None,
    help: "Rollgate server API key; unset or empty runs local mode. Never logged or sent downstream",
    target: Target::Both,
    secret: true,
};
/// Rollgate's base URL.
pub const BASE_URL: Spec = spec!(
    "base-url",
    "ROLLGATE_BASE_URL",
    Some("https://api.rollgate.io"),
    Both,
    "Rollgate base URL (http/https, no query)"
);
/// Stream or only poll.
pub const STREAMING: Spec = spec!(
    "streaming",
    "ROLLGATE_PROXY_STREAMING",
    Some("true"),
    Both,
    "Hold the upstream stream (true) or only poll (false)"
);
/// Poll interval and per-user TTL.
pub const REFRESH_INTERVAL: Spec = spec!(
    "refresh-interval",
    "ROLLGATE_PROXY_REFRESH_INTERVAL",
    Some("30s"),
    Both,
    "Poll interval while the stream is down or off; TTL of per-user answers (at least 100ms)"
);
/// Idle upstream stream timeout.
pub const STREAM_IDLE_TIMEOUT: Spec = spec!(
    "stream-idle-timeout",
    "ROLLGATE_PROXY_STREAM_IDLE_TIMEOUT",
    Some("90s"),
    Both,
    "Reconnect an upstream stream that has sent no byte for this long"
);
/// Staleness threshold.
pub const STALE_AFTER: Spec = spec!(
    "stale-after",
    "ROLLGATE_PROXY_STALE_AFTER",
    Some("5m"),
    Both,
    "Data upstream has not confirmed for this long is reported stale (it is still served)"
);
/// One upstream request's timeout.
pub const UPSTREAM_TIMEOUT: Spec = spec!(
    "upstream-timeout",
    "ROLLGATE_PROXY_UPSTREAM_TIMEOUT",
    Some("10s"),
    Both,
    "Timeout of one upstream request (fetch, per-user fetch, forwarding)"
);
/// Upstream body limit.
pub const UPSTREAM_BODY_LIMIT: Spec = spec!(
    "upstream-body-limit",
    "ROLLGATE_PROXY_UPSTREAM_BODY_LIMIT",
    Some("16777216"),
    Both,
    "Largest upstream response body in bytes (flags fetch, per-user fetch): reading stops there and the answer counts as invalid"
);
/// Breaker failure threshold.
pub const BREAKER_THRESHOLD: Spec = spec!(
    "breaker-threshold",
    "ROLLGATE_PROXY_BREAKER_THRESHOLD",
    Some("5"),
    Both,
    "Failures within the window that open the circuit"
);
/// Breaker window.
pub const BREAKER_WINDOW: Spec = spec!(
    "breaker-window",
    "ROLLGATE_PROXY_BREAKER_WINDOW",
    Some("60s"),
    Both,
    "How long a failure counts"
);
/// Breaker open time.
pub const BREAKER_OPEN_TIMEOUT: Spec = spec!(
    "breaker-open-timeout",
    "ROLLGATE_PROXY_BREAKER_OPEN_TIMEOUT",
    Some("30s"),
    Both,
    "How long the circuit stays open before probing"
);
/// Breaker successes to close.
pub const BREAKER_SUCCESS_THRESHOLD: Spec = spec!(
    "breaker-success-threshold",
    "ROLLGATE_PROXY_BREAKER_SUCCESS_THRESHOLD",
    Some("3"),
    Both,
    "Half-open successes that close the circuit"
);
/// CORS allow-list.
pub const CORS_ORIGINS: Spec = spec!(
    "cors-origins",
    "ROLLGATE_PROXY_CORS_ORIGINS",
    Some("*"),
    Both,
    "Allowed origins, comma-separated, or * for any"
);
/// Client keys.
pub const CLIENT_KEYS: Spec = Spec {
    flag: "client-keys",
    env: "ROLLGATE_PROXY_CLIENT_KEYS",
    default: None,
    help: "Comma-separated keys; when set, data routes need one (Authorization: Bearer, X-API-Key or ?token=)",
    target: Target::Both,
    secret: true,
};
/// Frontend and OFREP keepalive.
pub const KEEPALIVE: Spec = spec!(
    "keepalive",
    "ROLLGATE_PROXY_KEEPALIVE",
    Some("15s"),
    Both,
    "Keepalive comment interval of /api/stream and /ofrep/v1/sse"
);
/// SDK stream keepalive.
pub const SDK_KEEPALIVE: Spec = spec!(
    "sdk-keepalive",
    "ROLLGATE_PROXY_SDK_KEEPALIVE",
    Some("4s"),
    Both,
    "Keepalive of /api/v1/sdk/stream (at most 4s: the Python SDK gives up after 5s of silence)"
);
/// SSE max connection age.
pub const SSE_MAX_AGE: Spec = spec!(
    "sse-max-age",
    "ROLLGATE_PROXY_SSE_MAX_AGE",
    Some("1h"),
    Both,
    "Close SSE connections after this age (±10% jitter) so clients rebalance; 0 disables it"
);
/// Request body limit.
pub const BODY_LIMIT: Spec = spec!(
    "body-limit",
    "ROLLGATE_PROXY_BODY_LIMIT",
    Some("65536"),
    Both,
    "Largest request body in bytes (413 PAYLOAD_TOO_LARGE)"
);
/// Per-user cache size.
pub const USER_CACHE_SIZE: Spec = spec!(
    "user-cache-size",
    "ROLLGATE_PROXY_USER_CACHE_SIZE",
    Some("10000"),
    Both,
    "Users whose upstream-evaluated flags are cached"
);
/// Per-user refreshes started per second toward Rollgate after a change.
pub const USER_REFRESH_RPS: Spec = spec!(
    "user-refresh-rps",
    "ROLLGATE_PROXY_USER_REFRESH_RPS",
    Some("50"),
    Both,
    "Evaluated mode: per-user answers refreshed per second at most after an upstream change (streaming users; convergence ≈ users ÷ this)"
);
/// Per-user refreshes in flight toward Rollgate.
pub const USER_REFRESH_CONCURRENCY: Spec = spec!(
    "user-refresh-concurrency",
    "ROLLGATE_PROXY_USER_REFRESH_CONCURRENCY",
    Some("8"),
    Both,
    "Evaluated mode: per-user refreshes in flight at most after an upstream change (1 to 32)"
);
/// Identify store size.
pub const IDENTIFY_STORE_SIZE: Spec = spec!(
    "identify-store-size",
    "ROLLGATE_PROXY_IDENTIFY_STORE_SIZE",
    Some("10000"),
    Both,
    "Users whose /identify attributes are kept"
);

/// Every setting both adapters share, in `--help` order. Adapter-only settings are declared by
/// the adapter with the same [`Spec`] shape (see [`Target`]).
pub const SCHEMA: &[&Spec] = &[
    &API_KEY,
    &BASE_URL,
    &STREAMING,
    &REFRESH_INTERVAL,
    &STREAM_IDLE_TIMEOUT,
    &STALE_AFTER,
    &UPSTREAM_TIMEOUT,
    &UPSTREAM_BODY_LIMIT,
    &BREAKER_THRESHOLD,
    &BREAKER_WINDOW,
    &BREAKER_OPEN_TIMEOUT,
    &BREAKER_SUCCESS_THRESHOLD,
    &CORS_ORIGINS,
    &CLIENT_KEYS,
    &KEEPALIVE,
    &SDK_KEEPALIVE,
    &SSE_MAX_AGE,
    &BODY_LIMIT,
    &USER_CACHE_SIZE,
    &USER_REFRESH_RPS,
    &USER_REFRESH_CONCURRENCY,
    &IDENTIFY_STORE_SIZE,
];

/// Longest SDK keepalive: the Python SDK reads with a 5 s timeout.
pub const MAX_SDK_KEEPALIVE: Duration = Duration::from_secs(4);

/// A setting that could not be used. `Display` names the flag and its variable:
/// `invalid --refresh-interval (ROLLGATE_PROXY_REFRESH_INTERVAL): must be at least 100ms`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid --{} ({}): {message}", spec.flag, spec.env)]
pub struct SettingsError {
    /// The setting.
    pub spec: &'static Spec,
    /// What is wrong (never the value of a secret).
    pub message: String,
}

impl SettingsError {
    /// An error about `spec`.
    pub fn new(spec: &'static Spec, message: impl Into<String>) -> Self {
        Self {
            spec,
            message: message.into(),
        }
    }
}

/// Raw values by setting, defaults applied: what an adapter collected (flags, environment,
/// vars), parsed into types here.
#[derive(Debug)]
pub struct Values<F> {
    lookup: F,
}

impl<F: Fn(&'static Spec) -> Option<String>> Values<F> {
    /// Values from `lookup`, which returns what was given for a setting (or `None`); the
    /// setting's default fills in. Empty or blank values count as not given.
    pub fn new(lookup: F) -> Self {
        Self { lookup }
    }

    /// The text given or the default; `None` when neither.
    pub fn text(&self, spec: &'static Spec) -> Option<String> {
        (self.lookup)(spec)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
            .or_else(|| spec.default.map(str::to_owned))
    }

    /// A duration with a unit (`500ms`, `30s`, `5m`, `1h`; `0` alone is zero).
    ///
    /// # Errors
    /// Not a duration, or missing.
    pub fn duration(&self, spec: &'static Spec) -> Result<Duration, SettingsError> {
        let text = self.required(spec)?;
        parse_duration(&text).map_err(|message| SettingsError::new(spec, message))
    }

    /// A duration that must be greater than zero.
    ///
    /// # Errors
    /// Not a duration, or zero.
    pub fn positive_duration(&self, spec: &'static Spec) -> Result<Duration, SettingsError> {
        let value = self.duration(spec)?;
        if value.is_zero() {
            return Err(SettingsError::new(spec, "must be greater than 0"));
        }
        Ok(value)
    }

    /// A whole number in `min..=max`.
    ///
    /// # Errors
    /// Not a number, or out of range.
    pub fn number(&self, spec: &'static Spec, min: u64, max: u64) -> Result<u64, SettingsError> {
        let text = self.required(spec)?;
        let value: u64 = text
            .parse()
            .map_err(|_| SettingsError::new(spec, format!("{text:?} is not a whole number")))?;
        if value < min {
            return Err(SettingsError::new(spec, format!("must be at least {min}")));
        }
        if value > max {
            return Err(SettingsError::new(spec, format!("must be at most {max}")));
        }
        Ok(value)
    }

    /// `true` or `false`.
    ///
    /// # Errors
    /// Anything else.
    pub fn boolean(&self, spec: &'static Spec) -> Result<bool, SettingsError> {
        match self.required(spec)?.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            other => Err(SettingsError::new(
                spec,
                format!("{other:?} is not true or false"),
            )),
        }
    }

    fn required(&self, spec: &'static Spec) -> Result<String, SettingsError> {
        self.text(spec)
            .ok_or_else(|| SettingsError::new(spec, "a value is required"))
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `1d`, sums such as `1h30m`, or `0`.
///
/// Hand-written rather than `humantime` so the Worker's wasm stays small: only these units,
/// whole numbers, no spaces inside a term.
///
/// # Errors
/// A message for a value without a unit, with an unknown unit, or too large.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || format!("{text:?} is not a duration like 500ms, 30s, 5m or 1h");
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let units = rest[digits..]
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        if digits == 0 || units == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        let unit_ms: u64 = match &rest[digits..digits + units] {
            "ms" => 1,
            "s" | "sec" | "secs" => 1_000,
            "m" | "min" | "mins" => 60_000,
            "h" | "hr" | "hrs" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        let term = number.checked_mul(unit_ms).ok_or_else(invalid)?;
        total = total
            .checked_add(Duration::from_millis(term))
            .ok_or_else(invalid)?;
        rest = &rest[digits + units..];
    }
    Ok(total)
}

/// The settings both adapters share, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The Rollgate server key; `None`: local mode.
    pub api_key: Option<Secret>,
    /// Rollgate's base URL, without a trailing slash.
    pub base_url: String,
    /// The upstream machine's settings (`jitter_seed` is the adapter's random input).
    pub upstream: UpstreamConfig,
    /// Timeout of one upstream request.
    pub upstream_timeout: Duration,
    /// CORS policy.
    pub cors: CorsPolicy,
    /// Client keys (none: the API is open).
    pub client_keys: ClientKeys,
    /// Keepalive of the frontend and OFREP streams.
    pub keepalive: Duration,
    /// Keepalive of the SDK stream.
    pub sdk_keepalive: Duration,
    /// SSE max connection age; `None`: unlimited.
    pub sse_max_age: Option<Duration>,
    /// Largest request body.
    pub body_limit: usize,
    /// Users whose upstream-evaluated flags are cached.
    pub user_cache_size: usize,
    /// The budget of per-user refreshes after an upstream change (streaming users tracked at
    /// most: the user cache size).
    pub user_refresh: RefreshBudget,
    /// Users whose `/identify` attributes are kept.
    pub identify_store_size: usize,
}

impl Default for Settings {
    fn default() -> Self {
        // The defaults of the schema always parse (pinned by a test).
        Self::from_lookup(|_| None, 0).unwrap_or_else(|_| unreachable!("defaults are valid"))
    }
}

impl Settings {
    /// Reads and validates every shared setting; `lookup` returns what was given for a
    /// setting (flag, variable, var or secret), `jitter_seed` seeds the upstream machine's
    /// jitter (a random value, so replicas do not retry in lockstep).
    ///
    /// # Errors
    /// The first invalid setting.
    pub fn from_lookup(
        lookup: impl Fn(&'static Spec) -> Option<String>,
        jitter_seed: u64,
    ) -> Result<Self, SettingsError> {
        let values = Values::new(lookup);
        let api_key = match values.text(&API_KEY) {
            None => None,
            Some(key) => {
                if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(SettingsError::new(
                        &API_KEY,
                        "contains whitespace or control characters",
                    ));
                }
                Some(Secret::new(key))
            }
        };
        let base_url = validate_base_url(&values.text(&BASE_URL).unwrap_or_default())
            .map_err(|message| SettingsError::new(&BASE_URL, message))?;
        let count = |spec: &'static Spec, min: u64| -> Result<u32, SettingsError> {
            let n = values.number(spec, min, u64::from(u32::MAX))?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        };
        let upstream = UpstreamConfig {
            streaming: values.boolean(&STREAMING)?,
            refresh_interval: values.duration(&REFRESH_INTERVAL)?,
            stream_idle_timeout: values.duration(&STREAM_IDLE_TIMEOUT)?,
            stale_after: values.positive_duration(&STALE_AFTER)?,
            breaker: BreakerConfig {
                failure_threshold: count(&BREAKER_THRESHOLD, 1)?,
                failure_window: values.positive_duration(&BREAKER_WINDOW)?,
                open_timeout: values.positive_duration(&BREAKER_OPEN_TIMEOUT)?,
                success_threshold: count(&BREAKER_SUCCESS_THRESHOLD, 1)?,
            },
            retry: RetryPolicy::default(),
            reconnect: ReconnectPolicy::default(),
            decoder_limits: DecoderLimits::default(),
            max_body_bytes: usize::try_from(values.number(&UPSTREAM_BODY_LIMIT, 1024, 1 << 32)?)
                .unwrap_or(usize::MAX),
            jitter_seed,
        };
        upstream.validate().map_err(|error| {
            use crate::upstream::ConfigError as Upstream;
            let spec = match &error {
                Upstream::TooShort {
                    setting: "stream_idle_timeout",
                    ..
                } => &STREAM_IDLE_TIMEOUT,
                Upstream::TooShort { .. } => &REFRESH_INTERVAL,
                Upstream::BodyLimit { .. } => &UPSTREAM_BODY_LIMIT,
                _ => &BREAKER_THRESHOLD,
            };
            SettingsError::new(spec, error.to_string())
        })?;
        let sdk_keepalive = values.positive_duration(&SDK_KEEPALIVE)?;
        if sdk_keepalive > MAX_SDK_KEEPALIVE {
            return Err(SettingsError::new(
                &SDK_KEEPALIVE,
                "must be at most 4s (the Python SDK reconnects after 5s of silence)",
            ));
        }
        let cors_text = values.text(&CORS_ORIGINS).unwrap_or_default();
        let cors = CorsPolicy::parse(&cors_text);
        if let CorsPolicy::List(origins) = &cors {
            if origins.iter().any(|origin| origin == "*") {
                return Err(SettingsError::new(
                    &CORS_ORIGINS,
                    "* cannot be combined with other origins",
                ));
            }
            if let Some(bad) = origins.iter().find(|origin| !is_origin(origin)) {
                return Err(SettingsError::new(
                    &CORS_ORIGINS,
                    format!("{bad:?} is not an origin like https://app.example.com"),
                ));
            }
        }
        let client_keys = ClientKeys::new(
            values
                .text(&CLIENT_KEYS)
                .unwrap_or_default()
                .split(',')
                .map(|key| key.trim().to_owned()),
        );
        let size = |spec: &'static Spec, min: u64, max: u64| -> Result<usize, SettingsError> {
            let n = values.number(spec, min, max)?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        };
        let sse_max_age = values.duration(&SSE_MAX_AGE)?;
        let user_cache_size = size(&USER_CACHE_SIZE, 1, 100_000_000)?;
        let user_refresh = RefreshBudget {
            rps: u32::try_from(values.number(&USER_REFRESH_RPS, 1, 100_000)?).unwrap_or(u32::MAX),
            // A refresh takes one of the per-user side-request slots too.
            concurrency: size(
                &USER_REFRESH_CONCURRENCY,
                1,
                crate::metrics::MAX_SIDE_REQUESTS_IN_FLIGHT as u64,
            )?,
            max_tracked: user_cache_size,
        };
        Ok(Self {
            api_key,
            base_url,
            upstream,
            upstream_timeout: values.positive_duration(&UPSTREAM_TIMEOUT)?,
            cors,
            client_keys,
            keepalive: values.positive_duration(&KEEPALIVE)?,
            sdk_keepalive,
            sse_max_age: (!sse_max_age.is_zero()).then_some(sse_max_age),
            body_limit: size(&BODY_LIMIT, 1024, 1 << 30)?,
            user_cache_size,
            user_refresh,
            identify_store_size: size(&IDENTIFY_STORE_SIZE, 1, 100_000_000)?,
        })
    }
}

/// `http(s)://host[:port][/path]`, no query or fragment; returned without a trailing slash
/// (paths are appended verbatim, as the SDKs do).
fn validate_base_url(raw: &str) -> Result<String, String> {
    let url = raw.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err("has no host".to_owned());
    }
    if url.contains(['?', '#']) {
        return Err("must not have a query or fragment".to_owned());
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".to_owned());
    }
    Ok(url.trim_end_matches('/').to_owned())
}

fn is_origin(origin: &str) -> bool {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    rest.is_some_and(|host| {
        !host.is_empty() && !host.contains('/') && host.bytes().all(|b| b.is_ascii_graphic())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        Settings::from_lookup(|spec| map.get(spec.env).map(|v| (*v).to_owned()), 7)
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let settings = Settings::default();
        assert!(settings.api_key.is_none());
        assert_eq!(settings.base_url, "https://api.rollgate.io");
        assert_eq!(settings.upstream.refresh_interval, Duration::from_secs(30));
        assert_eq!(settings.upstream_timeout, Duration::from_secs(10));
        assert_eq!(settings.sse_max_age, Some(Duration::from_secs(3600)));
        assert_eq!(settings.cors, CorsPolicy::Any);
        assert!(!settings.client_keys.is_enabled());
        assert_eq!(settings.body_limit, 65_536);
        assert_eq!(
            settings.upstream.max_body_bytes,
            crate::upstream::DEFAULT_MAX_BODY_BYTES
        );
    }

    #[test]
    fn durations_take_units_everywhere() {
        let s = parse(&[
            ("ROLLGATE_PROXY_REFRESH_INTERVAL", "250ms"),
            ("ROLLGATE_PROXY_SSE_MAX_AGE", "0"),
            ("ROLLGATE_PROXY_UPSTREAM_TIMEOUT", "1m30s"),
        ])
        .unwrap();
        assert_eq!(s.upstream.refresh_interval, Duration::from_millis(250));
        assert_eq!(s.sse_max_age, None);
        assert_eq!(s.upstream_timeout, Duration::from_secs(90));
        let error = parse(&[("ROLLGATE_PROXY_REFRESH_INTERVAL", "30000")]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("invalid --refresh-interval (ROLLGATE_PROXY_REFRESH_INTERVAL):")
        );
        let error = parse(&[("ROLLGATE_PROXY_REFRESH_INTERVAL", "10ms")]).unwrap_err();
        assert_eq!(error.spec, &REFRESH_INTERVAL);
        assert!(error.message.contains("100ms"), "{error}");
    }

    #[test]
    fn every_invalid_value_names_its_setting() {
        let cases: &[(&str, &str)] = &[
            ("ROLLGATE_BASE_URL", "ftp://x"),
            ("ROLLGATE_BASE_URL", "https://x?y=1"),
            ("ROLLGATE_API_KEY", "a b"),
            ("ROLLGATE_PROXY_STREAMING", "maybe"),
            ("ROLLGATE_PROXY_SDK_KEEPALIVE", "5s"),
            ("ROLLGATE_PROXY_KEEPALIVE", "0"),
            ("ROLLGATE_PROXY_BODY_LIMIT", "10"),
            ("ROLLGATE_PROXY_USER_CACHE_SIZE", "0"),
            ("ROLLGATE_PROXY_BREAKER_THRESHOLD", "x"),
            ("ROLLGATE_PROXY_CORS_ORIGINS", "app.example.com"),
        ];
        for (env, value) in cases {
            let error = parse(&[(env, value)]).unwrap_err();
            assert_eq!(error.spec.env, *env, "{env}={value}: {error}");
        }
        let error = parse(&[("ROLLGATE_API_KEY", "rg secret")]).unwrap_err();
        assert!(!error.to_string().contains("secret"));
    }

    #[test]
    fn lists_and_keys() {
        let s = parse(&[
            ("ROLLGATE_API_KEY", " rg_server_x "),
            ("ROLLGATE_BASE_URL", "http://127.0.0.1:9/"),
            ("ROLLGATE_PROXY_CLIENT_KEYS", "k1, ,k2"),
            (
                "ROLLGATE_PROXY_CORS_ORIGINS",
                "https://a.example,http://b:5173",
            ),
        ])
        .unwrap();
        assert_eq!(s.api_key.unwrap().expose(), "rg_server_x");
        assert_eq!(s.base_url, "http://127.0.0.1:9");
        assert!(s.client_keys.authorize(Some("Bearer k2"), None, "").is_ok());
        assert!(matches!(s.cors, CorsPolicy::List(ref l) if l.len() == 2));
    }

    #[test]
    fn durations_parse_like_the_readme_says() {
        let ok = [
            ("0", 0),
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1h30m", 5_400_000),
            ("2d", 172_800_000),
            (" 15s ", 15_000),
        ];
        for (text, ms) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in [
            "",
            "30",
            "s",
            "1.5s",
            "10 s",
            "5x",
            "-1s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in SCHEMA.iter().enumerate() {
            for b in &SCHEMA[i + 1..] {
                assert_ne!(a.flag, b.flag);
                assert_ne!(a.env, b.env);
            }
        }
    }
}
