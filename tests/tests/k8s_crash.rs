//! Crash safety: the worker is SIGKILLed while its step's Job runs; the task comes back (RabbitMQ:
//! at once, unacked; Redis: restored after `visibility_timeout`), the restarted worker's create
//! gets 409 AlreadyExists and adopts the running Job: exactly one Job per step, the step runs once,
//! and the run succeeds.

use std::time::Duration;

use anyhow::Result;
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::k8s::{pod_running, TestNamespace};
use celeriac_tests::{ensure_services, unique, WorkerProcess};

fn crash_and_adopt(broker: &str, backend: &str, extra: &[&str]) -> Result<()> {
    ensure_services();
    let ns = TestNamespace::create()?;
    let queue = unique("crash");
    let home = DagsterHome::create_k8s(broker, backend, &ns.name, &ns.kubeconfig)?;
    let kubeconfig = ns.kubeconfig.display().to_string();
    let mut args = vec![
        "-b",
        broker,
        "--result-backend",
        backend,
        "-Q",
        &queue,
        "-c",
        "1",
        "--launcher",
        "kubernetes",
        "--job-retention",
        "keep",
    ];
    args.extend_from_slice(extra);
    let envs = [("KUBECONFIG", kubeconfig.as_str())];
    let mut first = WorkerProcess::start(&args, &envs)?;
    std::thread::scope(|s| -> Result<()> {
        let run = s.spawn(|| {
            home.run_job(
                "sleepy",
                Duration::from_secs(300),
                &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", "12")],
            )
        });
        ns.wait_until("the step pod runs", Duration::from_secs(120), |_, pods| {
            pods.iter().any(pod_running)
        })?;
        first.kill()?;
        let mut second = WorkerProcess::start(&args, &envs)?;
        let summary = run.join().expect("run thread")?;
        second.terminate(Duration::from_secs(60))?;
        let log = second.log_text();
        summary.assert_succeeded_running_once("sleepy_op", &format!("second worker:\n{log}"));
        assert!(
            log.contains("adopting it"),
            "the restarted worker adopted the Job:\n{log}"
        );
        assert!(
            summary
                .engine_messages
                .iter()
                .any(|m| m.contains("since job name already exists, proceeding with existing job")),
            "the adoption engine event is in the event log: {:#?}",
            summary.engine_messages
        );
        let jobs = ns.jobs();
        assert_eq!(
            jobs.len(),
            1,
            "exactly one Job for the step: {:?}",
            jobs.iter()
                .map(|j| j.metadata.name.clone())
                .collect::<Vec<_>>()
        );
        Ok(())
    })
}

#[test]
fn sigkilled_worker_on_rabbitmq_leaves_one_job_that_is_adopted() -> Result<()> {
    crash_and_adopt("amqp://guest:guest@127.0.0.1:5672//", "rpc://", &[])
}

#[test]
fn sigkilled_worker_on_redis_leaves_one_job_that_is_adopted() -> Result<()> {
    crash_and_adopt(
        "redis://127.0.0.1:6379/5",
        "redis://127.0.0.1:6379/5",
        &["--visibility-timeout", "5"],
    )
}
