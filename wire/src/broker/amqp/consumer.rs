//! Consuming from RabbitMQ: one channel per subscription, deliveries converted to [`RawMessage`] and
//! settled on the channel they came from (a closed channel means RabbitMQ redelivers, never a loss).

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicRejectOptions};
use lapin::types::ShortString;
use lapin::{Channel, Connection};

use super::fields::table_to_json;
use super::{classify, POLL_INTERVAL};
use crate::broker::{Acker, BrokerError, Consumer, Delivery, NoAck};
use crate::message::{DeliveryInfo, Properties, RawMessage};

/// A subscription on its own channel.
pub(super) struct AmqpConsumer {
    /// Keeps the connection open while this consumer lives, even if the broker reconnected meanwhile.
    pub(super) _connection: Arc<Connection>,
    pub(super) channel: Channel,
    pub(super) consumer: lapin::Consumer,
    pub(super) tag: ShortString,
    pub(super) queue: String,
    pub(super) no_ack: bool,
    pub(super) cancelled: bool,
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if self.cancelled {
            return Ok(None);
        }
        // The lapin consumer is a channel receiver: dropping this future on timeout loses nothing.
        match tokio::time::timeout(POLL_INTERVAL, self.consumer.next()).await {
            Err(_elapsed) => {
                if self.channel.status().connected() {
                    Ok(None)
                } else {
                    Err(BrokerError::ConnectionLost(format!(
                        "channel of consumer on {} closed",
                        self.queue
                    )))
                }
            }
            Ok(Some(Ok(delivery))) => {
                let message = convert_delivery(&delivery, &self.queue);
                let acker: Box<dyn Acker> = if self.no_ack {
                    Box::new(NoAck)
                } else {
                    Box::new(AmqpAcker {
                        acker: delivery.acker,
                    })
                };
                Ok(Some(Delivery { message, acker }))
            }
            Ok(Some(Err(e))) => Err(BrokerError::ConnectionLost(format!(
                "consumer on {}: {e}",
                self.queue
            ))),
            Ok(None) => Err(BrokerError::ConnectionLost(format!(
                "consumer on {} was cancelled by the broker (queue deleted?)",
                self.queue
            ))),
        }
    }

    async fn cancel(&mut self) -> Result<(), BrokerError> {
        if self.cancelled {
            return Ok(());
        }
        self.cancelled = true;
        if !self.channel.status().connected() {
            return Ok(()); // the broker already requeued everything unacked on this channel
        }
        let cancel = self
            .channel
            .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
            .await;
        // Closing the channel hands every unsettled delivery back to the queue.
        let close = self.channel.close(200, ShortString::from("OK")).await;
        match (cancel, close) {
            (_, Ok(())) => Ok(()),
            (Err(e), Err(_)) | (Ok(()), Err(e)) => {
                if self.channel.status().connected() {
                    Err(classify("channel.close", &e))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Settles one delivery on the channel it came from.
struct AmqpAcker {
    acker: lapin::Acker,
}

impl AmqpAcker {
    fn settled(&self, operation: &str, r: lapin::Result<bool>) -> Result<(), BrokerError> {
        match r {
            Ok(true) => Ok(()),
            // Already settled: a no-op. Poisoned: the channel died, the broker redelivers the message.
            Ok(false) if self.acker.poisoned() => Err(BrokerError::ConnectionLost(format!(
                "{operation}: the delivery's channel is closed; RabbitMQ will redeliver the message"
            ))),
            Ok(false) => Ok(()),
            Err(e) => Err(BrokerError::ConnectionLost(format!("{operation}: {e}"))),
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        let r = self.acker.ack(BasicAckOptions::default()).await;
        self.settled("basic.ack", r)
    }

    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        let r = self.acker.reject(BasicRejectOptions { requeue }).await;
        self.settled("basic.reject", r)
    }
}

fn convert_delivery(d: &lapin::message::Delivery, queue: &str) -> RawMessage {
    let p = &d.properties;
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_string());
    RawMessage {
        body: d.data.clone(),
        content_type: s(p.content_type()).unwrap_or_default(),
        content_encoding: s(p.content_encoding()).unwrap_or_default(),
        headers: p.headers().as_ref().map(table_to_json).unwrap_or_default(),
        properties: Properties {
            correlation_id: s(p.correlation_id()),
            reply_to: s(p.reply_to()),
            delivery_mode: *p.delivery_mode(),
            priority: *p.priority(),
            expiration: s(p.expiration()),
        },
        delivery_info: DeliveryInfo {
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            redelivered: d.redelivered,
            queue: queue.to_string(),
        },
    }
}
