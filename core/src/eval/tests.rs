//! Tests of the evaluator: rollout vectors, precedence, reasons, the golden fixture produced by
//! the official evaluators, and property tests.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::*;
use crate::model::{AttributeValue, Condition, TargetingRule};

fn payload(json: &str) -> RulesPayload {
    RulesPayload::from_json(json.as_bytes()).unwrap()
}

fn user(id: &str) -> Context {
    Context::with_id(id)
}

fn with_attrs(id: Option<&str>, attrs: &[(&str, AttributeValue)]) -> Context {
    Context {
        id: id.map(str::to_owned),
        email: None,
        attributes: attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::String(v.into())
}

fn fallthrough(in_rollout: bool) -> Detail {
    Detail::new(
        in_rollout,
        Reason {
            in_rollout: Some(in_rollout),
            ..Reason::new(ReasonKind::Fallthrough)
        },
    )
}

fn rule_match(id: &str, index: u32, in_rollout: bool) -> Detail {
    Detail::new(
        in_rollout,
        Reason {
            rule_id: Some(id.into()),
            rule_index: Some(index),
            in_rollout: Some(in_rollout),
            ..Reason::new(ReasonKind::RuleMatch)
        },
    )
}

#[test]
fn rollout_vectors_from_the_protocol_doc() {
    // (flagKey, userId, sha256[0:4], SDK bucket) from protocol doc §3.5.
    let table = [
        ("rollout-50", "consistent-user-123", "34042853", 99),
        ("rollout-50", "user-1", "1205287c", 32),
        ("my-feature", "user-123", "b9387591", 73),
        ("rollout-10", "user-1", "e22376a4", 48),
    ];
    for (key, id, prefix, bucket) in table {
        let digest = Sha256::digest(format!("{key}:{id}").as_bytes());
        let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, prefix, "{key}:{id}");
        assert_eq!(rollout_bucket(key, id), bucket, "{key}:{id}");
        assert!(!is_in_rollout(key, id, i64::from(bucket)));
        assert!(is_in_rollout(key, id, i64::from(bucket) + 1));
    }
}

#[test]
fn rollout_thresholds() {
    // Bucket 99: in only at 100 and above.
    assert!(!is_in_rollout("rollout-50", "consistent-user-123", 99));
    assert!(is_in_rollout("rollout-50", "consistent-user-123", 100));
    assert!(is_in_rollout("rollout-50", "consistent-user-123", i64::MAX));
    assert!(!is_in_rollout("rollout-50", "user-1", 0));
    assert!(!is_in_rollout("rollout-50", "user-1", i64::MIN));
    // Multi-byte keys and ids are hashed as UTF-8.
    let digest = Sha256::digest("flag-é:ユーザー".as_bytes());
    let expected = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % 100;
    assert_eq!(rollout_bucket("flag-é", "ユーザー"), expected);
}

#[test]
fn fallthrough_uses_the_flag_rollout() {
    let rules = CompiledRules::compile(&payload(
        r#"{"version":"3","flags":{
            "rollout-50":{"enabled":true,"rollout":50},
            "rollout-10":{"enabled":true,"rollout":10},
            "my-feature":{"enabled":true,"rollout":50},
            "everyone":{"enabled":true,"rollout":100},
            "no-one":{"enabled":true,"rollout":0},
            "over":{"enabled":true,"rollout":150},
            "under":{"enabled":true,"rollout":-5}}}"#,
    ));
    let table = [
        (
            "rollout-50",
            user("consistent-user-123"),
            fallthrough(false),
        ),
        ("rollout-50", user("user-1"), fallthrough(true)),
        ("rollout-10", user("user-1"), fallthrough(false)),
        ("my-feature", user("user-123"), fallthrough(false)),
        ("everyone", user("user-1"), fallthrough(true)),
        ("everyone", Context::anonymous(), fallthrough(true)),
        ("over", Context::anonymous(), fallthrough(true)),
        ("no-one", user("user-1"), fallthrough(false)),
        ("under", user("user-1"), fallthrough(false)),
        // No user id (or an empty one): a partial rollout is false.
        ("rollout-50", Context::anonymous(), fallthrough(false)),
        ("rollout-50", user(""), fallthrough(false)),
        (
            "rollout-50",
            with_attrs(None, &[("plan", s("pro"))]),
            fallthrough(false),
        ),
    ];
    for (key, context, expected) in table {
        assert_eq!(
            rules.evaluate(key, &context),
            expected,
            "{key} for {context:?}"
        );
    }
    assert_eq!(rules.version(), "3");
    assert_eq!(rules.len(), 7);
    assert!(!rules.is_empty());
    assert!(rules.contains("no-one"));
    assert!(!rules.contains("missing"));
}

const PRECEDENCE: &str = r#"{"version":"v1","flags":{
    "off":{"enabled":false,"rollout":100,"targetUsers":["vip"],
        "rules":[{"id":"r","enabled":true,"rollout":100,
                  "conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]}]},
    "ordered":{"enabled":true,"rollout":0,"targetUsers":["vip"],
        "rules":[
            {"id":"disabled","enabled":false,"rollout":100,
             "conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]},
            {"id":"empty","enabled":true,"rollout":100,"conditions":[]},
            {"id":"pro-eu","enabled":true,"rollout":100,
             "conditions":[{"attribute":"plan","operator":"equals","value":"pro"},
                           {"attribute":"region","operator":"equals","value":"eu"}]},
            {"id":"pro","enabled":true,"rollout":0,
             "conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]},
            {"id":"half","enabled":true,"rollout":50,
             "conditions":[{"attribute":"plan","operator":"is_set","value":""}]},
            {"id":"nobody","enabled":true,"rollout":100,
             "conditions":[{"attribute":"email","operator":"is_not_set","value":""}]}]}}}"#;

#[test]
fn precedence_off_target_rules_fallthrough() {
    let rules = CompiledRules::compile(&payload(PRECEDENCE));
    let pro = |id: Option<&str>, region: &str| {
        with_attrs(id, &[("plan", s("pro")), ("region", s(region))])
    };
    let table = [
        // OFF beats a target and a matching rule.
        (
            "off",
            user("vip"),
            Detail::new(false, Reason::new(ReasonKind::Off)),
        ),
        (
            "off",
            pro(Some("u"), "eu"),
            Detail::new(false, Reason::new(ReasonKind::Off)),
        ),
        // A target beats matching rules (rule "pro" would say false).
        (
            "ordered",
            pro(Some("vip"), "us"),
            Detail::new(true, Reason::new(ReasonKind::TargetMatch)),
        ),
        // Disabled rule 0 and empty rule 1 are skipped; rule 2 matches: ruleIndex is 2.
        (
            "ordered",
            pro(Some("u"), "EU"),
            rule_match("pro-eu", 2, true),
        ),
        // Rule 2 fails on region; rule 3 matches with rollout 0.
        ("ordered", pro(Some("u"), "us"), rule_match("pro", 3, false)),
        // Rule 4 is a 50 % rollout: the hash decides.
        (
            "ordered",
            with_attrs(Some("user-1"), &[("plan", s("free"))]),
            rule_match("half", 4, is_in_rollout("ordered", "user-1", 50)),
        ),
        // Rule 5 (`email` is not set) catches any non-anonymous context.
        ("ordered", user("u"), rule_match("nobody", 5, true)),
        // An anonymous context skips the rules entirely, like the SDKs' null user.
        ("ordered", Context::anonymous(), fallthrough(false)),
        // A context with an email matches nothing: fallthrough at 0 %.
        (
            "ordered",
            Context {
                email: Some("a@b.c".into()),
                ..user("u")
            },
            fallthrough(false),
        ),
        // No id: a partial rule rollout is false (Node would hash "ordered:undefined").
        (
            "ordered",
            with_attrs(None, &[("plan", s("free"))]),
            rule_match("half", 4, false),
        ),
        // An empty id is hashed as "ordered:" by every SDK.
        (
            "ordered",
            with_attrs(Some(""), &[("plan", s("free"))]),
            rule_match("half", 4, is_in_rollout("ordered", "", 50)),
        ),
        // An empty id is never a target.
        (
            "ordered",
            with_attrs(Some(""), &[]),
            rule_match("nobody", 5, true),
        ),
    ];
    for (key, context, expected) in table {
        assert_eq!(
            rules.evaluate(key, &context),
            expected,
            "{key} for {context:?}"
        );
    }
}

#[test]
fn reasons_serialize_with_exact_fields() {
    let rules = CompiledRules::compile(&payload(PRECEDENCE));
    let context = with_attrs(Some("u"), &[("plan", s("pro")), ("region", s("us"))]);
    let all = rules.evaluate_all(&context).to_flags();
    assert_eq!(
        serde_json::to_string(&all).unwrap(),
        r#"{"flags":{"off":false,"ordered":false},"reasons":{"off":{"kind":"OFF"},"ordered":{"kind":"RULE_MATCH","ruleId":"pro","ruleIndex":3,"inRollout":false}}}"#
    );
    let anonymous = rules.evaluate_all(&Context::anonymous()).to_flags();
    assert_eq!(
        serde_json::to_string(&anonymous.reasons["ordered"]).unwrap(),
        r#"{"kind":"FALLTHROUGH","inRollout":false}"#
    );
    let target = rules.evaluate("ordered", &user("vip"));
    assert_eq!(
        serde_json::to_string(&target.reason).unwrap(),
        r#"{"kind":"TARGET_MATCH"}"#
    );
}

#[test]
fn unknown_flag_is_flag_not_found() {
    let rules = CompiledRules::compile(&payload(PRECEDENCE));
    let detail = rules.evaluate("missing", &user("u"));
    assert_eq!(
        detail,
        Detail::new(false, Reason::error(ErrorKind::FlagNotFound))
    );
    assert_eq!(
        serde_json::to_string(&detail.reason).unwrap(),
        r#"{"kind":"ERROR","errorKind":"FLAG_NOT_FOUND"}"#
    );
    let empty = CompiledRules::compile(&RulesPayload::default());
    assert!(empty.is_empty());
    assert_eq!(empty.len(), 0);
    assert_eq!(
        empty.evaluate_all(&user("u")).to_flags(),
        EvaluatedFlags::default()
    );
}

#[test]
fn unsupported_regex_is_malformed_when_reached() {
    let rules = CompiledRules::compile(&payload(
        r#"{"flags":{"f":{"enabled":true,"rollout":100,"rules":[
            {"id":"gate","enabled":true,"rollout":100,
             "conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]},
            {"id":"look","enabled":true,"rollout":100,
             "conditions":[{"attribute":"plan","operator":"equals","value":"team"},
                           {"attribute":"email","operator":"regex","value":"^(?!admin)"}]}]},
            "g":{"enabled":true,"rollout":100}}}"#,
    ));
    let malformed = Detail::new(false, Reason::error(ErrorKind::MalformedFlag));
    let team = |email: Option<&str>| Context {
        email: email.map(str::to_owned),
        ..with_attrs(Some("u"), &[("plan", s("team"))])
    };
    // Reached: the earlier condition matched and the attribute is set.
    assert_eq!(rules.evaluate("f", &team(Some("bob@x.y"))), malformed);
    // Not reached: an earlier rule decides, an earlier condition fails, or the attribute is unset.
    assert_eq!(
        rules.evaluate("f", &with_attrs(Some("u"), &[("plan", s("pro"))])),
        rule_match("gate", 0, true)
    );
    assert_eq!(
        rules.evaluate("f", &with_attrs(Some("u"), &[("plan", s("free"))])),
        fallthrough(true)
    );
    assert_eq!(rules.evaluate("f", &team(None)), fallthrough(true));
    // Other flags are unaffected.
    let all = rules.evaluate_all(&team(Some("bob@x.y"))).to_flags();
    assert_eq!(
        all.flags,
        BTreeMap::from([("f".into(), false), ("g".into(), true)])
    );
    assert_eq!(
        serde_json::to_string(&all.reasons["f"]).unwrap(),
        r#"{"kind":"ERROR","errorKind":"MALFORMED_FLAG"}"#
    );
}

#[test]
fn compiled_rules_keep_their_payload_and_duplicate_targets() {
    let source = payload(
        r#"{"version":"9","flags":{"f":{"enabled":true,"rollout":0,"targetUsers":["b","a","b"]}}}"#,
    );
    let rules = CompiledRules::compile(&source);
    let kept = RulesPayload::from_json(rules.payload_json().as_bytes()).unwrap();
    assert_eq!(kept, source);
    let target = Detail::new(true, Reason::new(ReasonKind::TargetMatch));
    assert_eq!(rules.evaluate("f", &user("b")), target);
    assert_eq!(rules.evaluate("f", &user("a")), target);
    assert_eq!(rules.evaluate("f", &user("c")), fallthrough(false));
    // Target ids are compared exactly.
    assert_eq!(rules.evaluate("f", &user("A")), fallthrough(false));
}

#[test]
fn identical_conditions_are_compiled_once_and_shared() {
    let source = payload(
        r#"{"version":"1","flags":{
            "a":{"enabled":true,"rollout":0,"rules":[
                {"id":"pro","enabled":true,"rollout":100,"conditions":[{"attribute":"plan","operator":"equals","value":"Pro"}]}]},
            "b":{"enabled":true,"rollout":0,"rules":[
                {"id":"pro-eu","enabled":true,"rollout":100,"conditions":[
                    {"attribute":"plan","operator":"equals","value":"Pro"},
                    {"attribute":"region","operator":"in","value":"eu, uk"}]}]},
            "c":{"enabled":true,"rollout":0,"rules":[
                {"id":"eu","enabled":true,"rollout":100,"conditions":[{"attribute":"region","operator":"in","value":"eu, uk"}]},
                {"id":"free","enabled":true,"rollout":100,"conditions":[{"attribute":"plan","operator":"equals","value":"free"}]}]}}}"#,
    );
    for rules in [
        CompiledRules::compile(&source),
        CompiledRules::from_json(serde_json::to_string(&source).unwrap().as_bytes()).unwrap(),
    ] {
        // Three distinct conditions among five uses.
        assert_eq!(rules.conditions.len(), 3);
        let pro_in_us = with_attrs(Some("u"), &[("plan", s("pro")), ("region", s("us"))]);
        let all = rules.evaluate_all(&pro_in_us).to_flags();
        assert_eq!(all.reasons["a"], rule_match("pro", 0, true).reason);
        assert_eq!(all.reasons["b"], fallthrough(false).reason);
        assert_eq!(all.reasons["c"], fallthrough(false).reason);
        // The same table evaluated for another context: no outcome carried over.
        let free_in_uk = with_attrs(Some("u"), &[("plan", s("free")), ("region", s("UK"))]);
        let all = rules.evaluate_all(&free_in_uk).to_flags();
        assert_eq!(all.reasons["a"], fallthrough(false).reason);
        assert_eq!(all.reasons["b"], fallthrough(false).reason);
        assert_eq!(all.reasons["c"], rule_match("eu", 0, true).reason);
        for key in ["a", "b", "c"] {
            assert_eq!(rules.evaluate(key, &free_in_uk).reason, all.reasons[key]);
        }
    }
}

#[test]
fn keys_json_escapes_are_found_and_rendered_as_given() {
    // Keys from a payload built in code are not checked: one that JSON escapes keeps its own
    // copy, and every other key is read from its JSON form.
    let mut source = payload(r#"{"version":"1","flags":{"plain":{"enabled":true,"rollout":100}}}"#);
    let odd = "quo\"te\\back\u{1}slash";
    source
        .flags
        .insert(odd.to_owned(), source.flags["plain"].clone());
    let rules = CompiledRules::compile(&source);
    assert!(rules.contains(odd));
    assert!(rules.contains("plain"));
    assert!(!rules.contains("quo"));
    let all = rules.evaluate_all(&Context::anonymous());
    let keys: Vec<&str> = all.iter().map(|flag| flag.key).collect();
    assert_eq!(keys, vec!["plain", odd]);
    let mut values = Vec::new();
    all.write_values(&mut values);
    assert_eq!(values, serde_json::to_vec(&all.to_flags().flags).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Golden fixture: results of the official evaluators (see core/tests/data/gen-eval-vectors.py).

#[derive(serde::Deserialize)]
struct Fixture {
    groups: Vec<Group>,
}

#[derive(serde::Deserialize)]
struct Group {
    name: String,
    payload: serde_json::Value,
    contexts: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    context: Option<Context>,
    expected: BTreeMap<String, ExpectedDetail>,
    #[serde(default)]
    node: BTreeMap<String, ExpectedDetail>,
    #[serde(default)]
    divergence: Option<String>,
}

#[derive(serde::Deserialize, PartialEq, Debug)]
struct ExpectedDetail {
    value: bool,
    reason: Reason,
}

#[test]
fn golden_vectors_from_the_official_evaluators() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("../../tests/data/eval-vectors.json")).unwrap();
    let mut checked = 0;
    for group in &fixture.groups {
        let bytes = serde_json::to_vec(&group.payload).unwrap();
        let rules = CompiledRules::compile(&RulesPayload::from_json(&bytes).unwrap());
        for case in &group.contexts {
            let context = case.context.clone().unwrap_or_default();
            let all = rules.evaluate_all(&context).to_flags();
            assert_eq!(
                all.flags.len(),
                case.expected.len(),
                "{}/{}",
                group.name,
                case.name
            );
            for (key, expected) in &case.expected {
                let got = rules.evaluate(key, &context);
                let label = format!("{} / {} / {key}", group.name, case.name);
                assert_eq!(got.value, expected.value, "{label}");
                assert_eq!(got.reason, expected.reason, "{label}");
                assert_eq!(all.flags[key], expected.value, "{label}");
                assert_eq!(all.reasons[key], expected.reason, "{label}");
                checked += 1;
            }
            // Every disagreement with Node is an explained, deliberate divergence.
            assert!(
                case.node.is_empty() || case.divergence.is_some(),
                "{}/{} differs from Node without a reason",
                group.name,
                case.name
            );
            for key in case.node.keys() {
                assert_ne!(case.node.get(key), case.expected.get(key), "{key}");
            }
        }
    }
    assert!(checked > 500, "only {checked} vectors checked");
}

// ---------------------------------------------------------------------------------------------
// Property tests.

const OPERATORS: &[&str] = &[
    "equals",
    "not_equals",
    "contains",
    "not_contains",
    "starts_with",
    "ends_with",
    "in",
    "not_in",
    "greater_than",
    "greater_equal",
    "less_than",
    "less_equal",
    "regex",
    "semver_gt",
    "semver_lt",
    "semver_eq",
    "is_set",
    "is_not_set",
    "eq",
    "neq",
    "gt",
    "gte",
    "lt",
    "lte",
    "bogus",
    "",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-cA-C0-9 ,.v+-]{0,8}",
        "[\\\\()\\[\\]{}?*+.^$|<=!:0-9a-dDwWsSbBkpPu-]{0,12}",
        any::<String>(),
        Just(String::new()),
        Just("1.2.3".to_owned()),
        Just("12abc".to_owned()),
    ]
}

fn attribute_value() -> impl Strategy<Value = AttributeValue> {
    prop_oneof![
        text().prop_map(AttributeValue::String),
        any::<f64>().prop_map(AttributeValue::Number),
        any::<bool>().prop_map(AttributeValue::Bool),
    ]
}

fn condition() -> impl Strategy<Value = Condition> {
    (
        prop::sample::select(vec!["id", "email", "a", "b", "userId"]),
        prop::sample::select(OPERATORS),
        text(),
    )
        .prop_map(|(attribute, operator, value)| Condition {
            attribute: attribute.into(),
            operator: operator.into(),
            value,
        })
}

fn targeting_rule() -> impl Strategy<Value = TargetingRule> {
    (
        "[a-z0-9]{0,4}",
        any::<bool>(),
        -10i64..120,
        prop::collection::vec(condition(), 0..4),
    )
        .prop_map(|(id, enabled, rollout, conditions)| TargetingRule {
            id,
            name: None,
            enabled,
            rollout,
            conditions,
        })
}

fn flag_rule() -> impl Strategy<Value = FlagRule> {
    (
        any::<bool>(),
        prop_oneof![-10i64..120, any::<i64>()],
        prop::collection::vec("[a-c]{0,2}", 0..3),
        prop::collection::vec(targeting_rule(), 0..4),
    )
        .prop_map(|(enabled, rollout, target_users, rules)| FlagRule {
            enabled,
            rollout,
            target_users,
            rules,
        })
}

fn rules_payload() -> impl Strategy<Value = RulesPayload> {
    (
        any::<String>(),
        prop::collection::btree_map(any::<String>(), flag_rule(), 0..4),
    )
        .prop_map(|(version, flags)| RulesPayload { version, flags })
}

fn context() -> impl Strategy<Value = Context> {
    (
        prop::option::of(prop_oneof!["[a-c]{0,2}", any::<String>()]),
        prop::option::of(text()),
        prop::collection::btree_map(
            prop::sample::select(vec!["a", "b", "id", "email"]).prop_map(str::to_owned),
            attribute_value(),
            0..3,
        ),
    )
        .prop_map(|(id, email, attributes)| Context {
            id,
            email,
            attributes,
        })
}

/// The one-block fast path of the bucket is SHA-256 exactly, on both sides of the boundary
/// where the message stops fitting one block (55 bytes with the padding and the length).
#[test]
fn one_block_bucket_is_the_hashers_at_every_length() {
    for key_len in 0..70 {
        for id_len in [0, 1, 7, 20, 40, 54, 55, 56, 64, 100] {
            let key = "k".repeat(key_len);
            let id = "é".repeat(id_len / 2) + &"u".repeat(id_len % 2);
            assert_eq!(
                rollout_bucket(&key, &id),
                rollout_bucket_reference(&key, &id),
                "{key_len} + {id_len}"
            );
        }
    }
}

proptest! {
    #[test]
    fn bucket_is_below_100(key in any::<String>(), id in any::<String>()) {
        prop_assert!(rollout_bucket(&key, &id) < 100);
    }

    #[test]
    fn fast_bucket_is_the_hashers(
        key in any::<String>(),
        id in any::<String>(),
        short_key in "[a-z0-9_.-]{0,40}",
        short_id in "[a-zA-Z0-9@.-]{0,24}",
    ) {
        prop_assert_eq!(rollout_bucket(&key, &id), rollout_bucket_reference(&key, &id));
        prop_assert_eq!(
            rollout_bucket(&short_key, &short_id),
            rollout_bucket_reference(&short_key, &short_id)
        );
    }

    /// The renderers' concatenation of pre-rendered key fragments gives the serializer's
    /// bytes for random rules (keys needing escapes included) and random contexts.
    #[test]
    fn fast_renderers_write_the_reference_bytes(
        payload in rules_payload(),
        context in context(),
        millis in 0u64..4_000_000_000_000,
    ) {
        let rules = CompiledRules::compile(&payload);
        let evaluation = rules.evaluate_all(&context);
        let at = crate::time::Timestamp::from_millis(millis);
        prop_assert_eq!(
            crate::render::evaluation_flags_body(&evaluation, at),
            crate::render::reference_evaluation_flags_body(&evaluation, at)
        );
        for with_reasons in [false, true] {
            prop_assert_eq!(
                crate::render::evaluation_sdk_flags_body(&evaluation, with_reasons),
                crate::render::reference_evaluation_sdk_flags_body(&evaluation, with_reasons)
            );
        }
    }

    #[test]
    fn rollout_is_monotonic(key in any::<String>(), id in any::<String>(), p in -5i64..110, q in -5i64..110) {
        let (low, high) = if p <= q { (p, q) } else { (q, p) };
        if is_in_rollout(&key, &id, low) {
            prop_assert!(is_in_rollout(&key, &id, high));
        }
    }

    #[test]
    fn evaluate_never_panics_and_agrees_with_evaluate_all(
        payload in rules_payload(),
        context in context(),
        probe in any::<String>(),
    ) {
        let rules = CompiledRules::compile(&payload);
        let all = rules.evaluate_all(&context).to_flags();
        prop_assert_eq!(all.flags.len(), payload.flags.len());
        for key in payload.flags.keys() {
            let detail = rules.evaluate(key, &context);
            prop_assert_eq!(all.flags[key], detail.value);
            prop_assert_eq!(&all.reasons[key], &detail.reason);
            // `inRollout`, where present, is the value.
            if let Some(in_rollout) = detail.reason.in_rollout {
                prop_assert_eq!(in_rollout, detail.value);
            }
            if !payload.flags[key].enabled {
                prop_assert_eq!(detail.reason.kind, ReasonKind::Off);
            }
        }
        if !payload.flags.contains_key(&probe) {
            prop_assert_eq!(
                rules.evaluate(&probe, &context),
                Detail::new(false, Reason::error(ErrorKind::FlagNotFound))
            );
        }
    }
}

/// The renderers serialise the borrowed evaluation directly; the bytes must be those of the
/// owned maps (values, and reasons of every kind: rule ids, indexes, rollouts, errors).
#[test]
fn borrowed_evaluation_renders_exactly_as_the_owned_maps() {
    let rules = CompiledRules::compile(&payload(
        r#"{"flags":{
            "a-off":{"enabled":false},
            "b-target":{"enabled":true,"targetUsers":["u1"]},
            "c-rule":{"enabled":true,"rules":[
                {"id":"skip","enabled":true,"rollout":100,"conditions":[{"attribute":"plan","operator":"equals","value":"free"}]},
                {"id":"r\"1","enabled":true,"rollout":40,"conditions":[{"attribute":"plan","operator":"equals","value":"PRO"}]}]},
            "d-bad":{"enabled":true,"rules":[{"id":"x","enabled":true,"rollout":100,"conditions":[{"attribute":"plan","operator":"regex","value":"(?=p)"}]}]},
            "e-fall":{"enabled":true,"rollout":50},
            "f-same":{"enabled":true,"rules":[{"id":"twin","enabled":true,"rollout":100,"conditions":[{"attribute":"plan","operator":"equals","value":"PRO"}]}]}
        }}"#,
    ));
    for context in [
        with_attrs(Some("u1"), &[("plan", s("Pro"))]),
        with_attrs(Some("u2"), &[("plan", s("free"))]),
        with_attrs(None, &[("plan", s("pro"))]),
        Context::anonymous(),
    ] {
        let evaluation = rules.evaluate_all(&context);
        let owned = evaluation.to_flags();
        assert_eq!(evaluation.len(), owned.flags.len());
        for flag in evaluation.iter() {
            // Memoised conditions agree with the uncached evaluation of each flag.
            let detail = rules.evaluate(flag.key, &context);
            assert_eq!(
                (flag.value, flag.reason.to_reason()),
                (detail.value, detail.reason)
            );
            assert_eq!(evaluation.get(flag.key), Some(flag));
        }
        let at = crate::time::Timestamp::ZERO;
        assert_eq!(
            crate::render::evaluation_flags_body(&evaluation, at),
            crate::render::flags_body(&owned, at)
        );
        for with_reasons in [false, true] {
            assert_eq!(
                crate::render::evaluation_sdk_flags_body(&evaluation, with_reasons),
                crate::render::sdk_flags_body(&owned, with_reasons)
            );
        }
    }
}

#[test]
fn one_pass_compile_matches_the_typed_parse_and_refuses_alike() {
    let text = br#"{"version":7,"flags":{"z":{"enabled":true,"rollout":50.0},"a":{"enabled":false},"\u0062":{"enabled":true,"targetUsers":["u"],"rules":[{"id":"r","enabled":true,"rollout":100,"conditions":[{"attribute":"plan","operator":"in","value":["Pro","free"]}]}]},"a":{"enabled":true,"rollout":100}}}"#;
    let typed = CompiledRules::compile(&RulesPayload::from_json(text).unwrap());
    let one_pass = CompiledRules::from_json(text).unwrap();
    assert_eq!(one_pass.payload_json(), typed.payload_json());
    assert_eq!(one_pass.version(), "7");
    // The later duplicate "a" won; "\u0062" is "b".
    for key in ["a", "b", "z"] {
        for context in [Context::anonymous(), user("u")] {
            assert_eq!(
                one_pass.evaluate(key, &context),
                typed.evaluate(key, &context)
            );
        }
    }
    assert!(one_pass.evaluate("a", &Context::anonymous()).value);

    type Expected = fn(&ModelError) -> bool;
    let refused: [(&[u8], Expected); 4] = [
        // An earlier duplicate must still parse, as in the typed map.
        (br#"{"flags":{"a":{"rules":"x"},"a":{}}}"#, |e| {
            matches!(e, ModelError::Json(_))
        }),
        (br#"{"flags":{"a b":{}}}"#, |e| {
            matches!(e, ModelError::InvalidKey { .. })
        }),
        (br#"{"flags":[]}"#, |e| {
            matches!(e, ModelError::MissingFlags)
        }),
        (br#"{"flags":{"a":{}},"#, |e| {
            matches!(e, ModelError::Json(_))
        }),
    ];
    for (text, expected) in refused {
        let typed = RulesPayload::from_json(text).unwrap_err();
        let one_pass = CompiledRules::from_json(text).unwrap_err();
        assert!(
            expected(&typed) && expected(&one_pass),
            "{typed} / {one_pass}"
        );
    }
}

#[test]
fn flag_entries_borrow_keys_unless_escaped() {
    let text = r#"{"plain":{},"b\u0062":{}}"#;
    let entries = serde_json::from_str::<FlagEntries<'_>>(text).unwrap().0;
    let keys: Vec<(&str, bool)> = entries
        .iter()
        .map(|(Key(key), _)| (key.as_ref(), matches!(key, std::borrow::Cow::Borrowed(_))))
        .collect();
    assert_eq!(keys, vec![("plain", true), ("bb", false)]);
}
