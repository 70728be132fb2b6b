//! Flag data as Rollgate speaks it: evaluated snapshots, the rules model, contexts and reasons.
//!
//! Two shapes of flag data arrive from upstream (protocol doc §1.1 and §3.3):
//! - the *evaluated* snapshot `{"flags":{key:bool},"reasons":{key:Reason}}` from
//!   `GET /api/v1/sdk/flags` and the `init` / `flags` stream events;
//! - the *rules* model `{"version":…,"flags":{key:FlagRule}}` from the `rules-full` stream event,
//!   which lets the proxy evaluate any context locally.
//!
//! Parsing is lenient where the official SDKs are lenient (unknown fields are ignored, missing
//! optional fields take the value JavaScript's `undefined` would behave as) and strict where a
//! wrong value would reach clients (a non-boolean flag value is an error, because the Go, .NET and
//! Flutter SDKs fail on it). Parsing never panics; every rejection is a [`ModelError`].

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// Why flag data from upstream (or from a file) was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The bytes are not JSON of the expected shape.
    #[error("invalid flag data: {0}")]
    Json(#[from] serde_json::Error),
    /// A flag's value in an evaluated snapshot is not a JSON boolean.
    #[error("flag {key:?} has a non-boolean value")]
    NonBooleanFlag {
        /// The offending flag key.
        key: String,
    },
    /// The payload has no `flags` object at all.
    #[error("flag data has no \"flags\" object")]
    MissingFlags,
    /// A flag key that no client could ask for ([`FlagKey`]'s rule): upstream data is held to
    /// the same rule as the downstream API, whether it came in a fetch or on the stream.
    #[error("flag key {key:?} is invalid: {reason}")]
    InvalidKey {
        /// The offending key (as received, possibly lossily decoded).
        key: String,
        /// Why.
        reason: FlagKeyError,
    },
}

/// Checks an upstream flag key with [`FlagKey::parse`].
pub(crate) fn check_key(key: &str) -> Result<(), ModelError> {
    FlagKey::parse(key)
        .map(|_| ())
        .map_err(|reason| ModelError::InvalidKey {
            key: key.chars().take(64).collect(),
            reason,
        })
}

/// Why a flag key given by a client was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlagKeyError {
    /// The key is empty.
    #[error("flag key is empty")]
    Empty,
    /// The key is longer than [`FlagKey::MAX_LEN`] bytes.
    #[error("flag key is longer than {max} bytes", max = FlagKey::MAX_LEN)]
    TooLong,
    /// The key contains a character outside `[A-Za-z0-9._:-]`.
    #[error("flag key contains {0:?}; allowed are letters, digits, '.', '_', ':' and '-'")]
    InvalidChar(char),
}

/// A flag key received from a client, validated before it is used to look anything up.
///
/// Upstream keys are stored as plain `String`s (Rollgate decides what a key is); this type only
/// guards the proxy's own routes against oversized or odd input.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlagKey(String);

impl FlagKey {
    /// The longest key accepted from a client, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Validates a client-supplied key.
    ///
    /// # Errors
    /// [`FlagKeyError`] when the key is empty, too long, or has a character outside
    /// `[A-Za-z0-9._:-]`.
    pub fn parse(key: &str) -> Result<Self, FlagKeyError> {
        if key.is_empty() {
            return Err(FlagKeyError::Empty);
        }
        if key.len() > Self::MAX_LEN {
            return Err(FlagKeyError::TooLong);
        }
        if let Some(bad) = key
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(FlagKeyError::InvalidChar(bad));
        }
        Ok(Self(key.to_owned()))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FlagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The kind of an evaluation reason, with the exact strings the SDKs expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReasonKind {
    /// An error kept the flag from being evaluated; see [`Reason::error_kind`].
    Error,
    /// No targeting rule or user target matched; the flag's own rollout decided.
    Fallthrough,
    /// The flag is switched off.
    Off,
    /// A targeting rule matched.
    RuleMatch,
    /// The user id is in the flag's `targetUsers`.
    TargetMatch,
    /// Anything else, including kinds this version does not know.
    #[serde(other)]
    Unknown,
}

impl ReasonKind {
    /// The wire string (`"OFF"`, `"RULE_MATCH"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Error => "ERROR",
            Self::Fallthrough => "FALLTHROUGH",
            Self::Off => "OFF",
            Self::RuleMatch => "RULE_MATCH",
            Self::TargetMatch => "TARGET_MATCH",
            Self::Unknown => "UNKNOWN",
        }
    }
}

/// Why an evaluation ended in [`ReasonKind::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorKind {
    /// The SDK was asked for a flag before it had data.
    ClientNotReady,
    /// Evaluation failed unexpectedly.
    Exception,
    /// The flag does not exist.
    FlagNotFound,
    /// The flag's rules are invalid (for example an invalid regex).
    MalformedFlag,
    /// A user was required and none was given.
    UserNotSpecified,
    /// A kind this version does not know.
    #[serde(other)]
    Unknown,
}

/// Why a flag has the value it has, as in the `reasons` map of `GET /api/v1/sdk/flags`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    /// What decided the value.
    pub kind: ReasonKind,
    /// The id of the matching rule, for [`ReasonKind::RuleMatch`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    /// The index of the matching rule, for [`ReasonKind::RuleMatch`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_index: Option<u32>,
    /// Whether the user fell inside the percentage rollout that decided the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_rollout: Option<bool>,
    /// What went wrong, for [`ReasonKind::Error`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
}

impl Reason {
    /// A reason of `kind` with no further detail.
    pub const fn new(kind: ReasonKind) -> Self {
        Self {
            kind,
            rule_id: None,
            rule_index: None,
            in_rollout: None,
            error_kind: None,
        }
    }

    /// An [`ReasonKind::Error`] reason.
    pub const fn error(error_kind: ErrorKind) -> Self {
        Self {
            kind: ReasonKind::Error,
            rule_id: None,
            rule_index: None,
            in_rollout: None,
            error_kind: Some(error_kind),
        }
    }
}

/// An evaluated snapshot: one boolean per flag, plus optional reasons (the "V1" format).
///
/// Maps are ordered so that serialising the same content always gives the same bytes, which is
/// what makes content hashes (ETags) and byte-identical adapters possible.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct EvaluatedFlags {
    /// Flag key → value.
    pub flags: BTreeMap<String, bool>,
    /// Flag key → reason; may be empty (upstream sends reasons only when asked).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: BTreeMap<String, Reason>,
}

impl EvaluatedFlags {
    /// No flags.
    pub const EMPTY: Self = Self {
        flags: BTreeMap::new(),
        reasons: BTreeMap::new(),
    };

    /// Parses `{"flags":{key:bool},"reasons"?:{...}}`.
    ///
    /// Unknown top-level fields are ignored. Reasons whose shape is unusable are dropped rather
    /// than failing the whole snapshot: values are what clients depend on.
    ///
    /// # Errors
    /// [`ModelError::Json`] for invalid JSON, [`ModelError::MissingFlags`] without a `flags`
    /// object, [`ModelError::NonBooleanFlag`] when a value is not a boolean.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct Wire {
            flags: Option<BTreeMap<String, serde_json::Value>>,
            #[serde(default)]
            reasons: Option<BTreeMap<String, serde_json::Value>>,
        }
        let wire: Wire = serde_json::from_slice(bytes)?;
        let raw_flags = wire.flags.ok_or(ModelError::MissingFlags)?;
        let mut flags = BTreeMap::new();
        for (key, value) in raw_flags {
            check_key(&key)?;
            let serde_json::Value::Bool(value) = value else {
                return Err(ModelError::NonBooleanFlag { key });
            };
            flags.insert(key, value);
        }
        let reasons = wire
            .reasons
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| flags.contains_key(key))
            .filter_map(|(key, value)| Some((key, serde_json::from_value(value).ok()?)))
            .collect();
        Ok(Self { flags, reasons })
    }

    /// The value of `key`, or `default` when the flag is unknown (the SDKs' `isEnabled`).
    pub fn is_enabled(&self, key: &str, default: bool) -> bool {
        self.flags.get(key).copied().unwrap_or(default)
    }
}

/// The rules model delivered by the `rules-full` stream event (protocol doc §3.3).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesPayload {
    /// Upstream's version label for this rule set (opaque).
    #[serde(default, deserialize_with = "lenient_string")]
    pub version: String,
    /// Flag key → rules. The map key is authoritative; a flag's own `key` field is ignored.
    #[serde(default)]
    pub flags: BTreeMap<String, FlagRule>,
}

impl RulesPayload {
    /// Parses a `rules-full` payload (`{"version":…,"flags":{key:FlagRule}}`).
    ///
    /// # Errors
    /// [`ModelError::Json`] when the bytes are not JSON of this shape,
    /// [`ModelError::MissingFlags`] when there is no `flags` object.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ModelError> {
        // Straight into the typed model, never through a `serde_json::Value` tree: a 2,000-flag
        // set is ~0.6 MB of JSON, whose tree would be several times that, held beside the
        // rules in use on every change (on the Worker in wasm memory, which never shrinks).
        let (version, flags) = Self::split_json(bytes)?;
        let flags: BTreeMap<String, FlagRule> = serde_json::from_str(flags)?;
        for key in flags.keys() {
            check_key(key)?;
        }
        Ok(Self { version, flags })
    }

    /// The `version` of a `rules-full` payload and its `flags` object as raw JSON, not parsed
    /// yet (`CompiledRules::from_json` parses it one flag at a time).
    ///
    /// # Errors
    /// As [`RulesPayload::from_json`], for the envelope.
    pub(crate) fn split_json(bytes: &[u8]) -> Result<(String, &str), ModelError> {
        #[derive(Deserialize)]
        struct Wire<'a> {
            #[serde(default, deserialize_with = "lenient_string")]
            version: String,
            #[serde(borrow)]
            flags: Option<&'a serde_json::value::RawValue>,
        }
        let wire: Wire<'_> = serde_json::from_slice(bytes)?;
        match wire.flags {
            Some(raw) if raw.get().starts_with('{') => Ok((wire.version, raw.get())),
            _ => Err(ModelError::MissingFlags),
        }
    }
}

/// One flag's rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlagRule {
    /// Off flags are `false` for everyone (reason `OFF`). Missing means off, as in the SDKs.
    #[serde(default)]
    pub enabled: bool,
    /// Fallthrough rollout percentage; ≥ 100 is everyone, ≤ 0 (or missing) is no one.
    #[serde(default, deserialize_with = "lenient_percentage")]
    pub rollout: i64,
    /// User ids that always get `true` (reason `TARGET_MATCH`).
    #[serde(default, deserialize_with = "lenient_string_list")]
    pub target_users: Vec<String>,
    /// Targeting rules, tried in order; the first enabled rule whose conditions all match wins.
    #[serde(default)]
    pub rules: Vec<TargetingRule>,
}

/// One targeting rule of a flag.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetingRule {
    /// Rule id, reported as `ruleId` in `RULE_MATCH` reasons.
    #[serde(default, deserialize_with = "lenient_string")]
    pub id: String,
    /// Human-readable name (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Disabled rules are skipped.
    #[serde(default)]
    pub enabled: bool,
    /// Rollout percentage among users matching this rule.
    #[serde(default, deserialize_with = "lenient_percentage")]
    pub rollout: i64,
    /// All must match; an empty list never matches (SDK behaviour).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One condition of a targeting rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// The context attribute: `id`, `email`, or a key of `attributes`.
    #[serde(default, deserialize_with = "lenient_string")]
    pub attribute: String,
    /// The operator name as sent (`equals`, `in`, `semver_gt`, the Go aliases `eq`, `gt`, ...).
    /// Unknown operators are kept and evaluate to "no match".
    #[serde(default, deserialize_with = "lenient_string")]
    pub operator: String,
    /// The comparison value. The SDK model says string; numbers and booleans are turned into
    /// their JavaScript `String()` form and arrays are joined with `,` (the `in` list format).
    #[serde(default, deserialize_with = "lenient_condition_value")]
    pub value: String,
}

/// A value of a context attribute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttributeValue {
    /// A boolean.
    Bool(bool),
    /// A number (JSON numbers are all `f64` for the evaluators).
    Number(f64),
    /// A string.
    String(String),
}

impl AttributeValue {
    /// The attribute as JavaScript's `String(value)` would render it, which is what the SDK
    /// evaluators compare against.
    pub fn to_js_string(&self) -> String {
        match self {
            Self::Bool(b) => b.to_string(),
            Self::Number(n) => js_number_string(*n),
            Self::String(s) => s.clone(),
        }
    }
}

/// The user a flag is evaluated for (`{id, email?, attributes?}` in every SDK).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// The user id; rollouts hash it, `targetUsers` lists it. No id means "anonymous".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The user's email, readable by conditions on the `email` attribute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Every other attribute.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, AttributeValue>,
}

impl Context {
    /// The anonymous context: no id, no attributes.
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// A context with only a user id.
    pub fn with_id(id: impl Into<String>) -> Self {
        Self {
            id: Some(id.into()),
            ..Self::default()
        }
    }

    /// Whether this is the anonymous context (nothing to evaluate per user).
    pub fn is_anonymous(&self) -> bool {
        self.id.is_none() && self.email.is_none() && self.attributes.is_empty()
    }

    /// The value a condition on `attribute` sees: `id` and `email` are resolved specially,
    /// everything else comes from `attributes` (as in `evaluate.ts`).
    pub fn attribute(&self, attribute: &str) -> Option<String> {
        match attribute {
            "id" => self.id.clone(),
            "email" => self.email.clone(),
            other => self.attributes.get(other).map(AttributeValue::to_js_string),
        }
    }
}

/// Formats a number exactly as JavaScript's `String(n)` does (`1e+21`, `1e-7`, `NaN`, ...).
fn js_number_string(n: f64) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = crate::eval::js::write_number(&mut out, n);
    out
}

/// A JSON scalar as JavaScript's `String(value)` renders it; `None` for arrays and objects.
fn scalar_string(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => Some(String::new()),
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => Some(n.as_f64().map(js_number_string).unwrap_or_default()),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => None,
    }
}

fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    scalar_string(&value)
        .ok_or_else(|| de::Error::custom(format!("expected a string, got {value}")))
}

fn lenient_string_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Number(n) => n.as_f64().map(js_number_string),
                _ => None,
            })
            .collect(),
        other => return Err(de::Error::custom(format!("expected a list, got {other}"))),
    })
}

fn lenient_percentage<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Null => 0,
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => i,
            // 12.5 % is "in when bucket < 12.5", i.e. buckets 0..=12: the same as 13.
            None => n.as_f64().map_or(0, |f| f.ceil().clamp(-1.0, 101.0) as i64),
        },
        other => {
            return Err(de::Error::custom(format!(
                "expected a percentage, got {other}"
            )));
        }
    })
}

fn lenient_condition_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    match &value {
        // A JSON list is the `in` operator's comma-separated string.
        serde_json::Value::Array(items) => Ok(items
            .iter()
            .map(|item| scalar_string(item).unwrap_or_else(|| item.to_string()))
            .collect::<Vec<_>>()
            .join(",")),
        other => scalar_string(other)
            .ok_or_else(|| de::Error::custom(format!("expected a value, got {value}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_evaluated_snapshot_with_reasons_and_ignores_unknown_fields() {
        let json = br#"{"flags":{"a":true,"b":false},"reasons":{"a":{"kind":"FALLTHROUGH","inRollout":true},"b":{"kind":"OFF"},"ghost":{"kind":"OFF"}},"extra":1}"#;
        let parsed = EvaluatedFlags::from_json(json).unwrap();
        assert_eq!(parsed.flags.len(), 2);
        assert!(parsed.is_enabled("a", false));
        assert!(!parsed.is_enabled("b", true));
        assert!(parsed.is_enabled("missing", true));
        assert_eq!(parsed.reasons["a"].in_rollout, Some(true));
        // A reason for a flag that is not in `flags` is dropped.
        assert!(!parsed.reasons.contains_key("ghost"));
    }

    #[test]
    fn unknown_reason_kinds_become_unknown() {
        let json = br#"{"flags":{"a":true},"reasons":{"a":{"kind":"SOMETHING_NEW"}}}"#;
        let parsed = EvaluatedFlags::from_json(json).unwrap();
        assert_eq!(parsed.reasons["a"].kind, ReasonKind::Unknown);
    }

    #[test]
    fn rejects_bad_evaluated_snapshots() {
        assert!(matches!(
            EvaluatedFlags::from_json(br#"{"flags":{"a":"yes"}}"#),
            Err(ModelError::NonBooleanFlag { key }) if key == "a"
        ));
        assert!(matches!(
            EvaluatedFlags::from_json(br#"{"reasons":{}}"#),
            Err(ModelError::MissingFlags)
        ));
        assert!(matches!(
            EvaluatedFlags::from_json(b"{"),
            Err(ModelError::Json(_))
        ));
        assert!(matches!(
            EvaluatedFlags::from_json(b"[]"),
            Err(ModelError::Json(_))
        ));
        assert!(matches!(
            EvaluatedFlags::from_json(b""),
            Err(ModelError::Json(_))
        ));
    }

    #[test]
    fn serializes_reasons_with_wire_names_and_omits_empty_fields() {
        let mut flags = EvaluatedFlags::default();
        flags.flags.insert("a".into(), true);
        flags.reasons.insert(
            "a".into(),
            Reason {
                rule_id: Some("r1".into()),
                rule_index: Some(0),
                in_rollout: Some(true),
                ..Reason::new(ReasonKind::RuleMatch)
            },
        );
        assert_eq!(
            serde_json::to_string(&flags).unwrap(),
            r#"{"flags":{"a":true},"reasons":{"a":{"kind":"RULE_MATCH","ruleId":"r1","ruleIndex":0,"inRollout":true}}}"#
        );
        let bare = EvaluatedFlags {
            flags: flags.flags.clone(),
            reasons: BTreeMap::new(),
        };
        assert_eq!(
            serde_json::to_string(&bare).unwrap(),
            r#"{"flags":{"a":true}}"#
        );
    }

    #[test]
    fn parses_rules_leniently() {
        let json = br#"{"version":7,"flags":{"f":{"key":"ignored","enabled":true,"rollout":50,
            "targetUsers":["u1",2],"rules":[{"id":"r","enabled":true,"rollout":12.5,
            "conditions":[{"attribute":"plan","operator":"in","value":["pro","team"]},
            {"attribute":"age","operator":"gt","value":18}]}],"unknown":{}}}}"#;
        let rules = RulesPayload::from_json(json).unwrap();
        assert_eq!(rules.version, "7");
        let flag = &rules.flags["f"];
        assert!(flag.enabled);
        assert_eq!(flag.rollout, 50);
        assert_eq!(flag.target_users, ["u1", "2"]);
        assert_eq!(flag.rules[0].rollout, 13);
        assert_eq!(flag.rules[0].conditions[0].value, "pro,team");
        assert_eq!(flag.rules[0].conditions[1].value, "18");
    }

    #[test]
    fn missing_rule_fields_behave_like_javascript_undefined() {
        let rules = RulesPayload::from_json(br#"{"flags":{"f":{}}}"#).unwrap();
        let flag = &rules.flags["f"];
        assert!(!flag.enabled);
        assert_eq!(flag.rollout, 0);
        assert!(flag.rules.is_empty());
    }

    #[test]
    fn rejects_bad_rules() {
        assert!(matches!(
            RulesPayload::from_json(b"{}"),
            Err(ModelError::MissingFlags)
        ));
        assert!(matches!(
            RulesPayload::from_json(br#"{"flags":[]}"#),
            Err(ModelError::MissingFlags)
        ));
        assert!(matches!(
            RulesPayload::from_json(br#"{"flags":{"f":{"rules":"x"}}}"#),
            Err(ModelError::Json(_))
        ));
    }

    #[test]
    fn context_attributes_resolve_like_the_sdks() {
        let ctx: Context = serde_json::from_str(
            r#"{"id":"u1","email":"a@b.c","attributes":{"plan":"pro","age":42,"beta":true,"ratio":0.5}}"#,
        )
        .unwrap();
        assert_eq!(ctx.attribute("id").as_deref(), Some("u1"));
        assert_eq!(ctx.attribute("email").as_deref(), Some("a@b.c"));
        assert_eq!(ctx.attribute("plan").as_deref(), Some("pro"));
        assert_eq!(ctx.attribute("age").as_deref(), Some("42"));
        assert_eq!(ctx.attribute("beta").as_deref(), Some("true"));
        assert_eq!(ctx.attribute("ratio").as_deref(), Some("0.5"));
        assert_eq!(ctx.attribute("missing"), None);
        assert!(!ctx.is_anonymous());
        assert!(Context::anonymous().is_anonymous());
    }

    #[test]
    fn flag_keys_are_validated() {
        assert!(FlagKey::parse("new-checkout_v2.beta:x").is_ok());
        assert_eq!(FlagKey::parse(""), Err(FlagKeyError::Empty));
        assert_eq!(FlagKey::parse("a b"), Err(FlagKeyError::InvalidChar(' ')));
        assert_eq!(FlagKey::parse(&"k".repeat(257)), Err(FlagKeyError::TooLong));
    }
}

#[cfg(test)]
mod upstream_key_tests {
    use super::*;

    #[test]
    fn upstream_keys_follow_the_downstream_rule_in_both_shapes() {
        for bad in [
            r#""\ufffd\ufffd-bad""#,
            r#""a\r\nb""#,
            r#""with space""#,
            r#""""#,
        ] {
            let evaluated = format!(r#"{{"flags":{{{bad}:true}}}}"#);
            assert!(
                matches!(
                    EvaluatedFlags::from_json(evaluated.as_bytes()),
                    Err(ModelError::InvalidKey { .. })
                ),
                "{evaluated}"
            );
            let rules = format!(r#"{{"flags":{{{bad}:{{"enabled":true}}}}}}"#);
            assert!(
                matches!(
                    RulesPayload::from_json(rules.as_bytes()),
                    Err(ModelError::InvalidKey { .. })
                ),
                "{rules}"
            );
        }
        let long = format!(r#"{{"flags":{{"{}":true}}}}"#, "k".repeat(257));
        assert!(EvaluatedFlags::from_json(long.as_bytes()).is_err());
        assert!(EvaluatedFlags::from_json(br#"{"flags":{"ok-key_1.a:b":true}}"#).is_ok());
    }
}
