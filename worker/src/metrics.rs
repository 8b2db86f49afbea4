//! Prometheus metrics: the celery-exporter family (so existing Celery dashboards and the celery-mixin
//! alerts work unchanged) plus celeriac's own `celeriac_*` series for autoscaling and latency.
//!
//! Label sets follow danihodovic/celery-exporter: `name, hostname, queue_name` on task counters
//! (`exception` added on failures), `hostname` on worker gauges, `queue_name` on queue gauges.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All metrics of one worker process.
pub struct Metrics {
    registry: Registry,
    hostname: String,
    task_received: IntCounterVec,
    task_started: IntCounterVec,
    task_succeeded: IntCounterVec,
    task_failed: IntCounterVec,
    task_rejected: IntCounterVec,
    task_revoked: IntCounterVec,
    task_retried: IntCounterVec,
    task_runtime: HistogramVec,
    worker_up: IntGaugeVec,
    worker_tasks_active: IntGaugeVec,
    in_flight: IntGaugeVec,
    free_slots: IntGaugeVec,
    broker_reconnects: CounterVec,
    peer_reconnects: IntCounterVec,
    result_store_seconds: HistogramVec,
    queue_length: GaugeVec,
    backlog: GaugeVec,
}

/// Buckets from seconds to hours: Dagster steps run long.
const RUNTIME_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

/// Registers `metric`, a static definition: an error is a programming error, caught by any test.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("static metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric name");
    metric
}

impl Metrics {
    pub fn new(hostname: &str) -> Metrics {
        let registry = Registry::new();
        let task_labels = &["name", "hostname", "queue_name"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(RUNTIME_BUCKETS.to_vec());
            registered(&registry, HistogramVec::new(opts, labels))
        };
        let float_gauge = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, GaugeVec::new(Opts::new(name, help), labels))
        };
        // The celery-exporter task counters: `name, hostname, queue_name`.
        let task_counter = |name: &str, help: &str| counter(name, help, task_labels);
        let m = Metrics {
            task_received: task_counter("celery_task_received_total", "Tasks received by the worker."),
            task_started: task_counter("celery_task_started_total", "Tasks started."),
            task_succeeded: task_counter("celery_task_succeeded_total", "Tasks that succeeded."),
            task_failed: counter(
                "celery_task_failed_total",
                "Tasks that failed.",
                &["name", "hostname", "exception", "queue_name"],
            ),
            task_rejected: task_counter("celery_task_rejected_total", "Messages rejected (bad input, unknown task)."),
            task_revoked: task_counter("celery_task_revoked_total", "Tasks revoked or expired."),
            task_retried: task_counter("celery_task_retried_total", "Tasks handed back for another attempt."),
            task_runtime: histogram(
                "celery_task_runtime",
                "Task runtime in seconds.",
                task_labels,
            ),
            worker_up: gauge(
                "celery_worker_up",
                "1 while the worker is consuming.",
                &["hostname"],
            ),
            worker_tasks_active: gauge(
                "celery_worker_tasks_active",
                "Tasks running now.",
                &["hostname"],
            ),
            in_flight: gauge(
                "celeriac_queue_in_flight",
                "Steps of the queue running in this worker.",
                &["queue_name", "hostname"],
            ),
            free_slots: gauge(
                "celeriac_queue_free_slots",
                "Free concurrency slots of the queue in this worker.",
                &["queue_name", "hostname"],
            ),
            peer_reconnects: counter(
                "celeriac_peer_reconnects_total",
                "Connections re-opened after their peer was found dead (closed, reset, or silent past its heartbeat or response timeout), per peer: rabbitmq, redis, postgres.",
                &["peer", "hostname"],
            ),
            broker_reconnects: registered(
                &registry,
                CounterVec::new(
                    Opts::new(
                        "celeriac_broker_reconnects_total",
                        "Broker consumer reconnections.",
                    ),
                    &["queue_name", "hostname"],
                ),
            ),
            result_store_seconds: histogram(
                "celeriac_result_store_seconds",
                "Time from task completion to its result being stored.",
                &["backend", "hostname"],
            ),
            queue_length: float_gauge(
                "celery_queue_length",
                "Messages ready in the queue.",
                &["queue_name"],
            ),
            backlog: float_gauge(
                "celeriac_queue_backlog",
                "Steps waiting in the queue plus steps this worker runs: the autoscaling signal (early-acked running steps are invisible to broker metrics).",
                &["queue_name", "hostname"],
            ),
            registry,
            hostname: hostname.to_string(),
        };
        m.worker_up.with_label_values(&[hostname]).set(0);
        m.worker_tasks_active.with_label_values(&[hostname]).set(0);
        m
    }

    /// Creates the zero series of a (task, queue) pair so dashboards and alerts find every metric from
    /// the start, not only after the first failure.
    pub fn init_series(&self, name: &str, queue: &str, limit: usize) {
        let labels = [name, self.hostname.as_str(), queue];
        for c in [
            &self.task_received,
            &self.task_started,
            &self.task_succeeded,
            &self.task_rejected,
            &self.task_revoked,
            &self.task_retried,
        ] {
            c.with_label_values(&labels);
        }
        self.task_failed
            .with_label_values(&[name, &self.hostname, "", queue]);
        self.task_runtime.with_label_values(&labels);
        self.queue_length.with_label_values(&[queue]);
        self.backlog.with_label_values(&[queue, &self.hostname]);
        self.broker_reconnects
            .with_label_values(&[queue, &self.hostname]);
        self.slots(queue, 0, limit);
    }

    pub fn set_up(&self, up: bool) {
        self.worker_up
            .with_label_values(&[&self.hostname])
            .set(i64::from(up));
    }

    pub fn received(&self, name: &str, queue: &str) {
        self.task_received
            .with_label_values(&[name, &self.hostname, queue])
            .inc();
    }

    pub fn started(&self, name: &str, queue: &str) {
        self.task_started
            .with_label_values(&[name, &self.hostname, queue])
            .inc();
        self.worker_tasks_active
            .with_label_values(&[&self.hostname])
            .inc();
    }

    /// A started task ended (any outcome) after `runtime` seconds.
    pub fn ended(&self, name: &str, queue: &str, runtime: f64) {
        self.worker_tasks_active
            .with_label_values(&[&self.hostname])
            .dec();
        self.task_runtime
            .with_label_values(&[name, &self.hostname, queue])
            .observe(runtime);
    }

    pub fn succeeded(&self, name: &str, queue: &str) {
        self.task_succeeded
            .with_label_values(&[name, &self.hostname, queue])
            .inc();
    }

    pub fn failed(&self, name: &str, queue: &str, exception: &str) {
        self.task_failed
            .with_label_values(&[name, &self.hostname, exception, queue])
            .inc();
    }

    pub fn rejected(&self, name: &str, queue: &str) {
        self.task_rejected
            .with_label_values(&[name, &self.hostname, queue])
            .inc();
    }

    pub fn revoked(&self, name: &str, queue: &str) {
        self.task_revoked
            .with_label_values(&[name, &self.hostname, queue])
            .inc();
    }

    pub fn retried(&self, name: &str, queue: &str) {
        self.task_retried
            .with_label_values(&[name, &self.hostname, queue])
            .inc();
    }

    pub fn slots(&self, queue: &str, in_flight: usize, free: usize) {
        self.in_flight
            .with_label_values(&[queue, &self.hostname])
            .set(in_flight as i64);
        self.free_slots
            .with_label_values(&[queue, &self.hostname])
            .set(free as i64);
    }

    pub fn reconnected(&self, queue: &str) {
        self.broker_reconnects
            .with_label_values(&[queue, &self.hostname])
            .inc();
    }

    pub fn result_stored(&self, backend: &str, seconds: f64) {
        self.result_store_seconds
            .with_label_values(&[backend, &self.hostname])
            .observe(seconds);
    }

    /// Ready messages in `queue` and the steps of it running here.
    pub fn queue_length(&self, queue: &str, ready: u64, running: usize) {
        self.queue_length
            .with_label_values(&[queue])
            .set(ready as f64);
        self.backlog
            .with_label_values(&[queue, &self.hostname])
            .set(ready as f64 + running as f64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // The worker's own registry plus the process-wide one, where the tasks' metrics live (the
        // Dagster step task's `celeriac_dagster_*`, `celeriac_kubernetes_*`, `celeriac_step_job*`).
        for (peer, total) in celeriac_wire::reconnects::snapshot() {
            let c = self
                .peer_reconnects
                .with_label_values(&[peer, &self.hostname]);
            c.inc_by(total.saturating_sub(c.get()));
        }
        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_names_and_labels() {
        let m = Metrics::new("w@h");
        m.received("execute_step_k8s_job", "dagster");
        m.started("execute_step_k8s_job", "dagster");
        m.ended("execute_step_k8s_job", "dagster", 1.5);
        m.failed("execute_step_k8s_job", "dagster", "CheckError");
        let text = m.render();
        assert!(text.contains(r#"celery_task_received_total{hostname="w@h",name="execute_step_k8s_job",queue_name="dagster"} 1"#), "{text}");
        assert!(text.contains(r#"celery_task_failed_total{exception="CheckError",hostname="w@h",name="execute_step_k8s_job",queue_name="dagster"} 1"#));
        assert!(text.contains("celery_task_runtime_bucket"));
        assert!(text.contains(r#"celery_worker_tasks_active{hostname="w@h"} 0"#));
        celeriac_wire::reconnects::record("redis");
        let text = m.render();
        assert!(
            text.contains(r#"celeriac_peer_reconnects_total{hostname="w@h",peer="redis"} "#),
            "{text}"
        );
    }
}
