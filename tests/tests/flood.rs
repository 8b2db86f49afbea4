//! A flood of 10,000 malformed and hostile task messages through each real broker (kombu's layout: AMQP
//! properties and header tables on RabbitMQ, the JSON envelope in a Redis list), interleaved with 100
//! valid `celery.ping` tasks, plus 200 hostile remote-control messages, into one running worker:
//!
//! * the worker stays up and never panics (its log has no `panicked`), and exits cleanly afterwards;
//! * every hostile message is disposed of as Celery would: refused (logged, rejected or acknowledged)
//!   and counted in `celery_task_rejected_total`, or, for a registered task with bad arguments, failed
//!   with a stored FAILURE; where Celery stores a result (unregistered task, oversized message) the
//!   FAILURE is there for the publisher (read by a real Python Celery client); nothing stays queued;
//! * every valid task succeeds (read by the Python client), and remote control still answers;
//! * memory stays bounded: the worker's RSS after the flood is within a fixed bound of its RSS before
//!   (glibc keeps part of the peak), and a second wave of 2,000 more hostile messages, once that has
//!   settled, adds (almost) nothing: no memory is kept per message.
//!
//! Runs in a vhost (RabbitMQ) or database (Redis) of its own, so its remote-control broadcasts reach
//! no other test's worker.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use celeriac_tests::brokers::Vhost;
use celeriac_tests::{
    broker_backlog, ensure_services, http_get, peer, run_python, unique, wait_until, WorkerProcess,
};
use celeriac_wire::broker::redis::RedisTransportOptions;
use celeriac_wire::broker::{ExchangeSpec, OutgoingMessage};
use celeriac_wire::message::Properties;
use celeriac_wire::task::TaskMessage;
use serde_json::{json, Map, Value};

/// Hostile task messages per broker.
const HOSTILE: usize = 10_000;
/// One valid task after every this many hostile ones.
const VALID_EVERY: usize = 100;
/// Hostile remote-control messages per broker.
const CONTROL: usize = 200;
/// Hostile messages of the second wave, sent once the worker's memory has settled after the first.
const SECOND_WAVE: usize = 2_000;
/// Largest RSS growth over the first wave. It carries ≈ 200 MB of payload (3 oversized 17 MB messages,
/// 100 of 1 MB, thousands of smaller ones); glibc keeps part of the peak (freed, not returned), so this
/// bounds the peak, not leaks.
const RSS_PEAK_LIMIT_KB: u64 = 384 * 1024;
/// Largest RSS growth over the second wave (the same mix, no oversized message), from the level the first
/// left: freed memory is reused, so growth here is memory kept per message (a leak of 8 KB a message
/// would add 16 MB).
const RSS_GROWTH_LIMIT_KB: u64 = 16 * 1024;

/// A deterministic xorshift generator (the seed is printed; `CELERIAC_FLOOD_SEED` replays).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What the worker must do with one hostile message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Refused before running: `celery_task_rejected_total` +1.
    Refused,
    /// Refused, and a FAILURE result is stored under the id (unregistered task, oversized).
    RefusedWithFailure,
    /// A registered task whose arguments are bad: it fails (`celery_task_failed_total` +1).
    Failed,
}

/// One hostile message: how to put it on the broker, and what must become of it.
enum Hostile {
    /// Published through celeriac's own broker layer (kombu's layout on either broker).
    Message(OutgoingMessage, Expect, Option<String>),
    /// A raw element LPUSHed onto the Redis list (not a kombu envelope, or a damaged one).
    RedisRaw(Vec<u8>),
    /// An AMQP message whose header table is hostile (published with lapin directly).
    AmqpHeaders(lapin::types::FieldTable, Vec<u8>, Expect, String),
}

fn v2_headers(task: &str, id: &str) -> Map<String, Value> {
    TaskMessage {
        id: id.into(),
        task: task.into(),
        args: vec![],
        kwargs: Map::new(),
        argsrepr: "()".into(),
        kwargsrepr: "{}".into(),
        origin: "flood@test".into(),
        reply_to: None,
        priority: None,
        root_id: None,
        parent_id: None,
    }
    .headers()
}

fn message(
    body: Vec<u8>,
    content_type: &str,
    headers: Map<String, Value>,
    id: Option<&str>,
) -> OutgoingMessage {
    OutgoingMessage {
        body,
        content_type: content_type.into(),
        content_encoding: "utf-8".into(),
        headers,
        properties: Properties {
            correlation_id: id.map(str::to_string),
            delivery_mode: Some(2),
            priority: Some(0),
            ..Default::default()
        },
    }
}

const EMBED: &str = r#"{"callbacks": null, "errbacks": null, "chain": null, "chord": null}"#;

/// Task names nobody registered, some of them as hostile as a header value can be.
fn hostile_name(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => format!("no.such.task.{}", rng.next()),
        1 => "\u{202e}evil\u{0}name\u{7}\r\n".repeat(1 + rng.below(10)),
        2 => "𝄞é\u{ffff}".repeat(1 + rng.below(2000)),
        3 => "x".repeat(10_000 + rng.below(10_000)),
        _ => format!("{}.{}", "a.".repeat(rng.below(50)), rng.next()),
    }
}

/// The `i`-th hostile message for `broker` ("amqp" or "redis").
fn hostile(i: usize, rng: &mut Rng, broker: &str) -> Hostile {
    let id = format!("flood-{i}-{}", uuid::Uuid::new_v4());
    let ping = |rng: &mut Rng| {
        let mut h = v2_headers("celery.ping", &id);
        if rng.below(2) == 0 {
            h.insert("x-noise".into(), json!("é".repeat(rng.below(100))));
        }
        h
    };
    let refused = |m| Hostile::Message(m, Expect::Refused, None);
    match i % 12 {
        // Not JSON at all: random bytes (invalid UTF-8 included).
        0 => {
            let n = 1 + rng.below(2000);
            refused(message(
                rng.bytes(n),
                "application/json",
                ping(rng),
                Some(&id),
            ))
        }
        // Nested far past any recursion limit.
        1 => {
            let depth = if i % 120 == 1 {
                1_000_000
            } else {
                200 + rng.below(5000)
            };
            let open = rng.pick(&["[", "{\"a\":"]);
            refused(message(
                open.repeat(depth).into_bytes(),
                "application/json",
                ping(rng),
                Some(&id),
            ))
        }
        // Invalid UTF-8 inside JSON strings.
        2 => {
            let mut body = b"[[\"".to_vec();
            let bad: [&[u8]; 4] = [b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"];
            body.extend_from_slice(&rng.pick(&bad[..])[..]);
            body.extend_from_slice(format!("\"], {{}}, {EMBED}]").as_bytes());
            refused(message(body, "application/json", ping(rng), Some(&id)))
        }
        // Valid JSON of the wrong shape or types.
        3 => {
            let bodies = [
                "\"a string\"".to_string(),
                format!("[5, {{}}, {EMBED}]"),
                format!("[[], [1, 2], {EMBED}]"),
                format!("[{{\"a\": 1}}, \"kwargs\", {EMBED}]"),
                "[\"NaN\", NaN, Infinity]".to_string(),
            ];
            let body = rng.pick(&bodies).clone().into_bytes();
            refused(message(body, "application/json", ping(rng), Some(&id)))
        }
        // Headers of the wrong types.
        4 => {
            let mut h = ping(rng);
            let (k, v) = rng
                .pick(&[
                    ("eta", json!("not a date")),
                    ("eta", json!(12345)),
                    ("expires", json!({"__type__": "datetime"})),
                    ("expires", json!([1, 2])),
                    ("eta", json!("2026-13-45T99:99:99")),
                ])
                .clone();
            h.insert(k.into(), v);
            let body = format!("[[], {{}}, {EMBED}]").into_bytes();
            refused(message(body, "application/json", h, Some(&id)))
        }
        // A task header that is not a string, or no id anywhere.
        5 => {
            let mut h = ping(rng);
            let no_id = rng.below(2) == 0;
            if no_id {
                h.remove("id");
            } else {
                h.insert(
                    "task".into(),
                    rng.pick(&[json!(123), json!(["celery.ping"]), json!({"a": 1})])
                        .clone(),
                );
            }
            let body = format!("[[], {{}}, {EMBED}]").into_bytes();
            // No task string: "unknown message"; no id: invalid task.
            refused(message(
                body,
                "application/json",
                h,
                if no_id { None } else { Some(&id) },
            ))
        }
        // Content types the worker must not deserialize.
        6 => {
            let ct = *rng.pick(&[
                "application/x-python-serialize",
                "application/x-yaml",
                "application/x-msgpack",
                "text/x-evil",
            ]);
            let n = 1 + rng.below(300);
            refused(message(rng.bytes(n), ct, ping(rng), Some(&id)))
        }
        // No task header, and a body that is not a v1 task either; or a v1 body of the wrong types.
        7 => {
            let body = if rng.below(2) == 0 {
                json!({"hello": "world", "task": 5})
            } else {
                json!({"task": "celery.ping", "id": id, "args": "not a list", "kwargs": {}})
            };
            refused(message(
                body.to_string().into_bytes(),
                "application/json",
                Map::new(),
                Some(&id),
            ))
        }
        // Valid messages for tasks nobody registered, with hostile names (and a 1 MB argument now and then).
        8 => {
            let name = hostile_name(rng);
            let arg = if i % 100 == 8 {
                "y".repeat(1 << 20)
            } else {
                "z".into()
            };
            let body = json!([
                [arg],
                {},
                serde_json::from_str::<Value>(EMBED).unwrap_or(Value::Null)
            ]);
            Hostile::Message(
                message(
                    body.to_string().into_bytes(),
                    "application/json",
                    v2_headers(&name, &id),
                    Some(&id),
                ),
                Expect::RefusedWithFailure,
                Some(id),
            )
        }
        // The registered Dagster step task with arguments of the wrong types: runs and fails.
        9 => {
            let kwargs = rng
                .pick(&[
                    json!({"execute_step_args_packed": "x"}),
                    json!({"execute_step_args_packed": {"__class__": "ExecuteStepArgs"}, "job_config_dict": [],
                        "job_namespace": 5, "load_incluster_config": "no", "job_wait_timeout": {}}),
                    json!({}),
                ])
                .clone();
            let body = json!([
                [],
                kwargs,
                serde_json::from_str::<Value>(EMBED).unwrap_or(Value::Null)
            ]);
            Hostile::Message(
                message(
                    body.to_string().into_bytes(),
                    "application/json",
                    v2_headers("execute_step_k8s_job", &id),
                    Some(&id),
                ),
                Expect::Failed,
                Some(id),
            )
        }
        // Over the worker's 16 MiB body limit (three per broker).
        10 if i % 3000 == 10 => {
            let body = format!("[[\"{}\"], {{}}, {EMBED}]", "o".repeat(17 << 20)).into_bytes();
            Hostile::Message(
                message(body, "application/json", ping(rng), Some(&id)),
                Expect::RefusedWithFailure,
                Some(id),
            )
        }
        // Broker-level damage: a damaged kombu envelope on Redis, a hostile header table on RabbitMQ.
        _ if broker == "redis" => {
            let body64 =
                base64::engine::general_purpose::STANDARD.encode(format!("[[], {{}}, {EMBED}]"));
            let raw = match rng.below(7) {
                0 => { let n = 1 + rng.below(500); rng.bytes(n) },
                1 => b"[1, 2, 3]".to_vec(),
                2 => json!({"headers": {"task": "celery.ping", "id": id}, "properties": {}}).to_string().into_bytes(),
                3 => json!({"body": "!!!not base64!!!", "headers": {"task": "celery.ping", "id": id},
                    "content-type": "application/json", "properties": {"body_encoding": "base64"}}).to_string().into_bytes(),
                4 => json!({"body": body64, "headers": "not a dict", "content-type": "application/json",
                    "properties": {"body_encoding": "base64", "priority": "high", "delivery_info": 5,
                        "correlation_id": [1]}}).to_string().into_bytes(),
                5 => format!("{{\"body\": {}1{}}}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
                _ => {
                    let mut v = json!({"body": body64, "content-type": "application/json",
                        "headers": {"task": "celery.ping", "id": id}, "properties": {"body_encoding": "base64"}})
                        .to_string()
                        .into_bytes();
                    v.truncate(v.len() / 2);
                    v
                }
            };
            Hostile::RedisRaw(raw)
        }
        _ => {
            use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
            let name = hostile_name(rng);
            let mut t = FieldTable::default();
            for (k, v) in v2_headers("x", &id) {
                if k != "task" {
                    if let Ok(a) = celeriac_wire::broker::amqp::json_to_amqp(&v) {
                        t.insert(ShortString::from(k), a);
                    }
                }
            }
            // The task name as invalid UTF-8 bytes around a hostile name.
            let mut bad = b"\xff\xfe".to_vec();
            bad.extend_from_slice(name.as_bytes());
            t.insert("task".into(), AMQPValue::LongString(LongString::from(bad)));
            // Nested tables (RabbitMQ and lapin both parse them recursively) and raw bytes.
            let mut nested = AMQPValue::LongString(LongString::from("leaf"));
            for _ in 0..(50 + rng.below(150)) {
                let mut inner = FieldTable::default();
                inner.insert("k".into(), nested);
                nested = AMQPValue::FieldTable(inner);
            }
            t.insert("stamps".into(), nested);
            t.insert(
                "x-bytes".into(),
                AMQPValue::ByteArray(ByteArray::from(rng.bytes(64))),
            );
            let body = format!("[[], {{}}, {EMBED}]").into_bytes();
            Hostile::AmqpHeaders(t, body, Expect::RefusedWithFailure, id)
        }
    }
}

/// A hostile remote-control message; all are ignored or answered with an error, none changes the
/// worker (addressed ones name only this worker).
fn hostile_control(i: usize, rng: &mut Rng, host: &str) -> Vec<u8> {
    let reply =
        json!({"exchange": "reply.celery.pidbox", "routing_key": uuid::Uuid::new_v4().to_string()});
    let v = match i % 10 {
        0 => {
            return {
                let n = 1 + rng.below(300);
                rng.bytes(n)
            }
        }
        1 => json!([1, 2, 3]),
        2 => json!({"method": 5, "destination": [host]}),
        3 => {
            json!({"method": "ping", "pattern": "*a".repeat(40) + "x", "matcher": "glob", "reply_to": reply})
        }
        4 => {
            json!({"method": "ping", "pattern": ".*a".repeat(40) + "x$", "matcher": "pcre", "reply_to": reply})
        }
        5 => json!({"method": "revoke", "destination": [host], "arguments": {"task_id":
            (0..5000).map(|k| format!("nope-{i}-{k}")).collect::<Vec<_>>()}}),
        6 => {
            json!({"method": rng.pick(&["pool_grow", "pool_shrink", "autoscale"]), "destination": [host],
            "arguments": rng.pick(&[json!({"n": "many"}), json!({"n": null}), json!({"max": "x"}), json!("args")]).clone(),
            "reply_to": reply})
        }
        7 => json!({"method": "x".repeat(100_000), "destination": [host], "reply_to": reply}),
        8 => {
            json!({"method": "query_task", "destination": [host], "arguments": {"task_id": {"a": [1]}},
            "reply_to": {"exchange": 5, "routing_key": null}})
        }
        _ => {
            json!({"method": "ping", "destination": "[".repeat(10_000), "arguments": [], "reply_to": "x"})
        }
    };
    v.to_string().into_bytes()
}

fn client(broker: &str, backend: &str, args: &[&str]) -> Result<String> {
    let script = peer("celery_client.py").display().to_string();
    let mut all = vec![script.as_str(), "--broker", broker, "--backend", backend];
    all.extend_from_slice(args);
    run_python(&all, &[], Duration::from_secs(600))
}

/// Resident set size of a process in KiB (`VmRSS`).
fn rss_kb(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("VmRSS in /proc/<pid>/status")
}

/// Sum of a counter over all its series in a Prometheus text page.
fn counter_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metrics(worker: &WorkerProcess) -> Result<String> {
    let addr = worker.http_addr().context("worker HTTP address")?;
    let (status, body) = http_get(&format!("http://{addr}/metrics"))?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

fn ping_ids(out: &str) -> Result<Vec<String>> {
    Ok(serde_json::from_str(out.trim())?)
}

async fn publish_all(
    broker_url: &str,
    kind: &str,
    queue: &str,
    host: &str,
    seed: u64,
    wave: std::ops::Range<usize>,
) -> Result<(Vec<String>, Vec<(String, Expect)>, usize, usize)> {
    let broker =
        celeriac_wire::connect::broker(broker_url, RedisTransportOptions::default()).await?;
    let amqp = if kind == "amqp" {
        let conn = lapin::Connection::connect(broker_url, Default::default()).await?;
        Some(conn.create_channel().await?)
    } else {
        None
    };
    let mut redis = if kind == "redis" {
        Some(
            redis::Client::open(broker_url)?
                .get_multiplexed_async_connection()
                .await?,
        )
    } else {
        None
    };
    let mut rng = Rng(seed);
    let mut valid = Vec::new();
    let mut tracked = Vec::new();
    let (mut refused, mut failed) = (0usize, 0usize);
    let redis_list = queue.to_string(); // priority 0 lives in the queue's own list
    for i in wave {
        if i % VALID_EVERY == 0 {
            let id = format!("valid-{i}-{}", uuid::Uuid::new_v4());
            let t = TaskMessage {
                id: id.clone(),
                task: "celery.ping".into(),
                args: vec![],
                kwargs: Map::new(),
                argsrepr: "()".into(),
                kwargsrepr: "{}".into(),
                origin: "flood@test".into(),
                reply_to: None,
                priority: Some(0),
                root_id: None,
                parent_id: None,
            };
            broker.publish("", queue, t.to_outgoing()).await?;
            valid.push(id);
        }
        if i % (HOSTILE / CONTROL) == 0 {
            let body = hostile_control(i / (HOSTILE / CONTROL), &mut rng, host);
            let msg = OutgoingMessage {
                body,
                content_type: "application/json".into(),
                content_encoding: "utf-8".into(),
                ..Default::default()
            };
            broker.broadcast(&ExchangeSpec::pidbox(), "", msg).await?;
        }
        let mut count = |e: Expect, id: Option<String>| {
            match e {
                Expect::Failed => failed += 1,
                _ => refused += 1,
            }
            if let (Some(id), true) = (id, e != Expect::Refused) {
                tracked.push((id, e));
            }
        };
        match hostile(i, &mut rng, kind) {
            Hostile::Message(m, e, id) => {
                broker.publish("", queue, m).await?;
                count(e, id);
            }
            Hostile::RedisRaw(raw) => {
                let con = redis.as_mut().context("redis connection")?;
                redis::cmd("LPUSH")
                    .arg(&redis_list)
                    .arg(raw)
                    .query_async::<()>(con)
                    .await?;
                count(Expect::Refused, None);
            }
            Hostile::AmqpHeaders(table, body, e, id) => {
                let ch = amqp.as_ref().context("amqp channel")?;
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    lapin::options::BasicPublishOptions::default(),
                    &body,
                    lapin::BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_content_encoding("utf-8".into())
                        .with_correlation_id(id.clone().into())
                        .with_delivery_mode(2)
                        .with_priority(0)
                        .with_headers(table),
                )
                .await?
                .await?;
                count(e, Some(id));
            }
        }
    }
    Ok((valid, tracked, refused, failed))
}

fn flood(broker: &str, kind: &str) -> Result<()> {
    ensure_services();
    let backend = "redis://127.0.0.1:6379/15";
    let queue = unique("flood");
    let seed: u64 = std::env::var("CELERIAC_FLOOD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 2_654_435_761 + 1);
    eprintln!("flood on {kind}: seed {seed} (CELERIAC_FLOOD_SEED replays)");
    let mut worker = WorkerProcess::consuming(broker, backend, &queue, &["-c", "4"])?;
    let pid = worker.pid().context("worker pid")?;

    // 20 valid tasks, published by Python's client.
    let publish_pings = || -> Result<Vec<String>> {
        ping_ids(&client(
            broker,
            backend,
            &[
                "publish",
                "--queue",
                &queue,
                "--task",
                "celery.ping",
                "--count",
                "20",
            ],
        )?)
    };
    // Warm up: valid tasks from Python, so the baseline includes every pool and connection in use.
    let warm = publish_pings()?;
    client(
        broker,
        backend,
        &[
            "wait",
            "--ids",
            &serde_json::to_string(&warm)?,
            "--timeout",
            "60",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kb(pid)?;

    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    let (mut valid, mut tracked, mut refused, mut failed) = rt.block_on(publish_all(
        broker,
        kind,
        &queue,
        &worker.hostname,
        seed,
        0..HOSTILE,
    ))?;
    eprintln!(
        "flood on {kind}: {HOSTILE} hostile + {} valid + {CONTROL} control messages published in {:.1?}",
        valid.len(),
        started.elapsed()
    );
    let drained_queue = |what: &str| {
        wait_until(what, Duration::from_secs(600), || {
            let (ready, unacked) = rt.block_on(broker_backlog(broker, &queue))?;
            Ok((ready == 0 && unacked == 0).then_some(()))
        })
        .with_context(|| celeriac_tests::tail(&worker.log, 40))
    };
    drained_queue("the first wave to drain")?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_mid = rss_kb(pid)?;
    let second = rt.block_on(publish_all(
        broker,
        kind,
        &queue,
        &worker.hostname,
        seed ^ 0x5eed,
        HOSTILE..HOSTILE + SECOND_WAVE,
    ))?;
    valid.extend(second.0);
    tracked.extend(second.1);
    refused += second.2;
    failed += second.3;
    let after = publish_pings()?;
    valid.extend(after);

    // Everything consumed and settled: nothing ready, nothing unacknowledged.
    drained_queue("the queue to drain")?;
    let drained = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kb(pid)?;
    // Every valid task succeeded, as a real Celery client reads it.
    let states: Vec<Value> = serde_json::from_str(
        client(
            broker,
            backend,
            &[
                "wait",
                "--ids",
                &serde_json::to_string(&valid)?,
                "--timeout",
                "120",
            ],
        )?
        .trim(),
    )?;
    let bad: Vec<&Value> = states
        .iter()
        .filter(|s| s["state"] != "SUCCESS" || !s["result"].to_string().contains("pong"))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} valid tasks did not succeed: {:?}",
        bad.len(),
        valid.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(states.len(), valid.len());

    // Every hostile message disposed of and counted.
    let m = metrics(&worker)?;
    let rejected = counter_sum(&m, "celery_task_rejected_total");
    let failed_metric = counter_sum(&m, "celery_task_failed_total");
    assert_eq!(
        rejected as usize, refused,
        "every refused message is counted once"
    );
    assert_eq!(
        failed_metric as usize, failed,
        "every bad step task failed once"
    );
    // Where Celery stores a FAILURE (unregistered task, oversized message, failed task), it is there.
    let sample: Vec<&String> = tracked.iter().step_by(25).map(|(id, _)| id).collect();
    let stored: Vec<Value> = serde_json::from_str(
        client(
            broker,
            backend,
            &[
                "wait",
                "--ids",
                &serde_json::to_string(&sample)?,
                "--timeout",
                "30",
            ],
        )?
        .trim(),
    )?;
    for s in &stored {
        assert_eq!(s["state"], "FAILURE", "{s}");
    }
    assert!(
        tracked
            .iter()
            .any(|(_, e)| *e == Expect::RefusedWithFailure)
            && tracked.iter().any(|(_, e)| *e == Expect::Failed),
        "the sample covers both kinds of stored FAILURE"
    );

    // Remote control still answers.
    let replies = rt.block_on(async {
        let b = celeriac_wire::connect::broker(broker, RedisTransportOptions::default()).await?;
        anyhow::Ok(
            celeriac_wire::pidbox::client::call(
                b.as_ref(),
                "ping",
                json!({}),
                Some(vec![worker.hostname.clone()]),
                Duration::from_secs(10),
            )
            .await?,
        )
    })?;
    assert!(
        replies
            .iter()
            .any(|(h, r)| *h == worker.hostname && r["ok"] == "pong"),
        "control ping answered: {replies:?}"
    );

    let log = worker.log_text();
    assert!(!log.contains("panicked"), "no panic in the worker log");
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    eprintln!(
        "flood on {kind}: drained in {drained:.1?}; refused {refused}, failed {failed}; worker RSS {rss_before} KiB \
         before, {rss_mid} KiB after the first wave, {rss_after} KiB after the second ({SECOND_WAVE} more); \
         log {} lines, longest {longest} bytes",
        log.lines().count()
    );
    assert!(
        rss_mid <= rss_before + RSS_PEAK_LIMIT_KB,
        "worker RSS grew from {rss_before} KiB to {rss_mid} KiB over the first wave"
    );
    assert!(
        rss_after <= rss_mid + RSS_GROWTH_LIMIT_KB,
        "worker RSS grew from {rss_mid} KiB to {rss_after} KiB over the second wave: memory kept per message"
    );
    assert!(
        longest < 64 * 1024,
        "no log line carries a hostile payload whole ({longest} bytes)"
    );
    let status = worker.terminate(Duration::from_secs(30))?;
    assert!(
        status.success(),
        "the worker exits cleanly after the flood: {status}"
    );
    Ok(())
}

#[test]
fn flood_on_rabbitmq() -> Result<()> {
    ensure_services();
    let vhost = Vhost::create("celeriac_flood")?;
    flood(&vhost.url(), "amqp")
}

#[test]
fn flood_on_redis() -> Result<()> {
    ensure_services();
    // The database is this test's (the RabbitMQ case keeps only results in it): drop what an earlier,
    // interrupted run left (its unacknowledged messages would count as backlog for an hour).
    let mut con = redis::Client::open("redis://127.0.0.1:6379/15")?.get_connection()?;
    let stale: Vec<String> = redis::cmd("KEYS").arg("flood_*").query(&mut con)?;
    for key in stale
        .iter()
        .map(String::as_str)
        .chain(["unacked", "unacked_index"])
    {
        redis::cmd("DEL").arg(key).query::<()>(&mut con)?;
    }
    flood("redis://127.0.0.1:6379/15", "redis")
}
