//! Least privilege: a worker identity without the documented Role gets a clear message naming
//! every missing permission, in its log and in the run's event log, and no Job is created. (Runs
//! with the Role and nothing more are every other Kubernetes test.)

use std::time::Duration;

use anyhow::Result;
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::k8s::TestNamespace;
use celeriac_tests::{ensure_services, unique, WorkerProcess};

#[test]
fn missing_permissions_are_named_and_the_step_fails_cleanly() -> Result<()> {
    ensure_services();
    let broker = "amqp://guest:guest@127.0.0.1:5672//";
    // Identity 9 is bound to nothing in this namespace.
    let ns = TestNamespace::create_for(9, false)?;
    let queue = unique("rbac");
    let home = DagsterHome::create_k8s(broker, "rpc://", &ns.name, &ns.kubeconfig)?;
    let kubeconfig = ns.kubeconfig.display().to_string();
    let mut worker = WorkerProcess::start(
        &[
            "-b",
            broker,
            "--result-backend",
            "rpc://",
            "-Q",
            &queue,
            "--launcher",
            "kubernetes",
        ],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )?;
    let summary = home.run_job(
        "sleepy",
        Duration::from_secs(120),
        &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", "1")],
    )?;
    worker.terminate(Duration::from_secs(60))?;
    let log = worker.log_text();
    assert_ne!(summary.status, "SUCCESS", "{summary:#?}");
    let needle = format!("lacks permissions in namespace {}: create jobs.batch, get jobs.batch, list jobs.batch, watch jobs.batch, delete jobs.batch, get pods, list pods, watch pods, get pods/log", ns.name);
    assert!(
        log.contains(&needle),
        "the worker names every missing permission:\n{log}"
    );
    assert!(
        summary
            .engine_messages
            .iter()
            .any(|m| m.contains("Encountered unexpected error while creating Kubernetes job")),
        "the run's event log says the Job could not be created: {:#?}",
        summary.engine_messages
    );
    assert!(ns.jobs().is_empty(), "no Job was created");
    Ok(())
}
