//! Celery events (`celery/events/event.py`, `dispatcher.py`): what Flower and `celery events` read.
//!
//! An event is a flat JSON object with the common fields `hostname, utcoffset, pid, clock`, then the
//! type's own fields, then `timestamp, type` — the order captured from Python workers. Worker events
//! (`worker-online/heartbeat/offline`) travel alone with routing key `worker.<kind>`; task events may be
//! sent one by one (`task.received` …) or batched as `task.multi` with a JSON list body.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// Lamport clock shared by events and remote-control replies (`kombu.clocks.LamportClock`).
#[derive(Debug, Default)]
pub struct LamportClock(AtomicU64);

impl LamportClock {
    /// Advances the clock for a local event and returns the new value.
    pub fn forward(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Merges a clock value seen on a received message: `max(local, other) + 1`.
    pub fn adjust(&self, other: u64) -> u64 {
        let mut current = self.0.load(Ordering::SeqCst);
        loop {
            let next = current.max(other) + 1;
            match self
                .0
                .compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(seen) => current = seen,
            }
        }
    }

    pub fn value(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Builds events for one node.
#[derive(Debug)]
pub struct EventFactory {
    pub hostname: String,
    pub pid: u32,
    pub clock: LamportClock,
}

impl EventFactory {
    pub fn new(hostname: &str) -> Self {
        Self {
            hostname: hostname.into(),
            pid: std::process::id(),
            clock: LamportClock::default(),
        }
    }

    /// An event of `kind` with `fields`, in Celery's field order.
    pub fn event(&self, kind: &str, fields: Vec<(&str, Value)>) -> Value {
        let mut m = Map::new();
        m.insert("hostname".into(), json!(self.hostname));
        // Hours *west* of UTC; celeriac runs in UTC (containers do), so 0.0 as Python sends on UTC hosts.
        m.insert("utcoffset".into(), json!(0.0));
        m.insert("pid".into(), json!(self.pid));
        m.insert("clock".into(), json!(self.clock.forward()));
        for (k, v) in fields {
            m.insert(k.into(), v);
        }
        m.insert("timestamp".into(), json!(now_epoch()));
        m.insert("type".into(), json!(kind));
        Value::Object(m)
    }

    /// `worker-online` / `worker-heartbeat` / `worker-offline` (`celery/worker/heartbeat.py`).
    pub fn worker(&self, kind: &str, freq: f64, active: usize, processed: u64) -> Value {
        self.event(
            kind,
            vec![
                ("freq", json!(freq)),
                ("active", json!(active)),
                ("processed", json!(processed)),
                ("loadavg", json!(load_average())),
                ("sw_ident", json!("py-celery")),
                ("sw_ver", json!("5.7.0")),
                ("sw_sys", json!("Linux")),
            ],
        )
    }
}

/// The AMQP routing key / Redis channel suffix of an event type: `task-received` → `task.received`.
pub fn routing_key(kind: &str) -> String {
    kind.replace('-', ".")
}

/// Seconds since the epoch as a float, like Python's `time.time()`.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// 1/5/15-minute load averages rounded to 2 decimals (`[0.0, 0.0, 0.0]` where unavailable).
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (slot, field) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = field
            .parse::<f64>()
            .map(|v| (v * 100.0).round() / 100.0)
            .unwrap_or(0.0);
    }
    out
}

/// Splits a received event body into events: a single object or a `task.multi` list.
pub fn unbatch(body: Value) -> Vec<Value> {
    match body {
        Value::Array(items) => items.into_iter().filter(Value::is_object).collect(),
        obj @ Value::Object(_) => vec![obj],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_order_matches_python_workers() {
        let f = EventFactory::new("w@h");
        let e = f.event("task-started", vec![("uuid", json!("abc"))]);
        let keys: Vec<&String> = e
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        assert_eq!(
            keys,
            [
                "hostname",
                "utcoffset",
                "pid",
                "clock",
                "uuid",
                "timestamp",
                "type"
            ]
        );
        assert_eq!(e["clock"], 1);
        let w = f.worker("worker-heartbeat", 2.0, 1, 5);
        assert_eq!(w["clock"], 2);
        assert_eq!(w["freq"], 2.0);
        assert_eq!(routing_key("worker-heartbeat"), "worker.heartbeat");
    }

    #[test]
    fn clock_adjusts_past_remote_values() {
        let c = LamportClock::default();
        assert_eq!(c.forward(), 1);
        assert_eq!(c.adjust(10), 11);
        assert_eq!(c.adjust(3), 12);
    }

    #[test]
    fn unbatch_accepts_both_forms() {
        assert_eq!(unbatch(json!([{"type": "a"}, {"type": "b"}])).len(), 2);
        assert_eq!(unbatch(json!({"type": "a"})).len(), 1);
        assert!(unbatch(json!("x")).is_empty());
    }
}
