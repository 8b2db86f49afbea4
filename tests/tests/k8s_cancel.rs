//! Cancellation: revoking a running step task with `terminate`, or the run leaving STARTED, deletes
//! the step's Job and its pods within 5 s (the Python worker notices a terminated run only at its
//! next 10 s poll, and leaves revoked steps' Jobs running).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::k8s::{pod_running, TestNamespace};
use celeriac_tests::{ensure_services, peer, received_ids, run_python, unique, WorkerProcess};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";

fn start(ns: &TestNamespace, queue: &str) -> Result<WorkerProcess> {
    let kubeconfig = ns.kubeconfig.display().to_string();
    WorkerProcess::start(
        &[
            "-b",
            AMQP,
            "--result-backend",
            "rpc://",
            "-Q",
            queue,
            "-c",
            "2",
            "--launcher",
            "kubernetes",
        ],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
}

/// Runs `sleepy` (60 s step), calls `stop` once its pod runs, and returns how long after `stop` the
/// Job and pods were gone.
fn cancel_with(stop: impl FnOnce(&DagsterHome, &WorkerProcess) -> Result<()>) -> Result<Duration> {
    ensure_services();
    let ns = TestNamespace::create()?;
    let queue = unique("cancel");
    let home = DagsterHome::create_k8s(AMQP, "rpc://", &ns.name, &ns.kubeconfig)?;
    let mut worker = start(&ns, &queue)?;
    let took = std::thread::scope(|s| -> Result<Duration> {
        let run = s.spawn(|| {
            home.run_job(
                "sleepy",
                Duration::from_secs(120),
                &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", "60")],
            )
        });
        ns.wait_until("the step pod runs", Duration::from_secs(120), |_, pods| {
            pods.iter().any(pod_running)
        })?;
        let t0 = Instant::now();
        stop(&home, &worker)?;
        ns.wait_until(
            "the step Job and pods are deleted",
            Duration::from_secs(30),
            |jobs, pods| jobs.is_empty() && pods.is_empty(),
        )?;
        let took = t0.elapsed();
        let _ = run.join();
        Ok(took)
    })?;
    worker.terminate(Duration::from_secs(60))?;
    Ok(took)
}

#[test]
fn revoke_with_terminate_deletes_the_step_job_and_pods() -> Result<()> {
    let took = cancel_with(|home, worker| {
        let id = received_ids(&worker.log_text())
            .pop()
            .context("the step task id")?;
        let client = peer("celery_client.py").display().to_string();
        run_python(
            &[
                &client,
                "--broker",
                &home.broker,
                "--backend",
                &home.backend,
                "revoke",
                "--id",
                &id,
                "--terminate",
            ],
            &[],
            Duration::from_secs(60),
        )?;
        Ok(())
    })?;
    assert!(
        took <= Duration::from_secs(5),
        "Job and pods deleted {took:?} after the revoke"
    );
    Ok(())
}

#[test]
fn a_run_leaving_started_deletes_its_step_job_and_pods() -> Result<()> {
    let took = cancel_with(|home, _| {
        celeriac_tests::dagster::psql(&home.db, "UPDATE runs SET status = 'CANCELING'")?;
        Ok(())
    })?;
    assert!(
        took <= Duration::from_secs(5),
        "Job and pods deleted {took:?} after the run was cancelled"
    );
    Ok(())
}
