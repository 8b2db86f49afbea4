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
//!
//! The module is split by concept: [`layout`] (which list a priority lives in), [`envelope`] (kombu's
//! JSON envelope), [`unacked`] (acknowledgement emulation and the visibility sweep), `consumer` (BRPOP,
//! reply lists, pub/sub); this file holds the connection, routing and the [`Broker`] implementation.

mod consumer;
pub mod envelope;
pub mod layout;
pub mod unacked;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::AsyncCommands;

use tokio::sync::{Mutex, OnceCell};
use tracing::{info, warn};

pub use envelope::{decode_envelope, INVALID_ENVELOPE};
pub use layout::PriorityOrder;

use super::{
    Broker, BrokerError, Consumer, ExchangeKind, ExchangeSpec, OutgoingMessage, QueueDepth,
    QueueSpec, Subscription,
};
use crate::json::to_python_string;
use crate::redis_conn::{ResilientConnection, HEALTH_CHECK_INTERVAL};
use crate::url::redact;
use consumer::{ListSubscriber, PubSubSubscriber, RedisConsumer};

/// BRPOP's blocking timeout in seconds (kombu: `brpop_timeout`).
pub(super) const BRPOP_TIMEOUT_S: u64 = 1;

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

pub(super) fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

pub(super) fn lost(what: impl std::fmt::Display, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::ConnectionLost(format!("redis {what}: {e}"))
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
        let mut queues: Vec<String> = Vec::new();
        for m in &members {
            let m = String::from_utf8_lossy(m);
            if let Some(queue) = self.inner.options.bound_queue(&m, routing_key) {
                if !queues.iter().any(|q| q == queue) {
                    queues.push(queue.to_string());
                }
            }
        }
        Ok(queues)
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
        let env = to_python_string(&envelope::encode(exchange, routing_key, msg), false);
        let priority = msg.properties.priority.unwrap_or(0);
        for q in queues {
            let list = self.inner.options.list_for(&q, priority);
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

#[async_trait]
impl Broker for RedisBroker {
    /// kombu's queue declaration: the binding `<q>␆␖␆␖<q>` in `_kombu.binding.<q>` (and, since kombu
    /// 5.5, `_kombu.binding_permanent.<q>`).
    async fn declare(&self, queue: &QueueSpec) -> Result<(), BrokerError> {
        if !queue.with_exchange {
            return Ok(()); // a reply list: reached by name through the default exchange
        }
        let mut con = self.cmd();
        let member = self.inner.options.binding_member(&queue.name, &queue.name);
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
            keys: self.inner.options.brpop_keys(&queue.name),
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
        let env = to_python_string(&envelope::encode(exchange, routing_key, &message), false);
        let list = self
            .inner
            .options
            .list_for(routing_key, message.properties.priority.unwrap_or(0));
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
        let env = to_python_string(
            &envelope::encode(&exchange.name, routing_key, &message),
            false,
        );
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
            let table = format!("_kombu.binding.{}", sub.exchange.name);
            let mut con = self.cmd();
            let _: () = con
                .sadd(
                    &table,
                    self.inner
                        .options
                        .binding_member(&sub.binding_key, &sub.queue),
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
        Ok(self.queue_depths(queue).await?.total)
    }

    /// `LLEN` of each of the queue's priority lists, in one round trip.
    async fn queue_depths(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let lists = self.inner.options.priority_lists(queue);
        let mut pipe = redis::pipe();
        for (_, list) in &lists {
            pipe.llen(list);
        }
        let lens: Vec<u64> = pipe
            .query_async(&mut self.cmd())
            .await
            .map_err(|e| lost(format!("LLEN {queue:?} by priority"), e))?;
        let by_priority: BTreeMap<u8, u64> =
            lists.iter().map(|(step, _)| *step).zip(lens).collect();
        Ok(QueueDepth {
            total: by_priority.values().sum(),
            by_priority: Some(by_priority),
        })
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
