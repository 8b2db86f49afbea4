//! One worker as the events describe it (`celery.events.state.Worker`): created by its first event;
//! every event (task events too) appends a heartbeat (at most [`HEARTBEAT_MAX`] kept); alive while
//! `now < last_heartbeat + freq * 2`; `worker-offline` clears the heartbeats. Apart from
//! [`super::EventsState`] because liveness is its own rule, read by the API without the merging.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{json, Map, Value};

/// Heartbeats kept per worker (`Worker.heartbeat_max`).
pub const HEARTBEAT_MAX: usize = 4;
/// A worker is alive for `freq * 2` seconds after its last heartbeat (`HEARTBEAT_EXPIRE_WINDOW = 200` %).
pub const EXPIRE_WINDOW: f64 = 2.0;

/// One worker as the events describe it (`celery.events.state.Worker`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Worker {
    pub hostname: String,
    pub pid: Option<Value>,
    pub freq: f64,
    pub heartbeats: Vec<f64>,
    pub clock: Value,
    pub active: Option<Value>,
    pub processed: Option<Value>,
    pub loadavg: Option<Value>,
    pub sw_ident: Option<Value>,
    pub sw_ver: Option<Value>,
    pub sw_sys: Option<Value>,
    /// Events of each type seen from this worker (Flower's `state.counter`).
    pub counter: HashMap<String, u64>,
}

impl Worker {
    pub fn new(hostname: &str) -> Worker {
        Worker {
            hostname: hostname.into(),
            freq: 60.0,
            clock: json!(0),
            ..Default::default()
        }
    }

    fn heartbeat(&mut self, local_received: f64) {
        if self.heartbeats.len() > HEARTBEAT_MAX - 1 {
            self.heartbeats.remove(0);
        }
        match self.heartbeats.last() {
            Some(last) if local_received > *last => self.heartbeats.push(local_received),
            None => self.heartbeats.push(local_received),
            Some(_) => {
                let at = self.heartbeats.partition_point(|h| *h <= local_received);
                self.heartbeats.insert(at, local_received);
            }
        }
    }

    /// `Worker.event(type_, timestamp, local_received, fields)`.
    pub(super) fn apply(
        &mut self,
        subject: Option<&str>,
        ts: Option<f64>,
        local_received: Option<f64>,
        fields: Option<&Map<String, Value>>,
    ) {
        for (k, v) in fields.into_iter().flatten() {
            match k.as_str() {
                "pid" => self.pid = Some(v.clone()),
                "freq" => {
                    if let Some(f) = v.as_f64() {
                        self.freq = f
                    }
                }
                "clock" => self.clock = v.clone(),
                "active" => self.active = Some(v.clone()),
                "processed" => self.processed = Some(v.clone()),
                "loadavg" => self.loadavg = Some(v.clone()),
                "sw_ident" => self.sw_ident = Some(v.clone()),
                "sw_ver" => self.sw_ver = Some(v.clone()),
                "sw_sys" => self.sw_sys = Some(v.clone()),
                _ => {}
            }
        }
        if subject == Some("offline") {
            self.heartbeats.clear();
            return;
        }
        let (Some(lr), Some(ts)) = (local_received, ts) else {
            return;
        };
        if lr == 0.0 || ts == 0.0 {
            return;
        }
        self.heartbeat(lr);
    }

    pub fn heartbeat_expires(&self) -> Option<f64> {
        self.heartbeats
            .last()
            .map(|last| last + self.freq * EXPIRE_WINDOW)
    }

    pub fn alive(&self, now: f64) -> bool {
        self.heartbeat_expires().is_some_and(|exp| now < exp)
    }
}
