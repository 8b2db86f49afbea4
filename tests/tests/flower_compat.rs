//! flower-compat (`celeriac flower`) against the real thing: the same traffic — a Python Celery worker and
//! a celeriac worker — observed by real Flower 2.2 and by flower-compat, every API endpoint compared
//! (keys, value types, task states); history kept across a restart (Redis and PostgreSQL); basic auth and
//! read-only mode; the dashboard driven by Debian's Chromium over the DevTools protocol.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celeriac_tests::{
    artifacts_dir, broker_backlog, celeriac_bin, ensure_services, peer, run_python, tail, unique,
    venv_bin, wait_until, WorkerProcess,
};
use serde_json::{json, Value};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS_CONTRACT: &str = "redis://127.0.0.1:6379/12";
const REDIS_RESTART: &str = "redis://127.0.0.1:6379/13";
const REDIS_MISC: &str = "redis://127.0.0.1:6379/14";
const POSTGRES: &str = "postgresql://postgres@127.0.0.1:5432/postgres";

// ------------------------------------------------------------------------------------------------
// HTTP: a minimal HTTP/1.1 client (the tests carry no HTTP client crate).

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

fn http(method: &str, url: &str, body: Option<&str>, auth: Option<&str>) -> Result<Reply> {
    let (status, body) = celeriac_tests::http(method, url, body, auth)?;
    Ok(Reply { status, body })
}

fn get(url: &str) -> Result<Reply> {
    http("GET", url, None, None)
}

fn post(url: &str, body: Option<&str>) -> Result<Reply> {
    http("POST", url, body, None)
}

// ------------------------------------------------------------------------------------------------
// Processes.

/// A child process killed (and reaped) on drop, with its log in the artifacts directory.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log_name: &str) -> Result<Proc> {
        let log = artifacts_dir().join(log_name);
        let file = std::fs::File::create(&log)?;
        cmd.stdout(file.try_clone()?).stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {log_name}"))?;
        Ok(Proc {
            child: Some(child),
            log,
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while !self.log_text().contains(needle) {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "{} exited ({status}) before {needle:?}:\n{}",
                        self.log.display(),
                        tail(&self.log, 40)
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "no {needle:?} in {} within {timeout:?}:\n{}",
                    self.log.display(),
                    tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit.
    fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("already stopped")
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("did not exit within {timeout:?}:\n{}", tail(&self.log, 40));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            bail!("already stopped")
        };
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait()? {
                self.child = None;
                return Ok(s);
            }
            if start.elapsed() > timeout {
                bail!("did not exit within {timeout:?}:\n{}", tail(&self.log, 40));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `celeriac flower` on a free port.
struct FlowerCompat {
    proc: Proc,
    base: String,
    args: Vec<String>,
    tag: String,
}

impl FlowerCompat {
    fn start(broker: &str, backend: &str, extra: &[&str]) -> Result<FlowerCompat> {
        let mut args: Vec<String> = vec![
            "-b".into(),
            broker.into(),
            "--result-backend".into(),
            backend.into(),
            "--address".into(),
            "127.0.0.1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        FlowerCompat::launch(args, unique("flower_compat"))
    }

    fn launch(args: Vec<String>, tag: String) -> Result<FlowerCompat> {
        let port = celeriac_tests::free_port()?;
        let mut cmd = Command::new(celeriac_bin());
        cmd.arg("flower")
            .args(&args)
            .args(["--port", &port.to_string()])
            .env("RUST_LOG", "info,celeriac_flower=debug");
        let log = format!("{tag}.{}.log", unique("run"));
        let mut proc = Proc::spawn(cmd, &log)?;
        proc.wait_for_log("flower-compat listening", Duration::from_secs(30))?;
        let prefix = args
            .iter()
            .position(|a| a == "--url-prefix")
            .and_then(|i| args.get(i + 1))
            .map(|p| format!("/{}", p.trim_matches('/')))
            .unwrap_or_default();
        let base = format!("http://127.0.0.1:{port}{prefix}");
        wait_until(
            "flower-compat /healthcheck",
            Duration::from_secs(20),
            || Ok((get(&format!("{base}/healthcheck"))?.status == 200).then_some(())),
        )?;
        Ok(FlowerCompat {
            proc,
            base,
            args,
            tag,
        })
    }

    /// SIGTERM, then the same command line again (a new port).
    fn restart(self, override_args: &[&str]) -> Result<FlowerCompat> {
        let FlowerCompat {
            mut proc,
            mut args,
            tag,
            ..
        } = self;
        let status = proc.terminate(Duration::from_secs(30))?;
        assert!(status.success(), "flower-compat exits cleanly: {status}");
        for pair in override_args.chunks(2) {
            if let [k, v] = pair {
                match args.iter().position(|a| a == k) {
                    Some(i) => args[i + 1] = v.to_string(),
                    None => args.extend([k.to_string(), v.to_string()]),
                }
            }
        }
        FlowerCompat::launch(args, tag)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Real Flower 2.2 (`celery -A flower_tasks flower`), API open without auth as the test needs.
fn real_flower(broker: &str, backend: &str) -> Result<(Proc, String)> {
    let port = celeriac_tests::free_port()?;
    let mut cmd = Command::new(venv_bin().join("celery"));
    cmd.args([
        "-A",
        "flower_tasks",
        "-b",
        broker,
        "--result-backend",
        backend,
    ])
    .args(["flower", &format!("--port={port}"), "--address=127.0.0.1"])
    .env("FLOWER_UNAUTHENTICATED_API", "true")
    .env("PYTHONPATH", peer(""))
    .env("FT_BROKER", broker)
    .env("FT_BACKEND", backend);
    let proc = Proc::spawn(cmd, &format!("{}.log", unique("real_flower")))?;
    let base = format!("http://127.0.0.1:{port}");
    wait_until("real Flower /healthcheck", Duration::from_secs(60), || {
        Ok(get(&format!("{base}/healthcheck"))
            .map(|r| r.status == 200)
            .unwrap_or(false)
            .then_some(()))
    })?;
    Ok((proc, base))
}

/// A Python Celery worker (`flower_tasks`, threads pool) with events on.
fn python_worker(
    broker: &str,
    backend: &str,
    queue: &str,
    concurrency: u32,
) -> Result<(Proc, String)> {
    let name = format!("{}@localhost", unique("py"));
    let mut cmd = Command::new(venv_bin().join("celery"));
    cmd.args([
        "-A",
        "flower_tasks",
        "worker",
        "-Q",
        queue,
        "-n",
        &name,
        "-E",
        "-P",
        "threads",
    ])
    .args([
        "-c",
        &concurrency.to_string(),
        "--without-mingle",
        "--without-gossip",
        "-l",
        "info",
    ])
    .env("PYTHONPATH", peer(""))
    .env("FT_BROKER", broker)
    .env("FT_BACKEND", backend)
    .stdin(Stdio::null());
    let mut proc = Proc::spawn(cmd, &format!("{}.log", name.replace('@', "_")))?;
    proc.wait_for_log("ready.", Duration::from_secs(60))?;
    Ok((proc, name))
}

/// Publishes with the real Celery client; returns the task ids.
fn publish(
    broker: &str,
    backend: &str,
    queue: &str,
    task: &str,
    kwargs: Value,
    count: u32,
    priority: Option<u8>,
) -> Result<Vec<String>> {
    let peer_path = peer("celery_client.py");
    let kwargs = kwargs.to_string();
    let count = count.to_string();
    let mut args = vec![
        peer_path.to_str().unwrap_or_default(),
        "--broker",
        broker,
        "--backend",
        backend,
        "publish",
        "--queue",
        queue,
        "--task",
        task,
        "--kwargs",
        &kwargs,
        "--count",
        &count,
    ];
    let p = priority.map(|p| p.to_string());
    if let Some(p) = &p {
        args.extend(["--priority", p]);
    }
    let out = run_python(&args, &[], Duration::from_secs(60))?;
    Ok(serde_json::from_str(out.trim())?)
}

// ------------------------------------------------------------------------------------------------
// Shape comparison.

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// Differences in keys and value types between Flower's document `a` and ours `b` (lists: element shapes
/// of the first element when both have one).
fn shape_diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let kx: BTreeSet<&String> = x.keys().collect();
            let ky: BTreeSet<&String> = y.keys().collect();
            for k in kx.difference(&ky) {
                out.push(format!("{path}/{k}: only in Flower"));
            }
            for k in ky.difference(&kx) {
                out.push(format!("{path}/{k}: only in flower-compat"));
            }
            for k in kx.intersection(&ky) {
                shape_diff(&x[*k], &y[*k], &format!("{path}/{k}"), out);
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if let (Some(p), Some(q)) = (x.first(), y.first()) {
                shape_diff(p, q, &format!("{path}[0]"), out);
            }
        }
        _ if type_name(a) != type_name(b) => out.push(format!(
            "{path}: Flower {} ({a}) vs flower-compat {} ({b})",
            type_name(a),
            type_name(b)
        )),
        _ => {}
    }
}

fn assert_same_shape(what: &str, flower: &Value, ours: &Value) {
    let mut diffs = Vec::new();
    shape_diff(flower, ours, "", &mut diffs);
    assert!(
        diffs.is_empty(),
        "{what}: shapes differ:\n{}\nFlower: {flower}\nflower-compat: {ours}",
        diffs.join("\n")
    );
}

/// Both services answer `method path` with the same status; returns both replies.
fn both(
    method: &str,
    flower: &str,
    ours: &FlowerCompat,
    path: &str,
    body: Option<&str>,
) -> Result<(Reply, Reply)> {
    let a = http(method, &format!("{flower}{path}"), body, None)?;
    let b = http(method, &ours.url(path), body, None)?;
    assert_eq!(
        a.status, b.status,
        "{method} {path}: Flower {} {:?} vs flower-compat {} {:?}",
        a.status, a.body, b.status, b.body
    );
    Ok((a, b))
}

/// Both answer with the same status and JSON of the same shape; returns both documents. Documents keyed
/// by task id or worker name are compared on this test's own keys only (`mine`): on a shared broker other
/// tests' tasks and workers come and go, and each service may have seen a different slice of them.
fn both_json(
    method: &str,
    flower: &str,
    ours: &FlowerCompat,
    path: &str,
    body: Option<&str>,
) -> Result<(Value, Value)> {
    both_json_for(method, flower, ours, path, body, None)
}

fn both_json_for(
    method: &str,
    flower: &str,
    ours: &FlowerCompat,
    path: &str,
    body: Option<&str>,
    mine: Option<&BTreeSet<String>>,
) -> Result<(Value, Value)> {
    let (a, b) = both(method, flower, ours, path, body)?;
    let (a, b) = (a.json()?, b.json()?);
    let restrict = |v: &Value| -> Value {
        match (v, mine) {
            (Value::Object(m), Some(keys)) => Value::Object(
                m.iter()
                    .filter(|(k, _)| keys.contains(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            _ => v.clone(),
        }
    };
    assert_same_shape(&format!("{method} {path}"), &restrict(&a), &restrict(&b));
    Ok((a, b))
}

/// The entries of a `{uuid: task}` document whose uuid is in `ids`.
fn only(doc: &Value, ids: &BTreeSet<String>) -> BTreeMap<String, Value> {
    doc.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| ids.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn ids_in(doc: &Value, ids: &BTreeSet<String>) -> Vec<String> {
    doc.as_object()
        .map(|m| m.keys().filter(|k| ids.contains(*k)).cloned().collect())
        .unwrap_or_default()
}

/// Prometheus samples `{name: [(labels, value)]}` parsed by the Python client's own text parser.
fn prom(url: &str) -> Result<Value> {
    let code = r#"
import sys, json, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
out = {}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
"#;
    Ok(serde_json::from_str(
        run_python(&["-c", code, url], &[], Duration::from_secs(30))?.trim(),
    )?)
}

// ------------------------------------------------------------------------------------------------
// 1. Contract: real Flower 2.2 vs flower-compat on the same traffic.

fn contract(broker: &str, backend: &str) -> Result<()> {
    ensure_services();
    let (q_py, q_rs, q_idle) = (unique("fc_py"), unique("fc_rs"), unique("fc_idle"));
    let (_real, fl) = real_flower(broker, backend)?;
    let ours = FlowerCompat::start(broker, backend, &[])?;
    let (mut py, py_name) = python_worker(broker, backend, &q_py, 2)?;
    let mut rs = WorkerProcess::consuming(broker, backend, &q_rs, &["-E", "-c", "2"])?;
    let rs_name = rs.hostname.clone();
    let workers = [py_name.as_str(), rs_name.as_str()];

    // Both services see both workers come online from their events.
    for base in [fl.as_str(), ours.base.as_str()] {
        wait_until("both workers online", Duration::from_secs(20), || {
            let v = get(&format!("{base}/api/workers?status=true"))?.json()?;
            Ok(workers.iter().all(|w| v[*w] == json!(true)).then_some(()))
        })?;
    }

    // Traffic: successes and a failure on the Python worker, pings and an unknown task on celeriac.
    let mut ids = BTreeSet::new();
    ids.extend(publish(
        broker,
        backend,
        &q_py,
        "flower_tasks.add",
        json!({"x": 2, "y": 3}),
        3,
        None,
    )?);
    let failed = publish(
        broker,
        backend,
        &q_py,
        "flower_tasks.fail",
        json!({"msg": "boom"}),
        1,
        None,
    )?;
    ids.extend(failed.clone());
    let pings = publish(broker, backend, &q_rs, "celery.ping", json!({}), 3, None)?;
    ids.extend(pings.clone());
    let unknown = publish(broker, backend, &q_rs, "no.such.task", json!({}), 1, None)?;
    ids.extend(unknown.clone());
    for base in [fl.as_str(), ours.base.as_str()] {
        wait_until("every task final", Duration::from_secs(60), || {
            let v = get(&format!("{base}/api/tasks"))?.json()?;
            let done = only(&v, &ids)
                .values()
                .filter(|t| t["state"] == "SUCCESS" || t["state"] == "FAILURE")
                .count();
            Ok((done == ids.len()).then_some(()))
        })?;
    }
    // Events still in flight (heartbeats) settle.
    std::thread::sleep(Duration::from_millis(500));

    // /api/tasks: same tasks, identical documents (keys, types, states, values).
    let (a, b) = both_json_for("GET", &fl, &ours, "/api/tasks", None, Some(&ids))?;
    let (ta, tb) = (only(&a, &ids), only(&b, &ids));
    assert_eq!(ta.len(), ids.len(), "Flower lists every task: {a}");
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "same tasks"
    );
    for (id, t) in &ta {
        assert_same_shape(&format!("task {id}"), t, &tb[id]);
        assert_eq!(t, &tb[id], "task {id} identical");
    }
    assert_eq!(tb[&failed[0]]["state"], "FAILURE");
    assert_eq!(tb[&unknown[0]]["state"], "FAILURE");
    assert_eq!(tb[&pings[0]]["state"], "SUCCESS");
    assert_eq!(tb[&pings[0]]["worker"], rs_name.as_str());

    // Filters, search, sort and paging give the same answers.
    for query in [
        "?taskname=flower_tasks.add".to_string(),
        "?state=FAILURE".to_string(),
        format!("?workername={py_name}&state=SUCCESS"),
        "?search=pong".to_string(),
        "?search=state:FAILURE".to_string(),
        "?search=name:flower_tasks OR name:celery.ping".to_string(),
        "?search=kwargs:x=2".to_string(),
        "?taskname=All&state=All".to_string(),
    ] {
        let q = query.replace(' ', "%20");
        let (a, b) = both_json_for(
            "GET",
            &fl,
            &ours,
            &format!("/api/tasks{q}"),
            None,
            Some(&ids),
        )?;
        let (ia, ib) = (ids_in(&a, &ids), ids_in(&b, &ids));
        let (sa, sb): (BTreeSet<_>, BTreeSet<_>) =
            (ia.into_iter().collect(), ib.into_iter().collect());
        assert!(!sa.is_empty(), "{query} matches something: {a}");
        assert_eq!(sa, sb, "/api/tasks{query}");
    }
    for query in [
        format!("?workername={rs_name}&sort_by=received&limit=2&offset=1"),
        format!("?workername={py_name}&sort_by=-received&limit=3"),
        format!("?workername={py_name}&sort_by=name"),
        format!("?workername={py_name}&limit=2"),
    ] {
        let (a, b) = both_json("GET", &fl, &ours, &format!("/api/tasks{query}"), None)?;
        let (ia, ib) = (
            a.as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default(),
            b.as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default(),
        );
        assert!(!ia.is_empty(), "{query}: {a}");
        assert_eq!(ia, ib, "/api/tasks{query}: same page in the same order");
    }
    for bad in [
        "?sort_by=bogus",
        "?search=ab",
        "?limit=x",
        "?received_start=yesterday",
    ] {
        let (a, b) = both("GET", &fl, &ours, &format!("/api/tasks{bad}"), None)?;
        assert_eq!(a.status, 400, "{bad}");
        assert_eq!(a.body, b.body, "{bad}: same message");
    }

    // /api/task/info and /api/task/types.
    for id in &ids {
        let (a, b) = both_json("GET", &fl, &ours, &format!("/api/task/info/{id}"), None)?;
        assert_eq!(a, b, "task info {id}");
    }
    let (a, b) = both("GET", &fl, &ours, "/api/task/info/no-such-id", None)?;
    assert_eq!((a.status, a.body.as_str()), (404, b.body.as_str()));
    let (a, b) = both_json("GET", &fl, &ours, "/api/task/types", None)?;
    let mine = ["celery.ping", "flower_tasks.add", "flower_tasks.fail"];
    let pick = |v: &Value| -> Vec<String> {
        v["task-types"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(Value::as_str)
                    .filter(|s| mine.contains(s))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(pick(&a), mine.map(String::from).to_vec());
    assert_eq!(pick(&a), pick(&b));

    // /api/task/result.
    for id in &ids {
        let (a, b) = both_json("GET", &fl, &ours, &format!("/api/task/result/{id}"), None)?;
        assert_eq!(a["state"], b["state"], "result state of {id}");
        if backend.starts_with("redis") {
            assert_eq!(a, b, "result of {id}");
        }
    }

    // /api/workers: details gathered over remote control, per worker.
    let mine: BTreeSet<String> = workers.iter().map(|w| w.to_string()).collect();
    let (a, b) = both_json_for(
        "GET",
        &fl,
        &ours,
        "/api/workers?refresh=1",
        None,
        Some(&mine),
    )?;
    for w in workers {
        assert!(
            a.get(w).is_some() && b.get(w).is_some(),
            "{w} listed: {a} / {b}"
        );
        assert_same_shape(&format!("/api/workers[{w}]"), &a[w], &b[w]);
        for k in ["stats", "active_queues", "registered", "conf", "timestamp"] {
            assert!(b[w].get(k).is_some(), "{w} has {k}");
        }
        let (a, b) = both_json(
            "GET",
            &fl,
            &ours,
            &format!("/api/workers?workername={w}&refresh=1"),
            None,
        )?;
        assert_same_shape(&format!("/api/workers?workername={w}"), &a, &b);
        assert!(
            b[w]["revoked"].is_array() && b[w]["active"].is_array(),
            "{b}"
        );
    }
    let (a, b) = both_json_for(
        "GET",
        &fl,
        &ours,
        "/api/workers?status=1",
        None,
        Some(&mine),
    )?;
    for w in workers {
        assert_eq!(a[w], json!(true));
        assert_eq!(b[w], json!(true));
    }
    let (a, _) = both(
        "GET",
        &fl,
        &ours,
        "/api/workers?workername=nobody@nowhere",
        None,
    )?;
    assert_eq!(a.status, 404);

    // Sending tasks through the API.
    let body = json!({"args": [20, 22], "queue": q_py}).to_string();
    let (a, b) = both_json(
        "POST",
        &fl,
        &ours,
        "/api/task/apply/flower_tasks.add",
        Some(&body),
    )?;
    assert_eq!(
        (a["state"].clone(), a["result"].clone()),
        (json!("SUCCESS"), json!(42))
    );
    assert_eq!(
        (b["state"].clone(), b["result"].clone()),
        (json!("SUCCESS"), json!(42))
    );
    let body = json!({"kwargs": {"msg": "api"}, "queue": q_py}).to_string();
    let (a, b) = both_json(
        "POST",
        &fl,
        &ours,
        "/api/task/apply/flower_tasks.fail",
        Some(&body),
    )?;
    assert_eq!(a["state"], "FAILURE");
    assert_eq!(
        (b["state"].clone(), b["result"].clone()),
        (json!("FAILURE"), json!("ValueError('api')"))
    );
    let body = json!({"args": [1, 1], "queue": q_py}).to_string();
    let (_, b) = both_json(
        "POST",
        &fl,
        &ours,
        "/api/task/async-apply/flower_tasks.add",
        Some(&body),
    )?;
    let async_id = b["task-id"].as_str().context("task-id")?.to_string();
    let body = json!({"queue": q_rs}).to_string();
    both_json(
        "POST",
        &fl,
        &ours,
        "/api/task/send-task/celery.ping",
        Some(&body),
    )?;
    let (a, _) = both(
        "POST",
        &fl,
        &ours,
        "/api/task/apply/no.such.task",
        Some("{}"),
    )?;
    assert_eq!(a.status, 404);
    let (a, _) = both(
        "POST",
        &fl,
        &ours,
        "/api/task/apply/flower_tasks.add",
        Some("[1]"),
    )?;
    assert_eq!(a.status, 400);
    wait_until(
        "async-applied task seen by flower-compat",
        Duration::from_secs(30),
        || {
            let t = get(&ours.url(&format!("/api/task/info/{async_id}")))?;
            Ok((t.status == 200 && t.json()?["state"] == "SUCCESS").then_some(()))
        },
    )?;

    // Revoke and worker control.
    let revoke_id = uuid::Uuid::new_v4().to_string();
    let (a, b) = both_json(
        "POST",
        &fl,
        &ours,
        &format!("/api/task/revoke/{revoke_id}?terminate=false"),
        None,
    )?;
    assert_eq!(a, b);
    let (a, b) = both_json(
        "POST",
        &fl,
        &ours,
        &format!("/api/worker/pool/grow/{rs_name}?n=1"),
        None,
    )?;
    assert_eq!(a, b);
    let (a, b) = both_json(
        "POST",
        &fl,
        &ours,
        &format!("/api/worker/pool/shrink/{rs_name}?n=1"),
        None,
    )?;
    assert_eq!(a, b);
    // Consumers: each service adds (then cancels) a queue of its own on the celeriac worker.
    let (ex_a, ex_b) = (unique("fc_extra"), unique("fc_extra"));
    for (base, q) in [(fl.as_str(), &ex_a), (ours.base.as_str(), &ex_b)] {
        let r = post(
            &format!("{base}/api/worker/queue/add-consumer/{rs_name}?queue={q}"),
            None,
        )?;
        assert_eq!(
            (r.status, r.json()?),
            (200, json!({"message": format!("add consumer {q}")}))
        );
    }
    let aq = get(&ours.url(&format!("/api/workers?workername={rs_name}&refresh=1")))?.json()?;
    assert!(
        aq.to_string().contains(&ex_a) && aq.to_string().contains(&ex_b),
        "consuming both: {aq}"
    );
    for (base, q) in [(fl.as_str(), &ex_a), (ours.base.as_str(), &ex_b)] {
        let r = post(
            &format!("{base}/api/worker/queue/cancel-consumer/{rs_name}?queue={q}"),
            None,
        )?;
        assert_eq!(
            (r.status, r.json()?),
            (
                200,
                json!({"message": format!("no longer consuming from {q}")})
            )
        );
    }
    let (a, b) = both(
        "POST",
        &fl,
        &ours,
        &format!("/api/worker/pool/restart/{rs_name}"),
        None,
    )?;
    assert_eq!(
        (a.status, a.body.as_str()),
        (403, b.body.as_str()),
        "pool restart refused alike"
    );
    let (a, b) = both(
        "POST",
        &fl,
        &ours,
        &format!("/api/worker/pool/autoscale/{py_name}?min=1&max=2"),
        None,
    )?;
    assert_eq!(a.body, b.body);
    let (a, b) = both(
        "POST",
        &fl,
        &ours,
        "/api/worker/pool/grow/nobody@nowhere",
        None,
    )?;
    assert_eq!((a.status, a.body.as_str()), (404, b.body.as_str()));
    let (a, b) = both(
        "POST",
        &fl,
        &ours,
        &format!("/api/worker/queue/add-consumer/{rs_name}"),
        None,
    )?;
    assert_eq!(
        (a.status, a.body.as_str()),
        (400, b.body.as_str()),
        "queue is required"
    );

    // Queue lengths. Redis: Flower sums the priority lists exactly as we do. RabbitMQ: Flower needs the
    // management plugin (absent here, so it lists nothing); ours uses a passive declare.
    let (a, b) = both_json("GET", &fl, &ours, "/api/queues/length", None)?;
    let names = |v: &Value| -> BTreeSet<String> {
        v["active_queues"]
            .as_array()
            .map(|q| {
                q.iter()
                    .filter_map(|e| e["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        names(&b).contains(&q_py) && names(&b).contains(&q_rs),
        "{b}"
    );
    if broker.starts_with("redis") {
        let pick = |v: &Value| -> Vec<Value> {
            v["active_queues"]
                .as_array()
                .map(|q| {
                    q.iter()
                        .filter(|e| e["name"] == q_py.as_str() || e["name"] == q_rs.as_str())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(pick(&a), pick(&b));
    }
    // Ready messages by priority in a queue nobody consumes.
    publish(
        broker,
        backend,
        &q_idle,
        "flower_tasks.add",
        json!({"x": 1, "y": 1}),
        1,
        Some(0),
    )?;
    publish(
        broker,
        backend,
        &q_idle,
        "flower_tasks.add",
        json!({"x": 1, "y": 1}),
        2,
        Some(4),
    )?;
    publish(
        broker,
        backend,
        &q_idle,
        "flower_tasks.add",
        json!({"x": 1, "y": 1}),
        1,
        Some(9),
    )?;
    let detail = get(&ours.url(&format!("/api/queues/detail?queue={q_idle}")))?.json()?;
    let (ready, _) = tokio_block(broker_backlog(broker, &q_idle))?;
    assert_eq!(ready, 4);
    assert_eq!(detail[0]["ready"], 4, "{detail}");
    assert_eq!(detail[0]["messages"], 4, "{detail}");
    if broker.starts_with("redis") {
        assert_eq!(
            detail[0]["priorities"],
            json!({"0": 1, "3": 2, "6": 0, "9": 1}),
            "{detail}"
        );
    }
    // Running and reserved apart: 2 executing on the Python worker's 2 threads, the rest prefetched.
    publish(
        broker,
        backend,
        &q_py,
        "flower_tasks.sleep",
        json!({"seconds": 5}),
        4,
        None,
    )?;
    let split = wait_until("2 running + 2 reserved", Duration::from_secs(15), || {
        let d = get(&ours.url(&format!("/api/queues/detail?queue={q_py}")))?.json()?;
        Ok((d[0]["running"] == 2 && d[0]["reserved"] == 2).then_some(d))
    })?;
    assert_eq!(split[0]["ready"], 0, "{split}");

    // /metrics: every flower_* sample of Flower, with the same labels; equal task-event counts.
    let (ma, mb) = (
        prom(&format!("{fl}/metrics"))?,
        prom(&ours.url("/metrics"))?,
    );
    let label_sets = |v: &Value, name: &str| -> BTreeSet<Vec<String>> {
        v[name]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x[0].as_object())
                    .map(|l| {
                        let mut k: Vec<String> = l.keys().cloned().collect();
                        k.sort();
                        k
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut families = 0;
    for name in ma
        .as_object()
        .map(|m| m.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        if !name.starts_with("flower_") || name.ends_with("_created") {
            continue;
        }
        families += 1;
        assert_eq!(
            label_sets(&ma, &name),
            label_sets(&mb, &name),
            "labels of {name}"
        );
    }
    assert!(families >= 6, "Flower exported its metrics: {ma}");
    let events = |v: &Value| -> BTreeMap<String, f64> {
        v["flower_events_total"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter(|x| workers.contains(&x[0]["worker"].as_str().unwrap_or("")))
                    .map(|x| (x[0].to_string(), x[1].as_f64().unwrap_or(-1.0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        events(&ma),
        events(&mb),
        "flower_events_total for our workers"
    );

    let (a, b) = both("GET", &fl, &ours, "/healthcheck", None)?;
    assert_eq!((a.body.as_str(), b.body.as_str()), ("OK", "OK"));

    // Shutdown through each service; both then show the worker offline.
    let (a, b) = (
        post(&format!("{fl}/api/worker/shutdown/{py_name}"), None)?,
        post(&ours.url(&format!("/api/worker/shutdown/{rs_name}")), None)?,
    );
    assert_eq!((a.status, a.body.clone()), (b.status, b.body.clone()));
    assert_eq!(b.json()?, json!({"message": "Shutting down!"}));
    rs.wait(Duration::from_secs(30))?;
    py.wait_exit(Duration::from_secs(30))?;
    for base in [fl.as_str(), ours.base.as_str()] {
        wait_until("both workers offline", Duration::from_secs(10), || {
            let v = get(&format!("{base}/api/workers?status=true"))?.json()?;
            Ok(workers.iter().all(|w| v[*w] == json!(false)).then_some(()))
        })?;
    }
    Ok(())
}

fn tokio_block<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

#[test]
fn same_answers_as_flower_on_rabbitmq() -> Result<()> {
    contract(AMQP, "rpc://")
}

#[test]
fn same_answers_as_flower_on_redis() -> Result<()> {
    contract(REDIS_CONTRACT, REDIS_CONTRACT)
}

// ------------------------------------------------------------------------------------------------
// 2. History across restarts.

fn listed(ours: &FlowerCompat) -> Result<BTreeMap<String, Value>> {
    let v = get(&ours.url("/api/tasks"))?.json()?;
    Ok(v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default())
}

fn restart_keeps_history(broker: &str, history: &str) -> Result<()> {
    ensure_services();
    let queue = unique("fc_hist");
    let prefix = unique("fc_hist");
    let ours = FlowerCompat::start(
        broker,
        "disabled://",
        &[
            "--history-backend",
            history,
            "--history-prefix",
            &prefix,
            "--max-tasks",
            "1000",
        ],
    )?;
    let _worker = WorkerProcess::consuming(broker, "rpc://", &queue, &["-E"])?;
    // Traffic keeps flowing across the restart: a background publisher sends pings the whole time.
    let before = publish(broker, "rpc://", &queue, "celery.ping", json!({}), 20, None)?;
    wait_until("20 tasks listed", Duration::from_secs(30), || {
        let l = listed(&ours)?;
        Ok(before
            .iter()
            .all(|id| l.get(id).is_some_and(|t| t["state"] == "SUCCESS"))
            .then_some(()))
    })?;
    let snapshot = listed(&ours)?;
    // The charts' past: the queue measured at least twice (every 5 s) before the restart.
    let measured = |ours: &FlowerCompat| -> Result<usize> {
        let v = get(&ours.url("/api/celeriac/series/queues?window=15m"))?.json()?;
        Ok(v["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["queue"] == queue.as_str())
            .flat_map(|l| l["ready"].as_array().cloned().unwrap_or_default())
            .filter(|r| !r.is_null())
            .count())
    };
    let points = wait_until("queue samples", Duration::from_secs(30), || {
        let n = measured(&ours)?;
        Ok((n >= 2).then_some(n))
    })?;
    let peer_path = peer("celery_client.py");
    let mut during = Command::new(celeriac_tests::python());
    during
        .arg("-c")
        .arg(
            "import subprocess, sys, time\n\
             for _ in range(8):\n    subprocess.run([sys.executable] + sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n    time.sleep(0.5)\n",
        )
        .arg(&peer_path)
        .args(["--broker", broker, "--backend", "rpc://", "publish", "--queue", &queue, "--task", "celery.ping", "--count", "3"]);
    let mut traffic = Proc::spawn(during, &format!("{queue}.traffic.log"))?;

    let ours = ours.restart(&[])?;
    let after = listed(&ours)?;
    // The charts keep the past: task series from the restored tasks, queue samples from the store.
    let finished = get(&ours.url("/api/celeriac/series/tasks?window=15m"))?.json()?["finished"]
        .as_u64()
        .unwrap_or(0);
    assert!(finished >= 20, "task series after the restart: {finished}");
    assert!(
        measured(&ours)? >= points,
        "queue samples restored ({points} before the restart)"
    );
    for id in &before {
        assert!(
            after.contains_key(id),
            "task {id} seen before the restart is listed after it"
        );
        assert_eq!(after[id], snapshot[id], "task {id} restored unchanged");
    }
    assert!(
        traffic.wait_exit(Duration::from_secs(60))?.success(),
        "{}",
        traffic.log_text()
    );
    // The restarted service keeps consuming events.
    let later = publish(broker, "rpc://", &queue, "celery.ping", json!({}), 5, None)?;
    wait_until(
        "new tasks after the restart",
        Duration::from_secs(30),
        || {
            let l = listed(&ours)?;
            Ok(later
                .iter()
                .all(|id| l.get(id).is_some_and(|t| t["state"] == "SUCCESS"))
                .then_some(()))
        },
    )?;
    // Bounded by count: restarting with --max-tasks 10 restores only the 10 newest (and prunes the store).
    let all = listed(&ours)?;
    let mut by_age: Vec<(f64, String)> = all
        .iter()
        .map(|(id, t)| (t["received"].as_f64().unwrap_or(0.0), id.clone()))
        .collect();
    by_age.sort_by(|a, b| a.0.total_cmp(&b.0));
    std::thread::sleep(Duration::from_millis(1500)); // one write-behind round
    let ours = ours.restart(&["--max-tasks", "10"])?;
    let bounded = listed(&ours)?;
    assert_eq!(bounded.len(), 10, "{bounded:?}");
    for (_, id) in by_age.iter().rev().take(10) {
        assert!(bounded.contains_key(id), "newest task {id} kept");
    }
    let ours = ours.restart(&["--max-tasks", "1000"])?;
    assert_eq!(
        listed(&ours)?.len(),
        10,
        "the store itself was pruned to 10"
    );
    Ok(())
}

#[test]
fn history_survives_restart_in_redis() -> Result<()> {
    restart_keeps_history(REDIS_RESTART, REDIS_RESTART)
}

#[test]
fn history_survives_restart_in_postgres() -> Result<()> {
    restart_keeps_history(AMQP, POSTGRES)
}

// ------------------------------------------------------------------------------------------------
// 3. Basic auth and read-only mode.

#[test]
fn basic_auth_and_read_only() -> Result<()> {
    ensure_services();
    let queue = unique("fc_auth");
    let ours = FlowerCompat::start(
        REDIS_MISC,
        REDIS_MISC,
        &[
            "--basic-auth",
            "admin:s3cret,ops:other",
            "--read-only",
            "--url-prefix",
            "flower",
        ],
    )?;
    let worker = WorkerProcess::consuming(REDIS_MISC, REDIS_MISC, &queue, &["-E"])?;
    let w = worker.hostname.clone();
    assert!(ours.base.ends_with("/flower"), "served under the prefix");
    let url = |p: &str| ours.url(p);
    let good = Some("admin:s3cret");
    for path in [
        "/api/workers",
        "/api/tasks",
        "/api/task/types",
        "/api/queues/length",
        "/",
        "/api/celeriac/overview",
    ] {
        let r = http("GET", &url(path), None, None)?;
        assert_eq!(r.status, 401, "{path} without credentials");
        let r = http("GET", &url(path), None, Some("admin:wrong"))?;
        assert_eq!(r.status, 401, "{path} with a wrong password");
        let r = http("GET", &url(path), None, good)?;
        assert_eq!(r.status, 200, "{path} with credentials: {}", r.body);
        let r = http("GET", &url(path), None, Some("ops:other"))?;
        assert_eq!(r.status, 200, "{path} with the second user");
    }
    let r = http("GET", &url("/api/workers"), None, None)?;
    assert_eq!(r.status, 401);
    for open in ["/healthcheck", "/metrics"] {
        assert_eq!(
            http("GET", &url(open), None, None)?.status,
            200,
            "{open} stays open as in Flower"
        );
    }
    wait_until("worker known", Duration::from_secs(20), || {
        let v = http("GET", &url("/api/workers?refresh=1"), None, good)?.json()?;
        Ok(v.get(&w).is_some().then_some(()))
    })?;
    let v = http(
        "GET",
        &url(&format!("/api/workers?workername={w}&refresh=1")),
        None,
        good,
    )?
    .json()?;
    let pool_before = v[&w]["stats"]["pool"]["max-concurrency"].clone();
    assert!(pool_before.is_u64(), "{v}");
    let id = uuid::Uuid::new_v4();
    for path in [
        format!("/api/worker/shutdown/{w}"),
        format!("/api/worker/pool/restart/{w}"),
        format!("/api/worker/pool/grow/{w}?n=1"),
        format!("/api/worker/pool/shrink/{w}?n=1"),
        format!("/api/worker/pool/autoscale/{w}?min=1&max=2"),
        format!("/api/worker/queue/add-consumer/{w}?queue=x"),
        format!("/api/worker/queue/cancel-consumer/{w}?queue=x"),
        format!("/api/task/revoke/{id}"),
        format!("/api/task/abort/{id}"),
        "/api/task/apply/celery.ping".to_string(),
        "/api/task/async-apply/celery.ping".to_string(),
        "/api/task/send-task/celery.ping".to_string(),
        format!("/api/task/timeout/celery.ping?workername={w}&soft=1"),
        format!("/api/task/rate-limit/celery.ping?workername={w}&ratelimit=1/s"),
    ] {
        let r = http("POST", &url(&path), Some("{}"), None)?;
        assert_eq!(r.status, 401, "{path} without credentials");
        let r = http("POST", &url(&path), Some("{}"), good)?;
        assert_eq!(
            (r.status, r.body.as_str()),
            (403, "Read only mode is enabled"),
            "{path}"
        );
    }
    // Nothing was done: the pool is as it was and the worker still runs.
    let v = http(
        "GET",
        &url(&format!("/api/workers?workername={w}&refresh=1")),
        None,
        good,
    )?
    .json()?;
    assert_eq!(
        v[&w]["stats"]["pool"]["max-concurrency"], pool_before,
        "{v}"
    );
    let mut worker = worker;
    assert!(worker.pid().is_some());
    assert!(
        worker.wait(Duration::from_millis(500)).is_err(),
        "worker still running"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// 4. The dashboard in a real browser.

/// Chromium driven over `--remote-debugging-pipe` (DevTools protocol messages separated by NUL on fds
/// 3 and 4): no WebSocket client needed.
struct Browser {
    _proc: Proc,
    to: std::fs::File,
    from: std::io::BufReader<std::fs::File>,
    next_id: u64,
    session: Option<String>,
}

impl Browser {
    fn launch(profile: &std::path::Path) -> Result<Browser> {
        use std::os::fd::IntoRawFd;
        use std::os::unix::process::CommandExt;
        let out = Command::new("bash")
            .arg(celeriac_tests::repo_root().join("scripts/browser.sh"))
            .output()?;
        assert!(
            out.status.success(),
            "scripts/browser.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let chromium = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (cmd_r, cmd_w) = nix::unistd::pipe()?;
        let (res_r, res_w) = nix::unistd::pipe()?;
        let (cmd_r, res_w) = (cmd_r.into_raw_fd(), res_w.into_raw_fd());
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank");
        // SAFETY: only async-signal-safe dup2 calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc_dup2(cmd_r, 3) < 0 || libc_dup2(res_w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let proc = Proc::spawn(cmd, &format!("{}.log", unique("chromium")))?;
        let _ = nix::unistd::close(cmd_r);
        let _ = nix::unistd::close(res_w);
        let to = std::fs::File::from(cmd_w);
        let from = std::io::BufReader::new(std::fs::File::from(res_r));
        Ok(Browser {
            _proc: proc,
            to,
            from,
            next_id: 0,
            session: None,
        })
    }

    fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        use std::io::BufRead;
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to.write_all(&bytes)?;
        loop {
            let mut buf = Vec::new();
            let n = self.from.read_until(0, &mut buf)?;
            if n == 0 {
                bail!("chromium closed the DevTools pipe");
            }
            buf.pop();
            let v: Value = serde_json::from_slice(&buf)?;
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    fn open(&mut self, url: &str) -> Result<()> {
        let target = self.call("Target.createTarget", json!({"url": "about:blank"}))?;
        let tid = target["targetId"].as_str().context("targetId")?.to_string();
        let att = self.call(
            "Target.attachToTarget",
            json!({"targetId": tid, "flatten": true}),
        )?;
        self.session = Some(att["sessionId"].as_str().context("sessionId")?.to_string());
        self.call("Page.enable", json!({}))?;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )?;
        self.call("Page.navigate", json!({"url": url}))?;
        Ok(())
    }

    fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        )?;
        Ok(r["result"]["value"].clone())
    }

    fn screenshot(&mut self, path: &std::path::Path) -> Result<()> {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = r["data"].as_str().context("screenshot data")?;
        std::fs::write(path, base64_decode(data)?)?;
        Ok(())
    }

    fn wait_for(&mut self, what: &str, expr: &str, timeout: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            let v = self.eval(expr)?;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                let body = self.eval("document.body ? document.body.innerText : ''")?;
                bail!("dashboard never showed {what} within {timeout:?}; page text:\n{body}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn libc_dup2(from: i32, to: i32) -> i32 {
    nix::unistd::dup2(from, to).unwrap_or(-1)
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(s.trim())?)
}

#[test]
fn dashboard_shows_live_updates_in_chromium() -> Result<()> {
    ensure_services();
    let (q_rs, q_py) = (unique("fc_dash_rs"), unique("fc_dash_py"));
    let ours = FlowerCompat::start(
        REDIS_MISC,
        REDIS_MISC,
        &["--dagster-url", "http://dagster.example:3000"],
    )?;
    let shots = artifacts_dir().join("flower-dashboard");
    std::fs::create_dir_all(&shots)?;
    let profile = artifacts_dir().join(unique("chromium-profile"));
    let mut browser = Browser::launch(&profile)?;
    browser.open(&ours.url("/#/workers"))?;
    browser.wait_for("the workers table", "document.querySelector('#workers') && document.querySelector('#status').textContent.startsWith('live')", Duration::from_secs(30))?;
    // A marker that a reload would wipe.
    browser.eval("window.__noReload = 'still-here'")?;

    let worker = WorkerProcess::consuming(REDIS_MISC, REDIS_MISC, &q_rs, &["-E"])?;
    let sel = format!("tr[data-worker=\"{}\"]", worker.hostname);
    browser.wait_for(
        "the celeriac worker online",
        &format!("(() => {{ const r = document.querySelector('{sel}'); return r && r.innerText.includes('Online'); }})()"),
        Duration::from_secs(20),
    )?;
    browser.screenshot(&shots.join("1-worker-online.png"))?;

    let (_py, _) = python_worker(REDIS_MISC, REDIS_MISC, &q_py, 1)?;
    browser.eval("location.hash = '#/tasks'")?;
    let id = publish(
        REDIS_MISC,
        REDIS_MISC,
        &q_py,
        "flower_tasks.sleep",
        json!({"seconds": 4}),
        1,
        None,
    )?
    .pop()
    .context("task id")?;
    let row = format!("tr[data-task=\"{id}\"]");
    browser.wait_for(
        "the task running",
        &format!("(() => {{ const r = document.querySelector('{row}'); return r && r.dataset.state === 'STARTED'; }})()"),
        Duration::from_secs(20),
    )?;
    browser.screenshot(&shots.join("2-task-started.png"))?;
    browser.wait_for(
        "the task succeeded",
        &format!("(() => {{ const r = document.querySelector('{row}'); return r && r.dataset.state === 'SUCCESS'; }})()"),
        Duration::from_secs(20),
    )?;
    browser.screenshot(&shots.join("3-task-success.png"))?;
    assert_eq!(
        browser.eval("window.__noReload")?,
        json!("still-here"),
        "no reload happened"
    );

    // Task detail and the queues view.
    browser.eval(&format!("location.hash = '#/task/{id}'"))?;
    browser.wait_for(
        "the task detail",
        &format!("document.querySelector('#task-title').innerText.includes('{id}') && document.querySelector('#task-title').innerText.includes('SUCCESS')"),
        Duration::from_secs(10),
    )?;
    browser.screenshot(&shots.join("4-task-detail.png"))?;
    browser.eval("location.hash = '#/queues'")?;
    browser.wait_for(
        "the queues",
        &format!("!!document.querySelector('tr[data-queue=\"{q_py}\"]')"),
        Duration::from_secs(15),
    )?;
    browser.screenshot(&shots.join("5-queues.png"))?;
    // No request left the machine: every resource came from flower-compat itself.
    let foreign = browser.eval(
        "performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith(location.origin))",
    )?;
    assert_eq!(foreign, json!([]), "no external assets");
    for f in ["1-worker-online.png", "3-task-success.png"] {
        let len = std::fs::metadata(shots.join(f))?.len();
        assert!(len > 5_000, "{f} is a real screenshot ({len} bytes)");
    }
    drop(worker);
    let _ = std::fs::remove_dir_all(&profile);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// 5. Dagster context of a real run.

#[test]
fn dagster_context_of_a_real_run() -> Result<()> {
    use celeriac_tests::dagster::DagsterHome;
    ensure_services();
    let queue = unique("fc_dagster");
    let ours = FlowerCompat::start(
        REDIS_MISC,
        REDIS_MISC,
        &["--dagster-url", "http://dagster.example:3000/"],
    )?;
    let _worker = WorkerProcess::consuming(REDIS_MISC, REDIS_MISC, &queue, &["-E", "-c", "3"])?;
    let home = DagsterHome::create(REDIS_MISC, REDIS_MISC)?;
    let run = home.run_job(
        "diamond",
        Duration::from_secs(240),
        &[("CELERIAC_QUEUE", &queue)],
    )?;
    assert_eq!(run.status, "SUCCESS", "{run:#?}");
    let page = wait_until("six step tasks", Duration::from_secs(20), || {
        let v = get(&ours.url("/api/celeriac/tasks?taskname=execute_step_k8s_job&limit=1000"))?
            .json()?;
        let mine: Vec<Value> = v["tasks"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter(|t| t["dagster"]["run_id"] == run.run_id.as_str())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Ok((mine.len() == 6 && mine.iter().all(|t| t["state"] == "SUCCESS")).then_some(mine))
    })?;
    let mut steps: Vec<String> = page
        .iter()
        .filter_map(|t| t["dagster"]["step_key"].as_str().map(str::to_owned))
        .collect();
    steps.sort();
    assert_eq!(
        steps,
        ["finish", "join", "left", "middle", "right", "start"]
    );
    for t in &page {
        let d = &t["dagster"];
        assert_eq!(d["job"], "diamond", "{t}");
        assert_eq!(
            d["url"],
            format!("http://dagster.example:3000/runs/{}", run.run_id),
            "{t}"
        );
        let step = d["step_key"].as_str().unwrap_or_default();
        let digest = run_python(
            &["-c", "import hashlib,sys; print(hashlib.md5((sys.argv[1]+sys.argv[2]).encode()).hexdigest())", &run.run_id, step],
            &[],
            Duration::from_secs(30),
        )?;
        assert_eq!(
            d["k8s_job"],
            format!("dagster-step-{}", digest.trim()),
            "{t}"
        );
        // The Flower API itself keeps Flower's shape: no extra keys.
        let info = get(&ours.url(&format!(
            "/api/task/info/{}",
            t["uuid"].as_str().unwrap_or_default()
        )))?
        .json()?;
        assert!(info.get("dagster").is_none());
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// 6. Live charts and the run timeline of a real Dagster run, in Chromium, on each broker.

/// Sum of the non-null values of series `i` of the chart `name`, as drawn in the page (uPlot's data).
fn drawn_sum(browser: &mut Browser, name: &str, i: usize) -> Result<f64> {
    let v = browser.eval(&format!(
        "(() => {{ const c = window.celeriacCharts && window.celeriacCharts['{name}']; \
           if (!c || !c.data[{i}]) return -1; return c.data[{i}].reduce((a, v) => a + (v == null ? 0 : v), 0); }})()"
    ))?;
    Ok(v.as_f64().unwrap_or(-1.0))
}

/// The timeline of a run with a fan-out onto a queue limited to one step at a time and a retried step:
/// charts draw and move while it runs; every step and attempt appears in order, with the queue wait of
/// the steps that waited; the step edges match Dagster's event log; the Gantt view shows every bar.
fn charts_and_run_timeline(broker: &str, backend: &str, tag: &str) -> Result<()> {
    use celeriac_tests::dagster::DagsterHome;
    ensure_services();
    let queue = unique(&format!("fc_tl_{tag}"));
    let home = DagsterHome::create(broker, backend)?;
    let db = format!("postgresql://postgres@127.0.0.1:5432/{}", home.db);
    let ours = FlowerCompat::start(
        broker,
        backend,
        &[
            "--dagster-db",
            &db,
            "--dagster-url",
            "http://dagster.example:3000",
        ],
    )?;
    let shots = artifacts_dir().join(format!("flower-timeline-{tag}"));
    std::fs::create_dir_all(&shots)?;
    let profile = artifacts_dir().join(unique("chromium-profile"));
    let mut browser = Browser::launch(&profile)?;
    browser.open(&ours.url("/#/charts"))?;
    browser.wait_for(
        "the charts",
        "!!(window.celeriacCharts && window.celeriacCharts.tasks && document.querySelector('#status').textContent.startsWith('live'))",
        Duration::from_secs(30),
    )?;
    let worker = WorkerProcess::consuming(broker, backend, &queue, &["-E", "-c", "1"])?;

    let started = Instant::now();
    let run_queue = queue.clone();
    let runner = std::thread::spawn(move || {
        let run = home.run_job(
            "timeline",
            Duration::from_secs(300),
            &[("CELERIAC_QUEUE", &run_queue)],
        );
        (home, run)
    });
    // The succeeded series, as drawn, grows step after step while the run goes on.
    let mut sums = vec![drawn_sum(&mut browser, "tasks", 1)?];
    let mut moves = 0;
    while moves < 3 && !runner.is_finished() && started.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(500));
        let s = drawn_sum(&mut browser, "tasks", 1)?;
        if s > *sums.last().unwrap_or(&0.0) {
            sums.push(s);
            moves += 1;
            browser.screenshot(&shots.join(format!("charts-{moves}.png")))?;
        }
    }
    let (home, run) = runner
        .join()
        .map_err(|_| anyhow::anyhow!("run thread panicked"))?;
    let run = run?;
    assert_eq!(run.status, "SUCCESS", "{run:#?}");
    assert!(
        moves >= 2,
        "the drawn succeeded/s series moved as steps finished: {sums:?}"
    );
    // The queue charts drew this queue, at its limit of one slot.
    let labels = browser.wait_for(
        "the queue charts",
        &format!(
            "(() => {{ const c = window.celeriacCharts; if (!c.depth || !c.inflight) return false; \
               const i = c.inflight.series.findIndex(s => s.label === '{queue} limit'); \
               const d = c.depth.series.findIndex(s => String(s.label).startsWith('{queue}')); \
               if (i < 0 || d < 0) return false; \
               const lim = c.inflight.data[i].filter(v => v != null); \
               return lim.length > 0 && lim.every(v => v === 1) && c.depth.data[d].some(v => v != null) \
                 && c.inflight.data[i - 1].some(v => v != null && v > 0) ? c.inflight.series.map(s => s.label) : false; }})()"
        ),
        Duration::from_secs(30),
    )?;
    eprintln!("in-flight chart series: {labels}");
    let p50 = drawn_sum(&mut browser, "runtime", 1)?;
    assert!(p50 > 0.0, "runtime percentiles drawn: {p50}");
    browser.screenshot(&shots.join("charts-final.png"))?;
    // Dark mode: the page follows the system setting and redraws the charts in its colours.
    browser.call(
        "Emulation.setEmulatedMedia",
        json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]}),
    )?;
    browser.wait_for(
        "the charts redrawn in dark mode",
        "document.body.dataset.scheme === 'dark' && window.celeriacCharts.tasks.__key.endsWith('|dark')            && getComputedStyle(document.body).backgroundColor !== 'rgb(247, 247, 245)'",
        Duration::from_secs(10),
    )?;
    browser.screenshot(&shots.join("charts-dark.png"))?;
    browser.call(
        "Emulation.setEmulatedMedia",
        json!({"features": [{"name": "prefers-color-scheme", "value": "light"}]}),
    )?;

    // The timeline JSON, once every task's last event is in.
    let url = ours.url(&format!("/api/celeriac/runs/{}/timeline", run.run_id));
    let tl = wait_until("the complete timeline", Duration::from_secs(30), || {
        let v = get(&url)?.json()?;
        let attempts: Vec<&Value> = v["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["attempts"].as_array().into_iter().flatten())
            .collect();
        let done = attempts.len() == 7
            && attempts
                .iter()
                .all(|a| a["result_stored"].is_number() && a["job_finished"].is_number());
        Ok(done.then_some(v))
    })?;
    assert_eq!(tl["event_log"], true, "{tl}");
    assert_eq!(tl["job"], "timeline");
    let steps: Vec<&str> = tl["steps"]
        .as_array()
        .context("steps")?
        .iter()
        .filter_map(|s| s["step_key"].as_str())
        .collect();
    assert_eq!(steps.first(), Some(&"tl_start"), "{steps:?}");
    assert_eq!(steps.last(), Some(&"tl_join"), "{steps:?}");
    let mut sorted = steps.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "tl_flaky",
            "tl_join",
            "tl_leaf_0",
            "tl_leaf_1",
            "tl_leaf_2",
            "tl_start"
        ]
    );
    let edges = [
        "published",
        "received",
        "started",
        "job_created",
        "step_start",
        "step_end",
        "job_finished",
        "result_stored",
    ];
    let mut slots: Vec<(f64, f64)> = Vec::new();
    let mut waited = 0;
    for s in tl["steps"].as_array().context("steps")? {
        let key = s["step_key"].as_str().unwrap_or_default();
        let attempts = s["attempts"].as_array().context("attempts")?;
        let want_outcomes: &[&str] = if key == "tl_flaky" {
            &["retry", "success"]
        } else {
            &["success"]
        };
        let outcomes: Vec<&str> = attempts
            .iter()
            .filter_map(|a| a["outcome"].as_str())
            .collect();
        assert_eq!(outcomes, want_outcomes, "{key}: {s}");
        for a in attempts {
            // Every edge known, in order (events from several processes on one host: 50 ms slack).
            let times: Vec<f64> = edges
                .iter()
                .map(|e| a[*e].as_f64().with_context(|| format!("{key}.{e}: {a}")))
                .collect::<Result<_>>()?;
            for (w, pair) in times.windows(2).enumerate() {
                assert!(
                    pair[0] <= pair[1] + 0.05,
                    "{key}: {} before {}: {a}",
                    edges[w],
                    edges[w + 1]
                );
            }
            assert_eq!(a["queue"], queue.as_str(), "{a}");
            assert_eq!(a["worker"], worker.hostname.as_str(), "{a}");
            let phases: Vec<&str> = a["segments"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g["phase"].as_str())
                .collect();
            assert!(
                phases.contains(&"queued") && phases.contains(&"running"),
                "{a}"
            );
            if a["queue_wait"].as_f64().unwrap_or(0.0) > 0.5 {
                waited += 1;
            }
            slots.push((times[2], times[7]));
        }
        // Matches Dagster's event log: the step's start and end events, attempt by attempt.
        let log = |kinds: &[&str]| -> Vec<f64> {
            run.step_events
                .iter()
                .filter(|e| {
                    e.step_key.as_deref() == Some(key) && kinds.contains(&e.event_type.as_str())
                })
                .map(|e| e.timestamp)
                .collect()
        };
        let starts = log(&["STEP_START", "STEP_RESTARTED"]);
        let ends = log(&["STEP_SUCCESS", "STEP_FAILURE", "STEP_UP_FOR_RETRY"]);
        assert_eq!(starts.len(), attempts.len(), "{key}: {:?}", run.step_events);
        assert_eq!(ends.len(), attempts.len(), "{key}: {:?}", run.step_events);
        for (i, a) in attempts.iter().enumerate() {
            for (edge, want) in [("step_start", starts[i]), ("step_end", ends[i])] {
                let got = a[edge].as_f64().unwrap_or(f64::NAN);
                assert!(
                    (got - want).abs() < 1.0,
                    "{key} #{i} {edge}: timeline {got}, event log {want}"
                );
            }
        }
    }
    // The fan-out of four waited for the queue's one slot: at least three of them (and the retry) queued.
    assert!(
        waited >= 3,
        "steps that waited for the queue's slot show it: {tl}"
    );
    // The one slot was never held twice at once.
    slots.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in slots.windows(2) {
        assert!(
            w[1].0 >= w[0].1 - 0.05,
            "the -c 1 queue ran one step at a time: {slots:?}"
        );
    }
    // On demand: other runs' steps on the same worker (none here: the worker is this test's own).
    let with_others = get(&format!("{url}?others=1"))?.json()?;
    assert_eq!(with_others["others"], json!([]), "{with_others}");
    assert!(get(&ours.url("/api/celeriac/runs/no-such-run/timeline"))?.status == 404);

    // The Gantt view: linked from the task rows, one bar row per attempt, in the JSON's order.
    browser.eval("location.hash = '#/tasks'")?;
    let link = browser.wait_for(
        "a run link in the task rows",
        &format!(
            "(() => {{ const a = document.querySelector('a.run-link[href=\"#/run/{}\"]'); return a ? a.getAttribute('href') : false; }})()",
            run.run_id
        ),
        Duration::from_secs(15),
    )?;
    browser.eval(&format!("location.hash = {link}"))?;
    let rows = browser.wait_for(
        "the Gantt rows",
        "(() => { const r = [...document.querySelectorAll('#gantt .g-row[data-step]')]; \
           return r.length === 7 && r.every(x => x.querySelector('.seg.running')) ? \
             r.map(x => [x.dataset.step, x.dataset.attempt, x.dataset.outcome, x.dataset.queueWait]) : false; })()",
        Duration::from_secs(20),
    )?;
    let drawn: Vec<(String, String)> = rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r[0].as_str().unwrap_or_default().to_string(),
                r[2].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = tl["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| {
            s["attempts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |a| {
                    (
                        s["step_key"].as_str().unwrap_or_default().to_string(),
                        a["outcome"].as_str().unwrap_or_default().to_string(),
                    )
                })
        })
        .collect();
    assert_eq!(drawn, want, "the Gantt shows every attempt in order");
    assert!(
        drawn.contains(&("tl_flaky".into(), "retry".into())),
        "{drawn:?}"
    );
    browser.screenshot(&shots.join("timeline.png"))?;
    browser.call(
        "Emulation.setEmulatedMedia",
        json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]}),
    )?;
    browser.wait_for(
        "dark mode",
        "document.body.dataset.scheme === 'dark'",
        Duration::from_secs(10),
    )?;
    browser.screenshot(&shots.join("timeline-dark.png"))?;
    browser.eval("document.querySelector('#run-others').click()")?;
    browser.wait_for(
        "the timeline with others asked for",
        "!!(window.celeriacTimeline && Array.isArray(window.celeriacTimeline.others))",
        Duration::from_secs(10),
    )?;
    let foreign = browser.eval(
        "performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith(location.origin))",
    )?;
    assert_eq!(foreign, json!([]), "no external assets");
    for f in ["charts-final.png", "timeline.png"] {
        let len = std::fs::metadata(shots.join(f))?.len();
        assert!(len > 5_000, "{f} is a real screenshot ({len} bytes)");
    }
    drop(worker);
    drop(home);
    let _ = std::fs::remove_dir_all(&profile);
    Ok(())
}

#[test]
fn charts_and_run_timeline_on_rabbitmq() -> Result<()> {
    charts_and_run_timeline(AMQP, "rpc://", "rabbitmq")
}

#[test]
fn charts_and_run_timeline_on_redis() -> Result<()> {
    charts_and_run_timeline(REDIS_MISC, REDIS_MISC, "redis")
}
