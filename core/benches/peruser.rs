//! A per-user poll in rules mode through the dispatcher, as an adapter makes it: query parsing,
//! the rendered-answer cache, evaluation of 95 flags × 3 rules × 3 conditions, the body and
//! the ETag (`bench/run.sh peruser`'s flag set and query, without HTTP).
//!
//! `different_user` sends a new `user_id` on every iteration (every answer is a miss);
//! `same_user` polls again with one user (every answer is a cache hit).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rollgate_proxy_core::downstream::{Answer, Downstream, Request};
use rollgate_proxy_core::model::{Condition, FlagRule, RulesPayload, TargetingRule};
use rollgate_proxy_core::settings::Settings;
use rollgate_proxy_core::snapshot::{FlagSource, Freshness, Revision, Snapshot};
use rollgate_proxy_core::time::Timestamp;

/// `bench/run.sh`'s set: 95 flags, each with three rules of three conditions, rollouts 30/50.
fn payload() -> RulesPayload {
    let condition = |attribute: &str, operator: &str, value: String| Condition {
        attribute: attribute.into(),
        operator: operator.into(),
        value,
    };
    let flags: BTreeMap<String, FlagRule> = (0..95)
        .map(|i| {
            let rules = (0..3)
                .map(|j| TargetingRule {
                    id: format!("r{j}"),
                    name: Some(format!("rule {j}")),
                    enabled: true,
                    rollout: 50,
                    conditions: vec![
                        condition("plan", "equals", format!("plan-{j}")),
                        condition("country", "in", "NL,DE,FR".into()),
                        condition("email", "ends_with", format!("@c{j}.example")),
                    ],
                })
                .collect();
            let flag = FlagRule {
                enabled: true,
                rollout: 30,
                target_users: Vec::new(),
                rules,
            };
            (format!("flag-{i:03}"), flag)
        })
        .collect();
    RulesPayload {
        version: "bench".into(),
        flags,
    }
}

fn status(answer: Answer) -> u16 {
    match answer {
        Answer::Respond(response) => response.status,
        _ => 0,
    }
}

fn bench(c: &mut Criterion) {
    let settings = Settings::from_lookup(|_| None, 1).expect("default settings");
    let downstream = Downstream::new(settings);
    let snapshot = Arc::new(Snapshot::build(
        Revision::new(1),
        Timestamp::from_millis(1_000),
        FlagSource::rules(&payload()),
    ));
    let now = Timestamp::from_millis(5_000);
    let poll = |query: &str| {
        let request = Request {
            method: "GET",
            path: "/api/flags",
            query,
            ..Request::default()
        };
        status(downstream.handle(now, &request, Some(&snapshot), Freshness::Fresh, 0.5))
    };
    let mut group = c.benchmark_group("peruser_95_flags");
    let mut user = 0u64;
    let mut query = String::new();
    group.bench_function("different_user", |b| {
        b.iter(|| {
            user += 1;
            query.clear();
            query.push_str("user_id=u-");
            query.push_str(&user.to_string());
            query.push_str("&attr.plan=plan-1&attr.country=NL&email=a%40c1.example");
            poll(black_box(&query))
        });
    });
    let same = "user_id=u-42&attr.plan=plan-1&attr.country=NL&email=a%40c1.example";
    group.bench_function("same_user", |b| b.iter(|| poll(black_box(same))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
