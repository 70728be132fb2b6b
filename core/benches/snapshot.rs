//! Snapshot builds of a 2,000-flag set: what one upstream change costs, the share of it spent
//! compressing the polling bodies (the `compression` feature), and parsing the `rules-full`
//! event that brings such a set in rules mode.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rollgate_proxy_core::encoding::Variants;
use rollgate_proxy_core::model::{EvaluatedFlags, RulesPayload};
use rollgate_proxy_core::snapshot::{FlagSource, Revision, Snapshot};
use rollgate_proxy_core::time::Timestamp;

mod fixtures;
use fixtures::rules_full;

/// 2,000 flags with keys like real ones (team, area, variant, number) and a reason each.
fn large_set() -> EvaluatedFlags {
    const TEAMS: [&str; 8] = [
        "checkout", "search", "payments", "growth", "mobile", "platform", "ads", "infra",
    ];
    const WORDS: [&str; 8] = [
        "new-ui",
        "rollout",
        "beta",
        "experiment",
        "killswitch",
        "migration",
        "v2",
        "dark-launch",
    ];
    let mut flags = Vec::new();
    let mut reasons = Vec::new();
    for i in 0..2000 {
        let key = format!(
            "{}-{}-{}-{i}",
            TEAMS[i % 8],
            WORDS[(i / 8) % 8],
            WORDS[(i * 7 + 3) % 8]
        );
        flags.push(format!("\"{key}\":{}", i % 3 == 0));
        let reason = match i % 3 {
            0 => r#"{"kind":"FALLTHROUGH"}"#.to_owned(),
            1 => r#"{"kind":"OFF"}"#.to_owned(),
            _ => format!(r#"{{"kind":"RULE_MATCH","ruleId":"rule-{i}","ruleIndex":0}}"#),
        };
        reasons.push(format!("\"{key}\":{reason}"));
    }
    let json = format!(
        r#"{{"flags":{{{}}},"reasons":{{{}}}}}"#,
        flags.join(","),
        reasons.join(",")
    );
    EvaluatedFlags::from_json(json.as_bytes()).expect("valid flags")
}

fn build(c: &mut Criterion) {
    let flags = large_set();
    let snapshot = Snapshot::build(
        Revision::new(1),
        Timestamp::ZERO,
        FlagSource::Evaluated(flags.clone()),
    );
    let bodies = [
        snapshot.flags_body().clone(),
        snapshot.sdk_body(false).clone(),
        snapshot.sdk_body(true).clone(),
    ];
    let mut group = c.benchmark_group("snapshot_2000_flags");
    group.sample_size(20);
    group.bench_function("build", |b| {
        b.iter(|| {
            let snapshot = Snapshot::build(
                Revision::new(1),
                Timestamp::ZERO,
                FlagSource::Evaluated(black_box(flags.clone())),
            );
            // Everything a server renders for it (each once, on first use).
            snapshot.flags_body_variants();
            snapshot.sdk_body_variants(false);
            snapshot.sdk_body_variants(true);
            snapshot.flags_frame();
            snapshot.init_frame();
            snapshot
        });
    });
    group.bench_function("compress_three_bodies", |b| {
        b.iter(|| {
            bodies
                .iter()
                .map(|body| Variants::compress(black_box(body)).len())
                .sum::<usize>()
        });
    });
    let rules = rules_full();
    group.bench_function("parse_rules_full", |b| {
        b.iter(|| RulesPayload::from_json(black_box(rules.as_bytes())).map(|r| r.flags.len()));
    });
    // A whole change from the event's bytes: the rules (typed payload then compile, or the
    // one-pass parse and compile the upstream uses), the snapshot (its content hash and
    // anonymous values) and its persisted form.
    let change = |source: FlagSource| {
        let snapshot = Snapshot::build(Revision::new(2), Timestamp::ZERO, source);
        snapshot.to_persisted(None).len()
    };
    group.bench_function("rules_full_change/typed", |b| {
        b.iter(|| {
            RulesPayload::from_json(black_box(rules.as_bytes()))
                .map(|p| change(FlagSource::rules(&p)))
        });
    });
    group.bench_function("rules_full_change/one_pass", |b| {
        b.iter(|| FlagSource::rules_from_json(black_box(rules.as_bytes())).map(change));
    });
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
