//! Dagster events: the engine events and synthesised STEP_FAILURE match the captures of the Python
//! worker and deserialize in real dagster; step events are picked out of real pod logs exactly as
//! `filter_dagster_events_from_cli_logs` does.

mod common;

use std::collections::BTreeSet;

use celeriac_dagster::events::{
    engine_event, filter_events, step_failure, ErrorInfo, Meta, StepRef, DELEGATE_MARKER,
};
use common::{fixture, fixture_json, run_python};
use serde_json::{json, Value};

const POD_LOGS: [&str; 3] = [
    "R1-pod-dagster-step-35c1c7c2ae2f03f0faec4ed35aa0cf71-2iis0.log",
    "R1-pod-dagster-step-7a807402ccde5879969cc0130ce41e1d-umojq.log",
    "R1-pod-dagster-step-c35257ce79cf1d5aff68f3514d5d8205-v0ukw.log",
];

/// Compares our extraction with dagster's own on the same text, event by event (re-serialized by dagster).
const PY_FILTER: &str = r#"
import json, sys
from dagster import DagsterEvent
from dagster._serdes import deserialize_value, serialize_value
from dagster._core.events.utils import filter_dagster_events_from_cli_logs
out = []
for case in json.load(sys.stdin):
    want = [serialize_value(e) for e in filter_dagster_events_from_cli_logs(case["log"].split("\n"))]
    got = [serialize_value(deserialize_value(l, DagsterEvent)) for l in case["ours"]]
    out.append({"want": want, "got": got, "types": [json.loads(w)["event_type_value"] for w in want]})
print(json.dumps(out))
"#;

#[test]
fn filter_matches_dagster_on_real_pod_logs() {
    let mut logs: Vec<String> = POD_LOGS.iter().map(|f| fixture(f)).collect();
    // Split JSON over lines, indentation, noise between, a foreign JSON object, a broken brace line.
    logs.push(
        "text\n  {\"__class__\": \"Other\"}\n{ not json }\n{broken\nstill broken}\n".to_string()
            + &fixture(POD_LOGS[0])
                .lines()
                .filter(|l| l.starts_with('{'))
                .map(|l| {
                    let (a, b) = l.split_at(l.len() / 2);
                    format!("   {a}\n{b}  \n")
                })
                .collect::<String>(),
    );
    let input: Vec<Value> = logs
        .iter()
        .map(|l| json!({"log": l, "ours": filter_events(l)}))
        .collect();
    let py = run_python(PY_FILTER, &Value::Array(input));
    for (i, case) in py.as_array().expect("list").iter().enumerate() {
        assert_eq!(case["got"], case["want"], "log {i}");
        let types: Vec<&str> = case["types"]
            .as_array()
            .expect("types")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(types.contains(&"STEP_SUCCESS"), "log {i}: {types:?}");
        assert!(types.len() >= 7, "log {i}: {types:?}");
    }
    // Forwarded lines are the original text.
    for line in filter_events(&logs[0]) {
        assert!(logs[0].contains(&line));
    }
}

fn retry_result() -> Vec<String> {
    let results = fixture_json("redis_results_crash_and_retry.json");
    let found = results
        .as_object()
        .expect("results")
        .values()
        .map(|v| v["result"].as_array().cloned().unwrap_or_default())
        .find(|r| {
            r.first()
                .and_then(Value::as_str)
                .is_some_and(|e| e.contains("dagster-step-87e6fe3a1c37d65649eec95a2b5f030f."))
        })
        .expect("retry attempt 0 result");
    found
        .into_iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn executing_and_retrieving_events_are_byte_identical_to_python() {
    let result = retry_result();
    let step = StepRef {
        run_id: "unused",
        job_name: "retry_job",
        step_key: "flaky",
    };
    let job = "dagster-step-87e6fe3a1c37d65649eec95a2b5f030f";
    let e2 = engine_event(
        &step,
        &format!("Executing step \"flaky\" in Kubernetes job {job}."),
        &[
            ("Step key", Meta::Text("flaky".into())),
            ("Kubernetes Job name", Meta::Text(job.into())),
            (
                "Job image",
                Meta::Text("example.com/research/user-code:1.0".into()),
            ),
            ("Image pull policy", Meta::Text("IfNotPresent".into())),
            ("Image pull secrets", Meta::Text("[]".into())),
            ("Service account name", Meta::Text("dagster-sa".into())),
        ],
        Some(DELEGATE_MARKER),
        None,
    );
    assert_eq!(e2.dagster_event_json(), result[0]);
    let e3 = engine_event(
        &step,
        "Retrieving logs from Kubernetes Job pods",
        &[(
            "Pod names",
            Meta::Text("dagster-step-87e6fe3a1c37d65649eec95a2b5f030f-lkzbh".into()),
        )],
        None,
        None,
    );
    assert_eq!(e3.dagster_event_json(), result[1]);
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn step_failure_matches_the_captured_crash() {
    let results = fixture_json("redis_results_crash_and_retry.json");
    let captured: Value = results
        .as_object()
        .expect("results")
        .values()
        .flat_map(|v| v["result"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| {
            e.as_str()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
        })
        .find(|e| {
            e["event_type_value"] == "STEP_FAILURE"
                && e["event_specific_data"]["user_failure_data"]["label"] == "K8sError"
        })
        .expect("captured synthesised STEP_FAILURE");
    let step = StepRef {
        run_id: "ba358176-1d67-4f17-a86d-0ffd44448457",
        job_name: "crash_job",
        step_key: "crash",
    };
    let reason =
        "Step process of job dagster-step-90b2acc34b0e9a9d9a413cf6e7d0ce26 exited with code 3";
    let err = ErrorInfo::new("celeriac.launcher", "StepProcessError", reason);
    let ev = step_failure(&step, &err, reason);
    let ours = ev.dagster_event_value();
    assert_eq!(keys(&ours), keys(&captured));
    for k in [
        "__class__",
        "event_type_value",
        "logging_tags",
        "message",
        "pid",
        "pipeline_name",
        "solid_handle",
        "step_handle",
        "step_key",
        "step_kind_value",
    ] {
        assert_eq!(ours[k], captured[k], "{k}");
    }
    let (o, c) = (
        &ours["event_specific_data"],
        &captured["event_specific_data"],
    );
    assert_eq!(keys(o), keys(c));
    assert_eq!(o["error_source"], c["error_source"]);
    assert_eq!(o["user_failure_data"], c["user_failure_data"]);
    assert_eq!(keys(&o["error"]), keys(&c["error"]));
    assert_eq!(
        o["error"]["message"],
        json!(format!("celeriac.launcher.StepProcessError: {reason}\n"))
    );

    // The stored row: same EventLogEntry shape as the one the Python worker wrote for the crash.
    let rows = fixture_json("db_event_log_rows.json");
    let row = rows["event_logs_crash_run_worker_written"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["dagster_event_type"] == "STEP_FAILURE")
        .expect("STEP_FAILURE row");
    let stored: Value = match &row["event_json"] {
        Value::String(s) => serde_json::from_str(s).expect("event json"),
        v => v.clone(),
    };
    assert_eq!(keys(&ev.entry_value()), keys(&stored));
    assert_eq!(ev.entry_value()["level"], stored["level"]);
    assert_eq!(ev.entry_value()["user_message"], json!(reason));
    assert!(stored["user_message"]
        .as_str()
        .is_some_and(|m| m.starts_with("Encountered failed job pods")));
    assert_eq!(ev.entry_value()["error_info"], Value::Null);
    assert_eq!(ev.event_type, "STEP_FAILURE");
}

#[test]
fn engine_event_rows_match_the_captured_rows() {
    let rows = fixture_json("db_event_log_rows.json");
    let mut compared = 0;
    for row in rows["event_logs_R1_say_hello_engine_events"]
        .as_array()
        .expect("rows")
    {
        let stored: Value = match &row["event_json"] {
            Value::String(s) => serde_json::from_str(s).expect("event json"),
            v => v.clone(),
        };
        // Only the rows the Celery worker wrote (the run worker writes the others).
        if !stored["dagster_event"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("[CeleryK8sJobExecutor] "))
        {
            continue;
        }
        compared += 1;
        let de = &stored["dagster_event"];
        let data = &de["event_specific_data"];
        let metadata: Vec<(String, Meta)> = data["metadata_entries"]
            .as_array()
            .expect("metadata")
            .iter()
            .map(|m| {
                let label = m["label"].as_str().unwrap_or_default().to_string();
                match m["entry_data"]["text"].as_str() {
                    Some(t) => (label, Meta::Text(t.to_string())),
                    None => (label, Meta::Null),
                }
            })
            .collect();
        let metadata: Vec<(&str, Meta)> = metadata
            .iter()
            .map(|(l, m)| (l.as_str(), m.clone()))
            .collect();
        let step = StepRef {
            run_id: stored["run_id"].as_str().unwrap_or_default(),
            job_name: stored["pipeline_name"].as_str().unwrap_or_default(),
            step_key: stored["step_key"].as_str().unwrap_or_default(),
        };
        let message = de["message"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("[CeleryK8sJobExecutor] ");
        let ev = engine_event(&step, message, &metadata, data["marker_end"].as_str(), None);
        let mut ours = ev.entry_value();
        ours["timestamp"] = stored["timestamp"].clone();
        assert_eq!(ours, stored, "row {}", row["id"]);
        // Byte-identical serialization (sorted keys, Python separators).
        let mut bytes = ev.entry_json().to_string();
        let ts_ours = celeriac_wire::json::to_python_string(&ev.entry_value()["timestamp"], true);
        let ts_theirs = celeriac_wire::json::to_python_string(&stored["timestamp"], true);
        bytes = bytes.replace(
            &format!("\"timestamp\": {ts_ours}"),
            &format!("\"timestamp\": {ts_theirs}"),
        );
        assert_eq!(bytes, celeriac_wire::json::to_python_string(&stored, true));
        assert_eq!(
            ev.event_type,
            row["dagster_event_type"].as_str().unwrap_or_default()
        );
    }
    assert!(compared >= 3, "only {compared} worker rows in the capture");
}

/// Deserializes our `EventLogEntry` JSON with real dagster and reports what it sees.
const PY_ROUNDTRIP: &str = r#"
import json, sys
from dagster import DagsterEvent, EventLogEntry
from dagster._serdes import deserialize_value, serialize_value
out = []
for case in json.load(sys.stdin):
    entry = deserialize_value(case["entry"], EventLogEntry)
    event = deserialize_value(case["event"], DagsterEvent)
    de = entry.dagster_event
    data = de.event_specific_data
    md = {}
    for k, v in (getattr(data, "metadata", None) or {}).items():
        md[k] = v.value
    err = getattr(data, "error", None)
    out.append({
        "same_event": serialize_value(event) == serialize_value(de),
        "event_type": de.event_type_value, "message": de.message, "step_key": de.step_key, "job_name": de.job_name,
        "level": entry.level, "user_message": entry.user_message, "run_id": entry.run_id, "timestamp": entry.timestamp,
        "metadata": md, "marker_end": getattr(data, "marker_end", None),
        "error_cls": err.cls_name if err else None, "error_message": err.message if err else None,
        "is_step_failure": de.is_step_failure,
        "failure_label": data.user_failure_data.label if de.is_step_failure else None,
        "error_source": str(data.error_source) if de.is_step_failure else None,
    })
print(json.dumps(out))
"#;

#[test]
fn events_deserialize_in_real_dagster() {
    let step = StepRef {
        run_id: "0d3b2f64-1c1e-4b68-9d4f-5a4e7c3b2a10",
        job_name: "my_job",
        step_key: "my_op",
    };
    let err = ErrorInfo::new("celeriac.launcher", "StepProcessError", "boom \u{e9}");
    let events = [
        engine_event(
            &step,
            "Task for step my_op picked up by Celery",
            &[
                ("Celery worker name", Meta::Text("celeriac@host".into())),
                ("Celery worker Kubernetes Pod name", Meta::Null),
            ],
            None,
            None,
        ),
        engine_event(
            &step,
            "Executing step \"my_op\" in Kubernetes job x.",
            &[("Job image", Meta::Null)],
            Some(DELEGATE_MARKER),
            None,
        ),
        engine_event(
            &step,
            "Encountered unexpected error while creating Kubernetes job x for step my_op, exiting.",
            &[("Step key", Meta::Text("my_op".into()))],
            None,
            Some(&err),
        ),
        step_failure(&step, &err, "boom \u{e9}"),
    ];
    let input: Vec<Value> = events
        .iter()
        .map(|e| json!({"entry": e.entry_json(), "event": e.dagster_event_json()}))
        .collect();
    let py = run_python(PY_ROUNDTRIP, &Value::Array(input));
    let py = py.as_array().expect("list");
    for (e, p) in events.iter().zip(py) {
        assert_eq!(p["same_event"], json!(true));
        assert_eq!(p["event_type"], json!(e.event_type));
        assert_eq!(p["step_key"], json!("my_op"));
        assert_eq!(p["job_name"], json!("my_job"));
        assert_eq!(p["run_id"], json!(step.run_id));
        assert!((p["timestamp"].as_f64().unwrap_or_default() - e.timestamp()).abs() < 1e-6);
    }
    assert_eq!(
        py[0]["message"],
        json!("[CeleryK8sJobExecutor] Task for step my_op picked up by Celery")
    );
    assert_eq!(py[0]["level"], json!(20));
    assert_eq!(
        py[0]["metadata"],
        json!({"Celery worker name": "celeriac@host", "Celery worker Kubernetes Pod name": null})
    );
    assert_eq!(py[1]["marker_end"], json!("celery_queue_wait"));
    assert_eq!(py[2]["level"], json!(40));
    assert_eq!(py[2]["error_cls"], json!("StepProcessError"));
    assert_eq!(py[3]["is_step_failure"], json!(true));
    assert_eq!(py[3]["failure_label"], json!("K8sError"));
    assert_eq!(py[3]["error_source"], json!("ErrorSource.FRAMEWORK_ERROR"));
    assert_eq!(py[3]["user_message"], json!("boom \u{e9}"));
    assert_eq!(
        py[3]["error_message"],
        json!("celeriac.launcher.StepProcessError: boom \u{e9}\n")
    );
    assert_eq!(py[3]["level"], json!(40));
    assert_eq!(py[3]["message"], Value::Null);
}
