//! Kubernetes side of a step: the step Job exactly as `dagster_k8s.job.construct_dagster_k8s_job`
//! builds it, and how the Kubernetes launcher talks to the API.
//!
//! * [`schema`] converts user-supplied k8s config (snake_case or camelCase, as Dagster accepts both)
//!   to the API's camelCase, driven by the Kubernetes models' attribute maps so that map keys
//!   (labels, resource names) are never touched and irregular names (`hostIPC`, `podIP`) come out right;
//! * [`job`] assembles the Job body;
//! * [`tracker`] keeps one shared watch of step Jobs and pods per namespace;
//! * [`outcome`] decides from API objects whether a step is done, failed or stuck, and why;
//! * [`api`] wraps calls with retries and metrics; [`access`] checks RBAC up front.

pub mod access;
pub mod api;
pub mod job;
pub mod outcome;
pub mod schema;
pub mod tracker;
