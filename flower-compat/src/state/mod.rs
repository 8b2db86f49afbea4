//! The cluster as the events tell it: workers and tasks, merged exactly as `celery.events.state.State`
//! (which Flower 2.2 subclasses) merges them, with bounded memory.
//!
//! * Workers (`worker.rs`): created by their first event; every event (task events too) appends a
//!   heartbeat; `worker-offline` clears them.
//! * Tasks ([`crate::task`]): one record per uuid, each event merged by `celery.states.precedence`.
//! * Bounds: at most `max_tasks` tasks (the oldest-created goes first, as Flower's LRU does) and none older
//!   than `max_age` (evicted by [`EventsState::evict_older_than`]).
//! * Reading: `query.rs` pages `/api/tasks`; an index by Dagster run serves the run timelines.

mod query;
mod worker;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use serde_json::{json, Map, Value};

use crate::dagster;
use crate::metrics::FlowerMetrics;
use crate::search::QueryError;
use crate::task::Task;

pub use query::{TaskPage, TaskQuery, SORT_KEYS};
pub use worker::{Worker, EXPIRE_WINDOW, HEARTBEAT_MAX};

/// Bounds against hostile events (anyone who may publish to `celeryev` chooses hostnames, task names and
/// event types; Flower keeps them all): workers kept (past it, the one heard from longest ago goes),
/// task names listed, event types counted per worker.
pub const MAX_WORKERS: usize = 10_000;
pub const MAX_TASK_TYPES: usize = 10_000;
pub const MAX_EVENT_KINDS: usize = 64;

/// Workers and tasks, updated by events, read by the API.
pub struct EventsState {
    pub workers: HashMap<String, Worker>,
    tasks: HashMap<String, Task>,
    /// Creation order of `tasks` (uuid), for eviction; may hold uuids already removed.
    order: VecDeque<String>,
    /// Dagster run id → uuids of its step tasks in `tasks`: a run's timeline reads its few tasks,
    /// not the whole history (100,000 kwargs scans took 91 ms).
    runs: HashMap<String, Vec<String>>,
    task_types: BTreeSet<String>,
    max_tasks: usize,
    /// Tasks changed since the history store last took them.
    dirty: HashSet<String>,
    /// Whether changes are tracked for a history store (no store: no bookkeeping).
    track_dirty: bool,
    pub event_count: u64,
    metrics: Option<FlowerMetrics>,
}

impl EventsState {
    pub fn new(max_tasks: usize, metrics: Option<FlowerMetrics>) -> EventsState {
        EventsState {
            workers: HashMap::new(),
            tasks: HashMap::new(),
            order: VecDeque::new(),
            runs: HashMap::new(),
            task_types: BTreeSet::new(),
            max_tasks: max_tasks.max(1),
            dirty: HashSet::new(),
            track_dirty: false,
            event_count: 0,
            metrics,
        }
    }

    pub fn task(&self, uuid: &str) -> Option<&Task> {
        self.tasks.get(uuid)
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values()
    }

    /// The step tasks whose kwargs name Dagster run `run_id`.
    pub fn tasks_of_run<'a>(&'a self, run_id: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.runs
            .get(run_id)
            .into_iter()
            .flatten()
            .filter_map(|uuid| self.tasks.get(uuid))
    }

    /// Files `task` under its run, once its kwargs are known.
    fn index_run(&mut self, uuid: &str) {
        let Some(run) = self
            .tasks
            .get(uuid)
            .and_then(|t| t.kwargs.as_ref())
            .and_then(dagster::run_id)
        else {
            return;
        };
        let uuids = self.runs.entry(run).or_default();
        if !uuids.iter().any(|u| u == uuid) {
            uuids.push(uuid.to_string());
        }
    }

    /// Removes `uuid` from memory and from the indexes.
    fn forget(&mut self, uuid: &str) -> bool {
        let Some(t) = self.tasks.remove(uuid) else {
            return false;
        };
        self.dirty.remove(uuid);
        if let Some(run) = t.kwargs.as_ref().and_then(dagster::run_id) {
            if let Some(uuids) = self.runs.get_mut(&run) {
                uuids.retain(|u| u != uuid);
                if uuids.is_empty() {
                    self.runs.remove(&run);
                }
            }
        }
        true
    }

    /// `state.task_types()`: every task name seen, sorted.
    pub fn task_types(&self) -> Vec<String> {
        self.task_types.iter().cloned().collect()
    }

    /// Restores tasks from the history store (oldest first); they count against `max_tasks`.
    pub fn restore(&mut self, tasks: Vec<Task>) {
        for t in tasks {
            if self.tasks.contains_key(&t.uuid) {
                continue;
            }
            self.make_room();
            if let Some(name) = &t.name {
                self.task_types.insert(name.clone());
            }
            let uuid = t.uuid.clone();
            self.order.push_back(uuid.clone());
            self.tasks.insert(uuid.clone(), t);
            self.index_run(&uuid);
        }
    }

    /// Records changes from now on for [`EventsState::take_dirty`] (a history store is configured).
    pub fn track_changes(&mut self) {
        self.track_dirty = true;
    }

    /// Takes the uuids changed since the last call, with their current records.
    pub fn take_dirty(&mut self) -> Vec<Task> {
        let ids: Vec<String> = self.dirty.drain().collect();
        ids.iter()
            .filter_map(|id| self.tasks.get(id).cloned())
            .collect()
    }

    /// Puts records back after a failed store write (only those still in memory).
    pub fn mark_dirty(&mut self, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            if self.tasks.contains_key(&id) {
                self.dirty.insert(id);
            }
        }
    }

    fn make_room(&mut self) {
        while self.tasks.len() >= self.max_tasks {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.forget(&oldest);
        }
    }

    /// Drops tasks first seen before `cutoff` (epoch seconds). Returns how many.
    pub fn evict_older_than(&mut self, cutoff: f64) -> usize {
        let mut n = 0;
        while let Some(front) = self.order.front() {
            match self.tasks.get(front) {
                Some(t) if t.first_seen >= cutoff => break,
                Some(_) => {
                    if let Some(id) = self.order.pop_front() {
                        self.forget(&id);
                        n += 1;
                    }
                }
                None => {
                    self.order.pop_front();
                }
            }
        }
        n
    }

    /// Applies one received event (already through [`prepare_event`]). Returns the task uuid it touched.
    pub fn apply(&mut self, event: &Map<String, Value>) -> Option<String> {
        self.event_count += 1;
        let kind = event.get("type")?.as_str()?;
        let (group, subject) = kind.split_once('-').unwrap_or((kind, ""));
        let hostname = event.get("hostname").and_then(Value::as_str);
        match group {
            "worker" => {
                self.worker_event(event, kind, subject, hostname?);
                None
            }
            "task" => {
                let uuid = event.get("uuid")?.as_str()?;
                self.task_event(event, kind, subject, uuid, hostname?)
            }
            _ => None,
        }
    }

    /// `worker-*` (`kind`, whose `subject` is `online`, `heartbeat`, `offline`, …) from `hostname`.
    fn worker_event(
        &mut self,
        event: &Map<String, Value>,
        kind: &str,
        subject: &str,
        hostname: &str,
    ) {
        let (ts, local_received) = times(event);
        let offline = subject == "offline";
        if offline && !self.workers.contains_key(hostname) {
            // Python builds a throw-away Worker and does not keep it.
            self.count(hostname, kind);
            if let Some(m) = &self.metrics {
                m.observe_worker(hostname, kind, event);
            }
            return;
        }
        self.make_worker_room(hostname);
        let w = self
            .workers
            .entry(hostname.to_string())
            .or_insert_with(|| Worker::new(hostname));
        w.apply(Some(subject), ts, local_received, Some(event));
        self.count(hostname, kind);
        if let Some(m) = &self.metrics {
            m.observe_worker(hostname, kind, event);
        }
    }

    /// `task-*` (`kind`, whose `subject` is `sent`, `received`, `started`, …) about task `uuid`, sent by
    /// `hostname` (the client for `task-sent`, else the worker). Returns the uuid.
    fn task_event(
        &mut self,
        event: &Map<String, Value>,
        kind: &str,
        subject: &str,
        uuid: &str,
        hostname: &str,
    ) -> Option<String> {
        let (ts, local_received) = times(event);
        if !self.tasks.contains_key(uuid) {
            self.make_room();
            self.order.push_back(uuid.to_string());
            let now = local_received.unwrap_or_else(celeriac_wire::events::now_epoch);
            self.tasks.insert(uuid.to_string(), Task::new(uuid, now));
        }
        if subject != "sent" {
            self.make_worker_room(hostname);
            let w = self
                .workers
                .entry(hostname.to_string())
                .or_insert_with(|| Worker::new(hostname));
            w.apply(None, ts, local_received, None);
        }
        let task = self.tasks.get_mut(uuid)?;
        let had_kwargs = task.kwargs.is_some();
        if subject == "sent" {
            task.client = Some(hostname.to_string());
        } else {
            task.worker = Some(hostname.to_string());
        }
        task.apply(subject, ts, event);
        let kwargs_arrived = !had_kwargs && task.kwargs.is_some();
        let name = task.name.clone();
        let parent = task.parent_id.clone();
        if let Some(m) = &self.metrics {
            m.observe_task(hostname, kind, event, task);
        }
        if kwargs_arrived {
            self.index_run(uuid);
        }
        if let Some(name) = name {
            if !self.task_types.contains(&name) && self.task_types.len() < MAX_TASK_TYPES {
                self.task_types.insert(name);
            }
        }
        if let Some(Value::String(p)) = parent {
            self.add_child(p, uuid);
        }
        self.count(hostname, kind);
        if self.track_dirty {
            self.dirty.insert(uuid.to_string());
        }
        Some(uuid.to_string())
    }

    /// Lists `uuid` among the children of `parent`, when the parent is in memory.
    fn add_child(&mut self, parent: String, uuid: &str) {
        if let Some(record) = self.tasks.get_mut(&parent) {
            if !record.children.iter().any(|c| c == uuid) {
                record.children.push(uuid.to_string());
                if self.track_dirty {
                    self.dirty.insert(parent);
                }
            }
        }
    }

    fn count(&mut self, hostname: &str, kind: &str) {
        if let Some(w) = self.workers.get_mut(hostname) {
            if let Some(n) = w.counter.get_mut(kind) {
                *n += 1;
            } else if w.counter.len() < MAX_EVENT_KINDS {
                w.counter.insert(kind.to_string(), 1);
            }
        }
    }

    /// Before `hostname` is added: at [`MAX_WORKERS`], forgets the worker heard from longest ago.
    fn make_worker_room(&mut self, hostname: &str) {
        if self.workers.len() < MAX_WORKERS || self.workers.contains_key(hostname) {
            return;
        }
        let oldest = self
            .workers
            .iter()
            .min_by(|a, b| {
                let last = |w: &Worker| w.heartbeats.last().copied().unwrap_or(f64::NEG_INFINITY);
                last(a.1).total_cmp(&last(b.1))
            })
            .map(|(h, _)| h.clone());
        if let Some(h) = oldest {
            self.workers.remove(&h);
        }
    }

    /// `/api/tasks`: filter, order, page.
    pub fn query(&self, q: &TaskQuery) -> Result<TaskPage<'_>, QueryError> {
        query::page(self.tasks.values(), self.tasks.len(), q)
    }
}

/// An event's `timestamp` (the sender's clock, adjusted) and `local_received` (ours).
fn times(event: &Map<String, Value>) -> (Option<f64>, Option<f64>) {
    (
        event.get("timestamp").and_then(Value::as_f64),
        event.get("local_received").and_then(Value::as_f64),
    )
}

/// What `EventReceiver` does to every event before the state sees it: the sender's clock offset removed
/// from `timestamp` (`adjust_timestamp`) and `local_received` added.
pub fn prepare_event(mut event: Map<String, Value>, now: f64) -> Map<String, Value> {
    let here = local_utcoffset_hours();
    if let (Some(offset), Some(ts)) = (
        event.get("utcoffset").and_then(Value::as_f64),
        event.get("timestamp").and_then(Value::as_f64),
    ) {
        event.insert("timestamp".into(), json!(ts - (offset - here) * 3600.0));
    }
    event.insert("local_received".into(), json!(now));
    event
}

/// This host's offset in hours *west* of UTC, as Python's `utcoffset()` reports it.
pub fn local_utcoffset_hours() -> f64 {
    let east = chrono::Local::now().offset().local_minus_utc();
    -(east as f64) / 3600.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TASK_FIELDS;

    #[test]
    fn hostile_hostnames_task_names_and_kinds_are_bounded() {
        let mut st = EventsState::new(100, None);
        for i in 0..(MAX_WORKERS + 50) {
            let e = serde_json::json!({"type": "worker-heartbeat", "hostname": format!("w{i}"),
                "timestamp": i as f64, "local_received": i as f64});
            st.apply(e.as_object().expect("object"));
        }
        assert_eq!(st.workers.len(), MAX_WORKERS);
        assert!(st.workers.contains_key(&format!("w{}", MAX_WORKERS + 49)));
        assert!(
            !st.workers.contains_key("w0"),
            "the longest silent worker went first"
        );
        for i in 0..(MAX_EVENT_KINDS + 10) {
            let e = serde_json::json!({"type": format!("worker-x{i}"), "hostname": "w1",
                "timestamp": 1.0, "local_received": 1.0});
            st.apply(e.as_object().expect("object"));
        }
        assert!(st.workers.get("w1").expect("w1").counter.len() <= MAX_EVENT_KINDS);
        for i in 0..(MAX_TASK_TYPES + 10) {
            let e = serde_json::json!({"type": "task-received", "hostname": "w1", "uuid": format!("t{i}"),
                "name": format!("n{i}"), "timestamp": 1.0, "local_received": 1.0});
            st.apply(e.as_object().expect("object"));
        }
        assert_eq!(st.task_types().len(), MAX_TASK_TYPES);
    }

    fn ev(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn the_run_index_follows_arrivals_evictions_and_restores() {
        let kwargs = |run: &str, step: &str| {
            format!(
                "{{'execute_step_args_packed': {{'__class__': 'ExecuteStepArgs', 'pipeline_run_id': '{run}', \
                 'step_keys_to_execute': ['{step}']}}}}"
            )
        };
        let received = |uuid: &str, kw: String, t: f64| {
            ev(
                json!({"type": "task-received", "uuid": uuid, "hostname": "w@h", "timestamp": t,
                "local_received": t, "name": "execute_step_k8s_job", "kwargs": kw}),
            )
        };
        let mut s = EventsState::new(3, None);
        // Started before received: filed once the kwargs arrive.
        s.apply(&ev(json!({"type": "task-started", "uuid": "a", "hostname": "w@h", "timestamp": 1.0, "local_received": 1.0})));
        assert_eq!(s.tasks_of_run("r1").count(), 0);
        s.apply(&received("a", kwargs("r1", "s1"), 1.0));
        s.apply(&received("a", kwargs("r1", "s1"), 1.0));
        s.apply(&received("b", kwargs("r1", "s2"), 2.0));
        s.apply(&received("c", kwargs("r2", "s1"), 3.0));
        let uuids = |s: &EventsState, run: &str| {
            let mut v: Vec<String> = s.tasks_of_run(run).map(|t| t.uuid.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(uuids(&s, "r1"), ["a", "b"]);
        assert_eq!(uuids(&s, "r2"), ["c"]);
        // At the limit the oldest task goes, and with it its index entry.
        s.apply(&received("d", kwargs("r3", "s1"), 4.0));
        assert_eq!(uuids(&s, "r1"), ["b"]);
        assert_eq!(s.evict_older_than(3.5), 2);
        assert!(uuids(&s, "r1").is_empty() && uuids(&s, "r2").is_empty());
        assert!(!s.runs.contains_key("r1"), "empty entries are dropped");
        let mut restored = EventsState::new(10, None);
        restored.restore(s.tasks().cloned().collect());
        assert_eq!(uuids(&restored, "r3"), ["d"]);
    }

    #[test]
    fn task_lifecycle_and_late_received() {
        let mut s = EventsState::new(10, None);
        s.apply(&ev(json!({"type": "task-started", "uuid": "a", "hostname": "w@h", "timestamp": 2.0, "local_received": 2.0, "clock": 3})));
        s.apply(&ev(json!({"type": "task-received", "uuid": "a", "hostname": "w@h", "timestamp": 1.0, "local_received": 1.0, "clock": 2,
                               "name": "t", "args": "()", "kwargs": "{}", "retries": 0, "eta": null, "expires": null, "root_id": "a", "parent_id": null})));
        let t = s.task("a").unwrap();
        assert_eq!(t.state, "STARTED");
        assert_eq!(t.name.as_deref(), Some("t"));
        assert_eq!(t.received, Some(1.0));
        assert_eq!(
            t.timestamp,
            Some(2.0),
            "a late received event keeps the newer timestamp"
        );
        assert_eq!(t.clock, json!(3));
        s.apply(&ev(json!({"type": "task-succeeded", "uuid": "a", "hostname": "w@h", "timestamp": 3.0, "local_received": 3.0, "clock": 4, "result": "'x'", "runtime": 1.5})));
        let d = s.task("a").unwrap().as_dict();
        assert_eq!(d["state"], "SUCCESS");
        assert_eq!(d["worker"], "w@h");
        assert_eq!(d["runtime"], 1.5);
        assert_eq!(d.keys().count(), TASK_FIELDS.len());
        assert_eq!(s.task_types(), vec!["t".to_string()]);
        assert!(
            s.workers["w@h"].alive(3.0 + 100.0),
            "task events are heartbeats (freq 60 default)"
        );
    }

    #[test]
    fn bounded_by_count_and_age() {
        let mut s = EventsState::new(3, None);
        for i in 0..5 {
            s.apply(&ev(json!({"type": "task-received", "uuid": format!("t{i}"), "hostname": "w", "timestamp": i as f64, "local_received": i as f64, "name": "n"})));
        }
        assert_eq!(s.task_count(), 3);
        assert!(s.task("t0").is_none() && s.task("t4").is_some());
        assert_eq!(s.evict_older_than(4.0), 2);
        assert_eq!(s.task_count(), 1);
    }

    #[test]
    fn worker_offline_and_expiry() {
        let mut s = EventsState::new(3, None);
        s.apply(&ev(json!({"type": "worker-online", "hostname": "w", "timestamp": 10.0, "local_received": 10.0, "freq": 2.0})));
        assert!(s.workers["w"].alive(13.9));
        assert!(!s.workers["w"].alive(14.1));
        s.apply(&ev(json!({"type": "worker-offline", "hostname": "w", "timestamp": 11.0, "local_received": 11.0, "freq": 2.0})));
        assert!(!s.workers["w"].alive(11.5));
    }

    #[test]
    fn query_orders_and_pages() {
        let mut s = EventsState::new(100, None);
        for i in 0..10 {
            s.apply(&ev(json!({"type": "task-received", "uuid": format!("t{i}"), "hostname": if i % 2 == 0 {"a"} else {"b"}, "timestamp": i as f64, "local_received": i as f64, "name": "n"})));
        }
        let page = s
            .query(&TaskQuery {
                limit: Some(3),
                offset: 1,
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<&str> = page.tasks.iter().map(|t| t.uuid.as_str()).collect();
        assert_eq!(ids, ["t8", "t7", "t6"]);
        let page = s
            .query(&TaskQuery {
                workername: Some("a".into()),
                sort_by: Some("received".into()),
                ..Default::default()
            })
            .unwrap();
        let ids: Vec<&str> = page.tasks.iter().map(|t| t.uuid.as_str()).collect();
        assert_eq!(ids, ["t0", "t2", "t4", "t6", "t8"]);
    }
}
