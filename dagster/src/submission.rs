//! The step task a celery-k8s run publishes, built as `dagster_celery_k8s.executor._submit_task_k8s_job`
//! and `dagster_celery.core_execution_loop` build it: queue, priority and the eight keyword arguments
//! of `execute_step_k8s_job` (spec: dagster-celery-k8s.md §2.3–2.4).
//!
//! Everything run-scoped comes from the [`Handoff`] that `CeleriacRunLauncher` computed with Dagster's own
//! executor code; what depends on the step (its tags, its key, the known state at submission) is built
//! here. No user code is involved.

use serde_json::{json, Map, Value};

use crate::k8s_config::CONFIG_KEYS;
use crate::kubernetes::schema::{to_snake, SnakeCaseError};
use crate::plan::active::{python_int, CELERY_STEP_PRIORITY_TAG};
use crate::plan::execution_plan::Step;
use crate::plan::{KnownState, RetryMode};
use crate::serdes::{self, SerdesError};

/// Op tag naming the Celery queue of a step.
pub const QUEUE_TAG: &str = "dagster-celery/queue";
/// Run tag added to every step's priority.
pub const RUN_PRIORITY_TAG: &str = "dagster-celery/run_priority";
/// Op tag with the step's Kubernetes config (JSON).
pub const USER_DEFINED_K8S_CONFIG_TAG: &str = "dagster-k8s/config";
/// Legacy op tag with the step container's resource requirements (JSON).
pub const RESOURCE_REQUIREMENTS_TAG: &str = "dagster-k8s/resource_requirements";

/// `DagsterK8sJobConfig` fields in declaration order (`to_dict()` order).
const JOB_CONFIG_FIELDS: &[&str] = &[
    "job_image",
    "dagster_home",
    "image_pull_policy",
    "image_pull_secrets",
    "service_account_name",
    "instance_config_map",
    "postgres_password_secret",
    "env_config_maps",
    "env_secrets",
    "env_vars",
    "volume_mounts",
    "volumes",
    "labels",
    "resources",
    "scheduler_name",
    "security_context",
];

/// `UserDefinedDagsterK8sConfig` sections accepted in the op tag, with their Kubernetes model.
const TAG_SECTIONS: &[(&str, &str)] = &[
    ("container_config", "V1Container"),
    ("pod_template_spec_metadata", "V1ObjectMeta"),
    ("pod_spec_config", "V1PodSpec"),
    ("job_config", "V1Job"),
    ("job_metadata", "V1ObjectMeta"),
    ("job_spec_config", "V1JobSpec"),
];

/// What a celery-k8s run's executor knows, as `CeleriacRunLauncher` handed it over (format version 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Handoff {
    pub run_id: String,
    pub job_name: String,
    /// Packed `InstanceRef` (opaque: it goes into every step's `ExecuteStepArgs`).
    pub instance_ref: Value,
    /// Packed `JobPythonOrigin` (opaque: `ExecuteStepArgs.pipeline_origin`).
    pub job_origin: Value,
    /// `DagsterK8sJobConfig.to_dict()`, in Python's key order.
    pub job_config_dict: Map<String, Value>,
    pub job_namespace: String,
    pub per_step_k8s_config: Value,
    pub load_incluster_config: Value,
    pub kubeconfig_file: Value,
    pub job_wait_timeout: Value,
    pub retry_mode: RetryMode,
    pub task_default_queue: String,
    pub task_default_priority: i64,
    /// Broker and backend URLs with the password masked (the coordinator's own config has the secrets).
    pub broker: String,
    pub backend: String,
    pub executor_name: String,
}

impl Handoff {
    /// Reads the hand-off JSON (`celeriac_coordinator_runs.handoff`).
    pub fn decode(v: &Value) -> Result<Self, SerdesError> {
        let Value::Object(m) = v else {
            return Err(SerdesError::Shape {
                path: "handoff".into(),
                expected: "a JSON object".into(),
                found: serdes::kind(v).into(),
            });
        };
        let version = m.get("version").and_then(Value::as_i64).unwrap_or(0);
        if version != 1 {
            return Err(SerdesError::Shape {
                path: "handoff.version".into(),
                expected: "1".into(),
                found: version.to_string(),
            });
        }
        let field = |k: &str| -> Result<&Value, SerdesError> {
            m.get(k).ok_or_else(|| SerdesError::Shape {
                path: format!("handoff.{k}"),
                expected: "a value".into(),
                found: "nothing".into(),
            })
        };
        let string = |k: &str| -> Result<String, SerdesError> {
            let v = field(k)?;
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| SerdesError::Shape {
                    path: format!("handoff.{k}"),
                    expected: "str".into(),
                    found: serdes::kind(v).into(),
                })
        };
        let Value::Object(job_config) = field("job_config_dict")? else {
            return Err(SerdesError::Shape {
                path: "handoff.job_config_dict".into(),
                expected: "dict".into(),
                found: "other".into(),
            });
        };
        // Stored JSON may have lost Python's key order: restore `to_dict()` order, unknown keys last.
        let mut ordered = Map::new();
        for k in JOB_CONFIG_FIELDS {
            if let Some(v) = job_config.get(*k) {
                ordered.insert((*k).to_string(), v.clone());
            }
        }
        for (k, v) in job_config {
            if !ordered.contains_key(k) {
                ordered.insert(k.clone(), v.clone());
            }
        }
        let retry_text = string("retry_mode")?;
        Ok(Handoff {
            run_id: string("run_id")?,
            job_name: string("job_name")?,
            instance_ref: field("instance_ref")?.clone(),
            job_origin: field("job_origin")?.clone(),
            job_config_dict: ordered,
            job_namespace: string("job_namespace")?,
            per_step_k8s_config: m.get("per_step_k8s_config").cloned().unwrap_or(json!({})),
            load_incluster_config: field("load_incluster_config")?.clone(),
            kubeconfig_file: m.get("kubeconfig_file").cloned().unwrap_or(Value::Null),
            job_wait_timeout: field("job_wait_timeout")?.clone(),
            retry_mode: RetryMode::parse(&retry_text).ok_or_else(|| SerdesError::UnknownClass {
                class: format!("RetryMode.{retry_text}"),
                path: "handoff.retry_mode".into(),
                known: "ENABLED, DISABLED, DEFERRED".into(),
            })?,
            task_default_queue: string("task_default_queue")?,
            task_default_priority: field("task_default_priority")?.as_i64().unwrap_or(5),
            broker: m
                .get("broker")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            backend: m
                .get("backend")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            executor_name: m
                .get("executor_name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        })
    }

    /// The repository origin's `container_image` (the step image when the executor config has none).
    fn origin_image(&self) -> Option<&str> {
        self.job_origin
            .pointer("/repository_origin/container_image")
            .and_then(Value::as_str)
    }
}

/// Why a step cannot be submitted. Python raises in each case ("Encountered error during celery task
/// submission.") and the run fails.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("Error in tags for {tag}: {reason}")]
    Tag { tag: &'static str, reason: String },
    #[error(transparent)]
    Snake(#[from] SnakeCaseError),
    #[error("step {step_key}: tag {tag}={value:?} is not an integer")]
    Priority {
        step_key: String,
        tag: &'static str,
        value: String,
    },
    #[error("step {step_key}: priority {priority} is outside 0..=255 (ubyte format requires 0 <= number <= 255)")]
    PriorityRange { step_key: String, priority: i64 },
    #[error("No image included in either executor config or the dagster job")]
    NoImage,
}

/// `_get_run_priority`: the `dagster-celery/run_priority` run tag, 0 when absent or not an integer.
pub fn run_priority(run_tags: &std::collections::BTreeMap<String, String>) -> i64 {
    run_tags
        .get(RUN_PRIORITY_TAG)
        .and_then(|v| python_int(v))
        .unwrap_or(0)
}

/// `_get_step_priority`: run priority + the step's `dagster-celery/priority` (default
/// `task_default_priority`).
pub fn step_priority(
    handoff: &Handoff,
    run_priority: i64,
    step: &Step,
) -> Result<i64, SubmitError> {
    let step_priority = match step.tags.get(CELERY_STEP_PRIORITY_TAG) {
        None => handoff.task_default_priority,
        Some(v) => python_int(v).ok_or_else(|| SubmitError::Priority {
            step_key: step.key.clone(),
            tag: CELERY_STEP_PRIORITY_TAG,
            value: v.clone(),
        })?,
    };
    Ok(run_priority + step_priority)
}

/// The queue of a step: its `dagster-celery/queue` tag or the app's `task_default_queue`.
pub fn queue(handoff: &Handoff, step: &Step) -> String {
    step.tags
        .get(QUEUE_TAG)
        .cloned()
        .unwrap_or_else(|| handoff.task_default_queue.clone())
}

fn parse_tag(tag: &'static str, text: &str) -> Result<Map<String, Value>, SubmitError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(SubmitError::Tag {
            tag,
            reason: format!(
                "Value at path root must be dict, got {}",
                serdes::kind(&other)
            ),
        }),
        Err(e) => Err(SubmitError::Tag {
            tag,
            reason: format!("not JSON: {e}"),
        }),
    }
}

/// Validates a Permissive section of a tag: must be a dict.
fn section<'a>(
    tag: &'static str,
    config: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, SubmitError> {
    match config.get(name) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(SubmitError::Tag {
            tag,
            reason: format!("Value at path root:{name} must be dict."),
        }),
    }
}

/// Port of `dagster_k8s.job.get_user_defined_k8s_config(step.tags).to_dict()`: the op tag's config
/// validated against Dagster's schema and snake_cased by Kubernetes model, plus the legacy resource
/// requirements tag merged into `container_config.resources`.
pub fn user_defined_k8s_config(
    tags: &std::collections::BTreeMap<String, String>,
) -> Result<Map<String, Value>, SubmitError> {
    let mut sections: Map<String, Value> = Map::new();
    let mut merge_behavior = "DEEP".to_string();
    if let Some(text) = tags.get(USER_DEFINED_K8S_CONFIG_TAG) {
        let tag = USER_DEFINED_K8S_CONFIG_TAG;
        let config = parse_tag(tag, text)?;
        for key in config.keys() {
            if key != "merge_behavior" && !TAG_SECTIONS.iter().any(|(s, _)| s == key) {
                return Err(SubmitError::Tag {
                    tag,
                    reason: format!("Received unexpected config entry \"{key}\" at the root."),
                });
            }
        }
        for (name, _) in TAG_SECTIONS {
            if let Some(m) = section(tag, &config, name)? {
                sections.insert((*name).to_string(), Value::Object(m.clone()));
            }
        }
        if let Some(mb) = config.get("merge_behavior") {
            match mb.as_str() {
                Some(v @ ("DEEP" | "SHALLOW")) => merge_behavior = v.to_string(),
                _ => {
                    return Err(SubmitError::Tag {
                        tag,
                        reason: format!(
                            "Value at path root:merge_behavior not in enum type K8sConfigMergeBehavior got {mb}"
                        ),
                    })
                }
            }
        }
    }
    if let Some(text) = tags.get(RESOURCE_REQUIREMENTS_TAG) {
        let tag = RESOURCE_REQUIREMENTS_TAG;
        let config = parse_tag(tag, text)?;
        for key in config.keys() {
            if key != "limits" && key != "requests" {
                return Err(SubmitError::Tag {
                    tag,
                    reason: format!("Received unexpected config entry \"{key}\" at the root."),
                });
            }
        }
        let mut resources = Map::new();
        for name in ["limits", "requests"] {
            if let Some(m) = section(tag, &config, name)? {
                resources.insert(name.to_string(), Value::Object(m.clone()));
            }
        }
        // merge_dicts(container_config, {"resources": …}): a shallow update.
        let container = sections
            .entry("container_config")
            .or_insert_with(|| json!({}));
        if let Value::Object(c) = container {
            c.insert("resources".into(), Value::Object(resources));
        }
    }
    let mut out = Map::new();
    // `to_dict()`'s sections, in order (the last three never come from a tag).
    for name in &CONFIG_KEYS {
        let value = match sections.get(*name) {
            Some(Value::Object(m)) if !m.is_empty() => {
                let model = TAG_SECTIONS
                    .iter()
                    .find(|(s, _)| s == name)
                    .map_or("", |(_, model)| model);
                Value::Object(to_snake(m, model)?)
            }
            _ => json!({}),
        };
        out.insert((*name).to_string(), value);
    }
    out.insert("merge_behavior".into(), json!(merge_behavior));
    Ok(out)
}

/// `pack_value(ExecuteStepArgs(...))` for one step, in Python's field order.
pub fn execute_step_args(handoff: &Handoff, step_key: &str, known_state: &KnownState) -> Value {
    let mut m = Map::new();
    m.insert("__class__".into(), json!("ExecuteStepArgs"));
    m.insert("pipeline_origin".into(), handoff.job_origin.clone());
    m.insert("pipeline_run_id".into(), json!(handoff.run_id));
    m.insert("step_keys_to_execute".into(), json!([step_key]));
    m.insert("instance_ref".into(), handoff.instance_ref.clone());
    m.insert(
        "retry_mode".into(),
        handoff.retry_mode.for_inner_plan().pack(),
    );
    m.insert("known_state".into(), known_state.pack());
    m.insert("should_verify_step".into(), json!(true));
    m.insert("print_serialized_events".into(), json!(true));
    Value::Object(m)
}

/// One step task, ready to wrap in a Celery message.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTask {
    pub queue: String,
    /// AMQP priority (`run priority + step priority`).
    pub priority: u8,
    /// The eight keyword arguments, in Python's order.
    pub kwargs: Map<String, Value>,
}

/// Builds the `execute_step_k8s_job` task of `step` with the known state at submission.
pub fn step_task(
    handoff: &Handoff,
    run_priority: i64,
    step: &Step,
    known_state: &KnownState,
) -> Result<StepTask, SubmitError> {
    let user_defined = user_defined_k8s_config(&step.tags)?;
    let mut job_config = handoff.job_config_dict.clone();
    let has_image = job_config
        .get("job_image")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if !has_image {
        match handoff.origin_image() {
            Some(image) if !image.is_empty() => {
                job_config.insert("job_image".into(), json!(image));
            }
            _ => return Err(SubmitError::NoImage),
        }
    }
    let priority = step_priority(handoff, run_priority, step)?;
    let priority = u8::try_from(priority).map_err(|_| SubmitError::PriorityRange {
        step_key: step.key.clone(),
        priority,
    })?;
    let mut kwargs = Map::new();
    kwargs.insert(
        "execute_step_args_packed".into(),
        execute_step_args(handoff, &step.key, known_state),
    );
    kwargs.insert("job_config_dict".into(), Value::Object(job_config));
    kwargs.insert("job_namespace".into(), json!(handoff.job_namespace));
    kwargs.insert(
        "user_defined_k8s_config_dict".into(),
        Value::Object(user_defined),
    );
    kwargs.insert(
        "per_step_k8s_config".into(),
        handoff.per_step_k8s_config.clone(),
    );
    kwargs.insert(
        "load_incluster_config".into(),
        handoff.load_incluster_config.clone(),
    );
    kwargs.insert("job_wait_timeout".into(), handoff.job_wait_timeout.clone());
    kwargs.insert("kubeconfig_file".into(), handoff.kubeconfig_file.clone());
    Ok(StepTask {
        queue: queue(handoff, step),
        priority,
        kwargs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn user_defined_config_from_tags_matches_dagster() {
        let mut tags = BTreeMap::new();
        assert_eq!(
            Value::Object(user_defined_k8s_config(&tags).expect("empty")),
            json!({"container_config": {}, "pod_template_spec_metadata": {}, "pod_spec_config": {},
                   "job_config": {}, "job_metadata": {}, "job_spec_config": {}, "deployment_metadata": {},
                   "service_metadata": {}, "service_spec_config": {}, "merge_behavior": "DEEP"})
        );
        tags.insert(
            USER_DEFINED_K8S_CONFIG_TAG.to_string(),
            r#"{"container_config": {"resources": {"limits": {"cpu": "1"}}, "imagePullPolicy": "Always"},
                "pod_template_spec_metadata": {"labels": {"a": "b"}}, "merge_behavior": "SHALLOW"}"#
                .to_string(),
        );
        tags.insert(
            RESOURCE_REQUIREMENTS_TAG.to_string(),
            r#"{"requests": {"memory": "1Gi"}}"#.to_string(),
        );
        let got = user_defined_k8s_config(&tags).expect("valid");
        assert_eq!(
            got["container_config"],
            json!({"resources": {"requests": {"memory": "1Gi"}}, "image_pull_policy": "Always"})
        );
        assert_eq!(got["merge_behavior"], json!("SHALLOW"));
        tags.insert(
            USER_DEFINED_K8S_CONFIG_TAG.to_string(),
            r#"{"bogus": {}}"#.to_string(),
        );
        assert!(matches!(
            user_defined_k8s_config(&tags),
            Err(SubmitError::Tag { .. })
        ));
    }
}
