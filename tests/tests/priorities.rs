//! Python Celery clients publish tasks with mixed priorities while no worker runs; a celeriac worker
//! started with concurrency 1 completes them in the broker's priority order:
//! * RabbitMQ (`x-max-priority: 10`): higher number first, FIFO within a level, >10 counts as 10;
//! * Redis, kombu order (default): buckets 0-2, 3-5, 6-8, 9 — lower first (Python Celery's behaviour);
//! * Redis, `dagster` order (opt-in): buckets reversed, so a higher Dagster priority runs first.
//!
//! Completion order is read back by a real Celery client from the `redis://` result backend
//! (`AsyncResult.date_done`), so the assertion is about what users observe.

use std::time::Duration;

use anyhow::Result;
use celeriac_tests::{ensure_services, run_python, unique, WorkerProcess};

const PUBLISH: &str = r#"
import json, sys
from celery import Celery
broker, backend, queue, prios = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
app = Celery("prio", broker=broker, backend=backend)
if broker.startswith("amqp"):
    app.conf.task_queue_max_priority = 10   # as dagster_celery declares every queue
app.conf.task_default_priority = 5
ids = [app.send_task("celery.ping", queue=queue, priority=p).id for p in prios]
print(json.dumps(ids))
"#;

const COLLECT: &str = r#"
import json, sys
from celery import Celery
from celery.result import AsyncResult
broker, backend, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
app = Celery("prio", broker=broker, backend=backend)
out = []
for i in ids:
    r = AsyncResult(i, app=app)
    value = r.get(timeout=60)
    out.append({"id": i, "result": value, "date_done": r.date_done.isoformat()})
print(json.dumps(out))
"#;

/// Publishes `prios` (index = publish order), runs one worker, returns the publish indexes in completion order.
fn completion_order(
    broker: &str,
    backend: &str,
    prios: &[u8],
    extra: &[&str],
) -> Result<Vec<usize>> {
    ensure_services();
    let queue = unique("prio");
    let prios_json = serde_json::to_string(prios)?;
    let ids: Vec<String> = serde_json::from_str(&run_python(
        &["-c", PUBLISH, broker, backend, &queue, &prios_json],
        &[],
        Duration::from_secs(60),
    )?)?;
    let mut args = vec![
        "-b",
        broker,
        "--result-backend",
        backend,
        "-Q",
        &queue,
        "-c",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut worker = WorkerProcess::start(&args, &[])?;
    let ids_json = serde_json::to_string(&ids)?;
    let done: Vec<serde_json::Value> = serde_json::from_str(&run_python(
        &["-c", COLLECT, broker, backend, &ids_json],
        &[],
        Duration::from_secs(90),
    )?)?;
    worker.terminate(Duration::from_secs(30))?;
    let mut finished: Vec<(String, usize)> = done
        .iter()
        .map(|d| {
            assert_eq!(d["result"], "pong", "celery.ping result");
            let id = d["id"].as_str().unwrap_or_default();
            let idx = ids.iter().position(|x| x == id).unwrap_or(usize::MAX);
            (d["date_done"].as_str().unwrap_or_default().to_string(), idx)
        })
        .collect();
    finished.sort();
    Ok(finished.into_iter().map(|(_, i)| i).collect())
}

/// Expected order: sort publish indexes by `key(priority)` (stable, so FIFO within equal keys).
fn expected(prios: &[u8], key: impl Fn(u8) -> i32) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..prios.len()).collect();
    idx.sort_by_key(|&i| key(prios[i]));
    idx
}

const PRIOS: [u8; 12] = [5, 0, 9, 3, 7, 1, 10, 6, 4, 8, 2, 5];

fn redis_bucket(p: u8) -> i32 {
    match p.min(9) {
        0..=2 => 0,
        3..=5 => 3,
        6..=8 => 6,
        _ => 9,
    }
}

#[test]
fn rabbitmq_serves_higher_priority_first() -> Result<()> {
    let db = "redis://127.0.0.1:6379/1";
    let got = completion_order("amqp://guest:guest@127.0.0.1:5672//", db, &PRIOS, &[])?;
    assert_eq!(
        got,
        expected(&PRIOS, |p| -(p.min(10) as i32)),
        "completion order on RabbitMQ"
    );
    Ok(())
}

#[test]
fn redis_kombu_order_serves_low_buckets_first() -> Result<()> {
    let url = "redis://127.0.0.1:6379/1";
    let got = completion_order(url, url, &PRIOS, &[])?;
    assert_eq!(
        got,
        expected(&PRIOS, redis_bucket),
        "completion order on Redis (kombu order)"
    );
    Ok(())
}

#[test]
fn redis_dagster_order_serves_high_buckets_first() -> Result<()> {
    let url = "redis://127.0.0.1:6379/1";
    let got = completion_order(url, url, &PRIOS, &["--redis-priority-order", "dagster"])?;
    assert_eq!(
        got,
        expected(&PRIOS, |p| -redis_bucket(p)),
        "completion order on Redis (dagster order)"
    );
    Ok(())
}
