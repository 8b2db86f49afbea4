//! Calls to the Kubernetes API with what every call needs: a latency histogram and error counter by
//! verb (`celeriac_kubernetes_api_*`), and retries of transient failures (connection refused while
//! the API server restarts, 429/5xx, 401 while a rotated token propagates) for up to a configurable
//! window, so a control-plane blip never fails a step.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Kubernetes-side metrics of the launcher (registered once in the process's default registry,
/// which the worker's `/metrics` includes).
pub struct KubeMetrics {
    pub request_seconds: HistogramVec,
    pub errors: IntCounterVec,
    /// Task received → step Job created (or adopted).
    pub job_create_seconds: HistogramVec,
    /// Job terminal (as first seen by the watch) → logs read and events ready for the result.
    pub job_to_result_seconds: HistogramVec,
    /// Jobs created, adopted (409), deleted by cleanup or cancellation.
    pub jobs: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl KubeMetrics {
    pub fn get() -> &'static KubeMetrics {
        static METRICS: OnceLock<KubeMetrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let r = prometheus::default_registry();
            let hist = |name: &str, help: &str, labels: &[&str]| {
                let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
                    .expect("static metric definition");
                let _ = r.register(Box::new(h.clone()));
                h
            };
            let counter = |name: &str, help: &str, labels: &[&str]| {
                let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
                let _ = r.register(Box::new(c.clone()));
                c
            };
            let m = KubeMetrics {
                request_seconds: hist(
                    "celeriac_kubernetes_api_request_duration_seconds",
                    "Latency of Kubernetes API requests made by the step launcher, by verb",
                    &["verb"],
                ),
                errors: counter(
                    "celeriac_kubernetes_api_errors_total",
                    "Failed Kubernetes API requests by verb and HTTP code (0 = no response)",
                    &["verb", "code"],
                ),
                job_create_seconds: hist(
                    "celeriac_step_job_create_latency_seconds",
                    "Time from a step task's receipt to its Kubernetes Job being created or adopted",
                    &["namespace"],
                ),
                job_to_result_seconds: hist(
                    "celeriac_step_job_result_latency_seconds",
                    "Time from a step Job turning terminal to its events being ready for the result",
                    &["namespace"],
                ),
                jobs: counter(
                    "celeriac_step_jobs_total",
                    "Step Jobs by action: created, adopted, deleted, cancelled",
                    &["namespace", "action"],
                ),
            };
            // Zero series, so alerts and dashboards find the family before the first error:
            // code 0 (no response) for every verb the launcher uses.
            for verb in VERBS {
                m.errors.with_label_values(&[verb, "0"]);
            }
            m
        })
    }
}

/// The verbs the launcher's requests are measured under (see [`call`]).
pub const VERBS: &[&str] = &["create", "get", "list", "logs", "delete"];

/// HTTP status of an API error, 0 when no response arrived.
pub fn status_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        _ => 0,
    }
}

/// Worth retrying: the request may succeed unchanged a little later.
pub fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 401 | 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Runs `call` (one API request), measuring it, retrying transient failures for up to `window`.
pub async fn call<T, F, Fut>(
    verb: &'static str,
    window: Duration,
    mut call: F,
) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let m = KubeMetrics::get();
    let first = Instant::now();
    let mut backoff =
        celeriac_wire::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let started = Instant::now();
        let result = call().await;
        m.request_seconds
            .with_label_values(&[verb])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(v) => return Ok(v),
            Err(e) => {
                m.errors
                    .with_label_values(&[verb, &status_code(&e).to_string()])
                    .inc();
                let delay = backoff.next_delay();
                if !transient(&e) || first.elapsed() + delay > window {
                    return Err(e);
                }
                tracing::warn!(
                    verb,
                    "Kubernetes API request failed, retrying in {delay:?}: {e}"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}
