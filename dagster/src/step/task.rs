//! `execute_step_k8s_job`: Dagster's celery-k8s step task (`dagster_celery_k8s/executor.py`), in the
//! order of spec §3.1. The result is the list of serialized `DagsterEvent`s the run worker replays:
//! `[Executing…, (STEP_FAILURE), Retrieving logs…, *the step's own events]`.
//!
//! Nothing secret is logged: not the kwargs, the command (it embeds the instance config), the storage
//! config or environment values.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celeriac_wire::message::TaskRequest;
use celeriac_wire::result::ExceptionInfo;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use celeriac_worker::tasks::{Task, TaskContext, TaskOutcome};

use super::args::StepTaskArgs;
use super::command::{command_args, job_name};
use crate::events::{
    engine_event, filter_events, step_failure, terminal_event, ErrorInfo, Event, Meta, StepRef,
    DELEGATE_MARKER,
};
use crate::instance::{Instance, InstanceError, Instances};
use crate::k8s_config::merge_user_config;
use crate::launcher::{LaunchError, StepLauncher, StepRun, StepSpec};
use crate::metrics::{StepMetrics, StepOutcome};
use crate::step::workload::Step;

/// The registered task name.
pub const TASK_NAME: &str = "execute_step_k8s_job";
/// How often the run's status is checked while its step runs (Python: every 10 s with the Job status).
pub const DEFAULT_RUN_STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// The step task. Cheap to share: one instance serves every concurrent step of the worker.
pub struct ExecuteStepK8sJob {
    launcher: Arc<dyn StepLauncher>,
    instances: Instances,
    run_status_interval: Duration,
}

impl ExecuteStepK8sJob {
    /// A step task running steps with `launcher`, with its own Postgres connection cache.
    pub fn new(launcher: Arc<dyn StepLauncher>) -> Self {
        Self::with_instances(launcher, Instances::default())
    }

    /// A step task sharing an existing connection cache.
    pub fn with_instances(launcher: Arc<dyn StepLauncher>, instances: Instances) -> Self {
        Self {
            launcher,
            instances,
            run_status_interval: DEFAULT_RUN_STATUS_INTERVAL,
        }
    }

    /// Changes how often the run status is polled while a step runs.
    pub fn with_run_status_interval(mut self, interval: Duration) -> Self {
        self.run_status_interval = interval.max(Duration::from_millis(100));
        self
    }

    /// The connection cache (shared with other users of the run's instance).
    pub fn instances(&self) -> &Instances {
        &self.instances
    }
}

/// A `FAILURE` result in the shape Python stores. The traceback names the task's original source path
/// (`celeriac/worker/src/tasks/step.rs`), kept so stored results stay byte-identical across releases.
fn failure(exc_type: &str, module: &str, message: impl Into<String>) -> TaskOutcome {
    let message = message.into();
    let qualified = if module == "builtins" {
        exc_type.to_string()
    } else {
        format!("{module}.{exc_type}")
    };
    TaskOutcome::Failure {
        traceback: Some(format!(
            "Traceback (most recent call last):\n  File \"celeriac/worker/src/tasks/step.rs\", in execute_step_k8s_job\n{qualified}: {message}\n"
        )),
        exc: ExceptionInfo::new(exc_type, module, message),
    }
}

fn instance_failure(e: &InstanceError) -> TaskOutcome {
    match e {
        InstanceError::Connect { .. } | InstanceError::Query { .. } => {
            failure("OperationalError", "sqlalchemy.exc", e.to_string())
        }
        InstanceError::Unsupported(_) | InstanceError::Config(_) | InstanceError::MissingEnv(_) => {
            failure(
                "DagsterInvalidConfigError",
                "dagster._core.errors",
                e.to_string(),
            )
        }
    }
}

/// How long the end of a step task waits for its events to reach a database that is not answering.
pub const EVENT_FLUSH_BUDGET: Duration = Duration::from_secs(120);
/// How long the start of a step task retries a database that is not answering before it fails.
pub const START_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// Writes a step task's events to the run's event log in the background, in order. A database that
/// is down, reset or silent does not fail the step or hold it up: each event is retried with backoff
/// until it is stored (a retry first looks for the row an unanswered INSERT may have committed, so
/// nothing is stored twice); the task's end waits up to [`EVENT_FLUSH_BUDGET`] for the rest.
struct EventWriter {
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
    finish_by: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventWriter {
    fn start(instance: Instance, run_id: String) -> EventWriter {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let finish_by = Arc::new(std::sync::Mutex::new(None));
        let deadline = finish_by.clone();
        let task = tokio::spawn(async move {
            let mut lost = 0usize;
            while let Some(event) = rx.recv().await {
                if !deliver(&instance, &run_id, &event, &deadline).await {
                    lost += 1;
                }
            }
            if lost > 0 {
                error!(run_id = %run_id, lost, "Dagster events could not be written to the event log");
            }
        });
        EventWriter {
            tx,
            finish_by,
            task,
        }
    }

    fn send(&self, event: Event) {
        // The writer task lives until `finish`: a send cannot fail before.
        let _ = self.tx.send(event);
    }

    /// Waits (up to `budget`) until every event is written.
    async fn finish(self, budget: Duration) {
        *self.finish_by.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now() + budget);
        drop(self.tx);
        let mut task = self.task;
        // Slack for the attempt in flight at the deadline (query + connect timeouts).
        if tokio::time::timeout(budget + Duration::from_secs(25), &mut task)
            .await
            .is_err()
        {
            task.abort();
            error!("Dagster events were still unwritten when the step task ended");
        }
    }
}

/// Stores one event, retrying transient failures until it is stored or the writer's deadline passed.
async fn deliver(
    instance: &Instance,
    run_id: &str,
    event: &Event,
    deadline: &std::sync::Mutex<Option<std::time::Instant>>,
) -> bool {
    let mut backoff =
        celeriac_wire::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut maybe_stored = false;
    let mut attempts = 0u32;
    loop {
        match instance.report_checked(run_id, event, maybe_stored).await {
            Ok(_) => {
                if attempts > 0 {
                    info!(
                        run_id,
                        event = event.event_type,
                        attempts = attempts + 1,
                        "Dagster event written once the database answered again"
                    );
                }
                return true;
            }
            Err(e) if !e.is_transient() => {
                warn!(
                    run_id,
                    event = event.event_type,
                    "cannot write a Dagster event: {e}"
                );
                return false;
            }
            Err(e) => {
                if attempts == 0 {
                    warn!(
                        run_id,
                        event = event.event_type,
                        "cannot write a Dagster event ({e}); retrying until the database answers"
                    );
                }
                attempts += 1;
                maybe_stored = true;
                let delay = backoff.next_delay();
                let give_up = deadline
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some_and(|d| std::time::Instant::now() + delay > d);
                if give_up {
                    error!(
                        run_id,
                        event = event.event_type,
                        attempts,
                        "giving up writing a Dagster event: {e}"
                    );
                    return false;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Stores events in the run's event log (through the [`EventWriter`]): a database fault never fails
/// the step, and the events still reach the run worker in the task's result.
struct Reporter<'a> {
    writer: &'a EventWriter,
    step: StepRef<'a>,
}

impl Reporter<'_> {
    async fn store(&self, event: Event) -> Event {
        self.writer.send(event.clone());
        event
    }

    async fn engine(
        &self,
        message: &str,
        metadata: &[(&str, Meta)],
        marker_end: Option<&str>,
        error: Option<&ErrorInfo>,
    ) -> Event {
        self.store(engine_event(
            &self.step, message, metadata, marker_end, error,
        ))
        .await
    }
}

fn text(s: &str) -> Meta {
    Meta::Text(s.to_string())
}

/// A metadata value Python passes through as-is: a string, or `None` (→ `NullMetadataEntryData`).
fn optional(v: Option<&Value>) -> Meta {
    match v {
        Some(Value::String(s)) => Meta::Text(s.clone()),
        Some(Value::Null) | None => Meta::Null,
        Some(other) => Meta::Text(celeriac_wire::json::python_repr(other)),
    }
}

/// Python's `str(x)`: `"None"` for a missing value.
fn python_str(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "None".into(),
        Some(other) => celeriac_wire::json::python_repr(other),
    }
}

#[async_trait]
impl Task for ExecuteStepK8sJob {
    fn name(&self) -> &'static str {
        TASK_NAME
    }

    async fn run(&self, ctx: TaskContext, request: &mut TaskRequest) -> TaskOutcome {
        let mut writer = None;
        let outcome = self.execute(ctx, request, &mut writer).await;
        if let Some(w) = writer {
            w.finish(EVENT_FLUSH_BUDGET).await;
        }
        outcome
    }
}

impl ExecuteStepK8sJob {
    /// Opens the run's instance and reads the run, retrying a database that does not answer for up
    /// to [`START_RETRY_WINDOW`].
    async fn open_run(
        &self,
        args: &StepTaskArgs,
        task_id: &str,
    ) -> Result<(Instance, Option<crate::instance::RunInfo>), InstanceError> {
        let started = std::time::Instant::now();
        let mut backoff = celeriac_wire::backoff::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
        loop {
            let attempt = async {
                let instance = self
                    .instances
                    .open(
                        args.run_storage_yaml.as_deref(),
                        args.event_storage_yaml.as_deref(),
                    )
                    .await?;
                let run = instance.get_run(&args.run_id).await?;
                Ok::<_, InstanceError>((instance, run))
            };
            match attempt.await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_transient() && started.elapsed() < START_RETRY_WINDOW => {
                    warn!(task_id, run_id = %args.run_id, "cannot read the run from the Dagster database ({e}); retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn execute(
        &self,
        ctx: TaskContext,
        request: &mut TaskRequest,
        writer: &mut Option<EventWriter>,
    ) -> TaskOutcome {
        // 1. Arguments.
        let mut args = match StepTaskArgs::from_kwargs(&request.kwargs) {
            Ok(a) => a,
            Err(e) => {
                warn!(task_id = %request.id, "invalid execute_step_k8s_job arguments: {e}");
                let (t, m) = e.python_type();
                return failure(t, m, e.to_string());
            }
        };
        // Parsed: the kwargs tree (the packed step arguments, ~KB of JSON) is not held while the step
        // runs, which may be hours, in thousands of concurrent steps.
        drop(std::mem::take(&mut request.kwargs));
        drop(std::mem::take(&mut request.args));
        // 3. Instance and run.
        let (instance, run) = match self.open_run(&args, &request.id).await {
            Ok(r) => r,
            Err(e) => {
                warn!(task_id = %request.id, run_id = %args.run_id, "cannot open the run's Dagster instance: {e}");
                return instance_failure(&e);
            }
        };
        let run = match run {
            Some(r) => r,
            None => {
                return failure(
                    "CheckError",
                    "dagster._check",
                    format!("Could not load run {}", args.run_id),
                )
            }
        };
        let step_key = args.step_key.as_str();
        let writer: &EventWriter =
            writer.insert(EventWriter::start(instance.clone(), args.run_id.clone()));
        let reporter = Reporter {
            writer,
            step: StepRef {
                run_id: &args.run_id,
                job_name: &run.job_name,
                step_key,
            },
        };

        // 4. E1, stored only.
        let pod_name = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty());
        reporter
            .engine(
                &format!("Task for step {step_key} picked up by Celery"),
                &[
                    ("Celery worker name", text(&ctx.hostname)),
                    (
                        "Celery worker Kubernetes Pod name",
                        pod_name.map_or(Meta::Null, Meta::Text),
                    ),
                ],
                None,
                None,
            )
            .await;

        // 5. Only STARTED runs get their steps executed.
        if run.status != "STARTED" {
            info!(run_id = %args.run_id, step = step_key, status = %run.status, "run is not STARTED; not scheduling the step");
            reporter
                .engine(
                    "Not scheduling step because dagster run status is not STARTED",
                    &[("Step key", text(step_key))],
                    None,
                    None,
                )
                .await;
            StepMetrics::get().finished(&run.job_name, StepOutcome::Skipped, None);
            return TaskOutcome::Success(json!([]));
        }

        // 6–10. Names, command, labels, k8s config.
        let job = job_name(&args.run_id, step_key, args.attempt);
        let mut labels = vec![
            ("dagster/job".to_string(), run.job_name.clone()),
            ("dagster/op".to_string(), step_key.to_string()),
            ("dagster/run-id".to_string(), args.run_id.clone()),
        ];
        if let Some(location) = &run.location_name {
            labels.push(("dagster/code-location".to_string(), location.clone()));
        }
        let tag_config = Value::Object(args.user_defined_k8s_config.clone());
        let per_step = args
            .per_step_k8s_config
            .get(step_key)
            .cloned()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        let step = Step {
            job_name: &job,
            command: command_args(&args),
            env: vec![
                ("DAGSTER_RUN_JOB_NAME".into(), run.job_name.clone()),
                ("DAGSTER_RUN_STEP_KEY".into(), step_key.to_string()),
            ],
            labels,
            job_config: &args.job_config,
            user_config: merge_user_config(&tag_config, &per_step),
        };

        // 11. E2, stored and returned.
        let jc = &args.job_config;
        let executing = reporter
            .engine(
                &format!("Executing step \"{step_key}\" in Kubernetes job {job}."),
                &[
                    ("Step key", text(step_key)),
                    ("Kubernetes Job name", text(&job)),
                    ("Job image", optional(jc.get("job_image"))),
                    ("Image pull policy", optional(jc.get("image_pull_policy"))),
                    (
                        "Image pull secrets",
                        Meta::Text(python_str(Some(
                            jc.get("image_pull_secrets")
                                .unwrap_or(&Value::Array(vec![])),
                        ))),
                    ),
                    (
                        "Service account name",
                        Meta::Text(python_str(jc.get("service_account_name"))),
                    ),
                ],
                Some(DELEGATE_MARKER),
                None,
            )
            .await;
        let mut events = vec![executing.dagster_event_json()];
        drop(executing);

        // 12–13. Resolve the step for the launcher (the Job body, or the local command and
        // environment) and run it, watching for revocation and for the run leaving STARTED.
        let spec = StepSpec {
            job_name: job.clone(),
            namespace: args.job_namespace.clone(),
            run_id: args.run_id.clone(),
            step_key: step_key.to_string(),
            task_id: request.id.clone(),
            attempt: args.attempt,
            worker: ctx.hostname.clone(),
            wait_timeout: args
                .job_wait_timeout
                .filter(|t| *t > 0.0 && t.is_finite())
                .map(Duration::from_secs_f64),
            workload: step.resolve(self.launcher.runs(), &args),
        };
        // The step is resolved: its packed arguments and Kubernetes config (~KB each as JSON trees)
        // are not needed while it runs, which may be hours, in thousands of concurrent steps.
        drop(step);
        drop((tag_config, per_step));
        args.execute_step_args_packed = Value::Null;
        args.job_config = Map::new();
        args.user_defined_k8s_config = Map::new();
        args.per_step_k8s_config = Map::new();
        args.entry_point = Vec::new();
        info!(run_id = %args.run_id, step = step_key, job = %job, attempt = args.attempt, launcher = self.launcher.kind(), "launching step");
        let stop = CancellationToken::new();
        let launched = std::time::Instant::now();
        let finished =
            |outcome| StepMetrics::get().finished(&run.job_name, outcome, Some(launched.elapsed()));
        let launch = self.launcher.launch(&spec, stop.clone());
        tokio::pin!(launch);
        let mut run_check = tokio::time::interval(self.run_status_interval);
        run_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        run_check.tick().await;
        let outcome = loop {
            tokio::select! {
                r = &mut launch => break r,
                _ = ctx.terminate.cancelled() => {
                    info!(run_id = %args.run_id, step = step_key, job = %job, "task revoked with terminate; stopping the step");
                    stop.cancel();
                    let _ = (&mut launch).await;
                    finished(StepOutcome::Cancelled);
                    return TaskOutcome::Terminated;
                }
                _ = run_check.tick() => {
                    if !run_still_started(&instance, &args.run_id).await {
                        warn!(run_id = %args.run_id, step = step_key, job = %job, "run left STARTED; terminating its step");
                        reporter
                            .engine(
                                "Terminating Kubernetes Job because dagster run status is not STARTED",
                                &[
                                    ("Step key", text(step_key)),
                                    ("Kubernetes Job name", text(&job)),
                                    ("Kubernetes Job namespace", text(&args.job_namespace)),
                                ],
                                None,
                                None,
                            )
                            .await;
                        stop.cancel();
                        let _ = (&mut launch).await;
                        finished(StepOutcome::Cancelled);
                        return TaskOutcome::Success(json!([]));
                    }
                }
            }
        };
        let class = self.launcher.failure_class();
        let step_run: StepRun = match outcome {
            Ok(r) => r,
            Err(LaunchError::Cancelled(_)) => {
                finished(StepOutcome::Cancelled);
                return TaskOutcome::Terminated;
            }
            Err(e) => {
                let (message, what) = match &e {
                    LaunchError::Create { .. } => (format!("Encountered unexpected error while creating Kubernetes job {job} for step {step_key}, exiting."), "create"),
                    LaunchError::Wait { .. } => (format!("Encountered unexpected error while waiting on Kubernetes job {job} for step {step_key}, exiting."), "wait for"),
                    _ => (format!("Encountered unexpected error retreiving Pods for Kubernetes job {job} for step {step_key}, exiting."), "list the pods of"),
                };
                warn!(run_id = %args.run_id, step = step_key, job = %job, "cannot {what} the step: {e}");
                let err = ErrorInfo::new(class.module, class.name, &e.to_string());
                reporter
                    .engine(&message, &[("Step key", text(step_key))], None, Some(&err))
                    .await;
                finished(StepOutcome::Error);
                return TaskOutcome::Success(json!([]));
            }
        };
        if step_run.adopted_existing {
            reporter
                .engine(
                    &format!("Did not create Kubernetes job {job} for step {step_key} since job name already exists, proceeding with existing job."),
                    &[("Step key", text(step_key)), ("Kubernetes Job name", text(&job))],
                    Some(DELEGATE_MARKER),
                    None,
                )
                .await;
        }
        if !step_run.succeeded {
            let reason = step_run
                .failure_message
                .clone()
                .unwrap_or_else(|| format!("Step {step_key} of job {job} failed"));
            info!(run_id = %args.run_id, step = step_key, job = %job, "step failed: {reason}");
            let err = ErrorInfo::new(class.module, class.name, &reason);
            events.push(
                reporter
                    .store(step_failure(&reporter.step, &err, &reason))
                    .await
                    .dagster_event_json(),
            );
        }

        // 15. E3, stored and returned.
        let retrieving = reporter
            .engine(
                "Retrieving logs from Kubernetes Job pods",
                &[("Pod names", Meta::Text(step_run.pod_names.join("\n")))],
                None,
                None,
            )
            .await;
        events.push(retrieving.dagster_event_json());
        for log_error in &step_run.log_errors {
            let err = ErrorInfo::new(class.module, class.name, &log_error.message);
            reporter
                .engine(
                    &format!(
                        "Encountered unexpected error while fetching pod logs for Kubernetes job {job}, Pod name {} for step {step_key}. Will attempt to continue with other pods.",
                        log_error.pod_name
                    ),
                    &[("Step key", text(step_key))],
                    None,
                    Some(&err),
                )
                .await;
        }

        // 16–17. The step's own events.
        let step_events = filter_events(&step_run.logs);
        info!(run_id = %args.run_id, step = step_key, job = %job, succeeded = step_run.succeeded, step_events = step_events.len(), "step finished");
        // An op that raises reports STEP_FAILURE from a step process that exits 0 (its Job
        // completes): for the per-job metrics (failure-ratio panels, CeleriacStepFailureRatioHigh)
        // that is a failed step too, not only a failed Job.
        let mut op_failed = step_events.iter().any(|e| {
            serde_json::from_str::<Value>(e).is_ok_and(|v| v["event_type_value"] == "STEP_FAILURE")
        });
        let unfinished = step_run.succeeded
            && step_run.log_errors.is_empty()
            && terminal_event(&step_events).is_none();
        let lost_previous = self.launcher.take_lost_previous(&job);
        events.extend(step_events);
        // The step process ended well but reported no outcome: Dagster refused to run a step that
        // had already started ("Attempted to run … again"), which happens when the worker that
        // started it died. Without a terminal event the run would fail with
        // `DagsterUnknownStepStateError` and nothing saying why; fail the step naming the cause.
        if unfinished {
            let reason = match lost_previous {
                Some(lost) => format!(
                    "Step {step_key} cannot be finished: {lost}. Dagster refuses to run a step that already started, so the step process started again for task {} (attempt {}) on worker {} did not run it.",
                    request.id, args.attempt, ctx.hostname
                ),
                None => format!(
                    "Step {step_key} cannot be finished: its step process (job {job}, task {}, attempt {}, worker {}) ended without reporting success or failure. Dagster does this when the step had already started, i.e. a worker running it died mid-step (on another host, or before it recorded the step).",
                    request.id, args.attempt, ctx.hostname
                ),
            };
            warn!(run_id = %args.run_id, step = step_key, job = %job, "{reason}");
            let err = ErrorInfo::new(class.module, "StepLostError", &reason);
            events.push(
                reporter
                    .store(step_failure(&reporter.step, &err, &reason))
                    .await
                    .dagster_event_json(),
            );
            op_failed = true;
        }
        finished(if step_run.succeeded && !op_failed {
            StepOutcome::Success
        } else {
            StepOutcome::Failure
        });
        TaskOutcome::Success(Value::Array(
            events.into_iter().map(Value::String).collect(),
        ))
    }
}

async fn run_still_started(instance: &Instance, run_id: &str) -> bool {
    match Box::pin(instance.get_run(run_id)).await {
        Ok(Some(r)) => r.status == "STARTED",
        // Python: `if not run or run.status != STARTED` → terminate.
        Ok(None) => false,
        // A database hiccup is not a reason to kill a running step.
        Err(e) => {
            warn!(run_id, "cannot check the run status: {e}");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_str_and_optional_metadata() {
        assert_eq!(python_str(None), "None");
        assert_eq!(python_str(Some(&json!([]))), "[]");
        assert_eq!(python_str(Some(&json!([{"name": "s"}]))), "[{'name': 's'}]");
        assert!(matches!(optional(Some(&Value::Null)), Meta::Null));
        assert!(
            matches!(optional(Some(&json!("IfNotPresent"))), Meta::Text(t) if t == "IfNotPresent")
        );
    }
}
