//! AMQP field tables and message properties as py-amqp writes them: headers convert JSON ⇄ field
//! tables with py-amqp's type choices (`I` for ints that fit in 32 bits, 64-bit otherwise, `d` floats,
//! `V` null, `t` bools, `S` strings, `A` lists, `F` dicts), so Python peers read celeriac's messages as
//! their own. Nesting is bounded: a hostile frame cannot make the conversion recurse past the stack.

use lapin::protocol::BasicProperties;
use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

use crate::broker::{BrokerError, OutgoingMessage};

/// Deepest nesting of header tables/arrays converted; deeper values become the string
/// [`TOO_DEEP`]. Celery's headers nest two or three levels; a frame of 128 KiB can nest 20,000, and
/// the conversion (and the `Value` it builds) must not recurse that deep on a worker thread.
pub const MAX_HEADER_DEPTH: usize = 64;
/// What a header value nested deeper than [`MAX_HEADER_DEPTH`] becomes.
pub const TOO_DEEP: &str = "<nested too deep>";

/// AMQP field table → JSON object.
pub fn table_to_json(table: &FieldTable) -> Map<String, Value> {
    table_at(table, 0)
}

fn table_at(table: &FieldTable, depth: usize) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), value_at(v, depth + 1)))
        .collect()
}

/// One AMQP field value → JSON (strings and byte arrays as lossy UTF-8, decimals and timestamps as numbers).
pub fn amqp_to_json(v: &AMQPValue) -> Value {
    value_at(v, 0)
}

fn value_at(v: &AMQPValue, depth: usize) -> Value {
    if depth > MAX_HEADER_DEPTH {
        return Value::String(TOO_DEEP.into());
    }
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => {
            if d.scale == 0 {
                Value::from(d.value)
            } else {
                float(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
            }
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(
            a.as_slice()
                .iter()
                .map(|x| value_at(x, depth + 1))
                .collect(),
        ),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(table_at(t, depth)),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// JSON object → AMQP field table (py-amqp's encoding). Fails only on keys longer than 255 bytes.
pub fn json_to_table(map: &Map<String, Value>) -> Result<FieldTable, BrokerError> {
    let mut inner = BTreeMap::new();
    for (k, v) in map {
        inner.insert(short("header name", k)?, json_to_amqp(v)?);
    }
    Ok(FieldTable::from(inner))
}

/// One JSON value → AMQP, as py-amqp writes the equivalent Python value.
pub fn json_to_amqp(v: &Value) -> Result<AMQPValue, BrokerError> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                int_value(i)
            } else if let Some(u) = n.as_u64() {
                // Beyond i64: py-amqp cannot write it at all; a double keeps the magnitude.
                AMQPValue::Double(u as f64)
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(a) => {
            let items: Result<Vec<AMQPValue>, BrokerError> = a.iter().map(json_to_amqp).collect();
            AMQPValue::FieldArray(FieldArray::from(items?))
        }
        Value::Object(m) => AMQPValue::FieldTable(json_to_table(m)?),
    })
}

/// py-amqp: `I` when `-2147483647 <= v <= 2147483647`, else a signed 64-bit value (lapin writes tag `l`,
/// which RabbitMQ and py-amqp read as signed 64-bit, like py-amqp's own `L`).
pub(super) fn int_value(i: i64) -> AMQPValue {
    if (-i64::from(i32::MAX)..=i64::from(i32::MAX)).contains(&i) {
        AMQPValue::LongInt(i as i32)
    } else {
        AMQPValue::LongLongInt(i)
    }
}

pub(super) fn outgoing_properties(m: &OutgoingMessage) -> Result<BasicProperties, BrokerError> {
    let mut props = BasicProperties::default();
    if !m.content_type.is_empty() {
        props = props.with_content_type(short("content_type", &m.content_type)?);
    }
    if !m.content_encoding.is_empty() {
        props = props.with_content_encoding(short("content_encoding", &m.content_encoding)?);
    }
    // Celery always writes the headers table, even when empty (flags 0xfc00 on results).
    props = props.with_headers(json_to_table(&m.headers)?);
    let p = &m.properties;
    if let Some(mode) = p.delivery_mode {
        props = props.with_delivery_mode(mode);
    }
    if let Some(prio) = p.priority {
        props = props.with_priority(prio);
    }
    if let Some(c) = &p.correlation_id {
        props = props.with_correlation_id(short("correlation_id", c)?);
    }
    if let Some(r) = &p.reply_to {
        props = props.with_reply_to(short("reply_to", r)?);
    }
    if let Some(e) = &p.expiration {
        props = props.with_expiration(short("expiration", e)?);
    }
    Ok(props)
}

pub(super) fn short(what: &str, s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|e| BrokerError::Refused {
        operation: format!("encoding {what}"),
        reason: format!(
            "{e} ({} bytes; AMQP short strings hold at most 255)",
            s.len()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Regression (issue 14): a header table nested thousands deep (a 128 KiB frame holds 20,000
    /// levels) made the conversion recurse past the thread's stack.
    #[test]
    fn deep_header_tables_are_cut() {
        let mut v = AMQPValue::LongString(LongString::from("leaf"));
        for _ in 0..10_000 {
            let mut t = FieldTable::default();
            t.insert("k".into(), v);
            v = AMQPValue::FieldTable(t);
        }
        let mut top = FieldTable::default();
        top.insert("stamps".into(), v);
        let j = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let j = Value::Object(table_to_json(&top));
                // Drop the deep AMQP value on the big-stack thread that built it; `j` is shallow.
                std::mem::forget(top);
                j
            })
            .expect("thread")
            .join()
            .expect("no stack overflow");
        let mut depth = 0;
        let mut cur = &j["stamps"];
        while let Some(next) = cur.get("k") {
            cur = next;
            depth += 1;
        }
        assert_eq!(depth, MAX_HEADER_DEPTH);
        assert_eq!(cur, &json!(TOO_DEEP));
    }

    #[test]
    fn json_to_amqp_follows_py_amqp_types() {
        assert_eq!(json_to_amqp(&json!(1)).ok(), Some(AMQPValue::LongInt(1)));
        assert_eq!(
            json_to_amqp(&json!(2147483647)).ok(),
            Some(AMQPValue::LongInt(i32::MAX))
        );
        assert_eq!(
            json_to_amqp(&json!(2147483648i64)).ok(),
            Some(AMQPValue::LongLongInt(2147483648))
        );
        assert_eq!(
            json_to_amqp(&json!(-2147483648i64)).ok(),
            Some(AMQPValue::LongLongInt(-2147483648))
        );
        assert_eq!(json_to_amqp(&json!(1.5)).ok(), Some(AMQPValue::Double(1.5)));
        assert_eq!(json_to_amqp(&json!(null)).ok(), Some(AMQPValue::Void));
        assert_eq!(
            json_to_amqp(&json!(true)).ok(),
            Some(AMQPValue::Boolean(true))
        );
        assert_eq!(
            json_to_amqp(&json!("x")).ok(),
            Some(AMQPValue::LongString("x".into()))
        );
        let nested = json!({"a": [1, null, {"b": "c"}]});
        let back = json_to_amqp(&nested).map(|v| amqp_to_json(&v)).ok();
        assert_eq!(back, Some(nested));
    }

    #[test]
    fn amqp_to_json_covers_every_type() {
        let cases = [
            (AMQPValue::ShortShortInt(-1), json!(-1)),
            (AMQPValue::ShortShortUInt(255), json!(255)),
            (AMQPValue::ShortInt(-300), json!(-300)),
            (AMQPValue::ShortUInt(60000), json!(60000)),
            (AMQPValue::LongUInt(4_000_000_000), json!(4_000_000_000u32)),
            (AMQPValue::Float(0.5), json!(0.5)),
            (AMQPValue::Timestamp(1_700_000_000), json!(1_700_000_000u64)),
            (AMQPValue::ByteArray(b"hi".to_vec().into()), json!("hi")),
            (
                AMQPValue::LongString(vec![0xff, b'a'].into()),
                json!("\u{fffd}a"),
            ),
            (
                AMQPValue::DecimalValue(lapin::types::DecimalValue {
                    scale: 2,
                    value: 150,
                }),
                json!(1.5),
            ),
            (AMQPValue::Float(f32::NAN), Value::Null),
        ];
        for (v, expected) in cases {
            assert_eq!(amqp_to_json(&v), expected, "{v:?}");
        }
    }

    #[test]
    fn long_header_names_are_refused_not_panicking() {
        let mut m = Map::new();
        m.insert("k".repeat(300), json!(1));
        assert!(matches!(
            json_to_table(&m),
            Err(BrokerError::Refused { .. })
        ));
    }
}
