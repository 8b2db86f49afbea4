//! The Dagster domain of celeriac, shared by the worker and the run coordinator.
//!
//! * [`serdes`] reads and writes Dagster's serdes JSON (`serialize_value` / `deserialize_value`);
//! * [`plan`] holds the execution plan as Dagster stores it (`ExecutionPlanSnapshot`) and a port of the
//!   engine that schedules a run's steps from it (`ActiveExecution`).

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
pub mod serdes;
pub mod step;
