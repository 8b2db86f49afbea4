//! The Dagster domain of celeriac, shared by the worker and the run coordinator.
//!
//! * [`serdes`] reads and writes Dagster's serdes JSON (`serialize_value` / `deserialize_value`);
//! * [`plan`] holds the execution plan as Dagster stores it (`ExecutionPlanSnapshot`) and a port of the
//!   engine that schedules a run's steps from it (`ActiveExecution`);
//! * [`run`] reads a run record and its plan from the run storage;
//! * [`submission`] builds the `execute_step_k8s_job` task a run publishes for a step;
//! * [`step`] is that task on the worker side (arguments, command, the task itself), running steps
//!   through a [`launcher`] (a Kubernetes Job built by [`kubernetes`], or a local process);
//! * [`events`] and [`instance`] write Dagster events and read run status in the run's Postgres
//!   storage; [`k8s_config`] merges per-step Kubernetes config; [`metrics`] counts steps per job;
//! * [`config`] holds the Dagster-side settings and [`app`] registers the task with the worker.

pub mod app;
pub mod config;
pub mod events;
pub mod instance;
pub mod k8s_config;
pub mod kubernetes;
pub mod launcher;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod run_events;
pub mod serdes;
pub mod step;
pub mod submission;
