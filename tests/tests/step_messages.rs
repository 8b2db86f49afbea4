//! Message parity: the step tasks the Rust side builds equal, field for field, the ones Python's
//! `celery_k8s_job_executor` publishes.
//!
//! Each job shape of `tests/peers/plan_shapes.py` runs once through Python's own run worker
//! (`dagster api execute_run`, publishing with `_submit_task_k8s_job`), with a celeriac worker executing
//! the steps so every wave of the run is published. RabbitMQ's firehose (`trace_on` in a vhost of this
//! test) copies every published message to `amq.rabbitmq.trace`, where the test reads them back exactly
//! as the workers received them. For each captured step task, `celeriac_dagster::submission` builds the
//! task for the same step from the run's hand-off (computed by `CeleriacRunLauncher` with Dagster's own
//! executor code), the plan read from Postgres and the known state, and the two are compared: queue,
//! priority, headers, properties and all eight keyword arguments. The known state of the first wave comes
//! from the Rust engine itself; later waves use the captured one (the known-state computation is proven
//! against Dagster's `ActiveExecution` by `plan_differential.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use celeriac_dagster::plan::{ActiveExecution, ExecutionPlan, KnownState, SortKey};
use celeriac_dagster::submission::{run_priority, step_task, Handoff};
use celeriac_tests::brokers::Vhost;
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::{ensure_services, unique, WorkerProcess};
use celeriac_wire::broker::amqp::table_to_json;
use celeriac_wire::task::TaskMessage;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{json, Map, Value};

const SHAPES: &[&str] = &[
    "fan_in_optional",
    "dynamic_collect",
    "nested_dynamic",
    "empty_dynamic",
    "retry_success",
    "retry_requested",
    "fail_abandon",
    "optional_skip",
    "priorities",
    "op_subset",
    "reexecute_from_failure",
    "asset_check",
];

/// A step task as captured: routing key, properties, headers and decoded body.
#[derive(Debug)]
struct Captured {
    routing_key: String,
    properties: Map<String, Value>,
    headers: Map<String, Value>,
    body: Value,
}

impl Captured {
    fn kwargs(&self) -> &Map<String, Value> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        self.body[1]
            .as_object()
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }
    fn run_id(&self) -> &str {
        self.kwargs()["execute_step_args_packed"]["pipeline_run_id"]
            .as_str()
            .unwrap_or_default()
    }
    fn step_key(&self) -> &str {
        self.kwargs()["execute_step_args_packed"]["step_keys_to_execute"][0]
            .as_str()
            .unwrap_or_default()
    }
}

/// Reads the firehose queue until it has been quiet for a while.
async fn drain(channel: &lapin::Channel, queue: &str) -> Result<Vec<Captured>> {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "parity".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        let delivery = delivery?;
        if tokio::time::Instant::now() > deadline {
            let trace = delivery.properties.headers().as_ref().map(table_to_json);
            bail!(
                "the firehose queue never went quiet ({} step tasks so far; last: {trace:?})",
                out.len()
            );
        }
        delivery.ack(BasicAckOptions::default()).await?;
        let trace = delivery
            .properties
            .headers()
            .as_ref()
            .map(table_to_json)
            .unwrap_or_default();
        let properties = trace
            .get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let headers = properties
            .get("headers")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if headers.get("task").and_then(Value::as_str) != Some("execute_step_k8s_job") {
            continue; // results, events, control
        }
        let routing_key = trace["routing_keys"][0]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let body: Value = serde_json::from_slice(&delivery.data).context("step task body")?;
        out.push(Captured {
            routing_key,
            properties,
            headers,
            body,
        });
    }
    Ok(out)
}

/// Compares one captured task with the Rust one built for the same step and known state.
fn compare(
    captured: &Captured,
    handoff: &Handoff,
    plan: &ExecutionPlan,
    known: &KnownState,
    run_prio: i64,
) -> Result<()> {
    let step = plan.step(captured.step_key())?;
    let task = step_task(handoff, run_prio, step, known)?;
    let id = captured.headers["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let message = TaskMessage {
        id: id.clone(),
        task: "execute_step_k8s_job".into(),
        args: vec![],
        kwargs: task.kwargs.clone(),
        argsrepr: celeriac_wire::saferepr::argsrepr(&[]),
        kwargsrepr: celeriac_wire::saferepr::kwargsrepr(&task.kwargs),
        origin: captured.headers["origin"]
            .as_str()
            .unwrap_or_default()
            .into(),
        reply_to: captured.properties["reply_to"].as_str().map(str::to_string),
        priority: Some(task.priority),
        root_id: None,
        parent_id: None,
    };
    let what = format!("step {} of run {}", captured.step_key(), captured.run_id());
    if captured.routing_key != task.queue {
        bail!(
            "{what}: queue python {} / rust {}",
            captured.routing_key,
            task.queue
        );
    }
    let priority = captured
        .properties
        .get("priority")
        .cloned()
        .unwrap_or(Value::Null);
    if priority != json!(task.priority) {
        bail!(
            "{what}: priority python {priority} / rust {}",
            task.priority
        );
    }
    for (k, v) in &message.headers() {
        if captured.headers.get(k) != Some(v) {
            bail!(
                "{what}: header {k}: python {:?} / rust {v}",
                captured.headers.get(k)
            );
        }
    }
    if captured.headers.len() != message.headers().len() {
        bail!(
            "{what}: headers python {:?} / rust {:?}",
            captured.headers.keys(),
            message.headers().keys()
        );
    }
    for (k, v) in [
        ("correlation_id", json!(id)),
        ("delivery_mode", json!(2)),
        ("content_type", json!("application/json")),
        ("content_encoding", json!("utf-8")),
    ] {
        if captured.properties.get(k) != Some(&v) {
            bail!(
                "{what}: property {k}: python {:?} / rust {v}",
                captured.properties.get(k)
            );
        }
    }
    let rust_body: Value = serde_json::from_str(&message.body())?;
    for (k, want) in captured.kwargs() {
        let got = &rust_body[1][k];
        if got != want {
            bail!("{what}: kwarg {k} differs:\n  python {want}\n  rust   {got}");
        }
    }
    if captured.kwargs().len() != task.kwargs.len()
        || captured.body[0] != rust_body[0]
        || captured.body[2] != rust_body[2]
    {
        bail!(
            "{what}: body differs:\n  python {}\n  rust   {rust_body}",
            captured.body
        );
    }
    Ok(())
}

#[test]
fn step_tasks_match_pythons_executor() -> Result<()> {
    ensure_services();
    let vhost = Vhost::create("celeriac_parity")?;
    vhost.trace_on()?;
    let broker = vhost.url();
    let rt = tokio::runtime::Runtime::new()?;
    let conn = rt.block_on(lapin::Connection::connect(&broker, Default::default()))?;
    let channel = rt.block_on(conn.create_channel())?;
    let capture = "parity_capture";
    rt.block_on(async {
        channel
            .queue_declare(
                capture.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                capture.into(),
                "amq.rabbitmq.trace".into(),
                // `publish.<exchange>`: only the default exchange (step tasks and rpc results), not the
                // worker's events or remote control.
                "publish.".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    })?;

    let home = DagsterHome::create_coordinator(&broker, "rpc://", &[])?;
    let (q, qa, qb) = (unique("pq"), unique("pqa"), unique("pqb"));
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
            &broker,
            "--result-backend",
            "rpc://",
            "-Q",
            &queues,
            "-c",
            "4",
        ],
        &envs,
    )?;

    let mut runs: BTreeMap<String, (String, Value)> = BTreeMap::new();
    let only = std::env::var("CELERIAC_PARITY_SHAPES").unwrap_or_default();
    let shapes: Vec<&str> = if only.is_empty() {
        SHAPES.to_vec()
    } else {
        only.split(',').collect()
    };
    for shape in &shapes {
        let summary = home.run_shape(shape, "python", Duration::from_secs(240), &envs)?;
        let run_id = summary["run_id"].as_str().context("run id")?.to_string();
        println!("{shape}: run {run_id} ended {}", summary["status"]);
        runs.insert(run_id, (shape.to_string(), summary["handoff"].clone()));
    }
    let captured = rt.block_on(drain(&channel, capture))?;
    worker.terminate(Duration::from_secs(60))?;

    let pg = rt.block_on(async {
        let (client, c) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port=5432 user=postgres dbname={}", home.db),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(c);
        anyhow::Ok(client)
    })?;
    let mut failures = Vec::new();
    let mut compared = 0;
    let mut first_wave_checked = 0;
    let mut per_shape: BTreeMap<String, usize> = BTreeMap::new();
    for (run_id, (shape, handoff)) in &runs {
        let handoff = Handoff::decode(handoff).with_context(|| format!("hand-off of {shape}"))?;
        let record = rt.block_on(celeriac_dagster::run::load_run(&pg, run_id))?;
        let snapshot = rt.block_on(celeriac_dagster::run::load_plan(&pg, &record))?;
        let run_prio = run_priority(&record.tags);
        let mut engine = ActiveExecution::new(
            ExecutionPlan::rebuild(&record.job_name, &snapshot)?,
            handoff.retry_mode,
            SortKey::Celery {
                run_priority: run_prio,
                task_default_priority: handoff.task_default_priority,
            },
            0.0,
        )?;
        let first_wave = engine.get_steps_to_execute(0.0)?;
        let fresh_known = engine.get_known_state();
        let messages: Vec<&Captured> = captured.iter().filter(|c| c.run_id() == run_id).collect();
        if messages.is_empty() {
            failures.push(format!("{shape}: no step task captured"));
        }
        for m in messages {
            compared += 1;
            *per_shape.entry(shape.clone()).or_default() += 1;
            let known_value = &m.kwargs()["execute_step_args_packed"]["known_state"];
            let captured_known = KnownState::decode(known_value, "known_state")?;
            let is_first = first_wave.iter().any(|k| k == m.step_key())
                && captured_known.previous_retry_attempts.is_empty();
            let known = if is_first {
                first_wave_checked += 1;
                &fresh_known
            } else {
                &captured_known
            };
            let mut plan = ExecutionPlan::rebuild(&record.job_name, &snapshot)?;
            plan.resolve(&known.dynamic_mappings)?;
            if let Err(e) = compare(m, &handoff, &plan, known, run_prio) {
                failures.push(format!("{shape}: {e:#}"));
            }
        }
    }
    for (shape, n) in &per_shape {
        println!("{shape:24} {n} step tasks compared");
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} step tasks differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        per_shape.len() >= shapes.len().min(8),
        "messages of only {} shapes compared",
        per_shape.len()
    );
    assert!(
        first_wave_checked >= shapes.len(),
        "first-wave known states checked: {first_wave_checked}"
    );
    Ok(())
}
