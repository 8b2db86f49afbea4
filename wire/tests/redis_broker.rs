//! `RedisBroker` and `RedisBackend` against the real Redis at 127.0.0.1:6379 and real Python
//! celery/kombu 5.7 (`$HOME/.cache/celeriac/venv`, created by `scripts/python-peers.sh`).
//!
//! Every test owns one Redis database (7..10, 12..15; 11 and 1..6 belong to the system tests) and
//! FLUSHDBs it at the start, so the tests run in parallel.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use celeriac_wire::backend::redis::RedisBackend;
use celeriac_wire::backend::{ReplyTarget, ResultBackend};
use celeriac_wire::broker::redis::{
    PriorityOrder, RedisBroker, RedisTransportOptions, INVALID_ENVELOPE,
};
use celeriac_wire::broker::{Broker, BrokerError, Consumer, Delivery, OutgoingMessage, QueueSpec};
use celeriac_wire::message::Properties;
use celeriac_wire::result::{ExceptionInfo, ResultMeta};
use redis::AsyncCommands;
use serde_json::{json, Map, Value};

const SEP: &str = "\x06\x16";

fn python() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    format!("{home}/.cache/celeriac/venv/bin/python")
}

fn url(db: u8) -> String {
    format!("redis://127.0.0.1:6379/{db}")
}

/// A plain connection to `db`, after FLUSHDB.
async fn fresh_db(db: u8) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url(db))?;
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis at 127.0.0.1:6379")?;
    redis::cmd("FLUSHDB")
        .query_async::<()>(&mut con)
        .await
        .context("FLUSHDB")?;
    Ok(con)
}

/// Runs a Python snippet to completion; fails with its stderr on a non-zero exit. `URL` (the test's
/// Redis database) and `Q` are in its environment.
async fn run_python(script: &str, db: u8, queue: &str) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        python_cmd(script, db, queue).output(),
    )
    .await
    .context("python timed out")??;
    check_output(out)
}

fn python_cmd(script: &str, db: u8, queue: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg("-c")
        .arg(script)
        .env("URL", url(db))
        .env("Q", queue)
        .kill_on_drop(true);
    cmd
}

fn check_output(out: std::process::Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "python failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

fn last_json_line(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("python printed nothing"))?;
    serde_json::from_str(line).with_context(|| format!("python output is not JSON: {line}"))
}

fn options(order: PriorityOrder) -> RedisTransportOptions {
    RedisTransportOptions {
        priority_order: order,
        ..Default::default()
    }
}

fn short_visibility(restore_interval: Duration) -> RedisTransportOptions {
    RedisTransportOptions {
        visibility_timeout: Duration::from_secs(2),
        restore_interval,
        ..Default::default()
    }
}

/// The next delivery, waiting up to `within`.
async fn next_within(consumer: &mut Box<dyn Consumer>, within: Duration) -> Result<Delivery> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(d) = consumer.next().await? {
            return Ok(d);
        }
        if Instant::now() > deadline {
            bail!("no delivery within {within:?}");
        }
    }
}

fn task_message(id: &str, n: i64, priority: u8) -> OutgoingMessage {
    let mut msg = OutgoingMessage::json(
        json!([[n], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
            .to_string(),
    );
    let mut headers = Map::new();
    headers.insert("lang".into(), json!("py"));
    headers.insert("task".into(), json!("t"));
    headers.insert("id".into(), json!(id));
    msg.headers = headers;
    msg.properties = Properties {
        correlation_id: Some(id.into()),
        reply_to: Some("reply-oid".into()),
        delivery_mode: Some(2),
        priority: Some(priority),
        expiration: None,
    };
    msg
}

fn header<'a>(d: &'a Delivery, name: &str) -> Option<&'a str> {
    d.message.headers.get(name).and_then(Value::as_str)
}

async fn unacked_entry(
    con: &mut redis::aio::MultiplexedConnection,
    tag: &str,
) -> Result<(Option<String>, Option<f64>)> {
    let entry: Option<String> = con.hget("unacked", tag).await?;
    let score: Option<f64> = con.zscore("unacked_index", tag).await?;
    Ok((entry, score))
}

async fn unacked_count(con: &mut redis::aio::MultiplexedConnection) -> Result<(u64, u64)> {
    let h: u64 = con.hlen("unacked").await?;
    let z: u64 = con.zcard("unacked_index").await?;
    Ok((h, z))
}

/// The delivery tag of a message currently held: the only `unacked` field.
async fn only_unacked_tag(con: &mut redis::aio::MultiplexedConnection) -> Result<String> {
    let tags: Vec<String> = con.hkeys("unacked").await?;
    ensure!(
        tags.len() == 1,
        "expected exactly one unacked entry, got {tags:?}"
    );
    Ok(tags[0].clone())
}

const SEND_TASKS: &str = r#"
import json, os
from celery import Celery
app = Celery(broker=os.environ['URL'])
prios = [5, 0, 9, 3, 7, 1, 6, 2, 8, 4, 9, 0]
out = []
for i, p in enumerate(prios):
    r = app.send_task('t', args=[i], queue=os.environ['Q'], priority=p)
    out.append({'i': i, 'id': r.id, 'priority': p})
print(json.dumps({'tasks': out, 'oid': app.thread_oid}))
"#;

fn bucket(p: u64) -> u64 {
    match p {
        0..=2 => 0,
        3..=5 => 3,
        6..=8 => 6,
        _ => 9,
    }
}

/// Python publishes tasks with priorities 0..9 mixed; the Rust consumer receives them bucket by bucket
/// (0-2, 3-5, 6-8, 9 in kombu order; reversed in Dagster order), FIFO within a bucket, with headers,
/// properties and body as sent.
async fn python_priorities_arrive_in_order(db: u8, order: PriorityOrder) -> Result<()> {
    let mut con = fresh_db(db).await?;
    let q = "prioq";
    let broker = RedisBroker::connect(&url(db), options(order)).await?;
    let out = last_json_line(&run_python(SEND_TASKS, db, q).await?)?;
    let oid = out["oid"].as_str().context("oid")?.to_string();
    let mut expected: Vec<Value> = out["tasks"].as_array().context("tasks")?.clone();
    // Python filled the four priority lists as kombu's `_q_for_pri` says.
    for (key, n) in [
        (q.to_string(), 4u64),
        (format!("{q}{SEP}3"), 3),
        (format!("{q}{SEP}6"), 3),
        (format!("{q}{SEP}9"), 2),
    ] {
        let len: u64 = con.llen(&key).await?;
        ensure!(len == n, "list {key:?} holds {len}, expected {n}");
    }
    expected.sort_by_key(|t| {
        let b = bucket(t["priority"].as_u64().unwrap_or(0));
        let b = if order == PriorityOrder::Dagster {
            9 - b
        } else {
            b
        };
        (b, t["i"].as_u64().unwrap_or(0))
    });

    let mut consumer = broker.consume(&QueueSpec::dagster(q), 1).await?;
    let member = format!("{q}{SEP}{SEP}{q}");
    for table in ["_kombu.binding.prioq", "_kombu.binding_permanent.prioq"] {
        let is: bool = con.sismember(table, &member).await?;
        ensure!(is, "{table} lacks kombu's binding member");
    }
    let mut deliveries = Vec::new();
    for (n, want) in expected.iter().enumerate() {
        let d = next_within(&mut consumer, Duration::from_secs(5)).await?;
        let id = want["id"].as_str().context("id")?;
        assert_eq!(header(&d, "id"), Some(id), "delivery #{n} out of order");
        assert_eq!(header(&d, "task"), Some("t"));
        assert_eq!(d.message.properties.correlation_id.as_deref(), Some(id));
        assert_eq!(d.message.properties.reply_to.as_deref(), Some(oid.as_str()));
        assert_eq!(
            d.message.properties.priority,
            want["priority"].as_u64().map(|p| p as u8)
        );
        assert_eq!(d.message.content_type, "application/json");
        assert_eq!(d.message.content_encoding, "utf-8");
        assert_eq!(d.message.delivery_info.queue, q);
        assert_eq!(d.message.delivery_info.routing_key, q);
        assert_eq!(d.message.delivery_info.exchange, "");
        assert!(!d.message.delivery_info.redelivered);
        let body: Value = serde_json::from_slice(&d.message.body).context("body is not JSON")?;
        assert_eq!(body[0], json!([want["i"]]), "body of {id}");
        assert_eq!(body[2]["chord"], Value::Null);
        // Held, exactly one at a time: the number of unacked entries grows by one per `next()`.
        let (h, z) = unacked_count(&mut con).await?;
        assert_eq!((h, z), (n as u64 + 1, n as u64 + 1));
        deliveries.push(d);
    }
    assert!(consumer.next().await?.is_none(), "queue should be empty");
    for d in &deliveries {
        d.acker.ack().await?;
    }
    assert_eq!(unacked_count(&mut con).await?, (0, 0));
    Ok(())
}

#[tokio::test]
async fn python_priorities_kombu_order() -> Result<()> {
    python_priorities_arrive_in_order(9, PriorityOrder::Kombu).await
}

#[tokio::test]
async fn python_priorities_dagster_order() -> Result<()> {
    python_priorities_arrive_in_order(10, PriorityOrder::Dagster).await
}

const KOMBU_GET: &str = r#"
import json, os
from kombu import Connection
with Connection(os.environ['URL']) as c:
    sq = c.SimpleQueue(os.environ['Q'])
    m = sq.get(block=True, timeout=10)
    out = {'body': m.body.decode() if isinstance(m.body, bytes) else m.body,
           'payload': m.payload, 'headers': m.headers, 'content_type': m.content_type,
           'properties': {k: v for k, v in m.properties.items() if k != 'delivery_info'},
           'delivery_info': {k: v for k, v in m.delivery_info.items() if isinstance(v, (str, int, bool, type(None)))},
           'delivery_tag': m.delivery_tag}
    m.ack()
    sq.close()
print(json.dumps(out))
"#;

/// Ack removes the bookkeeping; reject(false) too; reject(true) puts the message at the back of the
/// line with `redelivered` set, and Python kombu reads it; an element that is not an envelope is
/// delivered as `application/x-invalid-envelope` and held like any other.
#[tokio::test]
async fn ack_reject_requeue_and_invalid_envelopes() -> Result<()> {
    let db = 12;
    let mut con = fresh_db(db).await?;
    let q = "ackq";
    let broker = RedisBroker::connect(&url(db), RedisTransportOptions::default()).await?;
    let mut consumer = broker.consume(&QueueSpec::dagster(q), 1).await?;
    for (id, n) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
        broker.publish("", q, task_message(id, n, 0)).await?;
    }

    // One `next()` pops exactly one message.
    let a = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(header(&a, "id"), Some("a"));
    let len: u64 = con.llen(q).await?;
    assert_eq!(len, 3, "only one message may be popped per next()");
    let tag = only_unacked_tag(&mut con).await?;
    let (entry, score) = unacked_entry(&mut con, &tag).await?;
    let entry: Value = serde_json::from_str(&entry.context("unacked entry")?)?;
    assert_eq!(entry[1], json!(""), "exchange in {entry}");
    assert_eq!(entry[2], json!(q), "routing key in {entry}");
    assert_eq!(entry[0]["headers"]["id"], json!("a"));
    assert_eq!(entry[0]["properties"]["delivery_tag"], json!(tag));
    let age = chrono::Utc::now().timestamp() as f64 - score.context("unacked_index score")?;
    assert!((-5.0..5.0).contains(&age), "score is not time(): {age}");
    a.acker.ack().await?;
    assert_eq!(unacked_count(&mut con).await?, (0, 0));
    a.acker.ack().await?; // settling twice is harmless

    // reject(true): back of the line (LPUSH), redelivered, same tag.
    let b = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(header(&b, "id"), Some("b"));
    let b_tag = only_unacked_tag(&mut con).await?;
    b.acker.reject(true).await?;
    b.acker.reject(true).await?;
    assert_eq!(unacked_count(&mut con).await?, (0, 0));
    let list: Vec<String> = con.lrange(q, 0, -1).await?;
    assert_eq!(list.len(), 3, "{list:?}");
    let back: Value = serde_json::from_str(&list[0])?; // LPUSH end = consumed last
    assert_eq!(
        back["headers"]["id"],
        json!("b"),
        "requeued message is not at the back"
    );
    assert_eq!(back["headers"]["redelivered"], json!(true));
    assert_eq!(
        back["properties"]["delivery_info"]["redelivered"],
        json!(true)
    );
    assert_eq!(back["properties"]["delivery_tag"], json!(b_tag));

    // c and d come first; then reject(false) drops d.
    let c = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(header(&c, "id"), Some("c"));
    c.acker.ack().await?;
    let d = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(header(&d, "id"), Some("d"));
    d.acker.reject(false).await?;
    assert_eq!(unacked_count(&mut con).await?, (0, 0));
    let len: u64 = con.llen(q).await?;
    assert_eq!(len, 1, "only the requeued b is left");

    // Python kombu consumes the requeued message.
    let got = last_json_line(&run_python(KOMBU_GET, db, q).await?)?;
    assert_eq!(got["headers"]["id"], json!("b"), "{got}");
    assert_eq!(got["headers"]["redelivered"], json!(true), "{got}");
    assert_eq!(got["delivery_info"]["redelivered"], json!(true), "{got}");
    assert_eq!(got["delivery_tag"], json!(b_tag), "{got}");
    assert_eq!(got["payload"][0], json!([2]), "{got}");
    assert_eq!(unacked_count(&mut con).await?, (0, 0), "python acked it");

    // Not an envelope: delivered for the worker to reject, held until then.
    let _: () = con.lpush(q, "this is not json").await?;
    let bad = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(bad.message.content_type, INVALID_ENVELOPE);
    assert_eq!(bad.message.body, b"this is not json");
    assert_eq!(bad.message.delivery_info.queue, q);
    let bad_tag = only_unacked_tag(&mut con).await?;
    let (entry, _) = unacked_entry(&mut con, &bad_tag).await?;
    let entry: Value = serde_json::from_str(&entry.context("entry")?)?;
    assert_eq!(entry[0], json!("this is not json"));
    bad.acker.reject(false).await?;
    assert_eq!(unacked_count(&mut con).await?, (0, 0));

    // An envelope without a body is invalid too.
    let _: () = con.lpush(q, r#"{"headers": {"id": "x"}}"#).await?;
    let nobody = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(nobody.message.content_type, INVALID_ENVELOPE);
    nobody.acker.reject(false).await?;
    consumer.cancel().await?;
    Ok(())
}

/// A crashed worker's message (popped, never settled) is restored by another broker's sweep once it is
/// older than `visibility_timeout` (not before), to the front of the line, with `redelivered`.
#[tokio::test]
async fn visibility_sweep_restores_a_dead_workers_message() -> Result<()> {
    let db = 13;
    let mut con = fresh_db(db).await?;
    let q = "visq";

    // Worker A takes m1 and "dies".
    let a = RedisBroker::connect(&url(db), short_visibility(Duration::from_secs(600))).await?;
    let mut ca = a.consume(&QueueSpec::dagster(q), 1).await?;
    a.publish("", q, task_message("m1", 1, 0)).await?;
    let m1 = next_within(&mut ca, Duration::from_secs(5)).await?;
    let popped_at = Instant::now();
    let tag = only_unacked_tag(&mut con).await?;
    drop((m1, ca, a));

    // Worker B sweeps every 500 ms.
    let b = RedisBroker::connect(&url(db), short_visibility(Duration::from_millis(500))).await?;
    let mut cb = b.consume(&QueueSpec::dagster(q), 1).await?;
    let again = next_within(&mut cb, Duration::from_secs(10)).await?;
    let waited = popped_at.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "restored after {waited:?}, before the visibility timeout"
    );
    assert_eq!(header(&again, "id"), Some("m1"));
    assert!(again.message.delivery_info.redelivered);
    assert_eq!(again.message.headers.get("redelivered"), Some(&json!(true)));
    assert_eq!(only_unacked_tag(&mut con).await?, tag, "same delivery tag");
    again.acker.ack().await?;
    assert_eq!(unacked_count(&mut con).await?, (0, 0));
    cb.cancel().await?;
    drop(cb);

    // Restores go to the front (RPUSH): m2 is restored ahead of n2, which was waiting.
    let a2 = RedisBroker::connect(&url(db), short_visibility(Duration::from_secs(600))).await?;
    let mut ca2 = a2.consume(&QueueSpec::dagster("frontq"), 1).await?;
    a2.publish("", "frontq", task_message("m2", 2, 0)).await?;
    let m2 = next_within(&mut ca2, Duration::from_secs(5)).await?;
    drop((m2, ca2, a2));
    b.publish("", "frontq", task_message("n2", 3, 0)).await?;
    assert_eq!(b.restore_visible().await?, 0, "too young to restore");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    // The background sweep may have won the race; either way exactly one restore happened.
    let restored = b.restore_visible().await?;
    let list: Vec<String> = con.lrange("frontq", 0, -1).await?;
    assert_eq!(list.len(), 2, "restored={restored} {list:?}");
    let front: Value = serde_json::from_str(&list[1])?; // RPUSH end = consumed next
    assert_eq!(
        front["headers"]["id"],
        json!("m2"),
        "restore did not go to the front"
    );
    assert_eq!(
        front["properties"]["delivery_info"]["redelivered"],
        json!(true)
    );
    assert_eq!(unacked_count(&mut con).await?, (0, 0));
    let mutex: Option<String> = con.get("unacked_mutex").await?;
    assert_eq!(mutex, None, "the sweep released its mutex");
    Ok(())
}

/// A held message whose acker keeps it alive is never restored, even with a 2 s visibility timeout
/// and another broker sweeping every 500 ms; once the keep-alives stop, it is.
#[tokio::test]
async fn keep_alive_prevents_restore() -> Result<()> {
    let db = 14;
    let mut con = fresh_db(db).await?;
    let q = "keepq";
    let a = RedisBroker::connect(&url(db), short_visibility(Duration::from_secs(600))).await?;
    assert_eq!(a.keep_alive_interval(), Some(Duration::from_secs(1)));
    let mut ca = a.consume(&QueueSpec::dagster(q), 1).await?;
    a.publish("", q, task_message("long", 1, 0)).await?;
    let held = next_within(&mut ca, Duration::from_secs(5)).await?;
    let tag = only_unacked_tag(&mut con).await?;

    let b = RedisBroker::connect(&url(db), short_visibility(Duration::from_millis(500))).await?;
    let mut cb = b.consume(&QueueSpec::dagster(q), 1).await?;
    // The holder refreshes every 500 ms for 6 s while B polls (never cancelling `next()` mid-flight).
    let keeper = tokio::spawn(async move {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(6) {
            held.acker.keep_alive().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok::<Delivery, BrokerError>(held)
    });
    while !keeper.is_finished() {
        if let Some(d) = cb.next().await? {
            bail!("a kept-alive message was restored: {:?}", d.message.headers);
        }
    }
    let held = keeper.await??;
    let (entry, _) = unacked_entry(&mut con, &tag).await?;
    assert!(entry.is_some(), "still held after 6 s");
    let len: u64 = con.llen(q).await?;
    assert_eq!(len, 0);

    // Keep-alives stop (the worker died): B's sweep restores it.
    let restored = next_within(&mut cb, Duration::from_secs(8)).await?;
    assert_eq!(header(&restored, "id"), Some("long"));
    assert!(restored.message.delivery_info.redelivered);
    restored.acker.ack().await?;
    // The old acker's keep-alive must not resurrect the entry (ZADD XX).
    held.acker.keep_alive().await?;
    assert_eq!(unacked_count(&mut con).await?, (0, 0));
    drop(ca);

    let long = RedisBroker::connect(&url(db), RedisTransportOptions::default()).await?;
    assert_eq!(long.keep_alive_interval(), Some(Duration::from_secs(60)));
    let mid = RedisBroker::connect(
        &url(db),
        RedisTransportOptions {
            visibility_timeout: Duration::from_secs(100),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(mid.keep_alive_interval(), Some(Duration::from_secs(25)));
    Ok(())
}

const KOMBU_BIND: &str = r#"
import os
from kombu import Connection, Exchange, Queue
with Connection(os.environ['URL']) as c:
    ch = c.channel()
    Queue('boundq', Exchange('ex', type='direct'), routing_key='rk')(ch).declare()
print('{}')
"#;

/// What Rust publishes, Python kombu consumes: default exchange into the priority list, and a named
/// direct exchange through kombu's binding table.
#[tokio::test]
async fn rust_publish_is_read_by_python_kombu() -> Result<()> {
    let db = 15;
    let mut con = fresh_db(db).await?;
    let q = "pubq";
    let broker = RedisBroker::connect(&url(db), RedisTransportOptions::default()).await?;
    let mut msg = task_message("p1", 42, 6);
    msg.headers
        .insert("custom".into(), json!({"nested": [1, 2]}));
    broker.publish("", q, msg).await?;
    let raw: Vec<String> = con.lrange(format!("{q}{SEP}6"), 0, -1).await?;
    assert_eq!(raw.len(), 1, "priority 6 goes to {q}\\x06\\x166");
    assert!(
        raw[0].starts_with(r#"{"body": ""#)
            && raw[0].contains(
                r#", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"#
            ),
        "envelope bytes/key order differ from kombu's: {}",
        raw[0]
    );
    let got = last_json_line(&run_python(KOMBU_GET, db, q).await?)?;
    assert_eq!(
        got["payload"],
        json!([[42], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]),
        "{got}"
    );
    assert_eq!(got["headers"]["task"], json!("t"));
    assert_eq!(got["headers"]["id"], json!("p1"));
    assert_eq!(got["headers"]["custom"], json!({"nested": [1, 2]}));
    assert_eq!(got["content_type"], json!("application/json"));
    assert_eq!(got["properties"]["correlation_id"], json!("p1"));
    assert_eq!(got["properties"]["reply_to"], json!("reply-oid"));
    assert_eq!(got["properties"]["priority"], json!(6));
    assert_eq!(got["delivery_info"]["routing_key"], json!(q));
    assert_eq!(got["delivery_info"]["exchange"], json!(""));
    let tag = got["delivery_tag"].as_str().context("delivery_tag")?;
    ensure!(
        uuid::Uuid::parse_str(tag).is_ok(),
        "delivery_tag is not a uuid: {tag}"
    );

    // Named exchange: routed by kombu's binding table (direct semantics); unbound keys are dropped.
    run_python(KOMBU_BIND, db, q).await?;
    broker.publish("ex", "rk", task_message("p2", 2, 0)).await?;
    broker
        .publish("ex", "other", task_message("p3", 3, 0))
        .await?;
    broker
        .publish("nobody", "rk", task_message("p4", 4, 0))
        .await?;
    let len: u64 = con.llen("boundq").await?;
    assert_eq!(len, 1);
    let got = last_json_line(&run_python(KOMBU_GET, db, "boundq").await?)?;
    assert_eq!(got["headers"]["id"], json!("p2"), "{got}");
    assert_eq!(got["delivery_info"]["exchange"], json!("ex"));
    assert_eq!(got["delivery_info"]["routing_key"], json!("rk"));
    assert_eq!(broker.queue_length(q).await?, 0);
    assert_eq!(broker.transport(), "redis");
    Ok(())
}

const ASYNC_RESULT_GET: &str = r#"
import json, os, sys
from celery import Celery
app = Celery(broker=os.environ['URL'], backend=os.environ['URL'])
r = app.AsyncResult(os.environ['Q'])
print(json.dumps({'value': r.get(timeout=30), 'state': r.state}))
"#;

/// Python's `AsyncResult.get()` receives what `RedisBackend` stores (while it is waiting, i.e. via
/// PUBLISH, and later via GET); a FAILURE stored after a SUCCESS does not replace it.
#[tokio::test]
async fn redis_backend_results_reach_python() -> Result<()> {
    let db = 8;
    let mut con = fresh_db(db).await?;
    let backend = RedisBackend::connect(&url(db), Duration::from_secs(86400)).await?;
    assert_eq!(backend.scheme(), "redis");
    let id = uuid::Uuid::new_v4().to_string();
    let key = format!("celery-task-meta-{id}");
    let target = ReplyTarget {
        task_id: id.clone(),
        reply_to: None,
        correlation_id: id.clone(),
    };
    // STARTED does not block a later SUCCESS.
    backend
        .store(&target, &ResultMeta::started(&id, 42, "w@host"))
        .await?;

    let waiter = python_cmd(ASYNC_RESULT_GET, db, &id)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Wait until Python subscribed to the key, so the result reaches it through PUBLISH.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&key)
            .query_async::<Vec<(String, u64)>>(&mut con)
            .await?
            .into_iter()
            .next()
            .context("PUBSUB NUMSUB answer")?;
        if n > 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "python never subscribed to {key}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let value = json!([1, "two", 3.5, {"four": null}]);
    backend
        .store(&target, &ResultMeta::success(&id, value.clone()))
        .await?;
    let out = tokio::time::timeout(Duration::from_secs(40), waiter.wait_with_output())
        .await
        .context("python AsyncResult.get timed out")??;
    let got = last_json_line(&check_output(out)?)?;
    assert_eq!(got["value"], value);
    assert_eq!(got["state"], json!("SUCCESS"));

    let ttl: i64 = con.ttl(&key).await?;
    assert!((86000..=86400).contains(&ttl), "TTL {ttl}");
    let exc = ExceptionInfo::new("ValueError", "builtins", "late failure");
    backend
        .store(&target, &ResultMeta::failure(&id, &exc, Some("tb".into())))
        .await?;
    let stored: String = con.get(&key).await?;
    let stored: Value = serde_json::from_str(&stored)?;
    assert_eq!(
        stored["status"],
        json!("SUCCESS"),
        "SUCCESS was overwritten"
    );
    let got = last_json_line(&run_python(ASYNC_RESULT_GET, db, &id).await?)?;
    assert_eq!(got["value"], value);
    Ok(())
}

/// A killed connection makes `next()` fail with `ConnectionLost`; `consume()` again reconnects and
/// nothing is lost; acking over the auto-reconnecting command connection still works.
#[tokio::test]
async fn consumer_reports_connection_loss_and_reconsumes() -> Result<()> {
    let db = 7;
    let mut con = fresh_db(db).await?;
    let q = "lossq";
    let broker = RedisBroker::connect(&url(db), RedisTransportOptions::default()).await?;
    let mut consumer = broker.consume(&QueueSpec::dagster(q), 1).await?;
    assert!(consumer.next().await?.is_none());
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        // Kill every db-7 connection that last ran BRPOP, then poll.
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut con)
            .await?;
        for l in list.lines() {
            if l.contains(&format!(" db={db} ")) && l.contains(" cmd=brpop") {
                if let Some(id) = l.split(' ').find_map(|f| f.strip_prefix("id=")) {
                    let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("ID")
                        .arg(id)
                        .query_async(&mut con)
                        .await;
                }
            }
        }
        match consumer.next().await {
            Err(e) => break e,
            Ok(Some(_)) => bail!("unexpected delivery"),
            Ok(None) => ensure!(Instant::now() < deadline, "next() never noticed the kill"),
        }
    };
    assert!(
        matches!(err, BrokerError::ConnectionLost(_)),
        "expected ConnectionLost, got {err:?}"
    );
    assert!(err.to_string().contains("BRPOP"), "no context in {err}");

    broker.publish("", q, task_message("after", 1, 0)).await?;
    let mut consumer = broker.consume(&QueueSpec::dagster(q), 1).await?;
    let d = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(header(&d, "id"), Some("after"));
    d.acker.ack().await?;
    assert_eq!(unacked_count(&mut con).await?, (0, 0));

    let bad = RedisBroker::connect(
        "redis://:s3cret@127.0.0.1:1/0",
        RedisTransportOptions::default(),
    )
    .await;
    let msg = format!("{:?}", bad.err().context("connecting to port 1 succeeded")?);
    assert!(!msg.contains("s3cret"), "password leaked: {msg}");
    Ok(())
}
