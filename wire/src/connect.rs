//! Brokers and result backends from Celery URLs: the one place that maps a URL to a transport, used by
//! the worker, the run coordinator and flower-compat alike.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::redis::RedisBackend;
use crate::backend::{BackendError, DisabledBackend, ResultBackend, RpcBackend};
use crate::broker::amqp::AmqpBroker;
use crate::broker::redis::{RedisBroker, RedisTransportOptions};
use crate::broker::{Broker, BrokerError};
use crate::url::{self, BackendUrl, BrokerUrl, UrlError};

/// Why a broker or backend could not be reached. Messages never carry passwords.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("connecting to {what} at {url}: {source}")]
    Broker {
        what: &'static str,
        url: String,
        #[source]
        source: BrokerError,
    },
    #[error("connecting to the result backend at {url}: {source}")]
    Backend {
        url: String,
        #[source]
        source: BackendError,
    },
}

/// Connects to the broker named by `broker_url` (`amqp://`, `pyamqp://`, `amqps://`, `redis://`,
/// `rediss://`); `redis` applies to Redis brokers only.
pub async fn broker(
    broker_url: &str,
    redis: RedisTransportOptions,
) -> Result<Arc<dyn Broker>, ConnectError> {
    Ok(match url::parse_broker(broker_url)? {
        BrokerUrl::Amqp { uri } => {
            Arc::new(
                AmqpBroker::connect(&uri)
                    .await
                    .map_err(|source| ConnectError::Broker {
                        what: "RabbitMQ",
                        url: url::redact(broker_url),
                        source,
                    })?,
            )
        }
        BrokerUrl::Redis { url, .. } => {
            Arc::new(RedisBroker::connect(&url, redis).await.map_err(|source| {
                ConnectError::Broker {
                    what: "Redis",
                    url: url::redact(broker_url),
                    source,
                }
            })?)
        }
    })
}

/// The result backend named by `backend_url`; `rpc://` travels over `broker`.
pub async fn backend(
    backend_url: &str,
    broker: Arc<dyn Broker>,
    result_expires: Duration,
) -> Result<Arc<dyn ResultBackend>, ConnectError> {
    Ok(match url::parse_backend(backend_url)? {
        BackendUrl::Rpc => Arc::new(RpcBackend::new(broker)),
        BackendUrl::Disabled => Arc::new(DisabledBackend),
        BackendUrl::Redis { url, .. } => Arc::new(
            RedisBackend::connect(&url, result_expires)
                .await
                .map_err(|source| ConnectError::Backend {
                    url: url::redact(&url),
                    source,
                })?,
        ),
    })
}
