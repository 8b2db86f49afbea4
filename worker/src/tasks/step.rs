//! `execute_step_k8s_job`: Dagster's celery-k8s step task (`dagster_celery_k8s/executor.py`), in the
//! order of spec §3.1. The result is the list of serialized `DagsterEvent`s the run worker replays:
//! `[Executing…, (STEP_FAILURE), Retrieving logs…, *the step's own events]`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use celeriac_wire::message::TaskRequest;
use celeriac_wire::result::ExceptionInfo;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Task, TaskContext, TaskOutcome};
use crate::dagster::command::{command_args, job_name};
use crate::dagster::events::{
    engine_event, step_failure, ErrorInfo, Event, Meta, StepRef, DELEGATE_MARKER,
};
use crate::dagster::instance::{Instance, Instances};
use crate::dagster::step_args::StepTaskArgs;
use crate::launcher::{LaunchError, StepLauncher, StepSpec};

/// How often the run's status is checked while its step runs.
const RUN_STATUS_INTERVAL: Duration = Duration::from_secs(3);

pub struct ExecuteStepK8sJob {
    launcher: Arc<dyn StepLauncher>,
    instances: Instances,
}

impl ExecuteStepK8sJob {
    pub fn new(launcher: Arc<dyn StepLauncher>) -> Self {
        Self {
            launcher,
            instances: Instances::default(),
        }
    }
}

fn failure(exc_type: &str, module: &str, message: impl Into<String>) -> TaskOutcome {
    let message = message.into();
    TaskOutcome::Failure {
        traceback: Some(format!("Traceback (most recent call last):\n  celeriac execute_step_k8s_job\n{exc_type}: {message}\n")),
        exc: ExceptionInfo::new(exc_type, module, message),
    }
}

#[async_trait]
impl Task for ExecuteStepK8sJob {
    fn name(&self) -> &'static str {
        "execute_step_k8s_job"
    }

    async fn run(&self, ctx: TaskContext, request: &TaskRequest) -> TaskOutcome {
        let args = match StepTaskArgs::from_kwargs(&request.kwargs) {
            Ok(a) => a,
            Err(e) => {
                let (t, m) = e.python_type();
                return failure(t, m, e.to_string());
            }
        };
        let instance = match self
            .instances
            .open(
                args.run_storage_yaml.as_deref(),
                args.event_storage_yaml.as_deref(),
            )
            .await
        {
            Ok(i) => i,
            Err(e) => {
                return failure(
                    "DagsterInstanceError",
                    "dagster._core.errors",
                    e.to_string(),
                )
            }
        };
        let run = match instance.get_run(&args.run_id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return failure(
                    "CheckError",
                    "dagster._check",
                    format!("Could not load run {}", args.run_id),
                )
            }
            Err(e) => {
                return failure(
                    "DagsterInstanceError",
                    "dagster._core.errors",
                    e.to_string(),
                )
            }
        };
        let step = StepRef {
            run_id: &args.run_id,
            job_name: &run.job_name,
            step_key: &args.step_key,
        };
        let store = |event: Event| {
            let instance = &instance;
            let run_id = args.run_id.clone();
            async move {
                if let Err(e) = instance.report(&run_id, &event).await {
                    warn!(run_id = %run_id, "cannot write a Dagster engine event: {e}");
                }
                event
            }
        };

        let pod_name = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty());
        store(engine_event(
            &step,
            &format!("Task for step {} picked up by Celery", args.step_key),
            &[
                ("Celery worker name", Meta::Text(ctx.hostname.clone())),
                (
                    "Celery worker Kubernetes Pod name",
                    pod_name.map_or(Meta::Null, Meta::Text),
                ),
            ],
            None,
            None,
        ))
        .await;

        if run.status != "STARTED" {
            info!(run_id = %args.run_id, step = %args.step_key, status = %run.status, "run is not STARTED; not scheduling the step");
            store(engine_event(
                &step,
                "Not scheduling step because dagster run status is not STARTED",
                &[("Step key", Meta::Text(args.step_key.clone()))],
                None,
                None,
            ))
            .await;
            return TaskOutcome::Success(json!([]));
        }

        let job = job_name(&args.run_id, &args.step_key, args.attempt);
        let image = args.job_config_str("job_image").map(str::to_owned);
        let pull_secrets = args
            .job_config
            .get("image_pull_secrets")
            .cloned()
            .unwrap_or(json!([]));
        let executing = store(engine_event(
            &step,
            &format!(
                "Executing step \"{}\" in Kubernetes job {job}.",
                args.step_key
            ),
            &[
                ("Step key", Meta::Text(args.step_key.clone())),
                ("Kubernetes Job name", Meta::Text(job.clone())),
                (
                    "Job image",
                    Meta::Text(image.clone().unwrap_or_else(|| "None".into())),
                ),
                (
                    "Image pull policy",
                    Meta::Text(
                        args.job_config_str("image_pull_policy")
                            .unwrap_or("None")
                            .to_string(),
                    ),
                ),
                (
                    "Image pull secrets",
                    Meta::Text(python_list_repr(&pull_secrets)),
                ),
                (
                    "Service account name",
                    Meta::Text(
                        args.job_config_str("service_account_name")
                            .unwrap_or("None")
                            .to_string(),
                    ),
                ),
            ],
            Some(DELEGATE_MARKER),
            None,
        ))
        .await;
        let mut events = vec![executing.dagster_event_json()];

        let spec = StepSpec {
            job_name: job.clone(),
            namespace: args.job_namespace.clone(),
            command: command_args(&args),
            env: step_env(&args, &run.job_name),
            image,
            job_config: Value::Object(args.job_config.clone()),
            user_defined_k8s_config: merged_user_config(&args),
            wait_timeout: args
                .job_wait_timeout
                .filter(|t| *t > 0.0)
                .map(Duration::from_secs_f64),
        };
        info!(run_id = %args.run_id, step = %args.step_key, job = %job, launcher = self.launcher.kind(), "launching step");

        let stop = CancellationToken::new();
        let launch = self.launcher.launch(&spec, stop.clone());
        tokio::pin!(launch);
        let mut run_check = tokio::time::interval(RUN_STATUS_INTERVAL);
        run_check.tick().await;
        let outcome = loop {
            tokio::select! {
                r = &mut launch => break r,
                _ = ctx.terminate.cancelled() => {
                    stop.cancel();
                    let _ = (&mut launch).await;
                    return TaskOutcome::Terminated;
                }
                _ = run_check.tick() => {
                    if !run_still_started(&instance, &args.run_id).await {
                        warn!(run_id = %args.run_id, step = %args.step_key, "run left STARTED; terminating its step");
                        stop.cancel();
                        let _ = (&mut launch).await;
                        store(engine_event(
                            &step,
                            "Terminating Kubernetes Job because dagster run status is not STARTED",
                            &[
                                ("Step key", Meta::Text(args.step_key.clone())),
                                ("Kubernetes Job name", Meta::Text(job.clone())),
                                ("Kubernetes Job namespace", Meta::Text(args.job_namespace.clone())),
                            ],
                            None,
                            None,
                        ))
                        .await;
                        return TaskOutcome::Success(json!([]));
                    }
                }
            }
        };
        let run_result = match outcome {
            Ok(r) => r,
            Err(LaunchError::Cancelled(_)) => return TaskOutcome::Terminated,
            Err(e @ LaunchError::Start { .. }) => {
                let err = ErrorInfo {
                    message: e.to_string(),
                    cls_name: "DagsterK8sError".into(),
                };
                store(engine_event(
                    &step,
                    &format!("Encountered unexpected error while creating Kubernetes job {job} for step {}, exiting.", args.step_key),
                    &[("Step key", Meta::Text(args.step_key.clone()))],
                    None,
                    Some(&err),
                ))
                .await;
                return TaskOutcome::Success(json!([]));
            }
        };
        if !run_result.succeeded {
            let reason = run_result
                .failure_message
                .clone()
                .unwrap_or_else(|| "the step failed".into());
            let err = ErrorInfo {
                message: format!("dagster_k8s.client.DagsterK8sError: Encountered failed job pods for job {job}: {reason}\n"),
                cls_name: "DagsterK8sError".into(),
            };
            let mut ev = step_failure(&step, &err);
            ev.entry["user_message"] = json!(format!(
                "Encountered failed job pods for job {job}: {reason}"
            ));
            events.push(store(ev).await.dagster_event_json());
        }
        let retrieving = store(engine_event(
            &step,
            "Retrieving logs from Kubernetes Job pods",
            &[("Pod names", Meta::Text(run_result.pod_names.join("\n")))],
            None,
            None,
        ))
        .await;
        events.push(retrieving.dagster_event_json());
        events.extend(crate::dagster::events::filter_events(&run_result.logs));
        TaskOutcome::Success(Value::Array(
            events.into_iter().map(Value::String).collect(),
        ))
    }
}

async fn run_still_started(instance: &Instance, run_id: &str) -> bool {
    match instance.get_run(run_id).await {
        Ok(Some(r)) => r.status == "STARTED",
        Ok(None) => false,
        // A database hiccup is not a reason to kill a running step.
        Err(e) => {
            warn!(run_id, "cannot check the run status: {e}");
            true
        }
    }
}

/// Python's `str(list)` for the "Image pull secrets" metadata (`[]`, `[{'name': 'x'}]`).
fn python_list_repr(v: &Value) -> String {
    celeriac_wire::json::python_repr(v)
}

/// The user-defined k8s config of this step: the op tag's config with the step's `per_step_k8s_config`
/// merged onto it (deep merge: dicts recursively, lists concatenated).
fn merged_user_config(args: &StepTaskArgs) -> Value {
    let base = Value::Object(args.user_defined_k8s_config.clone());
    match args.per_step_k8s_config.get(&args.step_key) {
        Some(per_step @ Value::Object(_)) => deep_merge(base, per_step.clone()),
        _ => base,
    }
}

fn deep_merge(onto: Value, from: Value) -> Value {
    match (onto, from) {
        (Value::Object(mut a), Value::Object(b)) => {
            for (k, v) in b {
                let merged = match a.remove(&k) {
                    Some(old) => deep_merge(old, v),
                    None => v,
                };
                a.insert(k, merged);
            }
            Value::Object(a)
        }
        (Value::Array(mut a), Value::Array(b)) => {
            for item in b {
                if !a.contains(&item) {
                    a.push(item);
                }
            }
            Value::Array(a)
        }
        (_, b) => b,
    }
}

/// The environment the step's container would get (besides the worker's own): Dagster's run/step
/// variables, `DAGSTER_HOME`, the job config's `env_vars`, and literal `env` entries of the container config.
fn step_env(args: &StepTaskArgs, job_name: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("DAGSTER_RUN_JOB_NAME".to_string(), job_name.to_string()),
        ("DAGSTER_RUN_STEP_KEY".to_string(), args.step_key.clone()),
    ];
    if let Some(home) = args.job_config_str("dagster_home") {
        // Only when it exists here: a path inside a container image is meaningless to a local process.
        if std::path::Path::new(home).is_dir() {
            env.push(("DAGSTER_HOME".into(), home.to_string()));
        }
    }
    if let Some(Value::Array(vars)) = args.job_config.get("env_vars") {
        for v in vars.iter().filter_map(Value::as_str) {
            match v.split_once('=') {
                Some((k, val)) => env.push((k.to_string(), val.to_string())),
                None => {
                    if let Ok(val) = std::env::var(v) {
                        env.push((v.to_string(), val));
                    }
                }
            }
        }
    }
    let user = merged_user_config(args);
    if let Some(Value::Array(entries)) = user.pointer("/container_config/env") {
        for e in entries {
            if let (Some(name), Some(value)) = (
                e.get("name").and_then(Value::as_str),
                e.get("value").and_then(Value::as_str),
            ) {
                env.push((name.to_string(), value.to_string()));
            }
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_merge_concatenates_lists_and_recurses() {
        let a = json!({"container_config": {"env": [{"name": "A", "value": "1"}], "resources": {"limits": {"cpu": "1"}}}});
        let b = json!({"container_config": {"env": [{"name": "B", "value": "2"}], "resources": {"limits": {"memory": "1Gi"}}}});
        let m = deep_merge(a, b);
        assert_eq!(
            m["container_config"]["env"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(
            m["container_config"]["resources"]["limits"],
            json!({"cpu": "1", "memory": "1Gi"})
        );
    }
}
