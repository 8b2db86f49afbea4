//! Kubernetes side of a step (groundwork for the Kubernetes launcher): the step Job exactly as
//! `dagster_k8s.job.construct_dagster_k8s_job` builds it.
//!
//! * [`schema`] converts user-supplied k8s config (snake_case or camelCase, as Dagster accepts both)
//!   to the API's camelCase, driven by the Kubernetes models' attribute maps so that map keys
//!   (labels, resource names) are never touched and irregular names (`hostIPC`, `podIP`) come out right;
//! * [`job`] assembles the Job body.

pub mod job;
pub mod schema;
