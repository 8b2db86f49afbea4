//! The cluster as the events tell it: workers and tasks, merged exactly as `celery.events.state.State`
//! (which Flower 2.2 subclasses) merges them, with bounded memory.
//!
//! * Workers: created by their first event; every event (task events too) appends a heartbeat (at most
//!   4 kept); a worker is alive while `now < last_heartbeat + freq * 2`; `worker-offline` clears them.
//! * Tasks: one record per uuid. Each event sets its timestamp field (`received`, `started`, …) and, when
//!   its state does not rank below the current one (`celery.states.precedence`), its fields and state;
//!   an out-of-order `task-received` only fills `name, args, kwargs, parent_id, root_id, retries, eta,
//!   expires`.
//! * Bounds: at most `max_tasks` tasks (the oldest-created goes first, as Flower's LRU does) and none older
//!   than `max_age` (evicted by [`EventsState::evict_older_than`]).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::dagster;
use crate::metrics::FlowerMetrics;
use crate::search::{self, Query, QueryError};

/// Heartbeats kept per worker (`Worker.heartbeat_max`).
pub const HEARTBEAT_MAX: usize = 4;
/// A worker is alive for `freq * 2` seconds after its last heartbeat (`HEARTBEAT_EXPIRE_WINDOW = 200` %).
pub const EXPIRE_WINDOW: f64 = 2.0;

/// Bounds against hostile events (anyone who may publish to `celeryev` chooses hostnames, task names and
/// event types; Flower keeps them all): workers kept (past it, the one heard from longest ago goes),
/// task names listed, event types counted per worker.
pub const MAX_WORKERS: usize = 10_000;
pub const MAX_TASK_TYPES: usize = 10_000;
pub const MAX_EVENT_KINDS: usize = 64;

/// `celery.states.PRECEDENCE`: lower index wins; unknown states rank like `None`.
fn precedence(state: &str) -> usize {
    match state {
        "SUCCESS" => 0,
        "FAILURE" => 1,
        "REVOKED" => 3,
        "STARTED" => 4,
        "RECEIVED" => 5,
        "REJECTED" => 6,
        "RETRY" => 7,
        "PENDING" => 8,
        _ => 2,
    }
}

/// The fields of `celery.events.state.Task._fields`, in order (the keys of `/api/tasks` entries).
pub const TASK_FIELDS: [&str; 31] = [
    "uuid",
    "name",
    "state",
    "received",
    "sent",
    "started",
    "rejected",
    "succeeded",
    "failed",
    "retried",
    "revoked",
    "args",
    "kwargs",
    "eta",
    "expires",
    "retries",
    "worker",
    "result",
    "exception",
    "timestamp",
    "runtime",
    "traceback",
    "exchange",
    "routing_key",
    "clock",
    "client",
    "root",
    "root_id",
    "parent",
    "parent_id",
    "children",
];

/// One task as the events describe it. Serialized as is for the history store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succeeded: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<Value>,
    #[serde(default = "zero")]
    pub clock: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<String>,
    /// Local time this process (or its predecessor, for restored history) first saw the task: the
    /// eviction order and the age bound.
    #[serde(default)]
    pub first_seen: f64,
}

fn zero() -> Value {
    json!(0)
}

fn opt_f64(v: Option<f64>) -> Value {
    v.map(Value::from).unwrap_or(Value::Null)
}

fn opt<T: Clone + Into<Value>>(v: &Option<T>) -> Value {
    v.clone().map(Into::into).unwrap_or(Value::Null)
}

impl Task {
    pub fn new(uuid: &str, first_seen: f64) -> Task {
        Task {
            uuid: uuid.to_string(),
            state: "PENDING".into(),
            clock: zero(),
            first_seen,
            ..Default::default()
        }
    }

    /// `Task.as_dict()`: every field of [`TASK_FIELDS`], `worker` as the hostname (or null).
    pub fn as_dict(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for key in TASK_FIELDS {
            let v = match key {
                "uuid" => json!(self.uuid),
                "name" => opt(&self.name),
                "state" => json!(self.state),
                "received" => opt_f64(self.received),
                "sent" => opt_f64(self.sent),
                "started" => opt_f64(self.started),
                "rejected" => opt_f64(self.rejected),
                "succeeded" => opt_f64(self.succeeded),
                "failed" => opt_f64(self.failed),
                "retried" => opt_f64(self.retried),
                "revoked" => opt_f64(self.revoked),
                "args" => opt(&self.args),
                "kwargs" => opt(&self.kwargs),
                "eta" => opt(&self.eta),
                "expires" => opt(&self.expires),
                "retries" => opt(&self.retries),
                "worker" => opt(&self.worker),
                "result" => opt(&self.result),
                "exception" => opt(&self.exception),
                "timestamp" => opt_f64(self.timestamp),
                "runtime" => opt(&self.runtime),
                "traceback" => opt(&self.traceback),
                "exchange" => opt(&self.exchange),
                "routing_key" => opt(&self.routing_key),
                "clock" => self.clock.clone(),
                "client" => opt(&self.client),
                "root" | "root_id" => opt(&self.root_id),
                "parent" | "parent_id" => opt(&self.parent_id),
                "children" => json!(self.children),
                _ => Value::Null,
            };
            m.insert(key.to_string(), v);
        }
        m
    }

    /// `/api/tasks` entry: like [`Task::as_dict`] but without `worker` when no worker is known (Flower pops
    /// it and only puts the hostname back).
    pub fn list_entry(&self) -> Map<String, Value> {
        let mut m = self.as_dict();
        if let Some(w) = m.remove("worker") {
            if !w.is_null() {
                m.insert("worker".into(), w);
            }
        }
        m
    }

    /// The timestamp field named after the event (`received` for `task-received` …).
    fn stamp(&mut self, subject: &str, ts: Option<f64>) -> Option<&'static str> {
        let (slot, state) = match subject {
            "sent" => (&mut self.sent, "PENDING"),
            "received" => (&mut self.received, "RECEIVED"),
            "started" => (&mut self.started, "STARTED"),
            "failed" => (&mut self.failed, "FAILURE"),
            "retried" => (&mut self.retried, "RETRY"),
            "succeeded" => (&mut self.succeeded, "SUCCESS"),
            "revoked" => (&mut self.revoked, "REVOKED"),
            "rejected" => (&mut self.rejected, "REJECTED"),
            _ => return None,
        };
        *slot = ts;
        Some(state)
    }

    fn set_field(&mut self, key: &str, v: &Value) {
        match key {
            "name" => self.name = v.as_str().map(str::to_owned),
            "args" => self.args = Some(v.clone()),
            "kwargs" => self.kwargs = Some(v.clone()),
            "eta" => self.eta = Some(v.clone()),
            "expires" => self.expires = Some(v.clone()),
            "retries" => self.retries = Some(v.clone()),
            "result" => self.result = Some(v.clone()),
            "exception" => self.exception = Some(v.clone()),
            "timestamp" => self.timestamp = v.as_f64(),
            "runtime" => self.runtime = Some(v.clone()),
            "traceback" => self.traceback = Some(v.clone()),
            "exchange" => self.exchange = Some(v.clone()),
            "routing_key" => self.routing_key = Some(v.clone()),
            "clock" => self.clock = v.clone(),
            "root_id" => self.root_id = Some(v.clone()),
            "parent_id" => self.parent_id = Some(v.clone()),
            _ => {}
        }
    }

    /// `Task.event(type_, timestamp, local_received, fields)`.
    pub fn apply(&mut self, subject: &str, ts: Option<f64>, fields: &Map<String, Value>) {
        let state = match self.stamp(subject, ts) {
            Some(s) => s.to_string(),
            None => subject.to_uppercase(),
        };
        if state != "RETRY" && self.state != "RETRY" && precedence(&state) > precedence(&self.state)
        {
            // An event older than what we know: a late `task-received` still tells the name and args.
            const KEEP: [&str; 8] = [
                "name",
                "args",
                "kwargs",
                "parent_id",
                "root_id",
                "retries",
                "eta",
                "expires",
            ];
            for (k, v) in fields {
                if state != "RECEIVED" || KEEP.contains(&k.as_str()) {
                    self.set_field(k, v);
                }
            }
        } else {
            for (k, v) in fields {
                self.set_field(k, v);
            }
            self.state = state;
            self.timestamp = ts;
        }
    }
}

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
            clock: zero(),
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
    fn apply(
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

/// Filters, order and page of `/api/tasks` (Flower's `iter_tasks`).
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub limit: Option<usize>,
    pub offset: usize,
    pub taskname: Option<String>,
    pub workername: Option<String>,
    pub state: Option<String>,
    pub received_start: Option<f64>,
    pub received_end: Option<f64>,
    /// One of `name, state, received, started`, optionally prefixed with `-` (descending).
    pub sort_by: Option<String>,
    pub search: Option<String>,
}

/// Sort keys `/api/tasks` accepts.
pub const SORT_KEYS: [&str; 4] = ["name", "received", "started", "state"];

/// A page of tasks with the counts the dashboard shows.
pub struct TaskPage<'a> {
    pub tasks: Vec<&'a Task>,
    pub filtered: usize,
    pub total: usize,
}

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
        let ts = event.get("timestamp").and_then(Value::as_f64);
        let local_received = event.get("local_received").and_then(Value::as_f64);
        match group {
            "worker" => {
                let hostname = hostname?;
                let offline = subject == "offline";
                if offline && !self.workers.contains_key(hostname) {
                    // Python builds a throw-away Worker and does not keep it.
                    self.count(hostname, kind);
                    if let Some(m) = &self.metrics {
                        m.observe_worker(hostname, kind, event);
                    }
                    return None;
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
                None
            }
            "task" => {
                let uuid = event.get("uuid")?.as_str()?;
                let hostname = hostname?;
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
                    if let Some(parent) = self.tasks.get_mut(&p) {
                        if !parent.children.iter().any(|c| c == uuid) {
                            parent.children.push(uuid.to_string());
                            if self.track_dirty {
                                self.dirty.insert(p);
                            }
                        }
                    }
                }
                self.count(hostname, kind);
                if self.track_dirty {
                    self.dirty.insert(uuid.to_string());
                }
                Some(uuid.to_string())
            }
            _ => None,
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
        let parsed: Query = search::parse(q.search.as_deref().unwrap_or(""))?;
        let fold = |s: &Option<String>| s.as_deref().map(str::to_lowercase);
        let (name, worker, state) = (fold(&q.taskname), fold(&q.workername), fold(&q.state));
        let mut hits: Vec<&Task> = self
            .tasks
            .values()
            .filter(|t| {
                name.as_ref()
                    .is_none_or(|n| t.name.as_deref().is_some_and(|x| search::eq_ci(x, n)))
                    && worker
                        .as_ref()
                        .is_none_or(|w| t.worker.as_deref().is_some_and(|x| search::eq_ci(x, w)))
                    && state.as_ref().is_none_or(|s| search::eq_ci(&t.state, s))
                    && in_range(t, q.received_start, q.received_end)
                    && parsed.matches(t)
            })
            .collect();
        let filtered = hits.len();
        let (key, descending) = match q.sort_by.as_deref() {
            Some(s) => (Some(s.trim_start_matches('-')), s.starts_with('-')),
            None => (None, true),
        };
        let cmp = |a: &&Task, b: &&Task| -> std::cmp::Ordering {
            let o = match key {
                None => a
                    .timestamp
                    .unwrap_or(0.0)
                    .total_cmp(&b.timestamp.unwrap_or(0.0))
                    .then_with(|| a.uuid.cmp(&b.uuid)),
                Some(k) => sort_key(a, k)
                    .partial_cmp(&sort_key(b, k))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then_with(|| a.uuid.cmp(&b.uuid)),
            };
            if descending {
                o.reverse()
            } else {
                o
            }
        };
        let end = q.limit.map(|l| q.offset.saturating_add(l));
        match end {
            Some(end) if end < hits.len() => {
                if end > 0 {
                    hits.select_nth_unstable_by(end - 1, cmp);
                }
                hits.truncate(end);
                hits.sort_unstable_by(cmp);
            }
            _ => hits.sort_unstable_by(cmp),
        }
        let page: Vec<&Task> = hits.into_iter().skip(q.offset).collect();
        Ok(TaskPage {
            tasks: page,
            filtered,
            total: self.tasks.len(),
        })
    }
}

#[derive(PartialEq, PartialOrd)]
enum SortValue {
    Missing,
    Num(f64),
    Text(String),
}

/// `_task_sort_key`: tasks without the value first, then by value (numbers for times, case-folded text).
fn sort_key(t: &Task, key: &str) -> (bool, SortValue) {
    let v = match key {
        "received" => t.received.map(SortValue::Num),
        "started" => t.started.map(SortValue::Num),
        "name" => t.name.as_deref().map(|n| SortValue::Text(n.to_lowercase())),
        "state" => Some(SortValue::Text(t.state.to_lowercase())),
        _ => None,
    };
    match v {
        Some(v) => (true, v),
        None => (false, SortValue::Missing),
    }
}

fn in_range(t: &Task, start: Option<f64>, end: Option<f64>) -> bool {
    if let (Some(s), Some(r)) = (start, t.received) {
        if r < s {
            return false;
        }
    }
    match (end, t.received) {
        (Some(e), Some(r)) => r <= e,
        _ => true,
    }
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

    use super::*;

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
