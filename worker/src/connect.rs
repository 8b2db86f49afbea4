//! The broker and result backend named by the worker's configuration (transport choice lives in
//! [`celeriac_wire::connect`]).

use std::sync::Arc;

use celeriac_wire::backend::ResultBackend;
use celeriac_wire::broker::redis::RedisTransportOptions;
use celeriac_wire::broker::Broker;

use crate::config::WorkerConfig;

/// Connects to the broker (retrying is the caller's business: the consumers reconnect on their own).
pub async fn broker(config: &WorkerConfig) -> anyhow::Result<Arc<dyn Broker>> {
    let options = RedisTransportOptions {
        visibility_timeout: config.redis.visibility_timeout,
        // A dead worker's message is back within ~2 × visibility_timeout, not up to a minute later
        // with a short timeout (the sweep is one ZRANGEBYSCORE when nothing is due).
        restore_interval: config.redis.visibility_timeout.clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        ),
        priority_order: config.redis.priority_order,
        ..Default::default()
    };
    Ok(
        celeriac_wire::connect::broker_with_tls(&config.broker_url, options, &config.broker_tls)
            .await?,
    )
}

/// The result backend; `rpc://` reuses the broker.
pub async fn backend(
    config: &WorkerConfig,
    broker: Arc<dyn Broker>,
) -> anyhow::Result<Arc<dyn ResultBackend>> {
    Ok(celeriac_wire::connect::backend_with_tls(
        &config.result_backend,
        broker,
        config.result_expires,
        &config.backend_tls,
    )
    .await?)
}
