//! Each kind of bad input, published by a real client, is logged with its task id and disposed of as
//! Celery would (ack for undecodable bodies, reject otherwise, FAILURE results where the publisher
//! waits for one); the worker keeps running and then processes a valid task. Nothing stays stuck on
//! the broker.

use std::time::Duration;

use anyhow::Result;
use celeriac_tests::{broker_backlog, ensure_services, peer, run_python, unique, WorkerProcess};
use serde_json::Value;

/// The stored state and exception type expected for a bad input, when Celery stores one.
type Stored = Option<(&'static str, &'static str)>;

/// (kind, log line the worker must write, expected result).
const CASES: &[(&str, &str, Stored)] = &[
    ("malformed-json", "Can't decode message body", None),
    ("pickle", "Refusing to deserialize untrusted content", None),
    (
        "no-task-header",
        "Received and deleted unknown message",
        None,
    ),
    (
        "unknown-task",
        "Received unregistered task of type 'no.such.task'",
        Some(("FAILURE", "NotRegistered")),
    ),
    (
        "oversized",
        "exceeds the limit",
        Some(("FAILURE", "InvalidTaskError")),
    ),
    (
        "bad-kwargs",
        "execute_step_args_packed",
        Some(("FAILURE", "TypeError")),
    ),
];

fn client(broker: &str, backend: &str, args: &[&str]) -> Result<String> {
    let script = peer("celery_client.py").display().to_string();
    let mut all = vec![script.as_str(), "--broker", broker, "--backend", backend];
    all.extend_from_slice(args);
    run_python(&all, &[], Duration::from_secs(120))
}

fn check(broker: &str) -> Result<()> {
    ensure_services();
    let backend = "redis://127.0.0.1:6379/1";
    let queue = unique("bad");
    let mut worker = WorkerProcess::consuming(broker, backend, &queue, &[])?;
    let mut expected_results = Vec::new();
    for (kind, _, result) in CASES {
        let out = client(broker, backend, &["bad", "--queue", &queue, "--kind", kind])?;
        let id = out
            .trim()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .trim_matches('"')
            .to_string();
        assert!(!id.is_empty(), "{kind}: the client printed the task id");
        if let Some(r) = result {
            expected_results.push((kind, id.clone(), *r));
        }
        // Each message is handled before the next is published, so the log lines can be attributed.
        let (_, line, _) = CASES
            .iter()
            .find(|c| c.0 == *kind)
            .copied()
            .unwrap_or_default();
        worker.wait_for_log(line, Duration::from_secs(60))?;
        let log = worker.log_text();
        let hit = log.lines().find(|l| l.contains(line)).unwrap_or_default();
        assert!(
            hit.contains(&id),
            "{kind}: the log line names the task id {id}: {hit}"
        );
    }
    // A valid task after all of that still runs.
    let ids: Vec<String> = serde_json::from_str(
        client(
            broker,
            backend,
            &["publish", "--queue", &queue, "--task", "celery.ping"],
        )?
        .trim(),
    )?;
    let mut all_ids: Vec<String> = expected_results
        .iter()
        .map(|(_, id, _)| id.clone())
        .collect();
    all_ids.extend(ids.iter().cloned());
    let states: Vec<Value> = serde_json::from_str(
        client(
            broker,
            backend,
            &[
                "wait",
                "--ids",
                &serde_json::to_string(&all_ids)?,
                "--timeout",
                "60",
            ],
        )?
        .trim(),
    )?;
    for (kind, id, (state, exc)) in &expected_results {
        let got = states
            .iter()
            .find(|s| s["id"] == id.as_str())
            .cloned()
            .unwrap_or_default();
        assert_eq!(got["state"], *state, "{kind}: {got}");
        assert!(
            got["result"].to_string().contains(exc),
            "{kind}: result names {exc}: {got}"
        );
    }
    let ping = states
        .iter()
        .find(|s| s["id"] == ids[0].as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(ping["state"], "SUCCESS", "{ping}");
    assert!(ping["result"].to_string().contains("pong"), "{ping}");

    let rt = tokio::runtime::Runtime::new()?;
    let (ready, _) = rt.block_on(broker_backlog(broker, &queue))?;
    assert_eq!(ready, 0, "nothing is left on the queue");
    let status = worker.terminate(Duration::from_secs(30))?;
    assert!(
        status.success(),
        "the worker survived every bad input and exits cleanly: {status}"
    );
    Ok(())
}

#[test]
fn bad_input_on_rabbitmq() -> Result<()> {
    check("amqp://guest:guest@127.0.0.1:5672//")
}

#[test]
fn bad_input_on_redis() -> Result<()> {
    check("redis://127.0.0.1:6379/1")
}
