//! Several Rollgate environments in one deployment: their schema, parsing, the client-key router and the reload diff.
//!
//! An environment is a name, a Rollgate server key, an optional base URL and client keys (each
//! with an optional expiry). Adapters read the configuration (a TOML file natively, a TOML or
//! JSON variable on the Worker), hand it here, and get back validated [`Environments`]; every
//! request that needs a client key goes through a [`KeyRouter`] to find its environment; a reload
//! is applied from [`diff`]. Today's single-environment settings become one environment named
//! [`DEFAULT_ENVIRONMENT`] ([`Environments::single`]).

use std::collections::BTreeMap;

use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::api::{ApiError, ClientKeys, query_pairs};
use crate::secret::Secret;
use crate::settings::Settings;
use crate::time::Timestamp;

/// The name of the one environment of a single-environment configuration.
pub const DEFAULT_ENVIRONMENT: &str = "default";
/// Most environments in one deployment: each costs an upstream stream, and names become metric
/// labels, so the count is bounded by configuration.
pub const MAX_ENVIRONMENTS: usize = 64;
/// Most client keys of one environment (rotation needs two or three).
pub const MAX_CLIENT_KEYS: usize = 32;
/// Longest environment name (a metric label and a path segment).
pub const MAX_NAME_LEN: usize = 63;
/// The path prefix that selects an environment by URL: `/env/<name>/api/...`.
pub const PATH_PREFIX: &str = "/env/";

/// One client key and when it stops being accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientKey {
    /// The key (never logged).
    pub key: Secret,
    /// From this instant on the key gets 401; `None`: never.
    pub expires: Option<Timestamp>,
}

/// One environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvironmentConfig {
    /// Label-safe name: `[a-z0-9][a-z0-9_-]*`, at most [`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// The Rollgate server key; `None` only for the default environment of local mode.
    pub server_key: Option<Secret>,
    /// Rollgate's base URL without a trailing slash; `None`: the deployment's default.
    pub base_url: Option<String>,
    /// Keys that route requests here.
    pub client_keys: Vec<ClientKey>,
}

impl EnvironmentConfig {
    /// The shared `base` settings with this environment's server key, base URL and client keys.
    pub fn settings(&self, base: &Settings) -> Settings {
        let mut settings = base.clone();
        settings.api_key.clone_from(&self.server_key);
        if let Some(url) = &self.base_url {
            settings.base_url.clone_from(url);
        }
        settings.client_keys = ClientKeys::new(
            self.client_keys
                .iter()
                .map(|key| key.key.expose().to_owned()),
        );
        settings
    }

    /// Whether the upstream side (server key, base URL) equals `other`'s.
    fn same_upstream(&self, other: &Self) -> bool {
        self.server_key == other.server_key && self.base_url == other.base_url
    }
}

/// A validated set of environments, sorted by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Environments {
    list: Vec<EnvironmentConfig>,
    /// Built from single-environment settings (not from a file).
    single: bool,
}

/// Why an environments configuration is invalid; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvironmentsError {
    /// The text is not TOML.
    #[error("not valid TOML: {0}")]
    Toml(String),
    /// The text is not JSON.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// A field is missing, of the wrong type, or invalid.
    #[error("{field}: {message}")]
    Field {
        /// Where, e.g. `environments.production.client_keys[1].expires`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> EnvironmentsError {
    EnvironmentsError::Field {
        field: field.into(),
        message: message.into(),
    }
}

impl Environments {
    /// Today's single-environment configuration as one environment named
    /// [`DEFAULT_ENVIRONMENT`], whose client keys never expire (none: the API is open).
    pub fn single(settings: &Settings) -> Self {
        Self {
            list: vec![EnvironmentConfig {
                name: DEFAULT_ENVIRONMENT.to_owned(),
                server_key: settings.api_key.clone(),
                base_url: None,
                client_keys: settings
                    .client_keys
                    .keys()
                    .map(|key| ClientKey {
                        key: Secret::new(key),
                        expires: None,
                    })
                    .collect(),
            }],
            single: true,
        }
    }

    /// Parses and validates a TOML configuration:
    ///
    /// ```toml
    /// [environments.production]
    /// server_key_env = "ROLLGATE_KEY_PRODUCTION"   # or server_key = "..."
    /// base_url = "https://api.rollgate.io"          # optional
    /// client_keys = ["pk_live_new", { key = "pk_live_old", expires = 2026-12-01T00:00:00Z }]
    /// ```
    ///
    /// `lookup` resolves `*_env` names (an environment variable natively, a secret on the
    /// Worker).
    ///
    /// # Errors
    /// [`EnvironmentsError`] naming the first invalid field.
    pub fn from_toml(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, EnvironmentsError> {
        let table: toml::Table = text.parse().map_err(|error: toml::de::Error| {
            EnvironmentsError::Toml(error.message().to_owned())
        })?;
        Self::from_table(&table, &lookup)
    }

    /// Like [`Environments::from_toml`], from the same schema as JSON (`expires` is an RFC 3339
    /// string).
    ///
    /// # Errors
    /// [`EnvironmentsError`] naming the first invalid field.
    pub fn from_json(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, EnvironmentsError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|error| EnvironmentsError::Json(error.to_string()))?;
        match json_to_toml(value, "") {
            Ok(toml::Value::Table(table)) => Self::from_table(&table, &lookup),
            Ok(_) => Err(field_error("(top level)", "expected an object")),
            Err(error) => Err(error),
        }
    }

    /// TOML when the text does not start with `{`, else JSON.
    ///
    /// # Errors
    /// [`EnvironmentsError`] naming the first invalid field.
    pub fn parse(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, EnvironmentsError> {
        if text.trim_start().starts_with('{') {
            Self::from_json(text, lookup)
        } else {
            Self::from_toml(text, lookup)
        }
    }

    fn from_table(
        table: &toml::Table,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, EnvironmentsError> {
        if let Some(other) = table.keys().find(|key| *key != "environments") {
            return Err(field_error(
                other.as_str(),
                "unknown field (expected only `environments`)",
            ));
        }
        let Some(environments) = table.get("environments") else {
            return Err(field_error("environments", "missing"));
        };
        let Some(environments) = environments.as_table() else {
            return Err(field_error(
                "environments",
                "expected a table of environments by name",
            ));
        };
        if environments.is_empty() {
            return Err(field_error(
                "environments",
                "at least one environment is needed",
            ));
        }
        if environments.len() > MAX_ENVIRONMENTS {
            return Err(field_error(
                "environments",
                format!("at most {MAX_ENVIRONMENTS} environments"),
            ));
        }
        let mut list = Vec::with_capacity(environments.len());
        for (name, value) in environments {
            list.push(parse_environment(name, value, lookup)?);
        }
        let environments = Self {
            list,
            single: false,
        };
        environments.check_keys_unique()?;
        Ok(environments)
    }

    /// A key belongs to one environment (and appears once in it).
    fn check_keys_unique(&self) -> Result<(), EnvironmentsError> {
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for env in &self.list {
            for (i, key) in env.client_keys.iter().enumerate() {
                if let Some(owner) = seen.insert(key.key.expose(), &env.name) {
                    return Err(field_error(
                        format!("environments.{}.client_keys[{i}]", env.name),
                        format!("this key is already a client key of environment {owner}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The environments, sorted by name.
    pub fn list(&self) -> &[EnvironmentConfig] {
        &self.list
    }

    /// The environment named `name`.
    pub fn get(&self, name: &str) -> Option<&EnvironmentConfig> {
        self.list.iter().find(|env| env.name == name)
    }

    /// Whether this is today's single-environment configuration (no file).
    pub fn is_single(&self) -> bool {
        self.single
    }
}

fn parse_environment(
    name: &str,
    value: &toml::Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<EnvironmentConfig, EnvironmentsError> {
    let at = format!("environments.{name}");
    check_name(name).map_err(|message| field_error(at.as_str(), message))?;
    let Some(table) = value.as_table() else {
        return Err(field_error(at, "expected a table"));
    };
    const FIELDS: &[&str] = &["server_key", "server_key_env", "base_url", "client_keys"];
    if let Some(other) = table.keys().find(|key| !FIELDS.contains(&key.as_str())) {
        return Err(field_error(
            format!("{at}.{other}"),
            format!("unknown field (expected one of {})", FIELDS.join(", ")),
        ));
    }
    let server_key = secret_field(table, &at, "server_key", lookup)?
        .ok_or_else(|| field_error(format!("{at}.server_key"), "missing (or server_key_env)"))?;
    let base_url = match table.get("base_url") {
        None => None,
        Some(value) => {
            let field = format!("{at}.base_url");
            let url = value
                .as_str()
                .ok_or_else(|| field_error(field.as_str(), "expected a string"))?
                .trim_end_matches('/');
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(field_error(field, "expected an http:// or https:// URL"));
            }
            Some(url.to_owned())
        }
    };
    let keys_at = format!("{at}.client_keys");
    let keys = table
        .get("client_keys")
        .ok_or_else(|| field_error(keys_at.as_str(), "missing (at least one client key)"))?
        .as_array()
        .ok_or_else(|| field_error(keys_at.as_str(), "expected an array"))?;
    if keys.is_empty() {
        return Err(field_error(keys_at, "at least one client key is needed"));
    }
    if keys.len() > MAX_CLIENT_KEYS {
        return Err(field_error(
            keys_at,
            format!("at most {MAX_CLIENT_KEYS} client keys"),
        ));
    }
    let mut client_keys = Vec::with_capacity(keys.len());
    for (i, value) in keys.iter().enumerate() {
        client_keys.push(parse_client_key(&format!("{keys_at}[{i}]"), value, lookup)?);
    }
    Ok(EnvironmentConfig {
        name: name.to_owned(),
        server_key: Some(server_key),
        base_url,
        client_keys,
    })
}

fn parse_client_key(
    at: &str,
    value: &toml::Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<ClientKey, EnvironmentsError> {
    let (key, expires) = match value {
        toml::Value::String(key) => (Secret::new(key.as_str()), None),
        toml::Value::Table(table) => {
            const FIELDS: &[&str] = &["key", "key_env", "expires"];
            if let Some(other) = table.keys().find(|key| !FIELDS.contains(&key.as_str())) {
                return Err(field_error(
                    format!("{at}.{other}"),
                    format!("unknown field (expected one of {})", FIELDS.join(", ")),
                ));
            }
            let key = secret_field(table, at, "key", lookup)?
                .ok_or_else(|| field_error(format!("{at}.key"), "missing (or key_env)"))?;
            let expires = match table.get("expires") {
                None => None,
                Some(value) => Some(
                    expiry(value)
                        .map_err(|message| field_error(format!("{at}.expires"), message))?,
                ),
            };
            (key, expires)
        }
        _ => {
            return Err(field_error(
                at,
                "expected a key string or a table { key, expires }",
            ));
        }
    };
    let text = key.expose();
    if text.is_empty()
        || text.len() > 512
        || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(field_error(
            at,
            "a client key is 1 to 512 bytes without spaces",
        ));
    }
    Ok(ClientKey { key, expires })
}

/// `<field>` given inline, or `<field>_env` naming a variable or secret read through `lookup`.
fn secret_field(
    table: &toml::Table,
    at: &str,
    field: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, EnvironmentsError> {
    let env_field = format!("{field}_env");
    match (table.get(field), table.get(&env_field)) {
        (Some(_), Some(_)) => Err(field_error(
            format!("{at}.{field}"),
            format!("give {field} or {env_field}, not both"),
        )),
        (Some(value), None) => match value.as_str() {
            Some(text) if !text.trim().is_empty() => Ok(Some(Secret::new(text.trim()))),
            Some(_) => Err(field_error(format!("{at}.{field}"), "is empty")),
            None => Err(field_error(format!("{at}.{field}"), "expected a string")),
        },
        (None, Some(value)) => {
            let at = format!("{at}.{env_field}");
            let name = value
                .as_str()
                .ok_or_else(|| field_error(at.as_str(), "expected a variable name"))?;
            match lookup(name) {
                Some(text) if !text.trim().is_empty() => Ok(Some(Secret::new(text.trim()))),
                _ => Err(field_error(at, format!("{name} is not set or empty"))),
            }
        }
        (None, None) => Ok(None),
    }
}

/// A label-safe name: it becomes a metric label, a path segment and a Durable Object name.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        Err(format!(
            "an environment name is 1 to {MAX_NAME_LEN} of a-z, 0-9, - and _, starting with a letter or digit"
        ))
    }
}

/// An expiry: a TOML offset datetime, or an RFC 3339 string with an offset.
fn expiry(value: &toml::Value) -> Result<Timestamp, String> {
    let datetime = match value {
        toml::Value::Datetime(datetime) => *datetime,
        toml::Value::String(text) => text
            .parse::<toml::value::Datetime>()
            .map_err(|_| "expected an RFC 3339 date-time, e.g. 2026-12-01T00:00:00Z".to_owned())?,
        _ => return Err("expected a date-time, e.g. 2026-12-01T00:00:00Z".to_owned()),
    };
    to_timestamp(&datetime)
        .ok_or_else(|| "expected a full date-time with an offset, e.g. 2026-12-01T00:00:00Z".into())
}

fn to_timestamp(datetime: &toml::value::Datetime) -> Option<Timestamp> {
    use toml::value::Offset;
    let date = datetime.date?;
    let time = datetime.time?;
    let offset_minutes: i64 = match datetime.offset? {
        Offset::Z => 0,
        Offset::Custom { minutes } => i64::from(minutes),
    };
    let days = days_from_civil(
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    let secs = days * 86_400
        + i64::from(time.hour) * 3600
        + i64::from(time.minute) * 60
        + i64::from(time.second.unwrap_or(0))
        - offset_minutes * 60;
    let millis = secs.checked_mul(1000)? + i64::from(time.nanosecond.unwrap_or(0) / 1_000_000);
    u64::try_from(millis).ok().map(Timestamp::from_millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn json_to_toml(value: serde_json::Value, at: &str) -> Result<toml::Value, EnvironmentsError> {
    use serde_json::Value as J;
    Ok(match value {
        J::Null => return Err(field_error(at, "null is not allowed")),
        J::Bool(b) => toml::Value::Boolean(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or(0.0)),
        },
        J::String(s) => toml::Value::String(s),
        J::Array(items) => toml::Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| json_to_toml(item, &format!("{at}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        J::Object(map) => {
            let mut table = toml::Table::new();
            for (key, item) in map {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                table.insert(key, json_to_toml(item, &path)?);
            }
            toml::Value::Table(table)
        }
    })
}

/// What a reload changes, by environment name (each list sorted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvironmentsDiff {
    /// New environments: start them.
    pub added: Vec<String>,
    /// Environments no longer configured: stop them.
    pub removed: Vec<String>,
    /// Server key or base URL changed: restart the upstream side (clients reconnect).
    pub restarted: Vec<String>,
    /// Only the client keys changed: swap the router, keep everything running.
    pub rekeyed: Vec<String>,
    /// Nothing changed: leave them alone.
    pub unchanged: Vec<String>,
}

impl EnvironmentsDiff {
    /// Whether the reload changes nothing.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.restarted.is_empty()
            && self.rekeyed.is_empty()
    }
}

/// What turns `old` into `new`.
pub fn diff(old: &Environments, new: &Environments) -> EnvironmentsDiff {
    let mut out = EnvironmentsDiff::default();
    for env in &old.list {
        if new.get(&env.name).is_none() {
            out.removed.push(env.name.clone());
        }
    }
    for env in &new.list {
        match old.get(&env.name) {
            None => out.added.push(env.name.clone()),
            Some(before) if !before.same_upstream(env) => out.restarted.push(env.name.clone()),
            Some(before) if before.client_keys != env.client_keys => {
                out.rekeyed.push(env.name.clone());
            }
            Some(_) => out.unchanged.push(env.name.clone()),
        }
    }
    out
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed<'a> {
    /// The environment's index in [`KeyRouter::names`] (and in [`Environments::list`]).
    pub index: usize,
    /// The path without an `/env/<name>` prefix.
    pub path: &'a str,
    /// The configured key the request presented (`None`: an open single environment).
    pub key: Option<String>,
}

struct RouteKey {
    key: Secret,
    env: u32,
    expires: Option<Timestamp>,
}

/// Finds a request's environment by its client key, in constant time over every configured
/// key, optionally constrained by an `/env/<name>/` path prefix.
pub struct KeyRouter {
    keys: Vec<RouteKey>,
    names: Vec<String>,
    /// A single environment without client keys: every request goes there.
    open: bool,
}

impl std::fmt::Debug for KeyRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: show how many, never which.
        f.debug_struct("KeyRouter")
            .field("environments", &self.names)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl KeyRouter {
    /// The router of `environments`.
    pub fn new(environments: &Environments) -> Self {
        let mut keys = Vec::new();
        for (index, env) in environments.list.iter().enumerate() {
            for key in &env.client_keys {
                keys.push(RouteKey {
                    key: key.key.clone(),
                    env: u32::try_from(index).unwrap_or(u32::MAX),
                    expires: key.expires,
                });
            }
        }
        Self {
            open: environments.single && keys.is_empty(),
            keys,
            names: environments
                .list
                .iter()
                .map(|env| env.name.clone())
                .collect(),
        }
    }

    /// Environment names, in index order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// `/env/<name>/rest` split into `(name, /rest)`.
    pub fn split_path(path: &str) -> Option<(&str, &str)> {
        let rest = path.strip_prefix(PATH_PREFIX)?;
        let (name, rest) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        Some((name, rest))
    }

    /// The environment of a request that needs a client key, from `Authorization: Bearer`,
    /// `X-API-Key` or `?token=`, and the path without an `/env/<name>` prefix.
    ///
    /// # Errors
    /// 404 for an `/env/<name>/` prefix naming no environment; 401 for a missing or unknown
    /// key, an expired key (its own message), or a key of another environment than the prefix
    /// names.
    pub fn route<'a>(
        &self,
        now: Timestamp,
        path: &'a str,
        authorization: Option<&str>,
        api_key: Option<&str>,
        query: &str,
    ) -> Result<Routed<'a>, ApiError> {
        let (wanted, path) = match Self::split_path(path) {
            Some((name, rest)) => match self.names.iter().position(|n| n == name) {
                Some(index) => (Some(index), rest),
                None => return Err(ApiError::not_found(path)),
            },
            None => (None, path),
        };
        if self.open {
            return Ok(Routed {
                index: 0,
                path,
                key: None,
            });
        }
        let bearer = authorization.and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let token = query_pairs(query)
            .find(|(name, _)| name == "token")
            .map(|(_, value)| value);
        let offered: Vec<&str> = [bearer, api_key.map(str::trim), token.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        if offered.is_empty() {
            return Err(ApiError::unauthorized(
                "a client key is required: send Authorization: Bearer <key>, or ?token=<key> \
                 for EventSource",
            ));
        }
        // Every offered key against every configured key, selecting without branching on the
        // comparison, so timing reveals neither which key matched nor how much of it.
        let mut found = subtle::Choice::from(0);
        let mut slot: u32 = 0;
        for given in &offered {
            for (i, key) in self.keys.iter().enumerate() {
                let equal = key.key.expose().as_bytes().ct_eq(given.as_bytes()) & !found;
                slot.conditional_assign(&u32::try_from(i).unwrap_or(u32::MAX), equal);
                found |= equal;
            }
        }
        if !bool::from(found) {
            return Err(ApiError::unauthorized("the client key is not valid"));
        }
        let Some(key) = self.keys.get(slot as usize) else {
            return Err(ApiError::unauthorized("the client key is not valid"));
        };
        if let Some(expires) = key.expires.filter(|at| *at <= now) {
            return Err(ApiError::unauthorized(format!(
                "the client key expired at {}: use a current key",
                expires.to_rfc3339()
            )));
        }
        let index = key.env as usize;
        if let Some(wanted) = wanted.filter(|wanted| *wanted != index) {
            return Err(ApiError::unauthorized(format!(
                "the client key is not valid for environment {}",
                self.names[wanted]
            )));
        }
        Ok(Routed {
            index,
            path,
            key: Some(key.key.expose().to_owned()),
        })
    }

    /// The next instant a configured key expires after `now` (an adapter may log it).
    pub fn next_expiry(&self, now: Timestamp) -> Option<Timestamp> {
        self.keys
            .iter()
            .filter_map(|key| key.expires)
            .filter(|at| *at > now)
            .min()
    }
}

/// Merges the Prometheus text of several environments into one exposition: each family's
/// `# HELP`/`# TYPE` once, then its samples from every environment with an
/// `environment="<name>"` label first. Names come from configuration, never from requests.
pub fn merge_metrics<'a>(renderings: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    struct Family {
        header: Vec<String>,
        samples: Vec<String>,
    }
    let mut order: Vec<String> = Vec::new();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (env, text) in renderings {
        let mut current = String::new();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                let name = rest.split(' ').next().unwrap_or_default().to_owned();
                let family = families.entry(name.clone()).or_insert_with(|| {
                    order.push(name.clone());
                    Family {
                        header: Vec::new(),
                        samples: Vec::new(),
                    }
                });
                if !family.header.iter().any(|h| h == line) {
                    family.header.push(line.to_owned());
                }
                current = name;
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            if current.is_empty() || !name.starts_with(current.as_str()) {
                current = name.to_owned();
            }
            let labelled = match line[name_end..].strip_prefix('{') {
                Some(labels) if labels.starts_with('}') => {
                    format!("{name}{{environment=\"{env}\"{labels}")
                }
                Some(labels) => format!("{name}{{environment=\"{env}\",{labels}"),
                None => format!("{name}{{environment=\"{env}\"}}{}", &line[name_end..]),
            };
            let family = families.entry(current.clone()).or_insert_with(|| {
                order.push(current.clone());
                Family {
                    header: Vec::new(),
                    samples: Vec::new(),
                }
            });
            family.samples.push(labelled);
        }
    }
    let mut out = String::new();
    for name in &order {
        if let Some(family) = families.get(name) {
            for line in family.header.iter().chain(&family.samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
