//! How a mock starts: API key, addresses, initial flag data and stream behaviour, scenarios and
//! the `--flags-file` formats.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;

use super::MockError;
use super::state::FlagData;
use super::types::{FlagSet, Heartbeat, StreamAuth, StreamMode};

/// The key the official harness uses (`harness.DefaultConfig`).
pub const DEFAULT_API_KEY: &str = "test-api-key";

/// Start-up configuration; `reset` returns the mock to it.
#[derive(Clone, Debug)]
pub struct MockConfig {
    pub(crate) api_key: String,
    pub(crate) addr: SocketAddr,
    pub(crate) control_addr: Option<SocketAddr>,
    pub(crate) data: FlagData,
    pub(crate) rules: Option<String>,
    pub(crate) stream_mode: StreamMode,
    pub(crate) stream_auth: StreamAuth,
    pub(crate) heartbeat: Option<Heartbeat>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_owned(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            control_addr: None,
            data: FlagData::default(),
            rules: None,
            stream_mode: StreamMode::default(),
            stream_auth: StreamAuth::default(),
            heartbeat: None,
        }
    }
}

impl MockConfig {
    /// Empty flags, key `test-api-key`, `127.0.0.1:0`, `init` mode, token or Bearer, no heartbeat.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `basic` scenario (see [`Scenario::Basic`]).
    pub fn basic() -> Self {
        Self::new().scenario(Scenario::Basic)
    }

    /// Replaces the flag data with a built-in scenario.
    #[must_use]
    pub fn scenario(mut self, scenario: Scenario) -> Self {
        self.data = scenario.data();
        self
    }

    /// The API key every protocol route requires.
    #[must_use]
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = key.into();
        self
    }

    /// Where the protocol listener binds (default `127.0.0.1:0`).
    #[must_use]
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Also serve `/control/*` on a listener of its own that `stop`, `down` and `outage` never
    /// touch (needed to restart the protocol listener over HTTP).
    #[must_use]
    pub fn control_addr(mut self, addr: SocketAddr) -> Self {
        self.control_addr = Some(addr);
        self
    }

    /// The default flag map (served to users without an override).
    #[must_use]
    pub fn flags(mut self, flags: FlagSet) -> Self {
        self.data.default = flags;
        self.data.rollouts.clear();
        self
    }

    /// Makes `key` a per-user percentage rollout (official mock bucket, FNV-1a).
    #[must_use]
    pub fn rollout(mut self, key: impl Into<String>, percentage: u8) -> Self {
        self.data.rollouts.insert(key.into(), percentage.min(100));
        self
    }

    /// A whole-map override for one `user_id`.
    #[must_use]
    pub fn user_flags(mut self, user: impl Into<String>, flags: FlagSet) -> Self {
        self.data.users.insert(user.into(), flags);
        self
    }

    /// A `rules-full` payload sent to every stream after its `init`.
    #[must_use]
    pub fn rules(mut self, rules: &Value) -> Self {
        self.rules = Some(super::frames::to_json(rules));
        self
    }

    /// The stream mode.
    #[must_use]
    pub fn stream_mode(mut self, mode: StreamMode) -> Self {
        self.stream_mode = mode;
        self
    }

    /// Which credentials the stream accepts.
    #[must_use]
    pub fn stream_auth(mut self, auth: StreamAuth) -> Self {
        self.stream_auth = auth;
        self
    }

    /// Keepalives on open streams.
    #[must_use]
    pub fn heartbeat(mut self, heartbeat: Option<Heartbeat>) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Loads flag data from a `--flags-file` document. Two shapes are accepted:
    ///
    /// * `{"flags":{key:bool..}, "reasons"?:{..}, "rollouts"?:{key:pct}, "users"?:{id:{"flags","reasons"}},
    ///   "rules"?:<rules-full payload>}`;
    /// * a bare rules payload `{"version":str,"flags":{key:FlagRule}}`: it becomes the
    ///   `rules-full` payload, and the boolean map is a rough anonymous view,
    ///   `enabled && rollout >= 100` (the mock does not evaluate rules).
    pub fn load_json(mut self, doc: Value) -> Result<Self, MockError> {
        if is_bare_rules(&doc) {
            let mut flags = FlagSet::new();
            if let Some(rules) = doc.get("flags").and_then(Value::as_object) {
                for (key, rule) in rules {
                    let enabled = rule.get("enabled").and_then(Value::as_bool) == Some(true);
                    let full = rule
                        .get("rollout")
                        .and_then(Value::as_u64)
                        .is_some_and(|r| r >= 100);
                    flags
                        .flags
                        .insert(key.clone(), Value::Bool(enabled && full));
                }
            }
            self.data = FlagData {
                default: flags,
                ..FlagData::default()
            };
            self.rules = Some(super::frames::to_json(&doc));
            return Ok(self);
        }
        let file: FlagsFile =
            serde_json::from_value(doc).map_err(|e| MockError::InvalidInput(e.to_string()))?;
        self.data = FlagData {
            default: FlagSet {
                flags: file.flags,
                reasons: file.reasons,
            },
            rollouts: file
                .rollouts
                .into_iter()
                .map(|(k, v)| (k, v.min(100)))
                .collect(),
            users: file.users,
            attribute_targets: BTreeMap::new(),
        };
        self.rules = file.rules.as_ref().map(super::frames::to_json);
        Ok(self)
    }
}

/// A rules payload has a `version` and object-valued flags; a flags file has neither.
fn is_bare_rules(doc: &Value) -> bool {
    doc.get("version").is_some()
        && doc.get("rules").is_none()
        && doc
            .get("flags")
            .and_then(Value::as_object)
            .is_some_and(|f| f.values().all(Value::is_object))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagsFile {
    #[serde(default)]
    flags: BTreeMap<String, Value>,
    #[serde(default)]
    reasons: BTreeMap<String, Value>,
    #[serde(default)]
    rollouts: BTreeMap<String, u8>,
    #[serde(default)]
    users: BTreeMap<String, FlagSet>,
    #[serde(default)]
    rules: Option<Value>,
}

/// Built-in flag data sets, named like the official mock's scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scenario {
    /// `enabled-flag`=true (FALLTHROUGH, inRollout), `disabled-flag`=false (OFF), `rollout-50`
    /// (50 % per user, official mock bucket), and the typed flags `banner-text`, `config`,
    /// `max-items`, which V1 serves as `true`.
    Basic,
    /// No flags.
    Empty,
}

impl Scenario {
    fn data(self) -> FlagData {
        match self {
            Self::Empty => FlagData::default(),
            Self::Basic => {
                let on = serde_json::json!({"kind": "FALLTHROUGH", "inRollout": true});
                let mut default = FlagSet::new();
                for key in ["banner-text", "config", "enabled-flag", "max-items"] {
                    default = default.with_flag(key, true).with_reason(key, on.clone());
                }
                default = default
                    .with_flag("disabled-flag", false)
                    .with_reason("disabled-flag", serde_json::json!({"kind": "OFF"}));
                FlagData {
                    default,
                    rollouts: BTreeMap::from([("rollout-50".to_owned(), 50)]),
                    users: BTreeMap::new(),
                    attribute_targets: BTreeMap::new(),
                }
            }
        }
    }
}

impl FromStr for Scenario {
    type Err = MockError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "basic" => Ok(Self::Basic),
            "empty" => Ok(Self::Empty),
            other => Err(MockError::InvalidInput(format!(
                "unknown scenario {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn basic_matches_the_official_anonymous_response() {
        let view = Scenario::Basic.data().view(None);
        // protocol notes §1.1: the mock's anonymous excerpt of `basic`.
        assert_eq!(view.flags["disabled-flag"], json!(false));
        assert_eq!(view.flags["enabled-flag"], json!(true));
        assert_eq!(view.flags["rollout-50"], json!(false));
        assert_eq!(view.reasons["disabled-flag"], json!({"kind":"OFF"}));
        assert_eq!(
            view.reasons["enabled-flag"],
            json!({"kind":"FALLTHROUGH","inRollout":true})
        );
        assert_eq!(view.reasons["rollout-50"], json!({"kind":"FALLTHROUGH"}));
        assert_eq!(view.flags.len(), 6);
    }

    #[test]
    fn flags_file_shapes() {
        let cfg = MockConfig::new()
            .load_json(json!({"flags":{"a":true},"reasons":{"a":{"kind":"OFF"}},
                "rollouts":{"r":150},"users":{"u":{"flags":{"a":false}}},"rules":{"version":"1","flags":{}}}))
            .unwrap();
        assert_eq!(cfg.data.default.flags["a"], json!(true));
        assert_eq!(cfg.data.rollouts["r"], 100);
        assert_eq!(cfg.data.users["u"].flags["a"], json!(false));
        let rules: Value = serde_json::from_str(cfg.rules.as_deref().unwrap()).unwrap();
        assert_eq!(rules, json!({"version":"1","flags":{}}));

        let rules = json!({"version":"7","flags":{
            "on":{"key":"on","enabled":true,"rollout":100},
            "half":{"key":"half","enabled":true,"rollout":50},
            "off":{"key":"off","enabled":false,"rollout":100}}});
        let cfg = MockConfig::new().load_json(rules).unwrap();
        assert_eq!(cfg.data.default.flags["on"], json!(true));
        assert_eq!(cfg.data.default.flags["half"], json!(false));
        assert_eq!(cfg.data.default.flags["off"], json!(false));
        assert!(cfg.rules.unwrap().contains("\"version\":\"7\""));

        assert!(MockConfig::new().load_json(json!({"flagz":{}})).is_err());
        assert!(MockConfig::new().load_json(json!([1, 2])).is_err());
    }
}
