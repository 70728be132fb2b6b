//! One targeting condition, compiled once and matched per context as `evaluate.ts` does.
//!
//! `matchesCondition` in the Node SDK reads the attribute, treats `undefined` and `""` as "not
//! set", answers `is_set` / `is_not_set`, fails every other operator on an unset attribute, and
//! then compares `String(attr).toLowerCase()` with `condition.value.toLowerCase()`. Everything
//! that depends only on the condition (lower-casing, list splitting, number and version parsing,
//! regex compilation) is done here at compile time.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::js::{self, JsRegex, StackStr};
use crate::model::{AttributeValue, Condition, Context};

/// The outcome of matching one condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The condition holds.
    Match,
    /// The condition does not hold.
    NoMatch,
    /// The condition cannot be evaluated here (a regex the `regex` crate cannot run).
    Malformed,
}

impl From<bool> for Outcome {
    fn from(matched: bool) -> Self {
        if matched { Self::Match } else { Self::NoMatch }
    }
}

/// Which value of the context a condition reads.
#[derive(Clone, Debug)]
enum Attribute {
    /// `id`: the user id, never an entry of `attributes`.
    Id,
    /// `email`: the context's email, never an entry of `attributes` (as in `evaluate.ts`).
    Email,
    /// Any other name: the entry of `attributes`, with the cache slot of that name.
    Custom { name: String, slot: usize },
}

/// Reads attribute values from one context. With a cache (for evaluating many flags for one
/// context), each custom attribute is looked up in the context's map once, by the slot its
/// name was given at compile time.
#[derive(Debug)]
pub(super) struct Attributes<'a> {
    context: &'a Context,
    /// Slot → not yet looked up (`None`) or the lookup's result. Empty: no caching.
    cache: Vec<Option<Option<Value<'a>>>>,
    /// Slot → `String(value).toLowerCase()` once a string operator needed it (borrowed when
    /// the value is already lower case), so each attribute is lower-cased once per context,
    /// not once per condition. Slots past the custom ones: `id`, then `email`. Empty: no
    /// caching.
    lowered: Vec<Option<Cow<'a, str>>>,
    /// Condition memo slot → its outcome once matched: a condition repeated across flags (the
    /// same attribute, operator and value) is matched once per context. Empty: no caching.
    outcomes: Vec<Option<Outcome>>,
}

impl<'a> Attributes<'a> {
    /// Direct lookups, no cache (and no allocation).
    pub(super) const fn new(context: &'a Context) -> Self {
        Self {
            context,
            cache: Vec::new(),
            lowered: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    /// Lookups cached in `slots` slots (the number of distinct names compiled), and outcomes
    /// in `conditions` slots (the number of distinct conditions compiled).
    pub(super) fn cached(context: &'a Context, slots: usize, conditions: usize) -> Self {
        Self {
            context,
            cache: vec![None; slots],
            lowered: vec![None; slots + 2],
            outcomes: vec![None; conditions],
        }
    }

    pub(super) const fn context(&self) -> &'a Context {
        self.context
    }

    fn get(&mut self, attribute: &Attribute) -> Option<Value<'a>> {
        let context = self.context;
        let lookup = |name: &str| {
            context.attributes.get(name).map(|v| match v {
                AttributeValue::String(s) => Value::Str(s),
                AttributeValue::Number(n) => Value::Number(*n),
                AttributeValue::Bool(b) => Value::Bool(*b),
            })
        };
        match attribute {
            Attribute::Id => context.id.as_deref().map(Value::Str),
            Attribute::Email => context.email.as_deref().map(Value::Str),
            Attribute::Custom { name, slot } => match self.cache.get_mut(*slot) {
                Some(Some(cached)) => *cached,
                Some(empty) => *empty.insert(lookup(name)),
                None => lookup(name),
            },
        }
    }
}

impl<'a> Attributes<'a> {
    /// Calls `f` with `String(value).toLowerCase()`, where `value` is what [`Self::get`] gave
    /// for `attribute`: computed once per context when caching.
    fn with_lowered<R>(
        &mut self,
        attribute: &Attribute,
        value: Value<'a>,
        f: impl FnOnce(&str) -> R,
    ) -> R {
        let custom = self.cache.len();
        let slot = match attribute {
            Attribute::Custom { slot, .. } => *slot,
            Attribute::Id => custom,
            Attribute::Email => custom + 1,
        };
        match self.lowered.get_mut(slot) {
            Some(entry) => f(entry.get_or_insert_with(|| lowercase(value))),
            None => value.with_str(|s| js::with_lowercase(s, f)),
        }
    }
}

/// `String(value).toLowerCase()`, borrowing when nothing changes.
fn lowercase(value: Value<'_>) -> Cow<'_, str> {
    match value {
        Value::Str(s) if s.is_ascii() && !s.bytes().any(|b| b.is_ascii_uppercase()) => {
            Cow::Borrowed(s)
        }
        Value::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
        other => Cow::Owned(other.with_str(|s| js::with_lowercase(s, str::to_owned))),
    }
}

/// An attribute value as read from the context, borrowed.
#[derive(Clone, Copy, Debug)]
enum Value<'a> {
    Str(&'a str),
    Number(f64),
    Bool(bool),
}

impl Value<'_> {
    /// Calls `f` with `String(value)` as JavaScript renders it.
    fn with_str<R>(self, f: impl FnOnce(&str) -> R) -> R {
        match self {
            Self::Str(s) => f(s),
            Self::Bool(b) => f(if b { "true" } else { "false" }),
            Self::Number(n) => {
                let mut buf = StackStr::new();
                if js::write_number(&mut buf, n).is_ok() {
                    f(buf.as_str())
                } else {
                    // Unreachable in practice: every f64 fits the buffer.
                    let mut s = String::new();
                    let _ = js::write_number(&mut s, n);
                    f(&s)
                }
            }
        }
    }

    /// `parseFloat(String(value))`.
    fn parse_float(self) -> f64 {
        match self {
            // `String(n)` round-trips exactly, so no string is needed.
            Self::Number(n) => n,
            Self::Bool(_) => f64::NAN,
            Self::Str(s) => js::parse_float(s),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum StrOp {
    Equals,
    NotEquals,
    Contains,
    NotContains,
    StartsWith,
    EndsWith,
}

#[derive(Clone, Copy, Debug)]
enum NumOp {
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Clone, Copy, Debug)]
enum SemverOp {
    Gt,
    Lt,
    Eq,
}

#[derive(Clone, Debug)]
enum Op {
    IsSet,
    IsNotSet,
    /// A string comparison against the lower-cased condition value.
    Str(StrOp, String),
    /// `in` / `not_in` (`negated`): the trimmed, lower-cased list items, sorted for lookup.
    In {
        items: Vec<String>,
        negated: bool,
    },
    /// A numeric comparison; `None` when `parseFloat(condition.value)` is `NaN`.
    Num(NumOp, Option<f64>),
    Regex(JsRegex),
    /// A version comparison; `None` when the condition's version does not parse.
    Semver(SemverOp, Option<Vec<f64>>),
    /// An operator the SDKs do not know: never matches.
    Unknown,
}

/// A condition ready to be matched.
#[derive(Clone, Debug)]
pub(super) struct CompiledCondition {
    attribute: Attribute,
    op: Op,
    /// The condition's memo slot: its index in the rules' table of distinct conditions (see
    /// [`Attributes::cached`]).
    memo: usize,
}

impl CompiledCondition {
    /// Compiles `condition`; never fails (problems surface when the condition is matched).
    /// `slots` gives each distinct custom attribute name a cache slot.
    pub(super) fn compile(condition: &Condition, slots: &mut BTreeMap<String, usize>) -> Self {
        let attribute = match condition.attribute.as_str() {
            "id" => Attribute::Id,
            "email" => Attribute::Email,
            other => {
                let next = slots.len();
                let slot = *slots.entry(other.to_owned()).or_insert(next);
                Attribute::Custom {
                    name: other.to_owned(),
                    slot,
                }
            }
        };
        let value = condition.value.as_str();
        let lower = || value.to_lowercase();
        let in_list = |negated| {
            let mut items: Vec<String> = value
                .split(',')
                .map(|item| js::trim(item).to_lowercase())
                .collect();
            items.sort_unstable();
            items.dedup();
            Op::In { items, negated }
        };
        let number = || {
            let n = js::parse_float(value);
            (!n.is_nan()).then_some(n)
        };
        let op = match condition.operator.as_str() {
            "is_set" => Op::IsSet,
            "is_not_set" => Op::IsNotSet,
            // The short names are the Go SDK's aliases.
            "equals" | "eq" => Op::Str(StrOp::Equals, lower()),
            "not_equals" | "neq" => Op::Str(StrOp::NotEquals, lower()),
            "contains" => Op::Str(StrOp::Contains, lower()),
            "not_contains" => Op::Str(StrOp::NotContains, lower()),
            "starts_with" => Op::Str(StrOp::StartsWith, lower()),
            "ends_with" => Op::Str(StrOp::EndsWith, lower()),
            "in" => in_list(false),
            "not_in" => in_list(true),
            "greater_than" | "gt" => Op::Num(NumOp::Gt, number()),
            "greater_equal" | "gte" => Op::Num(NumOp::Ge, number()),
            "less_than" | "lt" => Op::Num(NumOp::Lt, number()),
            "less_equal" | "lte" => Op::Num(NumOp::Le, number()),
            "regex" => Op::Regex(js::compile_regex(value)),
            "semver_gt" => Op::Semver(SemverOp::Gt, parse_version(value)),
            "semver_lt" => Op::Semver(SemverOp::Lt, parse_version(value)),
            "semver_eq" => Op::Semver(SemverOp::Eq, parse_version(value)),
            _ => Op::Unknown,
        };
        Self {
            attribute,
            op,
            memo: 0,
        }
    }

    /// Gives the condition its memo slot (its index in the rules' condition table).
    pub(super) const fn with_memo(mut self, memo: usize) -> Self {
        self.memo = memo;
        self
    }

    /// [`Self::matches`], remembered per context in the condition's memo slot when caching.
    pub(super) fn matches_memo(&self, attributes: &mut Attributes<'_>) -> Outcome {
        if let Some(Some(outcome)) = attributes.outcomes.get(self.memo) {
            return *outcome;
        }
        let outcome = self.matches(attributes);
        if let Some(slot) = attributes.outcomes.get_mut(self.memo) {
            *slot = Some(outcome);
        }
        outcome
    }

    /// Matches the condition against the context `attributes` reads.
    pub(super) fn matches(&self, attributes: &mut Attributes<'_>) -> Outcome {
        let value = attributes.get(&self.attribute);
        // `attrValue !== undefined && attrValue !== ""`: 0 and false are set.
        let value = value.filter(|v| !matches!(v, Value::Str("")));
        let value = match (&self.op, value) {
            (Op::IsSet, v) => return v.is_some().into(),
            (Op::IsNotSet, v) => return v.is_none().into(),
            (_, None) => return Outcome::NoMatch,
            (_, Some(v)) => v,
        };
        match &self.op {
            Op::IsSet | Op::IsNotSet | Op::Unknown => Outcome::NoMatch,
            Op::Str(op, expected) => attributes
                .with_lowered(&self.attribute, value, |actual| {
                    str_op(*op, actual, expected)
                })
                .into(),
            Op::In { items, negated } => {
                let found = attributes
                    .with_lowered(&self.attribute, value, |actual| list_has(items, actual));
                (found != *negated).into()
            }
            Op::Num(op, expected) => {
                let Some(b) = *expected else {
                    return Outcome::NoMatch;
                };
                let a = value.parse_float();
                if a.is_nan() {
                    return Outcome::NoMatch;
                }
                match op {
                    NumOp::Gt => a > b,
                    NumOp::Ge => a >= b,
                    NumOp::Lt => a < b,
                    NumOp::Le => a <= b,
                }
                .into()
            }
            // The regex sees the attribute as it is, not lower-cased.
            Op::Regex(JsRegex::Compiled(re)) => value.with_str(|s| re.is_match(s)).into(),
            Op::Regex(JsRegex::JsSyntaxError) => Outcome::NoMatch,
            Op::Regex(JsRegex::Unsupported) => Outcome::Malformed,
            Op::Semver(op, expected) => {
                let Some(expected) = expected else {
                    return Outcome::NoMatch;
                };
                let Some(ordering) = value.with_str(|s| compare_version(s, expected)) else {
                    return Outcome::NoMatch;
                };
                match op {
                    SemverOp::Gt => ordering == Ordering::Greater,
                    SemverOp::Lt => ordering == Ordering::Less,
                    SemverOp::Eq => ordering == Ordering::Equal,
                }
                .into()
            }
        }
    }
}

/// Whether the sorted `items` contain `actual`. Short lists are scanned comparing lengths
/// first, which is cheaper than a binary search's string comparisons.
fn list_has(items: &[String], actual: &str) -> bool {
    if items.len() <= 8 {
        items
            .iter()
            .any(|item| item.len() == actual.len() && item == actual)
    } else {
        items
            .binary_search_by(|item| item.as_str().cmp(actual))
            .is_ok()
    }
}

fn str_op(op: StrOp, actual: &str, expected: &str) -> bool {
    match op {
        StrOp::Equals => actual == expected,
        StrOp::NotEquals => actual != expected,
        StrOp::Contains => actual.contains(expected),
        StrOp::NotContains => !actual.contains(expected),
        StrOp::StartsWith => actual.starts_with(expected),
        StrOp::EndsWith => actual.ends_with(expected),
    }
}

/// The parts of a version as `evaluate.ts` `parseVersion` reads it: one leading lower-case `v`
/// removed, split on `.`, each part through `parseInt(p, 10)` (so `3-beta` is 3), and no version
/// at all when any part has no leading digit.
fn version_parts(version: &str) -> impl Iterator<Item = Option<f64>> + '_ {
    let clean = version.strip_prefix('v').unwrap_or(version);
    clean.split('.').map(js::parse_int)
}

fn parse_version(version: &str) -> Option<Vec<f64>> {
    version_parts(version).collect()
}

/// Compares `actual` with an already parsed version, padding the shorter one with zeros;
/// `None` when `actual` is not a version. Allocates nothing.
fn compare_version(actual: &str, expected: &[f64]) -> Option<Ordering> {
    let mut ordering = Ordering::Equal;
    let mut count = 0;
    for (i, part) in version_parts(actual).enumerate() {
        // Every part must parse, even after the comparison is decided.
        let a = part?;
        count = i + 1;
        if ordering == Ordering::Equal {
            let b = expected.get(i).copied().unwrap_or(0.0);
            ordering = a.partial_cmp(&b).unwrap_or(Ordering::Equal);
        }
    }
    if ordering == Ordering::Equal {
        for &b in expected.iter().skip(count) {
            ordering = 0.0_f64.partial_cmp(&b).unwrap_or(Ordering::Equal);
            if ordering != Ordering::Equal {
                break;
            }
        }
    }
    Some(ordering)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ctx(attrs: &[(&str, AttributeValue)]) -> Context {
        Context {
            id: Some("user-1".into()),
            email: Some("Alice@Example.com".into()),
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn s(v: &str) -> AttributeValue {
        AttributeValue::String(v.into())
    }

    fn n(v: f64) -> AttributeValue {
        AttributeValue::Number(v)
    }

    /// Matches `attr <operator> value` against a context whose attribute `a` is `attr`
    /// (`None`: missing).
    fn check(operator: &str, value: &str, attr: Option<AttributeValue>) -> Outcome {
        let condition = Condition {
            attribute: "a".into(),
            operator: operator.into(),
            value: value.into(),
        };
        let context = match attr {
            Some(v) => ctx(&[("a", v)]),
            None => ctx(&[]),
        };
        matches(
            &CompiledCondition::compile(&condition, &mut BTreeMap::new()),
            &context,
        )
    }

    /// Matches once without and once with the attribute cache; both must agree.
    fn matches(condition: &CompiledCondition, context: &Context) -> Outcome {
        let direct = condition.matches(&mut Attributes::new(context));
        let mut cached = Attributes::cached(context, 1, 1);
        assert_eq!(condition.matches_memo(&mut cached), direct);
        assert_eq!(
            condition.matches_memo(&mut cached),
            direct,
            "from the cache"
        );
        assert_eq!(
            condition.matches(&mut cached),
            direct,
            "lowered from the cache"
        );
        direct
    }

    /// Rows of (operator, condition value, attribute, expected match).
    fn run(table: &[(&str, &str, Option<AttributeValue>, bool)]) {
        for (operator, value, attr, expected) in table {
            let got = check(operator, value, attr.clone());
            assert_eq!(
                got,
                Outcome::from(*expected),
                "{attr:?} {operator} {value:?}"
            );
        }
    }

    #[test]
    fn equality_operators_compare_case_insensitively() {
        run(&[
            ("equals", "pro", Some(s("pro")), true),
            ("equals", "PRO", Some(s("pro")), true),
            ("equals", "pro", Some(s("Pro")), true),
            ("equals", "pro", Some(s("pro ")), false),
            ("equals", "pro", Some(s("team")), false),
            ("equals", "ÉCOLE", Some(s("école")), true),
            ("equals", "42", Some(n(42.0)), true),
            ("equals", "42.0", Some(n(42.0)), false),
            ("equals", "true", Some(AttributeValue::Bool(true)), true),
            ("equals", "TRUE", Some(AttributeValue::Bool(true)), true),
            ("equals", "false", Some(AttributeValue::Bool(false)), true),
            ("equals", "", Some(s("x")), false),
            ("equals", "pro", None, false),
            ("equals", "", Some(s("")), false),
            ("not_equals", "pro", Some(s("team")), true),
            ("not_equals", "pro", Some(s("PRO")), false),
            // A missing attribute fails not_equals too.
            ("not_equals", "pro", None, false),
            ("not_equals", "pro", Some(s("")), false),
            // Go aliases.
            ("eq", "Pro", Some(s("pRO")), true),
            ("eq", "pro", Some(s("team")), false),
            ("neq", "pro", Some(s("team")), true),
            ("neq", "pro", Some(s("Pro")), false),
            // Case matters in operator names.
            ("EQUALS", "pro", Some(s("pro")), false),
        ]);
    }

    #[test]
    fn substring_operators() {
        run(&[
            ("contains", "EXAMPLE", Some(s("bob@example.com")), true),
            ("contains", "xyz", Some(s("bob@example.com")), false),
            ("contains", "", Some(s("bob")), true),
            ("contains", "a", None, false),
            ("not_contains", "xyz", Some(s("bob@example.com")), true),
            ("not_contains", "Example", Some(s("bob@example.com")), false),
            ("not_contains", "xyz", None, false),
            ("starts_with", "BOB", Some(s("bob@example.com")), true),
            ("starts_with", "example", Some(s("bob@example.com")), false),
            ("starts_with", "4", Some(n(42.0)), true),
            ("ends_with", ".COM", Some(s("bob@Example.com")), true),
            ("ends_with", ".org", Some(s("bob@example.com")), false),
            ("ends_with", "com", Some(s("")), false),
            ("ends_with", "com", None, false),
            ("contains", "ß", Some(s("STRASSE")), false),
            ("contains", "straße", Some(s("STRAßE")), true),
        ]);
    }

    #[test]
    fn in_lists_are_comma_separated_trimmed_and_case_insensitive() {
        run(&[
            ("in", "pro,team", Some(s("pro")), true),
            ("in", "pro, team ,enterprise", Some(s("team")), true),
            ("in", " PRO , Team", Some(s("team")), true),
            ("in", "pro,team", Some(s("TEAM")), true),
            ("in", "pro,team", Some(s("free")), false),
            // The attribute itself is not trimmed.
            ("in", "pro,team", Some(s(" pro")), false),
            ("in", "pro,\u{A0}team\u{FEFF}", Some(s("team")), true),
            ("in", "1,2,3", Some(n(2.0)), true),
            ("in", "true", Some(AttributeValue::Bool(true)), true),
            ("in", "pro", None, false),
            // An empty item can never equal a set attribute.
            ("in", "pro,,team", Some(s("")), false),
            ("in", "", Some(s("x")), false),
            ("not_in", "pro,team", Some(s("free")), true),
            ("not_in", "pro, team", Some(s("Team")), false),
            ("not_in", "pro", None, false),
            ("not_in", "pro", Some(s("")), false),
        ]);
        // Long lists are binary-searched.
        let long: Vec<String> = (0..50).map(|i| format!("Item-{i}")).collect();
        let long = long.join(", ");
        for (attr, expected) in [
            ("item-0", true),
            ("ITEM-49", true),
            ("item-23", true),
            ("item-50", false),
        ] {
            assert_eq!(
                check("in", &long, Some(s(attr))),
                Outcome::from(expected),
                "{attr}"
            );
            assert_eq!(
                check("not_in", &long, Some(s(attr))),
                Outcome::from(!expected),
                "{attr}"
            );
        }
    }

    #[test]
    fn numeric_operators_use_parse_float() {
        run(&[
            ("greater_than", "18", Some(n(21.0)), true),
            ("greater_than", "18", Some(n(18.0)), false),
            ("greater_than", "18", Some(s("21")), true),
            ("greater_than", "18", Some(s("21years")), true),
            ("greater_than", "18abc", Some(s("19")), true),
            ("greater_than", "18", Some(s(" 19")), true),
            ("greater_than", "1e1", Some(s("11")), true),
            ("greater_than", ".5", Some(s("0.6")), true),
            ("greater_than", "18", Some(s("abc")), false),
            ("greater_than", "abc", Some(n(21.0)), false),
            ("greater_than", "", Some(n(21.0)), false),
            (
                "greater_than",
                "18",
                Some(AttributeValue::Bool(true)),
                false,
            ),
            ("greater_than", "18", None, false),
            ("greater_than", "18", Some(s("")), false),
            ("greater_than", "1e3", Some(s("Infinity")), true),
            ("greater_than", "0", Some(s("-Infinity")), false),
            ("greater_than", "0x10", Some(s("1")), true),
            ("greater_equal", "18", Some(n(18.0)), true),
            ("greater_equal", "18.5", Some(n(18.0)), false),
            ("less_than", "18", Some(n(17.9)), true),
            ("less_than", "18", Some(n(18.0)), false),
            ("less_equal", "18", Some(n(18.0)), true),
            ("less_equal", "-1", Some(n(0.0)), false),
            ("less_equal", "0", Some(n(-0.0)), true),
            // Go aliases.
            ("gt", "18", Some(n(19.0)), true),
            ("gte", "18", Some(n(18.0)), true),
            ("lt", "18", Some(n(19.0)), false),
            ("lte", "18", Some(s("18")), true),
        ]);
    }

    #[test]
    fn regex_matches_the_raw_attribute_unanchored() {
        run(&[
            (
                "regex",
                "^[a-z]+@example\\.com$",
                Some(s("bob@example.com")),
                true,
            ),
            ("regex", "example", Some(s("bob@EXAMPLE.com")), false),
            ("regex", "example", Some(s("bob@example.com")), true),
            ("regex", "^4\\d$", Some(n(42.0)), true),
            ("regex", "^true$", Some(AttributeValue::Bool(true)), true),
            ("regex", "x", None, false),
            ("regex", "^$", Some(s("")), false),
            // JavaScript rejects the pattern: the condition is false.
            ("regex", "[a-", Some(s("a")), false),
        ]);
        // Valid JavaScript the engine cannot run.
        assert_eq!(check("regex", "(?=a)a", Some(s("a"))), Outcome::Malformed);
        // ... but only when reached: a missing attribute fails first.
        assert_eq!(check("regex", "(?=a)a", None), Outcome::NoMatch);
    }

    #[test]
    fn semver_operators_parse_like_parse_int() {
        run(&[
            ("semver_gt", "1.2.3", Some(s("1.2.4")), true),
            ("semver_gt", "1.2.3", Some(s("1.2.3")), false),
            ("semver_gt", "1.2.3", Some(s("1.10.0")), true),
            ("semver_gt", "1.2.3", Some(s("v1.3")), true),
            ("semver_gt", "v1.2", Some(s("1.2.0.1")), true),
            ("semver_gt", "1.2", Some(s("2")), true),
            ("semver_lt", "2.0.0", Some(s("1.9.9")), true),
            ("semver_lt", "2.0.0", Some(s("2.0.0")), false),
            ("semver_lt", "2", Some(s("1.99")), true),
            ("semver_eq", "1.2.0", Some(s("1.2")), true),
            ("semver_eq", "1.2.0", Some(s("v1.2.0")), true),
            ("semver_eq", "1.2.3", Some(s("1.2.4")), false),
            // `parseInt` reads leading digits: "3-beta" is 3, pre-release tags are ignored.
            ("semver_eq", "1.2.3", Some(s("1.2.3-beta")), true),
            ("semver_eq", "1.2.3", Some(s("1.2.3-beta.1")), false),
            ("semver_gt", "1.2.3", Some(s("1.2.3-beta.1")), true),
            ("semver_eq", "1.2.3", Some(s("1.2.3+build")), true),
            ("semver_eq", "1. 2", Some(s("1.2")), true),
            // Only one lower-case `v` is removed.
            ("semver_eq", "1.2", Some(s("V1.2")), false),
            ("semver_eq", "1.2", Some(s("vv1.2")), false),
            // Any part without a leading digit makes it "not a version" (even if the
            // comparison is already decided by an earlier part).
            ("semver_gt", "1.0", Some(s("2.x")), false),
            ("semver_lt", "3.0", Some(s("2..0")), false),
            ("semver_gt", "1.0", Some(s("abc")), false),
            ("semver_gt", "abc", Some(s("1.0")), false),
            ("semver_gt", "", Some(s("1.0")), false),
            ("semver_eq", "1.5", Some(n(1.5)), true),
            ("semver_eq", "1", Some(AttributeValue::Bool(true)), false),
            ("semver_gt", "1.0", None, false),
            ("semver_gt", "1.0", Some(s("")), false),
            // Negative parts compare numerically.
            ("semver_lt", "0.0", Some(s("-1.0")), true),
        ]);
    }

    #[test]
    fn set_operators_and_unknown_operators() {
        run(&[
            ("is_set", "", Some(s("x")), true),
            ("is_set", "", Some(n(0.0)), true),
            ("is_set", "", Some(AttributeValue::Bool(false)), true),
            ("is_set", "", Some(s("")), false),
            ("is_set", "", None, false),
            ("is_not_set", "", None, true),
            ("is_not_set", "", Some(s("")), true),
            ("is_not_set", "", Some(s(" ")), false),
            ("is_not_set", "", Some(n(0.0)), false),
            ("unknown_op", "x", Some(s("x")), false),
            ("unknown_op", "x", None, false),
            ("", "x", Some(s("x")), false),
            ("semver_gte", "1.0", Some(s("2.0")), false),
        ]);
    }

    #[test]
    fn id_and_email_are_read_from_the_context_fields_only() {
        let compile = |attribute: &str, operator: &str, value: &str| {
            CompiledCondition::compile(
                &Condition {
                    attribute: attribute.into(),
                    operator: operator.into(),
                    value: value.into(),
                },
                &mut BTreeMap::new(),
            )
        };
        let mut context = ctx(&[("id", s("other")), ("email", s("other@x.y"))]);
        assert_eq!(
            matches(&compile("id", "equals", "USER-1"), &context),
            Outcome::Match
        );
        assert_eq!(
            matches(&compile("id", "equals", "other"), &context),
            Outcome::NoMatch
        );
        assert_eq!(
            matches(&compile("email", "ends_with", "@example.com"), &context),
            Outcome::Match
        );
        context.email = None;
        // No fallback to `attributes.email`, as in evaluate.ts.
        assert_eq!(
            matches(&compile("email", "is_set", ""), &context),
            Outcome::NoMatch
        );
        context.id = Some(String::new());
        assert_eq!(
            matches(&compile("id", "is_not_set", ""), &context),
            Outcome::Match
        );
        // `userId` is an ordinary attribute name.
        assert_eq!(
            matches(&compile("userId", "is_set", ""), &context),
            Outcome::NoMatch
        );
    }

    #[test]
    fn number_attributes_render_like_javascript() {
        let render = |v: Value<'_>| v.with_str(str::to_owned);
        assert_eq!(render(Value::Number(1e21)), "1e+21");
        assert_eq!(render(Value::Number(0.1)), "0.1");
        assert_eq!(render(Value::Bool(false)), "false");
        run(&[
            ("equals", "1e+21", Some(n(1e21)), true),
            ("contains", "e-7", Some(n(1.5e-7)), true),
            ("equals", "100", Some(n(100.0)), true),
        ]);
    }
}
