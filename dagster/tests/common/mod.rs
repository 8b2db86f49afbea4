//! Helpers shared by the integration tests (`mod common;`): fixtures, the venv Python with real
//! Dagster, and a fresh Dagster Postgres instance per test.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dagster")
        .join(name)
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The Python with dagster 1.13.27 installed (`$CELERIAC_PYTHON`, else the shared venv).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CELERIAC_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = PathBuf::from(home).join(".cache/celeriac/venv/bin/python");
    assert!(
        p.exists(),
        "no Python with Dagster at {} (set CELERIAC_PYTHON)",
        p.display()
    );
    p
}

/// Runs `script` with the venv Python, `input` as JSON on stdin; returns its stdout parsed as JSON.
pub fn run_python(script: &str, input: &Value) -> Value {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(script)
        .env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let data = serde_json::to_vec(input).expect("json");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&data)
        .expect("write stdin");
    let out = child.wait_with_output().expect("python output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("python output is not JSON ({e}): {stdout}"))
}

/// Creates a fresh database with Dagster's schema (real dagster-postgres) and runs in it.
/// Input: `{"runs": [{"job_name": .., "status": "STARTED"|..}]}`.
/// Output: `{"db", "instance_ref" (packed InstanceRef), "run_yaml", "event_yaml", "run_ids": [..]}`.
const MAKE_INSTANCE: &str = r#"
import json, os, sys, tempfile, uuid
import psycopg2, yaml
req = json.load(sys.stdin)
db = "celeriac_t_" + uuid.uuid4().hex[:10]
conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
conn.autocommit = True
conn.cursor().execute(f'CREATE DATABASE "{db}"')
conn.close()
home = tempfile.mkdtemp(prefix=db + "_")
pg = {"username": "postgres", "password": {"env": "DAGSTER_PG_PASSWORD"}, "hostname": "127.0.0.1", "db_name": db, "port": 5432}
with open(os.path.join(home, "dagster.yaml"), "w") as f:
    yaml.safe_dump({"storage": {"postgres": {"postgres_db": pg}}, "telemetry": {"enabled": False}}, f)
from dagster import DagsterInstance
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._serdes import pack_value
instance = DagsterInstance.from_config(home)
run_ids = []
for r in req.get("runs", []):
    run = DagsterRun(job_name=r["job_name"], run_id=str(uuid.uuid4()), status=DagsterRunStatus[r["status"]])
    instance.add_run(run)
    run_ids.append(run.run_id)
ref = instance.get_ref()
print(json.dumps({"db": db, "home": home, "instance_ref": pack_value(ref), "run_ids": run_ids,
                  "run_yaml": ref.run_storage_data.config_yaml, "event_yaml": ref.event_storage_data.config_yaml}))
"#;

pub struct TestInstance {
    pub db: String,
    pub home: String,
    pub instance_ref: Value,
    pub run_yaml: String,
    pub event_yaml: String,
    pub run_ids: Vec<String>,
}

pub fn make_instance(runs: &[(&str, &str)]) -> TestInstance {
    let runs: Vec<Value> = runs
        .iter()
        .map(|(j, s)| serde_json::json!({"job_name": j, "status": s}))
        .collect();
    let out = run_python(MAKE_INSTANCE, &serde_json::json!({ "runs": runs }));
    let s = |k: &str| {
        out[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} in {out}"))
            .to_string()
    };
    TestInstance {
        db: s("db"),
        home: s("home"),
        run_yaml: s("run_yaml"),
        event_yaml: s("event_yaml"),
        instance_ref: out["instance_ref"].clone(),
        run_ids: out["run_ids"]
            .as_array()
            .expect("run_ids")
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
    }
}

/// Reads a run's event log back through real Dagster (`instance.all_logs`).
const ALL_LOGS: &str = r#"
import json, sys
from dagster import DagsterInstance
req = json.load(sys.stdin)
instance = DagsterInstance.from_config(req["home"])
out = []
for e in instance.all_logs(req["run_id"]):
    de = e.dagster_event
    out.append({"level": e.level, "user_message": e.user_message, "step_key": e.step_key, "job_name": e.job_name,
                "timestamp": e.timestamp, "event_type": de.event_type_value if de else None,
                "message": de.message if de else None})
status = instance.get_run_by_id(req["run_id"]).status.value
print(json.dumps({"events": out, "status": status}))
"#;

pub fn all_logs(inst: &TestInstance, run_id: &str) -> Value {
    run_python(
        ALL_LOGS,
        &serde_json::json!({"home": inst.home, "run_id": run_id}),
    )
}

/// Drops the test database (best effort).
pub async fn drop_db(db: &str) {
    if let Ok((client, conn)) = tokio_postgres::connect(
        "host=127.0.0.1 user=postgres dbname=postgres",
        tokio_postgres::NoTls,
    )
    .await
    {
        tokio::spawn(conn);
        let _ = client
            .execute(
                &format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
                &[],
            )
            .await;
    }
}
