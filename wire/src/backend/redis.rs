//! Celery's `redis://` result backend (`celery/backends/redis.py`): `SETEX celery-task-meta-<id>` and
//! `PUBLISH` of the same bytes on the same key, in one transaction; a stored SUCCESS is never replaced.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use super::{BackendError, ReplyTarget, ResultBackend};
use crate::json::parse_lenient;
use crate::redis_conn::{ResilientConnection, HEALTH_CHECK_INTERVAL};
use crate::result::ResultMeta;
use crate::url::redact;

/// Celery's `redis://` result backend.
pub struct RedisBackend {
    con: std::sync::Arc<ResilientConnection>,
    expires: Duration,
}

impl RedisBackend {
    /// Connects (10 s timeout); results expire after `result_expires` (Celery's default: 86400 s).
    pub async fn connect(
        url: &str,
        result_expires: Duration,
    ) -> Result<RedisBackend, BackendError> {
        Self::connect_with_tls(url, result_expires, &crate::tls::TlsMaterial::default()).await
    }

    /// Like [`RedisBackend::connect`], trusting `tls`'s CA for `rediss://` (Celery's
    /// `redis_backend_use_ssl`).
    pub async fn connect_with_tls(
        url: &str,
        result_expires: Duration,
        tls: &crate::tls::TlsMaterial,
    ) -> Result<RedisBackend, BackendError> {
        let client = crate::tls::redis_client(url, tls)
            .map_err(|e| BackendError::Unavailable(format!("{}: {e}", redact(url))))?;
        let con = std::sync::Arc::new(
            ResilientConnection::connect(client, "result backend", redact(url))
                .await
                .map_err(|e| {
                    BackendError::Unavailable(format!(
                        "{}: {}",
                        redact(url),
                        crate::tls::explain(e.to_string())
                    ))
                })?,
        );
        con.spawn_health_check(HEALTH_CHECK_INTERVAL);
        Ok(RedisBackend {
            con,
            expires: result_expires,
        })
    }
}

#[async_trait]
impl ResultBackend for RedisBackend {
    async fn store(&self, target: &ReplyTarget, meta: &ResultMeta) -> Result<(), BackendError> {
        let key = format!("celery-task-meta-{}", target.task_id);
        let (generation, mut con) = self.con.get();
        let existing: Option<Vec<u8>> = match con.get(&key).await {
            Ok(v) => v,
            Err(e) => {
                self.con.failed(generation, &e).await;
                return Err(BackendError::Unavailable(format!("GET {key}: {e}")));
            }
        };
        if let Some(existing) = existing {
            let stored_success = parse_lenient(&existing)
                .ok()
                .and_then(|v| {
                    v.get("status")
                        .and_then(|s| s.as_str())
                        .map(|s| s == "SUCCESS")
                })
                .unwrap_or(false);
            if stored_success {
                return Ok(()); // Celery never overwrites a SUCCESS
            }
        }
        let body = meta.to_json();
        let stored: redis::RedisResult<()> = redis::pipe()
            .atomic()
            .set_ex(&key, &body, self.expires.as_secs().max(1))
            .ignore()
            .publish(&key, &body)
            .ignore()
            .query_async(&mut con)
            .await;
        if let Err(e) = stored {
            self.con.failed(generation, &e).await;
            return Err(BackendError::Unavailable(format!(
                "SETEX/PUBLISH {key}: {e}"
            )));
        }
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        "redis"
    }
}

/// The client side of the `redis://` backend, as a Celery client reads it: a stored result
/// (`GET celery-task-meta-<id>`) and results as they are published (the worker `PUBLISH`es each one on
/// its key's channel; one `PSUBSCRIBE celery-task-meta-*` follows them all).
#[derive(Clone)]
pub struct RedisResults {
    client: redis::Client,
    con: ConnectionManager,
}

/// One published result.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedResult {
    pub task_id: String,
    pub meta: serde_json::Value,
}

/// Prefix of the result keys and channels.
pub const RESULT_KEY_PREFIX: &str = "celery-task-meta-";

impl RedisResults {
    pub async fn connect(url: &str) -> Result<RedisResults, BackendError> {
        let client = redis::Client::open(url)
            .map_err(|e| BackendError::Unavailable(format!("{}: {e}", redact(url))))?;
        let con = tokio::time::timeout(
            Duration::from_secs(10),
            ConnectionManager::new(client.clone()),
        )
        .await
        .map_err(|_| BackendError::Unavailable(format!("{}: timed out after 10 s", redact(url))))?
        .map_err(|e| BackendError::Unavailable(format!("{}: {e}", redact(url))))?;
        Ok(RedisResults { client, con })
    }

    /// The stored result of `task_id`, if any (unparseable documents are an error, not `None`).
    pub async fn get(&self, task_id: &str) -> Result<Option<serde_json::Value>, BackendError> {
        let key = format!("{RESULT_KEY_PREFIX}{task_id}");
        let mut con = self.con.clone();
        let raw: Option<Vec<u8>> = con
            .get(&key)
            .await
            .map_err(|e| BackendError::Unavailable(format!("GET {key}: {e}")))?;
        match raw {
            None => Ok(None),
            Some(bytes) => parse_lenient(&bytes)
                .map(Some)
                .map_err(|e| BackendError::Unavailable(format!("{key} holds {e}"))),
        }
    }

    /// Follows every published result until the connection drops (the caller resubscribes and then
    /// reads what it missed with [`Self::get`]). Undecodable payloads are passed on as JSON strings so
    /// the caller can report them against their task.
    pub async fn subscribe(
        &self,
    ) -> Result<impl futures::Stream<Item = PublishedResult> + Send + 'static, BackendError> {
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| BackendError::Unavailable(format!("pub/sub connection: {e}")))?;
        pubsub
            .psubscribe(format!("{RESULT_KEY_PREFIX}*"))
            .await
            .map_err(|e| BackendError::Unavailable(format!("PSUBSCRIBE: {e}")))?;
        Ok(futures::StreamExt::filter_map(
            pubsub.into_on_message(),
            |msg| async move {
                let channel = msg.get_channel_name().to_string();
                let task_id = channel.strip_prefix(RESULT_KEY_PREFIX)?.to_string();
                let payload = msg.get_payload_bytes();
                let meta = parse_lenient(payload).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
                });
                Some(PublishedResult { task_id, meta })
            },
        ))
    }
}
