//! kombu's JSON dialect, both directions.
//!
//! Python's `json` module (which kombu and Dagster's serdes both use) differs from strict JSON in ways a
//! peer must reproduce byte for byte:
//! * it emits bare `NaN`, `Infinity` and `-Infinity` (serde_json rejects them), so [`parse_lenient`]
//!   accepts them and maps each to a [`FLOAT_MARKER`] object that [`to_python_string`] writes back bare;
//! * its default separators are `", "` and `": "`, it escapes every non-printable-ASCII character as
//!   `\uXXXX` (`ensure_ascii=True`), and it prints floats with `repr` (`600.0`, `1e-05`, `1e+16`).
//!
//! Dagster's step command embeds `zlib(json.dumps(args, sort_keys=True))`, so the serializer must be exact.

use serde_json::{Map, Value};
use std::fmt::Write as _;

/// Key of the single-key object that stands for a non-finite float parsed from bare `NaN`/`Infinity`.
pub const FLOAT_MARKER: &str = "__celeriac_float__";

/// Error of [`parse_lenient`].
#[derive(Debug, thiserror::Error)]
#[error("invalid JSON: {0}")]
pub struct JsonError(#[from] serde_json::Error);

/// Parses JSON as Python's `json.loads` does: standard JSON plus bare `NaN`, `Infinity`, `-Infinity`.
pub fn parse_lenient(input: &[u8]) -> Result<Value, JsonError> {
    match serde_json::from_slice(input) {
        Ok(v) => Ok(v),
        Err(first) => {
            // Only pay for the rewrite when the document really uses the non-standard tokens.
            let Some(rewritten) = rewrite_non_finite(input) else {
                return Err(first.into());
            };
            Ok(serde_json::from_slice(&rewritten)?)
        }
    }
}

/// Rewrites bare `NaN`/`Infinity`/`-Infinity` tokens (outside strings) into marker objects.
/// Returns `None` when there were none, so the caller keeps the original error.
fn rewrite_non_finite(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() + 32);
    let mut in_string = false;
    let mut escaped = false;
    let mut changed = false;
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        let rest = &input[i..];
        let token = [
            ("-Infinity", "-Infinity"),
            ("Infinity", "Infinity"),
            ("NaN", "NaN"),
        ]
        .into_iter()
        .find(|(t, _)| rest.starts_with(t.as_bytes()));
        if let Some((t, name)) = token {
            write!(ByteWriter(&mut out), "{{\"{FLOAT_MARKER}\": \"{name}\"}}").ok()?;
            changed = true;
            i += t.len();
            continue;
        }
        if b == b'"' {
            in_string = true;
        }
        out.push(b);
        i += 1;
    }
    changed.then_some(out)
}

/// A `fmt::Write` adapter over a byte vector (we only ever write ASCII into it).
struct ByteWriter<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Serializes like Python's `json.dumps(value, sort_keys=sort_keys)` with default separators and
/// `ensure_ascii=True`.
pub fn to_python_string(value: &Value, sort_keys: bool) -> String {
    let mut out = String::with_capacity(256);
    write_value(&mut out, value, sort_keys);
    out
}

fn write_value(out: &mut String, value: &Value, sort_keys: bool) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else if let Some(f) = n.as_f64() {
                out.push_str(&python_float_repr(f));
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item, sort_keys);
            }
            out.push(']');
        }
        Value::Object(map) => {
            if let Some(name) = non_finite_marker(map) {
                out.push_str(name);
                return;
            }
            out.push('{');
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if sort_keys {
                // Python compares str by code point; UTF-8 byte order is the same order.
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, k);
                out.push_str(": ");
                write_value(out, v, sort_keys);
            }
            out.push('}');
        }
    }
}

fn non_finite_marker(map: &Map<String, Value>) -> Option<&'static str> {
    if map.len() != 1 {
        return None;
    }
    match map.get(FLOAT_MARKER)?.as_str()? {
        "NaN" => Some("NaN"),
        "Infinity" => Some("Infinity"),
        "-Infinity" => Some("-Infinity"),
        _ => None,
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(ch),
            _ => {
                // By hand: `write!` per code unit made a 1 MB non-ASCII string take milliseconds.
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let mut buf = [0u16; 2];
                for unit in ch.encode_utf16(&mut buf) {
                    out.push_str("\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(char::from(HEX[usize::from((*unit >> shift) & 0xf)]));
                    }
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr()` of a JSON value (`['a', 1, None, {'k': True}]`), as Celery puts results and
/// arguments into events.
pub fn python_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(_) => to_python_string(v, false),
        Value::String(s) => {
            let quote = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            let mut out = String::with_capacity(s.len() + 2);
            out.push(quote);
            for ch in s.chars() {
                match ch {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
            out
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(python_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!(
                    "{}: {}",
                    python_repr(&Value::String(k.clone())),
                    python_repr(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Truncates a repr like Celery's `saferepr(maxlen=1024)`: cut and end with `...`.
pub fn truncate_repr(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        return s;
    }
    let cut: String = s.chars().take(max.saturating_sub(3)).collect();
    format!("{cut}...")
}

/// Python's `str(float)` (= `repr`): the shortest digits that round-trip, fixed notation when the decimal
/// exponent is in `-4 <= exp < 16`, otherwise `d.ddde±XX`; JSON's `NaN`, `Infinity`, `-Infinity` for the
/// non-finite (Python's `json.dumps` spelling).
///
/// Ties are broken as Python does: when the double lies exactly
/// halfway between two shortest candidates (`818650564465832.25` → `...832.2` or `...832.3`), Python's
/// `dtoa` picks the even digit while Rust's shortest formatting rounds up. Rust's fixed-precision
/// formatting rounds the exact value half-to-even, so the shortest length is taken from `{:e}` and the
/// digits from `{:.N$e}` (when they round-trip, which they do unless the double is at a binade edge).
pub fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let shortest = format!("{f:e}");
    let len = shortest
        .split_once('e')
        .map_or(shortest.as_str(), |(m, _)| m)
        .bytes()
        .filter(u8::is_ascii_digit)
        .count();
    let even = format!("{f:.prec$e}", prec = len.saturating_sub(1));
    let sci = if even.parse::<f64>() == Ok(f) {
        even
    } else {
        shortest
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    let decpt = exp + 1; // position of the decimal point relative to the digit string
    let mut out = String::new();
    if f < 0.0 {
        out.push('-');
    }
    if decpt > -4 && decpt <= 16 {
        if decpt <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', decpt.unsigned_abs() as usize));
            out.push_str(digits);
        } else if decpt as usize >= digits.len() {
            out.push_str(digits);
            out.extend(std::iter::repeat_n('0', decpt as usize - digits.len()));
            out.push_str(".0");
        } else {
            out.push_str(&digits[..decpt as usize]);
            out.push('.');
            out.push_str(&digits[decpt as usize..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        let _ = write!(out, "e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (600.0, "600.0"),
            (86400.0, "86400.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (1.5e300, "1.5e+300"),
            (-2.25, "-2.25"),
            (1795394196.2273083, "1795394196.2273083"),
            (0.1, "0.1"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn serializes_with_python_separators_and_ascii_escapes() {
        let v = json!({"b": [1, 2.0, null, true], "a": "é\u{1F600}\"\n\u{7f}"});
        assert_eq!(
            to_python_string(&v, true),
            r#"{"a": "\u00e9\ud83d\ude00\"\n\u007f", "b": [1, 2.0, null, true]}"#
        );
        assert_eq!(
            to_python_string(&v, false),
            r#"{"b": [1, 2.0, null, true], "a": "\u00e9\ud83d\ude00\"\n\u007f"}"#
        );
    }

    #[test]
    fn python_reprs() {
        assert_eq!(
            python_repr(&json!(["a", 1, null, {"k": true}])),
            "['a', 1, None, {'k': True}]"
        );
        assert_eq!(python_repr(&json!("it's")), "\"it's\"");
        assert_eq!(truncate_repr("abcdef".into(), 5), "ab...");
    }

    #[test]
    fn non_finite_floats_round_trip() {
        let src = br#"{"x": NaN, "s": "NaN in a string", "y": [-Infinity, Infinity]}"#;
        let v = parse_lenient(src).expect("lenient parse");
        assert_eq!(
            to_python_string(&v, false),
            r#"{"x": NaN, "s": "NaN in a string", "y": [-Infinity, Infinity]}"#
        );
    }

    #[test]
    fn garbage_is_still_an_error() {
        assert!(parse_lenient(b"{not json").is_err());
        assert!(parse_lenient(b"[1, 2").is_err());
    }
}
