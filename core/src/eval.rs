//! Local flag evaluation, identical to the official SDK evaluators (protocol doc §3).
//!
//! The reference is `evaluateFlagWithReason` in `packages/sdk-node/src/evaluate.ts` of
//! `rollgate/sdks`, the only evaluator an official client actually runs (Node, after a
//! `rules-full` event). The Python (`rollgate/evaluate.py`) and Go (`evaluate.go`) evaluators
//! follow the same algorithm; where they differ from Node, Node wins.
//!
//! # Algorithm
//! 1. Flag not `enabled`: `false`, reason `OFF`.
//! 2. The user id is non-empty and in `targetUsers`: `true`, reason `TARGET_MATCH`.
//! 3. Otherwise, unless the context is anonymous (the SDKs' `null` user), the first *enabled*
//!    rule whose conditions *all* match decides, reason `RULE_MATCH{ruleId, ruleIndex,
//!    inRollout}` with `ruleIndex` the rule's position in the flag's list. A rule with no
//!    conditions never matches. The rule's rollout ≥ 100 gives `true`, ≤ 0 gives `false`, and
//!    anything between gives the rollout hash.
//! 4. Otherwise `FALLTHROUGH{inRollout}` with the flag's own rollout the same way; with no user id
//!    (or an empty one) a partial rollout gives `false`.
//!
//! `inRollout` is always the value itself. The rollout hash is [`rollout_bucket`]:
//! SHA-256 of `flagKey + ":" + userId`, first four bytes big-endian, modulo 100; the user is in
//! when the bucket is below the percentage. Java's SDK masks the sign bit first and so differs;
//! the official mock uses FNV-1a and differs too (protocol doc §3.5).
//!
//! # Conditions
//! Attribute `id` reads the context id, `email` the context email, any other name the entry of
//! `attributes` (numbers and booleans as JavaScript's `String()` renders them). An attribute that
//! is missing or `""` satisfies only `is_not_set`. String operators (`equals`, `not_equals`,
//! `contains`, `not_contains`, `starts_with`, `ends_with`, `in`, `not_in`) compare the
//! lower-cased attribute with the lower-cased value; `in` lists are split on `,` and each item
//! trimmed. Numeric operators (`greater_than`, `greater_equal`, `less_than`, `less_equal`) use
//! JavaScript's `parseFloat`, which reads a numeric prefix (`"12abc"` is 12). `regex` tests the
//! raw attribute, unanchored. `semver_gt|lt|eq` strip one leading `v`, split on `.` and read each
//! part with `parseInt`, padding with zeros. The Go SDK's aliases `eq, neq, gt, gte, lt, lte` are
//! accepted. Any other operator never matches.
//!
//! # Where this deliberately differs from Node
//! - **Unsupported regexes.** A pattern that JavaScript accepts but the linear-time `regex`
//!   crate cannot run (lookaround, backreferences), or that `regex` rejects for any other reason,
//!   makes the flag evaluate to `false` with reason `ERROR` / `MALFORMED_FLAG` when that
//!   condition is reached; JavaScript would evaluate it (or, for a pattern it also rejects,
//!   treat the condition as false). Patterns are otherwise translated to keep their JavaScript
//!   meaning (see `js::compile_regex`); JavaScript's UTF-16 view of astral characters is not
//!   reproduced.
//! - **Rule rollouts without a user id.** For a context that has attributes but no id, Node
//!   hashes `flagKey + ":undefined"` and Python `flagKey + ":None"`; here the rule's partial
//!   rollout gives `false` (`inRollout: false`), like the fallthrough. An *empty* id hashes
//!   `flagKey + ":"`, as in every SDK.
//! - **The hash key** is the map key of `flags`; Node hashes the flag's own `key` field, which
//!   upstream sets to the same string.
//! - **Unknown flags** give `false` with `ERROR` / `FLAG_NOT_FOUND`, where a Node client reports
//!   `UNKNOWN` for a key it has never seen.
//! - **Go aliases** (`eq`, `gte`, ...) match here; Node and Python treat them as unknown.

mod canonical;
mod condition;
pub(crate) mod js;

use std::collections::BTreeMap;

use serde::de::{MapAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use self::canonical::{CanonicalJson, CanonicalWriter};
use self::condition::{Attributes, CompiledCondition, Outcome};
use crate::model::{
    Condition, Context, ErrorKind, EvaluatedFlags, FlagRule, ModelError, Reason, ReasonKind,
    RulesPayload, check_key,
};

/// The value of one flag for one context, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detail {
    /// The flag's value.
    pub value: bool,
    /// Why it has that value.
    pub reason: Reason,
}

impl Detail {
    const fn new(value: bool, reason: Reason) -> Self {
        Self { value, reason }
    }
}

/// A [`Reason`] that borrows its rule id from the compiled rules: what [`CompiledRules::evaluate_all`]
/// gives per flag, so that evaluating a context allocates nothing per flag. Serialises exactly as
/// [`Reason`] does (same fields, same order, same omissions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReasonRef<'a> {
    /// What decided the value.
    pub kind: ReasonKind,
    /// The id of the matching rule, for [`ReasonKind::RuleMatch`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<&'a str>,
    /// The index of the matching rule, for [`ReasonKind::RuleMatch`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_index: Option<u32>,
    /// Whether the user fell inside the percentage rollout that decided the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_rollout: Option<bool>,
    /// What went wrong, for [`ReasonKind::Error`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
}

impl ReasonRef<'_> {
    const fn new(kind: ReasonKind) -> Self {
        Self {
            kind,
            rule_id: None,
            rule_index: None,
            in_rollout: None,
            error_kind: None,
        }
    }

    const fn error(error_kind: ErrorKind) -> Self {
        Self {
            error_kind: Some(error_kind),
            ..Self::new(ReasonKind::Error)
        }
    }

    /// The owned [`Reason`].
    pub fn to_reason(&self) -> Reason {
        Reason {
            kind: self.kind,
            rule_id: self.rule_id.map(str::to_owned),
            rule_index: self.rule_index,
            in_rollout: self.in_rollout,
            error_kind: self.error_kind,
        }
    }
}

/// One flag of an [`Evaluation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evaluated<'a> {
    /// The flag's key, borrowed from the compiled rules.
    pub key: &'a str,
    /// The flag's value.
    pub value: bool,
    /// Why it has that value.
    pub reason: ReasonRef<'a>,
    /// `"<key>":` as JSON (the key escaped), rendered once when the rules were compiled.
    key_json: &'a str,
}

/// Every flag's value and reason for one context, in key order (the order of
/// [`EvaluatedFlags`]' maps), borrowing keys and rule ids from the [`CompiledRules`]: one
/// allocation per context instead of several per flag. Renderers serialise it directly
/// ([`Self::values`], [`Self::reasons`]); [`Self::to_flags`] gives the owned maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation<'a> {
    /// Sorted by key, without duplicates (the compiled flags' order).
    flags: Vec<Evaluated<'a>>,
}

impl<'a> Evaluation<'a> {
    /// The flags, in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Evaluated<'a>> {
        self.flags.iter()
    }

    /// The number of flags.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// Whether there are no flags.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// The flag with this key.
    pub fn get(&self, key: &str) -> Option<&Evaluated<'a>> {
        let at = self.flags.binary_search_by(|f| f.key.cmp(key)).ok()?;
        self.flags.get(at)
    }

    /// Serialises as the `flags` map of [`EvaluatedFlags`] (key → value), byte for byte.
    pub fn values(&self) -> impl Serialize + '_ {
        Values(&self.flags)
    }

    /// Serialises as the `reasons` map of [`EvaluatedFlags`] (key → reason), byte for byte.
    pub fn reasons(&self) -> impl Serialize + '_ {
        Reasons(&self.flags)
    }

    /// Appends the `flags` map ([`Self::values`]) to `out` without a serializer: the keys'
    /// JSON was rendered when the rules were compiled, so this is a concatenation of shared
    /// fragments and `true`/`false`. Byte for byte what [`Self::values`] serialises to.
    pub fn write_values(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, flag) in self.flags.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(flag.key_json.as_bytes());
            out.extend_from_slice(if flag.value { b"true" } else { b"false" });
        }
        out.push(b'}');
    }

    /// Appends the `reasons` map ([`Self::reasons`]) to `out`: the keys as in
    /// [`Self::write_values`], each reason serialised as [`Self::reasons`] does.
    pub fn write_reasons(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, flag) in self.flags.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(flag.key_json.as_bytes());
            // Writing a small struct of strings, numbers and booleans to a `Vec` cannot fail.
            let _ = serde_json::to_writer(&mut *out, &flag.reason);
        }
        out.push(b'}');
    }

    /// Bytes [`Self::write_values`] appends, at most (for sizing the output once).
    pub fn values_len_bound(&self) -> usize {
        2 + self
            .flags
            .iter()
            .map(|flag| flag.key_json.len() + ",false".len())
            .sum::<usize>()
    }

    /// The owned maps.
    pub fn to_flags(&self) -> EvaluatedFlags {
        // Collecting sorted pairs builds each map in bulk, without a search per insert.
        EvaluatedFlags {
            flags: self
                .flags
                .iter()
                .map(|f| (f.key.to_owned(), f.value))
                .collect(),
            reasons: self
                .flags
                .iter()
                .map(|f| (f.key.to_owned(), f.reason.to_reason()))
                .collect(),
        }
    }
}

struct Values<'e, 'a>(&'e [Evaluated<'a>]);

impl Serialize for Values<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|f| (f.key, f.value)))
    }
}

struct Reasons<'e, 'a>(&'e [Evaluated<'a>]);

impl Serialize for Reasons<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|f| (f.key, &f.reason)))
    }
}

/// A rules payload compiled for evaluation: built once per snapshot, shared by every request.
///
/// Compiling never fails. Condition values are lower-cased, `in` lists split, numbers and
/// versions parsed and regexes compiled here, once; disabled rules and rules without conditions
/// (which can never match) are dropped.
///
/// The layout is compact because the Worker's wasm memory keeps its high-water mark, and a
/// change holds two of these at once (the old one is served while the new one is built): each
/// distinct condition is compiled once, in one table the rules index, and a flag's key is read
/// from its JSON form (`examples/change_memory.rs` measures it).
#[derive(Clone, Debug)]
pub struct CompiledRules {
    /// The payload as `serde_json` writes it (maps in key order, so equal content gives equal
    /// bytes) and its content hash, kept for persistence: deflated when large, since nothing
    /// else reads it. Not the typed payload: for a 2,000-flag set that is ~2 MiB of small
    /// allocations against ~0.6 MB of text, and the Worker's wasm memory keeps its high-water
    /// mark (`examples/change_memory.rs`).
    payload_json: CanonicalJson,
    /// Upstream's version label of the payload.
    version: String,
    /// Sorted by key (the payload's map order), for binary search and ordered output.
    flags: Box<[CompiledFlag]>,
    /// Every distinct condition (attribute, operator, value), compiled once; a rule holds
    /// indices into it, which are also the conditions' memo slots.
    conditions: Box<[CompiledCondition]>,
    /// The number of distinct custom attribute names, i.e. of attribute cache slots.
    attribute_slots: usize,
}

/// What compiling gives out: one cache slot per distinct custom attribute name, and one table
/// entry per distinct condition (attribute, operator, value).
#[derive(Default)]
struct Slots {
    attributes: BTreeMap<String, usize>,
    /// Keyed by [`condition_identity`]: one allocation per distinct condition.
    condition_index: BTreeMap<Box<str>, u32>,
    conditions: Vec<CompiledCondition>,
}

impl Slots {
    /// The table index of `condition`, compiled the first time it is seen.
    fn condition(&mut self, condition: &Condition) -> u32 {
        let identity = condition_identity(condition);
        if let Some(index) = self.condition_index.get(identity.as_str()) {
            return *index;
        }
        let index = self.conditions.len();
        self.conditions
            .push(CompiledCondition::compile(condition, &mut self.attributes).with_memo(index));
        // More conditions than `u32` holds do not fit any payload the size limits admit.
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        self.condition_index
            .insert(identity.into_boxed_str(), index);
        index
    }
}

/// A condition's (attribute, operator, value) as one string: the attribute's and the
/// operator's lengths first, so that no two conditions share it.
fn condition_identity(condition: &Condition) -> String {
    format!(
        "{}:{}:{}{}{}",
        condition.attribute.len(),
        condition.operator.len(),
        condition.attribute,
        condition.operator,
        condition.value
    )
}

#[derive(Clone, Debug)]
struct CompiledFlag {
    /// `"<key>":` as JSON, for [`Evaluation::write_values`]; the key itself is read from it.
    key_json: Box<str>,
    /// The key, only when JSON had to escape it (never for a key [`check_key`] admits).
    escaped_key: Option<Box<str>>,
    enabled: bool,
    rollout: i64,
    /// Sorted and deduplicated, for binary search.
    target_users: Box<[Box<str>]>,
    /// Enabled rules with at least one condition, in their original order.
    rules: Box<[CompiledRule]>,
}

#[derive(Clone, Debug)]
struct CompiledRule {
    id: Box<str>,
    /// Position in the flag's original rule list (`ruleIndex`).
    index: u32,
    rollout: i64,
    /// Indices into [`CompiledRules::conditions`].
    conditions: Box<[u32]>,
}

impl CompiledFlag {
    fn compile(key: &str, flag: &FlagRule, slots: &mut Slots) -> Self {
        let mut target_users: Vec<Box<str>> = flag
            .target_users
            .iter()
            .map(|user| Box::from(user.as_str()))
            .collect();
        target_users.sort_unstable();
        target_users.dedup();
        let rules = flag
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.enabled && !rule.conditions.is_empty())
            .map(|(index, rule)| CompiledRule {
                id: Box::from(rule.id.as_str()),
                index: u32::try_from(index).unwrap_or(u32::MAX),
                rollout: rule.rollout,
                conditions: rule
                    .conditions
                    .iter()
                    .map(|condition| slots.condition(condition))
                    .collect(),
            })
            .collect();
        // Serialising a string cannot fail; the fallback is never used.
        let mut key_json = serde_json::to_string(key).unwrap_or_default();
        key_json.push(':');
        let key_json = key_json.into_boxed_str();
        let escaped_key = (unescaped_key(&key_json) != Some(key)).then(|| Box::from(key));
        Self {
            key_json,
            escaped_key,
            enabled: flag.enabled,
            rollout: flag.rollout,
            target_users: target_users.into_boxed_slice(),
            rules,
        }
    }

    /// The flag's key.
    fn key(&self) -> &str {
        match &self.escaped_key {
            Some(key) => key,
            None => unescaped_key(&self.key_json).unwrap_or_default(),
        }
    }

    fn evaluate<'s>(
        &'s self,
        conditions: &[CompiledCondition],
        attributes: &mut Attributes<'_>,
    ) -> (bool, ReasonRef<'s>) {
        let key = self.key();
        let context = attributes.context();
        if !self.enabled {
            return (false, ReasonRef::new(ReasonKind::Off));
        }
        // `user?.id && ...`: an empty id is no id for targeting and the fallthrough.
        let user_id = context.id.as_deref().filter(|id| !id.is_empty());
        if let Some(id) = user_id
            && self
                .target_users
                .binary_search_by(|user| (**user).cmp(id))
                .is_ok()
        {
            return (true, ReasonRef::new(ReasonKind::TargetMatch));
        }
        // The SDKs skip rules for a `null` user, which is what an anonymous context stands for.
        if !context.is_anonymous() {
            for rule in &self.rules {
                match rule.matches(conditions, attributes) {
                    Outcome::NoMatch => {}
                    Outcome::Malformed => {
                        return (false, ReasonRef::error(ErrorKind::MalformedFlag));
                    }
                    Outcome::Match => {
                        let in_rollout = match context.id.as_deref() {
                            // Every SDK hashes an empty id as `key + ":"`.
                            Some(id) => partial_rollout(key, id, rule.rollout),
                            None => rule.rollout >= 100,
                        };
                        return (
                            in_rollout,
                            ReasonRef {
                                rule_id: Some(&*rule.id),
                                rule_index: Some(rule.index),
                                in_rollout: Some(in_rollout),
                                ..ReasonRef::new(ReasonKind::RuleMatch)
                            },
                        );
                    }
                }
            }
        }
        let in_rollout = match user_id {
            Some(id) => partial_rollout(key, id, self.rollout),
            None => self.rollout >= 100,
        };
        (
            in_rollout,
            ReasonRef {
                in_rollout: Some(in_rollout),
                ..ReasonRef::new(ReasonKind::Fallthrough)
            },
        )
    }
}

impl CompiledRule {
    fn matches(
        &self,
        conditions: &[CompiledCondition],
        attributes: &mut Attributes<'_>,
    ) -> Outcome {
        for &index in &self.conditions {
            // The index was given out with the table, so it is always there.
            let Some(condition) = conditions.get(index as usize) else {
                return Outcome::Malformed;
            };
            match condition.matches_memo(attributes) {
                Outcome::Match => {}
                other => return other,
            }
        }
        Outcome::Match
    }
}

/// `rollout >= 100` is in and `rollout <= 0` is out without hashing, as in the SDKs.
fn partial_rollout(flag_key: &str, user_id: &str, percentage: i64) -> bool {
    if percentage >= 100 {
        true
    } else if percentage <= 0 {
        false
    } else {
        is_in_rollout(flag_key, user_id, percentage)
    }
}

/// The key inside a flag's `"<key>":`, as written (escapes, if any, not undone).
fn unescaped_key(key_json: &str) -> Option<&str> {
    key_json.strip_prefix('"')?.strip_suffix("\":")
}

/// A JSON object's entries in document order, each value as raw text: a rules payload's flags
/// before they are parsed one at a time.
struct FlagEntries<'a>(Vec<(Key<'a>, &'a RawValue)>);

/// A flag key as the payload spells it: borrowed from the payload's text unless JSON escaped
/// it, so that compiling makes no copy of the key per flag just to sort the entries.
#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

impl<'de> Deserialize<'de> for FlagEntries<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = FlagEntries<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of flags")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // The hint is the parser's own bound (serde_json gives none): no input sizes it.
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(FlagEntries(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

impl CompiledRules {
    /// Compiles a rules payload. Never fails: problems in a flag (an unsupported regex) surface
    /// as an `ERROR` reason when that flag is evaluated.
    pub fn compile(payload: &RulesPayload) -> Self {
        let mut slots = Slots::default();
        let flags = payload
            .flags
            .iter()
            .map(|(key, flag)| CompiledFlag::compile(key, flag, &mut slots))
            .collect();
        Self {
            payload_json: CanonicalJson::of(payload),
            version: payload.version.clone(),
            flags,
            conditions: slots.conditions.into_boxed_slice(),
            attribute_slots: slots.attributes.len(),
        }
    }

    /// Parses and compiles a `rules-full` payload one flag at a time: each flag is parsed,
    /// written into the canonical JSON and compiled on its own, so the typed payload of a large
    /// set (~2 MiB for 2,000 flags, against ~0.6 MB of JSON) never exists whole. The same rules
    /// as [`CompiledRules::compile`] of [`RulesPayload::from_json`], and the same errors.
    ///
    /// # Errors
    /// [`ModelError`] as [`RulesPayload::from_json`] gives it.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ModelError> {
        let (version, flags) = RulesPayload::split_json(bytes)?;
        // Every entry, values still text, in key order; duplicates keep their document order.
        let mut flags = serde_json::from_str::<FlagEntries<'_>>(flags)?.0;
        flags.sort_by(|(Key(a), _), (Key(b), _)| a.cmp(b));
        let mut flags = flags.into_iter().peekable();
        // What `serde_json` writes for the typed payload: `{"version":…,"flags":{…}}`, hashed
        // and (when large) deflated as it is written.
        let mut json = CanonicalWriter::new();
        json.push(b"{\"version\":");
        serde_json::to_writer(&mut json, &version)?;
        json.push(b",\"flags\":{");
        let mut slots = Slots::default();
        let mut compiled = Vec::with_capacity(flags.len());
        while let Some((Key(key), raw)) = flags.next() {
            let flag: FlagRule = serde_json::from_str(raw.get())?;
            if flags.peek().is_some_and(|(Key(next), _)| *next == key) {
                // A later duplicate wins, as in the typed map; this one had to parse all the same.
                continue;
            }
            if !compiled.is_empty() {
                json.push(b",");
            }
            serde_json::to_writer(&mut json, &key)?;
            json.push(b":");
            serde_json::to_writer(&mut json, &flag)?;
            compiled.push(CompiledFlag::compile(&key, &flag, &mut slots));
        }
        json.push(b"}}");
        // After every flag parsed, as the typed parse reports a malformed flag first.
        for flag in &compiled {
            check_key(flag.key())?;
        }
        Ok(Self {
            payload_json: json.finish(),
            version,
            flags: compiled.into_boxed_slice(),
            conditions: slots.conditions.into_boxed_slice(),
            attribute_slots: slots.attributes.len(),
        })
    }

    /// The payload these rules were compiled from, as canonical JSON, for persistence
    /// ([`RulesPayload::from_json`] reads it back): inflated for each call when the set is
    /// large, so a copy of ~0.5 MB per 2,000 flags; [`CompiledRules::write_payload_json`]
    /// appends it to a buffer instead.
    pub fn payload_json(&self) -> std::borrow::Cow<'_, str> {
        self.payload_json.text()
    }

    /// Appends [`CompiledRules::payload_json`] to `out`.
    pub fn write_payload_json(&self, out: &mut Vec<u8>) {
        self.payload_json.write_to(out);
    }

    /// The length of [`CompiledRules::payload_json`] in bytes.
    pub fn payload_json_len(&self) -> usize {
        self.payload_json.len()
    }

    /// The content hash of the payload: 16 hex digits of SHA-256 over `rules:` and
    /// [`CompiledRules::payload_json`], taken as it was written. It goes into the ETag, so it
    /// is the same for the same rules in every version.
    pub fn content_hash(&self) -> &str {
        self.payload_json.content_hash()
    }

    /// Upstream's version label of the payload.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The number of flags.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// Whether there are no flags.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// Whether a flag with this key exists.
    pub fn contains(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    fn find(&self, key: &str) -> Option<&CompiledFlag> {
        let at = self
            .flags
            .binary_search_by(|flag| flag.key().cmp(key))
            .ok()?;
        self.flags.get(at)
    }

    /// Evaluates one flag for `context`. An unknown key gives `false` with reason
    /// `ERROR` / `FLAG_NOT_FOUND`.
    pub fn evaluate(&self, key: &str, context: &Context) -> Detail {
        match self.find(key) {
            Some(flag) => {
                let (value, reason) =
                    flag.evaluate(&self.conditions, &mut Attributes::new(context));
                Detail::new(value, reason.to_reason())
            }
            None => Detail::new(false, Reason::error(ErrorKind::FlagNotFound)),
        }
    }

    /// Evaluates every flag for `context`, with reasons, borrowing keys and rule ids from
    /// `self` ([`Evaluation::to_flags`] gives the owned maps).
    pub fn evaluate_all(&self, context: &Context) -> Evaluation<'_> {
        // Each attribute is looked up, and each distinct condition matched, once for all flags.
        let mut attributes =
            Attributes::cached(context, self.attribute_slots, self.conditions.len());
        let flags = self
            .flags
            .iter()
            .map(|flag| {
                let (value, reason) = flag.evaluate(&self.conditions, &mut attributes);
                Evaluated {
                    key: flag.key(),
                    value,
                    reason,
                    key_json: &flag.key_json,
                }
            })
            .collect();
        Evaluation { flags }
    }
}

/// SHA-256's initial hash value (FIPS 180-4 §5.3.3).
const SHA256_INIT: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// The rollout bucket of a user for a flag, in `0..100`: SHA-256 of `flag_key + ":" + user_id`,
/// the first four bytes as a big-endian `u32`, modulo 100.
pub fn rollout_bucket(flag_key: &str, user_id: &str) -> u32 {
    // Most messages fit one block (≤ 55 bytes leaves room for the padding and the length):
    // pad it here and run the compression function once, without the hasher's buffering.
    // The first word of the state is the first four bytes of the digest, big-endian.
    let len = flag_key.len() + 1 + user_id.len();
    if len <= 55 {
        let mut block = [0u8; 64];
        let (key, rest) = block.split_at_mut(flag_key.len());
        key.copy_from_slice(flag_key.as_bytes());
        let (colon, rest) = rest.split_at_mut(1);
        colon.copy_from_slice(b":");
        let (id, rest) = rest.split_at_mut(user_id.len());
        id.copy_from_slice(user_id.as_bytes());
        let (end, _) = rest.split_at_mut(1);
        end.copy_from_slice(&[0x80]);
        let (_, bits) = block.split_at_mut(56);
        bits.copy_from_slice(&(len as u64 * 8).to_be_bytes());
        let mut state = SHA256_INIT;
        sha2::compress256(&mut state, &[block.into()]);
        return state[0] % 100;
    }
    rollout_bucket_reference(flag_key, user_id)
}

/// [`rollout_bucket`] through the general hasher (any length).
fn rollout_bucket_reference(flag_key: &str, user_id: &str) -> u32 {
    let digest = Sha256::new()
        .chain_update(flag_key.as_bytes())
        .chain_update(b":")
        .chain_update(user_id.as_bytes())
        .finalize();
    let bytes: [u8; 32] = digest.into();
    let [a, b, c, d, ..] = bytes;
    u32::from_be_bytes([a, b, c, d]) % 100
}

/// Whether a user falls inside a `percentage` rollout of a flag: the bucket is below the
/// percentage, so ≥ 100 is everyone and ≤ 0 no one.
pub fn is_in_rollout(flag_key: &str, user_id: &str, percentage: i64) -> bool {
    i64::from(rollout_bucket(flag_key, user_id)) < percentage
}

#[cfg(test)]
mod tests;
