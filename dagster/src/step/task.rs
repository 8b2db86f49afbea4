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
use tracing::{info, warn};

use celeriac_worker::tasks::{Task, TaskContext, TaskOutcome};

use super::args::StepTaskArgs;
use super::command::{command_args, job_name};
use super::event_writer::EventWriter;
pub use super::event_writer::EVENT_FLUSH_BUDGET;
use super::report::{optional, picked_up, python_str, retrieving_logs, text, Reporter};
use crate::events::{
    filter_events, step_failure, terminal_event, ErrorInfo, Meta, StepRef, DELEGATE_MARKER,
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

/// How long the start of a step task retries a database that is not answering before it fails.
pub const START_RETRY_WINDOW: Duration = Duration::from_secs(60);

#[async_trait]
impl Task for ExecuteStepK8sJob {
    fn name(&self) -> &'static str {
        TASK_NAME
    }

    async fn run(&self, ctx: TaskContext, request: &mut TaskRequest) -> TaskOutcome {
        let mut writer = None;
        let outcome = self.execute(ctx, request, &mut writer).await;
        if let Some(w) = writer {
            Box::pin(w.finish(EVENT_FLUSH_BUDGET)).await;
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

    /// The task in the order of spec §3.1: arguments, run, engine events, launch and watch the step,
    /// then its events for the result.
    async fn execute(
        &self,
        ctx: TaskContext,
        request: &mut TaskRequest,
        writer: &mut Option<EventWriter>,
    ) -> TaskOutcome {
        // Every phase but the long wait is boxed: a step task's future is as large as its largest
        // phase, and it lives for the whole step (issue 13's heap profile).
        let (mut args, instance, run) = match Box::pin(self.begin(request)).await {
            Ok(opened) => opened,
            Err(outcome) => return outcome,
        };
        // Owned copies: the reporter names the step while `args` gives up its large fields.
        let (run_id, step_key) = (args.run_id.clone(), args.step_key.clone());
        let writer: &EventWriter =
            writer.insert(EventWriter::start(instance.clone(), run_id.clone()));
        let reporter = Reporter {
            writer,
            step: StepRef {
                run_id: &run_id,
                job_name: &run.job_name,
                step_key: &step_key,
            },
        };
        Box::pin(picked_up(&reporter, &ctx)).await;

        // 5. Only STARTED runs get their steps executed.
        if run.status != "STARTED" {
            info!(run_id = %run_id, step = %step_key, status = %run.status, "run is not STARTED; not scheduling the step");
            reporter
                .engine(
                    "Not scheduling step because dagster run status is not STARTED",
                    &[("Step key", text(&step_key))],
                    None,
                    None,
                )
                .await;
            StepMetrics::get().finished(&run.job_name, StepOutcome::Skipped, None);
            return TaskOutcome::Success(json!([]));
        }

        let (spec, executing) =
            Box::pin(self.prepare(&ctx, request, &mut args, &run, &reporter)).await;
        let job = spec.job_name.clone();
        info!(run_id = %args.run_id, step = %step_key, job = %job, attempt = args.attempt, launcher = self.launcher.kind(), "launching step");
        let finished = Finished {
            job_name: &run.job_name,
            launched: std::time::Instant::now(),
        };
        let step_run = match self
            .supervise(&ctx, &spec, &instance, &reporter, &finished)
            .await
        {
            Ok(step_run) => step_run,
            Err(outcome) => return outcome,
        };
        Box::pin(self.collect(
            &ctx, request, &args, &reporter, &job, step_run, executing, &finished,
        ))
        .await
    }

    /// 1–3. The arguments (then the kwargs tree is let go) and the run, from its instance.
    async fn begin(
        &self,
        request: &mut TaskRequest,
    ) -> Result<(StepTaskArgs, Instance, crate::instance::RunInfo), TaskOutcome> {
        let args = match StepTaskArgs::from_kwargs(&request.kwargs) {
            Ok(a) => a,
            Err(e) => {
                warn!(task_id = %request.id, "invalid execute_step_k8s_job arguments: {e}");
                let (t, m) = e.python_type();
                return Err(failure(t, m, e.to_string()));
            }
        };
        // Parsed: the kwargs tree (the packed step arguments, ~KB of JSON) is not held while the step
        // runs, which may be hours, in thousands of concurrent steps.
        drop(std::mem::take(&mut request.kwargs));
        drop(std::mem::take(&mut request.args));
        let (instance, run) = match self.open_run(&args, &request.id).await {
            Ok(r) => r,
            Err(e) => {
                warn!(task_id = %request.id, run_id = %args.run_id, "cannot open the run's Dagster instance: {e}");
                return Err(instance_failure(&e));
            }
        };
        match run {
            Some(run) => Ok((args, instance, run)),
            None => Err(failure(
                "CheckError",
                "dagster._check",
                format!("Could not load run {}", args.run_id),
            )),
        }
    }

    /// 6–11. Names, command, labels and Kubernetes config resolved into the launcher's [`StepSpec`];
    /// the "Executing step" engine event (stored, and the first element of the result). The large
    /// fields of `args` are let go once the step is resolved.
    async fn prepare(
        &self,
        ctx: &TaskContext,
        request: &TaskRequest,
        args: &mut StepTaskArgs,
        run: &crate::instance::RunInfo,
        reporter: &Reporter<'_>,
    ) -> (StepSpec, Vec<String>) {
        let step_key = args.step_key.clone();
        let step_key = step_key.as_str();
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
            command: command_args(&args.entry_point, &args.compressed_input),
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
        let events = vec![executing.dagster_event_json()];
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
            workload: step.resolve(self.launcher.runs(), args),
        };
        // The step is resolved: its packed arguments and Kubernetes config (~KB each as JSON trees)
        // are not needed while it runs, which may be hours, in thousands of concurrent steps.
        drop(step);
        drop((tag_config, per_step));
        args.compressed_input = String::new();
        args.job_config = Map::new();
        args.user_defined_k8s_config = Map::new();
        args.per_step_k8s_config = Map::new();
        args.entry_point = Vec::new();
        (spec, events)
    }

    /// 12–13. Runs the step, watching for revocation (`terminate`) and for the run leaving STARTED.
    /// `Err` is the task's outcome when the step did not run to an end.
    async fn supervise(
        &self,
        ctx: &TaskContext,
        spec: &StepSpec,
        instance: &Instance,
        reporter: &Reporter<'_>,
        finished: &Finished<'_>,
    ) -> Result<StepRun, TaskOutcome> {
        let (run_id, step_key, job) = (&spec.run_id, spec.step_key.as_str(), &spec.job_name);
        let stop = CancellationToken::new();
        let launch = self.launcher.launch(spec, stop.clone());
        tokio::pin!(launch);
        let mut run_check = tokio::time::interval(self.run_status_interval);
        run_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        run_check.tick().await;
        let outcome = loop {
            tokio::select! {
                r = &mut launch => break r,
                _ = ctx.terminate.cancelled() => {
                    info!(run_id = %run_id, step = step_key, job = %job, "task revoked with terminate; stopping the step");
                    stop.cancel();
                    let _ = (&mut launch).await;
                    finished.record(StepOutcome::Cancelled);
                    return Err(TaskOutcome::Terminated);
                }
                _ = run_check.tick() => {
                    if !run_still_started(instance, run_id).await {
                        warn!(run_id = %run_id, step = step_key, job = %job, "run left STARTED; terminating its step");
                        reporter
                            .engine(
                                "Terminating Kubernetes Job because dagster run status is not STARTED",
                                &[
                                    ("Step key", text(step_key)),
                                    ("Kubernetes Job name", text(job)),
                                    ("Kubernetes Job namespace", text(&spec.namespace)),
                                ],
                                None,
                                None,
                            )
                            .await;
                        stop.cancel();
                        let _ = (&mut launch).await;
                        finished.record(StepOutcome::Cancelled);
                        return Err(TaskOutcome::Success(json!([])));
                    }
                }
            }
        };
        let class = self.launcher.failure_class();
        match outcome {
            Ok(r) => Ok(r),
            Err(LaunchError::Cancelled(_)) => {
                finished.record(StepOutcome::Cancelled);
                Err(TaskOutcome::Terminated)
            }
            Err(e) => {
                let (message, what) = match &e {
                    LaunchError::Create { .. } => (format!("Encountered unexpected error while creating Kubernetes job {job} for step {step_key}, exiting."), "create"),
                    LaunchError::Wait { .. } => (format!("Encountered unexpected error while waiting on Kubernetes job {job} for step {step_key}, exiting."), "wait for"),
                    _ => (format!("Encountered unexpected error retreiving Pods for Kubernetes job {job} for step {step_key}, exiting."), "list the pods of"),
                };
                warn!(run_id = %run_id, step = step_key, job = %job, "cannot {what} the step: {e}");
                let err = ErrorInfo::new(class.module, class.name, &e.to_string());
                reporter
                    .engine(&message, &[("Step key", text(step_key))], None, Some(&err))
                    .await;
                finished.record(StepOutcome::Error);
                Err(TaskOutcome::Success(json!([])))
            }
        }
    }

    /// 14–17. The step's outcome into the result: the failure event, "Retrieving logs", log errors,
    /// the step's own events, and a failure naming the cause when the step process reported none.
    #[allow(clippy::too_many_arguments)]
    async fn collect(
        &self,
        ctx: &TaskContext,
        request: &TaskRequest,
        args: &StepTaskArgs,
        reporter: &Reporter<'_>,
        job: &str,
        step_run: StepRun,
        mut events: Vec<String>,
        finished: &Finished<'_>,
    ) -> TaskOutcome {
        let step_key = args.step_key.as_str();
        let class = self.launcher.failure_class();
        if step_run.adopted_existing {
            reporter
                .engine(
                    &format!("Did not create Kubernetes job {job} for step {step_key} since job name already exists, proceeding with existing job."),
                    &[("Step key", text(step_key)), ("Kubernetes Job name", text(job))],
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
        events.push(retrieving_logs(reporter, &class, job, step_key, &step_run).await);

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
        let lost_previous = self.launcher.take_lost_previous(job);
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
        finished.record(if step_run.succeeded && !op_failed {
            StepOutcome::Success
        } else {
            StepOutcome::Failure
        });
        TaskOutcome::Success(Value::Array(
            events.into_iter().map(Value::String).collect(),
        ))
    }
}

/// Records a launched step's end in the per-job step metrics.
struct Finished<'a> {
    job_name: &'a str,
    launched: std::time::Instant,
}

impl Finished<'_> {
    fn record(&self, outcome: StepOutcome) {
        StepMetrics::get().finished(self.job_name, outcome, Some(self.launched.elapsed()));
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
