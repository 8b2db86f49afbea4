//! Task history that survives restarts: every changed task is written behind (once a second) to Redis or
//! PostgreSQL, bounded by count (`--max-tasks`) and age (`--max-age`); at start the newest tasks within
//! both bounds are loaded back.
//!
//! * Redis: hash `<prefix>:tasks` (uuid → task JSON) and sorted set `<prefix>:seen` (uuid → first-seen
//!   epoch seconds).
//! * PostgreSQL: table `<prefix>_tasks (uuid text primary key, first_seen float8, doc jsonb)`.
//!
//! Queue samples for the charts ([`crate::series`]) live next to the tasks, under the same age bound
//! and [`crate::samples::MAX_SAMPLES`]: Redis sorted set `<prefix>:queue_samples` (score = time, member =
//! sample JSON), PostgreSQL table `<prefix>_queue_samples (ts float8, doc jsonb)`.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::samples::{QueueSample, MAX_SAMPLES};
use crate::task::Task;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("history backend {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("unsupported history backend {0:?} (use redis://… or postgresql://…)")]
    Unsupported(String),
    #[error("history backend: {0}")]
    Io(String),
}

/// Where task history lives.
#[async_trait]
pub trait HistoryStore: Send + Sync {
    /// The newest `max_tasks` tasks first seen at or after `min_first_seen`, oldest first.
    async fn load(&self, max_tasks: usize, min_first_seen: f64) -> Result<Vec<Task>, StoreError>;
    /// Inserts or replaces these tasks.
    async fn save(&self, tasks: &[Task]) -> Result<(), StoreError>;
    /// Deletes tasks beyond the bounds; returns how many went.
    async fn prune(&self, max_tasks: usize, min_first_seen: f64) -> Result<u64, StoreError>;
    /// Appends queue samples.
    async fn save_samples(&self, samples: &[QueueSample]) -> Result<(), StoreError>;
    /// The newest [`MAX_SAMPLES`] queue samples taken at or after `min_ts`, oldest first.
    async fn load_samples(&self, min_ts: f64) -> Result<Vec<QueueSample>, StoreError>;
    /// Deletes samples older than `min_ts` and beyond [`MAX_SAMPLES`].
    async fn prune_samples(&self, min_ts: f64) -> Result<(), StoreError>;
    fn describe(&self) -> String;
}

/// Opens the store named by `url` (`redis://`, `rediss://`, `postgres://`, `postgresql://`).
pub async fn open(url: &str, prefix: &str) -> Result<Box<dyn HistoryStore>, StoreError> {
    let redacted = celeriac_wire::url::redact(url);
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let client = redis::Client::open(url).map_err(|e| StoreError::Connect {
            url: redacted.clone(),
            reason: e.to_string(),
        })?;
        let con = within_10s(&redacted, ConnectionManager::new(client)).await?;
        return Ok(Box::new(RedisStore {
            con,
            tasks_key: format!("{prefix}:tasks"),
            seen_key: format!("{prefix}:seen"),
            samples_key: format!("{prefix}:queue_samples"),
            url: redacted,
        }));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Box::new(PgStore::connect(url, prefix).await?));
    }
    Err(StoreError::Unsupported(redacted))
}

fn io(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what}: {e}"))
}

fn decode(doc: &[u8]) -> Option<Task> {
    match serde_json::from_slice::<Task>(doc) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("skipping an unreadable history record: {e}");
            None
        }
    }
}

pub struct RedisStore {
    con: ConnectionManager,
    tasks_key: String,
    seen_key: String,
    samples_key: String,
    url: String,
}

#[async_trait]
impl HistoryStore for RedisStore {
    async fn load(&self, max_tasks: usize, min_first_seen: f64) -> Result<Vec<Task>, StoreError> {
        let mut con = self.con.clone();
        // Newest first, then reversed so the oldest is restored first (eviction order).
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&self.seen_key)
            .arg("+inf")
            .arg(min_first_seen)
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(max_tasks)
            .query_async(&mut con)
            .await
            .map_err(|e| io("ZRANGE", e))?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            let docs: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(&self.tasks_key)
                .arg(chunk)
                .query_async(&mut con)
                .await
                .map_err(|e| io("HMGET", e))?;
            out.extend(docs.into_iter().flatten().filter_map(|d| decode(&d)));
        }
        out.reverse();
        Ok(out)
    }

    async fn save(&self, tasks: &[Task]) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        for chunk in tasks.chunks(500) {
            let mut pipe = redis::pipe();
            for t in chunk {
                let doc = serde_json::to_string(t).map_err(|e| io("encode", e))?;
                pipe.hset(&self.tasks_key, &t.uuid, doc).ignore();
                pipe.cmd("ZADD")
                    .arg(&self.seen_key)
                    .arg("NX")
                    .arg(t.first_seen)
                    .arg(&t.uuid)
                    .ignore();
            }
            let _: () = pipe
                .query_async(&mut con)
                .await
                .map_err(|e| io("HSET/ZADD", e))?;
        }
        Ok(())
    }

    async fn prune(&self, max_tasks: usize, min_first_seen: f64) -> Result<u64, StoreError> {
        let mut con = self.con.clone();
        let mut gone: Vec<String> = redis::cmd("ZRANGE")
            .arg(&self.seen_key)
            .arg(format!("({min_first_seen}"))
            .arg("-inf")
            .arg("BYSCORE")
            .arg("REV")
            .query_async(&mut con)
            .await
            .map_err(|e| io("ZRANGE", e))?;
        let count: u64 = redis::cmd("ZCARD")
            .arg(&self.seen_key)
            .query_async(&mut con)
            .await
            .map_err(|e| io("ZCARD", e))?;
        let excess = count.saturating_sub(max_tasks as u64);
        if excess > 0 {
            let oldest: Vec<String> = redis::cmd("ZRANGE")
                .arg(&self.seen_key)
                .arg(0)
                .arg(excess - 1)
                .query_async(&mut con)
                .await
                .map_err(|e| io("ZRANGE", e))?;
            gone.extend(oldest);
        }
        gone.sort();
        gone.dedup();
        for chunk in gone.chunks(1000) {
            let _: () = redis::pipe()
                .hdel(&self.tasks_key, chunk)
                .ignore()
                .zrem(&self.seen_key, chunk)
                .ignore()
                .query_async(&mut con)
                .await
                .map_err(|e| io("HDEL/ZREM", e))?;
        }
        Ok(gone.len() as u64)
    }

    async fn save_samples(&self, samples: &[QueueSample]) -> Result<(), StoreError> {
        if samples.is_empty() {
            return Ok(());
        }
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        for s in samples {
            let doc = serde_json::to_string(s).map_err(|e| io("encode", e))?;
            pipe.cmd("ZADD")
                .arg(&self.samples_key)
                .arg(s.ts)
                .arg(doc)
                .ignore();
        }
        pipe.query_async::<()>(&mut con)
            .await
            .map_err(|e| io("ZADD", e))
    }

    async fn load_samples(&self, min_ts: f64) -> Result<Vec<QueueSample>, StoreError> {
        let mut con = self.con.clone();
        let docs: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(&self.samples_key)
            .arg("+inf")
            .arg(min_ts)
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(MAX_SAMPLES)
            .query_async(&mut con)
            .await
            .map_err(|e| io("ZRANGE", e))?;
        let mut out: Vec<QueueSample> = docs
            .iter()
            .filter_map(|d| serde_json::from_slice(d).ok())
            .collect();
        out.reverse();
        Ok(out)
    }

    async fn prune_samples(&self, min_ts: f64) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&self.samples_key)
            .arg("-inf")
            .arg(format!("({min_ts}"))
            .ignore()
            .cmd("ZREMRANGEBYRANK")
            .arg(&self.samples_key)
            .arg(0)
            .arg(-(MAX_SAMPLES as i64) - 1)
            .ignore()
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| io("ZREMRANGEBYSCORE", e))
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.url, self.tasks_key)
    }
}

pub struct PgStore {
    client: tokio_postgres::Client,
    table: String,
    samples_table: String,
    url: String,
}

impl PgStore {
    async fn connect(url: &str, prefix: &str) -> Result<PgStore, StoreError> {
        let redacted = celeriac_wire::url::redact(url);
        let (client, connection) = within_10s(
            &redacted,
            tokio_postgres::connect(url, tokio_postgres::NoTls),
        )
        .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::error!("history PostgreSQL connection ended: {e}");
            }
        });
        let safe: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let table = format!("{safe}_tasks");
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (uuid text PRIMARY KEY, first_seen double precision NOT NULL, doc jsonb NOT NULL);
                 CREATE INDEX IF NOT EXISTS {table}_first_seen ON {table} (first_seen);
                 CREATE TABLE IF NOT EXISTS {safe}_queue_samples (ts double precision NOT NULL, doc jsonb NOT NULL);
                 CREATE INDEX IF NOT EXISTS {safe}_queue_samples_ts ON {safe}_queue_samples (ts);"
            ))
            .await
            .map_err(|e| StoreError::Connect {
                url: redacted.clone(),
                reason: format!("creating {table}: {e}"),
            })?;
        Ok(PgStore {
            client,
            table,
            samples_table: format!("{safe}_queue_samples"),
            url: redacted,
        })
    }
}

#[async_trait]
impl HistoryStore for PgStore {
    async fn load(&self, max_tasks: usize, min_first_seen: f64) -> Result<Vec<Task>, StoreError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT doc::text FROM (SELECT doc, first_seen FROM {t} WHERE first_seen >= $1 \
                     ORDER BY first_seen DESC LIMIT $2) newest ORDER BY first_seen ASC",
                    t = self.table
                ),
                &[&min_first_seen, &(max_tasks as i64)],
            )
            .await
            .map_err(|e| io("SELECT", e))?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|d| decode(d.as_bytes()))
            .collect())
    }

    async fn save(&self, tasks: &[Task]) -> Result<(), StoreError> {
        for chunk in tasks.chunks(1000) {
            let mut ids = Vec::with_capacity(chunk.len());
            let mut seen = Vec::with_capacity(chunk.len());
            let mut docs = Vec::with_capacity(chunk.len());
            for t in chunk {
                ids.push(t.uuid.clone());
                seen.push(t.first_seen);
                docs.push(serde_json::to_string(t).map_err(|e| io("encode", e))?);
            }
            self.client
                .execute(
                    &format!(
                        "INSERT INTO {t} (uuid, first_seen, doc) \
                         SELECT u, f, d::jsonb FROM unnest($1::text[], $2::float8[], $3::text[]) AS x(u, f, d) \
                         ON CONFLICT (uuid) DO UPDATE SET doc = EXCLUDED.doc",
                        t = self.table
                    ),
                    &[&ids, &seen, &docs],
                )
                .await
                .map_err(|e| io("INSERT", e))?;
        }
        Ok(())
    }

    async fn prune(&self, max_tasks: usize, min_first_seen: f64) -> Result<u64, StoreError> {
        let old = self
            .client
            .execute(
                &format!("DELETE FROM {} WHERE first_seen < $1", self.table),
                &[&min_first_seen],
            )
            .await
            .map_err(|e| io("DELETE", e))?;
        let excess = self
            .client
            .execute(
                &format!(
                    "DELETE FROM {t} WHERE uuid IN (SELECT uuid FROM {t} ORDER BY first_seen DESC OFFSET $1)",
                    t = self.table
                ),
                &[&(max_tasks as i64)],
            )
            .await
            .map_err(|e| io("DELETE", e))?;
        Ok(old + excess)
    }

    async fn save_samples(&self, samples: &[QueueSample]) -> Result<(), StoreError> {
        if samples.is_empty() {
            return Ok(());
        }
        let mut ts = Vec::with_capacity(samples.len());
        let mut docs = Vec::with_capacity(samples.len());
        for s in samples {
            ts.push(s.ts);
            docs.push(serde_json::to_string(s).map_err(|e| io("encode", e))?);
        }
        self.client
            .execute(
                &format!(
                    "INSERT INTO {t} (ts, doc) SELECT x, d::jsonb FROM unnest($1::float8[], $2::text[]) AS u(x, d)",
                    t = self.samples_table
                ),
                &[&ts, &docs],
            )
            .await
            .map_err(|e| io("INSERT", e))?;
        Ok(())
    }

    async fn load_samples(&self, min_ts: f64) -> Result<Vec<QueueSample>, StoreError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT doc::text FROM (SELECT doc, ts FROM {t} WHERE ts >= $1 ORDER BY ts DESC LIMIT $2) newest \
                     ORDER BY ts ASC",
                    t = self.samples_table
                ),
                &[&min_ts, &(MAX_SAMPLES as i64)],
            )
            .await
            .map_err(|e| io("SELECT", e))?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .filter_map(|d| serde_json::from_str(&d).ok())
            .collect())
    }

    async fn prune_samples(&self, min_ts: f64) -> Result<(), StoreError> {
        self.client
            .execute(
                &format!(
                    "DELETE FROM {t} WHERE ts < $1 OR ts <= (SELECT ts FROM {t} ORDER BY ts DESC OFFSET $2 LIMIT 1)",
                    t = self.samples_table
                ),
                &[&min_ts, &(MAX_SAMPLES as i64)],
            )
            .await
            .map_err(|e| io("DELETE", e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} (table {})", self.url, self.table)
    }
}
/// Awaits a connection attempt for up to 10 s; a timeout or an error names the (redacted) URL.
async fn within_10s<T, E: std::fmt::Display>(
    redacted: &str,
    attempt: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    let failed = |reason: String| StoreError::Connect {
        url: redacted.to_string(),
        reason,
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| failed("timed out after 10 s".into()))?
        .map_err(|e| failed(e.to_string()))
}
