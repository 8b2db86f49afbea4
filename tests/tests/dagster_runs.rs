//! A real Dagster job (fan-out and fan-in, ≥5 ops) run with `celery_k8s_job_executor` on a Postgres
//! instance reaches RUN_SUCCESS through a celeriac worker, on RabbitMQ + rpc:// and on Redis + redis://;
//! a job with a raising op ends in RUN_FAILURE with that op's error, and its downstream ops never run.

use std::time::Duration;

use anyhow::Result;
use celeriac_tests::dagster::{DagsterHome, RunSummary};
use celeriac_tests::{ensure_services, unique, WorkerProcess};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS: &str = "redis://127.0.0.1:6379/2";
const DIAMOND_STEPS: [&str; 6] = ["finish", "join", "left", "middle", "right", "start"];

fn run(broker: &str, backend: &str, job: &str) -> Result<(RunSummary, String)> {
    ensure_services();
    let queue = unique("dag");
    let home = DagsterHome::create(broker, backend)?;
    let mut worker = WorkerProcess::consuming(broker, backend, &queue, &["-c", "3"])?;
    let summary = home.run_job(job, Duration::from_secs(240), &[("CELERIAC_QUEUE", &queue)])?;
    worker.terminate(Duration::from_secs(60))?;
    Ok((summary, worker.log_text()))
}

fn assert_success(summary: &RunSummary, log: &str) {
    assert_eq!(
        summary.status, "SUCCESS",
        "run did not succeed: {summary:#?}\nworker log:\n{log}"
    );
    assert_eq!(
        summary.steps_with("STEP_SUCCESS"),
        DIAMOND_STEPS,
        "every step succeeded once: {summary:#?}"
    );
    for step in DIAMOND_STEPS {
        assert_eq!(
            summary.count("STEP_START", step),
            1,
            "{step} ran exactly once"
        );
        let picked = format!("[CeleryK8sJobExecutor] Task for step {step} picked up by Celery");
        assert!(
            summary.engine_messages.iter().any(|m| m == &picked),
            "celeriac wrote {picked:?}: {:#?}",
            summary.engine_messages
        );
    }
}

fn assert_failure(summary: &RunSummary, log: &str) {
    assert_eq!(
        summary.status, "FAILURE",
        "run should fail: {summary:#?}\nworker log:\n{log}"
    );
    assert!(
        summary
            .failure_messages
            .iter()
            .any(|m| m.contains("celeriac test failure: middle exploded")),
        "the raising op's error is in the event log: {:#?}",
        summary.failure_messages
    );
    assert_eq!(summary.steps_with("STEP_FAILURE"), ["middle"]);
    for skipped in ["join", "finish"] {
        assert_eq!(
            summary.count("STEP_START", skipped),
            0,
            "{skipped} must not run after middle failed"
        );
        assert_eq!(summary.count("STEP_SUCCESS", skipped), 0);
    }
    for ok in ["start", "left", "right"] {
        assert_eq!(
            summary.count("STEP_SUCCESS", ok),
            1,
            "{ok} is independent of middle and succeeds"
        );
    }
}

#[test]
fn diamond_succeeds_on_rabbitmq_with_rpc_backend() -> Result<()> {
    let (summary, log) = run(AMQP, "rpc://", "diamond")?;
    assert_success(&summary, &log);
    Ok(())
}

#[test]
fn diamond_succeeds_on_redis_with_redis_backend() -> Result<()> {
    let (summary, log) = run(REDIS, REDIS, "diamond")?;
    assert_success(&summary, &log);
    Ok(())
}

#[test]
fn raising_op_fails_the_run_on_rabbitmq() -> Result<()> {
    let (summary, log) = run(AMQP, "rpc://", "diamond_failing")?;
    assert_failure(&summary, &log);
    Ok(())
}

#[test]
fn raising_op_fails_the_run_on_redis() -> Result<()> {
    let (summary, log) = run(REDIS, REDIS, "diamond_failing")?;
    assert_failure(&summary, &log);
    Ok(())
}
