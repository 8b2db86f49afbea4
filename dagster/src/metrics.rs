//! Per-Dagster-job step metrics: what the "per Dagster job" dashboard is built on. Celery's own task
//! metrics only know the task name (`execute_step_k8s_job` for every step), so the job, the outcome
//! and the step's wall time are recorded here, once per step task, in the process-wide registry.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Buckets for step wall time, 1 s to 6 h.
const STEP_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

/// How a step task ended, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The step process (Job) succeeded.
    Success,
    /// The step process (Job) failed: the run sees STEP_FAILURE.
    Failure,
    /// The step could not be launched or watched (API error, missing permission).
    Error,
    /// Revoked with terminate, or the run left STARTED.
    Cancelled,
    /// Not launched: the run was not STARTED when the task arrived.
    Skipped,
}

impl StepOutcome {
    fn label(self) -> &'static str {
        match self {
            StepOutcome::Success => "success",
            StepOutcome::Failure => "failure",
            StepOutcome::Error => "error",
            StepOutcome::Cancelled => "cancelled",
            StepOutcome::Skipped => "skipped",
        }
    }
}

/// `celeriac_dagster_steps_total{dagster_job, outcome}` and
/// `celeriac_dagster_step_duration_seconds{dagster_job}`.
pub struct StepMetrics {
    steps: IntCounterVec,
    duration: HistogramVec,
}

impl StepMetrics {
    pub fn get() -> &'static StepMetrics {
        static METRICS: OnceLock<StepMetrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let r = prometheus::default_registry();
            let steps = IntCounterVec::new(
                Opts::new(
                    "celeriac_dagster_steps_total",
                    "Dagster step tasks finished, by Dagster job and outcome",
                ),
                &["dagster_job", "outcome"],
            )
            .expect("static metric definition");
            let duration = HistogramVec::new(
                HistogramOpts::new(
                    "celeriac_dagster_step_duration_seconds",
                    "Wall time of launched Dagster steps (launch to result), by Dagster job",
                )
                .buckets(STEP_BUCKETS.to_vec()),
                &["dagster_job"],
            )
            .expect("static metric definition");
            let _ = r.register(Box::new(steps.clone()));
            let _ = r.register(Box::new(duration.clone()));
            StepMetrics { steps, duration }
        })
    }

    /// Records one finished step task; `ran` is the launch-to-result time of launched steps.
    pub fn finished(&self, dagster_job: &str, outcome: StepOutcome, ran: Option<Duration>) {
        self.steps
            .with_label_values(&[dagster_job, outcome.label()])
            .inc();
        if let Some(d) = ran {
            self.duration
                .with_label_values(&[dagster_job])
                .observe(d.as_secs_f64());
        }
    }
}
