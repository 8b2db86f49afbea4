//! The step command and Job name are byte-identical to what Python computes: checked against the Job
//! bodies the real Python worker POSTed (captures) and against dagster 1.13.27 itself.

mod common;

use celeriac_dagster::step::args::{StepArgsError, StepTaskArgs};
use celeriac_dagster::step::command::{command_args, job_name};
use common::{fixture_json, run_python};
use serde_json::{json, Map, Value};

fn captured_kwargs() -> Vec<Map<String, Value>> {
    match fixture_json("step_task_kwargs.json") {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|v| v.as_object().cloned())
            .collect(),
        other => panic!("unexpected fixture {other}"),
    }
}

#[test]
fn command_matches_the_jobs_python_posted() {
    let posted = fixture_json("posted_job_args.json");
    let kwargs = captured_kwargs();
    assert_eq!(kwargs.len(), 2);
    for kw in kwargs {
        let args = StepTaskArgs::from_kwargs(&kw).expect("captured kwargs decode");
        let name = job_name(&args.run_id, &args.step_key, args.attempt);
        let job = &posted[&name];
        assert!(
            job.is_object(),
            "the Python worker posted no job named {name}"
        );
        let want: Vec<String> = serde_json::from_value(job["args"].clone()).expect("args");
        assert_eq!(
            command_args(&args.entry_point, &args.compressed_input),
            want,
            "step {}",
            args.step_key
        );
        assert_eq!(job["labels"]["dagster/op"], json!(args.step_key));
        assert_eq!(job["labels"]["dagster/run-id"], json!(args.run_id));
    }
}

/// Python side: dagster's own `unpack_value(packed).get_command_args()`, the spec's
/// `b64(zlib(json.dumps(packed, sort_keys=True)))` and `get_k8s_job_name`.
const PY_COMMAND: &str = r#"
import base64, json, sys, zlib
from dagster._serdes import unpack_value
from dagster_k8s.job import get_k8s_job_name
out = []
for case in json.load(sys.stdin):
    packed = case["packed"]
    args = unpack_value(packed)
    raw = base64.b64encode(zlib.compress(json.dumps(packed, sort_keys=True).encode())).decode()
    step = args.step_keys_to_execute[0]
    attempt = args.known_state.get_retry_state().get_attempt_count(step) if args.known_state else 0
    name = "dagster-step-" + get_k8s_job_name(args.run_id, step) + (f"-{attempt}" if attempt else "")
    out.append({"command": list(args.get_command_args()), "raw": raw, "job_name": name})
print(json.dumps(out))
"#;

#[test]
fn command_and_job_name_match_dagster() {
    let base = captured_kwargs();
    let mut cases: Vec<Map<String, Value>> = base.clone();
    // A retry attempt, non-ASCII text (ensure_ascii escaping), and no entry point (executable_path -m dagster).
    let mut retry = base[0].clone();
    let step = retry["execute_step_args_packed"]["step_keys_to_execute"][0].clone();
    let step = step.as_str().expect("step key").to_string();
    retry["execute_step_args_packed"]["known_state"]["previous_retry_attempts"] =
        json!({ step: 2 });
    cases.push(retry);
    let mut unicode = base[1].clone();
    unicode["execute_step_args_packed"]["pipeline_origin"]["repository_origin"]["code_pointer"]
        ["working_directory"] = json!("/opt/dägster/研究/\u{1F680} \"q\" \\ \t");
    cases.push(unicode);
    let mut no_entry = base[0].clone();
    no_entry["execute_step_args_packed"]["pipeline_origin"]["repository_origin"]["entry_point"] =
        Value::Null;
    cases.push(no_entry);

    let input: Vec<Value> = cases
        .iter()
        .map(|kw| json!({"packed": kw["execute_step_args_packed"]}))
        .collect();
    let python = run_python(PY_COMMAND, &Value::Array(input));
    let python = python.as_array().expect("python list");
    assert_eq!(python.len(), cases.len());
    for (kw, py) in cases.iter().zip(python) {
        let args = StepTaskArgs::from_kwargs(kw).expect("decode");
        assert_eq!(
            args.compressed_input,
            py["raw"].as_str().unwrap_or_default()
        );
        let want: Vec<String> = serde_json::from_value(py["command"].clone()).expect("command");
        assert_eq!(
            command_args(&args.entry_point, &args.compressed_input),
            want
        );
        assert_eq!(
            job_name(&args.run_id, &args.step_key, args.attempt),
            py["job_name"].as_str().unwrap_or_default()
        );
    }
    let last = StepTaskArgs::from_kwargs(&cases[4]).expect("decode");
    assert_eq!(
        last.entry_point,
        ["/usr/local/bin/python3", "-m", "dagster"]
    );
    let retried = StepTaskArgs::from_kwargs(&cases[2]).expect("decode");
    assert_eq!(retried.attempt, 2);
    assert!(job_name(&retried.run_id, &retried.step_key, retried.attempt).ends_with("-2"));
}

#[test]
fn bad_kwargs_are_named() {
    let good = captured_kwargs().remove(0);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("job_namespace", json!(3), "job_namespace"),
        (
            "load_incluster_config",
            json!("yes"),
            "load_incluster_config",
        ),
        ("job_config_dict", json!([]), "job_config_dict"),
        ("job_wait_timeout", json!("soon"), "job_wait_timeout"),
        (
            "execute_step_args_packed",
            json!("x"),
            "execute_step_args_packed",
        ),
    ];
    for (key, value, named) in cases {
        let mut kw = good.clone();
        kw.insert(key.into(), value);
        let err = StepTaskArgs::from_kwargs(&kw).expect_err(key);
        assert!(err.to_string().contains(named), "{err}");
        assert_eq!(err.python_type(), ("TypeError", "builtins"));
    }
    let mut kw = good.clone();
    kw.remove("job_namespace");
    assert!(matches!(
        StepTaskArgs::from_kwargs(&kw),
        Err(StepArgsError::Missing("job_namespace"))
    ));

    // Tolerated: unknown job config keys, per_step_k8s_config missing or null, user config null.
    let mut kw = good.clone();
    kw["job_config_dict"]["some_future_field"] = json!(1);
    kw.remove("per_step_k8s_config");
    kw.insert("user_defined_k8s_config_dict".into(), Value::Null);
    let args = StepTaskArgs::from_kwargs(&kw).expect("tolerant decode");
    assert!(args.per_step_k8s_config.is_empty());
    let mut kw = good.clone();
    kw.insert("per_step_k8s_config".into(), Value::Null);
    assert!(StepTaskArgs::from_kwargs(&kw).is_ok());

    let mut kw = good;
    kw["execute_step_args_packed"]["step_keys_to_execute"] = json!(["a", "b"]);
    let err = StepTaskArgs::from_kwargs(&kw).expect_err("two steps");
    assert_eq!(
        err.to_string(),
        "Celery K8s task executor can only execute 1 step at a time"
    );
}

#[test]
fn captured_args_are_read() {
    let args = StepTaskArgs::from_kwargs(&captured_kwargs()[0]).expect("decode");
    assert_eq!(args.run_id, "ba924453-6cab-4ef7-9f6b-ee3c7a9eef4a");
    assert_eq!(args.step_key, "say_hello");
    assert_eq!(args.attempt, 0);
    assert_eq!(args.entry_point, ["dagster"]);
    assert_eq!(args.job_namespace, "default");
    assert!(!args.load_incluster_config);
    assert!(args
        .run_storage_yaml
        .as_deref()
        .is_some_and(|y| y.contains("db_name: dagster_research")));
    assert!(args
        .event_storage_yaml
        .as_deref()
        .is_some_and(|y| y.contains("env: DAGSTER_PG_PASSWORD")));
    assert!(args.per_step_k8s_config.contains_key("add_one"));
}
