//! `AmqpBroker` against the real RabbitMQ at 127.0.0.1:5672 (guest/guest) and real Python celery 5.7
//! (`$HOME/.cache/celeriac/venv`, created by `scripts/python-peers.sh`).
//!
//! Every test uses its own uniquely named queue and deletes it (and its exchange) at the end.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use celeriac_wire::backend::{ReplyTarget, ResultBackend, RpcBackend};
use celeriac_wire::broker::amqp::AmqpBroker;
use celeriac_wire::broker::{
    Broker, BrokerError, Consumer, Delivery, ExchangeKind, ExchangeSpec, OutgoingMessage,
    QueueSpec, Subscription,
};
use celeriac_wire::message::Properties;
use celeriac_wire::result::{ExceptionInfo, ResultMeta};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2F";
const CELERY_BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";

fn python() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    format!("{home}/.cache/celeriac/venv/bin/python")
}

fn unique(prefix: &str) -> String {
    format!("celeriac-test-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Deletes the test queue and its exchange at the end (or, after a panic, the queue via rabbitmqctl).
struct QueueGuard {
    name: String,
    cleaned: bool,
}

impl QueueGuard {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            cleaned: false,
        }
    }

    async fn cleanup(mut self) -> Result<()> {
        let conn = lapin::Connection::connect(URI, lapin::ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.queue_delete(self.name.as_str().into(), Default::default())
            .await?;
        ch.exchange_delete(self.name.as_str().into(), Default::default())
            .await?;
        conn.close(200, "OK".into()).await?;
        self.cleaned = true;
        Ok(())
    }
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        if !self.cleaned {
            // After a failure: delete synchronously through py-amqp (no async runtime in Drop).
            let _ = std::process::Command::new(python())
                .arg("-c")
                .arg(
                    "import amqp, sys\nc = amqp.Connection('127.0.0.1:5672'); c.connect(); ch = c.channel()\n\
                     ch.queue_delete(sys.argv[1]); ch.exchange_delete(sys.argv[1]); c.close()",
                )
                .arg(&self.name)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs a Python snippet to completion; fails on a non-zero exit. `Q` and `BROKER` are in its environment.
async fn run_python(script: &str, queue: &str) -> Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python())
            .arg("-c")
            .arg(script)
            .env("Q", queue)
            .env("BROKER", CELERY_BROKER)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("python timed out")??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "python failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
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

fn body_json(d: &Delivery) -> Result<Value> {
    serde_json::from_slice(&d.message.body).context("body is not JSON")
}

async fn publish_n(broker: &AmqpBroker, queue: &str, n: usize) -> Result<()> {
    for i in 0..n {
        let mut msg = OutgoingMessage::json(json!({ "n": i }).to_string());
        msg.properties = Properties {
            delivery_mode: Some(2),
            priority: Some(0),
            ..Default::default()
        };
        broker.publish("", queue, msg).await?;
    }
    Ok(())
}

const SEND_TASKS: &str = r#"
import json, os
from celery import Celery
app = Celery(broker=os.environ['BROKER'])
app.conf.task_queue_max_priority = 10
prios = [0, 5, 9, 5, 1, 9, 0, 3, 5, 9]
out = []
for i, p in enumerate(prios):
    r = app.send_task('t', args=[i], kwargs={'k': 'v'}, queue=os.environ['Q'], priority=p, headers={'custom': 1})
    out.append({'i': i, 'id': r.id, 'priority': p})
print(json.dumps({'tasks': out, 'oid': app.thread_oid}))
"#;

/// Python publishes 10 tasks with mixed priorities before anyone consumes; prefetch 1 receives them in
/// RabbitMQ priority order (highest first, FIFO within a level) with headers, properties and body intact.
#[tokio::test]
async fn python_tasks_arrive_in_priority_order_with_headers_and_properties() -> Result<()> {
    let q = unique("prio");
    let guard = QueueGuard::new(&q);
    let sent: Value = serde_json::from_str(run_python(SEND_TASKS, &q).await?.trim())?;
    let oid = sent["oid"]
        .as_str()
        .ok_or_else(|| anyhow!("no oid"))?
        .to_string();
    let mut tasks: Vec<Value> = sent["tasks"].as_array().cloned().unwrap_or_default();
    ensure!(tasks.len() == 10, "python sent {tasks:?}");
    // Stable sort: priority descending, publish order within a level.
    tasks.sort_by_key(|t| std::cmp::Reverse(t["priority"].as_u64().unwrap_or(0)));

    let broker = AmqpBroker::connect(URI).await?;
    let mut consumer = broker.consume(&QueueSpec::dagster(&q), 1).await?;
    for expected in &tasks {
        let d = next_within(&mut consumer, Duration::from_secs(10)).await?;
        let m = &d.message;
        let id = expected["id"].as_str().unwrap_or_default();
        assert_eq!(
            m.headers.get("id"),
            Some(&json!(id)),
            "order: expected task {expected}"
        );
        assert_eq!(m.headers.get("task"), Some(&json!("t")));
        assert_eq!(m.headers.get("timelimit"), Some(&json!([null, null])));
        assert_eq!(m.headers.get("retries"), Some(&json!(0)));
        assert_eq!(m.headers.get("custom"), Some(&json!(1)));
        assert_eq!(m.headers.get("lang"), Some(&json!("py")));
        assert_eq!(
            m.properties.priority,
            expected["priority"].as_u64().map(|p| p as u8)
        );
        assert_eq!(m.properties.correlation_id.as_deref(), Some(id));
        assert_eq!(m.properties.reply_to.as_deref(), Some(oid.as_str()));
        assert_eq!(m.properties.delivery_mode, Some(2));
        assert_eq!(m.content_type, "application/json");
        assert_eq!(m.content_encoding, "utf-8");
        assert_eq!(m.delivery_info.exchange, "");
        assert_eq!(m.delivery_info.routing_key, q);
        assert_eq!(m.delivery_info.queue, q);
        assert!(!m.delivery_info.redelivered);
        let body = body_json(&d)?;
        assert_eq!(body[0], json!([expected["i"]]));
        assert_eq!(body[1], json!({"k": "v"}));
        assert_eq!(
            body[2],
            json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null})
        );
        // The decoder accepts what we converted.
        let req = celeriac_wire::message::decode(m, &["json".to_string()], None)?;
        assert_eq!(req.id, id);
        d.acker.ack().await?;
    }
    assert!(consumer.next().await?.is_none(), "more than 10 deliveries");
    consumer.cancel().await?;
    assert_eq!(broker.queue_length(&q).await?, 0);
    guard.cleanup().await
}

/// Queues declared by Python celery (x-max-priority 10 as `I`) are re-declared without 406, a
/// mismatching declaration is refused (so the check can fail), and Python can publish to ours.
#[tokio::test]
async fn declarations_match_python_celery() -> Result<()> {
    let broker = AmqpBroker::connect(URI).await?;

    // Python first.
    let q1 = unique("pyfirst");
    let g1 = QueueGuard::new(&q1);
    run_python(SEND_TASKS, &q1).await?;
    let mut c = broker
        .consume(&QueueSpec::dagster(&q1), 4)
        .await
        .context("re-declaring Python's queue")?;
    let d = next_within(&mut c, Duration::from_secs(5)).await?;
    d.acker.ack().await?;
    c.cancel().await?;
    // Without x-max-priority the same queue is refused (406 PRECONDITION_FAILED)…
    let plain = QueueSpec {
        name: q1.clone(),
        max_priority: None,
        expires_ms: None,
        with_exchange: true,
    };
    match broker.consume(&plain, 1).await {
        Err(BrokerError::Refused { operation, reason }) => {
            assert!(operation.contains("queue.declare"), "{operation}");
            assert!(
                reason.contains("PRECONDITION") || reason.contains("406"),
                "{reason}"
            );
        }
        Err(other) => bail!("expected a refusal, got {other}"),
        Ok(_) => bail!("a mismatching declaration was accepted"),
    }
    // …and the broker is still usable afterwards (406 only closed that channel).
    assert_eq!(broker.queue_length(&q1).await?, 9);
    g1.cleanup().await?;

    // Ours first, then Python publishes to it (it re-declares with its own arguments).
    let q2 = unique("rustfirst");
    let g2 = QueueGuard::new(&q2);
    let mut c = broker.consume(&QueueSpec::dagster(&q2), 1).await?;
    c.cancel().await?;
    run_python(SEND_TASKS, &q2)
        .await
        .context("python publishing to our queue")?;
    let mut c = broker.consume(&QueueSpec::dagster(&q2), 1).await?;
    let d = next_within(&mut c, Duration::from_secs(5)).await?;
    assert_eq!(d.message.properties.priority, Some(9));
    d.acker.ack().await?;
    c.cancel().await?;
    assert_eq!(broker.queue_length(&q2).await?, 9);
    g2.cleanup().await
}

/// Per-consumer prefetch: with 2 unacked deliveries out, no third arrives until one is acked.
#[tokio::test]
async fn prefetch_window_holds_until_ack() -> Result<()> {
    let q = unique("prefetch");
    let guard = QueueGuard::new(&q);
    let broker = AmqpBroker::connect(URI).await?;
    let mut consumer = broker.consume(&QueueSpec::dagster(&q), 2).await?;
    publish_n(&broker, &q, 5).await?;
    let first = next_within(&mut consumer, Duration::from_secs(5)).await?;
    let second = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(body_json(&first)?, json!({"n": 0}));
    assert_eq!(body_json(&second)?, json!({"n": 1}));
    for _ in 0..2 {
        let started = Instant::now();
        assert!(
            consumer.next().await?.is_none(),
            "a third delivery exceeded prefetch 2"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "next() must wait about a second"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    first.acker.ack().await?;
    let third = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(body_json(&third)?, json!({"n": 2}));
    assert!(consumer.next().await?.is_none(), "window is 2 again");
    second.acker.ack().await?;
    third.acker.ack().await?;
    for n in 3..5 {
        let d = next_within(&mut consumer, Duration::from_secs(5)).await?;
        assert_eq!(body_json(&d)?, json!({ "n": n }));
        d.acker.ack().await?;
    }
    consumer.cancel().await?;
    guard.cleanup().await
}

/// reject(requeue) redelivers with `redelivered=true`; double settling is a no-op; cancel() hands unacked
/// deliveries back to the queue, where a fresh consumer and Python both see them.
#[tokio::test]
async fn reject_requeue_and_cancel_return_messages() -> Result<()> {
    let q = unique("reject");
    let guard = QueueGuard::new(&q);
    let broker = AmqpBroker::connect(URI).await?;
    let mut consumer = broker.consume(&QueueSpec::dagster(&q), 5).await?;
    publish_n(&broker, &q, 1).await?;
    let d = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert!(!d.message.delivery_info.redelivered);
    d.acker.reject(true).await?;
    d.acker.ack().await?; // settled already: no-op, no channel error
    let again = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(body_json(&again)?, json!({"n": 0}));
    assert!(again.message.delivery_info.redelivered);
    // reject without requeue drops it.
    again.acker.reject(false).await?;
    again.acker.reject(true).await?;
    assert!(consumer.next().await?.is_none());

    publish_n(&broker, &q, 3).await?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_within(&mut consumer, Duration::from_secs(5)).await?);
    }
    consumer.cancel().await?;
    consumer.cancel().await?; // idempotent
    assert!(consumer.next().await?.is_none());
    // Acking on the closed channel cannot succeed: the broker owns the messages again.
    assert!(matches!(
        held[0].acker.ack().await,
        Err(BrokerError::ConnectionLost(_))
    ));
    assert_eq!(broker.queue_length(&q).await?, 3);

    let mut fresh = broker.consume(&QueueSpec::dagster(&q), 1).await?;
    let d = next_within(&mut fresh, Duration::from_secs(5)).await?;
    assert!(d.message.delivery_info.redelivered);
    assert_eq!(body_json(&d)?, json!({"n": 0}));
    fresh.cancel().await?; // back again, unacked
    let py = run_python(
        r#"
import os
from kombu import Connection, Exchange, Queue
name = os.environ['Q']
with Connection(os.environ['BROKER']) as conn:
    q = conn.SimpleQueue(Queue(name, Exchange(name), name, queue_arguments={'x-max-priority': 10}))
    for _ in range(3):
        m = q.get(timeout=5)
        print(m.delivery_info['redelivered'], m.payload['n'])
        m.ack()
    q.close()
"#,
        &q,
    )
    .await?;
    assert_eq!(
        py.lines().collect::<Vec<_>>(),
        vec!["True 0", "True 1", "True 2"]
    );
    guard.cleanup().await
}

/// Celery's rpc:// round trip: Python waits on `result.get()`, we consume the task and publish the result
/// through `RpcBackend` over this broker.
#[tokio::test]
async fn rpc_results_reach_python_clients() -> Result<()> {
    let q = unique("rpc");
    let guard = QueueGuard::new(&q);
    let broker = Arc::new(AmqpBroker::connect(URI).await?);
    let backend = RpcBackend::new(broker.clone());
    let mut consumer = broker.consume(&QueueSpec::dagster(&q), 1).await?;

    let success = ResultMeta::success("", json!(["a", "b"]));
    let out = rpc_round_trip(&mut consumer, &backend, &q, |id| ResultMeta {
        task_id: id.into(),
        ..success.clone()
    })
    .await?;
    assert!(out.contains("RESULT ['a', 'b']"), "python said: {out}");

    let exc = ExceptionInfo::new("ValueError", "builtins", "boom");
    let out = rpc_round_trip(&mut consumer, &backend, &q, |id| {
        ResultMeta::failure(id, &exc, None)
    })
    .await?;
    assert!(
        out.contains("ERROR ValueError ValueError('boom')"),
        "python said: {out}"
    );

    consumer.cancel().await?;
    guard.cleanup().await
}

async fn rpc_round_trip(
    consumer: &mut Box<dyn Consumer>,
    backend: &RpcBackend,
    queue: &str,
    meta: impl Fn(&str) -> ResultMeta,
) -> Result<String> {
    let script = r#"
import os, sys
from celery import Celery
app = Celery(broker=os.environ['BROKER'], backend='rpc://')
app.conf.task_queue_max_priority = 10
r = app.send_task('t', args=[1], queue=os.environ['Q'])
print('SENT', r.id, flush=True)
try:
    print('RESULT', repr(r.get(timeout=20)), flush=True)
except Exception as e:
    print('ERROR', type(e).__name__, repr(e), flush=True)
"#;
    let mut child = tokio::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .env("Q", queue)
        .env("BROKER", CELERY_BROKER)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting python")?;
    let d = next_within(consumer, Duration::from_secs(20)).await?;
    let m = &d.message;
    let task_id = m
        .headers
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no id header"))?
        .to_string();
    let target = ReplyTarget {
        task_id: task_id.clone(),
        reply_to: m.properties.reply_to.clone(),
        correlation_id: m
            .properties
            .correlation_id
            .clone()
            .unwrap_or_else(|| task_id.clone()),
    };
    ensure!(target.reply_to.is_some(), "no reply_to on the task message");
    backend.store(&target, &meta(&task_id)).await?;
    d.acker.ack().await?;

    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("python still waiting")??;
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut stdout).await?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut stderr).await?;
    }
    ensure!(status.success(), "python failed: {stdout}\n{stderr}");
    ensure!(
        stdout.contains(&format!("SENT {task_id}")),
        "python sent another task: {stdout}"
    );
    Ok(stdout)
}

/// Connection loss surfaces as `ConnectionLost` from `next()`; `consume()` and `publish()` reconnect.
#[tokio::test]
async fn reconnects_after_connection_loss() -> Result<()> {
    let q = unique("reconnect");
    let guard = QueueGuard::new(&q);
    let name = unique("conn");
    let broker = AmqpBroker::connect_named(URI, &name).await?;
    let mut consumer = broker.consume(&QueueSpec::dagster(&q), 1).await?;
    publish_n(&broker, &q, 1).await?;
    let held = next_within(&mut consumer, Duration::from_secs(5)).await?;

    close_connection_named(&name).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match consumer.next().await {
            Err(BrokerError::ConnectionLost(_)) => break,
            Ok(None) if Instant::now() < deadline => continue,
            other => bail!("expected ConnectionLost, got {other:?}"),
        }
    }
    assert!(
        held.acker.ack().await.is_err(),
        "ack on a dead connection must not claim success"
    );

    publish_n(&broker, &q, 1)
        .await
        .context("publish after reconnect")?;
    let mut consumer = broker
        .consume(&QueueSpec::dagster(&q), 1)
        .await
        .context("consume after reconnect")?;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = next_within(&mut consumer, Duration::from_secs(5)).await?;
        seen.push((body_json(&d)?, d.message.delivery_info.redelivered));
        d.acker.ack().await?;
    }
    assert_eq!(
        seen,
        vec![(json!({"n": 0}), true), (json!({"n": 0}), false)]
    );
    consumer.cancel().await?;
    guard.cleanup().await
}

/// Closes the RabbitMQ connection whose `connection_name` client property is `name`.
async fn close_connection_named(name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "-q",
                "--no-table-headers",
                "pid",
                "client_properties",
            ])
            .output()
            .await?;
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        // `<rabbit@host.N.M.0>\t[{"product",...},{"connection_name","<name>"},...]`
        let found = listing
            .lines()
            .find(|l| l.contains(&format!("\"{name}\"")))
            .and_then(|l| l.split('\t').next())
            .map(str::to_owned);
        if let Some(pid) = found {
            let status = tokio::process::Command::new("rabbitmqctl")
                .args([
                    "close_connection",
                    &pid,
                    "celeriac test: simulated connection loss",
                ])
                .stdout(Stdio::null())
                .status()
                .await?;
            ensure!(
                status.success(),
                "rabbitmqctl close_connection {pid} failed"
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("connection {name} not listed by rabbitmqctl: {listing}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Connection errors name the redacted URL and the cause.
#[tokio::test]
async fn connect_errors_name_redacted_url() -> Result<()> {
    match AmqpBroker::connect("amqp://guest:hunter2@127.0.0.1:1/%2F").await {
        Err(e @ BrokerError::Connect { .. }) => {
            let text = e.to_string();
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("127.0.0.1:1"), "{text}");
            assert!(text.contains("***"), "{text}");
        }
        other => bail!("expected a connect error, got {:?}", other.map(|_| ())),
    }
    Ok(())
}

/// Broadcast exchanges and no-ack subscriptions (pidbox/gossip layout), plus a refused publish that does
/// not poison later publishes.
#[tokio::test]
async fn broadcast_reaches_subscriptions() -> Result<()> {
    let broker = AmqpBroker::connect(URI).await?;
    // A private fanout exchange: the real `celery.pidbox` would reach other workers on this RabbitMQ.
    let exchange = ExchangeSpec {
        name: unique("fanout"),
        kind: ExchangeKind::Fanout,
        durable: false,
    };
    let sub = Subscription {
        exchange: exchange.clone(),
        queue: format!("{}.celery.pidbox", unique("node")),
        binding_key: String::new(),
        exclusive: true,
        message_ttl_ms: Some(300_000),
        expires_ms: Some(10_000),
    };
    let mut consumer = broker.subscribe(&sub).await?;
    let mut msg = OutgoingMessage::json(json!({"method": "ping"}).to_string());
    msg.headers.insert("clock".into(), json!(3_000_000_000u64));
    msg.headers.insert("ratio".into(), json!(0.25));
    msg.headers
        .insert("nested".into(), json!({"a": [1, null, true, "x"]}));
    msg.properties.reply_to = Some("oid".into());
    broker.broadcast(&exchange, "", msg).await?;
    let d = next_within(&mut consumer, Duration::from_secs(5)).await?;
    assert_eq!(body_json(&d)?, json!({"method": "ping"}));
    assert_eq!(
        d.message.headers.get("clock"),
        Some(&json!(3_000_000_000u64))
    );
    assert_eq!(d.message.headers.get("ratio"), Some(&json!(0.25)));
    assert_eq!(
        d.message.headers.get("nested"),
        Some(&json!({"a": [1, null, true, "x"]}))
    );
    assert_eq!(d.message.delivery_info.exchange, exchange.name);
    assert_eq!(d.message.properties.reply_to.as_deref(), Some("oid"));
    d.acker.ack().await?; // no-ack subscription: a no-op
    consumer.cancel().await?;

    // Publishing to an exchange that does not exist is refused (404) and the next publish still works.
    let missing = unique("missing");
    match broker
        .publish(&missing, "rk", OutgoingMessage::json("{}".into()))
        .await
    {
        Err(BrokerError::Refused { reason, .. }) => {
            assert!(reason.contains("NOT") || reason.contains("404"), "{reason}")
        }
        other => bail!("expected a refusal, got {other:?}"),
    }
    let q = unique("after404");
    let guard = QueueGuard::new(&q);
    let mut c = broker.consume(&QueueSpec::dagster(&q), 1).await?;
    publish_n(&broker, &q, 1).await?;
    next_within(&mut c, Duration::from_secs(5))
        .await?
        .acker
        .ack()
        .await?;
    c.cancel().await?;
    guard.cleanup().await?;

    let conn = lapin::Connection::connect(URI, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.exchange_delete(exchange.name.as_str().into(), Default::default())
        .await?;
    conn.close(200, "OK".into()).await?;
    Ok(())
}

/// Task consumers carry a per-consumer acknowledgement timeout above Dagster's 24 h `job_wait_timeout`,
/// so a long step held for late ack does not hit RabbitMQ's 30-minute default (3.12+ honour it).
#[tokio::test]
async fn task_consumers_carry_a_long_ack_timeout() -> Result<()> {
    let q = unique("ackto");
    let _guard = QueueGuard::new(&q);
    let broker = AmqpBroker::connect(URI).await?;
    let _consumer = broker.consume(&QueueSpec::dagster(&q), 1).await?;
    // `rabbitmqctl --formatter json` prints one consumer object per line between `[` and `]`; the
    // closing `]` is sometimes missing (the listing streams while other tests' channels close), so
    // the lines are read one by one, and the listing is asked again when ours is not in it yet.
    let mut ours = Value::Null;
    let mut text = String::new();
    for _ in 0..5 {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_consumers",
                "queue_name",
                "arguments",
                "--formatter",
                "json",
            ])
            .output()
            .await?;
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(found) = text
            .lines()
            .map(|l| l.trim().trim_matches(','))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|c| c["queue_name"] == q.as_str())
        {
            ours = found;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(
        ours.to_string().contains("x-consumer-timeout") && ours.to_string().contains("90000000"),
        "consumer arguments: {ours} (rabbitmqctl said: {text})"
    );
    Ok(())
}
