//! Several Rollgate environments in one deployment: their schema, parsing, the client-key router and the reload diff.
//!
//! An environment is a name, a Rollgate server key, an optional base URL and client keys (each
//! with an optional expiry). Adapters read the configuration (a TOML file natively, a TOML or
//! JSON variable on the Worker), hand it here, and get back validated [`Environments`]; every
//! request that needs a client key goes through a [`KeyRouter`] to find its environment; a reload
//! is applied from [`diff`]. Today's single-environment settings become one environment named
//! [`DEFAULT_ENVIRONMENT`] ([`Environments::single`]).

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::api::{ApiError, ClientKeys, OfferedKeys};
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
/// The `environment` label value of requests answered before any environment was chosen
/// (an unknown or expired client key, an unknown `/env/<name>`, preflights, the combined health,
/// readiness and metrics): empty, which no environment name can be, so they are never counted
/// under an environment (in Prometheus an empty label value is the same as no label).
pub const UNROUTED_ENVIRONMENT: &str = "";
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
    #[cfg(feature = "toml")]
    pub fn from_toml(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, EnvironmentsError> {
        let table: toml::Table = text.parse().map_err(|error: toml::de::Error| {
            EnvironmentsError::Toml(error.message().to_owned())
        })?;
        let Value::Object(map) = toml_to_json(toml::Value::Table(table)) else {
            return Err(field_error("(top level)", "expected a table"));
        };
        Self::from_map(&map, &lookup)
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
        let value: Value = serde_json::from_str(text)
            .map_err(|error| EnvironmentsError::Json(error.to_string()))?;
        match value {
            Value::Object(map) => Self::from_map(&map, &lookup),
            _ => Err(field_error("(top level)", "expected an object")),
        }
    }

    /// JSON when the text starts with `{`, else TOML (with the `toml` feature; without it,
    /// as the Worker builds core, only JSON).
    ///
    /// # Errors
    /// [`EnvironmentsError`] naming the first invalid field.
    pub fn parse(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, EnvironmentsError> {
        if text.trim_start().starts_with('{') {
            return Self::from_json(text, lookup);
        }
        #[cfg(feature = "toml")]
        return Self::from_toml(text, lookup);
        #[cfg(not(feature = "toml"))]
        Err(EnvironmentsError::Toml(
            "this build reads environments as JSON only (text starting with `{`)".to_owned(),
        ))
    }

    fn from_map(
        table: &Map<String, Value>,
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
        let Some(environments) = environments.as_object() else {
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
    value: &Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<EnvironmentConfig, EnvironmentsError> {
    let at = format!("environments.{name}");
    check_name(name).map_err(|message| field_error(at.as_str(), message))?;
    let Some(table) = value.as_object() else {
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
    value: &Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<ClientKey, EnvironmentsError> {
    let (key, expires) = match value {
        Value::String(key) => (Secret::new(key.as_str()), None),
        Value::Object(table) => {
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
    table: &Map<String, Value>,
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

/// An expiry: an RFC 3339 date-time with an offset (a TOML offset date-time arrives as its
/// RFC 3339 text).
fn expiry(value: &Value) -> Result<Timestamp, String> {
    const EXPECTED: &str =
        "expected an RFC 3339 date-time with an offset, e.g. 2026-12-01T00:00:00Z";
    match value {
        Value::String(text) => parse_rfc3339(text).ok_or_else(|| EXPECTED.to_owned()),
        _ => Err(EXPECTED.to_owned()),
    }
}

/// `YYYY-MM-DD(T| )HH:MM:SS[.frac](Z|±HH:MM)` as a timestamp (before 1970: `None`).
fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded: String = frac[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = padded.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let o = rest.as_bytes();
            if o.len() != 6 || o[3] != b':' || !matches!(o[0], b'+' | b'-') {
                return None;
            }
            let hours = num_of(&rest[1..3])?;
            let minutes = num_of(&rest[4..6])?;
            let sign = if o[0] == b'-' { -1 } else { 1 };
            sign * (hours * 60 + minutes)
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    let total = secs.checked_mul(1000)?.checked_add(millis)?;
    u64::try_from(total).ok().map(Timestamp::from_millis)
}

fn num_of(digits: &str) -> Option<i64> {
    (!digits.is_empty() && digits.bytes().all(|d| d.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
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

/// A TOML value as JSON: date-times become their RFC 3339 text (one walker reads both).
#[cfg(feature = "toml")]
fn toml_to_json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => Value::from(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(datetime) => Value::String(datetime.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(key, value)| (key, toml_to_json(value)))
                .collect(),
        ),
    }
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
        let offered = OfferedKeys::of(authorization, api_key, query)?;
        // Every offered key against every configured key, selecting without branching on the
        // comparison, so timing reveals neither which key matched nor how much of it.
        let mut found = subtle::Choice::from(0);
        let mut slot: u32 = 0;
        for given in offered.iter() {
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

#[cfg(all(test, feature = "toml"))]
mod tests;
