//! Celery 5.7's `celery.utils.saferepr.saferepr`, exactly, for values that come from JSON.
//!
//! Celery puts `saferepr(args, 1024, maxlevels=task_repr_maxlevels)` and the same of `kwargs` into the
//! `argsrepr`/`kwargsrepr` headers of every protocol-v2 task message (`AMQP.as_task_v2`); Flower and
//! `inspect active` show them. [`argsrepr`] and [`kwargsrepr`] reproduce those headers byte for byte.
//!
//! `saferepr` is not `repr` truncated at the end. It streams tokens and spends a character budget on them:
//! * numbers, `True`/`False` (`str(x)`) and `None` (`repr(None)`) are cut with [`truncate`] like text;
//! * strings (values and dict keys) are written as `'` + `truncate(s)` with `'` replaced by `\'` + `'`:
//!   no other escaping, so newlines, backslashes, `"` and control characters appear raw;
//! * `truncate(s, n)` cuts when `len(s) >= n` (so a string exactly as long as the budget still gets `...`),
//!   keeps `s[:n]` up to its last space and appends `...`;
//! * brackets and separators are never cut but are counted;
//! * once the budget is spent (`<= 0`) the next closing bracket is still written; any other token is
//!   replaced by `, ...` followed by the closing brackets of the containers still open;
//! * containers deeper than `maxlevels` (`0` = unlimited) print as `[...]`, `{...}`, `(...)`.
//!
//! Lengths are counted in code points, as Python's `len(str)` does. Floats print as Python's `str(float)`
//! (`1.0`, `1e+16`, `-0.0`, `nan`, `inf`); the [`FLOAT_MARKER`] objects that [`crate::json::parse_lenient`]
//! makes of bare `NaN`/`Infinity` print as `nan`/`inf`/`-inf`, as the Python float they stand for.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::json::FLOAT_MARKER;

/// Celery's `AMQP.argsrepr_maxsize` and `AMQP.kwargsrepr_maxsize`.
pub const REPR_MAXSIZE: usize = 1024;

/// Celery's default `task_repr_maxlevels`.
pub const DEFAULT_MAXLEVELS: usize = 3;

/// A value to represent: a JSON value, or a JSON array or object as the Python tuple or dict Celery sees.
#[derive(Clone, Copy, Debug)]
pub enum Repr<'a> {
    /// A JSON value (`list` for arrays, `dict` for objects).
    Value(&'a Value),
    /// A Python tuple: `()`, `(x,)`, `(x, y)`.
    Tuple(&'a [Value]),
    /// A Python dict given as a bare map (the `kwargs` of a task message).
    Dict(&'a Map<String, Value>),
}

impl<'a> From<&'a Value> for Repr<'a> {
    fn from(value: &'a Value) -> Self {
        Repr::Value(value)
    }
}

impl<'a> From<&'a Map<String, Value>> for Repr<'a> {
    fn from(map: &'a Map<String, Value>) -> Self {
        Repr::Dict(map)
    }
}

/// `celery.utils.saferepr.saferepr(value, maxlen=maxlen, maxlevels=maxlevels)`.
///
/// `maxlen: None` means no limit (as in Python); `Some(0)` is a real limit of zero, as in Python.
/// `maxlevels: 0` means no depth limit.
pub fn saferepr<'a>(value: impl Into<Repr<'a>>, maxlen: Option<usize>, maxlevels: usize) -> String {
    let mut tokens = Tokens {
        root: Some(value.into()),
        stack: Vec::new(),
        maxlevels,
    };
    let mut budget = maxlen.map(|m| isize::try_from(m).unwrap_or(isize::MAX));
    let mut out = String::new();
    while let Some(token) = tokens.next() {
        if budget.is_some_and(|b| b <= 0) {
            if let Tok::Close(close) = token {
                // The cut value was the last of its container: just close it (uncounted).
                out.push_str(close);
                continue;
            }
            out.push_str(", ...");
            // Dangling closers of the containers still open. A container the cut token opens is not
            // shown, so its closer is skipped too.
            let skip = usize::from(matches!(token, Tok::Open(_)));
            for frame in tokens.stack.iter().rev().skip(skip) {
                out.push_str(frame.close);
            }
            break;
        }
        let piece: Cow<'_, str> = match token {
            Tok::Open(s) | Tok::Close(s) | Tok::Elided(s) | Tok::Sep(s) => Cow::Borrowed(s),
            Tok::Quoted(s) => Cow::Owned(format_chars(s, budget)),
            Tok::Text(t) => match truncate(&t, budget) {
                Cow::Borrowed(_) => t,
                Cow::Owned(o) => Cow::Owned(o),
            },
        };
        out.push_str(&piece);
        if let Some(b) = budget.as_mut() {
            *b = b.saturating_sub(isize::try_from(piece.chars().count()).unwrap_or(isize::MAX));
        }
    }
    out
}

/// The `argsrepr` header Celery writes for positional arguments: `saferepr(tuple(args), 1024, 3)`.
///
/// Celery sees `args` as a tuple (`delay(*args)`, `apply_async(args=(..))`, and `args or ()` for none).
pub fn argsrepr(args: &[Value]) -> String {
    saferepr(Repr::Tuple(args), Some(REPR_MAXSIZE), DEFAULT_MAXLEVELS)
}

/// The `kwargsrepr` header Celery writes for keyword arguments: `saferepr(kwargs, 1024, 3)`.
pub fn kwargsrepr(kwargs: &Map<String, Value>) -> String {
    saferepr(Repr::Dict(kwargs), Some(REPR_MAXSIZE), DEFAULT_MAXLEVELS)
}

/// `celery.utils.text.truncate(s, maxlen)` (suffix `...`) with `maxlen: None` for no limit.
///
/// Cuts when `len(s) >= maxlen` (not `>`), keeps `s[:maxlen]` up to its last space and appends `...`.
/// A limit of `0` (falsy in Python) does not cut.
pub fn truncate(s: &str, maxlen: Option<isize>) -> Cow<'_, str> {
    let Some(max) = maxlen.filter(|&m| m != 0) else {
        return Cow::Borrowed(s);
    };
    let head = if max < 0 {
        // Python's `s[:-n]` (never reached from saferepr, which stops at a spent budget).
        let drop = max.unsigned_abs();
        let len = s.chars().count();
        let keep = len.saturating_sub(drop);
        &s[..byte_index(s, keep)]
    } else {
        let max = max.unsigned_abs();
        match s.char_indices().nth(max) {
            Some((i, _)) => &s[..i],
            None if s.chars().count() == max => s,
            None => return Cow::Borrowed(s),
        }
    };
    let head = head.rsplit_once(' ').map_or(head, |(h, _)| h);
    Cow::Owned(format!("{head}..."))
}

fn byte_index(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(i, _)| i)
}

/// `_format_chars`: `'` + truncated text with `'` escaped + `'`; nothing else is escaped.
fn format_chars(s: &str, maxlen: Option<isize>) -> String {
    let t = truncate(s, maxlen);
    let mut out = String::with_capacity(t.len() + 2);
    out.push('\'');
    for ch in t.chars() {
        if ch == '\'' {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('\'');
    out
}

/// One token of Celery's `reprstream`.
enum Tok<'a> {
    /// Opening literal (`[`, `{`, `(`): uncut, level +1.
    Open(&'static str),
    /// Closing literal (`]`, `}`, `)`, `,)`): uncut, level -1.
    Close(&'static str),
    /// A container past `maxlevels` (`[...]`): uncut, level unchanged.
    Elided(&'static str),
    /// `, ` or `: ` (counted, never cut).
    Sep(&'static str),
    /// A string value or dict key (`_quoted`/`_key`).
    Quoted(&'a str),
    /// `str(number)`, `str(bool)`, `repr(None)`.
    Text(Cow<'a, str>),
}

/// What a container yields next: a token of its own or an element to expand.
enum Item<'a> {
    Tok(Tok<'a>),
    Val(&'a Value),
}

enum Elements<'a> {
    Seq(std::slice::Iter<'a, Value>),
    Map(serde_json::map::Iter<'a>),
}

/// An open container: the rest of its elements and its closing literal.
struct Frame<'a> {
    elements: Elements<'a>,
    close: &'static str,
    started: bool,
    /// Tokens due before the next element (separators, the key of a dict entry), in reverse order.
    pending: Vec<Item<'a>>,
}

impl<'a> Frame<'a> {
    fn next_item(&mut self) -> Option<Item<'a>> {
        if let Some(item) = self.pending.pop() {
            return Some(item);
        }
        let first = !self.started;
        self.started = true;
        match &mut self.elements {
            Elements::Seq(it) => {
                let v = it.next()?;
                if first {
                    Some(Item::Val(v))
                } else {
                    self.pending.push(Item::Val(v));
                    Some(Item::Tok(Tok::Sep(", ")))
                }
            }
            Elements::Map(it) => {
                let (k, v) = it.next()?;
                self.pending.push(Item::Val(v));
                self.pending.push(Item::Tok(Tok::Sep(": ")));
                if first {
                    Some(Item::Tok(Tok::Quoted(k)))
                } else {
                    self.pending.push(Item::Tok(Tok::Quoted(k)));
                    Some(Item::Tok(Tok::Sep(", ")))
                }
            }
        }
    }
}

/// The token stream (`reprstream`): depth-first, lazily, so a short budget costs little.
struct Tokens<'a> {
    root: Option<Repr<'a>>,
    stack: Vec<Frame<'a>>,
    maxlevels: usize,
}

impl<'a> Tokens<'a> {
    fn next(&mut self) -> Option<Tok<'a>> {
        if let Some(root) = self.root.take() {
            return Some(self.enter(root));
        }
        let frame = self.stack.last_mut()?;
        match frame.next_item() {
            Some(Item::Tok(t)) => Some(t),
            Some(Item::Val(v)) => Some(self.enter(Repr::Value(v))),
            None => {
                let close = frame.close;
                self.stack.pop();
                Some(Tok::Close(close))
            }
        }
    }

    fn enter(&mut self, node: Repr<'a>) -> Tok<'a> {
        let (elements, open, close, elided) = match node {
            Repr::Value(Value::Null) => return Tok::Text(Cow::Borrowed("None")),
            Repr::Value(Value::Bool(b)) => {
                return Tok::Text(Cow::Borrowed(if *b { "True" } else { "False" }))
            }
            Repr::Value(Value::Number(n)) => return Tok::Text(Cow::Owned(number_str(n))),
            Repr::Value(Value::String(s)) => return Tok::Quoted(s),
            Repr::Value(Value::Object(m)) => {
                if let Some(f) = non_finite(m) {
                    return Tok::Text(Cow::Borrowed(f));
                }
                (Elements::Map(m.iter()), "{", "}", "{...}")
            }
            Repr::Dict(m) => (Elements::Map(m.iter()), "{", "}", "{...}"),
            Repr::Value(Value::Array(a)) => (Elements::Seq(a.iter()), "[", "]", "[...]"),
            Repr::Tuple(t) if t.len() == 1 => (Elements::Seq(t.iter()), "(", ",)", "(...,)"),
            Repr::Tuple(t) => (Elements::Seq(t.iter()), "(", ")", "(...)"),
        };
        if self.maxlevels != 0 && self.stack.len() >= self.maxlevels {
            return Tok::Elided(elided);
        }
        self.stack.push(Frame {
            elements,
            close,
            started: false,
            pending: Vec::new(),
        });
        Tok::Open(open)
    }
}

/// Python's `str()` of the int or float a JSON number loads as.
fn number_str(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        python_float_str(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// Python's `str(float)`: [`crate::json::python_float_repr`] with `nan`, `inf`, `-inf` for the non-finite.
pub fn python_float_str(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    crate::json::python_float_repr(f)
}

/// `str()` of the float a [`FLOAT_MARKER`] object stands for.
fn non_finite(map: &Map<String, Value>) -> Option<&'static str> {
    if map.len() != 1 {
        return None;
    }
    match map.get(FLOAT_MARKER)?.as_str()? {
        "NaN" => Some("nan"),
        "Infinity" => Some("inf"),
        "-Infinity" => Some("-inf"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: Value, maxlen: Option<usize>) -> String {
        saferepr(&v, maxlen, DEFAULT_MAXLEVELS)
    }

    #[test]
    fn plain_values() {
        assert_eq!(s(json!(null), None), "None");
        assert_eq!(s(json!(true), None), "True");
        assert_eq!(s(json!(1.0), None), "1.0");
        assert_eq!(s(json!(1e16), None), "1e+16");
        assert_eq!(s(json!(u64::MAX), None), "18446744073709551615");
        assert_eq!(s(json!("it's \"x\"\n\\"), None), "'it\\'s \"x\"\n\\'");
        assert_eq!(
            s(json!({"a": [1, "b", {}], "c": []}), None),
            "{'a': [1, 'b', {}], 'c': []}"
        );
    }

    #[test]
    fn tuples() {
        assert_eq!(saferepr(Repr::Tuple(&[]), Some(1024), 3), "()");
        assert_eq!(saferepr(Repr::Tuple(&[json!(1)]), Some(1024), 3), "(1,)");
        assert_eq!(argsrepr(&[json!(1), json!("a")]), "(1, 'a')");
    }

    #[test]
    fn levels_and_budget() {
        assert_eq!(s(json!([[[[1]]], [[{}]]]), None), "[[[[...]]], [[{...}]]]");
        assert_eq!(saferepr(&json!([[[[1]]]]), None, 0), "[[[[1]]]]");
        // A string exactly as long as the budget is still cut.
        assert_eq!(s(json!("abcd"), Some(4)), "'abcd...'");
        assert_eq!(s(json!("ab cd ef"), Some(7)), "'ab cd...'");
        // The separator is spent before the cut: Celery really prints `[1, , ...]`.
        assert_eq!(s(json!([1, 2, 3]), Some(3)), "[1, , ...]");
        assert_eq!(s(json!([[1, 2], 3]), Some(0)), ", ...");
        assert_eq!(truncate("abc", Some(0)), "abc");
    }

    #[test]
    fn float_ties_round_to_even_like_python() {
        for (f, want) in [
            (818_650_564_465_832.0 + 0.25, "818650564465832.2"),
            (818_650_564_465_832.0 + 0.75, "818650564465832.8"),
            (818_650_564_465_831.0 + 0.25, "818650564465831.2"),
            (5e-324, "5e-324"),
            (1e16, "1e+16"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123_456_789_012_345_680.0, "1.2345678901234568e+17"),
            (1_234_567_890_123_456.0, "1234567890123456.0"),
            (-2.25, "-2.25"),
            (600.0, "600.0"),
        ] {
            assert_eq!(python_float_str(f), want, "{f:e}");
        }
    }

    #[test]
    fn non_finite_floats() {
        let v = crate::json::parse_lenient(b"[NaN, Infinity, -Infinity]").expect("lenient");
        assert_eq!(s(v, None), "[nan, inf, -inf]");
    }
}
