//! Several environments in one deployment: three mock upstreams behind one proxy, routed by
//! client key; one upstream down leaves the others fresh; the environments file reloads
//! without a restart (added, removed, rotated keys that expire).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rollgate_proxy_tests::mock::{MockConfig, MockUpstream};
use rollgate_proxy_tests::target::{ProxyConfig, ProxyHandle, TempDir};
use serde_json::Value;

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![scenario!(
        three_environments_route_by_key_fail_alone_and_reload
    )]
}

/// One environment of the test: its upstream, its key, the flag only it serves.
struct Upstream {
    name: &'static str,
    mock: MockUpstream,
    server_key: String,
    marker: String,
}

async fn upstream(name: &'static str) -> Upstream {
    let server_key = format!("rg_server_{name}-e2e");
    let mock = MockUpstream::start(MockConfig::basic().api_key(server_key.clone()))
        .await
        .expect("mock starts");
    let marker = format!("only-{name}");
    mock.set_flag(marker.clone(), true);
    Upstream {
        name,
        mock,
        server_key,
        marker,
    }
}

fn client_key(name: &str) -> String {
    format!("ck-{name}-7d1e")
}

/// An environment's table; `keys` is the TOML of its `client_keys` array.
fn table(up: &Upstream, keys: &str) -> String {
    format!(
        "[environments.{}]\nserver_key = \"{}\"\nbase_url = \"{}\"\nclient_keys = {keys}\n\n",
        up.name,
        up.server_key,
        up.mock.base_url()
    )
}

fn write(path: &Path, text: &str) {
    // Written whole then renamed, so the watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// RFC 3339 (UTC, seconds) of `at`.
fn rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

async fn flags_with(proxy: &ProxyHandle, path: &str, key: &str) -> Resp {
    send(http().get(proxy.url(path)).bearer_auth(key))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:?}"))
}

/// Waits until `key` is served `flag` = true.
async fn wait_flag(proxy: &ProxyHandle, key: &str, flag: &str) {
    eventually(
        &format!("{flag} served to {key}"),
        Duration::from_secs(15),
        || async {
            let resp = flags_with(proxy, "/api/flags", key).await;
            (resp.status == 200 && resp.json()["flags"][flag] == true).then_some(())
        },
    )
    .await;
}

async fn wait_status(proxy: &ProxyHandle, key: &str, status: u16) -> Resp {
    eventually(
        &format!("{status} for a client key"),
        Duration::from_secs(60),
        || async {
            let resp = flags_with(proxy, "/api/flags", key).await;
            (resp.status == status).then_some(resp)
        },
    )
    .await
}

fn announces(event: &Value, key: &str) -> bool {
    event[key] == true || event["flags"][key] == true
}

/// The same environments as the Worker's `ROLLGATE_PROXY_ENVIRONMENTS` (JSON); beta's old key
/// expires at `expires`.
fn environments_json(ups: &[Upstream], beta_new: &str, expires: &str) -> String {
    let mut environments = serde_json::Map::new();
    for up in ups {
        let keys = if up.name == "beta" {
            serde_json::json!([beta_new, {"key": client_key("beta"), "expires": expires}])
        } else {
            serde_json::json!([client_key(up.name)])
        };
        environments.insert(
            up.name.to_owned(),
            serde_json::json!({
                "server_key": up.server_key,
                "base_url": up.mock.base_url(),
                "client_keys": keys,
            }),
        );
    }
    serde_json::json!({ "environments": environments }).to_string()
}

async fn three_environments_route_by_key_fail_alone_and_reload() {
    let native = target().is_process();
    let ups = [
        upstream("alpha").await,
        upstream("beta").await,
        upstream("gamma").await,
    ];
    let dir = TempDir::new("environments").expect("temp dir");
    let config = dir.join("environments.toml");
    let beta_new = "ck-beta-rotated-91c2";
    let base = ProxyConfig {
        refresh_interval: Some(Duration::from_secs(2)),
        ..ProxyConfig::default()
    };
    let proxy = if native {
        let mut text = String::new();
        for up in &ups {
            text.push_str(&table(up, &format!("[\"{}\"]", client_key(up.name))));
        }
        write(&config, &text);
        start_proxy(base.setting("ROLLGATE_PROXY_CONFIG", config.display().to_string())).await
    } else {
        // The Worker reads its environments once: beta's old key expires a while after start.
        let expires = rfc3339(SystemTime::now() + Duration::from_secs(45));
        start_proxy(base.setting(
            "ROLLGATE_PROXY_ENVIRONMENTS",
            environments_json(&ups, beta_new, &expires),
        ))
        .await
    };
    // Three environments each fetch their first data: a longer bound than one proxy's.
    let ready = proxy.url("/ready");
    eventually("every environment ready", Duration::from_secs(45), || {
        let url = ready.clone();
        async move { (get(&url).await.ok()?.status == 200).then_some(()) }
    })
    .await;
    if !native {
        // Rotation on the Worker: the new key and the old one side by side (the old one until
        // it expires, checked at the end).
        wait_flag(&proxy, beta_new, "only-beta").await;
        wait_flag(&proxy, &client_key("beta"), "only-beta").await;
    }

    // Each key sees its environment's flags only.
    for up in &ups {
        let flags = flags_with(&proxy, "/api/flags", &client_key(up.name))
            .await
            .expect_json(200)["flags"]
            .clone();
        for other in &ups {
            let expected = if other.name == up.name {
                Value::Bool(true)
            } else {
                Value::Null
            };
            assert_eq!(flags[&other.marker], expected, "{} sees {flags}", up.name);
        }
    }
    // No key, an unknown key, a key of another environment under a prefix: 401; an unknown
    // environment: 404; the prefix with the right key serves.
    assert_eq!(must_get(&proxy.url("/api/flags")).await.status, 401);
    assert_eq!(
        flags_with(&proxy, "/api/flags", "ck-nobody").await.status,
        401
    );
    assert_eq!(
        flags_with(&proxy, "/env/beta/api/flags", &client_key("alpha"))
            .await
            .status,
        401
    );
    assert_eq!(
        flags_with(&proxy, "/env/nope/api/flags", &client_key("alpha"))
            .await
            .status,
        404
    );
    // The demo page under an environment's prefix (its own requests then carry it too).
    let page = must_get(&proxy.url("/env/beta/")).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("env-select"), "{}", page.text());
    assert_eq!(must_get(&proxy.url("/env/nope/")).await.status, 404);
    let prefixed = flags_with(&proxy, "/env/beta/api/flags", &client_key("beta"))
        .await
        .expect_json(200);
    assert_eq!(prefixed["flags"]["only-beta"], true);

    // Exactly one upstream stream per environment.
    for up in &ups {
        up.mock
            .wait_for_open_streams(1, Duration::from_secs(10))
            .await
            .expect("each environment holds its stream");
    }
    // Clients of every environment; a change reaches its own environment's clients only.
    let mut clients = Vec::new();
    for up in &ups {
        let url = proxy.url(&format!("/api/stream?token={}", client_key(up.name)));
        let mut client = sse(&url).await;
        next_event(&mut client, Duration::from_secs(10)).await;
        clients.push(client);
    }
    ups[1].mock.set_flag("change-beta", true);
    event_where(&mut clients[1], Duration::from_secs(10), |e| {
        e.json().is_ok_and(|v| announces(&v, "change-beta"))
    })
    .await;
    for i in [0, 2] {
        let (events, _) = collect_for(&mut clients[i], Duration::from_millis(300)).await;
        assert!(
            events.is_empty(),
            "{} got beta's change: {events:?}",
            ups[i].name
        );
    }

    // Health and metrics report each environment.
    let health = must_get(&proxy.url("/api/health")).await.expect_json(200);
    for up in &ups {
        assert!(
            health["environments"][up.name].is_object(),
            "health: {health}"
        );
    }
    let metrics = must_get(&proxy.url("/api/metrics")).await.text();
    for up in &ups {
        assert!(
            metrics.contains(&format!("environment=\"{}\"", up.name)),
            "metrics lack {}",
            up.name
        );
    }

    // One upstream down: the other two keep serving fresh data.
    ups[0].mock.set_down(true);
    ups[1].mock.set_flag("fresh-beta", true);
    ups[2].mock.set_flag("fresh-gamma", true);
    wait_flag(&proxy, &client_key("beta"), "fresh-beta").await;
    wait_flag(&proxy, &client_key("gamma"), "fresh-gamma").await;
    // And the one whose upstream is down still serves what it had.
    assert_eq!(
        flags_with(&proxy, "/api/flags", &client_key("alpha"))
            .await
            .expect_json(200)["flags"]["only-alpha"],
        true
    );
    ups[0].mock.set_down(false);

    if !native {
        let expired = wait_status(&proxy, &client_key("beta"), 401).await;
        assert!(expired.text().contains("expired"), "{}", expired.text());
        assert_eq!(flags_with(&proxy, "/api/flags", beta_new).await.status, 200);
        for up in &ups[1..] {
            let stats = up.mock.stats();
            assert_eq!(stats.streams_accepted, 1, "{}: {stats:?}", up.name);
        }
        return;
    }

    // A bad file is refused and counted; everything keeps serving.
    write(&config, "[environments.broken]\nserver_key = 1\n");
    wait_metric_at_least(
        &proxy,
        "rollgate_proxy_config_reloads_total",
        "result=\"error\"",
        1.0,
        Duration::from_secs(15),
    )
    .await;
    wait_flag(&proxy, &client_key("gamma"), "only-gamma").await;

    // Reload: gamma removed, delta added, beta's key rotated with the old one expiring soon.
    let delta = upstream("delta").await;
    let expires = rfc3339(SystemTime::now() + Duration::from_secs(20));
    let mut text = table(&ups[0], &format!("[\"{}\"]", client_key("alpha")));
    text.push_str(&table(
        &ups[1],
        &format!(
            "[\"{beta_new}\", {{ key = \"{}\", expires = {expires} }}]",
            client_key("beta")
        ),
    ));
    text.push_str(&table(&delta, &format!("[\"{}\"]", client_key("delta"))));
    write(&config, &text);
    wait_flag(&proxy, &client_key("delta"), "only-delta").await;
    // The rotated key and the old one work side by side (the old one until it expires).
    wait_flag(&proxy, beta_new, "only-beta").await;
    assert_eq!(
        flags_with(&proxy, "/api/flags", &client_key("beta"))
            .await
            .status,
        200
    );
    let gone = wait_status(&proxy, &client_key("gamma"), 401).await;
    assert!(gone.text().contains("not valid"), "{}", gone.text());
    ups[2]
        .mock
        .wait_until(Duration::from_secs(10), |stats| stats.open_streams == 0)
        .await
        .expect("a removed environment stops its stream");
    let expired = wait_status(&proxy, &client_key("beta"), 401).await;
    assert!(expired.text().contains("expired"), "{}", expired.text());
    assert_eq!(flags_with(&proxy, "/api/flags", beta_new).await.status, 200);
    // Beta's client was never dropped and still gets changes; beta still holds one stream.
    ups[1].mock.set_flag("after-reload-beta", true);
    event_where(&mut clients[1], Duration::from_secs(10), |e| {
        e.json().is_ok_and(|v| announces(&v, "after-reload-beta"))
    })
    .await;
    for up in [&ups[1], &delta] {
        let stats = up.mock.stats();
        assert_eq!(
            (stats.open_streams, stats.streams_accepted),
            (1, 1),
            "{}: {stats:?}",
            up.name
        );
    }

    // SIGHUP reloads too: alpha's key rotated again, applied without a file-change wait.
    let mut text = table(&ups[0], "[\"ck-alpha-hup-3b7a\"]");
    text.push_str(&table(&ups[1], &format!("[\"{beta_new}\"]")));
    text.push_str(&table(&delta, &format!("[\"{}\"]", client_key("delta"))));
    write(&config, &text);
    proxy.hangup().expect("SIGHUP");
    wait_flag(&proxy, "ck-alpha-hup-3b7a", "only-alpha").await;
    assert_eq!(
        wait_status(&proxy, &client_key("alpha"), 401).await.status,
        401
    );

    // Beta's server key changes (a restart of the environment): the old state stops (its upstream
    // stream dropped) before the new one starts, and exactly one stream stays open.
    let beta_server_new = "rg_server_beta-rekeyed-e2e";
    ups[1].mock.set_api_key(beta_server_new);
    let mut text = table(&ups[0], "[\"ck-alpha-hup-3b7a\"]");
    text.push_str(&format!(
        "[environments.beta]\nserver_key = \"{beta_server_new}\"\nbase_url = \"{}\"\n\
         client_keys = [\"{beta_new}\"]\n\n",
        ups[1].mock.base_url()
    ));
    text.push_str(&table(&delta, &format!("[\"{}\"]", client_key("delta"))));
    write(&config, &text);
    let stats = ups[1]
        .mock
        .wait_until(Duration::from_secs(20), |stats| {
            stats.streams_accepted >= 2 && stats.open_streams == 1
        })
        .await
        .expect("the re-keyed environment opens its new stream");
    // Not asserted: the mock's peak of open streams. The proxy drops the old stream before it
    // starts the new one, but the socket is closed by the HTTP client's connection task, which
    // under load ran after the new stream had connected (the mock, which now sees a close as
    // soon as it reaches the socket, counted 2 in one loaded CI run).
    assert_eq!(stats.open_streams, 1, "{stats:?}");
    ups[1].mock.set_flag("after-rekey-beta", true);
    wait_flag(&proxy, beta_new, "after-rekey-beta").await;
    let stats = ups[1].mock.stats();
    assert_eq!(stats.open_streams, 1, "{stats:?}");
}
