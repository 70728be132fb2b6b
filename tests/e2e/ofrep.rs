//! OFREP: single and bulk evaluation, ETag/304 per snapshot × context, errors.

use rollgate_proxy_tests::mock::{FlagSet, MockConfig};
use serde_json::{Value, json};

use crate::common::*;
use crate::{Scenario, scenario};

pub(crate) fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(single_flag_evaluation),
        scenario!(bulk_evaluation_etag_and_context),
        scenario!(ofrep_errors),
    ]
}

async fn single_flag_evaluation() {
    // Rules mode: reasons are computed locally, so every OpenFeature reason is deterministic.
    let env = crate::sse::rules_env(&json!({"version":"1","flags":{
        "on": {"key":"on","enabled":true,"rollout":100},
        "off": {"key":"off","enabled":false,"rollout":100},
        "vip": {"key":"vip","enabled":true,"rollout":0,"targetUsers":["vip-1"]},
        "pro": {"key":"pro","enabled":true,"rollout":0,"rules":[{"id":"r","enabled":true,
            "rollout":100,"conditions":[{"attribute":"plan","operator":"equals","value":"pro"}]}]}
    }}))
    .await;
    let eval = |key: &str, body: &str| {
        let url = env.url(&format!("/ofrep/v1/evaluate/flags/{key}"));
        let body = body.to_owned();
        async move { must_post(&url, body).await.expect_json(200) }
    };
    let item = |key: &str, value: bool, reason: &str| {
        json!({"key":key,"value":value,"reason":reason,
            "variant": if value {"on"} else {"off"},"metadata":{}})
    };
    assert_eq!(eval("on", "{}").await, item("on", true, "SPLIT"));
    assert_eq!(
        eval("off", r#"{"context":{}}"#).await,
        item("off", false, "DISABLED")
    );
    assert_eq!(
        eval("vip", r#"{"context":{"targetingKey":"vip-1"}}"#).await,
        item("vip", true, "TARGETING_MATCH")
    );
    assert_eq!(
        eval("vip", r#"{"context":{"targetingKey":"u-2"}}"#).await,
        item("vip", false, "SPLIT")
    );
    assert_eq!(
        eval("pro", r#"{"context":{"targetingKey":"u-3","plan":"pro"}}"#).await,
        item("pro", true, "TARGETING_MATCH")
    );
    let missing = must_post(&env.url("/ofrep/v1/evaluate/flags/missing-flag"), "{}")
        .await
        .expect_json(404);
    assert_eq!(missing["key"], "missing-flag");
    assert_eq!(missing["errorCode"], "FLAG_NOT_FOUND");
    assert!(missing["errorDetails"].is_string());
}

async fn bulk_evaluation_etag_and_context() {
    let user = FlagSet::from_bools([("enabled-flag", false), ("only-u7", true)]);
    let env = Env::with(MockConfig::basic().user_flags("u-7", user), |_| {}).await;
    let url = env.url("/ofrep/v1/evaluate/flags");

    let resp = must_post(&url, "{}").await;
    let body = resp.expect_json(200);
    let items = body["flags"].as_array().expect("flags array");
    assert_eq!(items.len(), 6, "{body}");
    let enabled = items.iter().find(|i| i["key"] == "enabled-flag").unwrap();
    assert_eq!(enabled["value"], true);
    assert_eq!(enabled["variant"], "on");
    assert_eq!(
        body["eventStreams"],
        json!([{"type":"sse","endpoint":{"requestUri":"/ofrep/v1/sse"}}])
    );
    let etag = resp.header("etag").expect("ETag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");

    let cached = send(
        http()
            .post(&url)
            .header("content-type", "application/json")
            .header("if-none-match", &etag)
            .body("{}"),
    )
    .await
    .unwrap();
    assert_eq!(cached.status, 304);
    assert!(cached.body.is_empty());

    let for_user = r#"{"context":{"targetingKey":"u-7","plan":"pro"}}"#;
    let user_resp = send(
        http()
            .post(&url)
            .header("content-type", "application/json")
            .header("if-none-match", &etag)
            .body(for_user),
    )
    .await
    .unwrap();
    assert_eq!(user_resp.status, 200, "another context is another ETag");
    let user_body = user_resp.json();
    let value = |key: &str| -> Value {
        user_body["flags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["key"] == key)
            .map(|i| i["value"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(value("enabled-flag"), false, "{user_body}");
    assert_eq!(value("only-u7"), true, "{user_body}");
    assert_ne!(user_resp.header("etag"), Some(etag.as_str()));
}

async fn ofrep_errors() {
    let env = Env::basic().await;
    let bulk = env.url("/ofrep/v1/evaluate/flags");
    let single = env.url("/ofrep/v1/evaluate/flags/enabled-flag");
    for (url, body, code) in [
        (&bulk, "{", "PARSE_ERROR"),
        (&single, "not json", "PARSE_ERROR"),
        (&bulk, r#"{"context":[1,2]}"#, "INVALID_CONTEXT"),
        (&single, r#"{"context":"u-1"}"#, "INVALID_CONTEXT"),
    ] {
        let resp = must_post(url, body).await;
        let json = resp.expect_json(400);
        assert_eq!(json["errorCode"], code, "{body}: {json}");
        assert!(json["errorDetails"].is_string(), "{json}");
    }
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("a{i}"), json!("x"))).collect();
    let body = json!({"context": many}).to_string();
    let json = must_post(&bulk, body).await.expect_json(400);
    assert_eq!(json["errorCode"], "INVALID_CONTEXT", "{json}");
    // GET is not an evaluation.
    let resp = get(&bulk).await.unwrap();
    resp.expect_error(405, "METHOD_NOT_ALLOWED");
}
