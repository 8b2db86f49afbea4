//! The keyword arguments of `execute_step_k8s_job` (spec: dagster-celery-k8s.md §2.3).

use serde_json::{Map, Value};

/// A problem with the task's arguments, named after the argument (Python raises `TypeError` or
/// `CheckError` for these; the step task reports them the same way).
#[derive(Debug, thiserror::Error)]
pub enum StepArgsError {
    #[error("execute_step_k8s_job() missing required keyword argument: '{0}'")]
    Missing(&'static str),
    #[error("execute_step_k8s_job() argument '{name}' is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("Celery K8s task executor can only execute 1 step at a time")]
    NotOneStep,
}

impl StepArgsError {
    /// (exception type, module) as the Python worker would raise it.
    pub fn python_type(&self) -> (&'static str, &'static str) {
        match self {
            StepArgsError::Missing(_) | StepArgsError::Invalid { .. } => ("TypeError", "builtins"),
            StepArgsError::NotOneStep => ("CheckError", "dagster._check"),
        }
    }
}

/// Everything the worker needs from a step task.
#[derive(Debug, Clone)]
pub struct StepTaskArgs {
    /// `pack_value(ExecuteStepArgs)`, verbatim, as the step command carries it
    /// ([`super::command::compress_packed`]): compressed at once, because a parsed tree of it is
    /// ~10 KB held by every step waiting for its run to be read, thousands at a burst.
    pub compressed_input: String,
    /// `DagsterK8sJobConfig._asdict()`.
    pub job_config: Map<String, Value>,
    pub job_namespace: String,
    pub user_defined_k8s_config: Map<String, Value>,
    pub per_step_k8s_config: Map<String, Value>,
    pub load_incluster_config: bool,
    pub job_wait_timeout: Option<f64>,
    pub kubeconfig_file: Option<String>,
    pub run_id: String,
    pub step_key: String,
    /// `known_state.previous_retry_attempts[step_key]`.
    pub attempt: u64,
    pub run_storage_yaml: Option<String>,
    pub event_storage_yaml: Option<String>,
    /// The repository origin's `entry_point` (or `[executable_path, "-m", "dagster"]`).
    pub entry_point: Vec<String>,
}

fn object(
    kwargs: &Map<String, Value>,
    name: &'static str,
    required: bool,
) -> Result<Map<String, Value>, StepArgsError> {
    match kwargs.get(name) {
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(Value::Null) | None if !required => Ok(Map::new()),
        None => Err(StepArgsError::Missing(name)),
        Some(other) => Err(StepArgsError::Invalid {
            name,
            reason: format!("expected a mapping, got {}", kind(other)),
        }),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "None",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// The storage `config_yaml` of `instance_ref.<field>` (falls back to the unified `storage_data`).
fn storage_yaml(instance_ref: &Value, field: &str) -> Option<String> {
    instance_ref
        .get(field)
        .and_then(|d| d.get("config_yaml"))
        .or_else(|| {
            instance_ref
                .get("storage_data")
                .and_then(|d| d.get("config_yaml"))
        })
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Which step of which run the packed `ExecuteStepArgs` name, and the attempt (from the known
/// state's retry counts). Python runs exactly one step per task.
fn step_identity(packed: &Value) -> Result<(String, String, u64), StepArgsError> {
    let invalid = |reason: &str| StepArgsError::Invalid {
        name: "execute_step_args_packed",
        reason: reason.to_string(),
    };
    let run_id = packed
        .get("pipeline_run_id")
        .or_else(|| packed.get("run_id"))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("no pipeline_run_id"))?
        .to_string();
    let steps = packed
        .get("step_keys_to_execute")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("no step_keys_to_execute"))?;
    if steps.len() != 1 {
        return Err(StepArgsError::NotOneStep);
    }
    let step_key = steps[0]
        .as_str()
        .ok_or_else(|| invalid("step key is not a string"))?
        .to_string();
    let attempt = packed
        .get("known_state")
        .and_then(|k| k.get("previous_retry_attempts"))
        .and_then(|a| a.get(&step_key))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok((run_id, step_key, attempt))
}

/// The command that runs `dagster api execute_step` in the step's code location: the repository
/// origin's `entry_point`, else `<executable_path> -m dagster`.
fn entry_point(packed: &Value) -> Vec<String> {
    let origin = packed
        .get("pipeline_origin")
        .or_else(|| packed.get("job_origin"))
        .and_then(|o| o.get("repository_origin"));
    match origin
        .and_then(|o| o.get("entry_point"))
        .and_then(Value::as_array)
    {
        Some(ep) if !ep.is_empty() => ep
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => {
            let exe = origin
                .and_then(|o| o.get("executable_path"))
                .and_then(Value::as_str)
                .unwrap_or("python");
            vec![exe.to_string(), "-m".into(), "dagster".into()]
        }
    }
}

impl StepTaskArgs {
    pub fn from_kwargs(kwargs: &Map<String, Value>) -> Result<StepTaskArgs, StepArgsError> {
        let packed = match kwargs.get("execute_step_args_packed") {
            Some(v @ Value::Object(_)) => v.clone(),
            None => return Err(StepArgsError::Missing("execute_step_args_packed")),
            Some(other) => {
                return Err(StepArgsError::Invalid {
                    name: "execute_step_args_packed",
                    reason: format!("expected packed ExecuteStepArgs, got {}", kind(other)),
                })
            }
        };
        let job_config = object(kwargs, "job_config_dict", true)?;
        let job_namespace = match kwargs.get("job_namespace") {
            Some(Value::String(s)) => s.clone(),
            None => return Err(StepArgsError::Missing("job_namespace")),
            Some(other) => {
                return Err(StepArgsError::Invalid {
                    name: "job_namespace",
                    reason: format!("expected str, got {}", kind(other)),
                })
            }
        };
        let user_defined_k8s_config = object(kwargs, "user_defined_k8s_config_dict", false)?;
        // Messages from publishers older than Dagster 1.7 have no per_step_k8s_config: treat as {}.
        let per_step_k8s_config = object(kwargs, "per_step_k8s_config", false)?;
        let load_incluster_config = match kwargs.get("load_incluster_config") {
            Some(Value::Bool(b)) => *b,
            None => return Err(StepArgsError::Missing("load_incluster_config")),
            Some(other) => {
                return Err(StepArgsError::Invalid {
                    name: "load_incluster_config",
                    reason: format!("expected bool, got {}", kind(other)),
                })
            }
        };
        let job_wait_timeout = match kwargs.get("job_wait_timeout") {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::Null) => None,
            None => return Err(StepArgsError::Missing("job_wait_timeout")),
            Some(other) => {
                return Err(StepArgsError::Invalid {
                    name: "job_wait_timeout",
                    reason: format!("expected float, got {}", kind(other)),
                })
            }
        };
        let kubeconfig_file = kwargs
            .get("kubeconfig_file")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let (run_id, step_key, attempt) = step_identity(&packed)?;
        let instance_ref = packed.get("instance_ref").cloned().unwrap_or(Value::Null);
        let entry_point = entry_point(&packed);
        Ok(StepTaskArgs {
            run_storage_yaml: storage_yaml(&instance_ref, "run_storage_data"),
            event_storage_yaml: storage_yaml(&instance_ref, "event_storage_data"),
            compressed_input: super::command::compress_packed(&packed),
            job_config,
            job_namespace,
            user_defined_k8s_config,
            per_step_k8s_config,
            load_incluster_config,
            job_wait_timeout,
            kubeconfig_file,
            run_id,
            step_key,
            attempt,
            entry_point,
        })
    }

    /// A string field of the job config (`job_image`, `dagster_home`, …).
    pub fn job_config_str(&self, key: &str) -> Option<&str> {
        self.job_config.get(key).and_then(Value::as_str)
    }
}
