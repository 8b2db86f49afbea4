//! The API server is restarted while a step's Job runs: the worker's shared watches re-list, its
//! API calls retry, no step is lost and the run succeeds. (Its own test binary: the restart would
//! disturb other tests running beside it.)

use std::time::Duration;

use anyhow::Result;
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::k8s::{cluster, pod_running, TestNamespace};
use celeriac_tests::{ensure_services, unique, WorkerProcess};

#[test]
fn run_survives_an_api_server_restart() -> Result<()> {
    ensure_services();
    let broker = "redis://127.0.0.1:6379/6";
    let ns = TestNamespace::create()?;
    let queue = unique("restart");
    let home = DagsterHome::create_k8s(broker, broker, &ns.name, &ns.kubeconfig)?;
    let kubeconfig = ns.kubeconfig.display().to_string();
    let mut worker = WorkerProcess::start(
        &[
            "-b",
            broker,
            "--result-backend",
            broker,
            "-Q",
            &queue,
            "--launcher",
            "kubernetes",
        ],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )?;
    let summary = std::thread::scope(|s| -> Result<_> {
        let run = s.spawn(|| {
            home.run_job(
                "sleepy",
                Duration::from_secs(300),
                &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", "10")],
            )
        });
        ns.wait_until("the step pod runs", Duration::from_secs(120), |_, pods| {
            pods.iter().any(pod_running)
        })?;
        cluster().restart_apiserver()?;
        run.join().expect("run thread")
    })?;
    worker.terminate(Duration::from_secs(60))?;
    let log = worker.log_text();
    summary.assert_succeeded_running_once("sleepy_op", &format!("worker log:\n{log}"));
    Ok(())
}
