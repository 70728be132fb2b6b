//! The shipped monitoring (deploy/monitoring/: Grafana dashboard, Prometheus alert rules) only
//! queries metrics a running proxy exports, and the key-rejected signal tells a wrong key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollgate_proxy_tests::target::{ProxyConfig, ProxyHandle};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![scenario!(dashboard_and_alerts_use_only_exported_metrics)]
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .join(path)
}

/// Every `rollgate_proxy_*` name in `text`, histogram suffixes folded into the family name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("rollgate_proxy_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        // The bare prefix is prose ("metrics prefix rollgate_proxy_"), not a name.
        if family.len() > "rollgate_proxy_".len() {
            names.insert(family.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The value of the unlabelled sample `name` in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn metrics_text(proxy: &ProxyHandle) -> String {
    let resp = must_get(&proxy.url("/api/metrics")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.text()
}

async fn dashboard_and_alerts_use_only_exported_metrics() {
    if !target().is_process() {
        println!("(skipped on this target: the shipped dashboard is for the native server)");
        return;
    }
    let dashboard = std::fs::read_to_string(repo_file("deploy/monitoring/grafana-dashboard.json"))
        .expect("the dashboard");
    let alerts =
        std::fs::read_to_string(repo_file("deploy/monitoring/alerts.yml")).expect("the rules");
    let wanted: BTreeSet<String> = metric_names(&dashboard)
        .into_iter()
        .chain(metric_names(&alerts))
        .collect();
    assert!(wanted.len() >= 15, "{wanted:?}");

    // Evaluated mode with traffic on every kind of route and stream, an overflowing events
    // buffer, and a per-user fetch.
    let env = Env::basic().await;
    let mut client = sse(&env.url("/api/stream")).await;
    next_event(&mut client, Duration::from_secs(10)).await;
    must_get(&env.url("/api/flags")).await.expect_json(200);
    must_get(&env.url("/api/flags?user_id=u-metrics")).await;
    let events = format!("{{\"events\":[{}{{}}]}}", "{},".repeat(10_000));
    must_post(&env.url("/api/v1/sdk/events"), events)
        .await
        .expect_json(200);
    env.mock.set_flag("metrics-change", true);
    event_where(&mut client, Duration::from_secs(10), |e| {
        e.json().is_ok_and(|v| v["metrics-change"] == true)
    })
    .await;
    // Local mode: local rules evaluations.
    let local = start_proxy(ProxyConfig {
        flags_file: Some(repo_file("examples/flags.json")),
        ..ProxyConfig::default()
    })
    .await;
    wait_ready(&local).await;
    must_get(&local.url("/api/flags?user_id=u-1&attr.plan=pro"))
        .await
        .expect_json(200);
    // A proxy whose key Rollgate refuses.
    let refused = start_proxy(ProxyConfig::upstream(
        env.mock.base_url(),
        "rg_server_wrong-key",
    ))
    .await;
    let refused_url = refused.url("/api/metrics");
    let refused_text = eventually("the key-rejected gauge", Duration::from_secs(15), || {
        let url = refused_url.clone();
        async move {
            let text = get(&url).await.ok()?.text();
            (sample(&text, "rollgate_proxy_upstream_key_rejected") == Some(1.0)).then_some(text)
        }
    })
    .await;

    let good = metrics_text(&env.proxy).await;
    assert_eq!(
        sample(&good, "rollgate_proxy_upstream_key_rejected"),
        Some(0.0),
        "{good}"
    );
    assert_eq!(
        sample(&refused_text, "rollgate_proxy_snapshot_revision"),
        Some(0.0)
    );
    // Several environments (--config): the reload counters; with a snapshot file, what it
    // holds (the persistence gauge and counter are absent without one).
    let dir = rollgate_proxy_tests::target::TempDir::new("monitoring").expect("temp dir");
    let file = dir.join("environments.toml");
    std::fs::write(
        &file,
        format!(
            "[environments.one]\nserver_key = \"{SERVER_KEY}\"\nbase_url = \"{}\"\nclient_keys = [\"ck-one\"]\n",
            env.mock.base_url()
        ),
    )
    .expect("write the environments file");
    let several = start_proxy(
        ProxyConfig {
            snapshot_file: Some(dir.join("snapshot.json")),
            ..ProxyConfig::default()
        }
        .setting("ROLLGATE_PROXY_CONFIG", file.display().to_string()),
    )
    .await;
    wait_ready(&several).await;
    let several_url = several.url("/api/metrics");
    let several_text = eventually("the persisted revision", Duration::from_secs(30), || {
        let url = several_url.clone();
        async move {
            let text = get(&url).await.ok()?.text();
            text.lines()
                .any(|line| line.starts_with("rollgate_proxy_snapshot_persisted_revision{"))
                .then_some(text)
        }
    })
    .await;
    let exported: BTreeSet<String> = [good, metrics_text(&local).await, refused_text, several_text]
        .iter()
        .flat_map(|text| metric_names(text))
        .collect();
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard or alerts query metrics no proxy exports: {missing:?}\nexported: {exported:?}"
    );
}
