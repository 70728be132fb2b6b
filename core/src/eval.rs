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

mod condition;
pub(crate) mod js;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use self::condition::{Attributes, CompiledCondition, Outcome};
use crate::model::{
    Context, ErrorKind, EvaluatedFlags, FlagRule, Reason, ReasonKind, RulesPayload,
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

/// A rules payload compiled for evaluation: built once per snapshot, shared by every request.
///
/// Compiling never fails. Condition values are lower-cased, `in` lists split, numbers and
/// versions parsed and regexes compiled here, once; disabled rules and rules without conditions
/// (which can never match) are dropped.
#[derive(Clone, Debug)]
pub struct CompiledRules {
    payload: RulesPayload,
    /// Sorted by key (the payload's map order), for binary search and ordered output.
    flags: Vec<(String, CompiledFlag)>,
    /// The number of distinct custom attribute names, i.e. of attribute cache slots.
    attribute_slots: usize,
}

#[derive(Clone, Debug)]
struct CompiledFlag {
    enabled: bool,
    rollout: i64,
    /// Sorted and deduplicated, for binary search.
    target_users: Vec<String>,
    /// Enabled rules with at least one condition, in their original order.
    rules: Vec<CompiledRule>,
}

#[derive(Clone, Debug)]
struct CompiledRule {
    id: String,
    /// Position in the flag's original rule list (`ruleIndex`).
    index: u32,
    rollout: i64,
    conditions: Vec<CompiledCondition>,
}

impl CompiledFlag {
    fn compile(flag: &FlagRule, slots: &mut BTreeMap<String, usize>) -> Self {
        let mut target_users = flag.target_users.clone();
        target_users.sort_unstable();
        target_users.dedup();
        let rules = flag
            .rules
            .iter()
            .enumerate()
            .filter(|(_, rule)| rule.enabled && !rule.conditions.is_empty())
            .map(|(index, rule)| CompiledRule {
                id: rule.id.clone(),
                index: u32::try_from(index).unwrap_or(u32::MAX),
                rollout: rule.rollout,
                conditions: rule
                    .conditions
                    .iter()
                    .map(|condition| CompiledCondition::compile(condition, slots))
                    .collect(),
            })
            .collect();
        Self {
            enabled: flag.enabled,
            rollout: flag.rollout,
            target_users,
            rules,
        }
    }

    fn evaluate(&self, key: &str, attributes: &mut Attributes<'_>) -> Detail {
        let context = attributes.context();
        if !self.enabled {
            return Detail::new(false, Reason::new(ReasonKind::Off));
        }
        // `user?.id && ...`: an empty id is no id for targeting and the fallthrough.
        let user_id = context.id.as_deref().filter(|id| !id.is_empty());
        if let Some(id) = user_id
            && self
                .target_users
                .binary_search_by(|user| user.as_str().cmp(id))
                .is_ok()
        {
            return Detail::new(true, Reason::new(ReasonKind::TargetMatch));
        }
        // The SDKs skip rules for a `null` user, which is what an anonymous context stands for.
        if !context.is_anonymous() {
            for rule in &self.rules {
                match rule.matches(attributes) {
                    Outcome::NoMatch => {}
                    Outcome::Malformed => {
                        return Detail::new(false, Reason::error(ErrorKind::MalformedFlag));
                    }
                    Outcome::Match => {
                        let in_rollout = match context.id.as_deref() {
                            // Every SDK hashes an empty id as `key + ":"`.
                            Some(id) => partial_rollout(key, id, rule.rollout),
                            None => rule.rollout >= 100,
                        };
                        return Detail::new(
                            in_rollout,
                            Reason {
                                rule_id: Some(rule.id.clone()),
                                rule_index: Some(rule.index),
                                in_rollout: Some(in_rollout),
                                ..Reason::new(ReasonKind::RuleMatch)
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
        Detail::new(
            in_rollout,
            Reason {
                in_rollout: Some(in_rollout),
                ..Reason::new(ReasonKind::Fallthrough)
            },
        )
    }
}

impl CompiledRule {
    fn matches(&self, attributes: &mut Attributes<'_>) -> Outcome {
        for condition in &self.conditions {
            match condition.matches(attributes) {
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

impl CompiledRules {
    /// Compiles a rules payload. Never fails: problems in a flag (an unsupported regex) surface
    /// as an `ERROR` reason when that flag is evaluated.
    pub fn compile(payload: &RulesPayload) -> Self {
        let mut slots = BTreeMap::new();
        let flags = payload
            .flags
            .iter()
            .map(|(key, flag)| (key.clone(), CompiledFlag::compile(flag, &mut slots)))
            .collect();
        Self {
            payload: payload.clone(),
            flags,
            attribute_slots: slots.len(),
        }
    }

    /// The payload these rules were compiled from, kept for persistence.
    pub fn payload(&self) -> &RulesPayload {
        &self.payload
    }

    /// Upstream's version label of the payload.
    pub fn version(&self) -> &str {
        &self.payload.version
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
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()?;
        self.flags.get(at).map(|(_, flag)| flag)
    }

    /// Evaluates one flag for `context`. An unknown key gives `false` with reason
    /// `ERROR` / `FLAG_NOT_FOUND`.
    pub fn evaluate(&self, key: &str, context: &Context) -> Detail {
        match self.find(key) {
            Some(flag) => flag.evaluate(key, &mut Attributes::new(context)),
            None => Detail::new(false, Reason::error(ErrorKind::FlagNotFound)),
        }
    }

    /// Evaluates every flag for `context`, with reasons.
    pub fn evaluate_all(&self, context: &Context) -> EvaluatedFlags {
        // Each attribute is looked up once for all flags.
        let mut attributes = Attributes::cached(context, self.attribute_slots);
        let mut flags = Vec::with_capacity(self.flags.len());
        let mut reasons = Vec::with_capacity(self.flags.len());
        for (key, flag) in &self.flags {
            let detail = flag.evaluate(key, &mut attributes);
            flags.push((key.clone(), detail.value));
            reasons.push((key.clone(), detail.reason));
        }
        // Collecting sorted pairs builds each map in bulk, without a search per insert.
        EvaluatedFlags {
            flags: flags.into_iter().collect(),
            reasons: reasons.into_iter().collect(),
        }
    }
}

/// The rollout bucket of a user for a flag, in `0..100`: SHA-256 of `flag_key + ":" + user_id`,
/// the first four bytes as a big-endian `u32`, modulo 100.
pub fn rollout_bucket(flag_key: &str, user_id: &str) -> u32 {
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
