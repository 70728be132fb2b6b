//! A tiny `application/x-www-form-urlencoded` query parser, so the mock reads `user_id`/`token`
//! exactly as sent and never rejects a request over odd encoding.

/// Splits a raw query into decoded `(name, value)` pairs, in order.
pub(crate) fn parse(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

/// The decoded value of `name`; the last occurrence wins, like most servers.
pub(crate) fn param(query: &str, name: &str) -> Option<String> {
    parse(query)
        .into_iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// Percent-decodes and turns `+` into a space; malformed escapes are kept literally.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|c| hex_val(*c));
                let lo = bytes.get(i + 2).and_then(|c| hex_val(*c));
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 3;
                } else {
                    out.push(b'%');
                    i += 1;
                }
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_pairs() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("", &[]),
            ("a=1&b=2", &[("a", "1"), ("b", "2")]),
            ("user_id=a%20b+c", &[("user_id", "a b c")]),
            ("flag&&x=", &[("flag", ""), ("x", "")]),
            ("k=%zz%4", &[("k", "%zz%4")]),
            ("k=%C3%A9", &[("k", "é")]),
            ("token=a%3Db", &[("token", "a=b")]),
        ];
        for (raw, want) in cases {
            let got = parse(raw);
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            assert_eq!(got, want, "query {raw:?}");
        }
    }

    #[test]
    fn last_param_wins() {
        assert_eq!(param("a=1&a=2", "a").as_deref(), Some("2"));
        assert_eq!(param("a=1", "b"), None);
    }
}
