//! Redis broker with kombu's virtual-transport layout (kombu 5.7, spec §9), so Python and Rust workers
//! can share one Redis: priority sub-lists `q`, `q\x06\x163`, `q\x06\x166`, `q\x06\x169`; the `unacked`
//! hash and `unacked_index` sorted set for acknowledgement emulation; the visibility-timeout restore
//! guarded by `unacked_mutex`; `_kombu.binding.*` routing tables; pub/sub for fanout exchanges.
//!
//! Where messages go back, exactly as kombu does it (spec §9.2, gotcha 17):
//! * [`Acker::reject`] with `requeue = true` → `LPUSH`: the **back** of the line (`leftmost=True`);
//! * the visibility sweep ([`RedisBroker::restore_visible`]) → `RPUSH`: the **front**, consumed next.
//!
//! Two improvements over Python Celery, both compatible with it:
//! * a held message's `unacked_index` score is refreshed ([`Acker::keep_alive`]) while its step runs, so
//!   no worker's sweep restores (and duplicates) a long step, while a dead worker's messages are still
//!   restored after `visibility_timeout`;
//! * [`PriorityOrder::Dagster`] optionally serves the highest priority bucket first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use futures::StreamExt;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::AsyncCommands;
use serde_json::{json, Map, Value};
use tokio::sync::{Mutex, OnceCell};
use tracing::{debug, error, info, warn};

use super::{
    Acker, Broker, BrokerError, Consumer, Delivery, ExchangeKind, ExchangeSpec, NoAck,
    OutgoingMessage, QueueSpec, Subscription,
};
use crate::json::{parse_lenient, to_python_string};
use crate::message::{DeliveryInfo, Properties, RawMessage};
use crate::redis_conn::{ResilientConnection, HEALTH_CHECK_INTERVAL};
use crate::url::redact;

const UNACKED: &str = "unacked";
const UNACKED_INDEX: &str = "unacked_index";
const UNACKED_MUTEX: &str = "unacked_mutex";
/// How long the sweep's mutex lives if its holder dies (kombu: `unacked_mutex_expire` 300 s).
const MUTEX_EXPIRE_MS: u64 = 300_000;
/// BRPOP's blocking timeout in seconds (kombu: `brpop_timeout`).
const BRPOP_TIMEOUT_S: u64 = 1;
/// Content type given to list elements that are not kombu envelopes, so the worker rejects them visibly.
pub const INVALID_ENVELOPE: &str = "application/x-invalid-envelope";

/// Which priority bucket BRPOP serves first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PriorityOrder {
    /// kombu's order: `q, q\x06\x163, q\x06\x166, q\x06\x169` (lower number = higher priority on Redis).
    #[default]
    Kombu,
    /// Reverse: `q\x06\x169` first, so a higher Dagster priority runs first as on RabbitMQ.
    Dagster,
}

/// kombu transport options celeriac honours.
#[derive(Debug, Clone)]
pub struct RedisTransportOptions {
    /// Age after which an unacknowledged message is restored by anyone's sweep (default 3600 s).
    pub visibility_timeout: Duration,
    pub priority_order: PriorityOrder,
    /// kombu `priority_steps` (default `[0, 3, 6, 9]`); producers, consumers and Flower must agree.
    pub priority_steps: Vec<u8>,
    /// kombu `sep` (default `"\x06\x16"`).
    pub sep: String,
    /// How often the visibility sweep runs (default 60 s); it also runs once at the first `consume`.
    pub restore_interval: Duration,
    /// CA and client certificate for `rediss://` (empty: the system's roots).
    pub tls: crate::tls::TlsMaterial,
}

impl Default for RedisTransportOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(3600),
            priority_order: PriorityOrder::Kombu,
            priority_steps: vec![0, 3, 6, 9],
            sep: "\x06\x16".into(),
            restore_interval: Duration::from_secs(60),
            tls: Default::default(),
        }
    }
}

struct Inner {
    client: redis::Client,
    url: String,
    db: i64,
    options: RedisTransportOptions,
    /// Auto-reconnecting, multiplexed, health-checked: publishing, acking, bindings, the sweep's mutex.
    commands: Arc<ResilientConnection>,
    /// A connection of its own for WATCH transactions (restore, requeue); `None` after an error.
    watch_con: Mutex<Option<MultiplexedConnection>>,
    sweeper: OnceCell<()>,
}

/// A Redis broker connection.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn lost(what: impl std::fmt::Display, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::ConnectionLost(format!("redis {what}: {e}"))
}

/// `properties.priority` as kombu reads it (`int(...)`, missing/invalid → 0), clamped to 0..=9.
fn priority_of(v: Option<&Value>) -> u8 {
    let p = match v {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.trunc() as i64))
            .unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse::<i64>().unwrap_or(0),
        _ => 0,
    };
    // Lossless: clamped to 0..=9 first.
    p.clamp(0, 9) as u8
}

impl RedisBroker {
    /// Connects the command connection (10 s timeout). Blocking connections are opened per consumer.
    pub async fn connect(
        url: &str,
        options: RedisTransportOptions,
    ) -> Result<RedisBroker, BrokerError> {
        let db = match crate::url::parse_broker(url) {
            Ok(crate::url::BrokerUrl::Redis { db, .. }) => db,
            Ok(_) => {
                return Err(BrokerError::Connect {
                    url: redact(url),
                    reason: "not a redis:// or rediss:// URL".into(),
                })
            }
            Err(e) => {
                return Err(BrokerError::Connect {
                    url: redact(url),
                    reason: e.to_string(),
                })
            }
        };
        let connect_err = |e: redis::RedisError| BrokerError::Connect {
            url: redact(url),
            reason: crate::tls::explain(e.to_string()),
        };
        let client = crate::tls::redis_client(url, &options.tls).map_err(connect_err)?;
        let commands = Arc::new(
            ResilientConnection::connect(client.clone(), "broker", redact(url))
                .await
                .map_err(connect_err)?,
        );
        commands.spawn_health_check(HEALTH_CHECK_INTERVAL);
        info!(url = %redact(url), "connected to Redis");
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                client,
                url: url.into(),
                db,
                options,
                commands,
                watch_con: Mutex::new(None),
                sweeper: OnceCell::new(),
            }),
        })
    }

    fn cmd(&self) -> ConnectionManager {
        self.inner.commands.get().1
    }

    /// A connection of its own, for blocking commands (BRPOP 1 s) and WATCH transactions; its response
    /// timeout leaves room for the blocking timeout.
    async fn dedicated(&self) -> Result<MultiplexedConnection, BrokerError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(10)))
            .set_response_timeout(Some(Duration::from_secs(BRPOP_TIMEOUT_S + 9)));
        self.inner
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| lost(format!("connect to {}", redact(&self.inner.url)), e))
    }

    /// The list a message of `priority` lives in: `q` for step 0, else `q<sep><step>`.
    pub fn list_for(&self, queue: &str, priority: u8) -> String {
        let p = priority.min(9);
        let step = self
            .inner
            .options
            .priority_steps
            .iter()
            .copied()
            .filter(|s| *s <= p)
            .max()
            .unwrap_or(0);
        if step == 0 {
            queue.to_string()
        } else {
            format!("{queue}{}{step}", self.inner.options.sep)
        }
    }

    /// BRPOP key order for `queue` ([`PriorityOrder`]).
    pub fn brpop_keys(&self, queue: &str) -> Vec<String> {
        let mut steps = self.inner.options.priority_steps.clone();
        steps.sort_unstable();
        steps.dedup();
        if self.inner.options.priority_order == PriorityOrder::Dagster {
            steps.reverse();
        }
        let mut keys: Vec<String> = Vec::with_capacity(steps.len());
        for key in steps.into_iter().map(|s| self.list_for(queue, s)) {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    /// Starts the visibility sweep once per broker: now, then every `restore_interval`.
    async fn ensure_sweeper(&self) {
        let this = self.clone();
        self.inner
            .sweeper
            .get_or_init(|| async move {
                let interval = this
                    .inner
                    .options
                    .restore_interval
                    .max(Duration::from_millis(10));
                let weak = Arc::downgrade(&this.inner);
                drop(this);
                tokio::spawn(async move {
                    loop {
                        let Some(inner) = weak.upgrade() else { return };
                        let broker = RedisBroker { inner };
                        match broker.restore_visible().await {
                            Ok(0) => {}
                            Ok(n) => info!(restored = n, "visibility sweep restored messages"),
                            Err(e) => debug!("visibility sweep failed: {e}"),
                        }
                        drop(broker);
                        tokio::time::sleep(interval).await;
                    }
                });
            })
            .await;
    }

    /// kombu's `restore_visible`: under `unacked_mutex`, puts every unacknowledged message older than
    /// `visibility_timeout` back at the front of its queue (RPUSH) with `redelivered = true`. Returns how
    /// many were restored (0 also when another process holds the mutex).
    pub async fn restore_visible(&self) -> Result<usize, BrokerError> {
        let mut con = self.cmd();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let acquired: Option<String> = redis::cmd("SET")
            .arg(UNACKED_MUTEX)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(MUTEX_EXPIRE_MS)
            .query_async(&mut con)
            .await
            .map_err(|e| lost(format!("SET {UNACKED_MUTEX} NX"), e))?;
        if acquired.is_none() {
            return Ok(0);
        }
        let ceiling = now() - self.inner.options.visibility_timeout.as_secs_f64();
        let result = async {
            let tags: Vec<String> = con
                .zrangebyscore(UNACKED_INDEX, "-inf", ceiling)
                .await
                .map_err(|e| lost(format!("ZRANGEBYSCORE {UNACKED_INDEX}"), e))?;
            let mut restored = 0;
            for tag in tags {
                if self.restore(&tag, true).await? {
                    warn!(delivery_tag = %tag, "restored an unacknowledged message older than the visibility timeout");
                    restored += 1;
                }
            }
            Ok(restored)
        }
        .await;
        let release = redis::Script::new(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
        );
        if let Err(e) = release
            .key(UNACKED_MUTEX)
            .arg(&token)
            .invoke_async::<i64>(&mut con)
            .await
        {
            warn!("cannot release {UNACKED_MUTEX} (it expires by itself): {e}");
        }
        result
    }

    /// Moves one unacked message back to its queue, kombu's `restore_by_tag`: RPUSH (front) for the
    /// sweep, LPUSH (back) for a requeue. `Ok(false)` when the entry was already gone (settled or restored
    /// by someone else).
    async fn restore(&self, tag: &str, front: bool) -> Result<bool, BrokerError> {
        let mut slot = self.inner.watch_con.lock().await;
        let mut con = match slot.take() {
            Some(con) => con,
            None => self.dedicated().await?,
        };
        let result = self.restore_on(&mut con, tag, front).await;
        if result.is_ok() {
            *slot = Some(con); // an errored connection may still be WATCHing: drop it
        }
        result
    }

    async fn restore_on(
        &self,
        con: &mut MultiplexedConnection,
        tag: &str,
        front: bool,
    ) -> Result<bool, BrokerError> {
        redis::cmd("WATCH")
            .arg(UNACKED)
            .query_async::<()>(con)
            .await
            .map_err(|e| lost(format!("WATCH {UNACKED}"), e))?;
        let stored: Option<Vec<u8>> = con
            .hget(UNACKED, tag)
            .await
            .map_err(|e| lost(format!("HGET {UNACKED} {tag}"), e))?;
        let Some(stored) = stored else {
            redis::cmd("UNWATCH")
                .query_async::<()>(con)
                .await
                .map_err(|e| lost("UNWATCH", e))?;
            return Ok(false);
        };
        let parts = match parse_lenient(&stored) {
            Ok(Value::Array(parts)) if !parts.is_empty() => parts,
            _ => {
                // Python kombu would fail on it too; keep it out of the way, but say so loudly.
                error!(delivery_tag = %tag, entry = %String::from_utf8_lossy(&stored), "dropping an unacked entry that is not [envelope, exchange, routing_key]");
                let _: () = redis::pipe()
                    .atomic()
                    .zrem(UNACKED_INDEX, tag)
                    .ignore()
                    .hdel(UNACKED, tag)
                    .ignore()
                    .query_async(con)
                    .await
                    .map_err(|e| lost(format!("ZREM/HDEL {tag}"), e))?;
                return Ok(false);
            }
        };
        let mut envelope = parts.first().cloned().unwrap_or(Value::Null);
        let exchange = parts.get(1).and_then(Value::as_str).unwrap_or_default();
        let routing_key = parts.get(2).and_then(Value::as_str).unwrap_or_default();
        let mut queues = self.lookup(con, exchange, routing_key).await?;
        if queues.is_empty() {
            warn!(delivery_tag = %tag, exchange, routing_key, "no queue bound for a restored message; putting it on the routing key's queue");
            queues.push(routing_key.to_string());
        }
        mark_redelivered(&mut envelope);
        let priority = priority_of(envelope.pointer("/properties/priority"));
        let body = match &envelope {
            Value::String(original) => original.clone(), // an element that never was an envelope
            other => to_python_string(other, false),
        };
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrem(UNACKED_INDEX, tag)
            .ignore()
            .hdel(UNACKED, tag)
            .ignore();
        for queue in &queues {
            let list = self.list_for(queue, priority);
            if front {
                pipe.rpush(list, &body).ignore();
            } else {
                pipe.lpush(list, &body).ignore();
            }
        }
        // EXEC answers nil when `unacked` changed meanwhile (someone else settled or restored it).
        let done: redis::Value = pipe
            .query_async(con)
            .await
            .map_err(|e| lost(format!("restore transaction for {tag}"), e))?;
        Ok(!matches!(done, redis::Value::Nil))
    }

    /// kombu's `_lookup` with direct semantics: the default exchange routes to the queue named by the
    /// routing key; any other exchange through `_kombu.binding.<exchange>`.
    async fn lookup<C: redis::aio::ConnectionLike + Send>(
        &self,
        con: &mut C,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Vec<String>, BrokerError> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_string()]);
        }
        let table = format!("_kombu.binding.{exchange}");
        let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
            .arg(&table)
            .query_async(con)
            .await
            .map_err(|e| lost(format!("SMEMBERS {table}"), e))?;
        let sep = self.inner.options.sep.as_str();
        let mut queues = Vec::new();
        for m in &members {
            let m = String::from_utf8_lossy(m);
            let mut parts = m.splitn(3, sep);
            if let (Some(rk), Some(_pattern), Some(queue)) =
                (parts.next(), parts.next(), parts.next())
            {
                if rk == routing_key && !queues.iter().any(|q| q == queue) {
                    queues.push(queue.to_string());
                }
            }
        }
        Ok(queues)
    }

    fn envelope(&self, exchange: &str, routing_key: &str, msg: &OutgoingMessage) -> Value {
        let mut props = Map::new();
        if let Some(c) = &msg.properties.correlation_id {
            props.insert("correlation_id".into(), json!(c));
        }
        if let Some(r) = &msg.properties.reply_to {
            props.insert("reply_to".into(), json!(r));
        }
        props.insert(
            "delivery_mode".into(),
            json!(msg.properties.delivery_mode.unwrap_or(2)),
        );
        if let Some(e) = &msg.properties.expiration {
            props.insert("expiration".into(), json!(e));
        }
        props.insert(
            "delivery_info".into(),
            json!({"exchange": exchange, "routing_key": routing_key}),
        );
        props.insert(
            "priority".into(),
            json!(msg.properties.priority.unwrap_or(0)),
        );
        props.insert("body_encoding".into(), json!("base64"));
        props.insert(
            "delivery_tag".into(),
            json!(uuid::Uuid::new_v4().to_string()),
        );
        json!({
            "body": base64::engine::general_purpose::STANDARD.encode(&msg.body),
            "content-encoding": msg.content_encoding,
            "content-type": msg.content_type,
            "headers": msg.headers,
            "properties": props,
        })
    }

    async fn push_direct(
        &self,
        exchange: &str,
        routing_key: &str,
        msg: &OutgoingMessage,
    ) -> Result<(), BrokerError> {
        let mut con = self.cmd();
        let queues = self.lookup(&mut con, exchange, routing_key).await?;
        if queues.is_empty() {
            warn!(
                exchange,
                routing_key,
                "no queue is bound for this routing key; message dropped (as kombu does)"
            );
            return Ok(());
        }
        let env = to_python_string(&self.envelope(exchange, routing_key, msg), false);
        let priority = msg.properties.priority.unwrap_or(0);
        for q in queues {
            let list = self.list_for(&q, priority);
            let _: () = con
                .lpush(&list, &env)
                .await
                .map_err(|e| lost(format!("LPUSH {list:?}"), e))?;
        }
        Ok(())
    }

    /// `/<db>.<exchange>[/<routing key>]`, kombu's fanout channel name.
    fn channel(&self, exchange: &str, routing_key: &str) -> String {
        if routing_key.is_empty() {
            format!("/{}.{exchange}", self.inner.db)
        } else {
            format!("/{}.{exchange}/{routing_key}", self.inner.db)
        }
    }
}

fn mark_redelivered(envelope: &mut Value) {
    if let Some(h) = envelope.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    if let Some(di) = envelope
        .pointer_mut("/properties/delivery_info")
        .and_then(Value::as_object_mut)
    {
        di.insert("redelivered".into(), Value::Bool(true));
    }
}

/// Turns a kombu envelope into a [`RawMessage`]; an element that is not an envelope becomes a message
/// with [`INVALID_ENVELOPE`] content so the worker logs and rejects it instead of losing it silently.
/// Also returns the parsed envelope (`Null` when the element is not a JSON object).
pub fn decode_envelope(raw: &[u8], queue: &str) -> (RawMessage, Value) {
    let invalid = |raw: &[u8]| RawMessage {
        body: raw.to_vec(),
        content_type: INVALID_ENVELOPE.into(),
        delivery_info: DeliveryInfo {
            queue: queue.into(),
            routing_key: queue.into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let env = match parse_lenient(raw) {
        Ok(v @ Value::Object(_)) => v,
        _ => return (invalid(raw), Value::Null),
    };
    let props = env.get("properties").cloned().unwrap_or(Value::Null);
    let body = match (
        env.get("body").and_then(Value::as_str),
        props.get("body_encoding").and_then(Value::as_str),
    ) {
        (Some(b), Some("base64")) => match base64::engine::general_purpose::STANDARD.decode(b) {
            Ok(bytes) => bytes,
            Err(_) => return (invalid(raw), env),
        },
        (Some(b), _) => b.as_bytes().to_vec(),
        (None, _) => return (invalid(raw), env),
    };
    let headers = env
        .get("headers")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let di = props.get("delivery_info").cloned().unwrap_or(Value::Null);
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let msg = RawMessage {
        body,
        content_type: s(&env, "content-type").unwrap_or_default(),
        content_encoding: s(&env, "content-encoding").unwrap_or_default(),
        properties: Properties {
            correlation_id: s(&props, "correlation_id"),
            reply_to: s(&props, "reply_to"),
            delivery_mode: props
                .get("delivery_mode")
                .and_then(Value::as_u64)
                .and_then(|d| u8::try_from(d).ok()),
            priority: props.get("priority").map(|p| priority_of(Some(p))),
            expiration: match props.get("expiration") {
                Some(Value::String(e)) => Some(e.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            },
        },
        delivery_info: DeliveryInfo {
            exchange: s(&di, "exchange").unwrap_or_default(),
            routing_key: s(&di, "routing_key").unwrap_or_else(|| queue.into()),
            redelivered: di
                .get("redelivered")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                || headers
                    .get("redelivered")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            queue: queue.into(),
        },
        headers,
    };
    (msg, env)
}

#[async_trait]
impl Broker for RedisBroker {
    /// kombu's queue declaration: the binding `<q>␆␖␆␖<q>` in `_kombu.binding.<q>` (and, since kombu
    /// 5.5, `_kombu.binding_permanent.<q>`).
    async fn declare(&self, queue: &QueueSpec) -> Result<(), BrokerError> {
        if !queue.with_exchange {
            return Ok(()); // a reply list: reached by name through the default exchange
        }
        let mut con = self.cmd();
        let sep = &self.inner.options.sep;
        let member = format!("{0}{sep}{sep}{0}", queue.name);
        let _: () = redis::pipe()
            .atomic()
            .sadd(format!("_kombu.binding.{}", queue.name), &member)
            .ignore()
            .sadd(format!("_kombu.binding_permanent.{}", queue.name), &member)
            .ignore()
            .query_async(&mut con)
            .await
            .map_err(|e| lost(format!("SADD _kombu.binding.{}", queue.name), e))?;
        Ok(())
    }

    async fn consume(
        &self,
        queue: &QueueSpec,
        _prefetch: u16,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        // Prefetch is exact on Redis: one BRPOP per `next()`, and the caller asks only with a free slot.
        self.declare(queue).await?;
        let blocking = self.dedicated().await?;
        self.ensure_sweeper().await;
        Ok(Box::new(RedisConsumer {
            broker: self.clone(),
            queue: queue.name.clone(),
            keys: self.brpop_keys(&queue.name),
            con: blocking,
            cancelled: false,
        }))
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        if !exchange.is_empty() {
            return self.push_direct(exchange, routing_key, &message).await;
        }
        let env = to_python_string(&self.envelope(exchange, routing_key, &message), false);
        let list = self.list_for(routing_key, message.properties.priority.unwrap_or(0));
        let mut con = self.cmd();
        let _: () = con
            .lpush(&list, env)
            .await
            .map_err(|e| lost(format!("LPUSH {list:?}"), e))?;
        Ok(())
    }

    async fn broadcast(
        &self,
        exchange: &ExchangeSpec,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        if exchange.kind == ExchangeKind::Direct {
            return self
                .push_direct(&exchange.name, routing_key, &message)
                .await;
        }
        let env = to_python_string(&self.envelope(&exchange.name, routing_key, &message), false);
        let channel = self.channel(&exchange.name, routing_key);
        let mut con = self.cmd();
        let _: () = con
            .publish(&channel, env)
            .await
            .map_err(|e| lost(format!("PUBLISH {channel}"), e))?;
        Ok(())
    }

    async fn subscribe(&self, sub: &Subscription) -> Result<Box<dyn Consumer>, BrokerError> {
        if sub.exchange.kind == ExchangeKind::Direct {
            // A reply queue: register the binding so repliers can route to it, then pop its list.
            let sep = &self.inner.options.sep;
            let table = format!("_kombu.binding.{}", sub.exchange.name);
            let mut con = self.cmd();
            let _: () = con
                .sadd(
                    &table,
                    format!("{}{sep}{sep}{}", sub.binding_key, sub.queue),
                )
                .await
                .map_err(|e| lost(format!("SADD {table}"), e))?;
            let blocking = self.dedicated().await?;
            return Ok(Box::new(ListSubscriber {
                keys: vec![sub.queue.clone()],
                queue: sub.queue.clone(),
                con: blocking,
            }));
        }
        let mut pubsub = self
            .inner
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| lost("pub/sub connect", e))?;
        let pattern = if sub.exchange.kind == ExchangeKind::Topic {
            format!("/{}.{}/*", self.inner.db, sub.exchange.name)
        } else {
            format!("/{}.{}*", self.inner.db, sub.exchange.name)
        };
        pubsub
            .psubscribe(&pattern)
            .await
            .map_err(|e| lost(format!("PSUBSCRIBE {pattern}"), e))?;
        Ok(Box::new(PubSubSubscriber {
            pubsub: Mutex::new(pubsub),
            queue: sub.queue.clone(),
        }))
    }

    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut con = self.cmd();
        let mut total = 0u64;
        for key in self.brpop_keys(queue) {
            let n: u64 = con
                .llen(&key)
                .await
                .map_err(|e| lost(format!("LLEN {key:?}"), e))?;
            total += n;
        }
        Ok(total)
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        Some(
            (self.inner.options.visibility_timeout / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(60)),
        )
    }

    fn transport(&self) -> &'static str {
        "redis"
    }
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &redact(&self.inner.url))
            .field("options", &self.inner.options)
            .finish()
    }
}

/// Consumes one task queue with BRPOP, one message per call.
struct RedisConsumer {
    broker: RedisBroker,
    queue: String,
    keys: Vec<String>,
    /// This consumer's own connection: BRPOP blocks it for up to a second.
    con: MultiplexedConnection,
    cancelled: bool,
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if self.cancelled {
            tokio::time::sleep(Duration::from_secs(BRPOP_TIMEOUT_S)).await;
            return Ok(None);
        }
        let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
            .arg(&self.keys)
            .arg(BRPOP_TIMEOUT_S)
            .query_async(&mut self.con)
            .await
            .map_err(|e| lost(format!("BRPOP {:?}", self.keys), e))?;
        let Some((list, raw)) = popped else {
            return Ok(None);
        };
        let (message, envelope) = decode_envelope(&raw, &self.queue);
        let tag = envelope
            .pointer("/properties/delivery_tag")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Bookkeeping right after the pop, as kombu does (`[message._raw, exchange, routing_key]`); an
        // element that is not a JSON object is stored as a string so a restore puts the original bytes back.
        let stored_env = if envelope.is_null() {
            Value::String(String::from_utf8_lossy(&raw).into_owned())
        } else {
            envelope
        };
        let entry = to_python_string(
            &json!([
                stored_env,
                message.delivery_info.exchange,
                message.delivery_info.routing_key
            ]),
            false,
        );
        let booked: Result<(), redis::RedisError> = redis::pipe()
            .atomic()
            .zadd(UNACKED_INDEX, &tag, now())
            .ignore()
            .hset(UNACKED, &tag, entry)
            .ignore()
            .query_async(&mut self.con)
            .await;
        if let Err(e) = booked {
            // Not recorded as held: put it back where it was (the front) rather than risk losing it.
            let mut cmd = self.broker.cmd();
            let back: Result<(), _> = cmd.rpush(&list, &raw).await;
            return match back {
                Ok(()) => Err(lost(
                    format!(
                        "ZADD {UNACKED_INDEX}/HSET {UNACKED} {tag} (message put back on {list:?})"
                    ),
                    e,
                )),
                Err(e2) => {
                    // Both failed: running it untracked beats dropping it.
                    error!(delivery_tag = %tag, list = %list, "cannot record the delivery ({e}) nor put it back ({e2}); delivering it untracked");
                    Ok(Some(Delivery {
                        message,
                        acker: Box::new(RedisAcker {
                            broker: self.broker.clone(),
                            tag,
                            settled: AtomicBool::new(false),
                        }),
                    }))
                }
            };
        }
        Ok(Some(Delivery {
            message,
            acker: Box::new(RedisAcker {
                broker: self.broker.clone(),
                tag,
                settled: AtomicBool::new(false),
            }),
        }))
    }

    async fn cancel(&mut self) -> Result<(), BrokerError> {
        // Nothing is buffered: messages are popped one per `next()`.
        self.cancelled = true;
        Ok(())
    }
}

struct RedisAcker {
    broker: RedisBroker,
    tag: String,
    settled: AtomicBool,
}

impl RedisAcker {
    /// Removes the message from `unacked` (the ack). A dead command connection is replaced and the
    /// removal tried once more: an ack lost with its connection would restore, and re-run, the step.
    async fn remove(&self) -> Result<(), BrokerError> {
        let mut attempt = 0;
        loop {
            let (generation, mut con) = self.broker.inner.commands.get();
            let r: redis::RedisResult<()> = redis::pipe()
                .atomic()
                .zrem(UNACKED_INDEX, &self.tag)
                .ignore()
                .hdel(UNACKED, &self.tag)
                .ignore()
                .query_async(&mut con)
                .await;
            match r {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.broker.inner.commands.failed(generation, &e).await;
                    if attempt > 0 || !crate::redis_conn::is_dead_peer(&e) {
                        return Err(lost(
                            format!("ZREM {UNACKED_INDEX}/HDEL {UNACKED} {}", self.tag),
                            e,
                        ));
                    }
                }
            }
            attempt += 1;
        }
    }
}

#[async_trait]
impl Acker for RedisAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.remove().await
    }

    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if requeue {
            // kombu `QoS.reject(requeue=True)`: `restore_by_tag(leftmost=True)` → LPUSH, the back of the line.
            self.broker.restore(&self.tag, false).await?;
            // kombu then acks: a no-op unless the restore found nothing to move.
            self.remove().await
        } else {
            self.remove().await
        }
    }

    async fn keep_alive(&self) -> Result<(), BrokerError> {
        if self.settled.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (generation, mut con) = self.broker.inner.commands.get();
        let r: redis::RedisResult<()> = redis::cmd("ZADD")
            .arg(UNACKED_INDEX)
            .arg("XX")
            .arg(now())
            .arg(&self.tag)
            .query_async(&mut con)
            .await;
        if let Err(e) = r {
            // The next refresh goes to a fresh connection.
            self.broker.inner.commands.failed(generation, &e).await;
            return Err(lost(format!("ZADD {UNACKED_INDEX} XX {}", self.tag), e));
        }
        Ok(())
    }
}

/// Pops a plain list (pidbox reply queues).
struct ListSubscriber {
    keys: Vec<String>,
    queue: String,
    con: MultiplexedConnection,
}

#[async_trait]
impl Consumer for ListSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
            .arg(&self.keys)
            .arg(BRPOP_TIMEOUT_S)
            .query_async(&mut self.con)
            .await
            .map_err(|e| lost(format!("BRPOP {:?}", self.keys), e))?;
        Ok(popped.map(|(_, raw)| Delivery {
            message: decode_envelope(&raw, &self.queue).0,
            acker: Box::new(NoAck),
        }))
    }
    async fn cancel(&mut self) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// Receives a fanout/topic exchange over pub/sub.
struct PubSubSubscriber {
    pubsub: Mutex<redis::aio::PubSub>,
    queue: String,
}

#[async_trait]
impl Consumer for PubSubSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        let mut pubsub = self.pubsub.lock().await;
        let mut stream = pubsub.on_message();
        match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(BrokerError::ConnectionLost(
                "redis pub/sub connection closed".into(),
            )),
            Ok(Some(msg)) => {
                let raw: Vec<u8> = msg.get_payload_bytes().to_vec();
                Ok(Some(Delivery {
                    message: decode_envelope(&raw, &self.queue).0,
                    acker: Box::new(NoAck),
                }))
            }
        }
    }
    async fn cancel(&mut self) -> Result<(), BrokerError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_captured_envelope() {
        let raw = br#"{"body": "W1syLCAzXSwgeyJ6IjogMX0sIHt9XQ==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"task": "capapp.add", "id": "1111"}, "properties": {"correlation_id": "1111", "reply_to": "oid", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "research_q"}, "priority": 7, "body_encoding": "base64", "delivery_tag": "tag-1"}}"#;
        let (m, env) = decode_envelope(raw, "research_q");
        assert_eq!(m.body, br#"[[2, 3], {"z": 1}, {}]"#);
        assert_eq!(m.properties.priority, Some(7));
        assert_eq!(m.properties.reply_to.as_deref(), Some("oid"));
        assert!(!m.delivery_info.redelivered);
        assert_eq!(
            env.pointer("/properties/delivery_tag"),
            Some(&json!("tag-1"))
        );
        let (bad, env) = decode_envelope(b"not json", "q");
        assert_eq!(bad.content_type, INVALID_ENVELOPE);
        assert_eq!(bad.body, b"not json");
        assert!(env.is_null());
        let (no_body, _) = decode_envelope(br#"{"headers": {}}"#, "q");
        assert_eq!(no_body.content_type, INVALID_ENVELOPE);
    }

    #[test]
    fn redelivered_from_headers_or_delivery_info() {
        let mut env = json!({"body": "", "headers": {}, "properties": {"body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": "q"}}});
        mark_redelivered(&mut env);
        assert_eq!(env.pointer("/headers/redelivered"), Some(&json!(true)));
        assert_eq!(
            env.pointer("/properties/delivery_info/redelivered"),
            Some(&json!(true))
        );
        let raw = to_python_string(&env, false);
        assert!(
            decode_envelope(raw.as_bytes(), "q")
                .0
                .delivery_info
                .redelivered
        );
    }

    #[test]
    fn priority_parsing_like_kombu() {
        assert_eq!(priority_of(None), 0);
        assert_eq!(priority_of(Some(&json!(-3))), 0);
        assert_eq!(priority_of(Some(&json!(12))), 9);
        assert_eq!(priority_of(Some(&json!(4.7))), 4);
        assert_eq!(priority_of(Some(&json!("6"))), 6);
        assert_eq!(priority_of(Some(&json!("x"))), 0);
    }
}
