//! The Rust plan engine against Dagster's own `ActiveExecution`, call for call.
//!
//! `tests/peers/plan_traces.py` creates one real run per job shape of `tests/peers/plan_shapes.py` in a
//! Postgres-backed Dagster 1.13 instance, rebuilds its plan from the stored snapshot and drives Dagster's
//! `ActiveExecution` through randomized traces (random interleavings and step outcomes, real
//! `DagsterEvent`s, a virtual clock), recording every call, its result and the engine's state after it.
//! This test reads each run's snapshot from the same Postgres tables with the Rust loader, replays every
//! call on the Rust engine and compares results and state after each one: executable, pending, skipped,
//! abandoned, in-flight, waiting-to-retry sets, submission order and the serialized known state.
//!
//! The traces are random per run of this test: the seed is printed, and `CELERIAC_PLAN_SEED=<n>`
//! replays a failing one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use celeriac_dagster::plan::active::python_int;
use celeriac_dagster::plan::{
    ActiveExecution, ExecutionPlan, PlanSnapshot, RetryMode, SortKey, StepEvent,
};
use celeriac_tests::{artifacts_dir, ensure_services, peer, run_python};
use serde_json::{json, Value};

const DB: &str = "celeriac_plan_traces";
const TRACES_PER_SHAPE: usize = 100;
const MIN_TRACES: usize = 1000;

struct Shape {
    name: String,
    job_name: String,
    retry_mode: RetryMode,
    sort_key: SortKey,
    snapshot: PlanSnapshot,
}

/// The engine's state in the trace's terms.
fn state_of(e: &ActiveExecution) -> Value {
    let s = e.snapshot();
    let waiting: serde_json::Map<String, Value> = s
        .waiting_to_retry
        .iter()
        .map(|(k, at)| (k.clone(), json!(at)))
        .collect();
    json!({
        "pending": s.pending, "executable": s.executable, "pending_skip": s.pending_skip,
        "pending_abandon": s.pending_abandon, "waiting_to_retry": waiting, "in_flight": s.in_flight,
        "success": s.success, "failed": s.failed, "skipped": s.skipped, "abandoned": s.abandoned,
        "unknown": s.unknown, "is_complete": s.is_complete,
        "known_state": e.get_known_state().to_serdes_string(),
    })
}

/// Numbers compare as floats (Python writes `1700000003.0`, Rust may write `1700000003`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        _ => a == b,
    }
}

fn diff_state(want: &Value, got: &Value) -> Option<String> {
    let mut out = String::new();
    let fields = want
        .as_object()
        .map(|m| m.keys().cloned().collect::<Vec<_>>());
    for field in fields.unwrap_or_default() {
        let (w, g) = (&want[&field], &got[&field]);
        if !same(w, g) {
            let _ = write!(out, "\n    {field}: python {w} / rust {g}");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Replays one trace; returns a description of the first divergence.
fn replay(shape: &Shape, calls: &[Value]) -> Result<(), String> {
    let mut engine: Option<ActiveExecution> = None;
    for (i, call) in calls.iter().enumerate() {
        let name = call["call"].as_str().unwrap_or_default();
        let now = call["now"].as_f64().unwrap_or_default();
        let at = |what: String| format!("call {i} ({name}): {what}");
        if name == "start" {
            let plan = ExecutionPlan::rebuild(&shape.job_name, &shape.snapshot)
                .map_err(|e| at(format!("rebuild failed: {e}")))?;
            engine = Some(
                ActiveExecution::new(plan, shape.retry_mode, shape.sort_key.clone(), now)
                    .map_err(|e| at(format!("start failed: {e}")))?,
            );
        } else {
            let e = engine.as_mut().ok_or_else(|| at("no start call".into()))?;
            match name {
                "get_steps_to_execute" => {
                    let got = e.get_steps_to_execute(now).map_err(|x| at(x.to_string()))?;
                    if !same(&call["result"], &json!(got)) {
                        return Err(at(format!(
                            "submitted python {} / rust {got:?}",
                            call["result"]
                        )));
                    }
                }
                "handle_event" => {
                    let text = call["event"].as_str().unwrap_or_default();
                    let result = StepEvent::parse(text)
                        .map_err(|x| x.to_string())
                        .and_then(|ev| e.handle_event(&ev, now).map_err(|x| x.to_string()));
                    match (&call["error"], result) {
                        (Value::Null, Err(x)) => return Err(at(format!("rust failed: {x}"))),
                        (Value::String(py), Ok(())) => {
                            return Err(at(format!("python raised {py}, rust accepted")))
                        }
                        // Both refused the event: the trace ends here in both engines.
                        (Value::String(_), Err(_)) => return Ok(()),
                        _ => {}
                    }
                }
                "verify_complete" => {
                    let key = call["step_key"].as_str().unwrap_or_default();
                    let got: Vec<String> = e
                        .verify_complete(key)
                        .map_err(|x| at(x.to_string()))?
                        .into_iter()
                        .collect();
                    if !same(&call["result"], &json!(got)) {
                        return Err(at(format!(
                            "logged python {} / rust {got:?}",
                            call["result"]
                        )));
                    }
                }
                "plan_events" => {
                    let got = e.plan_events(now).map_err(|x| at(x.to_string()))?;
                    let skipped: Vec<Value> = got
                        .skipped
                        .iter()
                        .map(|s| json!({"step_key": s.step_key, "message": s.message()}))
                        .collect();
                    if !same(&call["result"]["skipped"], &json!(skipped)) {
                        return Err(at(format!(
                            "skipped python {} / rust {skipped:?}",
                            call["result"]["skipped"]
                        )));
                    }
                    let want = call["result"]["abandoned"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    if want.len() != got.abandoned.len() {
                        return Err(at(format!(
                            "abandoned python {want:?} / rust {:?}",
                            got.abandoned
                        )));
                    }
                    for (w, g) in want.iter().zip(&got.abandoned) {
                        let ok = w["step_key"] == json!(g.step_key)
                            && w["failed_inputs"] == json!(g.failed_inputs)
                            && w["abandoned_inputs"] == json!(g.abandoned_inputs);
                        // Python lists the inputs in set order: the text is comparable when each
                        // list has at most one entry.
                        let text_comparable =
                            g.failed_inputs.len() <= 1 && g.abandoned_inputs.len() <= 1;
                        if !ok || (text_comparable && w["message"] != json!(g.message())) {
                            return Err(at(format!(
                                "abandoned python {w} / rust {g:?} ({})",
                                g.message()
                            )));
                        }
                    }
                }
                "mark_interrupted" => e.mark_interrupted(),
                other => return Err(at(format!("unknown call {other}"))),
            }
        }
        let e = engine.as_ref().ok_or_else(|| at("no engine".into()))?;
        if let Some(d) = diff_state(&call["state"], &state_of(e)) {
            return Err(at(format!("state differs:{d}")));
        }
    }
    Ok(())
}

fn sort_key(run_tags: &Value) -> SortKey {
    let run_priority = run_tags
        .get("dagster-celery/run_priority")
        .and_then(Value::as_str)
        .and_then(python_int)
        .unwrap_or(0);
    SortKey::Celery {
        run_priority,
        task_default_priority: 5,
    }
}

async fn load_shape(client: &tokio_postgres::Client, line: &Value) -> Result<Shape> {
    let run_id = line["run_id"]
        .as_str()
        .context("shape line without run_id")?;
    let run = celeriac_dagster::run::load_run(client, run_id).await?;
    let snapshot = celeriac_dagster::run::load_plan(client, &run).await?;
    Ok(Shape {
        name: line["shape"].as_str().unwrap_or_default().to_string(),
        job_name: run.job_name.clone(),
        retry_mode: RetryMode::parse(line["retry_mode"].as_str().unwrap_or_default())
            .context("retry_mode")?,
        sort_key: sort_key(&line["run_tags"]),
        snapshot,
    })
}

#[test]
fn rust_engine_matches_dagsters_active_execution() -> Result<()> {
    ensure_services();
    let seed: u64 = match std::env::var("CELERIAC_PLAN_SEED") {
        Ok(s) => s.parse().context("CELERIAC_PLAN_SEED")?,
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                % 1_000_000
        }
    };
    println!("plan differential: seed {seed} (replay with CELERIAC_PLAN_SEED={seed})");
    let out = artifacts_dir().join(format!("plan_traces_{seed}.jsonl"));
    let summary = run_python(
        &[
            peer("plan_traces.py").to_str().unwrap_or_default(),
            "--db",
            DB,
            "--out",
            out.to_str().unwrap_or_default(),
            "--traces-per-shape",
            &TRACES_PER_SHAPE.to_string(),
            "--seed",
            &seed.to_string(),
        ],
        &[],
        Duration::from_secs(600),
    )?;
    print!("{summary}");

    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port=5432 user=postgres dbname={DB}"),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(conn);
        anyhow::Ok(client)
    })?;

    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let mut shape: Option<Shape> = None;
    let mut per_shape: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut traces = 0;
    let mut fan_in_run = None;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).context("trace line")?;
        match v["kind"].as_str() {
            Some("shape") => {
                if v["shape"] == "fan_in_optional" {
                    fan_in_run = v["run_id"].as_str().map(str::to_string);
                }
                shape = Some(rt.block_on(load_shape(&client, &v))?)
            }
            Some("trace") => {
                let s = shape.as_ref().context("trace before its shape")?;
                let calls = v["calls"].as_array().context("calls")?;
                traces += 1;
                let entry = per_shape.entry(s.name.clone()).or_default();
                entry.0 += 1;
                entry.1 += calls.len();
                if let Err(why) = replay(s, calls) {
                    failures.push(format!("shape {} trace seed {}: {why}", s.name, v["seed"]));
                }
            }
            _ => {}
        }
    }
    for (name, (n, calls)) in &per_shape {
        println!("{name:28} {n} traces, {calls} calls");
    }
    assert!(
        failures.is_empty(),
        "{} of {traces} traces diverge (seed {seed}; traces in {}). First ones:\n{}",
        failures.len(),
        out.display(),
        failures
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(traces >= MIN_TRACES, "only {traces} traces");
    assert!(per_shape.len() >= 13, "only {} shapes", per_shape.len());
    let _ = std::fs::remove_file(&out);
    let fan_in_run = fan_in_run.context("no fan_in_optional run")?;
    rt.block_on(bad_snapshots_name_the_run_and_the_class(
        &client,
        &fan_in_run,
    ))
}

/// A copy of a real run whose stored plan is (a) not zlib at all, (b) a plan with a step-input source
/// class no Dagster has: loading either fails with an error naming the run (and the class), no panic.
async fn bad_snapshots_name_the_run_and_the_class(
    client: &tokio_postgres::Client,
    source_run: &str,
) -> Result<()> {
    use std::io::Write as _;
    let row = client
        .query_one(
            "SELECT run_id, run_body FROM runs WHERE run_id = $1",
            &[&source_run],
        )
        .await?;
    let body: Value = serde_json::from_str(row.get::<_, &str>(1))?;
    let good = celeriac_dagster::run::load_run(client, row.get(0)).await?;
    let snapshot_id = good
        .execution_plan_snapshot_id
        .clone()
        .context("snapshot id")?;
    let stored: Vec<u8> = client
        .query_one(
            "SELECT snapshot_body FROM snapshots WHERE snapshot_id = $1",
            &[&snapshot_id],
        )
        .await?
        .get(0);
    let text = celeriac_dagster::serdes::parse_zlib(&stored)?.to_string();
    let renamed = text.replacen("\"FromStepOutput\"", "\"FromTheFuture\"", 1);
    assert_ne!(
        renamed, text,
        "the plan has a FromStepOutput source to rename"
    );
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(renamed.as_bytes())?;
    let future_class = enc.finish()?;
    for (label, bytes, want) in [
        (
            "garbage",
            b"not zlib at all".to_vec(),
            "not zlib-compressed",
        ),
        ("unknown class", future_class, "FromTheFuture"),
    ] {
        let run_id = uuid::Uuid::new_v4().to_string();
        let snap_id = format!("bad{}", &run_id[..8]);
        let mut run_body = body.clone();
        run_body["run_id"] = json!(run_id);
        run_body["execution_plan_snapshot_id"] = json!(snap_id);
        client
            .execute(
                "INSERT INTO snapshots (snapshot_id, snapshot_body, snapshot_type) VALUES ($1, $2, 'EXECUTION_PLAN')",
                &[&snap_id, &bytes],
            )
            .await?;
        client
            .execute(
                "INSERT INTO runs (run_id, pipeline_name, status, run_body) VALUES ($1, $2, 'NOT_STARTED', $3)",
                &[&run_id, &good.job_name, &run_body.to_string()],
            )
            .await?;
        let record = celeriac_dagster::run::load_run(client, &run_id).await?;
        let err = celeriac_dagster::run::load_plan(client, &record)
            .await
            .err()
            .with_context(|| format!("{label}: the bad snapshot loaded"))?;
        let text = err.to_string();
        assert!(
            text.contains(&run_id) && text.contains(want),
            "{label}: {text}"
        );
        if label == "unknown class" {
            assert!(
                text.contains("steps[") && text.contains("source"),
                "names where: {text}"
            );
        }
        println!("{label}: {text}");
    }
    Ok(())
}
