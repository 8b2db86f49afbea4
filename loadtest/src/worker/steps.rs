//! The steps both sides are given: the tasks Dagster's executor would publish for the load job's
//! steps (built with `celeriac_dagster::submission` from the hand-off `CeleriacRunLauncher` computes,
//! so both workers get exactly Dagster's queue, priority and kwargs), whose Jobs run the load-step
//! program instead of Dagster. Built here rather than by Dagster so that the publish instant of each
//! step is known to the microsecond.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use celeriac_dagster::plan::snapshot::{OutputSnap, StepHandle, StepKind, StepSnap as Step};
use celeriac_dagster::plan::KnownState;
use celeriac_dagster::submission::{self, Handoff};
use celeriac_wire::broker::{Broker, QueueSpec};
use celeriac_wire::task::TaskMessage;
use serde_json::{json, Value};

use super::cluster::Namespace;

/// One published step.
#[derive(Debug, Clone)]
pub struct Sent {
    pub task_id: String,
    pub step_key: String,
    pub job_name: String,
    pub published_at: f64,
}

/// The hand-off of one STARTED run of the load job whose steps run in `ns` as the load-step program.
pub fn load_handoff(run_id: &str, base: &Value, ns: &Namespace) -> Result<Handoff> {
    let mut h = base.clone();
    h["run_id"] = json!(run_id);
    h["job_namespace"] = json!(ns.name);
    h["kubeconfig_file"] = json!(ns.kubeconfig.display().to_string());
    h["load_incluster_config"] = json!(false);
    h["job_config_dict"]["job_image"] = json!("celeriac/load-step:test");
    Handoff::decode(&h).context("decoding the hand-off")
}

/// A step of the load job as the execution plan holds it: `step_key`, with the op tags Dagster's
/// executor reads (`dagster-celery/queue`, and `dagster-k8s/config` giving the step container its
/// program, its sleep and where it notes that it exited).
fn load_step(step_key: &str, queue: &str, container_env: &Value) -> Step {
    let mut tags = BTreeMap::new();
    tags.insert(submission::QUEUE_TAG.to_string(), queue.to_string());
    tags.insert(
        submission::USER_DEFINED_K8S_CONFIG_TAG.to_string(),
        json!({"container_config": {"env": container_env}}).to_string(),
    );
    Step {
        key: step_key.to_string(),
        kind: StepKind::Compute,
        handle: StepHandle::Plain {
            node: step_key.to_string(),
            key: step_key.to_string(),
        },
        inputs: vec![],
        outputs: vec![OutputSnap {
            name: "result".into(),
            is_required: true,
            is_dynamic: false,
            is_asset_check: false,
        }],
        tags,
        pool: None,
    }
}

/// Publishes `count` steps of `handoff` to `queue`, as fast as the broker takes them. Each task is
/// what Dagster's executor publishes for the step (`submission::step_task`: queue, priority, the
/// eight kwargs), wrapped as the coordinator wraps it.
pub async fn publish(
    broker: &dyn Broker,
    queue: &str,
    handoff: &Handoff,
    prefix: &str,
    count: usize,
    container_env: &Value,
) -> Result<Vec<Sent>> {
    broker.declare(&QueueSpec::dagster(queue)).await?;
    let known = KnownState::default();
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        let step_key = format!("{prefix}_{i}");
        let step = load_step(&step_key, queue, container_env);
        let task = submission::step_task(handoff, 0, &step, &known)
            .with_context(|| format!("building the task of step {step_key}"))?;
        anyhow::ensure!(
            task.queue == queue,
            "step {step_key} routed to {}",
            task.queue
        );
        let id = uuid::Uuid::new_v4().to_string();
        let message = TaskMessage {
            id: id.clone(),
            task: celeriac_dagster::step::task::TASK_NAME.into(),
            args: vec![],
            argsrepr: celeriac_wire::saferepr::argsrepr(&[]),
            kwargsrepr: celeriac_wire::saferepr::kwargsrepr(&task.kwargs),
            kwargs: task.kwargs,
            origin: format!("{}@loadtest", std::process::id()),
            reply_to: None,
            priority: Some(task.priority),
            root_id: None,
            parent_id: None,
        };
        let published_at = crate::clock::now();
        broker
            .publish("", &task.queue, message.to_outgoing())
            .await?;
        sent.push(Sent {
            task_id: id,
            job_name: celeriac_dagster::step::command::job_name(&handoff.run_id, &step_key, 0),
            step_key,
            published_at,
        });
    }
    Ok(sent)
}

/// The step container's environment: the load-step program first on PATH as `dagster`, how long
/// it may be held, the file whose creation releases it and the file it notes its exit in.
pub fn container_env(step_dir: &Path, seconds: f64, done_file: &Path, release: &Path) -> Value {
    json!([
        {"name": "PATH", "value": format!("{}:/usr/local/bin:/usr/bin:/bin", step_dir.display())},
        {"name": "LOAD_STEP_SECONDS", "value": seconds.to_string()},
        {"name": "LOAD_STEP_RELEASE_FILE", "value": release.display().to_string()},
        {"name": "LOAD_STEP_DONE_FILE", "value": done_file.display().to_string()},
    ])
}
