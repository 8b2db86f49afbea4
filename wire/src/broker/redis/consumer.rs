//! The consumers of a Redis broker: task queues by BRPOP (one message per call, booked as unacked right
//! after the pop), plain reply lists, and fanout/topic exchanges over pub/sub.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::error;

use super::envelope::decode_envelope;
use super::unacked::{RedisAcker, UNACKED, UNACKED_INDEX};
use super::{lost, now, RedisBroker, BRPOP_TIMEOUT_S};
use crate::broker::{BrokerError, Consumer, Delivery, NoAck};
use crate::json::to_python_string;

/// Consumes one task queue with BRPOP, one message per call.
pub(super) struct RedisConsumer {
    pub(super) broker: RedisBroker,
    pub(super) queue: String,
    pub(super) keys: Vec<String>,
    /// This consumer's own connection: BRPOP blocks it for up to a second.
    pub(super) con: MultiplexedConnection,
    pub(super) cancelled: bool,
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if self.cancelled {
            tokio::time::sleep(Duration::from_secs(BRPOP_TIMEOUT_S)).await;
            return Ok(None);
        }
        let popped = brpop(&mut self.con, &self.keys).await?;
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
                        acker: Box::new(RedisAcker::new(self.broker.clone(), tag)),
                    }))
                }
            };
        }
        Ok(Some(Delivery {
            message,
            acker: Box::new(RedisAcker::new(self.broker.clone(), tag)),
        }))
    }

    async fn cancel(&mut self) -> Result<(), BrokerError> {
        // Nothing is buffered: messages are popped one per `next()`.
        self.cancelled = true;
        Ok(())
    }
}

/// Pops a plain list (pidbox reply queues).
pub(super) struct ListSubscriber {
    pub(super) keys: Vec<String>,
    pub(super) queue: String,
    pub(super) con: MultiplexedConnection,
}

#[async_trait]
impl Consumer for ListSubscriber {
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        let popped = brpop(&mut self.con, &self.keys).await?;
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
pub(super) struct PubSubSubscriber {
    pub(super) pubsub: Mutex<redis::aio::PubSub>,
    pub(super) queue: String,
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

/// One `BRPOP` over `keys` (the first list with a message wins), waiting up to a second.
async fn brpop(
    con: &mut MultiplexedConnection,
    keys: &[String],
) -> Result<Option<(String, Vec<u8>)>, BrokerError> {
    redis::cmd("BRPOP")
        .arg(keys)
        .arg(BRPOP_TIMEOUT_S)
        .query_async(con)
        .await
        .map_err(|e| lost(format!("BRPOP {keys:?}"), e))
}
