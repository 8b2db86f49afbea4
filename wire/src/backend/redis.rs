//! Celery's `redis://` result backend (`celery/backends/redis.py`): `SETEX celery-task-meta-<id>` and
//! `PUBLISH` of the same bytes on the same key, in one transaction; a stored SUCCESS is never replaced.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use super::{BackendError, ReplyTarget, ResultBackend};
use crate::json::parse_lenient;
use crate::result::ResultMeta;
use crate::url::redact;

/// Celery's `redis://` result backend.
pub struct RedisBackend {
    con: ConnectionManager,
    expires: Duration,
}

impl RedisBackend {
    /// Connects (10 s timeout); results expire after `result_expires` (Celery's default: 86400 s).
    pub async fn connect(
        url: &str,
        result_expires: Duration,
    ) -> Result<RedisBackend, BackendError> {
        let client = redis::Client::open(url)
            .map_err(|e| BackendError::Unavailable(format!("{}: {e}", redact(url))))?;
        let con = tokio::time::timeout(Duration::from_secs(10), ConnectionManager::new(client))
            .await
            .map_err(|_| {
                BackendError::Unavailable(format!("{}: timed out after 10 s", redact(url)))
            })?
            .map_err(|e| BackendError::Unavailable(format!("{}: {e}", redact(url))))?;
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
        let mut con = self.con.clone();
        let existing: Option<Vec<u8>> = con
            .get(&key)
            .await
            .map_err(|e| BackendError::Unavailable(format!("GET {key}: {e}")))?;
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
        let _: () = redis::pipe()
            .atomic()
            .set_ex(&key, &body, self.expires.as_secs().max(1))
            .ignore()
            .publish(&key, &body)
            .ignore()
            .query_async(&mut con)
            .await
            .map_err(|e| BackendError::Unavailable(format!("SETEX/PUBLISH {key}: {e}")))?;
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        "redis"
    }
}
