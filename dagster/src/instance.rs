//! The run's Dagster instance, as far as the step task needs it: the run's status in the run storage
//! and the event log (spec §3.6). Only Postgres storages exist in celery-k8s deployments.
//!
//! Connections are pooled per storage configuration (a few per database, opened as load needs
//! them), shared by the steps of every run, and re-opened when the server closed them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};
use tracing::{debug, warn};

use crate::events::Event;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("unsupported Dagster storage: {0}")]
    Unsupported(String),
    #[error("invalid storage config_yaml: {0}")]
    Config(String),
    #[error("environment variable {0} (referenced by the instance's storage config) is not set in the worker")]
    MissingEnv(String),
    #[error("cannot connect to the Dagster database {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("Dagster database query failed ({what}): {reason}")]
    Query { what: &'static str, reason: String },
}

impl InstanceError {
    /// Worth retrying: the database could not be reached, the connection died or a query went
    /// unanswered (as opposed to a configuration problem or an error the server answered with).
    pub fn is_transient(&self) -> bool {
        match self {
            InstanceError::Connect { .. } => true,
            InstanceError::Query { reason, .. } => !reason.starts_with(SERVER_ERROR_PREFIX),
            _ => false,
        }
    }
}

/// Prefix of the reason of a [`InstanceError::Query`] the server answered with an SQL error.
const SERVER_ERROR_PREFIX: &str = "server error: ";

fn query_error(what: &'static str, e: &tokio_postgres::Error) -> InstanceError {
    let reason = match e.code() {
        Some(_) => format!("{SERVER_ERROR_PREFIX}{e}"),
        None => e.to_string(),
    };
    InstanceError::Query { what, reason }
}

/// What the step task reads of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub status: String,
    pub job_name: String,
    pub location_name: Option<String>,
}

/// Connection parameters resolved from a `config_yaml`, with a log-safe description.
#[derive(Clone)]
struct Target {
    config: Config,
    /// Identity of the connection in the cache (includes the password; never logged).
    key: String,
    display: String,
}

/// Default connect timeout when the storage config sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for one query (a statement timeout on the client side): past it the connection is
/// taken for dead (a black-holed or half-open peer answers nothing, and TCP alone would wait for
/// minutes) and the next query opens a new one.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

fn resolve(v: &Value, key: &str) -> Result<Option<String>, InstanceError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        Value::Object(m) if m.contains_key("env") => {
            let var = m.get("env").and_then(Value::as_str).unwrap_or_default();
            std::env::var(var)
                .map(Some)
                .map_err(|_| InstanceError::MissingEnv(var.to_string()))
        }
        _ => Err(InstanceError::Config(format!(
            "{key}: expected a string or {{env: VAR}}"
        ))),
    }
}

fn apply_param(config: &mut Config, key: &str, value: &str) -> Result<(), InstanceError> {
    let bad = || InstanceError::Config(format!("postgres_db.params.{key}: unsupported value"));
    match key {
        "sslmode" => {
            let mode = match value {
                "disable" => SslMode::Disable,
                "allow" | "prefer" => SslMode::Prefer,
                _ => {
                    return Err(InstanceError::Unsupported(format!(
                        "postgres_db.params.sslmode={value} (the worker connects without TLS)"
                    )))
                }
            };
            config.ssl_mode(mode);
        }
        "connect_timeout" => {
            let secs: u64 = value.parse().map_err(|_| bad())?;
            config.connect_timeout(Duration::from_secs(secs));
        }
        "application_name" => {
            config.application_name(value);
        }
        "options" => {
            config.options(value);
        }
        "keepalives" => {
            config.keepalives(value != "0");
        }
        _ => warn!(
            param = key,
            "ignoring an unsupported Postgres connection parameter of the Dagster storage"
        ),
    }
    Ok(())
}

/// Parses a `PostgresRunStorage` / `PostgresEventLogStorage` / `DagsterPostgresStorage` config_yaml.
fn target_from_yaml(yaml: &str) -> Result<Target, InstanceError> {
    let cfg: Value =
        serde_norway::from_str(yaml).map_err(|e| InstanceError::Config(e.to_string()))?;
    target_from_config(&cfg)
}

/// The Postgres connection of an instance's run storage, from its `dagster.yaml` text: the
/// `storage: {postgres: …}` block, or a `run_storage` of `dagster_postgres`. Returns the connection
/// settings (`{env: VAR}` resolved) and a description without the password.
pub fn postgres_from_dagster_yaml(text: &str) -> Result<(Config, String), InstanceError> {
    let doc: Value =
        serde_norway::from_str(text).map_err(|e| InstanceError::Config(e.to_string()))?;
    let storage = doc
        .pointer("/storage/postgres")
        .or_else(|| doc.pointer("/run_storage/config"))
        .ok_or_else(|| {
            InstanceError::Unsupported(
                "dagster.yaml has no Postgres storage (storage.postgres or a dagster_postgres run_storage)"
                    .into(),
            )
        })?;
    let target = target_from_config(storage)?;
    Ok((target.config, target.display))
}

/// Parses a Postgres storage config (`postgres_url` or `postgres_db`).
fn target_from_config(cfg: &Value) -> Result<Target, InstanceError> {
    if let Some(url) = cfg.get("postgres_url") {
        let url = resolve(url, "postgres_url")?
            .ok_or_else(|| InstanceError::Config("postgres_url is empty".into()))?;
        let display = celeriac_wire::url::redact(&url);
        // SQLAlchemy URLs may name a driver (`postgresql+psycopg2://`); libpq-style parsers do not know it.
        let normalized = match url.split_once("://") {
            Some((scheme, rest))
                if scheme.starts_with("postgresql+") || scheme.starts_with("postgres+") =>
            {
                format!("postgresql://{rest}")
            }
            _ => url.clone(),
        };
        let mut config: Config = normalized.parse().map_err(|e: tokio_postgres::Error| {
            InstanceError::Config(format!("postgres_url {display}: {e}"))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        return Ok(Target {
            config,
            key: url,
            display,
        });
    }
    let db = cfg.get("postgres_db").ok_or_else(|| {
        InstanceError::Unsupported("no postgres_db or postgres_url in the storage config".into())
    })?;
    let get = |k: &str| -> Result<Option<String>, InstanceError> {
        db.get(k).map_or(Ok(None), |v| resolve(v, k))
    };
    let host = get("hostname")?.unwrap_or_else(|| "localhost".into());
    let port_s = get("port")?.unwrap_or_else(|| "5432".into());
    let port: u16 = port_s.parse().map_err(|_| {
        InstanceError::Config(format!("postgres_db.port: not a port number: {port_s}"))
    })?;
    let user = get("username")?.unwrap_or_else(|| "postgres".into());
    let dbname = get("db_name")?
        .ok_or_else(|| InstanceError::Config("postgres_db.db_name is required".into()))?;
    let password = get("password")?;
    let mut config = Config::new();
    config
        .host(&host)
        .port(port)
        .user(&user)
        .dbname(&dbname)
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(pw) = &password {
        config.password(pw);
    }
    let mut params_key = String::new();
    if let Some(Value::Object(params)) = db.get("params") {
        for (k, v) in params {
            if let Some(v) = resolve(v, k)? {
                apply_param(&mut config, k, &v)?;
                params_key.push_str(&format!("&{k}={v}"));
            }
        }
    }
    let key = format!(
        "{host}\u{0}{port}\u{0}{user}\u{0}{dbname}\u{0}{}\u{0}{params_key}",
        password.unwrap_or_default()
    );
    Ok(Target {
        config,
        key,
        display: format!("postgresql://{user}@{host}:{port}/{dbname}"),
    })
}

/// Connections per database. Every step task of the worker shares them; a PostgreSQL connection
/// runs one statement at a time, so with a single one hundreds of concurrent steps queued their
/// event writes behind each other (measured in the coordinator load test: 400 steps in flight,
/// writes waiting past [`QUERY_TIMEOUT`], the connection taken for dead, everything on it retried,
/// a third of the throughput). Several let PostgreSQL run and flush their commits side by side.
pub const CONNECTIONS_PER_DATABASE: usize = 4;

/// Connection pools shared by every step task of the worker, one per storage configuration.
#[derive(Default, Clone)]
pub struct Instances {
    pools: Arc<std::sync::Mutex<HashMap<String, Arc<Pool>>>>,
}

/// One database's connections. A query holds a slot for as long as it runs, and waits for a free
/// one first: [`QUERY_TIMEOUT`] then measures the server's answer, never the worker's own queue, so
/// a busy worker is slowed down rather than made to evict healthy connections (congestion collapse).
struct Pool {
    free: Arc<Semaphore>,
    /// A slot is opened lazily, lowest first: a quiet worker keeps one connection.
    slots: Vec<Arc<Mutex<Option<Arc<Client>>>>>,
}

impl Pool {
    fn new() -> Pool {
        Pool {
            free: Arc::new(Semaphore::new(CONNECTIONS_PER_DATABASE)),
            slots: (0..CONNECTIONS_PER_DATABASE)
                .map(|_| Arc::new(Mutex::new(None)))
                .collect(),
        }
    }
}

/// Exclusive use of one slot's (open) connection.
struct Lease {
    client: Arc<Client>,
    slot: OwnedMutexGuard<Option<Arc<Client>>>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    /// Drops the slot's connection (it stopped answering): the next query on the slot connects afresh.
    fn evict(&mut self, target: &Target, why: &str) {
        if self.slot.take().is_some() {
            warn!(database = %target.display, "Dagster database connection is dead ({why}); reconnecting");
            celeriac_wire::reconnects::record("postgres");
        }
    }
}

/// A handle on one run's storages. Every operation takes a pooled connection (re-opened if the
/// server closed it), so a handle stays usable across a step that runs for hours.
#[derive(Clone)]
pub struct Instance {
    instances: Instances,
    runs: Target,
    events: Target,
}

impl Instances {
    /// Opens (or reuses) the run and event storages named by the step's `instance_ref`.
    pub async fn open(
        &self,
        run_yaml: Option<&str>,
        event_yaml: Option<&str>,
    ) -> Result<Instance, InstanceError> {
        let run_yaml = run_yaml.ok_or_else(|| {
            InstanceError::Unsupported("the instance_ref has no run storage".into())
        })?;
        let runs = target_from_yaml(run_yaml)?;
        let events = match event_yaml {
            Some(y) => target_from_yaml(y)?,
            None => runs.clone(),
        };
        // Connect now, so configuration and connectivity problems surface before any work.
        drop(self.lease(&runs).await?);
        drop(self.lease(&events).await?);
        Ok(Instance {
            instances: self.clone(),
            runs,
            events,
        })
    }

    /// Number of open pooled connections, over every database (for tests and metrics).
    pub async fn cached(&self) -> usize {
        let pools: Vec<Arc<Pool>> = self.pools().values().cloned().collect();
        let mut open = 0;
        for pool in pools {
            for slot in &pool.slots {
                if slot.lock().await.as_ref().is_some_and(|c| !c.is_closed()) {
                    open += 1;
                }
            }
        }
        open
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Pool>>> {
        // A panic elsewhere while holding this lock leaves a map that is still consistent.
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a free slot of the target's pool and hands it over with an open connection.
    async fn lease(&self, target: &Target) -> Result<Lease, InstanceError> {
        let pool = self
            .pools()
            .entry(target.key.clone())
            .or_insert_with(|| Arc::new(Pool::new()))
            .clone();
        let permit =
            pool.free
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| InstanceError::Connect {
                    target: target.display.clone(),
                    reason: "connection pool closed".into(),
                })?;
        // A permit guarantees a slot nobody holds; lowest first keeps a quiet worker on one connection.
        let mut slot = pool
            .slots
            .iter()
            .find_map(|s| s.clone().try_lock_owned().ok())
            .ok_or_else(|| InstanceError::Connect {
                target: target.display.clone(),
                reason: "no free connection slot despite a permit".into(),
            })?;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok(Lease {
                    client: c.clone(),
                    slot,
                    _permit: permit,
                });
            }
            warn!(database = %target.display, "Dagster database connection was closed; reconnecting");
            celeriac_wire::reconnects::record("postgres");
            *slot = None;
        }
        let client = Arc::new(connect(target).await?);
        *slot = Some(client.clone());
        Ok(Lease {
            client,
            slot,
            _permit: permit,
        })
    }
}

async fn connect(target: &Target) -> Result<Client, InstanceError> {
    // tokio-postgres's connect_timeout covers the TCP connect only: a server that accepts and then
    // answers nothing (half-open, black-holed) would hold the handshake, and the slot, forever.
    let limit = target
        .config
        .get_connect_timeout()
        .copied()
        .unwrap_or(CONNECT_TIMEOUT);
    let (client, connection) = tokio::time::timeout(limit, target.config.connect(NoTls))
        .await
        .map_err(|_| InstanceError::Connect {
            target: target.display.clone(),
            reason: format!("no answer within {} s", limit.as_secs()),
        })?
        .map_err(|e| InstanceError::Connect {
            target: target.display.clone(),
            reason: e.to_string(),
        })?;
    let db = target.display.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(database = %db, "Dagster database connection ended: {e}");
        }
    });
    debug!(database = %target.display, "connected to the Dagster database");
    Ok(client)
}

/// Runs `op` on one of the target's connections, once more on a fresh connection if the first one
/// turned out closed (`idempotent` operations only: a write may have committed before the
/// connection died).
async fn with_client<T, F, Fut>(
    instances: &Instances,
    target: &Target,
    what: &'static str,
    idempotent: bool,
    op: F,
) -> Result<T, InstanceError>
where
    F: Fn(Arc<Client>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut attempt = 0;
    loop {
        let mut lease = instances.lease(target).await?;
        let client = lease.client.clone();
        let result = tokio::time::timeout(QUERY_TIMEOUT, op(client.clone())).await;
        match result {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if idempotent && client.is_closed() && attempt == 0 => {
                warn!(database = %target.display, "Dagster database connection lost during {what}: {e}; retrying");
            }
            Ok(Err(e)) => {
                if e.code().is_none() {
                    lease.evict(target, &e.to_string());
                }
                return Err(query_error(what, &e));
            }
            Err(_) => {
                let reason = format!("no answer within {}s", QUERY_TIMEOUT.as_secs());
                lease.evict(target, &reason);
                return Err(InstanceError::Query { what, reason });
            }
        }
        attempt += 1;
    }
}

impl Instance {
    /// `instance.get_run_by_id`: status column (authoritative), job name and code location from the body.
    pub async fn get_run(&self, run_id: &str) -> Result<Option<RunInfo>, InstanceError> {
        let row = with_client(
            &self.instances,
            &self.runs,
            "read run",
            true,
            |c| async move {
                c.query_opt(
                    "SELECT run_body, status FROM runs WHERE run_id = $1",
                    &[&run_id],
                )
                .await
            },
        )
        .await?;
        let Some(row) = row else { return Ok(None) };
        let body: String = row.try_get(0).map_err(|e| InstanceError::Query {
            what: "read run body",
            reason: e.to_string(),
        })?;
        let status: String = row.try_get(1).map_err(|e| InstanceError::Query {
            what: "read run status",
            reason: e.to_string(),
        })?;
        let body: Value =
            celeriac_wire::json::parse_lenient(body.as_bytes()).unwrap_or(Value::Null);
        let location_name = body
            .pointer("/external_pipeline_origin/external_repository_origin/repository_location_origin/location_name")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Some(RunInfo {
            status,
            job_name: body
                .get("pipeline_name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            location_name,
        }))
    }

    /// Stores an event and notifies listeners (`NOTIFY run_events, '<run_id>_<id>'`), as dagster-postgres
    /// does. Returns the `event_logs.id`.
    pub async fn report(&self, run_id: &str, event: &Event) -> Result<i64, InstanceError> {
        self.report_checked(run_id, event, false).await
    }

    /// [`Self::report`] for a retry: when `maybe_stored` (an earlier attempt failed after sending its
    /// INSERT, which may have committed), an identical row is looked for first and reused, so a
    /// retried event is never stored twice.
    pub async fn report_checked(
        &self,
        run_id: &str,
        event: &Event,
        maybe_stored: bool,
    ) -> Result<i64, InstanceError> {
        let ts = chrono::DateTime::from_timestamp_micros((event.timestamp() * 1e6).round() as i64)
            .map(|d| d.naive_utc())
            .unwrap_or_default();
        let step_key = Some(event.step_key()).filter(|k| !k.is_empty());
        let body = event.entry_json();
        let event_type = event.event_type;
        let existing = if maybe_stored {
            with_client(&self.instances, &self.events, "look for a stored event", true, |c| {
                let body = &body;
                async move {
                    c.query_opt(
                        "SELECT id FROM event_logs WHERE run_id = $1 AND timestamp = $2 AND event = $3 LIMIT 1",
                        &[&run_id, &ts, body],
                    )
                    .await
                }
            })
            .await?
        } else {
            None
        };
        let row = match existing {
            Some(row) => {
                debug!(run_id, "event already stored by an earlier attempt");
                row
            }
            None => self.insert(run_id, body, event_type, &ts, step_key).await?,
        };
        let id: i64 = row
            .try_get::<_, i64>(0)
            .or_else(|_| row.try_get::<_, i32>(0).map(i64::from))
            .map_err(|e| InstanceError::Query {
                what: "read event id",
                reason: e.to_string(),
            })?;
        let notify = format!("{run_id}_{id}");
        with_client(
            &self.instances,
            &self.events,
            "notify run_events",
            true,
            |c| {
                let notify = &notify;
                async move {
                    c.execute("SELECT pg_notify('run_events', $1)", &[notify])
                        .await
                }
            },
        )
        .await?;
        Ok(id)
    }

    async fn insert(
        &self,
        run_id: &str,
        body: &str,
        event_type: &'static str,
        ts: &chrono::NaiveDateTime,
        step_key: Option<&str>,
    ) -> Result<tokio_postgres::Row, InstanceError> {
        with_client(&self.instances, &self.events, "insert event", false, |c| async move {
            c.query_one(
                "INSERT INTO event_logs (run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition) \
                 VALUES ($1, $2, $3, $4, $5, NULL, NULL) RETURNING id",
                &[&run_id, &body, &event_type, ts, &step_key],
            )
            .await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three times more concurrent queries than connections, each longer than a third of
    /// [`QUERY_TIMEOUT`]: the last ones wait past the timeout for a free connection, yet none is
    /// timed out or evicts a healthy connection (the congestion collapse of the one-connection
    /// cache), and the pool never opens more than its connections. Real PostgreSQL on 127.0.0.1.
    #[tokio::test]
    async fn queued_queries_wait_for_a_connection_without_timing_out() {
        let target =
            target_from_yaml("postgres_url: postgresql://postgres@127.0.0.1:5432/postgres\n")
                .unwrap_or_else(|e| panic!("{e}"));
        let instances = Instances::default();
        let each = QUERY_TIMEOUT / 3 + Duration::from_millis(500);
        let started = std::time::Instant::now();
        let queries = (0..3 * CONNECTIONS_PER_DATABASE).map(|_| {
            with_client(&instances, &target, "sleep", false, |c| async move {
                c.execute("SELECT pg_sleep($1)", &[&each.as_secs_f64()])
                    .await
            })
        });
        let results = futures::future::join_all(queries).await;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(
            started.elapsed() >= QUERY_TIMEOUT,
            "the last queries waited past the query timeout: {:?}",
            started.elapsed()
        );
        assert_eq!(instances.cached().await, CONNECTIONS_PER_DATABASE);
    }

    #[test]
    fn parses_postgres_db_with_env_password() {
        std::env::set_var("CELERIAC_TEST_PG_PW", "s3cr'et");
        let t = target_from_yaml("postgres_db:\n  db_name: dagster\n  hostname: db\n  password:\n    env: CELERIAC_TEST_PG_PW\n  port: 5432\n  username: postgres\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.display, "postgresql://postgres@db:5432/dagster");
        assert!(!t.display.contains("s3cr"));
        assert_eq!(t.config.get_password(), Some("s3cr'et".as_bytes()));
        assert_eq!(t.config.get_dbname(), Some("dagster"));
        let u = target_from_yaml("postgres_url: postgresql+psycopg2://u:p%40ss@h:6543/d\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!u.display.contains("p%40ss"), "{}", u.display);
        assert_eq!(u.config.get_ports(), &[6543]);
        assert_eq!(u.config.get_password(), Some("p@ss".as_bytes()));
        assert!(matches!(
            target_from_yaml("postgres_db:\n  db_name: x\n  password:\n    env: CELERIAC_NOPE_X\n"),
            Err(InstanceError::MissingEnv(_))
        ));
        assert!(matches!(
            target_from_yaml("sqlite: {}\n"),
            Err(InstanceError::Unsupported(_))
        ));
    }
}
