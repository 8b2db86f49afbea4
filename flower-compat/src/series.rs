//! Time series for the dashboard's live charts, over a selectable window (15 min, 1 h, 24 h).
//!
//! * Task series (succeeded / failed per second, runtime percentiles) are computed on demand from the
//!   tasks in memory, which the history store restores at start: a restart keeps the past without a
//!   second copy of the data. One pass over the tasks, bucketed by the time they finished.
//! * Queue series (ready per queue and priority step, reserved, running, the workers' limit) cannot be
//!   rebuilt from task events — nothing tells when a message entered the broker — so [`sample_loop`]
//!   measures them every [`SAMPLE_EVERY`] and keeps the samples in a bounded buffer ([`QueueSamples`], module `samples`),
//!   written behind to the history store next to the tasks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::samples::{QueueSample, QueueSamples};
use crate::shared::Shared;
use crate::store::HistoryStore;
use crate::task::Task;

/// How often queue lengths and in-flight counts are measured.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// A chart window: how far back and how wide each point is (180 points each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minutes15,
    Hour1,
    Hours24,
}

impl Window {
    /// `15m`, `1h`, `24h` (the dashboard's selector values).
    pub fn parse(s: &str) -> Option<Window> {
        match s {
            "15m" => Some(Window::Minutes15),
            "1h" => Some(Window::Hour1),
            "24h" => Some(Window::Hours24),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Window::Minutes15 => "15m",
            Window::Hour1 => "1h",
            Window::Hours24 => "24h",
        }
    }

    /// Seconds covered.
    pub fn span(self) -> f64 {
        match self {
            Window::Minutes15 => 900.0,
            Window::Hour1 => 3600.0,
            Window::Hours24 => 86400.0,
        }
    }

    /// Seconds per point.
    pub fn step(self) -> f64 {
        self.span() / 180.0
    }

    /// Start of the first bucket and the number of buckets, aligned to the step so points do not
    /// shift between refreshes.
    fn grid(self, now: f64) -> (f64, usize) {
        let step = self.step();
        let end = (now / step).floor() * step + step;
        (end - self.span(), (self.span() / step).round() as usize)
    }
}

fn bucket_of(start: f64, step: f64, n: usize, ts: f64) -> Option<usize> {
    if !ts.is_finite() || ts < start {
        return None;
    }
    let i = ((ts - start) / step) as usize;
    (i < n).then_some(i)
}

/// Succeeded/failed rates and runtime percentiles per point.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskSeries {
    pub window: &'static str,
    pub step: f64,
    /// Start of each point's interval (epoch seconds).
    pub t: Vec<f64>,
    /// Tasks that succeeded in the interval, per second.
    pub succeeded: Vec<f64>,
    /// Tasks that failed in the interval, per second.
    pub failed: Vec<f64>,
    /// Runtime percentiles (seconds) of the tasks that finished in the interval; null when none did.
    pub p50: Vec<Option<f64>>,
    pub p90: Vec<Option<f64>>,
    pub p99: Vec<Option<f64>>,
    /// Task name the percentiles are restricted to (`None` = all tasks).
    pub runtime_of: Option<String>,
    /// Tasks that finished inside the window.
    pub finished: u64,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn runtime_of(t: &Task) -> Option<f64> {
    match t.runtime.as_ref()? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|r| r.is_finite() && *r >= 0.0)
}

/// The task series of `window` ending at `now`; percentiles over tasks named `runtime_of` (all when
/// `None`).
pub fn task_series<'a>(
    tasks: impl Iterator<Item = &'a Task>,
    window: Window,
    now: f64,
    runtime_name: Option<&str>,
) -> TaskSeries {
    let step = window.step();
    let (start, n) = window.grid(now);
    let mut ok = vec![0u64; n];
    let mut bad = vec![0u64; n];
    let mut runtimes: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut finished = 0;
    for t in tasks {
        let (at, slot) = match (t.succeeded, t.failed) {
            (Some(s), _) if t.state == "SUCCESS" => (s, &mut ok),
            (_, Some(f)) if t.state == "FAILURE" => (f, &mut bad),
            _ => continue,
        };
        let Some(i) = bucket_of(start, step, n, at) else {
            continue;
        };
        slot[i] += 1;
        finished += 1;
        if runtime_name.is_none_or(|name| t.name.as_deref() == Some(name)) {
            if let Some(r) = runtime_of(t) {
                runtimes[i].push(r);
            }
        }
    }
    let mut p50 = Vec::with_capacity(n);
    let mut p90 = Vec::with_capacity(n);
    let mut p99 = Vec::with_capacity(n);
    for r in &mut runtimes {
        r.sort_unstable_by(f64::total_cmp);
        p50.push(percentile(r, 50.0));
        p90.push(percentile(r, 90.0));
        p99.push(percentile(r, 99.0));
    }
    TaskSeries {
        window: window.name(),
        step,
        t: (0..n).map(|i| start + i as f64 * step).collect(),
        succeeded: ok.iter().map(|c| *c as f64 / step).collect(),
        failed: bad.iter().map(|c| *c as f64 / step).collect(),
        p50,
        p90,
        p99,
        runtime_of: runtime_name.map(str::to_owned),
        finished,
    }
}

/// One queue's lines: the highest value measured in each interval (a backlog peak is what matters),
/// null where nothing was measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueLine {
    pub queue: String,
    pub ready: Vec<Option<f64>>,
    /// Redis: ready per priority step.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub priorities: BTreeMap<String, Vec<Option<f64>>>,
    pub reserved: Vec<Option<f64>>,
    pub running: Vec<Option<f64>>,
    pub limit: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueSeries {
    pub window: &'static str,
    pub step: f64,
    pub t: Vec<f64>,
    pub queues: Vec<QueueLine>,
    /// Seconds between measurements.
    pub sample_every: f64,
}

fn raise(slot: &mut Option<f64>, v: f64) {
    *slot = Some(slot.map_or(v, |old| old.max(v)));
}

/// The queue series of `window` ending at `now`.
pub fn queue_series(samples: &QueueSamples, window: Window, now: f64) -> QueueSeries {
    let step = window.step();
    let (start, n) = window.grid(now);
    let mut lines: BTreeMap<&str, QueueLine> = BTreeMap::new();
    let empty = || vec![None; n];
    for s in samples.since(start) {
        let Some(i) = bucket_of(start, step, n, s.ts) else {
            continue;
        };
        let line = lines.entry(s.queue.as_str()).or_insert_with(|| QueueLine {
            queue: s.queue.clone(),
            ready: empty(),
            priorities: BTreeMap::new(),
            reserved: empty(),
            running: empty(),
            limit: empty(),
        });
        raise(&mut line.ready[i], s.ready as f64);
        raise(&mut line.reserved[i], s.reserved as f64);
        raise(&mut line.running[i], s.running as f64);
        if let Some(l) = s.limit {
            raise(&mut line.limit[i], l as f64);
        }
        for (p, v) in s.priorities.iter().flatten() {
            let series = line.priorities.entry(p.clone()).or_insert_with(empty);
            raise(&mut series[i], *v as f64);
        }
    }
    QueueSeries {
        window: window.name(),
        step,
        t: (0..n).map(|i| start + i as f64 * step).collect(),
        queues: lines.into_values().collect(),
        sample_every: SAMPLE_EVERY.as_secs_f64(),
    }
}

/// Each live worker's limit per queue it consumes, from its `stats` and `active_queues` replies:
/// celeriac reports `stats.pool.queues` (`{queue: concurrency}`); a Python worker's pool
/// (`max-concurrency`) serves all of its queues.
pub fn queue_limits(
    workers: &serde_json::Map<String, Value>,
    alive: &dyn Fn(&str) -> bool,
) -> HashMap<String, u64> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for (name, info) in workers {
        if !alive(name) {
            continue;
        }
        let per_queue = info
            .pointer("/stats/pool/queues")
            .and_then(Value::as_object);
        let pool = info
            .pointer("/stats/pool/max-concurrency")
            .and_then(Value::as_u64);
        let consumed = info
            .get("active_queues")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|q| q.get("name").and_then(Value::as_str));
        for q in consumed {
            let limit = per_queue
                .and_then(|m| m.get(q))
                .and_then(Value::as_u64)
                .or(pool);
            if let Some(l) = limit {
                *out.entry(q.to_string()).or_default() += l;
            }
        }
    }
    out
}

/// Measures every consumed queue each [`SAMPLE_EVERY`] until `stop`; samples go to memory and to the
/// store (a failed write is logged and not retried: one missing point is not worth a backlog).
pub async fn sample_loop(
    shared: Arc<Shared>,
    store: Option<Arc<dyn HistoryStore>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let names = shared.inspector.active_queue_names();
        if names.is_empty() {
            continue;
        }
        let details =
            crate::queues::details(shared.broker.as_ref(), &shared.inspector, &names).await;
        let now = celeriac_wire::events::now_epoch();
        let limits = {
            let state = shared.read_state();
            queue_limits(&shared.inspector.snapshot(), &|w| {
                state.workers.get(w).is_some_and(|w| w.alive(now))
            })
        };
        let batch: Vec<QueueSample> = details
            .into_iter()
            .map(|d| QueueSample {
                ts: now,
                limit: limits.get(&d.name).copied(),
                queue: d.name,
                ready: d.ready,
                priorities: d.priorities,
                reserved: d.reserved,
                running: d.running,
            })
            .collect();
        debug!(queues = batch.len(), "queue sample");
        {
            let mut samples = shared.write_samples();
            samples.evict_older_than(now - shared.config.max_age.as_secs_f64());
            samples.extend(batch.iter().cloned());
        }
        if let Some(store) = &store {
            if let Err(e) = store.save_samples(&batch).await {
                warn!("saving {} queue samples to the history: {e}", batch.len());
                shared.metrics.history_write_errors.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(uuid: &str, state: &str, at: f64, runtime: f64) -> Task {
        let mut t = Task::new(uuid, at);
        t.name = Some("execute_step_k8s_job".into());
        t.state = state.into();
        if state == "SUCCESS" {
            t.succeeded = Some(at);
        } else {
            t.failed = Some(at);
        }
        t.runtime = Some(serde_json::json!(runtime));
        t
    }

    #[test]
    fn rates_and_percentiles_per_interval() {
        let now = 9000.0; // grid of 5 s points, the last one [9000, 9005)
        let mut tasks: Vec<Task> = (0..10)
            .map(|i| {
                done(
                    &format!("s{i}"),
                    "SUCCESS",
                    8990.0 + i as f64 * 0.1,
                    i as f64 + 1.0,
                )
            })
            .collect();
        tasks.push(done("f", "FAILURE", 8991.0, 100.0));
        tasks.push(done("old", "SUCCESS", 1.0, 1.0));
        let mut running = Task::new("r", 8990.0);
        running.state = "STARTED".into();
        tasks.push(running);
        let s = task_series(tasks.iter(), Window::Minutes15, now, None);
        assert_eq!(s.t.len(), 180);
        assert_eq!(*s.t.last().unwrap(), 9000.0);
        let i = s.t.iter().position(|t| *t == 8990.0).unwrap();
        assert_eq!(s.succeeded[i], 10.0 / 5.0);
        assert_eq!(s.failed[i], 1.0 / 5.0);
        assert_eq!(s.finished, 11, "the old task is outside the window");
        // Runtimes 1..=10 and 100 → nearest rank.
        assert_eq!(s.p50[i], Some(6.0));
        assert_eq!(s.p90[i], Some(10.0));
        assert_eq!(s.p99[i], Some(100.0));
        assert_eq!(s.p50[i + 1], None);
        let only = task_series(tasks.iter(), Window::Minutes15, now, Some("other"));
        assert_eq!(only.p50[i], None, "percentiles restricted by name");
        assert_eq!(only.succeeded[i], 2.0);
    }

    #[test]
    fn queue_samples_take_the_peak_and_leave_gaps() {
        let mut q = QueueSamples::default();
        for (ts, ready) in [(8990.5, 3), (8992.0, 7), (8994.9, 2), (8996.0, 1)] {
            q.push(QueueSample {
                ts,
                queue: "dagster".into(),
                ready,
                priorities: Some(BTreeMap::from([("0".into(), ready), ("9".into(), 0)])),
                reserved: 0,
                running: 1,
                limit: Some(1),
            });
        }
        let s = queue_series(&q, Window::Minutes15, 9000.0);
        let i = s.t.iter().position(|t| *t == 8990.0).unwrap();
        let line = &s.queues[0];
        assert_eq!(line.ready[i], Some(7.0));
        assert_eq!(line.ready[i + 1], Some(1.0));
        assert_eq!(line.ready[i - 1], None);
        assert_eq!(line.priorities["0"][i], Some(7.0));
        assert_eq!(line.limit[i], Some(1.0));
        q.evict_older_than(8995.0);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn limits_per_queue_from_worker_replies() {
        let workers = serde_json::json!({
            "celeriac-a@h": {"stats": {"pool": {"max-concurrency": 3, "queues": {"q1": 1, "q2": 2}}},
                             "active_queues": [{"name": "q1"}, {"name": "q2"}]},
            "py@h": {"stats": {"pool": {"max-concurrency": 4}}, "active_queues": [{"name": "q1"}]},
            "gone@h": {"stats": {"pool": {"max-concurrency": 8}}, "active_queues": [{"name": "q1"}]},
        });
        let limits = queue_limits(workers.as_object().unwrap(), &|w| w != "gone@h");
        assert_eq!(limits["q1"], 5);
        assert_eq!(limits["q2"], 2);
    }

    #[test]
    fn windows() {
        assert_eq!(Window::parse("1h"), Some(Window::Hour1));
        assert_eq!(Window::parse("2h"), None);
        assert_eq!(Window::Hours24.step(), 480.0);
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[4.0], 99.0), Some(4.0));
    }
}
