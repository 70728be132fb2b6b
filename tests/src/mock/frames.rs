//! The exact bytes the mock writes on a stream: SSE frames and the JSON inside them.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::Value;

/// `event: <name>\ndata: <line>\n` per data line, then the blank line that dispatches it.
pub(crate) fn event(name: &str, data: &str) -> Bytes {
    let mut out = String::with_capacity(name.len() + data.len() + 16);
    out.push_str("event: ");
    out.push_str(name);
    out.push('\n');
    // Multi-line data must be split, or the extra lines would be parsed as fields.
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// The comment line used as a keepalive.
pub(crate) const KEEPALIVE_COMMENT: &[u8] = b": keepalive\n\n";

/// `{"flags":{..}}` with sorted keys, as the official mock's `init` event carries.
pub(crate) fn snapshot_json(flags: &BTreeMap<String, Value>) -> String {
    format!("{{\"flags\":{}}}", to_json(flags))
}

/// `{"enabled":<v>,"key":"<k>"}`: the order Go's `json.Marshal` of a map gives.
pub(crate) fn key_enabled_json(key: &str, enabled: &Value) -> String {
    format!(
        "{{\"enabled\":{},\"key\":{}}}",
        to_json(enabled),
        to_json(&key)
    )
}

/// `{"timestamp":<unix ms>}` for `event: heartbeat`.
pub(crate) fn heartbeat_json(unix_ms: u64) -> String {
    format!("{{\"timestamp\":{unix_ms}}}")
}

/// Compact JSON; serializing maps of strings and JSON values cannot fail.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_byte_exact() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "init",
                "{\"flags\":{}}",
                "event: init\ndata: {\"flags\":{}}\n\n",
            ),
            ("x", "a\nb", "event: x\ndata: a\ndata: b\n\n"),
            ("x", "a\r\nb", "event: x\ndata: a\ndata: b\n\n"),
            ("x", "", "event: x\ndata: \n\n"),
        ];
        for (name, data, want) in cases {
            assert_eq!(
                event(name, data),
                Bytes::from(want.to_string()),
                "{name} {data:?}"
            );
        }
    }

    #[test]
    fn json_helpers() {
        let mut flags = BTreeMap::new();
        flags.insert("b".to_owned(), Value::Bool(false));
        flags.insert("a".to_owned(), Value::Bool(true));
        assert_eq!(snapshot_json(&flags), r#"{"flags":{"a":true,"b":false}}"#);
        assert_eq!(
            key_enabled_json("k\"1", &Value::Bool(true)),
            r#"{"enabled":true,"key":"k\"1"}"#
        );
        assert_eq!(heartbeat_json(42), r#"{"timestamp":42}"#);
    }
}
