//! `Secret`: a value (the Rollgate server key) that no `Debug`, `Display`, log or error shows.

use std::fmt;

/// A secret: printed as `[redacted]` by `Debug` and `Display`, so no log line, error or panic
/// message can carry it by accident. Both adapters hold the server key in one of these.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it (the upstream request).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the secret replaced by `[redacted]`: for error strings
    /// from libraries that may include a URL carrying `?token=`.
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            return text.to_owned();
        }
        text.replace(&self.0, "[redacted]")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shown_and_redacted_from_text() {
        let secret = Secret::new("rg_server_abc");
        assert_eq!(format!("{secret:?} {secret}"), "[redacted] [redacted]");
        assert_eq!(
            secret.redact("GET /stream?token=rg_server_abc failed"),
            "GET /stream?token=[redacted] failed"
        );
        assert_eq!(Secret::new("").redact("x"), "x");
        assert_eq!(secret.expose(), "rg_server_abc");
    }
}
