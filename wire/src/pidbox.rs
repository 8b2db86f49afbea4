//! Remote control ("pidbox", `kombu/pidbox.py`): request parsing, node matching, reply building.
//!
//! A request is broadcast to every worker; each decides from `destination` (a list of node names) or
//! `pattern` + `matcher` (`glob` default, or `pcre`) whether it is addressed, runs the command, and
//! replies `{<nodename>: <reply>}` to `reply_to` with headers `ticket` and `clock` — only when the
//! request carries `reply_to`.

pub mod command;

pub use command::ControlCommand;

use serde_json::{json, Map, Value};

use crate::broker::OutgoingMessage;
use crate::json::to_python_string;

/// Exchange of the requests (fanout).
pub const EXCHANGE: &str = "celery.pidbox";
/// Exchange of the replies (direct, routing key = the client's oid).
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// A parsed control request.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRequest {
    pub method: String,
    pub arguments: Map<String, Value>,
    pub destination: Option<Vec<String>>,
    pub pattern: Option<String>,
    pub matcher: Option<String>,
    pub ticket: Option<String>,
    /// `(exchange, routing_key)` to reply to.
    pub reply_to: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid control message: {0}")]
pub struct ControlError(String);

impl ControlRequest {
    pub fn parse(body: &Value) -> Result<ControlRequest, ControlError> {
        let obj = body
            .as_object()
            .ok_or_else(|| ControlError("body is not an object".into()))?;
        let method = obj
            .get("method")
            .and_then(Value::as_str)
            .ok_or_else(|| ControlError("no method".into()))?
            .to_string();
        let arguments = match obj.get("arguments") {
            Some(Value::Object(a)) => a.clone(),
            None | Some(Value::Null) => Map::new(),
            Some(_) => return Err(ControlError("arguments is not an object".into())),
        };
        let destination = match obj.get("destination") {
            Some(Value::Array(d)) => Some(
                d.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
            ),
            Some(Value::String(s)) => Some(vec![s.clone()]),
            _ => None,
        };
        let reply_to = obj.get("reply_to").and_then(|r| {
            Some((
                r.get("exchange")?.as_str()?.to_string(),
                r.get("routing_key")?.as_str()?.to_string(),
            ))
        });
        Ok(ControlRequest {
            method,
            arguments,
            destination,
            pattern: obj
                .get("pattern")
                .and_then(Value::as_str)
                .map(str::to_owned),
            matcher: obj
                .get("matcher")
                .and_then(Value::as_str)
                .map(str::to_owned),
            ticket: obj.get("ticket").and_then(Value::as_str).map(str::to_owned),
            reply_to,
        })
    }

    /// The typed command; the error is the text of the `{"error": …}` reply.
    pub fn command(&self) -> Result<ControlCommand, String> {
        ControlCommand::parse(&self.method, &self.arguments)
    }

    /// Whether the node `hostname` must handle this request.
    pub fn addressed_to(&self, hostname: &str) -> bool {
        if let Some(dest) = &self.destination {
            if !dest.is_empty() {
                return dest.iter().any(|d| d == hostname);
            }
        }
        match (&self.pattern, self.matcher.as_deref()) {
            (Some(p), Some("pcre")) => simple_regex_match(p, hostname),
            (Some(p), _) => glob_match(p, hostname),
            (None, _) => true,
        }
    }

    /// The reply message (`{hostname: reply}`, headers `ticket` + `clock`), if a reply is expected.
    pub fn reply(
        &self,
        hostname: &str,
        reply: Value,
        clock: u64,
    ) -> Option<(String, String, OutgoingMessage)> {
        let (exchange, routing_key) = self.reply_to.clone()?;
        let mut body = Map::new();
        body.insert(hostname.to_string(), reply);
        let mut msg = OutgoingMessage::json(to_python_string(&Value::Object(body), false));
        msg.headers.insert(
            "ticket".into(),
            json!(self.ticket.clone().unwrap_or_default()),
        );
        msg.headers.insert("clock".into(), json!(clock));
        msg.properties.delivery_mode = Some(1);
        msg.properties.priority = Some(0);
        Some((exchange, routing_key, msg))
    }
}

/// fnmatch-style glob: `*`, `?`, `[...]` (no escapes), as kombu's default `glob` matcher.
///
/// Linear in practice (greedy match with one back-track point at the last `*`): a pattern comes from
/// any client on the broker, and the naive recursion is exponential in the number of stars
/// (`"*a" * 30 + "x"` against a 40-character node name never finishes).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    enum Tok {
        Star,
        Any,
        Char(char),
        /// `[...]` / `[!...]`: (negated, members as single characters and `a-z` ranges).
        Class(bool, Vec<(char, char)>),
    }
    impl Tok {
        fn matches(&self, c: char) -> bool {
            match self {
                Tok::Star => true,
                Tok::Any => true,
                Tok::Char(x) => *x == c,
                Tok::Class(negate, set) => {
                    set.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negate
                }
            }
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '*' => {
                if !matches!(toks.last(), Some(Tok::Star)) {
                    toks.push(Tok::Star);
                }
            }
            '?' => toks.push(Tok::Any),
            '[' => match p[i..].iter().position(|&c| c == ']') {
                // No closing bracket: a literal `[`.
                None => toks.push(Tok::Char('[')),
                Some(rel) => {
                    let end = i + rel;
                    let (negate, set) = match p.get(i + 1) {
                        Some('!') if i + 2 <= end => (true, &p[i + 2..end]),
                        _ => (false, &p[(i + 1).min(end)..end]),
                    };
                    let mut members = Vec::new();
                    let mut j = 0;
                    while j < set.len() {
                        if j + 2 < set.len() && set[j + 1] == '-' {
                            members.push((set[j], set[j + 2]));
                            j += 3;
                        } else {
                            members.push((set[j], set[j]));
                            j += 1;
                        }
                    }
                    toks.push(Tok::Class(negate, members));
                    i = end;
                }
            },
            c => toks.push(Tok::Char(c)),
        }
        i += 1;
    }
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // (token after the last star, text position it was tried at)
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        match toks.get(pi) {
            Some(Tok::Star) => {
                backtrack = Some((pi + 1, ti));
                pi += 1;
                continue;
            }
            Some(tok) if tok.matches(t[ti]) => {
                pi += 1;
                ti += 1;
                continue;
            }
            _ => {}
        }
        match backtrack {
            // Let the last star swallow one more character and retry from there.
            Some((after_star, at)) => {
                pi = after_star;
                ti = at + 1;
                backtrack = Some((after_star, at + 1));
            }
            None => return false,
        }
    }
    toks[pi..].iter().all(|t| matches!(t, Tok::Star))
}

/// `pcre` matcher (`re.match`: anchored at the start). Supports the subset people use for node names:
/// literals, `.`, `.*`, `.+`, `^`, `$`; anything richer falls back to a prefix/literal comparison.
fn simple_regex_match(pattern: &str, text: &str) -> bool {
    let p = pattern.strip_prefix('^').unwrap_or(pattern);
    let (p, anchored_end) = match p.strip_suffix('$') {
        Some(s) => (s, true),
        None => (p, false),
    };
    let glob = p
        .replace(".*", "\u{1}")
        .replace(".+", "?\u{1}")
        .replace('.', "?")
        .replace('\u{1}', "*");
    if anchored_end {
        glob_match(&glob, text)
    } else {
        glob_match(&format!("{glob}*"), text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_captured_ping() {
        let body = json!({"method": "ping", "arguments": {}, "destination": null, "pattern": null, "matcher": null,
            "ticket": "fe3d90ad-7243-41ce-a140-fd4990f3151a",
            "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "2374602a-44d0-3afa-adaf-b31500a9929a"}});
        let req = ControlRequest::parse(&body).expect("parses");
        assert!(req.addressed_to("anyone@host"));
        let (ex, rk, msg) = req
            .reply("w@h", json!({"ok": "pong"}), 7)
            .expect("reply expected");
        assert_eq!(ex, REPLY_EXCHANGE);
        assert_eq!(rk, "2374602a-44d0-3afa-adaf-b31500a9929a");
        assert_eq!(
            String::from_utf8_lossy(&msg.body),
            r#"{"w@h": {"ok": "pong"}}"#
        );
        assert_eq!(
            msg.headers["ticket"],
            "fe3d90ad-7243-41ce-a140-fd4990f3151a"
        );
        assert_eq!(msg.headers["clock"], 7);
    }

    #[test]
    fn destination_and_patterns() {
        let mut req = ControlRequest::parse(&json!({"method": "ping", "destination": ["a@x"]}))
            .expect("parses");
        assert!(req.addressed_to("a@x"));
        assert!(!req.addressed_to("b@x"));
        req.destination = None;
        req.pattern = Some("research_*@vm".into());
        assert!(req.addressed_to("research_w1@vm"));
        assert!(!req.addressed_to("other@vm"));
        req.matcher = Some("pcre".into());
        req.pattern = Some("research_.*".into());
        assert!(req.addressed_to("research_w1@vm"));
        assert!(!req.addressed_to("x_research@vm"));
        assert!(ControlRequest::parse(&json!({"method": "revoke"}))
            .expect("no reply_to")
            .reply("w", json!(null), 1)
            .is_none());
    }

    #[test]
    fn globs() {
        assert!(glob_match("w[0-9]@*", "w3@host"));
        assert!(!glob_match("w[!0-9]@*", "w3@host"));
        assert!(glob_match("?@h", "a@h"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXbY"));
        assert!(glob_match("w[", "w["));
        assert!(glob_match("[!]x", "yx"));
    }

    /// Regression (fuzzing, issue 14): a pattern with many stars took exponential time.
    #[test]
    fn star_heavy_glob_is_linear() {
        let host = "celery@worker-7.example.internal.cluster.local";
        let t = std::time::Instant::now();
        assert!(!glob_match(&("*a".repeat(30) + "x"), host));
        assert!(!simple_regex_match(&(".*a".repeat(30) + "x$"), host));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}

/// Client side of remote control (`celery inspect` / `celery status`): broadcasts `method` and collects
/// `{node: reply}` answers until `timeout` or, with a destination, until every addressed node answered.
pub mod client {
    use std::time::Duration;

    use serde_json::{json, Value};

    use super::{EXCHANGE, REPLY_EXCHANGE};
    use crate::broker::{Broker, BrokerError, ExchangeSpec, OutgoingMessage, Subscription};
    use crate::json::{parse_lenient, to_python_string};

    /// Broadcasts `method` to every worker without waiting for replies (`app.control.revoke(...,
    /// reply=False)`): the body carries no `ticket`/`reply_to`, the headers Celery's `clock` and a
    /// one-second `expires`.
    pub async fn broadcast(
        broker: &dyn Broker,
        method: &str,
        arguments: Value,
    ) -> Result<(), BrokerError> {
        let body = json!({
            "method": method, "arguments": arguments, "destination": null, "pattern": null, "matcher": null,
        });
        let mut msg = OutgoingMessage::json(to_python_string(&body, false));
        msg.headers.insert("clock".into(), json!(1));
        msg.headers
            .insert("expires".into(), json!(crate::events::now_epoch() + 1.0));
        msg.properties.delivery_mode = Some(2);
        msg.properties.priority = Some(0);
        broker.broadcast(&ExchangeSpec::pidbox(), "", msg).await
    }

    pub async fn call(
        broker: &dyn Broker,
        method: &str,
        arguments: Value,
        destination: Option<Vec<String>>,
        timeout: Duration,
    ) -> Result<Vec<(String, Value)>, BrokerError> {
        let oid = uuid::Uuid::new_v4().to_string();
        let ticket = uuid::Uuid::new_v4().to_string();
        // Subscribe to our reply queue before asking, so no early reply is missed.
        let mut replies = broker
            .subscribe(&Subscription {
                exchange: ExchangeSpec::pidbox_reply(),
                queue: format!("{oid}.{REPLY_EXCHANGE}"),
                binding_key: oid.clone(),
                exclusive: true,
                message_ttl_ms: Some(300_000),
                expires_ms: Some(10_000),
            })
            .await?;
        let body = json!({
            "method": method, "arguments": arguments, "destination": destination, "pattern": null, "matcher": null,
            "ticket": ticket, "reply_to": {"exchange": REPLY_EXCHANGE, "routing_key": oid},
        });
        let mut msg = OutgoingMessage::json(to_python_string(&body, false));
        let expires = crate::events::now_epoch() + timeout.as_secs_f64();
        msg.headers.insert("clock".into(), json!(1));
        msg.headers.insert("expires".into(), json!(expires));
        msg.properties.delivery_mode = Some(2);
        msg.properties.priority = Some(0);
        broker.broadcast(&ExchangeSpec::pidbox(), "", msg).await?;
        debug_assert_eq!(ExchangeSpec::pidbox().name, EXCHANGE);

        let limit = destination.as_ref().map(Vec::len);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while tokio::time::Instant::now() < deadline && limit.is_none_or(|l| out.len() < l) {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let next = match tokio::time::timeout(remaining, replies.next()).await {
                Ok(r) => r?,
                Err(_) => break,
            };
            let Some(delivery) = next else { continue };
            let _ = delivery.acker.ack().await;
            if delivery
                .message
                .headers
                .get("ticket")
                .and_then(Value::as_str)
                != Some(ticket.as_str())
            {
                continue; // someone else's reply
            }
            if let Ok(Value::Object(m)) = parse_lenient(&delivery.message.body) {
                out.extend(m);
            }
        }
        let _ = replies.cancel().await;
        Ok(out)
    }
}
