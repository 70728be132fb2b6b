//! The Worker's settings, read from `wrangler.toml` vars and secrets into typed values once.
//!
//! Pure: the wasm entry point collects the raw strings from `Env` and calls [`EdgeConfig::from_lookup`],
//! so every rule here is unit-tested on the host.

use std::time::Duration;

use rollgate_proxy_core::api::ClientKeys;
use rollgate_proxy_core::breaker::BreakerConfig;
use rollgate_proxy_core::upstream::UpstreamConfig;

/// Allowed CORS origins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`: any origin (the default, as the native server).
    Any,
    /// Only these exact origins.
    List(Vec<String>),
}

/// Every setting of the Worker and its Durable Objects.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// The Rollgate server key (`wrangler secret put ROLLGATE_API_KEY`); `None`: local mode.
    pub api_key: Option<Secret>,
    /// Rollgate's base URL, without a trailing slash.
    pub base_url: String,
    /// Names the relay object (one upstream connection per environment).
    pub environment: String,
    /// How many SSE shard objects share the stream clients.
    pub sse_shards: u32,
    /// CORS allow-list.
    pub cors: CorsOrigins,
    /// Client keys for the data routes.
    pub client_keys: ClientKeys,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// Keepalive of the frontend and OFREP streams.
    pub keepalive: Duration,
    /// Keepalive of the SDK stream (the Python SDK reads with a 5 s timeout).
    pub sdk_keepalive: Duration,
    /// How long an edge cache entry of the current revision is trusted before asking the relay.
    pub cache_ttl: Duration,
    /// SSE connections are closed after about this age (±10%, see [`jittered_age`]) so
    /// clients spread over shards and locations again; `None` (`SSE_MAX_AGE_MS=0`): never.
    pub sse_max_age: Option<Duration>,
    /// The upstream machine's settings.
    pub upstream: UpstreamConfig,
}

/// A secret value whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for the one place that sends it upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A setting that could not be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not a number in the accepted range.
    #[error("{name} must be an integer in {min}..={max}, got {value:?}")]
    Range {
        /// The variable.
        name: &'static str,
        /// What was given.
        value: String,
        /// Lowest accepted.
        min: u64,
        /// Highest accepted.
        max: u64,
    },
    /// Not `true` or `false`.
    #[error("{name} must be true or false, got {value:?}")]
    Bool {
        /// The variable.
        name: &'static str,
        /// What was given.
        value: String,
    },
    /// The base URL is not http(s).
    #[error("ROLLGATE_BASE_URL must start with http:// or https://")]
    BaseUrl,
    /// The upstream settings are inconsistent.
    #[error("upstream settings: {0}")]
    Upstream(String),
}

impl EdgeConfig {
    /// Reads every setting through `lookup` (a var or secret by name; `None` or empty: unset).
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let num = |name: &'static str, default: u64, min: u64, max: u64| match get(name) {
            None => Ok(default),
            Some(value) => value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or(ConfigError::Range {
                    name,
                    value,
                    min,
                    max,
                }),
        };
        let ms = |name: &'static str, default: u64, min: u64, max: u64| {
            num(name, default, min, max).map(Duration::from_millis)
        };
        let base_url = get("ROLLGATE_BASE_URL")
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned())
            .trim()
            .trim_end_matches('/')
            .to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(ConfigError::BaseUrl);
        }
        let streaming = match get("ROLLGATE_STREAMING").as_deref().map(str::trim) {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(ConfigError::Bool {
                    name: "ROLLGATE_STREAMING",
                    value: other.to_owned(),
                });
            }
        };
        let upstream = UpstreamConfig {
            streaming,
            refresh_interval: ms("REFRESH_INTERVAL_MS", 30_000, 100, 86_400_000)?,
            stream_idle_timeout: ms("STREAM_IDLE_TIMEOUT_MS", 90_000, 100, 86_400_000)?,
            stale_after: ms("STALE_AFTER_MS", 300_000, 1, 86_400_000)?,
            breaker: BreakerConfig {
                failure_threshold: u32::try_from(num("BREAKER_THRESHOLD", 5, 1, 1000)?)
                    .unwrap_or(5),
                failure_window: ms("BREAKER_WINDOW_MS", 60_000, 1, 86_400_000)?,
                open_timeout: ms("BREAKER_OPEN_TIMEOUT_MS", 30_000, 1, 86_400_000)?,
                success_threshold: u32::try_from(num("BREAKER_SUCCESS_THRESHOLD", 3, 1, 1000)?)
                    .unwrap_or(3),
            },
            ..UpstreamConfig::default()
        };
        upstream
            .validate()
            .map_err(|e| ConfigError::Upstream(e.to_string()))?;
        let cors = match get("CORS_ORIGINS") {
            None => CorsOrigins::Any,
            Some(list) if list.trim() == "*" => CorsOrigins::Any,
            Some(list) => CorsOrigins::List(split_list(&list)),
        };
        Ok(Self {
            api_key: get("ROLLGATE_API_KEY").map(|k| Secret::new(k.trim().to_owned())),
            base_url,
            environment: get("ROLLGATE_ENV").unwrap_or_else(|| "default".to_owned()),
            sse_shards: u32::try_from(num("SSE_SHARDS", 4, 1, 1024)?).unwrap_or(4),
            cors,
            client_keys: ClientKeys::new(
                get("CLIENT_KEYS")
                    .as_deref()
                    .map(split_list)
                    .unwrap_or_default(),
            ),
            body_limit: usize::try_from(num("BODY_LIMIT", 65_536, 1, 1 << 24)?).unwrap_or(65_536),
            keepalive: ms("KEEPALIVE_MS", 15_000, 100, 600_000)?,
            sdk_keepalive: ms("SDK_KEEPALIVE_MS", 4_000, 100, 4_000)?,
            cache_ttl: ms("CACHE_TTL_MS", 1_000, 0, 60_000)?,
            sse_max_age: Some(ms("SSE_MAX_AGE_MS", 3_600_000, 0, 604_800_000)?)
                .filter(|age| !age.is_zero()),
            upstream,
        })
    }

    /// The name of the relay object of this environment.
    pub fn relay_name(&self) -> String {
        format!("relay:{}", self.environment)
    }

    /// The name of SSE shard `index` of this environment.
    pub fn shard_name(&self, index: u32) -> String {
        format!("sse:{}:{index}", self.environment)
    }

    /// Picks a shard from a uniformly random `sample` in `[0, 1)`.
    pub fn pick_shard(&self, sample: f64) -> u32 {
        let shards = f64::from(self.sse_shards);
        // Truncation is the point: [0,1) × n lands in 0..n; clamp guards a sample of exactly 1.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "sample is in [0,1), so the product is in [0, sse_shards)"
        )]
        let index = (sample.clamp(0.0, 1.0) * shards) as u32;
        index.min(self.sse_shards - 1)
    }
}

/// `age` scaled by a factor in `[0.9, 1.1)` from a uniform `sample` in `[0, 1)`, as the native
/// server's `--sse-max-age` jitter: connections opened together do not all end together.
pub fn jittered_age(age: Duration, sample: f64) -> Duration {
    age.mul_f64(1.0 + 0.1 * (2.0 * sample.clamp(0.0, 1.0) - 1.0))
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Rollgate's production API.
pub const DEFAULT_BASE_URL: &str = "https://api.rollgate.io";

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<EdgeConfig, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        EdgeConfig::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_are_local_mode_with_the_servers_settings() {
        let c = config(&[]).unwrap();
        assert!(c.api_key.is_none());
        assert_eq!(c.base_url, DEFAULT_BASE_URL);
        assert_eq!(c.environment, "default");
        assert_eq!(c.sse_shards, 4);
        assert_eq!(c.cors, CorsOrigins::Any);
        assert!(!c.client_keys.is_enabled());
        assert_eq!(c.body_limit, 65_536);
        assert_eq!(c.keepalive, Duration::from_secs(15));
        assert_eq!(c.sdk_keepalive, Duration::from_secs(4));
        assert_eq!(c.upstream.refresh_interval, Duration::from_secs(30));
        assert_eq!(c.relay_name(), "relay:default");
        assert_eq!(c.sse_max_age, Some(Duration::from_secs(3600)));
        assert_eq!(
            config(&[("SSE_MAX_AGE_MS", "0")]).unwrap().sse_max_age,
            None
        );
        let hour = Duration::from_secs(3600);
        assert_eq!(jittered_age(hour, 0.0), Duration::from_secs(3240));
        assert_eq!(jittered_age(hour, 0.5), hour);
        assert_eq!(jittered_age(hour, 1.0), Duration::from_secs(3960));
        assert_eq!(c.shard_name(1), "sse:default:1");
    }

    #[test]
    fn values_are_parsed_and_checked() {
        let c = config(&[
            ("ROLLGATE_API_KEY", " sk-1 "),
            ("ROLLGATE_BASE_URL", "http://127.0.0.1:9/"),
            ("SSE_SHARDS", "2"),
            ("CORS_ORIGINS", "https://a.example, https://b.example"),
            ("CLIENT_KEYS", "k1,,k2"),
            ("REFRESH_INTERVAL_MS", "1000"),
            ("ROLLGATE_STREAMING", "false"),
        ])
        .unwrap();
        assert_eq!(c.api_key.as_ref().unwrap().expose(), "sk-1");
        assert_eq!(format!("{:?}", c.api_key), "Some([redacted])");
        assert_eq!(c.base_url, "http://127.0.0.1:9");
        assert_eq!(
            c.cors,
            CorsOrigins::List(vec!["https://a.example".into(), "https://b.example".into()])
        );
        assert!(c.client_keys.authorize(Some("Bearer k2"), None, "").is_ok());
        assert!(!c.upstream.streaming);
        assert_eq!(c.pick_shard(0.0), 0);
        assert_eq!(c.pick_shard(0.49), 0);
        assert_eq!(c.pick_shard(0.5), 1);
        assert_eq!(c.pick_shard(0.999_999), 1);
        assert_eq!(c.pick_shard(1.0), 1);

        for (name, value) in [
            ("SSE_SHARDS", "0"),
            ("SSE_SHARDS", "x"),
            ("SDK_KEEPALIVE_MS", "5000"),
            ("BODY_LIMIT", "-1"),
            ("ROLLGATE_STREAMING", "yes"),
            ("ROLLGATE_BASE_URL", "ftp://x"),
            ("REFRESH_INTERVAL_MS", "10"),
        ] {
            assert!(config(&[(name, value)]).is_err(), "{name}={value}");
        }
    }
}
