//! One worker, two queues with limits 2 and 3: under a backlog (8 sleeping steps per queue, submitted at
//! once by Dagster), the number of steps of each queue running at the same time never exceeds its limit
//! and reaches it. Concurrency is measured from the steps' own STEP_START/STEP_SUCCESS timestamps in the
//! Dagster event log, not from the worker's bookkeeping.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use celeriac_tests::dagster::{DagsterHome, RunSummary};
use celeriac_tests::{ensure_services, unique, WorkerProcess};

/// Highest number of overlapping [STEP_START, STEP_SUCCESS] windows among `steps`.
fn peak_overlap(summary: &RunSummary, steps: &[String]) -> usize {
    let mut edges: Vec<(f64, i32)> = Vec::new();
    for e in &summary.step_events {
        let Some(key) = &e.step_key else { continue };
        if !steps.contains(key) {
            continue;
        }
        match e.event_type.as_str() {
            "STEP_START" => edges.push((e.timestamp, 1)),
            "STEP_SUCCESS" | "STEP_FAILURE" => edges.push((e.timestamp, -1)),
            _ => {}
        }
    }
    // Ends sort before starts at the same instant, so touching windows do not count as overlapping.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

fn check(broker: &str, backend: &str) -> Result<()> {
    ensure_services();
    let (qa, qb) = (unique("qa"), unique("qb"));
    let home = DagsterHome::create(broker, backend)?;
    let queues = format!("{qa},{qb}");
    let (limit_a, limit_b) = (format!("{qa}=2"), format!("{qb}=3"));
    let mut worker = WorkerProcess::consuming(
        broker,
        backend,
        &queues,
        &[
            "--queue-concurrency",
            &limit_a,
            "--queue-concurrency",
            &limit_b,
        ],
    )?;
    let summary = home.run_job(
        "two_queues",
        Duration::from_secs(400),
        &[
            ("CELERIAC_QUEUE_A", &qa),
            ("CELERIAC_QUEUE_B", &qb),
            ("SLEEP_SECONDS", "6"),
        ],
    )?;
    worker.terminate(Duration::from_secs(60))?;
    assert_eq!(
        summary.status,
        "SUCCESS",
        "{summary:#?}\n{}",
        worker.log_text()
    );
    let mut by_queue: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for key in summary.steps_with("STEP_SUCCESS") {
        let q = if key.starts_with("a_") { "a" } else { "b" };
        by_queue.entry(q).or_default().push(key);
    }
    assert_eq!(by_queue.get("a").map(Vec::len), Some(8), "{by_queue:?}");
    assert_eq!(by_queue.get("b").map(Vec::len), Some(8), "{by_queue:?}");
    let peak_a = peak_overlap(&summary, &by_queue["a"]);
    let peak_b = peak_overlap(&summary, &by_queue["b"]);
    assert_eq!(peak_a, 2, "queue A (limit 2) peak concurrency");
    assert_eq!(peak_b, 3, "queue B (limit 3) peak concurrency");
    Ok(())
}

#[test]
fn per_queue_limits_hold_and_are_reached_on_rabbitmq() -> Result<()> {
    check("amqp://guest:guest@127.0.0.1:5672//", "rpc://")
}

#[test]
fn per_queue_limits_hold_and_are_reached_on_redis() -> Result<()> {
    check("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3")
}
