//! The JavaScript built-ins the Node evaluator (`evaluate.ts`) leans on, reproduced exactly.
//!
//! `evaluate.ts` compares through `String(x)`, `toLowerCase()`, `trim()`, `parseFloat` and
//! `parseInt(p, 10)`. Each differs from its obvious Rust counterpart at the edges (`parseFloat`
//! reads a numeric *prefix*, `trim` has its own whitespace set, `String(1e21)` is `"1e+21"`), and
//! those edges decide whether a user matches a rule, so they are written out here from the
//! ECMAScript specification rather than approximated.

use std::fmt::{self, Write as _};

// The engine behind `regex` conditions (core's `regex` feature, see core/Cargo.toml): the
// `regex` crate for the native server, `regex-lite` for the Worker, where it is ~69 KB less
// gzipped wasm. Both read the dialect `translate_regex` emits the same way (ASCII classes and
// word boundaries, code points, no Unicode tables); the tests below run both on every pattern.
#[cfg(feature = "regex")]
use regex::Regex;
#[cfg(not(feature = "regex"))]
use regex_lite::Regex;

/// Whether `c` is in ECMAScript's `WhiteSpace` or `LineTerminator` sets, which is what
/// `String.prototype.trim`, `parseFloat` and `parseInt` strip.
///
/// This is Unicode `White_Space` minus U+0085 (NEL) plus U+FEFF (BOM), so `char::is_whitespace`
/// is not quite it.
pub(super) fn is_js_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{D}'
            | ' '
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
            | '\u{FEFF}'
    )
}

/// `s.trim()` in JavaScript.
pub(super) fn trim(s: &str) -> &str {
    s.trim_matches(is_js_whitespace)
}

fn trim_start(s: &str) -> &str {
    s.trim_start_matches(is_js_whitespace)
}

/// `parseFloat(s)` in JavaScript: the longest prefix (after leading whitespace) that is a decimal
/// literal or `Infinity`, or `NaN` when there is none. `"12abc"` is 12, `".5"` is 0.5, `"1e"` is 1,
/// `"0x10"` is 0, `"inf"` is `NaN`.
pub(super) fn parse_float(s: &str) -> f64 {
    let s = trim_start(s);
    let bytes = s.as_bytes();
    let mut i = 0;
    let negative = match bytes.first() {
        Some(b'-') => {
            i = 1;
            true
        }
        Some(b'+') => {
            i = 1;
            false
        }
        _ => false,
    };
    if s[i..].starts_with("Infinity") {
        return if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
    }
    let int_start = i;
    while bytes.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut end = i;
    if bytes.get(i) == Some(&b'.') {
        let frac_start = i + 1;
        let mut j = frac_start;
        while bytes.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        if int_digits > 0 || j > frac_start {
            end = j;
        }
    }
    if end == int_start {
        // Neither integer nor fraction digits: no decimal literal here.
        return f64::NAN;
    }
    // An exponent counts only when at least one digit follows `e`, `e+` or `e-`.
    if matches!(bytes.get(end), Some(b'e' | b'E')) {
        let mut j = end + 1;
        if matches!(bytes.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let digits_start = j;
        while bytes.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        if j > digits_start {
            end = j;
        }
    }
    // The prefix is ASCII and in Rust's float grammar (`5.`, `.5`, `5.e3` are all accepted).
    s[..end].parse().unwrap_or(f64::NAN)
}

/// `parseInt(s, 10)` in JavaScript: optional whitespace and sign, then the longest run of ASCII
/// digits; `None` (JavaScript's `NaN`) when there is no digit. `"3-beta"` is 3, `" 2"` is 2.
pub(super) fn parse_int(s: &str) -> Option<f64> {
    let s = trim_start(s);
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let value: f64 = rest[..digits].parse().ok()?;
    Some(if negative { -value } else { value })
}

/// A small stack buffer implementing `fmt::Write`, so numbers can be turned into strings
/// without touching the heap. Writing past its capacity fails (and callers fall back).
pub(super) struct StackStr {
    buf: [u8; 40],
    len: usize,
}

impl StackStr {
    pub(super) const fn new() -> Self {
        Self {
            buf: [0; 40],
            len: 0,
        }
    }

    pub(super) fn as_str(&self) -> &str {
        // Only whole `&str`s are ever copied in, so this never fails; an empty string would be
        // a harmless fallback.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }

    fn push_bytes(&mut self, bytes: &[u8]) -> fmt::Result {
        let end = self.len + bytes.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_bytes(s.as_bytes())
    }
}

/// Writes `String(n)` as JavaScript renders a number (ECMAScript `Number::toString`, radix 10):
/// shortest round-trip digits, plain notation for 1e-7 < |n| < 1e21, exponent form otherwise
/// (`1e+21`, `1.5e-7`), `-0` as `"0"`.
pub(crate) fn write_number(out: &mut impl fmt::Write, n: f64) -> fmt::Result {
    if n.is_nan() {
        return out.write_str("NaN");
    }
    if n == 0.0 {
        return out.write_str("0");
    }
    if n.is_infinite() {
        return out.write_str(if n > 0.0 { "Infinity" } else { "-Infinity" });
    }
    if n < 0.0 {
        out.write_char('-')?;
    }
    // Rust's `{:e}` without a precision prints the shortest digits that round-trip, like
    // JavaScript: `d[.ddd]e<exp>`.
    let mut sci = StackStr::new();
    write!(sci, "{:e}", n.abs())?;
    let sci = sci.as_str();
    let (mantissa, exponent) = sci.split_once('e').ok_or(fmt::Error)?;
    let exponent: i32 = exponent.parse().map_err(|_| fmt::Error)?;
    let mut digits = StackStr::new();
    for c in mantissa.chars().filter(char::is_ascii_digit) {
        digits.write_char(c)?;
    }
    let digits = digits.as_str();
    // In the spec's terms: s = digits, k = digits.len(), n = exponent + 1.
    let k = i32::try_from(digits.len()).map_err(|_| fmt::Error)?;
    let point = exponent + 1;
    if k <= point && point <= 21 {
        out.write_str(digits)?;
        for _ in 0..(point - k) {
            out.write_char('0')?;
        }
        Ok(())
    } else if 0 < point && point <= 21 {
        let split = usize::try_from(point).map_err(|_| fmt::Error)?;
        out.write_str(&digits[..split])?;
        out.write_char('.')?;
        out.write_str(&digits[split..])
    } else if -6 < point && point <= 0 {
        out.write_str("0.")?;
        for _ in 0..(-point) {
            out.write_char('0')?;
        }
        out.write_str(digits)
    } else {
        let sign = if point - 1 < 0 { '-' } else { '+' };
        out.write_str(&digits[..1])?;
        if k > 1 {
            out.write_char('.')?;
            out.write_str(&digits[1..])?;
        }
        write!(out, "e{sign}{}", (point - 1).unsigned_abs())
    }
}

/// Calls `f` with JavaScript's `s.toLowerCase()`, borrowing when `s` is already lower case and
/// using a stack buffer for short ASCII strings, so the common cases allocate nothing.
pub(super) fn with_lowercase<R>(s: &str, f: impl FnOnce(&str) -> R) -> R {
    if s.is_ascii() {
        if !s.bytes().any(|b| b.is_ascii_uppercase()) {
            return f(s);
        }
        let mut buf = [0u8; 128];
        if let Some(out) = buf.get_mut(..s.len()) {
            out.copy_from_slice(s.as_bytes());
            out.make_ascii_lowercase();
            if let Ok(lowered) = std::str::from_utf8(out) {
                return f(lowered);
            }
        }
    }
    // Rust's `to_lowercase` uses the same Unicode default case mapping as JavaScript's,
    // including the context-sensitive final sigma.
    f(&s.to_lowercase())
}

/// What a pattern given to `new RegExp(pattern)` becomes in the `regex` crate.
#[derive(Clone, Debug)]
pub(super) enum JsRegex {
    /// A pattern with the same meaning.
    Compiled(Regex),
    /// JavaScript rejects the pattern, so `evaluate.ts` catches the `SyntaxError` and the
    /// condition is simply false.
    JsSyntaxError,
    /// JavaScript accepts the pattern but it needs a feature the linear-time engine lacks
    /// (lookaround, backreferences), or the `regex` crate rejects it for another reason.
    Unsupported,
}

/// JavaScript's `\s` (WhiteSpace and LineTerminator) as the body of a Rust character class.
const JS_SPACE_CLASS: &str =
    r"\t\n\x0B\x0C\r \xA0\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}\x{FEFF}";
/// JavaScript's `.` outside the `s` flag: anything but a line terminator.
const JS_DOT: &str = r"[^\n\r\x{2028}\x{2029}]";

/// Compiles a JavaScript (non-Unicode mode, no flags) pattern for the `regex` crate.
///
/// The pattern is rewritten where the two dialects read the same text differently: `\d`, `\w`,
/// `\b` and `\s` are ASCII (or JavaScript's whitespace set) in JavaScript but Unicode-aware in
/// Rust; `.` also excludes `\r`, U+2028 and U+2029; a `{` that does not start a quantifier is a
/// literal; identity escapes such as `\a`, `\A`, `\z` or `\p` are plain letters; `[` inside a
/// class is a literal rather than a nested class; `&&`, `--` and `~~` are not set operators.
/// Matching is unanchored, like `RegExp.prototype.test`.
pub(super) fn compile_regex(pattern: &str) -> JsRegex {
    match translate_regex(pattern) {
        Translation::Rust(translated) => match Regex::new(&translated) {
            Ok(re) => JsRegex::Compiled(re),
            Err(_) => JsRegex::Unsupported,
        },
        Translation::JsSyntaxError => JsRegex::JsSyntaxError,
        Translation::Unsupported => JsRegex::Unsupported,
    }
}

enum Translation {
    Rust(String),
    JsSyntaxError,
    Unsupported,
}

/// Characters that must be escaped to be literal in a Rust pattern (inside or outside a class).
fn is_rust_meta(c: char) -> bool {
    matches!(
        c,
        '\\' | '.'
            | '+'
            | '*'
            | '?'
            | '('
            | ')'
            | '|'
            | '['
            | ']'
            | '{'
            | '}'
            | '^'
            | '$'
            | '#'
            | '&'
            | '-'
            | '~'
    )
}

fn push_literal(out: &mut String, c: char) {
    if is_rust_meta(c) {
        out.push('\\');
    }
    out.push(c);
}

/// What the previous token of a pattern was, to reject quantifiers JavaScript rejects
/// ("Nothing to repeat"), some of which Rust would accept (`a**`, `^*`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev {
    /// Start of the pattern, of a group or of an alternative.
    Start,
    /// Something a quantifier may follow.
    Atom,
    /// `^`, `$`, `\b`, `\B`: not quantifiable in JavaScript.
    Assertion,
    /// A quantifier; only a single `?` (laziness) may follow.
    Quantifier,
    /// A lazy quantifier; nothing may follow.
    Lazy,
}

fn translate_regex(pattern: &str) -> Translation {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut in_class = false;
    let mut prev = Prev::Start;
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        i += 1;
        if c == '\\' {
            let Some(&e) = chars.get(i) else {
                // "\ at end of pattern".
                return Translation::JsSyntaxError;
            };
            i += 1;
            let next_is_digit = chars.get(i).is_some_and(char::is_ascii_digit);
            if !in_class {
                prev = if matches!(e, 'b' | 'B') {
                    Prev::Assertion
                } else {
                    Prev::Atom
                };
            }
            match (e, in_class) {
                ('d', false) => out.push_str("[0-9]"),
                ('d', true) => out.push_str("0-9"),
                ('D', _) => out.push_str("[^0-9]"),
                ('w', false) => out.push_str("[0-9A-Za-z_]"),
                ('w', true) => out.push_str("0-9A-Za-z_"),
                ('W', _) => out.push_str("[^0-9A-Za-z_]"),
                ('s', false) => {
                    out.push('[');
                    out.push_str(JS_SPACE_CLASS);
                    out.push(']');
                }
                ('s', true) => out.push_str(JS_SPACE_CLASS),
                ('S', _) => {
                    out.push_str("[^");
                    out.push_str(JS_SPACE_CLASS);
                    out.push(']');
                }
                ('b', false) => out.push_str(r"(?-u:\b)"),
                ('B', false) => out.push_str(r"(?-u:\B)"),
                // Inside a class `\b` is backspace.
                ('b', true) => out.push_str(r"\x08"),
                ('0', _) if !next_is_digit => out.push_str(r"\x00"),
                // Backreferences (and Annex B octal escapes): not in a linear-time engine.
                ('0'..='9', _) => return Translation::Unsupported,
                // `\cJ` is a control character; a `\c` without a letter is literally `\c`.
                ('c', _) => match chars.get(i) {
                    Some(&letter) if letter.is_ascii_alphabetic() => {
                        i += 1;
                        let code = u32::from(letter) % 32;
                        out.push_str(&format!("\\x{code:02X}"));
                    }
                    _ => out.push_str(r"\\c"),
                },
                // Escapes with the same meaning in both dialects; `\x`, `\u` and `\k` are left
                // for the regex crate to accept or reject.
                ('f' | 'n' | 'r' | 't' | 'v' | 'x' | 'u' | 'k', _) => {
                    out.push('\\');
                    out.push(e);
                }
                // Any other escaped character is itself (an identity escape).
                (other, _) => push_literal(&mut out, other),
            }
            continue;
        }
        if in_class {
            match c {
                ']' => {
                    in_class = false;
                    prev = Prev::Atom;
                    out.push(']');
                }
                // Literal inside a JavaScript class; a nested class or set operator in Rust.
                '[' | '&' | '~' => push_literal(&mut out, c),
                '-' if chars.get(i) == Some(&'-') => out.push_str(r"\-"),
                _ => out.push(c),
            }
            continue;
        }
        // A quantifier: `*`, `+`, `?` or a well-formed `{n}`, `{n,}`, `{n,m}`.
        let braced = if c == '{' {
            braced_quantifier(chars.get(i..).unwrap_or_default())
        } else {
            None
        };
        if matches!(c, '*' | '+' | '?') || braced.is_some() {
            prev = match (prev, c) {
                (Prev::Atom, _) => Prev::Quantifier,
                (Prev::Quantifier, '?') => Prev::Lazy,
                // "Nothing to repeat".
                _ => return Translation::JsSyntaxError,
            };
            if let Some(Braced { len, in_order }) = braced {
                if !in_order {
                    // "numbers out of order in {} quantifier".
                    return Translation::JsSyntaxError;
                }
                out.push('{');
                out.extend(chars.get(i..i + len).unwrap_or_default());
                i += len;
            } else {
                out.push(c);
            }
            continue;
        }
        prev = Prev::Atom;
        match c {
            '[' => {
                let negated = chars.get(i) == Some(&'^');
                if negated {
                    i += 1;
                }
                if chars.get(i) == Some(&']') {
                    // `[]` never matches and `[^]` matches anything in JavaScript; Rust would
                    // read the `]` as a literal.
                    i += 1;
                    out.push_str(if negated {
                        r"(?s:.)"
                    } else {
                        r"[^\x00-\x{10FFFF}]"
                    });
                } else {
                    in_class = true;
                    out.push_str(if negated { "[^" } else { "[" });
                }
            }
            '.' => out.push_str(JS_DOT),
            '^' | '$' => {
                prev = Prev::Assertion;
                out.push(c);
            }
            '|' => {
                prev = Prev::Start;
                out.push(c);
            }
            ')' => {
                // "Unmatched ')'".
                let Some(outer) = depth.checked_sub(1) else {
                    return Translation::JsSyntaxError;
                };
                depth = outer;
                out.push(')');
            }
            '(' => {
                prev = Prev::Start;
                depth += 1;
                if chars.get(i) != Some(&'?') {
                    out.push('(');
                    continue;
                }
                match (chars.get(i + 1), chars.get(i + 2)) {
                    (Some(':'), _) => {
                        out.push_str("(?:");
                        i += 2;
                    }
                    // Lookahead and lookbehind: valid JavaScript, not supported by `regex`.
                    (Some('=' | '!'), _) | (Some('<'), Some('=' | '!')) => {
                        return Translation::Unsupported;
                    }
                    // A named group keeps its syntax, which both dialects share.
                    (Some('<'), _) => {
                        out.push_str("(?<");
                        i += 2;
                    }
                    // Inline flags, `(?P<..>)` and the rest are Rust-only syntax.
                    _ => return Translation::JsSyntaxError,
                }
            }
            // Annex B: a brace that does not begin a quantifier, or a lone `}` or `]`, is a
            // literal.
            '{' | '}' | ']' => push_literal(&mut out, c),
            _ => out.push(c),
        }
    }
    if in_class || depth > 0 {
        // "Unterminated character class" or "Unterminated group".
        return Translation::JsSyntaxError;
    }
    Translation::Rust(out)
}

struct Braced {
    /// Characters after the `{`, up to and including the `}`.
    len: usize,
    /// `m >= n` in `{n,m}`.
    in_order: bool,
}

/// Reads `n}`, `n,}` or `n,m}` at the start of `rest` (the text after a `{`).
fn braced_quantifier(rest: &[char]) -> Option<Braced> {
    let digits = |from: usize| {
        rest.get(from..)
            .unwrap_or_default()
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let value = |from: usize, len: usize| -> f64 {
        let text: String = rest
            .get(from..from + len)
            .unwrap_or_default()
            .iter()
            .collect();
        text.parse().unwrap_or(f64::INFINITY)
    };
    let first = digits(0);
    if first == 0 {
        return None;
    }
    let mut len = first;
    let mut in_order = true;
    if rest.get(len) == Some(&',') {
        len += 1;
        let second = digits(len);
        if second > 0 {
            in_order = value(len, second) >= value(0, first);
        }
        len += second;
    }
    (rest.get(len) == Some(&'}')).then_some(Braced {
        len: len + 1,
        in_order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex_lite::Regex as LiteRegex;

    fn number(n: f64) -> String {
        let mut s = String::new();
        write_number(&mut s, n).unwrap();
        s
    }

    #[test]
    fn numbers_render_like_javascript_string() {
        // Expected values are what `String(n)` prints in Node 20.
        let table: &[(f64, &str)] = &[
            (0.0, "0"),
            (-0.0, "0"),
            (42.0, "42"),
            (-42.0, "-42"),
            (0.5, "0.5"),
            (1.5e-7, "1.5e-7"),
            (1e-7, "1e-7"),
            (1e-6, "0.000001"),
            (0.000_001_5, "0.0000015"),
            (123.456, "123.456"),
            (1e20, "100000000000000000000"),
            (1e21, "1e+21"),
            (1.25e22, "1.25e+22"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (f64::NAN, "NaN"),
        ];
        for &(n, expected) in table {
            assert_eq!(number(n), expected, "String({n:e})");
        }
        // The stack buffer is large enough for every finite number.
        let mut stack = StackStr::new();
        write_number(&mut stack, -1.234_567_890_123_456_7e-300).unwrap();
        assert_eq!(stack.as_str(), "-1.2345678901234568e-300");
        let mut stack = StackStr::new();
        write_number(&mut stack, -0.000_001_234_567_890_123_456_7).unwrap();
        assert_eq!(stack.as_str(), "-0.0000012345678901234567");
    }

    #[test]
    fn parse_float_reads_a_numeric_prefix() {
        let table: &[(&str, f64)] = &[
            ("12", 12.0),
            ("12abc", 12.0),
            ("  \t\n12", 12.0),
            ("\u{FEFF}\u{3000}7", 7.0),
            ("+3.5", 3.5),
            ("-3.5x", -3.5),
            (".5", 0.5),
            ("-.5e1", -5.0),
            ("5.", 5.0),
            ("5.e2", 500.0),
            ("1e", 1.0),
            ("1e+", 1.0),
            ("1e-2", 0.01),
            ("1E3", 1000.0),
            ("0x10", 0.0),
            ("1_000", 1.0),
            ("007", 7.0),
            ("Infinity", f64::INFINITY),
            ("-Infinityx", f64::NEG_INFINITY),
            ("1e400", f64::INFINITY),
        ];
        for &(s, expected) in table {
            assert_eq!(parse_float(s), expected, "parseFloat({s:?})");
        }
        for s in [
            "", " ", "abc", ".", "-", "+.", "e5", "inf", "infinity", "NaN", "\u{85}1",
        ] {
            assert!(parse_float(s).is_nan(), "parseFloat({s:?}) should be NaN");
        }
    }

    #[test]
    fn parse_int_reads_leading_digits() {
        assert_eq!(parse_int("3"), Some(3.0));
        assert_eq!(parse_int("3-beta"), Some(3.0));
        assert_eq!(parse_int(" 2"), Some(2.0));
        assert_eq!(parse_int("+4"), Some(4.0));
        assert_eq!(parse_int("-1"), Some(-1.0));
        assert_eq!(parse_int("1.5"), Some(1.0));
        assert_eq!(parse_int("0x1F"), Some(0.0));
        assert_eq!(parse_int(&"9".repeat(400)), Some(f64::INFINITY));
        for s in ["", "x1", "-", " ", "rc1", "\u{FF11}"] {
            assert_eq!(parse_int(s), None, "parseInt({s:?})");
        }
    }

    #[test]
    fn trim_uses_the_javascript_whitespace_set() {
        assert_eq!(trim(" \t pro \n"), "pro");
        assert_eq!(trim("\u{FEFF}\u{A0}pro\u{2028}"), "pro");
        // NEL is Unicode whitespace but not JavaScript whitespace.
        assert_eq!(trim("\u{85}pro"), "\u{85}pro");
    }

    #[test]
    fn lowercase_matches_javascript() {
        let table = [
            ("abc", "abc"),
            ("ABC", "abc"),
            ("MiXeD-123", "mixed-123"),
            ("ÉCOLE", "école"),
            ("ΟΔΟΣ", "οδος"),
            ("İ", "i\u{307}"),
        ];
        for (input, expected) in table {
            with_lowercase(input, |lowered| assert_eq!(lowered, expected, "{input:?}"));
        }
        let long = "A".repeat(300);
        with_lowercase(&long, |lowered| assert_eq!(lowered, "a".repeat(300)));
    }

    /// The Worker's engine (`regex-lite`) accepts and matches exactly like the configured one.
    fn assert_engines_agree(pattern: &str, haystack: &str) {
        let Translation::Rust(translated) = translate_regex(pattern) else {
            return;
        };
        let lite = LiteRegex::new(&translated).map(|re| re.is_match(haystack));
        let configured = Regex::new(&translated).map(|re| re.is_match(haystack));
        assert_eq!(
            lite.ok(),
            configured.ok(),
            "{pattern:?} -> {translated:?} on {haystack:?}"
        );
    }

    fn matches(pattern: &str, haystack: &str) -> Option<bool> {
        assert_engines_agree(pattern, haystack);
        match compile_regex(pattern) {
            JsRegex::Compiled(re) => Some(re.is_match(haystack)),
            JsRegex::JsSyntaxError => None,
            JsRegex::Unsupported => panic!("{pattern:?} should be supported"),
        }
    }

    #[test]
    fn regexes_keep_their_javascript_meaning() {
        // (pattern, input, RegExp(pattern).test(input) in Node 20)
        let table: &[(&str, &str, bool)] = &[
            ("^[a-z]+@example\\.com$", "bob@example.com", true),
            ("example", "bob@EXAMPLE.com", false),
            ("ample", "bob@example.com", true),
            ("^\\d+$", "123", true),
            ("^\\d+$", "١٢٣", false),
            ("^\\w+$", "héllo", false),
            ("^\\w+$", "hello_1", true),
            ("^[\\w-]+$", "a-b", true),
            ("^[\\d.]+$", "1.2.3", true),
            ("^[^\\d]+$", "abc", true),
            ("^\\D+$", "١", true),
            ("\\bcat\\b", "a cat!", true),
            ("\\bcat", "écat", true),
            ("^\\s$", "\u{FEFF}", true),
            ("^\\s$", "\u{85}", false),
            ("^.$", "\r", false),
            ("^.$", "\u{2028}", false),
            ("^.$", "é", true),
            ("a{2}", "aa", true),
            ("a{2,}", "aaa", true),
            ("a{1,2}b", "ab", true),
            ("a{", "a{", true),
            ("{x}", "{x}", true),
            ("a{,2}", "a{,2}", true),
            ("x}", "x}", true),
            ("]", "]", true),
            ("[[]", "[", true),
            ("[a&&b]", "&", true),
            ("[~~]", "~", true),
            ("\\/path\\/", "/path/", true),
            ("\\a\\A\\z\\p\\<", "aAzp<", true),
            ("\\x41\\u0042", "AB", true),
            ("\\0", "\0", true),
            ("[\\b]", "\u{8}", true),
            ("(?:ab)+", "abab", true),
            ("(?<year>\\d{4})", "2024", true),
            ("[]", "", false),
            ("[]", "a", false),
            ("[^]", "\n", true),
            ("", "anything", true),
            ("a|b", "b", true),
            ("^a*?$", "aa", true),
            ("^a{2}?$", "aa", true),
            ("^a+?b$", "aab", true),
            ("^(?:)*$", "", true),
            ("^a{1,10}$", "aaaa", true),
            ("^a{10,10}$", "aaaa", false),
            ("^\\cJ$", "\n", true),
            ("^\\cj$", "\n", true),
            ("^\\c1$", "\\c1", true),
        ];
        for &(pattern, input, expected) in table {
            assert_eq!(
                matches(pattern, input),
                Some(expected),
                "/{pattern}/.test({input:?})"
            );
        }
    }

    #[test]
    fn regex_errors_are_sorted_by_who_rejects_them() {
        // JavaScript throws: evaluate.ts catches it and the condition is false.
        for pattern in [
            "abc\\", "[abc", "(?i)abc", "(?P<n>x)", "(?x)a", "a**", "a+*", "a*??", "^*", "$+",
            "\\b*", "(*)", "a|*", "*", "{2}", "a{2,1}", "a{1}{2}", "(", "a)", "(a))", "((a)",
        ] {
            assert!(
                matches!(compile_regex(pattern), JsRegex::JsSyntaxError),
                "{pattern:?}"
            );
        }
        // Valid JavaScript that the linear-time engine cannot run.
        for pattern in ["(?=a)", "(?!a)", "(?<=a)b", "(?<!a)b", "(a)\\1", "\\k<n>"] {
            assert_engines_agree(pattern, "a");
            assert!(
                matches!(compile_regex(pattern), JsRegex::Unsupported),
                "{pattern:?}"
            );
        }
    }
}
