//! The step events of one Dagster run, read from the instance's PostgreSQL event log (`event_logs`,
//! the table Dagster's UI reads), for the run timeline. Only what the fleet already writes there is
//! used:
//!
//! * the run worker's (or celeriac coordinator's) engine event `Submitting celery task for step "s" to
//!   queue "q".` — when the step task was published, and to which queue;
//! * the celeriac worker's engine events `Executing step "s" in Kubernetes job <job>.` (written just
//!   before it creates the Job or starts the step process) and `Retrieving logs from Kubernetes Job
//!   pods` (the Job has finished; its logs are read next);
//! * the step process's own `STEP_START` / `STEP_RESTARTED` (it is running in its pod) and
//!   `STEP_SUCCESS` / `STEP_FAILURE` / `STEP_UP_FOR_RETRY`.
//!
//! Read-only, on demand (one indexed query per timeline), over one connection opened on first use and
//! opened again when it breaks.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("Dagster event log {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("Dagster event log query: {0}")]
    Query(String),
}

/// What one event-log row says about a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepMark {
    /// `Submitting celery task …`: published to `queue`.
    Submitted { queue: Option<String> },
    /// `Executing step … in Kubernetes job <job>`: the worker is creating the Job (or process).
    JobCreated { k8s_job: Option<String> },
    /// `STEP_START` (first attempt) or `STEP_RESTARTED` (a retry): the step process runs.
    StepStart,
    /// `STEP_SUCCESS`, `STEP_FAILURE` or `STEP_UP_FOR_RETRY`.
    StepEnd { outcome: &'static str },
    /// `Retrieving logs from Kubernetes Job pods`: the Job finished.
    JobFinished,
}

/// One classified row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepEvent {
    pub step_key: String,
    pub ts: f64,
    #[serde(flatten)]
    pub mark: StepMark,
}

/// The text between the first pair of `"` after `after` (`… to queue "q".` → `q`).
fn quoted(message: &str, after: &str) -> Option<String> {
    let rest = &message[message.find(after)? + after.len()..];
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

/// Classifies a row by its event type and (for engine events) its message; `None` for the rows the
/// timeline does not use.
pub fn classify(event_type: &str, message: &str) -> Option<StepMark> {
    match event_type {
        "STEP_START" | "STEP_RESTARTED" => Some(StepMark::StepStart),
        "STEP_SUCCESS" => Some(StepMark::StepEnd { outcome: "success" }),
        "STEP_FAILURE" => Some(StepMark::StepEnd { outcome: "failure" }),
        "STEP_UP_FOR_RETRY" => Some(StepMark::StepEnd { outcome: "retry" }),
        "ENGINE_EVENT" if message.contains("Submitting celery task for step") => {
            Some(StepMark::Submitted {
                queue: quoted(message, " to queue "),
            })
        }
        "ENGINE_EVENT" if message.contains("Executing step \"") => Some(StepMark::JobCreated {
            k8s_job: message
                .split(" in Kubernetes job ")
                .nth(1)
                .map(|j| j.trim_end_matches('.').trim().to_string()),
        }),
        "ENGINE_EVENT" if message.contains("Retrieving logs from Kubernetes Job pods") => {
            Some(StepMark::JobFinished)
        }
        _ => None,
    }
}

/// A lazily connected reader of one instance database.
pub struct EventLog {
    url: String,
    /// Set apart from the URL (`FLOWER_DAGSTER_DB_PASSWORD`, from a Secret), so that a password with
    /// `@`, `/` or `:` needs no URL escaping.
    password: Option<String>,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl EventLog {
    pub fn new(url: &str, password: Option<&str>) -> EventLog {
        EventLog {
            url: url.to_string(),
            password: password.map(str::to_owned),
            client: Mutex::new(None),
        }
    }

    /// The database, with its password hidden.
    pub fn describe(&self) -> String {
        celeriac_wire::url::redact(&self.url)
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, EventLogError> {
        let fail = |reason: String| EventLogError::Connect {
            url: self.describe(),
            reason,
        };
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| fail(e.to_string()))?;
        if let Some(password) = &self.password {
            config.password(password);
        }
        let (client, connection) = tokio::time::timeout(
            Duration::from_secs(5),
            config.connect(tokio_postgres::NoTls),
        )
        .await
        .map_err(|_| fail("timed out after 5 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!("Dagster event log connection ended: {e}");
            }
        });
        info!(db = %self.describe(), "reading the Dagster event log");
        Ok(client)
    }

    /// The classified step rows of `run_id`, in the order Dagster stored them.
    pub async fn step_events(&self, run_id: &str) -> Result<Vec<StepEvent>, EventLogError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.connect().await?);
        }
        let Some(client) = guard.as_ref() else {
            return Err(EventLogError::Query("no connection".into()));
        };
        // `event` is the serialized EventLogEntry (text); its `timestamp` is the float Dagster's UI shows.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&run_id];
        let query = client.query(
            "SELECT step_key, dagster_event_type, \
                    COALESCE((event::jsonb->>'timestamp')::float8, extract(epoch FROM event_logs.timestamp)::float8), \
                    COALESCE(event::jsonb->'dagster_event'->>'message', '') \
             FROM event_logs \
             WHERE run_id = $1 AND step_key IS NOT NULL \
               AND dagster_event_type IN ('ENGINE_EVENT', 'STEP_START', 'STEP_RESTARTED', 'STEP_SUCCESS', \
                                          'STEP_FAILURE', 'STEP_UP_FOR_RETRY') \
             ORDER BY id",
            &params,
        );
        let rows = match tokio::time::timeout(Duration::from_secs(10), query).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                if client.is_closed() {
                    *guard = None;
                }
                // tokio-postgres shows a server error as "db error": say what the server said.
                let reason = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                return Err(EventLogError::Query(reason));
            }
            Err(_) => {
                *guard = None;
                return Err(EventLogError::Query("timed out after 10 s".into()));
            }
        };
        Ok(rows
            .iter()
            .filter_map(|r| {
                let step_key: String = r.try_get(0).ok()?;
                let kind: String = r.try_get(1).ok()?;
                let ts: f64 = r.try_get(2).ok()?;
                let message: String = r.try_get(3).ok()?;
                Some(StepEvent {
                    step_key,
                    ts,
                    mark: classify(&kind, &message)?,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_messages_the_fleet_writes() {
        assert_eq!(
            classify(
                "ENGINE_EVENT",
                "Submitting celery task for step \"tl_leaf_0\" to queue \"fc_q\"."
            ),
            Some(StepMark::Submitted {
                queue: Some("fc_q".into())
            })
        );
        assert_eq!(
            classify(
                "ENGINE_EVENT",
                "[CeleryK8sJobExecutor] Executing step \"tl_leaf_0\" in Kubernetes job dagster-step-0123abcd-1."
            ),
            Some(StepMark::JobCreated {
                k8s_job: Some("dagster-step-0123abcd-1".into())
            })
        );
        assert_eq!(
            classify(
                "ENGINE_EVENT",
                "[CeleryK8sJobExecutor] Retrieving logs from Kubernetes Job pods"
            ),
            Some(StepMark::JobFinished)
        );
        assert_eq!(classify("STEP_RESTARTED", ""), Some(StepMark::StepStart));
        assert_eq!(
            classify("STEP_UP_FOR_RETRY", ""),
            Some(StepMark::StepEnd { outcome: "retry" })
        );
        assert_eq!(
            classify(
                "ENGINE_EVENT",
                "[CeleryK8sJobExecutor] Task for step x picked up by Celery"
            ),
            None
        );
        assert_eq!(classify("STEP_OUTPUT", ""), None);
    }
}
