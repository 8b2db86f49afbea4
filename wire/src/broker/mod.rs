//! Brokers: where task messages come from and where replies go.
//!
//! The worker runtime speaks only to these traits; [`amqp`] (RabbitMQ via lapin) and [`redis`] (kombu's
//! virtual-transport layout) implement them. The contract that keeps tasks from being lost:
//! * [`Consumer::next`] returns within about a second (`Ok(None)` when idle) so the caller can stop
//!   between calls instead of dropping a half-received message; it is never cancelled mid-flight.
//! * A [`Delivery`] stays the broker's until [`Acker::ack`] or [`Acker::reject`]; a worker that dies
//!   before either gets it redelivered (RabbitMQ) or restored after `visibility_timeout` (Redis).
//! * The consumer fetches a new message only when asked, so "prefetch follows free slots" holds on
//!   Redis exactly and on RabbitMQ through the per-consumer QoS window.

pub mod amqp;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::message::{Properties, RawMessage};

/// A task queue as Celery and Dagster declare it: a direct exchange of the same name, routing key =
/// queue name, durable, with `x-max-priority` (Dagster forces 10; RabbitMQ answers 406 to a mismatch).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    pub max_priority: Option<u8>,
    /// `x-expires` in ms: RabbitMQ deletes the queue after this long unused (reply queues).
    pub expires_ms: Option<u32>,
    /// Declared with a direct exchange of the same name bound to it, as Celery declares task queues.
    /// Reply queues are reached through the default exchange only (and leave no exchange behind).
    pub with_exchange: bool,
}

impl QueueSpec {
    /// A queue exactly as `dagster_celery` declares it.
    pub fn dagster(name: &str) -> Self {
        Self {
            name: name.into(),
            max_priority: Some(10),
            expires_ms: None,
            with_exchange: true,
        }
    }

    /// A durable reply queue for `rpc://` results that outlives its consumer (so a restarted or
    /// replacement consumer still finds the results published meanwhile) and expires when unused.
    pub fn replies(name: &str, expires_ms: u32) -> Self {
        Self {
            name: name.into(),
            max_priority: None,
            expires_ms: Some(expires_ms),
            with_exchange: false,
        }
    }
}

/// Exchange types Celery uses besides the default exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
}

/// An exchange as Celery declares it (`celeryev`: topic, durable; `celery.pidbox`: fanout, transient;
/// `reply.celery.pidbox`: direct, transient).
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
}

impl ExchangeSpec {
    /// `celeryev`, where events go.
    pub fn events() -> Self {
        Self {
            name: "celeryev".into(),
            kind: ExchangeKind::Topic,
            durable: true,
        }
    }
    /// `celery.pidbox`, where remote-control requests are broadcast.
    pub fn pidbox() -> Self {
        Self {
            name: "celery.pidbox".into(),
            kind: ExchangeKind::Fanout,
            durable: false,
        }
    }
    /// `reply.celery.pidbox`, where remote-control replies go.
    pub fn pidbox_reply() -> Self {
        Self {
            name: "reply.celery.pidbox".into(),
            kind: ExchangeKind::Direct,
            durable: false,
        }
    }
}

/// A subscription to a broadcast exchange: on AMQP a transient queue bound with `binding_key`; on Redis a
/// pub/sub pattern subscription (`/<db>.<exchange>/...`).
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub exchange: ExchangeSpec,
    /// AMQP queue name (`<node>.celery.pidbox`, `celeryev.<uuid>`); on Redis the binding's queue name.
    pub queue: String,
    pub binding_key: String,
    pub exclusive: bool,
    /// `x-message-ttl` in ms.
    pub message_ttl_ms: Option<u32>,
    /// `x-expires` in ms.
    pub expires_ms: Option<u32>,
}

/// A message to publish (results over `rpc://`, re-published tasks, replies).
#[derive(Debug, Clone, Default)]
pub struct OutgoingMessage {
    pub body: Vec<u8>,
    pub content_type: String,
    pub content_encoding: String,
    pub headers: Map<String, Value>,
    pub properties: Properties,
}

impl OutgoingMessage {
    /// A JSON message, as kombu sends every Celery message by default.
    pub fn json(body: String) -> Self {
        Self {
            body: body.into_bytes(),
            content_type: "application/json".into(),
            content_encoding: "utf-8".into(),
            ..Default::default()
        }
    }

    /// `message` published again for another consumer (a worker handing back a task it could not
    /// finish): the same body, headers and properties, with `redelivered` set in the headers as kombu's
    /// restore marks it, so the next worker knows the task may have started before.
    pub fn republished(message: &RawMessage) -> Self {
        let mut headers = message.headers.clone();
        headers.insert("redelivered".into(), Value::Bool(true));
        Self {
            body: message.body.clone(),
            content_type: message.content_type.clone(),
            content_encoding: message.content_encoding.clone(),
            headers,
            properties: message.properties.clone(),
        }
    }
}

/// Messages ready in a queue, and on Redis how they split over kombu's priority lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub total: u64,
    /// Ready messages per priority step (`0`, `3`, `6`, `9` by default); `None` where the broker does not
    /// tell (RabbitMQ keeps priorities inside one queue).
    pub by_priority: Option<std::collections::BTreeMap<u8, u64>>,
}

/// Errors of any broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to broker {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("broker connection lost: {0}")]
    ConnectionLost(String),
    #[error("broker refused {operation}: {reason}")]
    Refused { operation: String, reason: String },
    #[error("malformed message from broker: {0}")]
    Malformed(String),
}

/// One message handed to the worker, with the handle that settles it.
pub struct Delivery {
    pub message: RawMessage,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

/// Settles one delivery. Calling more than one settling method is a no-op after the first.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), BrokerError>;
    /// `requeue = true` puts the message back (Redis: the front, as kombu's restore does, so it runs next).
    async fn reject(&self, requeue: bool) -> Result<(), BrokerError>;
    /// Marks the message as still being worked on. Redis refreshes its `unacked_index` score so the
    /// visibility-timeout sweep of any worker leaves a long-running step alone; RabbitMQ needs nothing.
    async fn keep_alive(&self) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// The acker of deliveries that need no settling (broadcast subscriptions consume with `no_ack`).
pub struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(&self) -> Result<(), BrokerError> {
        Ok(())
    }
    async fn reject(&self, _requeue: bool) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// Receives deliveries from one queue.
#[async_trait]
pub trait Consumer: Send {
    /// The next delivery, or `Ok(None)` after about a second without one.
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError>;
    /// Stops the subscription; messages already delivered but not settled go back to the broker.
    async fn cancel(&mut self) -> Result<(), BrokerError>;
}

/// A broker connection (or pool of them).
#[async_trait]
pub trait Broker: Send + Sync {
    /// Declares the queue like Celery does and subscribes with at most `prefetch` unsettled deliveries.
    async fn consume(
        &self,
        queue: &QueueSpec,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, BrokerError>;
    /// Declares a task queue as a Celery publisher does before sending to it (`task_create_missing_queues`):
    /// on RabbitMQ a message for an undeclared queue would be dropped by the default exchange.
    async fn declare(&self, queue: &QueueSpec) -> Result<(), BrokerError> {
        let _ = queue;
        Err(BrokerError::Refused {
            operation: "declare".into(),
            reason: format!("not supported by the {} transport", self.transport()),
        })
    }
    /// Publishes to `exchange` (`""` = default exchange: routing key names the queue).
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError>;
    /// Publishes to a declared exchange (events to `celeryev`, control to `celery.pidbox`, replies to
    /// `reply.celery.pidbox`). AMQP declares the exchange first as Celery does; Redis routes fanout/topic
    /// through `PUBLISH /<db>.<exchange>/<routing_key>` and direct through its binding table.
    async fn broadcast(
        &self,
        exchange: &ExchangeSpec,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        let _ = (exchange, routing_key, message);
        Err(BrokerError::Refused {
            operation: "broadcast".into(),
            reason: format!("not supported by the {} transport", self.transport()),
        })
    }
    /// Subscribes to a broadcast exchange; deliveries need no acknowledgement (acks are no-ops).
    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let _ = subscription;
        Err(BrokerError::Refused {
            operation: "subscribe".into(),
            reason: format!("not supported by the {} transport", self.transport()),
        })
    }
    /// Messages ready in `queue` (Redis: summed over its priority lists).
    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        let _ = queue;
        Err(BrokerError::Refused {
            operation: "queue_length".into(),
            reason: format!("not supported by the {} transport", self.transport()),
        })
    }
    /// [`Broker::queue_length`] with the per-priority split where the broker has one.
    async fn queue_depths(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        Ok(QueueDepth {
            total: self.queue_length(queue).await?,
            by_priority: None,
        })
    }
    /// How often [`Acker::keep_alive`] must be called while a message is held, if at all.
    fn keep_alive_interval(&self) -> Option<Duration> {
        None
    }
    /// Short name for logs and metrics: `amqp` or `redis`.
    fn transport(&self) -> &'static str;
}
