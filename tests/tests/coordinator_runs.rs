//! End-to-end differential: every job shape runs once through Python's own run worker
//! (`dagster api execute_run`, the command of CeleryK8sRunLauncher's run-worker Job) and once through
//! Dagster's launch path with `CeleriacRunLauncher` (the celeriac coordinator drives it), with the same
//! celeriac workers and the same Postgres instance, on RabbitMQ + rpc:// and on Redis + redis://. The two
//! runs must agree on: final status and failure reason, each step's event-type sequence (engine events
//! compared by message, run-specific names normalized), the outputs and their mapping keys, the step
//! stats (status, attempts, the `celery_queue_wait` marker), the skip/abandon/unknown log lines, and the
//! run-level start/end events. The coordinator runs must have no run-worker process.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::{ensure_services, unique, CeleriacProcess, WorkerProcess};
use serde_json::{json, Value};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS: &str = "redis://127.0.0.1:6379/9";

/// Shapes run on each broker (≥ 8 each; together every shape of the plan engine's set).
const SHAPES_AMQP: &[&str] = &[
    "fan_in_optional",
    "dynamic_collect",
    "nested_dynamic",
    "retry_success",
    "retry_exhausted",
    "fail_abandon",
    "optional_skip",
    "priorities",
    "reexecute_from_failure",
];
const SHAPES_REDIS: &[&str] = &[
    "empty_dynamic",
    "dynamic_collect",
    "retry_requested",
    "retry_success",
    "fail_abandon",
    "optional_skip",
    "op_subset",
    "asset_check",
];

/// Replaces run-specific tokens (step Job names hash the run id; pids and pod names vary).
fn normalize(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("dagster-step-") {
        out.push_str(&rest[..i + "dagster-step-".len()]);
        rest = &rest[i + "dagster-step-".len()..];
        let n = rest
            .find(|c: char| !(c.is_ascii_hexdigit() || c == '-' || c.is_ascii_digit()))
            .unwrap_or(rest.len());
        out.push('*');
        rest = &rest[n..];
    }
    out.push_str(rest);
    // The order of "Steps failed: [...]" follows result arrival across Python's one-second ticks: a set.
    // The list is Python's repr of quoted step keys, which may hold brackets (`'rf_work[k1]'`): it ends
    // at the first quote followed by `]`.
    if let Some(start) = out.find("Steps failed: [") {
        let from = start + "Steps failed: [".len();
        if let Some(len) = out[from..].find("']").map(|i| i + 1) {
            let mut items: Vec<&str> = out[from..from + len].split(", ").collect();
            items.sort_unstable();
            out = format!("{}{}{}", &out[..from], items.join(", "), &out[from + len..]);
        }
    }
    out
}

#[test]
fn failed_step_lists_compare_as_sets_even_with_mapping_keys() {
    assert_eq!(
        normalize("failed. Steps failed: ['rf_work[k1]', 'rf_boom']."),
        normalize("failed. Steps failed: ['rf_boom', 'rf_work[k1]'].")
    );
    assert_eq!(
        normalize("Steps failed: ['b', 'a']."),
        "Steps failed: ['a', 'b']."
    );
    assert_ne!(
        normalize("Steps failed: ['a[k1]']."),
        normalize("Steps failed: ['a[k2]'].")
    );
}

/// The comparable view of a run summary (`run_shape.py`).
fn view(summary: &Value) -> Value {
    let steps: BTreeMap<String, Vec<String>> = summary["step_events"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let seq = v
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).map(normalize).collect())
                        .unwrap_or_default();
                    (k.clone(), seq)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut logs: Vec<String> = summary["logs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["level"].as_i64().unwrap_or(0) >= 20)
                .map(|l| {
                    format!(
                        "{} {}",
                        l["step_key"],
                        normalize(l["message"].as_str().unwrap_or(""))
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    let run_events: Vec<Value> = summary["run_events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| {
                    matches!(
                        e["type"].as_str(),
                        Some(
                            "PIPELINE_START"
                                | "PIPELINE_SUCCESS"
                                | "PIPELINE_FAILURE"
                                | "PIPELINE_CANCELED"
                        )
                    )
                })
                .map(|e| json!({"type": e["type"], "message": normalize(e["message"].as_str().unwrap_or(""))}))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "status": summary["status"], "failure_reason": summary["failure_reason"],
        "steps": steps, "outputs": summary["outputs"], "step_stats": summary["step_stats"],
        "logs": logs, "run_events": run_events,
    })
}

fn differences(python: &Value, celeriac: &Value) -> Vec<String> {
    let (p, c) = (view(python), view(celeriac));
    let mut out = Vec::new();
    for key in [
        "status",
        "failure_reason",
        "outputs",
        "step_stats",
        "logs",
        "run_events",
    ] {
        if p[key] != c[key] {
            out.push(format!(
                "{key}:\n    python   {}\n    celeriac {}",
                p[key], c[key]
            ));
        }
    }
    let empty = serde_json::Map::new();
    let (ps, cs) = (
        p["steps"].as_object().unwrap_or(&empty),
        c["steps"].as_object().unwrap_or(&empty),
    );
    for step in ps.keys().chain(cs.keys().filter(|k| !ps.contains_key(*k))) {
        if ps.get(step) != cs.get(step) {
            out.push(format!(
                "events of step {step}:\n    python   {}\n    celeriac {}",
                ps.get(step).unwrap_or(&Value::Null),
                cs.get(step).unwrap_or(&Value::Null)
            ));
        }
    }
    out
}

fn differential(broker: &str, backend: &str, shapes: &[&str]) -> Result<()> {
    ensure_services();
    let home = DagsterHome::create_coordinator(broker, backend, &[])?;
    let (q, qa, qb) = (unique("cq"), unique("cqa"), unique("cqb"));
    let envs = [
        ("CELERIAC_QUEUE", q.as_str()),
        ("CELERIAC_QUEUE_A", qa.as_str()),
        ("CELERIAC_QUEUE_B", qb.as_str()),
        ("SLEEP_SECONDS", "0"),
    ];
    let queues = format!("{q},{qa},{qb}");
    let mut worker = WorkerProcess::start(
        &[
            "-b",
            broker,
            "--result-backend",
            backend,
            "-Q",
            &queues,
            "-c",
            "8",
        ],
        &envs,
    )?;
    let coordinator = CeleriacProcess::coordinator(
        &home.dir.join("dagster.yaml"),
        broker,
        backend,
        &unique("replica"),
        &[],
    )?;
    let timeout = Duration::from_secs(300);
    // Two runs of a shape at a time (one per path): four Python step processes at most on 2 cores.
    let mut results = Vec::new();
    for shape in shapes {
        let (python, celeriac) = std::thread::scope(|s| {
            let p = s.spawn(|| home.run_shape(shape, "python", timeout, &envs));
            let c = s.spawn(|| home.run_shape(shape, "launch", timeout, &envs));
            (p.join(), c.join())
        });
        let python = python.map_err(|_| anyhow::anyhow!("python thread panicked"))??;
        let celeriac = celeriac.map_err(|_| anyhow::anyhow!("celeriac thread panicked"))??;
        println!(
            "{shape}: python {} / celeriac {}",
            python["status"], celeriac["status"]
        );
        results.push((shape.to_string(), python, celeriac));
    }
    worker.terminate(Duration::from_secs(60))?;
    let coordinator_log = coordinator.log_text();
    drop(coordinator);

    let mut failures = Vec::new();
    for (shape, python, celeriac) in &results {
        let diff = differences(python, celeriac);
        if !diff.is_empty() {
            failures.push(format!(
                "{shape} ({}):\n  {}",
                celeriac["run_id"],
                diff.join("\n  ")
            ));
        }
        // No Python run worker for the coordinator's run: its process events are absent, ours present.
        let run_engine: Vec<&str> = celeriac["run_events"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["message"].as_str()).collect())
            .unwrap_or_default();
        if run_engine
            .iter()
            .any(|m| m.starts_with("Started process for run"))
        {
            failures.push(format!(
                "{shape}: a Python run-worker process ran: {run_engine:?}"
            ));
        }
        if !run_engine
            .iter()
            .any(|m| m.contains("celeriac coordinator"))
        {
            failures.push(format!(
                "{shape}: no coordinator engine event: {run_engine:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} shapes differ between Python's run worker and the coordinator:\n{}\ncoordinator log:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n"),
        coordinator_log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

#[test]
fn coordinator_matches_python_run_worker_on_rabbitmq_rpc() -> Result<()> {
    differential(AMQP, "rpc://", SHAPES_AMQP).context("RabbitMQ + rpc://")
}

#[test]
fn coordinator_matches_python_run_worker_on_redis() -> Result<()> {
    differential(REDIS, REDIS, SHAPES_REDIS).context("Redis + redis://")
}
