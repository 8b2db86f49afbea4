//! Builds the broker and result backend named by the configuration's URLs.

use std::sync::Arc;

use anyhow::Context;
use celeriac_wire::backend::redis::RedisBackend;
use celeriac_wire::backend::{DisabledBackend, ResultBackend, RpcBackend};
use celeriac_wire::broker::amqp::AmqpBroker;
use celeriac_wire::broker::redis::{PriorityOrder, RedisBroker, RedisTransportOptions};
use celeriac_wire::broker::Broker;
use celeriac_wire::url::{self, BackendUrl, BrokerUrl};

use crate::config::{RedisPriorityOrder, WorkerConfig};

/// Connects to the broker (retrying is the caller's business: the consumers reconnect on their own).
pub async fn broker(config: &WorkerConfig) -> anyhow::Result<Arc<dyn Broker>> {
    let parsed = url::parse_broker(&config.broker_url).context("broker_url")?;
    Ok(match parsed {
        BrokerUrl::Amqp { uri } => {
            Arc::new(AmqpBroker::connect(&uri).await.with_context(|| {
                format!(
                    "connecting to RabbitMQ at {}",
                    url::redact(&config.broker_url)
                )
            })?)
        }
        BrokerUrl::Redis { url, .. } => {
            let options = RedisTransportOptions {
                visibility_timeout: config.redis.visibility_timeout,
                priority_order: match config.redis.priority_order {
                    RedisPriorityOrder::Kombu => PriorityOrder::Kombu,
                    RedisPriorityOrder::Dagster => PriorityOrder::Dagster,
                },
                ..Default::default()
            };
            Arc::new(RedisBroker::connect(&url, options).await.with_context(|| {
                format!("connecting to Redis at {}", url::redact(&config.broker_url))
            })?)
        }
    })
}

/// The result backend; `rpc://` reuses the broker.
pub async fn backend(
    config: &WorkerConfig,
    broker: Arc<dyn Broker>,
) -> anyhow::Result<Arc<dyn ResultBackend>> {
    Ok(
        match url::parse_backend(&config.result_backend).context("result_backend")? {
            BackendUrl::Rpc => Arc::new(RpcBackend::new(broker)),
            BackendUrl::Disabled => Arc::new(DisabledBackend),
            BackendUrl::Redis { url, .. } => Arc::new(
                RedisBackend::connect(&url, config.result_expires)
                    .await
                    .with_context(|| {
                        format!(
                            "connecting to the Redis result backend at {}",
                            url::redact(&url)
                        )
                    })?,
            ),
        },
    )
}
