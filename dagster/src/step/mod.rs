//! Dagster's celery-k8s step task, `execute_step_k8s_job` (`dagster_celery_k8s/executor.py`).
//!
//! * [`args`] reads the task's keyword arguments (the message is treated as opaque Dagster JSON
//!   wherever possible, so worker and user code never disagree about serdes versions);
//! * [`command`] builds the exact `dagster api execute_step` command and Job name Python builds;
//! * `event_writer` writes the task's engine events to the event log in the background;
//! * [`task`] is the task: engine events, run-status checks, launching the step and collecting its
//!   events for the result.

pub mod args;
pub mod command;
mod event_writer;
mod report;
pub mod task;
pub mod workload;
