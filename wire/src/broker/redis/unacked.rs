//! Acknowledgement emulation on Redis, as kombu does it: a delivered message is booked in the `unacked`
//! hash and the `unacked_index` sorted set (score = delivery time) until it is settled; the visibility
//! sweep puts back messages held longer than `visibility_timeout` (their worker is taken for dead).
//! celeriac refreshes the score of a message whose step is still running ([`Acker::keep_alive`]), so a
//! long step is never restored and run twice, which Python Celery does after an hour.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use serde_json::Value;
use tracing::{debug, error, info, warn};

use super::envelope::mark_redelivered;
use super::layout::priority_of;
use super::{lost, now, RedisBroker};
use crate::broker::{Acker, BrokerError};
use crate::json::{parse_lenient, to_python_string};

pub(super) const UNACKED: &str = "unacked";
pub(super) const UNACKED_INDEX: &str = "unacked_index";
pub(super) const UNACKED_MUTEX: &str = "unacked_mutex";
/// How long the sweep's mutex lives if its holder dies (kombu: `unacked_mutex_expire` 300 s).
const MUTEX_EXPIRE_MS: u64 = 300_000;

impl RedisBroker {
    /// Starts the visibility sweep once per broker: now, then every `restore_interval`.
    pub(super) async fn ensure_sweeper(&self) {
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
            let list = self.inner.options.list_for(queue, priority);
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
}

/// Settles one Redis delivery by its `delivery_tag`.
pub(super) struct RedisAcker {
    broker: RedisBroker,
    tag: String,
    settled: AtomicBool,
}

impl RedisAcker {
    pub(super) fn new(broker: RedisBroker, tag: String) -> RedisAcker {
        RedisAcker {
            broker,
            tag,
            settled: AtomicBool::new(false),
        }
    }

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
