//! Tests of the environments schema, router, expiry, diff and metrics merge.

use super::*;
use crate::api::ErrorCode;

const THREE: &str = r#"
[environments.production]
server_key = "rg_server_prod"
client_keys = ["pk-prod-new", { key = "pk-prod-old", expires = 2026-12-01T00:00:00Z }]

[environments.staging]
server_key_env = "STAGING_KEY"
base_url = "http://127.0.0.1:9/"
client_keys = [{ key_env = "STAGING_CLIENT" }]

[environments.dev-1]
server_key = "rg_server_dev"
client_keys = ["pk-dev"]
"#;

fn lookup(name: &str) -> Option<String> {
    match name {
        "STAGING_KEY" => Some("rg_server_staging".into()),
        "STAGING_CLIENT" => Some("pk-staging".into()),
        _ => None,
    }
}

fn three() -> Environments {
    Environments::from_toml(THREE, lookup).expect("valid")
}

fn field_of(error: EnvironmentsError) -> String {
    match error {
        EnvironmentsError::Field { field, .. } => field,
        other => panic!("not a field error: {other}"),
    }
}

/// 2026-12-01T00:00:00Z in unix milliseconds.
const DEC_1: u64 = 1_796_083_200_000;

#[test]
fn parses_toml_with_secrets_urls_and_expiry() {
    let envs = three();
    let names: Vec<_> = envs.list().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["dev-1", "production", "staging"]);
    let prod = envs.get("production").unwrap();
    assert_eq!(prod.server_key.as_ref().unwrap().expose(), "rg_server_prod");
    assert_eq!(prod.base_url, None);
    assert_eq!(prod.client_keys[0].expires, None);
    assert_eq!(
        prod.client_keys[1].expires,
        Some(Timestamp::from_millis(DEC_1))
    );
    let staging = envs.get("staging").unwrap();
    assert_eq!(
        staging.server_key.as_ref().unwrap().expose(),
        "rg_server_staging"
    );
    assert_eq!(staging.base_url.as_deref(), Some("http://127.0.0.1:9"));
    assert_eq!(staging.client_keys[0].key.expose(), "pk-staging");
    assert!(!envs.is_single());
    // Nothing secret in Debug.
    let debug = format!("{envs:?} {:?}", KeyRouter::new(&envs));
    assert!(
        !debug.contains("pk-") && !debug.contains("rg_server"),
        "{debug}"
    );
}

#[test]
fn json_is_the_same_schema() {
    let json = r#"{"environments": {
        "production": {"server_key": "rg_server_prod",
                       "client_keys": ["a", {"key": "b", "expires": "2026-12-01T01:00:00+01:00"}]}
    }}"#;
    let envs = Environments::parse(json, |_| None).unwrap();
    let prod = envs.get("production").unwrap();
    assert_eq!(
        prod.client_keys[1].expires,
        Some(Timestamp::from_millis(DEC_1))
    );
    assert!(matches!(
        Environments::from_json("{", |_| None),
        Err(EnvironmentsError::Json(_))
    ));
}

#[test]
fn errors_name_the_field() {
    let cases = [
        ("", "environments"),
        ("[environments]\n", "environments"),
        ("[other]\n", "other"),
        (
            "[environments.Prod]\nserver_key='k'\nclient_keys=['a']",
            "environments.Prod",
        ),
        (
            "[environments.p]\nclient_keys=['a']",
            "environments.p.server_key",
        ),
        (
            "[environments.p]\nserver_key='k'\nserver_key_env='X'\nclient_keys=['a']",
            "environments.p.server_key",
        ),
        (
            "[environments.p]\nserver_key_env='UNSET'\nclient_keys=['a']",
            "environments.p.server_key_env",
        ),
        (
            "[environments.p]\nserver_key='k'\nclient_keys=[]",
            "environments.p.client_keys",
        ),
        (
            "[environments.p]\nserver_key='k'",
            "environments.p.client_keys",
        ),
        (
            "[environments.p]\nserver_key='k'\nclient_keys=['a b']",
            "environments.p.client_keys[0]",
        ),
        (
            "[environments.p]\nserver_key='k'\nclient_keys=[{key='a', expires='soon'}]",
            "environments.p.client_keys[0].expires",
        ),
        (
            "[environments.p]\nserver_key='k'\nclient_keys=[{key='a', expires=2026-12-01}]",
            "environments.p.client_keys[0].expires",
        ),
        (
            "[environments.p]\nserver_key='k'\nclient_keys=[{key='a', expire=2026-12-01T00:00:00Z}]",
            "environments.p.client_keys[0].expire",
        ),
        (
            "[environments.p]\nserver_key='k'\nbase_url='ftp://x'\nclient_keys=['a']",
            "environments.p.base_url",
        ),
        (
            "[environments.p]\nserver_key='k'\nclient_key=['a']",
            "environments.p.client_key",
        ),
        // A key belongs to one environment.
        (
            "[environments.p]\nserver_key='k'\nclient_keys=['a']\n[environments.q]\nserver_key='k'\nclient_keys=['a']",
            "environments.q.client_keys[0]",
        ),
    ];
    for (text, field) in cases {
        let error = Environments::from_toml(text, lookup).expect_err(text);
        assert!(!error.to_string().contains("rg_server"), "{error}");
        assert_eq!(field_of(error), field, "{text}");
    }
    assert!(matches!(
        Environments::from_toml("[environments", lookup),
        Err(EnvironmentsError::Toml(_))
    ));
}

#[test]
fn names_are_label_safe() {
    for good in ["a", "prod", "dev-1", "eu_west", "0"] {
        assert!(check_name(good).is_ok(), "{good}");
    }
    let long = "a".repeat(MAX_NAME_LEN + 1);
    for bad in [
        "",
        "Prod",
        "-a",
        "_a",
        "a b",
        "a\"",
        "a/b",
        "é",
        long.as_str(),
    ] {
        assert!(check_name(bad).is_err(), "{bad}");
    }
}

fn route<'a>(
    router: &KeyRouter,
    now: u64,
    path: &'a str,
    bearer: Option<&str>,
) -> Result<Routed<'a>, ApiError> {
    let auth = bearer.map(|k| format!("Bearer {k}"));
    router.route(Timestamp::from_millis(now), path, auth.as_deref(), None, "")
}

fn name_of(router: &KeyRouter, routed: &Routed<'_>) -> String {
    router.names()[routed.index].clone()
}

#[test]
fn routes_by_key_from_every_place_a_key_can_be() {
    let envs = three();
    let router = KeyRouter::new(&envs);
    let now = Timestamp::from_millis(0);
    for (auth, api_key, query, env) in [
        (Some("Bearer pk-dev"), None, "", "dev-1"),
        (None, Some("pk-staging"), "", "staging"),
        (None, None, "user_id=u&token=pk-prod-new", "production"),
        (Some("bearer pk-prod-old"), None, "", "production"),
    ] {
        let routed = router
            .route(now, "/api/flags", auth, api_key, query)
            .unwrap();
        assert_eq!(name_of(&router, &routed), env);
        assert_eq!(routed.path, "/api/flags");
        assert!(routed.key.is_some());
    }
    let missing = router.route(now, "/api/flags", None, None, "").unwrap_err();
    assert_eq!(missing.code, ErrorCode::Unauthorized);
    assert!(missing.message.contains("required"));
    let unknown = route(&router, 0, "/api/flags", Some("pk-nope")).unwrap_err();
    assert_eq!(unknown.code, ErrorCode::Unauthorized);
    assert_eq!(unknown.message, "the client key is not valid");
    // A prefix of a key is not a key.
    assert!(route(&router, 0, "/api/flags", Some("pk-dev-")).is_err());
    assert!(route(&router, 0, "/api/flags", Some("pk-de")).is_err());
}

#[test]
fn expired_keys_get_their_own_401() {
    let router = KeyRouter::new(&three());
    assert!(route(&router, DEC_1 - 1, "/api/flags", Some("pk-prod-old")).is_ok());
    let expired = route(&router, DEC_1, "/api/flags", Some("pk-prod-old")).unwrap_err();
    assert_eq!(expired.code, ErrorCode::Unauthorized);
    assert_eq!(
        expired.message,
        "the client key expired at 2026-12-01T00:00:00.000Z: use a current key"
    );
    assert!(!expired.message.contains("pk-prod-old"));
    // The rotated key keeps working.
    assert!(route(&router, DEC_1 + 1, "/api/flags", Some("pk-prod-new")).is_ok());
    assert_eq!(
        router.next_expiry(Timestamp::ZERO),
        Some(Timestamp::from_millis(DEC_1))
    );
    assert_eq!(router.next_expiry(Timestamp::from_millis(DEC_1)), None);
}

#[test]
fn path_prefix_selects_and_must_agree_with_the_key() {
    let router = KeyRouter::new(&three());
    let routed = route(&router, 0, "/env/staging/api/flags/a", Some("pk-staging")).unwrap();
    assert_eq!(name_of(&router, &routed), "staging");
    assert_eq!(routed.path, "/api/flags/a");
    let routed = route(&router, 0, "/env/staging", Some("pk-staging")).unwrap();
    assert_eq!(routed.path, "/");
    let wrong = route(&router, 0, "/env/staging/api/flags", Some("pk-dev")).unwrap_err();
    assert_eq!(wrong.code, ErrorCode::Unauthorized);
    assert_eq!(
        wrong.message,
        "the client key is not valid for environment staging"
    );
    let unknown = route(&router, 0, "/env/nope/api/flags", Some("pk-dev")).unwrap_err();
    assert_eq!(unknown.code, ErrorCode::NotFound);
    assert_eq!(KeyRouter::split_path("/api/flags"), None);
}

#[test]
fn single_environment_is_today_s_configuration() {
    let open = Environments::single(&Settings::default());
    assert!(open.is_single());
    assert_eq!(open.list()[0].name, DEFAULT_ENVIRONMENT);
    let router = KeyRouter::new(&open);
    // No client keys: the API stays open.
    let routed = route(&router, 0, "/api/flags", None).unwrap();
    assert_eq!((routed.index, routed.key), (0, None));

    let settings = Settings::from_lookup(
        |spec| (spec.env == "ROLLGATE_PROXY_CLIENT_KEYS").then(|| "k1,k2".to_owned()),
        0,
    )
    .unwrap();
    let keyed = Environments::single(&settings);
    let router = KeyRouter::new(&keyed);
    assert!(route(&router, 0, "/api/flags", None).is_err());
    assert_eq!(
        route(&router, 0, "/api/flags", Some("k2"))
            .unwrap()
            .key
            .as_deref(),
        Some("k2")
    );
    // And an environment's settings carry its keys and upstream.
    let envs = three();
    let staging = envs.get("staging").unwrap().settings(&settings);
    assert_eq!(staging.base_url, "http://127.0.0.1:9");
    assert_eq!(staging.api_key.unwrap().expose(), "rg_server_staging");
    assert_eq!(
        staging.client_keys.keys().collect::<Vec<_>>(),
        ["pk-staging"]
    );
}

#[test]
fn diff_names_what_a_reload_changes() {
    let old = three();
    let new = Environments::from_toml(
        r#"
[environments.production]
server_key = "rg_server_prod"
client_keys = ["pk-prod-newer", "pk-prod-new"]
[environments.staging]
server_key = "rg_server_staging_2"
base_url = "http://127.0.0.1:9"
client_keys = ["pk-staging"]
[environments.qa]
server_key = "rg_server_qa"
client_keys = ["pk-qa"]
"#,
        lookup,
    )
    .unwrap();
    let diff = diff(&old, &new);
    assert_eq!(diff.added, ["qa"]);
    assert_eq!(diff.removed, ["dev-1"]);
    assert_eq!(diff.restarted, ["staging"]);
    assert_eq!(diff.rekeyed, ["production"]);
    assert!(diff.unchanged.is_empty());
    assert!(!diff.is_empty());
    let same = super::diff(&new, &new);
    assert!(same.is_empty());
    assert_eq!(same.unchanged, ["production", "qa", "staging"]);
}

#[test]
fn metrics_merge_labels_every_sample_once_per_family() {
    let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n# HELP h Hist.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 3\nh_count 2\ny{} 1\n";
    let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total 5\n# HELP h Hist.\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_sum 0\nh_count 0\ny{} 1\n";
    let merged = merge_metrics([("prod", a), ("dev", b)]);
    let expected = [
        "# HELP x_total X.",
        "# TYPE x_total counter",
        "x_total{environment=\"prod\"} 1",
        "x_total{environment=\"dev\"} 5",
        "# HELP h Hist.",
        "# TYPE h histogram",
        "h_bucket{environment=\"prod\",le=\"1\"} 2",
        "h_sum{environment=\"prod\"} 3",
        "h_count{environment=\"prod\"} 2",
        "h_bucket{environment=\"dev\",le=\"1\"} 0",
        "h_sum{environment=\"dev\"} 0",
        "h_count{environment=\"dev\"} 0",
        "y{environment=\"prod\"} 1",
        "y{environment=\"dev\"} 1",
    ];
    assert_eq!(merged.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn rfc3339_expiries() {
    let at = |text: &str| parse_rfc3339(text).map(Timestamp::as_millis);
    assert_eq!(at("2026-12-01T00:00:00Z"), Some(DEC_1));
    assert_eq!(at("2026-12-01 00:00:00.25z"), Some(DEC_1 + 250));
    assert_eq!(at("2026-11-30T19:30:00-04:30"), Some(DEC_1));
    assert_eq!(at("1970-01-01T00:00:00Z"), Some(0));
    for bad in [
        "",
        "2026-12-01",
        "2026-12-01T00:00:00",
        "2026-13-01T00:00:00Z",
        "2026-12-01T24:00:00Z",
        "2026-12-01T00:00:00+0100",
        "2026-12-01T00:00:00.Z",
        "1969-12-31T23:59:59Z",
        "２026-12-01T00:00:00Z",
    ] {
        assert_eq!(at(bad), None, "{bad}");
    }
}
