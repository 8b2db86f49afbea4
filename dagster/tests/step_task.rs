//! The whole `execute_step_k8s_job` task against a real Dagster Postgres instance, with the process
//! launcher running a stand-in for `dagster api execute_step` (a script that prints a real pod log,
//! crashes or hangs, chosen through the per-step container env, which also exercises env plumbing).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_dagster::events::filter_events;
use celeriac_dagster::launcher::process::ProcessLauncher;
use celeriac_dagster::step::args::StepTaskArgs;
use celeriac_dagster::step::task::ExecuteStepK8sJob;
use celeriac_wire::message::TaskRequest;
use celeriac_worker::tasks::{Task, TaskContext, TaskOutcome};
use celeriac_worker::CancellationToken;
use common::{all_logs, drop_db, fixture, fixture_json, fixture_path, run_python, TestInstance};
use serde_json::{json, Map, Value};

const POD_LOG: &str = "R1-pod-dagster-step-35c1c7c2ae2f03f0faec4ed35aa0cf71-2iis0.log";

const FAKE_DAGSTER: &str = r#"#!/bin/sh
# Stand-in for `dagster api execute_step --compressed-input-json <args>`.
printf '%s' "$4" > "$FAKE_OUT"
printf '%s %s %s\n' "$1" "$DAGSTER_RUN_JOB_NAME" "$DAGSTER_RUN_STEP_KEY" >> "$FAKE_OUT.env"
echo "human log line on stderr" >&2
case "$FAKE_MODE" in
  crash) echo "dying" >&2; exit 3 ;;
  sleep) exec sleep 60 ;;
esac
cat "$FAKE_LOG"
"#;

struct Setup {
    inst: TestInstance,
    dir: std::path::PathBuf,
    script: String,
}

fn setup(runs: &[(&str, &str)]) -> Setup {
    std::env::set_var("DAGSTER_PG_PASSWORD", "unused-with-trust-auth");
    let inst = common::make_instance(runs);
    let dir = std::env::temp_dir().join(format!("{}_bin", inst.db));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("fake-dagster");
    std::fs::write(&script, FAKE_DAGSTER).expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Setup {
        script: script.display().to_string(),
        dir,
        inst,
    }
}

impl Setup {
    fn kwargs(&self, run_id: &str, mode: &str) -> Map<String, Value> {
        let mut kw = match fixture_json("step_task_kwargs.json") {
            Value::Array(mut v) => v.remove(0).as_object().cloned().expect("kwargs"),
            _ => panic!("fixture"),
        };
        let packed = &mut kw["execute_step_args_packed"];
        packed["pipeline_run_id"] = json!(run_id);
        packed["step_keys_to_execute"] = json!(["my_op"]);
        packed["instance_ref"] = self.inst.instance_ref.clone();
        packed["pipeline_origin"]["repository_origin"]["entry_point"] = json!([self.script]);
        let out = self.dir.join(format!("{run_id}.out"));
        kw.insert(
            "per_step_k8s_config".into(),
            json!({"my_op": {"container_config": {"env": [
                {"name": "FAKE_MODE", "value": mode},
                {"name": "FAKE_LOG", "value": fixture_path(POD_LOG).display().to_string()},
                {"name": "FAKE_OUT", "value": out.display().to_string()},
            ]}}}),
        );
        kw
    }

    fn out(&self, run_id: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{run_id}.out"))).unwrap_or_default()
    }
}

fn request(kwargs: Map<String, Value>) -> TaskRequest {
    TaskRequest {
        id: uuid::Uuid::new_v4().to_string(),
        task: "execute_step_k8s_job".into(),
        name: "execute_step_k8s_job".into(),
        args: vec![],
        kwargs,
        embed: json!({}),
        retries: 0,
        eta: None,
        expires: None,
        time_limit: (None, None),
        root_id: None,
        parent_id: None,
        group: None,
        argsrepr: String::new(),
        kwargsrepr: String::new(),
        origin: None,
        ignore_result: None,
        reply_to: None,
        correlation_id: String::new(),
        priority: 0,
        delivery_info: Default::default(),
        headers: Map::new(),
    }
}

fn task() -> ExecuteStepK8sJob {
    ExecuteStepK8sJob::new(Arc::new(ProcessLauncher::default()))
        .with_run_status_interval(Duration::from_millis(200))
}

fn ctx() -> TaskContext {
    TaskContext {
        hostname: "celeriac@test-host".into(),
        terminate: CancellationToken::new(),
    }
}

fn result_events(outcome: TaskOutcome) -> Vec<String> {
    match outcome {
        TaskOutcome::Success(Value::Array(v)) => v
            .into_iter()
            .map(|e| e.as_str().expect("string event").to_string())
            .collect(),
        other => panic!("expected a SUCCESS list, got {other:?}"),
    }
}

/// Every result element deserializes as a `DagsterEvent` in real dagster.
const PY_EVENTS: &str = r#"
import json, sys
from dagster import DagsterEvent
from dagster._serdes import deserialize_value
out = []
for s in json.load(sys.stdin):
    e = deserialize_value(s, DagsterEvent)
    out.append({"type": e.event_type_value, "message": e.message, "step_key": e.step_key, "job_name": e.job_name})
print(json.dumps(out))
"#;

fn messages(logs: &Value) -> Vec<String> {
    logs["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn step_succeeds_fails_and_is_skipped_like_python() {
    let s = setup(&[
        ("celeriac_job", "STARTED"),
        ("celeriac_job", "STARTED"),
        ("celeriac_job", "CANCELED"),
    ]);
    let (ok_run, crash_run, canceled_run) = (
        s.inst.run_ids[0].clone(),
        s.inst.run_ids[1].clone(),
        s.inst.run_ids[2].clone(),
    );
    let t = task();

    // Success: [E2, E3, *step events].
    let kw = s.kwargs(&ok_run, "print");
    let events = result_events(t.run(ctx(), &mut request(kw.clone())).await);
    let step_events = filter_events(&fixture(POD_LOG));
    assert_eq!(events.len(), 2 + step_events.len());
    assert_eq!(&events[2..], &step_events[..]);
    let py = run_python(PY_EVENTS, &json!(events));
    let job = celeriac_dagster::step::command::job_name(&ok_run, "my_op", 0);
    assert_eq!(py[0]["type"], json!("ENGINE_EVENT"));
    assert_eq!(
        py[0]["message"],
        json!(format!(
            "[CeleryK8sJobExecutor] Executing step \"my_op\" in Kubernetes job {job}."
        ))
    );
    assert_eq!(py[0]["job_name"], json!("celeriac_job"));
    assert_eq!(
        py[1]["message"],
        json!("[CeleryK8sJobExecutor] Retrieving logs from Kubernetes Job pods")
    );
    assert!(events[0].contains("\"marker_end\": \"celery_queue_wait\""));
    assert!(events[1].contains(&format!("\"text\": \"{job}\"")));
    // The process got the exact command argument and the Job's env.
    let args = StepTaskArgs::from_kwargs(&kw).expect("args");
    assert_eq!(s.out(&ok_run), args.compressed_input);
    let env_line =
        std::fs::read_to_string(s.dir.join(format!("{ok_run}.out.env"))).unwrap_or_default();
    assert_eq!(env_line.trim(), "api celeriac_job my_op");
    let logs = all_logs(&s.inst, &ok_run);
    let msgs = messages(&logs);
    for want in [
        "[CeleryK8sJobExecutor] Task for step my_op picked up by Celery".to_string(),
        format!("[CeleryK8sJobExecutor] Executing step \"my_op\" in Kubernetes job {job}."),
        "[CeleryK8sJobExecutor] Retrieving logs from Kubernetes Job pods".to_string(),
    ] {
        assert!(msgs.contains(&want), "{want} not in {msgs:?}");
    }

    // Crash: [E2, STEP_FAILURE, E3].
    let events = result_events(
        t.run(ctx(), &mut request(s.kwargs(&crash_run, "crash")))
            .await,
    );
    let py = run_python(PY_EVENTS, &json!(events));
    let types: Vec<&str> = py
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(types, ["ENGINE_EVENT", "STEP_FAILURE", "ENGINE_EVENT"]);
    assert!(
        events[1].contains("\"label\": \"K8sError\"") && events[1].contains("exited with code 3"),
        "{}",
        events[1]
    );
    let logs = all_logs(&s.inst, &crash_run);
    let failure = logs["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["event_type"] == json!("STEP_FAILURE"))
        .cloned();
    let failure = failure.expect("stored STEP_FAILURE");
    assert_eq!(failure["level"], json!(40));
    assert!(
        failure["user_message"]
            .as_str()
            .is_some_and(|m| m.contains("exited with code 3")),
        "{failure}"
    );

    // Run not STARTED: [] and "Not scheduling…" stored; the step never ran.
    let events = result_events(
        t.run(ctx(), &mut request(s.kwargs(&canceled_run, "print")))
            .await,
    );
    assert!(events.is_empty());
    assert!(s.out(&canceled_run).is_empty());
    let msgs = messages(&all_logs(&s.inst, &canceled_run));
    assert!(
        msgs.contains(
            &"[CeleryK8sJobExecutor] Not scheduling step because dagster run status is not STARTED"
                .to_string()
        ),
        "{msgs:?}"
    );

    // Unknown run: CheckError FAILURE.
    match t
        .run(
            ctx(),
            &mut request(s.kwargs("11111111-2222-3333-4444-555555555555", "print")),
        )
        .await
    {
        TaskOutcome::Failure { exc, traceback } => {
            assert_eq!(
                (exc.exc_type.as_str(), exc.exc_module.as_str()),
                ("CheckError", "dagster._check")
            );
            assert_eq!(
                exc.exc_message,
                vec![json!(
                    "Could not load run 11111111-2222-3333-4444-555555555555"
                )]
            );
            assert!(traceback.unwrap_or_default().contains("CheckError"));
        }
        other => panic!("{other:?}"),
    }

    // Bad kwargs: TypeError naming the kwarg.
    let mut kw = s.kwargs(&ok_run, "print");
    kw.remove("load_incluster_config");
    match t.run(ctx(), &mut request(kw)).await {
        TaskOutcome::Failure { exc, .. } => {
            assert_eq!(exc.exc_type, "TypeError");
            assert!(exc.exc_message[0]
                .as_str()
                .is_some_and(|m| m.contains("load_incluster_config")));
        }
        other => panic!("{other:?}"),
    }
    drop(t);
    drop_db(&s.inst.db).await;
}

#[tokio::test]
async fn revoke_and_run_leaving_started_stop_the_step() {
    let s = setup(&[("celeriac_job", "STARTED"), ("celeriac_job", "STARTED")]);
    let (revoked_run, canceled_run) = (s.inst.run_ids[0].clone(), s.inst.run_ids[1].clone());
    let t = task();

    // terminate=True revoke: the process is killed, the task is REVOKED.
    let c = ctx();
    let cancel = c.terminate.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cancel.cancel();
    });
    let started = Instant::now();
    let outcome = t
        .run(c, &mut request(s.kwargs(&revoked_run, "sleep")))
        .await;
    assert!(matches!(outcome, TaskOutcome::Terminated), "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // The run is canceled while its step runs: the step is stopped, [] returned, the event stored.
    let (admin, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 user=postgres dbname={}", s.inst.db),
        tokio_postgres::NoTls,
    )
    .await
    .expect("admin");
    tokio::spawn(conn);
    let id = canceled_run.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        admin
            .execute(
                "UPDATE runs SET status = 'CANCELING' WHERE run_id = $1",
                &[&id],
            )
            .await
            .expect("update");
    });
    let started = Instant::now();
    let events = result_events(
        t.run(ctx(), &mut request(s.kwargs(&canceled_run, "sleep")))
            .await,
    );
    assert!(events.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let _ = canceller.await;
    let msgs = messages(&all_logs(&s.inst, &canceled_run));
    assert!(msgs.contains(&"[CeleryK8sJobExecutor] Terminating Kubernetes Job because dagster run status is not STARTED".to_string()), "{msgs:?}");
    drop(t);
    drop_db(&s.inst.db).await;
}
