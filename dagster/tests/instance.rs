//! The Postgres bridge against a real Dagster schema (created by dagster-postgres 0.29.27): reading
//! runs, writing events real Dagster reads back, `NOTIFY run_events`, connection caching and redaction.

mod common;

use std::time::Duration;

use celeriac_dagster::events::{engine_event, step_failure, ErrorInfo, Meta, StepRef};
use celeriac_dagster::instance::{InstanceError, Instances};
use common::{all_logs, drop_db, make_instance};
use futures::StreamExt;
use serde_json::json;

fn set_pg_password() {
    std::env::set_var("DAGSTER_PG_PASSWORD", "unused-with-trust-auth");
}

#[tokio::test]
async fn reads_runs_and_writes_events_dagster_reads_back() {
    set_pg_password();
    let inst = make_instance(&[("celeriac_job", "STARTED"), ("other_job", "CANCELED")]);
    let (started, queued) = (inst.run_ids[0].clone(), inst.run_ids[1].clone());

    let instances = Instances::default();
    let instance = instances
        .open(Some(&inst.run_yaml), Some(&inst.event_yaml))
        .await
        .expect("open");
    let run = instance
        .get_run(&started)
        .await
        .expect("query")
        .expect("run exists");
    assert_eq!(run.status, "STARTED");
    assert_eq!(run.job_name, "celeriac_job");
    assert_eq!(run.location_name, None);
    assert_eq!(
        instance
            .get_run(&queued)
            .await
            .expect("query")
            .map(|r| r.status),
        Some("CANCELED".to_string())
    );
    assert!(instance
        .get_run("00000000-0000-0000-0000-000000000000")
        .await
        .expect("query")
        .is_none());

    // Same storage config for runs and events, opened twice, one query at a time: one pooled
    // connection (a quiet worker opens no more).
    let again = instances
        .open(Some(&inst.run_yaml), Some(&inst.event_yaml))
        .await
        .expect("open again");
    assert_eq!(instances.cached().await, 1);

    // Listen for NOTIFY run_events on a separate connection.
    let (listener, mut conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 user=postgres dbname={}", inst.db),
        tokio_postgres::NoTls,
    )
    .await
    .expect("listener");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener
        .batch_execute("LISTEN run_events")
        .await
        .expect("listen");

    let step = StepRef {
        run_id: &started,
        job_name: "celeriac_job",
        step_key: "my_op",
    };
    let e1 = engine_event(
        &step,
        "Task for step my_op picked up by Celery",
        &[
            ("Celery worker name", Meta::Text("celeriac@test".into())),
            ("Celery worker Kubernetes Pod name", Meta::Null),
        ],
        None,
        None,
    );
    let id = again.report(&started, &e1).await.expect("report");
    let (channel, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notified in time")
        .expect("notification");
    assert_eq!(channel, "run_events");
    assert_eq!(payload, format!("{started}_{id}"));

    let err = ErrorInfo::new(
        "celeriac.launcher",
        "StepProcessError",
        "exited with code 3",
    );
    let failure = step_failure(&step, &err, "exited with code 3");
    let id2 = instance
        .report(&started, &failure)
        .await
        .expect("report failure");
    assert!(id2 > id);

    // The row's columns are what dagster-postgres writes.
    let row = listener
        .query_one("SELECT dagster_event_type, step_key, timestamp, asset_key, partition FROM event_logs WHERE id = $1", &[&id])
        .await
        .expect("row");
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("ENGINE_EVENT")
    );
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("my_op"));
    let ts: chrono::NaiveDateTime = row.get(2);
    assert!((ts.and_utc().timestamp_micros() as f64 / 1e6 - e1.timestamp()).abs() < 1e-3);
    assert_eq!(row.get::<_, Option<String>>(3), None);

    // Real dagster reads both back.
    let logs = all_logs(&inst, &started);
    let events = logs["events"].as_array().expect("events");
    let ours: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["step_key"] == json!("my_op"))
        .collect();
    assert_eq!(ours.len(), 2, "{logs}");
    assert_eq!(ours[0]["event_type"], json!("ENGINE_EVENT"));
    assert_eq!(
        ours[0]["message"],
        json!("[CeleryK8sJobExecutor] Task for step my_op picked up by Celery")
    );
    assert_eq!(ours[0]["level"], json!(20));
    assert_eq!(ours[0]["job_name"], json!("celeriac_job"));
    assert_eq!(ours[1]["event_type"], json!("STEP_FAILURE"));
    assert_eq!(ours[1]["user_message"], json!("exited with code 3"));
    assert_eq!(ours[1]["level"], json!(40));
    // Engine events do not change the run.
    assert_eq!(logs["status"], json!("STARTED"));

    drop(listener);
    drop((instance, again, instances));
    drop_db(&inst.db).await;
}

#[tokio::test]
async fn connection_errors_name_the_database_not_the_password() {
    std::env::set_var("CELERIAC_T_SECRET_PW", "hunter2-secret");
    let yaml = "postgres_db:\n  db_name: nowhere_db\n  hostname: 127.0.0.1\n  password:\n    env: CELERIAC_T_SECRET_PW\n  port: 1\n  username: someone\n";
    let err = match Instances::default().open(Some(yaml), None).await {
        Err(e) => e,
        Ok(_) => panic!("port 1 accepted a connection"),
    };
    let text = err.to_string();
    assert!(matches!(err, InstanceError::Connect { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1:1/nowhere_db") && text.contains("someone"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    let url_yaml = "postgres_url: postgresql://someone:hunter2-secret@127.0.0.1:1/nowhere_db\n";
    let text = match Instances::default().open(Some(url_yaml), None).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("port 1 accepted a connection"),
    };
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("nowhere_db"), "{text}");

    let missing = "postgres_db:\n  db_name: d\n  password:\n    env: CELERIAC_T_NOT_SET_ANYWHERE\n";
    assert!(
        matches!(Instances::default().open(Some(missing), None).await, Err(InstanceError::MissingEnv(v)) if v == "CELERIAC_T_NOT_SET_ANYWHERE")
    );
}

#[tokio::test]
async fn reconnects_after_the_server_closed_the_connection() {
    set_pg_password();
    let inst = make_instance(&[("celeriac_job", "STARTED")]);
    let instances = Instances::default();
    let instance = instances
        .open(Some(&inst.run_yaml), Some(&inst.event_yaml))
        .await
        .expect("open");
    assert!(instance
        .get_run(&inst.run_ids[0])
        .await
        .expect("query")
        .is_some());
    // Kill our backend from another session.
    let (admin, conn) = tokio_postgres::connect(
        "host=127.0.0.1 user=postgres dbname=postgres",
        tokio_postgres::NoTls,
    )
    .await
    .expect("admin");
    tokio::spawn(conn);
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", &[&inst.db])
        .await
        .expect("terminate");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let run = instance
        .get_run(&inst.run_ids[0])
        .await
        .expect("query after reconnect");
    assert_eq!(run.map(|r| r.status), Some("STARTED".to_string()));
    drop((instance, instances));
    drop_db(&inst.db).await;
}
