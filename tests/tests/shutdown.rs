//! SIGTERM during a running step, on both brokers:
//! * within the grace period the step finishes, its result reaches the run, and the run succeeds;
//! * past the grace period the step is stopped and its message is back on the broker, where the next
//!   worker receives it: no task is lost.

use std::time::Duration;

use anyhow::{Context, Result};
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::{broker_backlog, ensure_services, received_ids, unique, WorkerProcess};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS: &str = "redis://127.0.0.1:6379/4";
/// A database of its own: the backlog check reads kombu's per-database `unacked` hash.
const REDIS_PAST_GRACE: &str = "redis://127.0.0.1:6379/6";

fn start_sleepy_run(
    home: DagsterHome,
    queue: &str,
    seconds: &str,
) -> std::thread::JoinHandle<Result<celeriac_tests::dagster::RunSummary>> {
    let (queue, seconds) = (queue.to_string(), seconds.to_string());
    std::thread::spawn(move || {
        home.run_job(
            "sleepy",
            Duration::from_secs(180),
            &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", &seconds)],
        )
    })
}

/// Waits until the worker has received the step and its process had time to start.
fn wait_step_running(worker: &mut WorkerProcess) -> Result<String> {
    worker.wait_for_log("execute_step_k8s_job[", Duration::from_secs(90))?;
    std::thread::sleep(Duration::from_secs(4));
    received_ids(&worker.log_text())
        .into_iter()
        .next()
        .context("task id in the worker log")
}

fn graceful(broker: &str, backend: &str) -> Result<()> {
    ensure_services();
    let queue = unique("term");
    let home = DagsterHome::create(broker, backend)?;
    let mut worker = WorkerProcess::consuming(broker, backend, &queue, &[])?;
    let run = start_sleepy_run(home, &queue, "10");
    wait_step_running(&mut worker)?;
    let status = worker.terminate(Duration::from_secs(90))?;
    assert!(
        status.success(),
        "warm shutdown exits cleanly: {status}\n{}",
        worker.log_text()
    );
    let summary = run
        .join()
        .map_err(|_| anyhow::anyhow!("run thread panicked"))??;
    assert_eq!(
        summary.status,
        "SUCCESS",
        "{summary:#?}\n{}",
        worker.log_text()
    );
    assert_eq!(
        summary.count("STEP_SUCCESS", "sleepy_op"),
        1,
        "{summary:#?}"
    );
    let log = worker.log_text();
    assert!(log.contains("warm shutdown"), "{log}");
    assert!(!log.contains("grace period over"), "{log}");
    Ok(())
}

fn past_grace(broker: &str, backend: &str) -> Result<()> {
    ensure_services();
    let queue = unique("term");
    let home = DagsterHome::create(broker, backend)?;
    let mut first = WorkerProcess::consuming(broker, backend, &queue, &["--shutdown-grace", "1"])?;
    let run = start_sleepy_run(home, &queue, "60");
    let task_id = wait_step_running(&mut first)?;
    let status = first.terminate(Duration::from_secs(90))?;
    assert!(status.success(), "{status}");
    assert!(
        first.log_text().contains("grace period over"),
        "{}",
        first.log_text()
    );

    let rt = tokio::runtime::Runtime::new()?;
    let (ready, unacked) = rt.block_on(broker_backlog(broker, &queue))?;
    assert_eq!(
        (ready, unacked),
        (1, 0),
        "the interrupted step's message is back on the broker, ready"
    );

    let mut second = WorkerProcess::consuming(broker, backend, &queue, &[])?;
    second.wait_for_log(
        &format!("execute_step_k8s_job[{task_id}] received"),
        Duration::from_secs(30),
    )?;
    let again = received_ids(&second.log_text());
    assert_eq!(
        again,
        vec![task_id.clone()],
        "the same task reaches the next worker"
    );
    // The run coordinator receives a result for the step (Dagster itself refuses to re-run a step that
    // already started, so the run's outcome is Dagster's business, not a lost task).
    let summary = run
        .join()
        .map_err(|_| anyhow::anyhow!("run thread panicked"))??;
    assert!(
        matches!(summary.status.as_str(), "SUCCESS" | "FAILURE"),
        "the run finished: {summary:#?}"
    );
    second.terminate(Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn sigterm_lets_the_running_step_finish_on_rabbitmq() -> Result<()> {
    graceful(AMQP, "rpc://")
}

#[test]
fn sigterm_lets_the_running_step_finish_on_redis() -> Result<()> {
    graceful(REDIS, REDIS)
}

#[test]
fn sigterm_past_grace_returns_the_step_to_rabbitmq() -> Result<()> {
    past_grace(AMQP, "rpc://")
}

#[test]
fn sigterm_past_grace_returns_the_step_to_redis() -> Result<()> {
    past_grace(REDIS_PAST_GRACE, REDIS_PAST_GRACE)
}
