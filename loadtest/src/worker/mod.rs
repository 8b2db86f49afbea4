//! Scenario `worker`: the same `execute_step_k8s_job` load through one celeriac worker (release build,
//! Kubernetes launcher) and through Python's `dagster-celery-k8s` worker, in one run, on the same
//! RabbitMQ, Redis result backend, Postgres instance and Kubernetes 1.20 test cluster.
//!
//! The tasks are built with `celeriac_dagster::submission` from the hand-off `CeleriacRunLauncher`
//! computes (the exact kwargs Dagster's executor publishes), published by this program, and their step
//! Jobs run the load-step program (`celeriac-load-step` as `dagster` first on the container's PATH:
//! sleeps, prints valid serialized events, notes when it exited). Each side has its own namespace
//! and Kubernetes identity, so the API server's audit log tells their requests apart.
//!
//! Figures per side: PSS of the whole worker side (all its processes) against steps in flight, with
//! slope and intercept; publish → Job created (audit log) and step exited → result stored (result
//! `date_done`) p50/p99; API requests per step; start-up (process start → consuming). No step may
//! be lost or run twice.
//!
//! The run, in order: [`setup`] (services, binaries, cluster, a Dagster home with one STARTED run per
//! side), the [`celeriac`] side, then the [`python`] side (one after the other, never at once: each
//! side's memory and latencies are its own), then [`figures`] from what both left behind. Both sides
//! take their batches through [`side`] (publish with [`steps`], measure with [`batch`]); [`cluster`]
//! is the Kubernetes test cluster and its audit log, [`outcome`] the results and step exits read back.

mod batch;
mod celeriac;
mod cluster;
mod figures;
mod outcome;
mod params;
mod python;
mod setup;
mod side;
mod steps;

use anyhow::Result;
use serde_json::Value;

pub use params::{BrokerKind, Params};
use setup::Setup;

/// Runs the scenario; returns the figures as JSON.
pub async fn run(p: &Params) -> Result<Value> {
    let setup = Setup::prepare(p).await?;
    let (c_lane, c, job_to_result) = celeriac::measure(p, &setup).await?;
    let (py_lane, py, completed) = python::measure(p, &setup).await?;
    let out = figures::assemble(
        p,
        &setup,
        (&c_lane, &c, job_to_result),
        (&py_lane, &py, &completed),
    )?;
    // As before the split: the database client goes first, the namespaces (Python's, then
    // celeriac's) next, the broker connection and the home (its database) last.
    drop(setup.db);
    Ok(out)
}
