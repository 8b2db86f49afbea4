//! The Dagster domain of celeriac, shared by the worker and the run coordinator.
//!
//! * [`serdes`] reads and writes Dagster's serdes JSON (`serialize_value` / `deserialize_value`);
//! * [`plan`] holds the execution plan as Dagster stores it (`ExecutionPlanSnapshot`) and a port of the
//!   engine that schedules a run's steps from it (`ActiveExecution`);
//! * [`step`] is Dagster's celery-k8s step task, `execute_step_k8s_job`: its arguments, the step
//!   command and the task itself; [`app`] registers it (with `celery.ping`) for the worker;
//! * [`launcher`] runs a step where it belongs: a Kubernetes Job, or a local process;
//! * [`kubernetes`] is the step Job (`construct_dagster_k8s_job`) and the Kubernetes API side of the
//!   launcher; [`k8s_config`] merges the op tag's and the executor's per-step Kubernetes config;
//! * [`events`] writes Dagster's engine events and picks step events out of logs; [`instance`] reads
//!   run status and writes events in the run's Postgres storage;
//! * [`config`] holds the step task's settings, [`metrics`] its per-Dagster-job metrics.

pub mod app;
pub mod config;
pub mod events;
pub mod instance;
pub mod k8s_config;
pub mod kubernetes;
pub mod launcher;
pub mod metrics;
pub mod plan;
pub mod serdes;
pub mod step;
