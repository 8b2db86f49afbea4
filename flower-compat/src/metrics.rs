//! `/metrics`: Flower 2.2's metric names, types and labels (`flower/events.py::PrometheusMetrics`), so
//! its Grafana dashboard and alert examples work unchanged, plus a few `celeriac_flower_*` of our own.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use serde_json::{Map, Value};

use crate::task::Task;

/// `prometheus_client`'s default histogram buckets (Flower's `--task_runtime_metric_buckets` default).
pub const DEFAULT_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

#[derive(Clone)]
pub struct FlowerMetrics {
    pub registry: Registry,
    events: CounterVec,
    runtime: HistogramVec,
    prefetch_time: GaugeVec,
    prefetched: GaugeVec,
    worker_online: GaugeVec,
    executing: GaugeVec,
    pub tasks_in_memory: IntGauge,
    pub queue_messages: GaugeVec,
    pub history_write_errors: IntGauge,
}

impl FlowerMetrics {
    pub fn new(buckets: &[f64]) -> Result<FlowerMetrics, prometheus::Error> {
        let registry = Registry::new();
        let events = CounterVec::new(
            Opts::new("flower_events_total", "Number of events"),
            &["worker", "type", "task"],
        )?;
        let runtime = HistogramVec::new(
            HistogramOpts::new("flower_task_runtime_seconds", "Task runtime")
                .buckets(buckets.to_vec()),
            &["worker", "task"],
        )?;
        let prefetch_time = GaugeVec::new(
            Opts::new(
                "flower_task_prefetch_time_seconds",
                "The time the task spent waiting at the celery worker to be executed.",
            ),
            &["worker", "task"],
        )?;
        let prefetched = GaugeVec::new(
            Opts::new(
                "flower_worker_prefetched_tasks",
                "Number of tasks of given type prefetched at a worker",
            ),
            &["worker", "task"],
        )?;
        let worker_online = GaugeVec::new(
            Opts::new("flower_worker_online", "Worker online status"),
            &["worker"],
        )?;
        let executing = GaugeVec::new(
            Opts::new(
                "flower_worker_number_of_currently_executing_tasks",
                "Number of tasks currently executing at a worker",
            ),
            &["worker"],
        )?;
        let tasks_in_memory = IntGauge::new(
            "celeriac_flower_tasks_in_memory",
            "Tasks held in memory (bounded by --max-tasks and --max-age)",
        )?;
        let queue_messages = GaugeVec::new(
            Opts::new(
                "celeriac_flower_queue_messages",
                "Messages per queue as last measured: ready (in the broker), reserved (prefetched by a worker), running",
            ),
            &["queue", "state"],
        )?;
        let history_write_errors = IntGauge::new(
            "celeriac_flower_history_write_errors",
            "Failed history-store writes since start",
        )?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(runtime.clone()))?;
        registry.register(Box::new(prefetch_time.clone()))?;
        registry.register(Box::new(prefetched.clone()))?;
        registry.register(Box::new(worker_online.clone()))?;
        registry.register(Box::new(executing.clone()))?;
        registry.register(Box::new(tasks_in_memory.clone()))?;
        registry.register(Box::new(queue_messages.clone()))?;
        registry.register(Box::new(history_write_errors.clone()))?;
        Ok(FlowerMetrics {
            registry,
            events,
            runtime,
            prefetch_time,
            prefetched,
            worker_online,
            executing,
            tasks_in_memory,
            queue_messages,
            history_write_errors,
        })
    }

    /// `PrometheusMetrics.observe_task`, called after the event was merged into `task`.
    pub fn observe_task(&self, worker: &str, kind: &str, event: &Map<String, Value>, task: &Task) {
        let name = event
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .or(task.name.as_deref())
            .unwrap_or("");
        self.events.with_label_values(&[worker, kind, name]).inc();
        if let Some(rt) = event.get("runtime").and_then(Value::as_f64) {
            if rt != 0.0 {
                self.runtime.with_label_values(&[worker, name]).observe(rt);
            }
        }
        let has_eta = task.eta.as_ref().is_some_and(|e| !e.is_null());
        let Some(received) = task.received.filter(|r| *r != 0.0) else {
            return;
        };
        if has_eta {
            return;
        }
        let started = task.started.filter(|s| *s != 0.0);
        match kind {
            "task-received" => self.prefetched.with_label_values(&[worker, name]).inc(),
            "task-started" => {
                if let Some(s) = started {
                    self.prefetch_time
                        .with_label_values(&[worker, name])
                        .set(s - received);
                    self.prefetched.with_label_values(&[worker, name]).dec();
                }
            }
            "task-succeeded" | "task-failed" if started.is_some() => self
                .prefetch_time
                .with_label_values(&[worker, name])
                .set(0.0),
            "task-revoked" | "task-rejected" if started.is_none() => {
                self.prefetched.with_label_values(&[worker, name]).dec()
            }
            _ => {}
        }
    }

    /// `PrometheusMetrics.observe_worker`.
    pub fn observe_worker(&self, worker: &str, kind: &str, event: &Map<String, Value>) {
        let online = match kind {
            "worker-online" | "worker-heartbeat" => Some(1.0),
            "worker-offline" => Some(0.0),
            _ => None,
        };
        if let Some(v) = online {
            self.worker_online.with_label_values(&[worker]).set(v);
        }
        if kind == "worker-heartbeat" {
            if let Some(active) = event.get("active").and_then(Value::as_f64) {
                self.executing.with_label_values(&[worker]).set(active);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
