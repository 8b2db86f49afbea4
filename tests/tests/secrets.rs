//! Secrets in a step's arguments never leave the worker (issue 14, part 5).
//!
//! A real Dagster run goes through a celeriac worker with task events on, its HTTP endpoints up and
//! flower-compat watching, with three secrets where a deployment has them:
//!
//! * the Postgres password written literally in the instance config (`dagster.yaml`), which every step
//!   task carries in `execute_step_args_packed.instance_ref` (and the worker uses to write events);
//! * an S3 secret key as a container env of the op's `dagster-k8s/config` tag (the task's
//!   `user_defined_k8s_config_dict`), which the step process gets in its environment;
//! * the broker password, in the worker's broker URL (and, on Redis, in the result backend's).
//!
//! On each broker: RabbitMQ (a user of its own vhost, `rpc://` results) and Redis (an ACL user,
//! `redis://` results). Every output is then searched for each secret, literally and inside any
//! zlib+base64 blob (the form of `dagster api execute_step --compressed-input-json`): the worker's log
//! at debug level, its `/metrics`, every Celery event on the broker (captured from the `celeryev`
//! exchange; on Redis its fanout channels, envelope bodies decoded), flower-compat's log and API
//! responses (`/api/tasks`, `/api/task/info/<id>`, `/api/workers`, `/metrics`), and every event-log row
//! of the run (the worker's engine events and the step's own). The step really ran with them: the run
//! succeeds (so the worker connected to Postgres with the instance config's password) and the step
//! process saw the S3 key (the op writes a digest of it, not the key).

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use celeriac_tests::brokers::{RabbitUser, Vhost};
use celeriac_tests::dagster::{psql, DagsterHome};
use celeriac_tests::{
    artifacts_dir, celeriac_bin, ensure_services, free_port, http_get, tail, unique, wait_until,
    WorkerProcess,
};
use futures::StreamExt as _;

const DB_PASSWORD: &str = "pgpw-Kq7xZ2mW9vLr4sT8";
const S3_SECRET: &str = "s3key-Hn3bV6cX1zQp5yJ0";
const BROKER_PASSWORD: &str = "amqpw-Rt4eW8nM2kD6fG1a";
const SECRETS: [(&str, &str); 3] = [
    ("Postgres password (instance config)", DB_PASSWORD),
    ("S3 secret key (container env)", S3_SECRET),
    ("broker password (broker URL)", BROKER_PASSWORD),
];

/// One output and what it is called in a failure.
struct Output {
    name: String,
    text: String,
}

/// The secrets `text` holds, literally or inside a zlib+base64 blob.
fn leaks(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (what, secret) in SECRETS {
        if text.contains(secret) {
            found.push(format!("{what} in plain text"));
        }
    }
    // Compressed blobs (`--compressed-input-json eJ…`): base64 of zlib starts with "eJ".
    for token in text.split(|c: char| !(c.is_ascii_alphanumeric() || "+/=_-".contains(c))) {
        if token.len() < 40 || !token.starts_with("eJ") {
            continue;
        }
        let Ok(bytes) = base64::engine::general_purpose::STANDARD
            .decode(token)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(token))
        else {
            continue;
        };
        let mut inflated = String::new();
        if flate2::read::ZlibDecoder::new(bytes.as_slice())
            .read_to_string(&mut inflated)
            .is_err()
        {
            continue;
        }
        for (what, secret) in SECRETS {
            if inflated.contains(secret) {
                found.push(format!("{what} inside a compressed blob"));
            }
        }
    }
    found
}

/// `celeriac flower` on a free port.
struct Flower {
    child: Child,
    log: std::path::PathBuf,
    base: String,
}

impl Flower {
    fn start(broker: &str, backend: &str) -> Result<Flower> {
        let port = free_port()?;
        let log = artifacts_dir().join(format!("{}.log", unique("secrets_flower")));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(celeriac_bin())
            .args(["flower", "-b", broker, "--result-backend", backend])
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting celeriac flower")?;
        let mut f = Flower {
            child,
            log,
            base: format!("http://127.0.0.1:{port}"),
        };
        wait_until(
            "flower-compat /healthcheck",
            Duration::from_secs(30),
            || {
                if let Some(status) = f.child.try_wait()? {
                    bail!("flower-compat exited: {status}\n{}", tail(&f.log, 30));
                }
                Ok(http_get(&format!("{}/healthcheck", f.base))
                    .ok()
                    .filter(|(s, _)| *s == 200)
                    .map(|_| ()))
            },
        )?;
        Ok(f)
    }

    fn get(&self, path: &str) -> Result<String> {
        let (status, body) = http_get(&format!("{}{path}", self.base))?;
        if status != 200 {
            bail!("flower-compat {path}: {status} {body}");
        }
        Ok(body)
    }
}

impl Drop for Flower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Collects every message published to RabbitMQ's `celeryev` exchange (a queue bound with `#`).
async fn capture_amqp_events(
    broker: String,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<Vec<String>> {
    let conn = lapin::Connection::connect(&broker, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        "celeryev".into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .context("the worker declared celeryev")?;
    let q = ch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        "celeryev".into(),
        "#".into(),
        Default::default(),
        Default::default(),
    )
    .await?;
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "secrets-capture".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    let mut events = Vec::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    let headers = d
                        .properties
                        .headers()
                        .as_ref()
                        .map(|h| format!("{h:?}"))
                        .unwrap_or_default();
                    events.push(format!("{headers} {}", String::from_utf8_lossy(&d.data)));
                }
                _ => break,
            }
        }
    }
    Ok(events)
}

/// Collects every message published on the Redis database's fanout channels (kombu publishes the
/// `celeryev` exchange as `PUBLISH /<db>.celeryev/<routing key>`), each with its envelope's body
/// decoded (events travel base64-encoded inside the envelope) so a secret inside it is found too.
fn capture_redis_events(
    broker: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    subscribed: std::sync::mpsc::Sender<()>,
) -> Result<Vec<String>> {
    let client = redis::Client::open(broker.as_str())?;
    let mut con = client.get_connection()?;
    con.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut pubsub = con.as_pubsub();
    pubsub.psubscribe("*")?;
    let _ = subscribed.send(());
    let mut events = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let msg = match pubsub.get_message() {
            Ok(m) => m,
            Err(e) if e.is_timeout() => continue,
            Err(e) => return Err(e.into()),
        };
        let channel = msg.get_channel_name().to_string();
        let payload: String = msg.get_payload().unwrap_or_default();
        let body = serde_json::from_str::<serde_json::Value>(&payload)
            .ok()
            .and_then(|v| v.get("body").and_then(|b| b.as_str()).map(str::to_owned))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        events.push(format!("{channel} {payload} {body}"));
    }
    Ok(events)
}

/// A Redis ACL user with `password` and every right, deleted when dropped.
struct RedisUser(String);

impl RedisUser {
    fn create(prefix: &str, password: &str) -> Result<RedisUser> {
        let name = unique(prefix);
        let mut con = redis::Client::open("redis://127.0.0.1:6379/0")?.get_connection()?;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&name)
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query::<()>(&mut con)
            .context("ACL SETUSER")?;
        Ok(RedisUser(name))
    }
}

impl Drop for RedisUser {
    fn drop(&mut self) {
        if let Ok(mut con) =
            redis::Client::open("redis://127.0.0.1:6379/0").and_then(|c| c.get_connection())
        {
            let _ = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&self.0)
                .query::<()>(&mut con);
        }
    }
}

/// Where the fleet meets its broker, with the broker password in every URL.
enum Broker {
    RabbitMq,
    Redis,
}

/// Captures the broker's Celery events until stopped.
enum Capture {
    Amqp(
        tokio::runtime::Runtime,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<Vec<String>>>,
    ),
    Redis(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<Result<Vec<String>>>,
    ),
}

impl Capture {
    fn start(kind: &Broker, broker: &str) -> Result<Capture> {
        match kind {
            Broker::RabbitMq => {
                let rt = tokio::runtime::Runtime::new()?;
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
                let task = rt.spawn(capture_amqp_events(broker.to_string(), stop_rx));
                // The capture queue is bound before the run starts.
                std::thread::sleep(Duration::from_secs(1));
                Ok(Capture::Amqp(rt, stop_tx, task))
            }
            Broker::Redis => {
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (tx, rx) = std::sync::mpsc::channel();
                let url = broker.to_string();
                let flag = stop.clone();
                let thread = std::thread::spawn(move || capture_redis_events(url, flag, tx));
                if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    return match thread.join() {
                        Ok(Err(e)) => Err(e.context("subscribing to the Redis event channels")),
                        _ => bail!("the Redis event capture did not subscribe within 10 s"),
                    };
                }
                Ok(Capture::Redis(stop, thread))
            }
        }
    }

    fn finish(self) -> Result<Vec<String>> {
        match self {
            Capture::Amqp(rt, stop, task) => {
                let _ = stop.send(());
                rt.block_on(task)?
            }
            Capture::Redis(stop, thread) => {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("the Redis event capture panicked"))?
            }
        }
    }
}

#[test]
fn secrets_in_step_arguments_appear_in_no_output_on_rabbitmq() -> Result<()> {
    secrets_appear_in_no_output(Broker::RabbitMq)
}

#[test]
fn secrets_in_step_arguments_appear_in_no_output_on_redis() -> Result<()> {
    secrets_appear_in_no_output(Broker::Redis)
}

fn secrets_appear_in_no_output(kind: Broker) -> Result<()> {
    ensure_services();
    // The broker's own account, with the password: kept (and removed) until the test ends.
    let (_account, broker, backend): (Box<dyn std::any::Any>, String, String) = match kind {
        Broker::RabbitMq => {
            let vhost = Vhost::create("celeriac_secrets")?;
            let user = RabbitUser::create("celeriac_secret_user", BROKER_PASSWORD, &vhost)?;
            let broker = format!(
                "amqp://{}:{BROKER_PASSWORD}@127.0.0.1:5672/{}",
                user.0, vhost.0
            );
            (Box::new((user, vhost)), broker, "rpc://".to_string())
        }
        Broker::Redis => {
            let user = RedisUser::create("celeriac_secret_user", BROKER_PASSWORD)?;
            let url = |db: u8| format!("redis://{}:{BROKER_PASSWORD}@127.0.0.1:6379/{db}", user.0);
            let (broker, backend) = (url(0), url(1));
            (Box::new(user), broker, backend)
        }
    };
    let backend = backend.as_str();
    let queue = unique("secrets");
    let home = DagsterHome::create_with(&broker, backend, &["--pg-password", DB_PASSWORD])?;
    let yaml = std::fs::read_to_string(home.dir.join("dagster.yaml"))?;
    assert!(
        yaml.contains(DB_PASSWORD),
        "the instance config holds the password"
    );

    let mut worker = WorkerProcess::start(
        &[
            "-b",
            &broker,
            "--result-backend",
            backend,
            "-Q",
            &queue,
            "-E",
        ],
        &[("RUST_LOG", "debug")],
    )?;
    let flower = Flower::start(&broker, backend)?;
    let capture = Capture::start(&kind, &broker)?;

    let summary = home.run_job(
        "secret_env",
        Duration::from_secs(240),
        &[("CELERIAC_QUEUE", &queue), ("CELERIAC_S3_KEY", S3_SECRET)],
    )?;
    assert_eq!(
        summary.status,
        "SUCCESS",
        "the run succeeds: {summary:#?}\n{}",
        tail(&worker.log, 40)
    );
    // The step process had the S3 key in its environment (the op records it reversed).
    let seen = std::fs::read_to_string(home.dir.join("markers").join("s3_key_reversed"))
        .context("the op's record of AWS_SECRET_ACCESS_KEY")?;
    assert_eq!(seen, S3_SECRET.chars().rev().collect::<String>());

    // Let the last events (task-succeeded, a heartbeat) reach flower-compat and the capture.
    std::thread::sleep(Duration::from_secs(3));
    let mut outputs = Vec::new();
    let addr = worker.http_addr().context("worker HTTP address")?;
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (_, body) = http_get(&format!("http://{addr}{path}"))?;
        outputs.push(Output {
            name: format!("worker {path}"),
            text: body,
        });
    }
    let tasks = flower.get("/api/tasks")?;
    let ids: Vec<String> =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&tasks)?
            .keys()
            .cloned()
            .collect();
    assert!(!ids.is_empty(), "flower-compat saw the step task: {tasks}");
    for id in &ids {
        outputs.push(Output {
            name: format!("flower-compat /api/task/info/{id}"),
            text: flower.get(&format!("/api/task/info/{id}"))?,
        });
    }
    outputs.push(Output {
        name: "flower-compat /api/tasks".into(),
        text: tasks,
    });
    for path in ["/api/workers", "/metrics", "/api/queues/length"] {
        outputs.push(Output {
            name: format!("flower-compat {path}"),
            text: flower.get(path).unwrap_or_else(|e| e.to_string()),
        });
    }

    let events = capture.finish()?;
    assert!(
        events.iter().any(|e| e.contains("task-received")),
        "the task events were captured: {} events",
        events.len()
    );
    let n_events = events.len();
    for (i, e) in events.into_iter().enumerate() {
        outputs.push(Output {
            name: format!("Celery event #{i}"),
            text: e,
        });
    }
    let rows = psql(&home.db, "SELECT event FROM event_logs ORDER BY id")?;
    let n_rows = rows.lines().count();
    outputs.push(Output {
        name: "the run's event-log rows".into(),
        text: rows,
    });
    worker.terminate(Duration::from_secs(60))?;
    let flower_log_path = flower.log.clone();
    drop(flower);
    outputs.push(Output {
        name: "worker log (debug)".into(),
        text: worker.log_text(),
    });
    // flower-compat's log, read after it stopped.
    let flower_log = std::fs::read_to_string(&flower_log_path)
        .with_context(|| format!("reading {}", flower_log_path.display()))?;
    outputs.push(Output {
        name: "flower-compat log (debug)".into(),
        text: flower_log,
    });

    let mut problems = Vec::new();
    for o in &outputs {
        for l in leaks(&o.text) {
            let at = SECRETS
                .iter()
                .filter_map(|(_, s)| o.text.find(s))
                .next()
                .map(|i| {
                    let around: String = o.text[..i]
                        .chars()
                        .rev()
                        .take(150)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .chain(o.text[i..].chars().take(100))
                        .collect();
                    format!(": …{around}…")
                })
                .unwrap_or_default();
            problems.push(format!("{}: {l}{at}", o.name));
        }
    }
    eprintln!(
        "searched {} outputs ({n_events} Celery events, {n_rows} event-log rows, {} flower-compat tasks)",
        outputs.len(),
        ids.len()
    );
    assert!(
        problems.is_empty(),
        "secrets leaked:\n{}",
        problems.join("\n")
    );
    Ok(())
}
