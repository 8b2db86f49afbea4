//! kombu's Redis envelope: the JSON object a list element holds (`body` in base64, `properties` with
//! `delivery_info`, `priority`, `delivery_tag`), written by [`encode`] and read by [`decode_envelope`].
//! An element that is not an envelope is never dropped: it becomes a message the worker rejects visibly.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::layout::priority_of;
use crate::broker::OutgoingMessage;
use crate::json::parse_lenient;
use crate::message::{DeliveryInfo, Properties, RawMessage};

/// Content type given to list elements that are not kombu envelopes, so the worker rejects them visibly.
pub const INVALID_ENVELOPE: &str = "application/x-invalid-envelope";

/// The kombu envelope of an outgoing message (`body` base64, a fresh `delivery_tag`), as kombu's
/// `Channel._put` stores it.
pub(super) fn encode(exchange: &str, routing_key: &str, msg: &OutgoingMessage) -> Value {
    let mut props = Map::new();
    if let Some(c) = &msg.properties.correlation_id {
        props.insert("correlation_id".into(), json!(c));
    }
    if let Some(r) = &msg.properties.reply_to {
        props.insert("reply_to".into(), json!(r));
    }
    props.insert(
        "delivery_mode".into(),
        json!(msg.properties.delivery_mode.unwrap_or(2)),
    );
    if let Some(e) = &msg.properties.expiration {
        props.insert("expiration".into(), json!(e));
    }
    props.insert(
        "delivery_info".into(),
        json!({"exchange": exchange, "routing_key": routing_key}),
    );
    props.insert(
        "priority".into(),
        json!(msg.properties.priority.unwrap_or(0)),
    );
    props.insert("body_encoding".into(), json!("base64"));
    props.insert(
        "delivery_tag".into(),
        json!(uuid::Uuid::new_v4().to_string()),
    );
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(&msg.body),
        "content-encoding": msg.content_encoding,
        "content-type": msg.content_type,
        "headers": msg.headers,
        "properties": props,
    })
}

pub(super) fn mark_redelivered(envelope: &mut Value) {
    if let Some(h) = envelope.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    if let Some(di) = envelope
        .pointer_mut("/properties/delivery_info")
        .and_then(Value::as_object_mut)
    {
        di.insert("redelivered".into(), Value::Bool(true));
    }
}

/// Turns a kombu envelope into a [`RawMessage`]; an element that is not an envelope becomes a message
/// with [`INVALID_ENVELOPE`] content so the worker logs and rejects it instead of losing it silently.
/// Also returns the parsed envelope (`Null` when the element is not a JSON object).
pub fn decode_envelope(raw: &[u8], queue: &str) -> (RawMessage, Value) {
    let invalid = |raw: &[u8]| RawMessage {
        body: raw.to_vec(),
        content_type: INVALID_ENVELOPE.into(),
        delivery_info: DeliveryInfo {
            queue: queue.into(),
            routing_key: queue.into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let env = match parse_lenient(raw) {
        Ok(v @ Value::Object(_)) => v,
        _ => return (invalid(raw), Value::Null),
    };
    let props = env.get("properties").cloned().unwrap_or(Value::Null);
    let body = match (
        env.get("body").and_then(Value::as_str),
        props.get("body_encoding").and_then(Value::as_str),
    ) {
        (Some(b), Some("base64")) => match base64::engine::general_purpose::STANDARD.decode(b) {
            Ok(bytes) => bytes,
            Err(_) => return (invalid(raw), env),
        },
        (Some(b), _) => b.as_bytes().to_vec(),
        (None, _) => return (invalid(raw), env),
    };
    let headers = env
        .get("headers")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let di = props.get("delivery_info").cloned().unwrap_or(Value::Null);
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let msg = RawMessage {
        body,
        content_type: s(&env, "content-type").unwrap_or_default(),
        content_encoding: s(&env, "content-encoding").unwrap_or_default(),
        properties: Properties {
            correlation_id: s(&props, "correlation_id"),
            reply_to: s(&props, "reply_to"),
            delivery_mode: props
                .get("delivery_mode")
                .and_then(Value::as_u64)
                .and_then(|d| u8::try_from(d).ok()),
            priority: props.get("priority").map(|p| priority_of(Some(p))),
            expiration: match props.get("expiration") {
                Some(Value::String(e)) => Some(e.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            },
        },
        delivery_info: DeliveryInfo {
            exchange: s(&di, "exchange").unwrap_or_default(),
            routing_key: s(&di, "routing_key").unwrap_or_else(|| queue.into()),
            redelivered: di
                .get("redelivered")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                || headers
                    .get("redelivered")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            queue: queue.into(),
        },
        headers,
    };
    (msg, env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::to_python_string;

    #[test]
    fn decodes_captured_envelope() {
        let raw = br#"{"body": "W1syLCAzXSwgeyJ6IjogMX0sIHt9XQ==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"task": "capapp.add", "id": "1111"}, "properties": {"correlation_id": "1111", "reply_to": "oid", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "research_q"}, "priority": 7, "body_encoding": "base64", "delivery_tag": "tag-1"}}"#;
        let (m, env) = decode_envelope(raw, "research_q");
        assert_eq!(m.body, br#"[[2, 3], {"z": 1}, {}]"#);
        assert_eq!(m.properties.priority, Some(7));
        assert_eq!(m.properties.reply_to.as_deref(), Some("oid"));
        assert!(!m.delivery_info.redelivered);
        assert_eq!(
            env.pointer("/properties/delivery_tag"),
            Some(&json!("tag-1"))
        );
        let (bad, env) = decode_envelope(b"not json", "q");
        assert_eq!(bad.content_type, INVALID_ENVELOPE);
        assert_eq!(bad.body, b"not json");
        assert!(env.is_null());
        let (no_body, _) = decode_envelope(br#"{"headers": {}}"#, "q");
        assert_eq!(no_body.content_type, INVALID_ENVELOPE);
    }

    #[test]
    fn redelivered_from_headers_or_delivery_info() {
        let mut env = json!({"body": "", "headers": {}, "properties": {"body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": "q"}}});
        mark_redelivered(&mut env);
        assert_eq!(env.pointer("/headers/redelivered"), Some(&json!(true)));
        assert_eq!(
            env.pointer("/properties/delivery_info/redelivered"),
            Some(&json!(true))
        );
        let raw = to_python_string(&env, false);
        assert!(
            decode_envelope(raw.as_bytes(), "q")
                .0
                .delivery_info
                .redelivered
        );
    }
}
