//! Brokers and result backends from Celery URLs: the one place that maps a URL to a transport, used by
//! the worker, the run coordinator and flower-compat alike.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::redis::RedisBackend;
use crate::backend::{BackendError, DisabledBackend, ResultBackend, RpcBackend};
use crate::broker::amqp::AmqpBroker;
use crate::broker::redis::{RedisBroker, RedisTransportOptions};
use crate::broker::{Broker, BrokerError};
use crate::tls::{TlsError, TlsOptions};
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
    #[error("TLS settings for {url}: {source}")]
    Tls {
        url: String,
        #[source]
        source: TlsError,
    },
    #[error("connecting to the result backend at {url}: {source}")]
    Backend {
        url: String,
        #[source]
        source: BackendError,
    },
}

/// How to reach a broker besides its URL.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// The connection's name in RabbitMQ's management UI (`celeriac`, `celeriac-flower`, …).
    pub connection_name: String,
    /// Applies to Redis brokers only.
    pub redis: RedisTransportOptions,
    /// Celery's `broker_use_ssl` (the URL's `ssl_*` query parameters win).
    pub tls: TlsOptions,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            connection_name: "celeriac".into(),
            redis: RedisTransportOptions::default(),
            tls: TlsOptions::default(),
        }
    }
}

/// Connects to the broker named by `broker_url` (`amqp://`, `pyamqp://`, `amqps://`, `redis://`,
/// `rediss://`); `redis` applies to Redis brokers only. TLS settings come from the URL's `ssl_*` query
/// (see [`crate::tls`]).
pub async fn broker(
    broker_url: &str,
    redis: RedisTransportOptions,
) -> Result<Arc<dyn Broker>, ConnectError> {
    connect(
        broker_url,
        BrokerOptions {
            redis,
            ..Default::default()
        },
    )
    .await
}

/// [`broker`] with Celery's `broker_use_ssl` settings (the URL's `ssl_*` query parameters win).
pub async fn broker_with_tls(
    broker_url: &str,
    redis: RedisTransportOptions,
    tls: &TlsOptions,
) -> Result<Arc<dyn Broker>, ConnectError> {
    connect(
        broker_url,
        BrokerOptions {
            redis,
            tls: tls.clone(),
            ..Default::default()
        },
    )
    .await
}

/// The one place a broker URL becomes a transport: the worker, the run coordinator and flower-compat
/// all connect through here.
pub async fn connect(
    broker_url: &str,
    options: BrokerOptions,
) -> Result<Arc<dyn Broker>, ConnectError> {
    let BrokerOptions {
        connection_name,
        mut redis,
        tls,
    } = options;
    let tls_err = |e: TlsError| ConnectError::Tls {
        url: url::redact(broker_url),
        source: e,
    };
    let (clean_url, tls) = tls.from_url_query(broker_url).map_err(tls_err)?;
    let material = tls.load().map_err(tls_err)?;
    Ok(match url::parse_broker(&clean_url)? {
        BrokerUrl::Amqp { uri } => Arc::new(
            AmqpBroker::connect_with_tls(&uri, &connection_name, &material)
                .await
                .map_err(|source| ConnectError::Broker {
                    what: "RabbitMQ",
                    url: url::redact(broker_url),
                    source,
                })?,
        ),
        BrokerUrl::Redis { url, .. } => {
            redis.tls = material;
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
    backend_with_tls(backend_url, broker, result_expires, &TlsOptions::default()).await
}

/// [`backend`] with Celery's `redis_backend_use_ssl` settings (the URL's `ssl_*` query parameters win).
pub async fn backend_with_tls(
    backend_url: &str,
    broker: Arc<dyn Broker>,
    result_expires: Duration,
    tls: &TlsOptions,
) -> Result<Arc<dyn ResultBackend>, ConnectError> {
    let tls_err = |e: TlsError| ConnectError::Tls {
        url: url::redact(backend_url),
        source: e,
    };
    Ok(match url::parse_backend(backend_url)? {
        BackendUrl::Rpc => Arc::new(RpcBackend::new(broker)),
        BackendUrl::Disabled => Arc::new(DisabledBackend),
        BackendUrl::Redis { url, .. } => {
            let (clean_url, tls) = tls.from_url_query(&url).map_err(tls_err)?;
            let material = tls.load().map_err(tls_err)?;
            Arc::new(
                RedisBackend::connect_with_tls(&clean_url, result_expires, &material)
                    .await
                    .map_err(|source| ConnectError::Backend {
                        url: url::redact(&url),
                        source,
                    })?,
            )
        }
    })
}
