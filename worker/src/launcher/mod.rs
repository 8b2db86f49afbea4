//! Where a step's process runs. The step task decides *what* runs (command, environment, Job name);
//! a launcher runs it and reports how it ended plus its logs.
//!
//! [`process::ProcessLauncher`] (the embedded default) runs the step as a local subprocess with the
//! environment its Kubernetes Job would get; a Kubernetes launcher creates the Job itself.

pub mod process;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Everything needed to run one step.
#[derive(Debug, Clone)]
pub struct StepSpec {
    /// `dagster-step-<md5>[-attempt]`: the Job (and pod) name, unique per run, step and attempt.
    pub job_name: String,
    pub namespace: String,
    pub command: Vec<String>,
    /// Environment of the step container (`DAGSTER_RUN_JOB_NAME`, `DAGSTER_RUN_STEP_KEY`, …).
    pub env: Vec<(String, String)>,
    pub image: Option<String>,
    /// `DagsterK8sJobConfig` as sent by the publisher.
    pub job_config: Value,
    /// The merged user-defined k8s config for this step.
    pub user_defined_k8s_config: Value,
    /// Stop waiting after this long (`job_wait_timeout`).
    pub wait_timeout: Option<std::time::Duration>,
}

/// How a step ended.
#[derive(Debug, Clone)]
pub struct StepRun {
    pub succeeded: bool,
    /// Why it failed, in words for the STEP_FAILURE event.
    pub failure_message: Option<String>,
    /// The step container's output (stdout, then stderr): where Dagster prints its events.
    pub logs: String,
    /// Names of the pods (or processes) the logs came from.
    pub pod_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start step {job_name}: {reason}")]
    Start { job_name: String, reason: String },
    #[error("step {0} was cancelled")]
    Cancelled(String),
}

/// Runs steps.
#[async_trait]
pub trait StepLauncher: Send + Sync {
    /// Runs the step to completion; on `cancel` stops it (and cleans up) and returns `Cancelled`.
    async fn launch(
        &self,
        spec: &StepSpec,
        cancel: CancellationToken,
    ) -> Result<StepRun, LaunchError>;
    /// Name for logs: `process`, `kubernetes`.
    fn kind(&self) -> &'static str;
}
