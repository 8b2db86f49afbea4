//! The Dagster releases celeriac supports (1.9 to 1.13, README "Supported Dagster versions"), each seen
//! through data its own Python code produced (`dagster/tests/fixtures/versions/<version>/`, captured by
//! `scripts/capture-version-fixtures.sh` with that release's venv):
//!
//! * the step tasks its `celery_k8s_job_executor` publishes parse into [`StepTaskArgs`] (task name,
//!   routing, every keyword argument, `per_step_k8s_config`, the user-defined config keys of that release);
//! * the events of its step process are filtered exactly as its `filter_dagster_events_from_cli_logs`;
//! * celeriac's step Job equals its `construct_dagster_k8s_job` for every captured config;
//! * its `DagsterK8sJobConfig` fields and `UserDefinedDagsterK8sConfig` keys are ones celeriac knows.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use celeriac_dagster::events::filter_events;
use celeriac_dagster::k8s_config::{normalize, CONFIG_KEYS, CONFIG_KEYS_ADDED};
use celeriac_dagster::kubernetes::job::{construct_job, JobInputs};
use celeriac_dagster::step::args::StepTaskArgs;
use serde_json::Value;

/// The releases the fixtures must cover: the oldest supported one, the newest, and one per minor
/// line in between.
const SUPPORTED: &[&str] = &["1.9.13", "1.10.21", "1.11.16", "1.12.22", "1.13.27"];

fn versions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/versions")
}

fn read(version: &str, file: &str) -> String {
    let p = versions_dir().join(version).join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(version: &str, file: &str) -> Value {
    serde_json::from_str(&read(version, file)).unwrap_or_else(|e| panic!("{version}/{file}: {e}"))
}

/// `(major, minor)` of a version string.
fn minor(version: &str) -> (u32, u32) {
    let mut it = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

#[test]
fn the_fixtures_cover_every_supported_release() {
    let present: BTreeSet<String> = std::fs::read_dir(versions_dir())
        .expect("fixtures/versions")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    for v in SUPPORTED {
        assert!(present.contains(*v), "no fixtures for dagster {v}");
    }
    let minors: BTreeSet<(u32, u32)> = SUPPORTED.iter().map(|v| minor(v)).collect();
    assert_eq!(
        minors,
        (9..=13).map(|m| (1, m)).collect(),
        "one release per minor line 1.9..1.13"
    );
}

#[test]
fn every_release_s_step_tasks_parse() {
    for v in SUPPORTED {
        let messages = json(v, "task_messages.json");
        let messages = messages.as_array().expect("a list of tasks");
        assert_eq!(messages.len(), 2, "{v}");
        for m in messages {
            assert_eq!(m["headers"]["task"], "execute_step_k8s_job", "{v}");
            assert_eq!(m["properties"]["content_type"], "application/json", "{v}");
            let body = m["body"]
                .as_array()
                .expect("protocol 2 body [args, kwargs, embed]");
            assert_eq!(body[0], Value::Array(vec![]), "{v}: all keyword arguments");
            let kwargs = body[1].as_object().expect("kwargs");
            let args = StepTaskArgs::from_kwargs(kwargs)
                .unwrap_or_else(|e| panic!("{v} {}: {e}", m["job"]));
            assert_eq!(args.step_key, "start", "{v}");
            assert_eq!(
                args.run_id, kwargs["execute_step_args_packed"]["pipeline_run_id"],
                "{v}"
            );
            assert_eq!(m["headers"]["id"], m["properties"]["correlation_id"], "{v}");
            assert!(!args.entry_point.is_empty(), "{v}: {:?}", args.entry_point);
            assert_eq!(args.job_namespace, "default", "{v}");
            assert_eq!(args.job_wait_timeout, Some(600.0), "{v}");
            // Every release from 1.7 on sends per_step_k8s_config (older ones omit it: parsed as {}).
            assert!(kwargs.contains_key("per_step_k8s_config"), "{v}");
            // The user-defined config keys of this release: all known to celeriac, and the ones
            // added after it (service_spec_config before 1.12) normalised to {} as from_dict does.
            let user = &kwargs["user_defined_k8s_config_dict"];
            let keys: BTreeSet<&str> = user
                .as_object()
                .expect("user config")
                .keys()
                .map(String::as_str)
                .collect();
            for k in &keys {
                assert!(
                    *k == "merge_behavior" || CONFIG_KEYS.contains(k),
                    "{v}: unknown user config key {k}"
                );
            }
            for (key, since) in CONFIG_KEYS_ADDED {
                assert_eq!(
                    keys.contains(key),
                    minor(v) >= minor(since),
                    "{v}: {key} (added in {since})"
                );
            }
            let n = normalize(user);
            assert_eq!(
                n.len(),
                CONFIG_KEYS.len() + 1,
                "{v}: every key after normalize"
            );
            if m["job"] == "diamond_sidecar" {
                assert_eq!(
                    user["pod_spec_config"]["containers"][0]["name"], "sidecar",
                    "{v}: the op's dagster-k8s/config tag travels in the task"
                );
            }
        }
    }
}

#[test]
fn every_release_s_step_events_filter_as_dagster_filters_them() {
    for v in SUPPORTED {
        let log = read(v, "step_pod.log");
        let expected = json(v, "step_events.json");
        let ours = filter_events(&log);
        let theirs = expected["serialized"]
            .as_array()
            .expect("serialized events");
        assert_eq!(ours.len(), theirs.len(), "{v}: event count");
        for (a, b) in ours.iter().zip(theirs) {
            let a: Value = serde_json::from_str(a).expect("our event is JSON");
            let b: Value = serde_json::from_str(b.as_str().unwrap_or_default()).expect("theirs");
            assert_eq!(a, b, "{v}");
        }
        let types: Vec<String> = ours
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .map(|e| {
                e["event_type_value"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(
            types,
            expected["event_types"]
                .as_array()
                .expect("types")
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>(),
            "{v}"
        );
        assert_eq!(
            types.first().map(String::as_str),
            Some("STEP_WORKER_STARTED"),
            "{v}: {types:?}"
        );
        assert_eq!(
            types.last().map(String::as_str),
            Some("STEP_SUCCESS"),
            "{v}"
        );
    }
}

#[test]
fn every_release_s_construct_dagster_k8s_job_is_matched() {
    for v in SUPPORTED {
        let cases = json(v, "job_bodies.json");
        let cases = cases.as_array().expect("cases");
        assert!(cases.len() >= 5, "{v}");
        for (i, c) in cases.iter().enumerate() {
            let case = &c["case"];
            let labels = case["labels"]
                .as_object()
                .expect("labels")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let args = case["args"]
                .as_array()
                .expect("args")
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            let got = construct_job(&JobInputs {
                job_config: case["job_config"].as_object().expect("job config"),
                args: Some(args),
                job_name: case["job_name"].as_str().unwrap_or_default(),
                pod_name: case["pod_name"].as_str(),
                component: case["component"].as_str(),
                labels,
                env_vars: case["env_vars"].as_array().cloned().unwrap_or_default(),
                user_config: case["user_config"].as_object().expect("user config"),
                // The Job's app.kubernetes.io/version label names the worker's Dagster version.
                dagster_version: v,
            })
            .unwrap_or_else(|e| panic!("{v} case {i}: {e}"));
            assert_eq!(
                &got, &c["job"],
                "{v} case {i}: {}\nceleriac: {got}\ndagster:  {}",
                case["user_config"], c["job"]
            );
        }
    }
}

#[test]
fn every_release_s_k8s_config_shapes_are_known() {
    let newest = json("1.13.27", "k8s_config.json");
    for v in SUPPORTED {
        let c = json(v, "k8s_config.json");
        // DagsterK8sJobConfig: unchanged 1.9..1.13 (security_context since 1.3). A worker builds
        // `DagsterK8sJobConfig(**job_config_dict)`, so a field added later would break older Python
        // workers, never celeriac, which reads the fields it knows.
        assert_eq!(
            c["job_config_fields"], newest["job_config_fields"],
            "{v}: DagsterK8sJobConfig fields"
        );
        for k in c["user_defined_k8s_config_keys"].as_array().expect("keys") {
            let k = k.as_str().unwrap_or_default();
            assert!(
                k == "merge_behavior" || CONFIG_KEYS.contains(&k),
                "{v}: user config key {k} unknown to celeriac"
            );
        }
    }
}
