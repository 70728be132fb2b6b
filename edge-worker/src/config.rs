//! The Worker's settings: core's schema (the native server's names: `ROLLGATE_PROXY_*`, durations
//! with units) read from `wrangler.toml` `[vars]` and secrets, plus the Worker's own.
//!
//! Pure: the wasm entry point collects the raw strings from `Env` and calls
//! [`EdgeConfig::from_lookup`], so every rule here is unit-tested on the host.

use std::sync::Arc;
use std::time::Duration;

use rollgate_proxy_core::api::ClientKeys;
use rollgate_proxy_core::environments::Environments;
use rollgate_proxy_core::settings::{self, SettingsError, Spec, Target, Values};

/// Names the relay object (one upstream connection per environment).
pub const ENVIRONMENT: Spec = Spec::new(
    "environment",
    "ROLLGATE_PROXY_ENVIRONMENT",
    Some("default"),
    Target::Edge,
    "Names the relay Durable Object of this environment (one upstream connection each)",
);
/// How many SSE shard objects share the stream clients.
pub const SSE_SHARDS: Spec = Spec::new(
    "sse-shards",
    "ROLLGATE_PROXY_SSE_SHARDS",
    Some("4"),
    Target::Edge,
    "SSE shard objects that share the stream clients (1 to 1024)",
);
/// WebSocket clients one shard accepts.
pub const SOCKETS_PER_SHARD: Spec = Spec::new(
    "sockets-per-shard",
    "ROLLGATE_PROXY_SOCKETS_PER_SHARD",
    Some("10000"),
    Target::Edge,
    "WebSocket clients one shard object holds; beyond that a connect gets 503 NOT_READY (1 to 32768, the runtime's limit)",
);
/// Edge cache TTL of the current-snapshot pointer.
pub const EDGE_CACHE_TTL: Spec = Spec::new(
    "edge-cache-ttl",
    "ROLLGATE_PROXY_EDGE_CACHE_TTL",
    Some("1s"),
    Target::Edge,
    "How long an edge location trusts its cached pointer to the current snapshot; 0 disables the edge cache",
);

/// Whether the upstream stream URL may carry the server key (`?token=`). Off by default: Workers
/// traces and logs record subrequest URLs, so the key goes in the `Authorization` header only.
pub const STREAM_TOKEN_IN_URL: Spec = Spec::new(
    "stream-token-in-url",
    "ROLLGATE_PROXY_STREAM_TOKEN_IN_URL",
    Some("false"),
    Target::Edge,
    "Also send the server key as ?token= on the upstream stream (for upstreams that accept only that); Cloudflare then records it in traces",
);

/// Several environments in one deployment.
pub const ENVIRONMENTS: Spec = Spec::new(
    "environments",
    "ROLLGATE_PROXY_ENVIRONMENTS",
    None,
    Target::Edge,
    "Several environments as JSON (the native --config schema; *_env fields name secrets): one relay object each, requests routed by client key",
);

/// The Worker's own settings, after core's schema.
pub const EDGE_SCHEMA: &[&Spec] = &[
    &ENVIRONMENT,
    &SSE_SHARDS,
    &SOCKETS_PER_SHARD,
    &EDGE_CACHE_TTL,
    &STREAM_TOKEN_IN_URL,
    &ENVIRONMENTS,
];

/// Every setting of the Worker and its Durable Objects.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// The settings both adapters share.
    pub core: settings::Settings,
    /// Names the relay object.
    pub environment: String,
    /// How many SSE shard objects share the stream clients.
    pub sse_shards: u32,
    /// WebSocket clients one shard accepts.
    pub sockets_per_shard: usize,
    /// How long an edge cache entry of the current revision is trusted before asking the relay.
    pub cache_ttl: Duration,
    /// See [`STREAM_TOKEN_IN_URL`].
    pub stream_token_in_url: bool,
    /// `ROLLGATE_PROXY_ENVIRONMENTS`, when set: requests route by client key.
    pub environments: Option<Arc<Environments>>,
}

impl EdgeConfig {
    /// Reads every setting through `lookup` (a var or secret by name; `None` or empty: unset);
    /// `jitter_seed` seeds the upstream machine's jitter.
    ///
    /// # Errors
    /// [`SettingsError`] naming the first invalid variable.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        jitter_seed: u64,
    ) -> Result<Self, SettingsError> {
        let by_spec = |spec: &'static Spec| lookup(spec.env);
        let core = settings::Settings::from_lookup(by_spec, jitter_seed)?;
        let values = Values::new(by_spec);
        let sse_shards = u32::try_from(values.number(&SSE_SHARDS, 1, 1024)?).unwrap_or(4);
        let sockets_per_shard =
            usize::try_from(values.number(&SOCKETS_PER_SHARD, 1, 32_768)?).unwrap_or(10_000);
        let cache_ttl = values.duration(&EDGE_CACHE_TTL)?;
        if cache_ttl > Duration::from_secs(60) {
            return Err(SettingsError::new(&EDGE_CACHE_TTL, "must be at most 60s"));
        }
        let environments = match values.text(&ENVIRONMENTS) {
            None => None,
            Some(text) => Some(Arc::new(
                Environments::parse(&text, &lookup)
                    .map_err(|error| SettingsError::new(&ENVIRONMENTS, error.to_string()))?,
            )),
        };
        Ok(Self {
            core,
            environment: values.text(&ENVIRONMENT).unwrap_or_default(),
            sse_shards,
            sockets_per_shard,
            cache_ttl,
            stream_token_in_url: values.boolean(&STREAM_TOKEN_IN_URL)?,
            environments,
        })
    }

    /// The configuration of environment `name` of [`EdgeConfig::environments`]: its server
    /// key, base URL, relay and shard names; no client keys (the front routed the request).
    /// `None` when no such environment is configured.
    pub fn for_environment(&self, name: &str) -> Option<Self> {
        let env = self.environments.as_ref()?.get(name)?;
        let mut config = self.clone();
        config.core = env.settings(&self.core);
        config.core.client_keys = ClientKeys::default();
        config.environment = name.to_owned();
        Some(config)
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rollgate_proxy_core::cors::CorsPolicy;

    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<EdgeConfig, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        EdgeConfig::from_lookup(|name| map.get(name).cloned(), 1)
    }

    #[test]
    fn defaults_are_local_mode_with_the_servers_settings() {
        let c = config(&[]).unwrap();
        assert!(c.core.api_key.is_none());
        assert_eq!(c.environment, "default");
        assert_eq!(c.sse_shards, 4);
        assert_eq!(c.sockets_per_shard, 10_000);
        assert_eq!(c.cache_ttl, Duration::from_secs(1));
        assert!(
            !c.stream_token_in_url,
            "the key stays out of URLs by default"
        );
        assert_eq!(c.core.cors, CorsPolicy::Any);
        assert_eq!(c.core.upstream.refresh_interval, Duration::from_secs(30));
        assert_eq!(c.core.upstream_timeout, Duration::from_secs(10));
        assert_eq!(c.relay_name(), "relay:default");
        assert_eq!(c.shard_name(1), "sse:default:1");
    }

    #[test]
    fn the_native_servers_names_and_units() {
        let c = config(&[
            ("ROLLGATE_API_KEY", " sk-1 "),
            ("ROLLGATE_BASE_URL", "http://127.0.0.1:9/"),
            ("ROLLGATE_PROXY_SSE_SHARDS", "2"),
            ("ROLLGATE_PROXY_SOCKETS_PER_SHARD", "3"),
            ("ROLLGATE_PROXY_REFRESH_INTERVAL", "250ms"),
            ("ROLLGATE_PROXY_USER_CACHE_SIZE", "7"),
            ("ROLLGATE_PROXY_EDGE_CACHE_TTL", "0"),
        ])
        .unwrap();
        assert_eq!(c.core.api_key.as_ref().unwrap().expose(), "sk-1");
        assert_eq!(c.core.base_url, "http://127.0.0.1:9");
        assert_eq!(c.core.upstream.refresh_interval, Duration::from_millis(250));
        assert_eq!(c.core.user_cache_size, 7);
        assert!(c.cache_ttl.is_zero());
        assert_eq!(c.sockets_per_shard, 3);
        assert_eq!(c.pick_shard(0.0), 0);
        assert_eq!(c.pick_shard(0.5), 1);
        assert_eq!(c.pick_shard(1.0), 1);
        for (name, value) in [
            ("ROLLGATE_PROXY_ENVIRONMENTS", "{\"environments\": {}}"),
            ("ROLLGATE_PROXY_SSE_SHARDS", "0"),
            ("ROLLGATE_PROXY_SOCKETS_PER_SHARD", "0"),
            ("ROLLGATE_PROXY_SOCKETS_PER_SHARD", "40000"),
            ("ROLLGATE_PROXY_EDGE_CACHE_TTL", "5m"),
            ("ROLLGATE_PROXY_REFRESH_INTERVAL", "1000"),
            ("ROLLGATE_PROXY_SDK_KEEPALIVE", "5s"),
        ] {
            let error = config(&[(name, value)]).unwrap_err();
            assert_eq!(error.spec.env, name, "{error}");
        }
    }

    #[test]
    fn environments_from_a_var_with_secrets() {
        let c = config(&[
            (
                "ROLLGATE_PROXY_ENVIRONMENTS",
                r#"{"environments": {"prod": {"server_key_env": "KEY_PROD",
                    "base_url": "http://127.0.0.1:9", "client_keys": ["ck-prod"]}}}"#,
            ),
            ("KEY_PROD", "rg_server_prod"),
            ("ROLLGATE_PROXY_CLIENT_KEYS", "k1"),
        ])
        .unwrap();
        let prod = c.for_environment("prod").unwrap();
        assert_eq!(
            prod.core.api_key.as_ref().unwrap().expose(),
            "rg_server_prod"
        );
        assert_eq!(prod.core.base_url, "http://127.0.0.1:9");
        assert!(!prod.core.client_keys.is_enabled());
        assert_eq!(prod.relay_name(), "relay:prod");
        assert_eq!(prod.shard_name(0), "sse:prod:0");
        assert!(c.for_environment("nope").is_none());
        let error = config(&[(
            "ROLLGATE_PROXY_ENVIRONMENTS",
            r#"{"environments": {"prod": {"server_key_env": "UNSET", "client_keys": ["a"]}}}"#,
        )])
        .unwrap_err();
        assert!(error.to_string().contains("server_key_env"), "{error}");
    }
}
