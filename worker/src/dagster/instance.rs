//! The run's Dagster instance, as far as the step task needs it: the run's status in the run storage
//! and the event log (spec §3.6). Only Postgres storages exist in celery-k8s deployments.
//!
//! Connections are cached per storage configuration, so the steps of a run share one, and re-opened
//! when the server closed them.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};
use tracing::{debug, warn};

use super::events::Event;

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
    conn_str: String,
    display: String,
}

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
        other => Err(InstanceError::Config(format!(
            "{key}: unexpected value {}",
            other
        ))),
    }
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Parses a `PostgresRunStorage` / `PostgresEventLogStorage` / `DagsterPostgresStorage` config_yaml.
fn target_from_yaml(yaml: &str) -> Result<Target, InstanceError> {
    let cfg: Value =
        serde_norway::from_str(yaml).map_err(|e| InstanceError::Config(e.to_string()))?;
    if let Some(url) = cfg.get("postgres_url") {
        let url = resolve(url, "postgres_url")?
            .ok_or_else(|| InstanceError::Config("postgres_url is empty".into()))?;
        let display = celeriac_wire::url::redact(&url);
        return Ok(Target {
            conn_str: url,
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
    let port = get("port")?.unwrap_or_else(|| "5432".into());
    let user = get("username")?.unwrap_or_else(|| "postgres".into());
    let dbname = get("db_name")?
        .ok_or_else(|| InstanceError::Config("postgres_db.db_name is required".into()))?;
    let mut conn_str = format!(
        "host={} port={} user={} dbname={}",
        quote(&host),
        quote(&port),
        quote(&user),
        quote(&dbname)
    );
    if let Some(pw) = get("password")? {
        conn_str.push_str(&format!(" password={}", quote(&pw)));
    }
    if let Some(Value::Object(params)) = db.get("params") {
        for (k, v) in params {
            if let Some(v) = resolve(v, k)? {
                if k == "sslmode" || k == "connect_timeout" || k == "application_name" {
                    conn_str.push_str(&format!(" {k}={}", quote(&v)));
                }
            }
        }
    }
    Ok(Target {
        conn_str,
        display: format!("postgresql://{user}@{host}:{port}/{dbname}"),
    })
}

/// Connection cache shared by every step task of the worker.
#[derive(Default, Clone)]
pub struct Instances {
    clients: Arc<Mutex<HashMap<String, Arc<Client>>>>,
}

/// A handle on one run's storages.
pub struct Instance {
    runs: Arc<Client>,
    events: Arc<Client>,
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
        let runs = self.client(target_from_yaml(run_yaml)?).await?;
        let events = match event_yaml {
            Some(y) => self.client(target_from_yaml(y)?).await?,
            None => runs.clone(),
        };
        Ok(Instance { runs, events })
    }

    async fn client(&self, target: Target) -> Result<Arc<Client>, InstanceError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&target.conn_str) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
            warn!(database = %target.display, "Dagster database connection was closed; reconnecting");
        }
        let (client, connection) = tokio_postgres::connect(&target.conn_str, NoTls)
            .await
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
        let client = Arc::new(client);
        clients.insert(target.conn_str, client.clone());
        Ok(client)
    }
}

impl Instance {
    /// `instance.get_run_by_id`: status column (authoritative), job name and code location from the body.
    pub async fn get_run(&self, run_id: &str) -> Result<Option<RunInfo>, InstanceError> {
        let row = self
            .runs
            .query_opt(
                "SELECT run_body, status FROM runs WHERE run_id = $1",
                &[&run_id],
            )
            .await
            .map_err(|e| InstanceError::Query {
                what: "read run",
                reason: e.to_string(),
            })?;
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

    /// Stores an event and notifies listeners (`NOTIFY run_events, '<run_id>_<id>'`), as dagster-postgres does.
    pub async fn report(&self, run_id: &str, event: &Event) -> Result<(), InstanceError> {
        let ts = chrono::DateTime::from_timestamp_micros((event.timestamp() * 1e6) as i64)
            .map(|d| d.naive_utc())
            .unwrap_or_default();
        let step_key = event.entry.get("step_key").and_then(Value::as_str);
        let row = self
            .events
            .query_one(
                "INSERT INTO event_logs (run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition) \
                 VALUES ($1, $2, $3, $4, $5, NULL, NULL) RETURNING id",
                &[&run_id, &event.entry_json(), &event.event_type, &ts, &step_key],
            )
            .await
            .map_err(|e| InstanceError::Query { what: "insert event", reason: e.to_string() })?;
        let id: i64 = row
            .try_get::<_, i64>(0)
            .or_else(|_| row.try_get::<_, i32>(0).map(i64::from))
            .unwrap_or_default();
        self.events
            .execute(
                "SELECT pg_notify('run_events', $1)",
                &[&format!("{run_id}_{id}")],
            )
            .await
            .map_err(|e| InstanceError::Query {
                what: "notify run_events",
                reason: e.to_string(),
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_db_with_env_password() {
        std::env::set_var("CELERIAC_TEST_PG_PW", "s3cr'et");
        let t = target_from_yaml("postgres_db:\n  db_name: dagster\n  hostname: db\n  password:\n    env: CELERIAC_TEST_PG_PW\n  port: 5432\n  username: postgres\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.display, "postgresql://postgres@db:5432/dagster");
        assert!(!t.display.contains("s3cr"));
        assert!(t.conn_str.contains(r"password='s3cr\'et'"));
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
