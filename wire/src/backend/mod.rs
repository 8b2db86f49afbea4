//! Result backends: how a finished task's [`ResultMeta`] reaches the publisher.
//!
//! * `rpc://` ([`RpcBackend`]): the meta document is published to the default exchange with routing key
//!   `reply_to` and `correlation_id` = task id (AMQP), or LPUSHed onto the `reply_to` list (Redis broker).
//! * `redis://` ([`redis::RedisBackend`]): `SETEX celery-task-meta-<id>` + `PUBLISH` on the same key.

pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;

use crate::broker::{Broker, BrokerError, OutgoingMessage};
use crate::message::Properties;
use crate::result::ResultMeta;

/// Where the result of one task goes.
#[derive(Debug, Clone)]
pub struct ReplyTarget {
    pub task_id: String,
    pub reply_to: Option<String>,
    pub correlation_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("result backend unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("no reply_to on task {0}: the rpc:// backend cannot deliver its result")]
    NoReplyTo(String),
}

/// Stores task results.
#[async_trait]
pub trait ResultBackend: Send + Sync {
    async fn store(&self, target: &ReplyTarget, meta: &ResultMeta) -> Result<(), BackendError>;
    /// URL scheme for logs: `rpc`, `redis`, `disabled`.
    fn scheme(&self) -> &'static str;
}

/// Celery's `rpc://` backend: results travel back over the broker to the client's reply queue.
pub struct RpcBackend {
    broker: Arc<dyn Broker>,
    persistent: bool,
}

impl RpcBackend {
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self {
            broker,
            persistent: false,
        }
    }
}

#[async_trait]
impl ResultBackend for RpcBackend {
    async fn store(&self, target: &ReplyTarget, meta: &ResultMeta) -> Result<(), BackendError> {
        let reply_to = target
            .reply_to
            .as_deref()
            .ok_or_else(|| BackendError::NoReplyTo(target.task_id.clone()))?;
        let mut msg = OutgoingMessage::json(meta.to_json());
        msg.properties = Properties {
            correlation_id: Some(target.correlation_id.clone()),
            delivery_mode: Some(if self.persistent { 2 } else { 1 }),
            priority: Some(0),
            ..Default::default()
        };
        // Celery publishes without declaring: a reply queue that no longer exists drops the message.
        self.broker.publish("", reply_to, msg).await?;
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        "rpc"
    }
}

/// `result_backend` unset / `disabled://`: results are not stored (events still tell the story).
pub struct DisabledBackend;

#[async_trait]
impl ResultBackend for DisabledBackend {
    async fn store(&self, _: &ReplyTarget, _: &ResultMeta) -> Result<(), BackendError> {
        Ok(())
    }
    fn scheme(&self) -> &'static str {
        "disabled"
    }
}
