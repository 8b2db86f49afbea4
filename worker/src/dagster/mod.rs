//! The Dagster side of a step task: what `dagster_celery_k8s`'s `execute_step_k8s_job` does besides
//! running the step.
//!
//! * [`step_args`] reads the task's keyword arguments (the message is treated as opaque Dagster JSON
//!   wherever possible, so worker and user code never disagree about serdes versions);
//! * [`command`] builds the exact `dagster api execute_step` command and Job name Python builds;
//! * [`events`] writes Dagster's serdes JSON for the engine events and picks step events out of logs;
//! * [`instance`] reads run status and writes events in the run's Postgres storage;
//! * [`metrics`] counts finished steps per Dagster job;
//! * [`k8s_config`] merges the op tag's and the executor's per-step Kubernetes config.

pub mod command;
pub mod events;
pub mod instance;
pub mod k8s_config;
pub mod metrics;
pub mod step_args;
