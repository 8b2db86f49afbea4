//! The coordinator's Prometheus metrics (`celeriac_coordinator_*`). Every family has its zero series
//! from start-up, so dashboards and alerts have data before the first run.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Latency buckets from half a millisecond to a minute (fine below 100 ms, where the targets are).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct Metrics {
    registry: Registry,
    pub runs_owned: IntGauge,
    pub steps_in_flight: IntGauge,
    pub result_to_submit: Histogram,
    pub launch_to_first_submit: Histogram,
    pub takeovers: IntCounter,
    pub runs_finished: IntCounterVec,
    pub seconds_since_progress: prometheus::Gauge,
    pub leases_renewed: IntCounter,
    /// run id → (steps in flight, time since its last progress while it waits on something).
    runs: Mutex<HashMap<String, (usize, Option<Duration>)>>,
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
        .unwrap_or_else(|e| panic!("static histogram {name}: {e}"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            runs_owned: IntGauge::new(
                "celeriac_coordinator_runs_owned",
                "Runs this coordinator replica drives.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
            steps_in_flight: IntGauge::new(
                "celeriac_coordinator_steps_in_flight",
                "Step tasks published and awaiting their result.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
            result_to_submit: histogram(
                "celeriac_coordinator_result_to_submit_seconds",
                "From a step result received to the next steps published.",
            ),
            launch_to_first_submit: histogram(
                "celeriac_coordinator_launch_to_first_submit_seconds",
                "From the hand-off by CeleriacRunLauncher to the first steps published.",
            ),
            takeovers: IntCounter::new(
                "celeriac_coordinator_takeovers_total",
                "Runs taken over from a coordinator replica whose lease expired.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
            runs_finished: IntCounterVec::new(
                Opts::new(
                    "celeriac_coordinator_runs_finished_total",
                    "Runs finished by this replica, by final status.",
                ),
                &["status"],
            )
            .unwrap_or_else(|e| panic!("{e}")),
            seconds_since_progress: prometheus::Gauge::new(
                "celeriac_coordinator_seconds_since_progress",
                "The longest any owned run has gone without progress (a result applied or a step published) while waiting on steps.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
            leases_renewed: IntCounter::new(
                "celeriac_coordinator_leases_renewed_total",
                "Lease renewals written.",
            )
            .unwrap_or_else(|e| panic!("{e}")),
            runs: Mutex::new(HashMap::new()),
            registry,
        };
        for status in ["SUCCESS", "FAILURE", "CANCELED"] {
            m.runs_finished.with_label_values(&[status]);
        }
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.runs_owned.clone()),
            Box::new(m.steps_in_flight.clone()),
            Box::new(m.result_to_submit.clone()),
            Box::new(m.launch_to_first_submit.clone()),
            Box::new(m.takeovers.clone()),
            Box::new(m.runs_finished.clone()),
            Box::new(m.seconds_since_progress.clone()),
            Box::new(m.leases_renewed.clone()),
        ];
        for c in collectors {
            if let Err(e) = m.registry.register(c) {
                tracing::error!("registering a coordinator metric: {e}");
            }
        }
        m
    }

    /// A run's driver reports its state.
    pub fn progress(&self, run_id: &str, in_flight: usize, waiting_for: Option<Duration>) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.insert(run_id.to_string(), (in_flight, waiting_for));
        self.refresh(&runs);
    }

    /// A run is no longer driven here.
    pub fn forget(&self, run_id: &str) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.remove(run_id);
        self.refresh(&runs);
    }

    fn refresh(&self, runs: &HashMap<String, (usize, Option<Duration>)>) {
        self.steps_in_flight
            .set(runs.values().map(|(n, _)| *n as i64).sum());
        self.seconds_since_progress.set(
            runs.values()
                .filter_map(|(_, w)| w.map(|d| d.as_secs_f64()))
                .fold(0.0, f64::max),
        );
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
