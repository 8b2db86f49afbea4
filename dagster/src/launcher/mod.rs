//! Where a step's process runs. The step task decides *what* runs (command, Job name, labels, the
//! Dagster-provided environment); a launcher runs it and reports how it ended plus its logs.
//!
//! [`process::ProcessLauncher`] (the embedded default) runs the step as a local subprocess with the
//! environment its Kubernetes Job would get; [`kubernetes::KubernetesLauncher`] builds the Job from the
//! same [`StepSpec`] (`construct_dagster_k8s_job`, spec §3.2), creates it, waits for it through shared
//! watches and reads its step container's log.

pub mod kubernetes;
pub mod process;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Everything needed to run one step.
#[derive(Debug, Clone)]
pub struct StepSpec {
    /// `dagster-step-<md5>[-attempt]`: the Job (and pod) name, unique per run, step and attempt.
    pub job_name: String,
    pub namespace: String,
    pub run_id: String,
    pub step_key: String,
    /// The container's command (`[*entry_point, "api", "execute_step", "--compressed-input-json", …]`):
    /// the Job's container `args`. Contains the instance config: never log it.
    pub command: Vec<String>,
    /// The Job's explicit `env_vars` (`DAGSTER_RUN_JOB_NAME`, `DAGSTER_RUN_STEP_KEY`), in order. The rest
    /// of the container environment comes from [`Self::job_config`] and [`Self::user_defined_k8s_config`]
    /// (`dagster_home`, `postgres_password_secret`, `env_vars`, `env_config_maps`, container `env`…).
    pub env: Vec<(String, String)>,
    /// `job_config.job_image` (the container config's `image` overrides it).
    pub image: Option<String>,
    /// `dagster/job`, `dagster/op`, `dagster/run-id`[, `dagster/code-location`] (unsanitised values).
    pub labels: Vec<(String, String)>,
    /// `DagsterK8sJobConfig._asdict()` as sent by the publisher (unknown keys kept).
    pub job_config: Value,
    /// The op tag's `UserDefinedDagsterK8sConfig.to_dict()` (snake_case, as sent).
    pub user_defined_k8s_config: Value,
    /// `per_step_k8s_config[step_key]` as sent (raw user config: camelCase allowed), `{}` if none.
    pub per_step_k8s_config: Value,
    /// [`crate::k8s_config::merge_user_config`] of the two above, without snake_casing: exact
    /// for the keys whose spelling is the same in both cases (`env`, `name`, `value`, `image`…).
    pub merged_user_config: Value,
    pub load_incluster_config: bool,
    pub kubeconfig_file: Option<String>,
    /// Give up after this long (`job_wait_timeout`; `None` when 0 or absent).
    pub wait_timeout: Option<Duration>,
}

/// A pod whose log could not be read (the step task reports it and carries on with the other pods).
#[derive(Debug, Clone)]
pub struct LogError {
    pub pod_name: String,
    pub message: String,
}

/// How a step ended.
#[derive(Debug, Clone, Default)]
pub struct StepRun {
    pub succeeded: bool,
    /// Why it failed, in words (`str(err)` of the STEP_FAILURE: "Encountered failed job pods for job …",
    /// "Step process … exited with code 3", "Timed out while waiting for job … to complete").
    pub failure_message: Option<String>,
    /// The step container's output: where `dagster api execute_step` prints its events (stdout).
    pub logs: String,
    /// Names of the pods (or processes) the logs came from (the "Pod names" metadata of E3).
    pub pod_names: Vec<String>,
    /// The Job already existed (HTTP 409 `AlreadyExists`) and was waited on instead of created.
    pub adopted_existing: bool,
    /// Pods whose log could not be read.
    pub log_errors: Vec<LogError>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Creating the step failed (Kubernetes API error other than 409). Python: error engine event, `[]`.
    #[error("{reason}")]
    Create { job_name: String, reason: String },
    /// Waiting on the step failed for reasons other than the step failing (API retries exhausted).
    #[error("{reason}")]
    Wait { job_name: String, reason: String },
    /// Listing the step's pods failed.
    #[error("{reason}")]
    Pods { job_name: String, reason: String },
    /// Stopped because the caller cancelled; the step (Job, pods, process) is gone.
    #[error("step {0} was cancelled")]
    Cancelled(String),
}

/// The exception class the STEP_FAILURE of a failed step names (`SerializableErrorInfo.cls_name`).
#[derive(Debug, Clone, Copy)]
pub struct FailureClass {
    /// Module for the `message` prefix (`dagster_k8s.client`).
    pub module: &'static str,
    /// Class name (`DagsterK8sError`).
    pub name: &'static str,
}

/// Runs steps.
#[async_trait]
pub trait StepLauncher: Send + Sync {
    /// Runs the step to completion and returns how it ended. A step that ran and failed (non-zero
    /// exit, failed pod, timeout) is `Ok` with `succeeded: false`. On `cancel`, stops it, cleans up
    /// (kills the process / deletes the Job and its pods) and returns [`LaunchError::Cancelled`].
    async fn launch(
        &self,
        spec: &StepSpec,
        cancel: CancellationToken,
    ) -> Result<StepRun, LaunchError>;
    /// Name for logs: `process`, `kubernetes`.
    fn kind(&self) -> &'static str;
    /// The error class of this launcher's step failures.
    fn failure_class(&self) -> FailureClass;
}
