//! Python Celery's Redis transport restores any unacknowledged message older than `visibility_timeout`
//! to the queue, so a step that runs longer than the timeout runs twice. celeriac keeps a running step's
//! `unacked_index` score fresh: with a 3 s timeout, a 12 s step and a second worker sweeping the same
//! Redis, the step runs exactly once.

use std::time::Duration;

use anyhow::Result;
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::{broker_backlog, ensure_services, received_ids, unique, WorkerProcess};

#[test]
fn redis_step_longer_than_visibility_timeout_runs_once() -> Result<()> {
    ensure_services();
    let redis = "redis://127.0.0.1:6379/5";
    let queue = unique("vis");
    let home = DagsterHome::create(redis, redis)?;
    let args = [
        "-b",
        redis,
        "--result-backend",
        redis,
        "-Q",
        &queue,
        "--visibility-timeout",
        "3",
    ];
    let mut a = WorkerProcess::start(&args, &[])?;
    let mut b = WorkerProcess::start(&args, &[])?;
    let summary = home.run_job(
        "sleepy",
        Duration::from_secs(180),
        &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", "12")],
    )?;
    let logs = format!("{}\n{}", a.log_text(), b.log_text());
    assert_eq!(summary.status, "SUCCESS", "{summary:#?}\n{logs}");
    assert_eq!(
        summary.count("STEP_START", "sleepy_op"),
        1,
        "the step ran once: {summary:#?}"
    );
    let received = received_ids(&logs);
    assert_eq!(
        received.len(),
        1,
        "one delivery across both workers: {received:?}\n{logs}"
    );
    assert!(
        !logs.contains("redelivered=true"),
        "nothing was restored:\n{logs}"
    );
    let rt = tokio::runtime::Runtime::new()?;
    assert_eq!(
        rt.block_on(broker_backlog(redis, &queue))?,
        (0, 0),
        "queue and unacked hash are empty"
    );
    a.terminate(Duration::from_secs(30))?;
    b.terminate(Duration::from_secs(30))?;
    Ok(())
}
