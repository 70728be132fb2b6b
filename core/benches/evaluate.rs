//! Evaluation cost: 100 flags of 3 rules × 3 conditions each, evaluated for one context.
//!
//! `evaluate_all` gives the borrowed [`rollgate_proxy_core::eval::Evaluation`] the per-user
//! renderers serialise; `..._to_owned_maps` adds building the owned `EvaluatedFlags` maps.
//!
//! Throughput is reported per flag (criterion's "elem/s"); the time per iteration divided by
//! 100 is the cost of one flag evaluation.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rollgate_proxy_core::eval::CompiledRules;
use rollgate_proxy_core::model::{
    AttributeValue, Condition, Context, FlagRule, RulesPayload, TargetingRule,
};

const FLAGS: usize = 100;

fn condition(attribute: &str, operator: &str, value: impl Into<String>) -> Condition {
    Condition {
        attribute: attribute.into(),
        operator: operator.into(),
        value: value.into(),
    }
}

fn rule(id: String, rollout: i64, conditions: Vec<Condition>) -> TargetingRule {
    TargetingRule {
        id,
        name: None,
        enabled: true,
        rollout,
        conditions,
    }
}

/// Flag `i`: rules 0 and 1 pass two conditions and fail on the third; rule 2 matches for even
/// flags (with a partial rollout on most, so the hash runs) and fails on its last condition for
/// odd ones, which then fall through to a partial rollout. Every third flag uses a regex.
fn flag(i: usize) -> FlagRule {
    let email_check = if i.is_multiple_of(3) {
        condition("email", "regex", r"^[a-z.]+@example\.com$")
    } else {
        condition("email", "ends_with", "@EXAMPLE.com")
    };
    let rollout = i64::try_from(i * 7 % 101).unwrap_or(50);
    FlagRule {
        enabled: true,
        rollout,
        target_users: vec![format!("vip-{i}"), "vip-ops".into()],
        rules: vec![
            rule(
                format!("r{i}-0"),
                100,
                vec![
                    condition("country", "in", "us, ca, gb, de, fr"),
                    email_check,
                    condition("plan", "equals", "enterprise"),
                ],
            ),
            rule(
                format!("r{i}-1"),
                100,
                vec![
                    condition("age", "greater_than", (i % 30).to_string()),
                    condition("email", "starts_with", "alice"),
                    condition("beta", "equals", "false"),
                ],
            ),
            rule(
                format!("r{i}-2"),
                rollout,
                vec![
                    condition("plan", "in", "pro,team"),
                    condition("country", "equals", "DE"),
                    condition(
                        "id",
                        "starts_with",
                        if i.is_multiple_of(2) {
                            "user-"
                        } else {
                            "admin-"
                        },
                    ),
                ],
            ),
        ],
    }
}

fn payload() -> RulesPayload {
    RulesPayload {
        version: "bench".into(),
        flags: (0..FLAGS)
            .map(|i| (format!("flag-{i:03}"), flag(i)))
            .collect(),
    }
}

fn context() -> Context {
    Context {
        id: Some("user-4821".into()),
        email: Some("alice.smith@example.com".into()),
        attributes: BTreeMap::from([
            ("age".into(), AttributeValue::Number(34.0)),
            ("beta".into(), AttributeValue::Bool(true)),
            ("country".into(), AttributeValue::String("de".into())),
            ("plan".into(), AttributeValue::String("Pro".into())),
        ]),
    }
}

fn bench(c: &mut Criterion) {
    let payload = payload();
    let rules = CompiledRules::compile(&payload);
    let context = context();
    let keys: Vec<String> = payload.flags.keys().cloned().collect();

    let mut group = c.benchmark_group("evaluate");
    group.throughput(Throughput::Elements(FLAGS as u64));
    group.bench_function("evaluate_each_of_100_flags", |b| {
        b.iter(|| {
            let mut on = 0u32;
            for key in &keys {
                on += u32::from(rules.evaluate(black_box(key), black_box(&context)).value);
            }
            on
        });
    });
    group.bench_function("evaluate_all_100_flags", |b| {
        b.iter(|| rules.evaluate_all(black_box(&context)));
    });
    group.bench_function("evaluate_all_100_flags_to_owned_maps", |b| {
        b.iter(|| rules.evaluate_all(black_box(&context)).to_flags());
    });
    group.bench_function("evaluate_all_100_flags_anonymous", |b| {
        b.iter(|| rules.evaluate_all(black_box(&Context::anonymous())));
    });
    group.bench_function("compile_100_flags", |b| {
        b.iter(|| CompiledRules::compile(black_box(&payload)));
    });
    group.finish();

    // The mix above, for the record: how many flags are on, and how many were decided by each
    // kind of reason.
    let all = rules.evaluate_all(&context);
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for flag in all.iter() {
        *kinds.entry(flag.reason.kind.as_str()).or_default() += 1;
    }
    let on = all.iter().filter(|f| f.value).count();
    println!("mix: {on}/{FLAGS} flags on; reasons {kinds:?}");
}

criterion_group!(benches, bench);
criterion_main!(benches);
