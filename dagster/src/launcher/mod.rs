//! Where a step runs. The step task decides *what* runs and resolves it into the form its launcher
//! runs (a [`Workload`]: the step Job body, or a local command and environment); a launcher runs it
//! and reports how it ended plus its logs.
//!
//! [`process::ProcessLauncher`] (the embedded default) runs the step as a local subprocess with the
//! environment its Kubernetes Job would get; [`kubernetes::KubernetesLauncher`] creates the step Job
//! (`construct_dagster_k8s_job`, spec §3.2), waits for it through shared watches and reads its step
//! container's log.

pub mod kubernetes;
pub mod process;
pub mod step_state;

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::Job;
use tokio_util::sync::CancellationToken;

/// One step to run, resolved for its launcher.
#[derive(Debug)]
pub struct StepSpec {
    /// `dagster-step-<md5>[-attempt]`: the Job (and pod, or process) name, unique per run, step and
    /// attempt.
    pub job_name: String,
    /// The Job's namespace (`job_namespace`).
    pub namespace: String,
    pub run_id: String,
    pub step_key: String,
    /// The Celery task id (recorded so an adopting worker can say which task started the step).
    pub task_id: String,
    /// The step's retry attempt (`known_state.previous_retry_attempts[step_key]`).
    pub attempt: u64,
    /// Node name of the worker running the step.
    pub worker: String,
    /// Give up after this long (`job_wait_timeout`; `None` when 0 or absent).
    pub wait_timeout: Option<Duration>,
    /// What runs.
    pub workload: Workload,
}

/// The form a launcher runs steps in ([`StepLauncher::runs`]); the step task resolves each step into
/// that form only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// A Kubernetes Job.
    Job,
    /// A local process.
    Process,
}

/// A step resolved for one kind of launcher.
#[derive(Debug)]
pub enum Workload {
    /// Boxed: a Job body is large.
    Job(Box<StepJob>),
    Process(StepProcess),
}

impl Workload {
    pub fn kind(&self) -> WorkloadKind {
        match self {
            Workload::Job(_) => WorkloadKind::Job,
            Workload::Process(_) => WorkloadKind::Process,
        }
    }
}

/// A step as a Kubernetes Job.
#[derive(Debug)]
pub struct StepJob {
    /// The Job, or why it could not be built (a bare `env_vars` name unset in the worker, a body that
    /// is not a Job). The launcher reports that as a create failure once its client is ready and the
    /// namespace's permissions are checked, so a worker lacking a cluster or a permission says so first.
    /// Taken for the create request ([`StepJob::take_body`]): a step does not hold its Job (the pod
    /// template carries the step's arguments and environment, several KB) while it runs, for hours
    /// perhaps, in thousands of concurrent steps (issue 13's heap profile).
    body: Mutex<Option<Result<JobBody, String>>>,
    /// The task's `load_incluster_config`: use the in-cluster service account when running in one.
    pub load_incluster_config: bool,
    /// The task's `kubeconfig_file`.
    pub kubeconfig_file: Option<String>,
}

impl StepJob {
    pub fn new(
        body: Result<JobBody, String>,
        load_incluster_config: bool,
        kubeconfig_file: Option<String>,
    ) -> StepJob {
        StepJob {
            body: Mutex::new(Some(body)),
            load_incluster_config,
            kubeconfig_file,
        }
    }

    /// The Job to create, handed over once.
    pub fn take_body(&self) -> Result<JobBody, String> {
        self.body
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| Err("the step's Job was handed to the API server already".into()))
    }
}

/// The step Job exactly as `construct_dagster_k8s_job` builds it.
#[derive(Debug, Clone)]
pub struct JobBody {
    /// Boxed: a `Job` is ~2.6 KB inline (its pod spec), too large to carry in every future it passes.
    pub job: Box<Job>,
    /// The step container's name (`dagster`, or the user's `container_config.name`): where the step's
    /// events are read from.
    pub container: String,
}

/// A step as a local process.
#[derive(Debug, Clone)]
pub struct StepProcess {
    /// Program and arguments: the Job container's `args` (`[*entry_point, "api", "execute_step",
    /// "--compressed-input-json", …]`). Contains the instance config: never log it.
    pub command: Vec<String>,
    /// Added to the worker's environment, in order (later entries win): the environment the Job's
    /// container would get, as far as it has local values.
    pub env: Vec<(String, String)>,
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
    /// The form this launcher runs steps in. Given a [`StepSpec`] of another form, [`Self::launch`]
    /// fails with [`LaunchError::Create`].
    fn runs(&self) -> WorkloadKind;
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
    /// Whether the last [`Self::launch`] of `job_name` found an earlier run of the step lost with
    /// its worker (what happened, in words; taken, so asked once): if this run could not finish the
    /// step either (Dagster refuses to run a started step again), the step task fails the step
    /// saying so.
    fn take_lost_previous(&self, _job_name: &str) -> Option<String> {
        None
    }
}
