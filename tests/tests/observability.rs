//! Celery events, remote control and metrics, checked with the real Python tools operators use:
//! the `celery` CLI (inspect / control / events), Flower 2.2 and the Dagster chart's liveness probe
//! (`dagster-celery status … | grep "${HOSTNAME}:.*OK"`), on RabbitMQ and on Redis.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::{
    artifacts_dir, celeriac_bin, ensure_services, http_get, run_python, unique, venv_bin,
    WorkerProcess,
};
use serde_json::Value;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS: &str = "redis://127.0.0.1:6379/11";

/// `celery -b <broker> <args…>` from the venv; returns stdout.
fn celery(broker: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(venv_bin().join("celery"));
    cmd.args(["-b", broker]).args(args);
    celeriac_tests::run_with_timeout(cmd, Duration::from_secs(60))
        .with_context(|| format!("celery {args:?}"))
}

/// The `{node: reply}` object of a `--json` inspect/control call for `node`.
fn reply_of(stdout: &str, node: &str) -> Result<Value> {
    for line in stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(['{', '[']))
    {
        let v: Value = serde_json::from_str(line.trim())?;
        let candidates = match v {
            Value::Array(items) => items,
            other => vec![other],
        };
        for c in candidates {
            if let Some(r) = c.get(node) {
                return Ok(r.clone());
            }
        }
    }
    bail!("no reply from {node} in: {stdout}")
}

/// An HTTP request from Python's urllib (the tests carry no HTTP client of their own): (status, body).
/// `celery inspect <cmd> -d <node> --json`: the node's reply.
fn inspect_node(broker: &str, node: &str, cmd: &str) -> Result<Value> {
    reply_of(
        &celery(
            broker,
            &["inspect", cmd, "-d", node, "--json", "--timeout", "5"],
        )?,
        node,
    )
}

fn http_post(url: &str) -> Result<(u16, String)> {
    celeriac_tests::http("POST", url, None, None)
}

struct Background(Child);
impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn inspect_and_control(broker: &str) -> Result<()> {
    ensure_services();
    let queue = unique("obs");
    let mut worker = WorkerProcess::consuming(broker, "rpc://", &queue, &["-c", "2", "-E"])?;
    let node = worker.hostname.clone();
    let d = ["-d", node.as_str(), "--json", "--timeout", "5"];
    let inspect = |cmd: &str| -> Result<Value> {
        let mut args = vec!["inspect", cmd];
        args.extend_from_slice(&d);
        reply_of(&celery(broker, &args)?, &node)
    };
    assert_eq!(inspect("ping")?, serde_json::json!({"ok": "pong"}));
    let stats = inspect("stats")?;
    assert!(
        stats["total"].is_object() && stats["broker"].is_object() && stats["pool"].is_object(),
        "{stats}"
    );
    assert_eq!(stats["pool"]["max-concurrency"], 2, "{stats}");
    assert!(
        stats["rusage"]["maxrss"].as_i64().unwrap_or(0) > 0,
        "{stats}"
    );
    assert_eq!(inspect("active")?, serde_json::json!([]));
    assert_eq!(inspect("reserved")?, serde_json::json!([]));
    let registered = inspect("registered")?;
    assert!(
        registered
            .as_array()
            .is_some_and(|r| r.iter().any(|t| t == "execute_step_k8s_job")),
        "{registered}"
    );
    let queues = inspect("active_queues")?;
    assert_eq!(queues[0]["name"], queue.as_str(), "{queues}");
    assert_eq!(queues[0]["queue_arguments"]["x-max-priority"], 10);
    let conf = inspect("conf")?;
    assert!(
        conf["broker_url"]
            .as_str()
            .is_some_and(|u| !u.contains("guest:guest")),
        "password redacted: {conf}"
    );

    let extra = unique("obs_extra");
    let control = |args: &[&str]| -> Result<Value> {
        let mut all = vec!["control"];
        all.extend_from_slice(args);
        all.extend_from_slice(&d);
        reply_of(&celery(broker, &all)?, &node)
    };
    assert_eq!(
        control(&["add_consumer", &extra])?,
        serde_json::json!({"ok": format!("add consumer {extra}")})
    );
    let names: Vec<String> = inspect("active_queues")?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|q| q["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(names.contains(&extra), "{names:?}");
    assert_eq!(
        control(&["cancel_consumer", &extra])?,
        serde_json::json!({"ok": format!("no longer consuming from {extra}")})
    );
    let revoked_id = uuid_like();
    assert_eq!(
        control(&["revoke", &revoked_id])?,
        serde_json::json!({"ok": format!("tasks {{'{revoked_id}'}} flagged as revoked")})
    );
    assert!(inspect("revoked")?
        .as_array()
        .is_some_and(|r| r.iter().any(|i| i == revoked_id.as_str())));
    let grown = control(&["pool_grow", "1"])?;
    assert_eq!(grown, serde_json::json!({"ok": "pool will grow"}));
    assert_eq!(inspect("stats")?["pool"]["max-concurrency"], 3);
    assert!(
        control(&["rate_limit", "execute_step_k8s_job", "10/m"])?["error"]
            .as_str()
            .is_some_and(|e| e.contains("not supported"))
    );

    // The shutdown command stops the worker warmly. Like Python workers, celeriac sends no reply, so the
    // CLI itself reports "No nodes replied" and exits non-zero: only the worker's exit matters here.
    let _ = celery(broker, &["control", "shutdown", "-d", &node]);
    let status = worker.wait(Duration::from_secs(30))?;
    assert!(status.success(), "{status}");
    Ok(())
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn liveness_probe(broker: &str) -> Result<()> {
    ensure_services();
    let queue = unique("probe");
    let worker = WorkerProcess::start(&["-b", broker, "-Q", &queue], &[])?;
    let dir = artifacts_dir().join(unique("probe"));
    std::fs::create_dir_all(&dir)?;
    let shim = dir.join("dagster-celery");
    std::os::unix::fs::symlink(celeriac_bin(), &shim)?;
    let yaml = dir.join("celery-config.yaml");
    std::fs::write(&yaml, "execution:\n  celery:\n    broker:\n      env: DAGSTER_CELERY_BROKER_URL\n    backend: rpc://\n    config_source: {}\n")?;
    let host = worker
        .hostname
        .split('@')
        .nth(1)
        .unwrap_or("localhost")
        .to_string();
    let probe = format!(
        "dagster-celery status -A dagster_celery_k8s.app -y {} | grep \"${{HOSTNAME}}:.*OK\"",
        yaml.display()
    );
    let run_probe = || -> Result<std::process::ExitStatus> {
        Ok(Command::new("/bin/sh")
            .args(["-c", &probe])
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("HOSTNAME", &host)
            .env("DAGSTER_CELERY_BROKER_URL", broker)
            .stdout(Stdio::null())
            .status()?)
    };
    assert!(
        run_probe()?.success(),
        "liveness probe passes for a healthy worker"
    );
    drop(worker); // SIGKILL
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !run_probe()?.success(),
        "liveness probe fails once the worker is gone"
    );
    Ok(())
}

fn events_flower_metrics(broker: &str, backend: &str) -> Result<()> {
    ensure_services();
    let queue = unique("flw");
    let dump_path = artifacts_dir().join(format!("{queue}.events"));
    let dump = Background(
        Command::new(venv_bin().join("celery"))
            .args(["-b", broker, "events", "--dump"])
            .stdout(std::fs::File::create(&dump_path)?)
            .stderr(Stdio::null())
            .spawn()?,
    );
    let port = celeriac_tests::free_port()?;
    let flower = Background(
        Command::new(venv_bin().join("celery"))
            .args([
                "-b",
                broker,
                "--result-backend",
                backend,
                "flower",
                &format!("--port={port}"),
                "--address=127.0.0.1",
            ])
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                artifacts_dir().join(format!("{queue}.flower.log")),
            )?)
            .spawn()?,
    );
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while http_get(&format!("{base}/healthcheck"))
        .map(|r| r.0)
        .unwrap_or(0)
        != 200
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("flower did not start");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let worker = WorkerProcess::consuming(broker, backend, &queue, &["-c", "3", "-E"])?;
    let node = worker.hostname.clone();
    let online_at = Instant::now();
    loop {
        let (_, body) = http_get(&format!("{base}/api/workers?status=true"))?;
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        if v.get(&node) == Some(&Value::Bool(true)) {
            break;
        }
        if online_at.elapsed() > Duration::from_secs(5) {
            bail!("flower does not show {node} online within 5 s: {body}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // A real Dagster run through the worker: its steps appear in Flower, `celery events` and /metrics.
    let home = DagsterHome::create(broker, backend)?;
    let summary = home.run_job(
        "diamond",
        Duration::from_secs(240),
        &[("CELERIAC_QUEUE", &queue)],
    )?;
    assert_eq!(summary.status, "SUCCESS", "{summary:#?}");
    std::thread::sleep(Duration::from_secs(3));

    let (code, body) = http_get(&format!("{base}/api/tasks?limit=100"))?;
    assert_eq!(code, 200, "{body}");
    let tasks: Value = serde_json::from_str(&body)?;
    let steps: Vec<&Value> = tasks
        .as_object()
        .map(|m| {
            m.values()
                .filter(|t| t["name"] == "execute_step_k8s_job")
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(steps.len(), 6, "six step tasks in Flower: {body}");
    for t in &steps {
        assert_eq!(t["state"], "SUCCESS", "{t}");
        assert_eq!(t["worker"], node.as_str(), "{t}");
        assert!(t["runtime"].as_f64().is_some_and(|r| r > 0.0), "{t}");
    }
    let (code, page) = http_get(&format!("{base}/worker/{node}"))?;
    assert_eq!(code, 200, "worker page: {page}");
    assert!(
        page.contains(&queue) && page.contains("execute_step_k8s_job"),
        "worker page shows queues and registered tasks"
    );
    let (code, body) = http_post(&format!("{base}/api/worker/pool/grow/{node}?n=2"))?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        inspect_node(broker, &node, "stats")?["pool"]["max-concurrency"],
        5,
        "Flower's pool grow took effect"
    );
    let (code, body) = http_post(&format!(
        "{base}/api/worker/queue/add-consumer/{node}?queue={queue}_x"
    ))?;
    assert_eq!(code, 200, "{body}");
    let aq = inspect_node(broker, &node, "active_queues")?;
    assert!(
        aq.to_string().contains(&format!("{queue}_x")),
        "Flower's add-consumer took effect: {aq}"
    );
    let (code, body) = http_post(&format!(
        "{base}/api/worker/queue/cancel-consumer/{node}?queue={queue}_x"
    ))?;
    assert_eq!(code, 200, "{body}");
    let aq = inspect_node(broker, &node, "active_queues")?;
    assert!(
        !aq.to_string().contains(&format!("{queue}_x")),
        "Flower's cancel-consumer took effect: {aq}"
    );
    let (code, body) = http_post(&format!("{base}/api/worker/pool/shrink/{node}?n=1"))?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        inspect_node(broker, &node, "stats")?["pool"]["max-concurrency"],
        4,
        "Flower's pool shrink took effect"
    );
    let revoke_id = uuid_like();
    let (code, body) = http_post(&format!("{base}/api/task/revoke/{revoke_id}"))?;
    assert_eq!(code, 200, "{body}");
    let revoked = inspect_node(broker, &node, "revoked")?;
    assert!(revoked.to_string().contains(&revoke_id), "{revoked}");

    // `celery events --dump` saw each step's lifecycle.
    let events = std::fs::read_to_string(&dump_path)?;
    // The dumper's words: `task received: execute_step_k8s_job(<id>)`, `heartbeat:` for worker-heartbeat.
    for kind in [
        "task received: execute_step_k8s_job(",
        "task started: execute_step_k8s_job(",
        "task succeeded: execute_step_k8s_job(",
        "] heartbeat:",
    ] {
        assert!(
            events.contains(kind),
            "events --dump shows {kind:?}:\n{events}"
        );
    }
    assert!(events.contains(&node), "{events}");

    // /metrics parses with the Prometheus text parser and counts the six steps.
    let addr = worker.http_addr().context("worker HTTP address")?;
    let parse = r#"
import sys, json, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
out = {}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
"#;
    let metrics: Value = serde_json::from_str(
        run_python(
            &["-c", parse, &format!("http://{addr}/metrics")],
            &[],
            Duration::from_secs(30),
        )?
        .trim(),
    )?;
    let sum = |name: &str| -> f64 {
        metrics[name]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter(|x| x[0]["name"] == "execute_step_k8s_job")
                    .filter_map(|x| x[1].as_f64())
                    .sum()
            })
            .unwrap_or(0.0)
    };
    assert_eq!(sum("celery_task_received_total"), 6.0);
    assert_eq!(sum("celery_task_succeeded_total"), 6.0);
    assert_eq!(sum("celery_task_runtime_count"), 6.0);
    // Every metric the celery-mixin dashboards and alerts query (anchors.md §5.2) that a worker exports.
    for name in [
        "celery_task_received_total",
        "celery_task_started_total",
        "celery_task_succeeded_total",
        "celery_task_failed_total",
        "celery_task_rejected_total",
        "celery_task_revoked_total",
        "celery_task_retried_total",
        "celery_task_runtime_bucket",
        "celery_task_runtime_count",
        "celery_task_runtime_sum",
        "celery_worker_up",
        "celery_worker_tasks_active",
        "celery_queue_length",
        "celeriac_queue_backlog",
        "celeriac_queue_in_flight",
        "celeriac_queue_free_slots",
    ] {
        assert!(
            metrics.get(name).is_some(),
            "/metrics has {name}: {metrics}"
        );
    }
    // Shutdown through Flower stops the worker warmly, and Flower then shows it offline.
    let (code, body) = http_post(&format!("{base}/api/worker/shutdown/{node}"))?;
    assert_eq!(code, 200, "{body}");
    let mut worker = worker;
    assert!(worker.wait(Duration::from_secs(30))?.success());
    let (_, body) = http_get(&format!("{base}/api/workers?status=true"))?;
    assert_eq!(
        serde_json::from_str::<Value>(&body)?.get(&node),
        Some(&Value::Bool(false)),
        "{body}"
    );
    drop(flower);
    drop(dump);
    Ok(())
}

#[test]
fn celery_cli_inspects_and_controls_celeriac_on_rabbitmq() -> Result<()> {
    inspect_and_control(AMQP)
}

#[test]
fn celery_cli_inspects_and_controls_celeriac_on_redis() -> Result<()> {
    inspect_and_control(REDIS)
}

#[test]
fn dagster_chart_liveness_probe_on_rabbitmq() -> Result<()> {
    liveness_probe(AMQP)
}

#[test]
fn dagster_chart_liveness_probe_on_redis() -> Result<()> {
    liveness_probe(REDIS)
}

#[test]
fn flower_events_and_metrics_see_a_dagster_run_on_rabbitmq() -> Result<()> {
    events_flower_metrics(AMQP, "rpc://")
}

#[test]
fn flower_events_and_metrics_see_a_dagster_run_on_redis() -> Result<()> {
    events_flower_metrics(REDIS, REDIS)
}
