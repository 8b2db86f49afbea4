//! The Dagster domain of celeriac, shared by the worker and the run coordinator.
//!
//! * [`serdes`] reads and writes Dagster's serdes JSON (`serialize_value` / `deserialize_value`);
//! * [`plan`] holds the execution plan as Dagster stores it (`ExecutionPlanSnapshot`) and a port of the
//!   engine that schedules a run's steps from it (`ActiveExecution`).

pub mod plan;
pub mod run;
pub mod serdes;
