//! The coordinator's state in the Dagster instance database: run leases (the hand-off table that
//! `CeleriacRunLauncher` fills), the step tasks each run published, and the transactional writes that
//! keep Dagster's event log, the run's status and that state in step.
//!
//! Every write for a run happens in one transaction that first locks the run's lease row and checks that
//! this replica still owns it, so a replica that lost its lease (paused, partitioned) can never write
//! for a run another replica took over. Times of leases come from the database clock, like the plugin's
//! health check, so replicas' clocks do not matter.

use celeriac_dagster::run_events::{status_of, EventRow, FailureReason, RUN_FAILURE_REASON_TAG};
use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard, Semaphore, SemaphorePermit};
use tokio_postgres::{Client, Config, NoTls};
use tracing::{debug, warn};

/// The hand-off table (shared with `dagster_celeriac`).
pub const RUNS_TABLE: &str = "celeriac_coordinator_runs";
/// Published step tasks, one row per task.
pub const TASKS_TABLE: &str = "celeriac_coordinator_tasks";
/// `NOTIFY` channel of hand-offs and terminations.
pub const NOTIFY_CHANNEL: &str = "celeriac_coordinator";
/// `NOTIFY` channel Dagster's Postgres event log signals each stored event on (`<run_id>_<id>`).
pub const EVENTS_CHANNEL: &str = "run_events";
const DB_NOW: &str = "EXTRACT(EPOCH FROM clock_timestamp())::double precision";

fn ddl() -> String {
    format!(
        "SELECT pg_advisory_xact_lock(hashtext('{RUNS_TABLE}'));
         CREATE TABLE IF NOT EXISTS {RUNS_TABLE} (
           run_id      text PRIMARY KEY,
           handoff     json NOT NULL,
           created_at  double precision NOT NULL,
           owner       text,
           heartbeat   double precision,
           state       text NOT NULL DEFAULT 'pending',
           finished_at double precision,
           error       text
         );
         CREATE TABLE IF NOT EXISTS {TASKS_TABLE} (
           task_id      text PRIMARY KEY,
           run_id       text NOT NULL,
           step_key     text NOT NULL,
           attempt      integer NOT NULL,
           queue        text NOT NULL,
           submitted_at double precision NOT NULL,
           message      text NOT NULL,
           published    boolean NOT NULL DEFAULT false,
           result       text,
           applied_seq  bigint,
           applied_at   double precision
         );
         CREATE INDEX IF NOT EXISTS {TASKS_TABLE}_by_run ON {TASKS_TABLE} (run_id);
         CREATE SEQUENCE IF NOT EXISTS {TASKS_TABLE}_applied_seq;"
    )
}

/// Errors of the store. Messages name the database without its password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the Dagster database {database}: {source}")]
    Connect {
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("Dagster database query failed ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Another replica owns the run now: this one must stop driving it.
    #[error("the lease of run {0} is held by another coordinator")]
    LostLease(String),
    /// The connection pool broke its own invariant (a permit without a free slot); never expected.
    #[error("the connection pool of the Dagster database {0} is closed")]
    Closed(String),
}

fn query(what: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// A run this replica just claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub run_id: String,
    pub handoff: Value,
    /// The replica that held the lease before (a takeover when it is another one).
    pub previous_owner: Option<String>,
    /// How old the previous owner's heartbeat was, in seconds.
    pub heartbeat_age: Option<f64>,
}

/// A step task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub task_id: String,
    pub run_id: String,
    pub step_key: String,
    pub attempt: i32,
    pub queue: String,
    pub submitted_at: f64,
    /// `{"routing_key", "headers", "properties", "body"}` of the published message.
    pub message: Value,
    pub published: bool,
    /// The result document once it was applied to the run.
    pub result: Option<Value>,
    pub applied_at: Option<f64>,
}

/// A run status change written with an event (`SqlRunStorage.handle_run_event`).
#[derive(Debug, Clone)]
pub struct StatusChange {
    /// The run body as stored before the change.
    pub body: Value,
    pub failure_reason: Option<FailureReason>,
}

/// Everything one decision of a run writes, atomically.
#[derive(Debug, Default)]
pub struct Commit {
    /// `(task_id, result document, applied_at)` of each result this decision applied.
    pub applied: Vec<(String, Value, f64)>,
    pub events: Vec<EventRow>,
    pub new_tasks: Vec<TaskRow>,
    /// Applied with the first run-level event of `events` that changes the status.
    pub status: Option<StatusChange>,
}

/// A small pool of connections to the instance database (transactions need a connection each).
pub struct Store {
    config: Config,
    database: String,
    /// One permit per slot: a caller waits in line (FIFO) for whichever connection frees first,
    /// rather than behind one busy connection while others are idle (a decision of one run queued
    /// behind another run's slow commit was the tail of result → next step).
    free: Semaphore,
    slots: Vec<Mutex<Option<Client>>>,
}

impl Store {
    /// Connects `size` connections lazily; checks connectivity and creates the tables now.
    pub async fn open(config: Config, database: String, size: usize) -> Result<Store, StoreError> {
        let size = size.max(1);
        let store = Store {
            config,
            database,
            free: Semaphore::new(size),
            slots: (0..size).map(|_| Mutex::new(None)).collect(),
        };
        let c = store.conn().await?;
        c.batch_execute(&format!("BEGIN; {} COMMIT;", ddl()))
            .await
            .map_err(query("create the coordinator tables"))?;
        drop(c);
        Ok(store)
    }

    /// The database, for logs (no password).
    pub fn database(&self) -> &str {
        &self.database
    }

    /// A dedicated connection (for `LISTEN`), driven by the caller.
    pub async fn dedicated(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        StoreError,
    > {
        self.config
            .connect(NoTls)
            .await
            .map_err(|source| StoreError::Connect {
                database: self.database.clone(),
                source,
            })
    }

    async fn conn(&self) -> Result<Conn<'_>, StoreError> {
        let permit = self
            .free
            .acquire()
            .await
            .map_err(|_| StoreError::Closed(self.database.clone()))?;
        // A permit guarantees a slot nobody holds; lowest first keeps a quiet replica on few
        // connections.
        let mut guard = self
            .slots
            .iter()
            .find_map(|s| s.try_lock().ok())
            .ok_or_else(|| StoreError::Closed(self.database.clone()))?;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = self.dedicated().await?;
            let database = self.database.clone();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    warn!(%database, "Dagster database connection ended: {e}");
                }
            });
            debug!(database = %self.database, "connected to the Dagster database");
            *guard = Some(client);
        }
        Ok(Conn(guard, permit))
    }

    /// Claims up to `limit` runs: unclaimed ones, ones whose owner's heartbeat is older than
    /// `lease_timeout`, and this replica's own ones it is not driving (after a restart).
    pub async fn claim(
        &self,
        replica: &str,
        lease_timeout: f64,
        driving: &[String],
        limit: i64,
    ) -> Result<Vec<Claimed>, StoreError> {
        let c = self.conn().await?;
        let sql = format!(
            "WITH c AS (
               SELECT run_id, owner AS prev_owner, {DB_NOW} - heartbeat AS age FROM {RUNS_TABLE}
               WHERE state IN ('pending', 'running')
                 AND (owner IS NULL OR owner = $1 OR heartbeat IS NULL OR heartbeat < {DB_NOW} - $2)
                 AND NOT (run_id = ANY($3))
               ORDER BY created_at LIMIT $4 FOR UPDATE SKIP LOCKED)
             UPDATE {RUNS_TABLE} r SET owner = $1, heartbeat = {DB_NOW}, state = 'running'
             FROM c WHERE r.run_id = c.run_id
             RETURNING r.run_id, r.handoff::text, c.prev_owner, c.age"
        );
        let rows = c
            .query(&sql, &[&replica, &lease_timeout, &driving, &limit])
            .await
            .map_err(query("claim runs"))?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get(1).map_err(query("read hand-off"))?;
                Ok(Claimed {
                    run_id: r.try_get(0).map_err(query("read run id"))?,
                    handoff: serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    previous_owner: r.try_get(2).map_err(query("read owner"))?,
                    heartbeat_age: r.try_get(3).map_err(query("read heartbeat"))?,
                })
            })
            .collect()
    }

    /// Renews this replica's leases; returns the runs it still owns (any other was taken over).
    pub async fn renew(&self, replica: &str, runs: &[String]) -> Result<Vec<String>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.conn().await?;
        // Runs this replica still owns: the running ones are renewed; the ones it already finished
        // (their drivers are ending) are reported as kept too, so that only a run another replica
        // took counts as lost.
        let sql = format!(
            "WITH renewed AS (
                UPDATE {RUNS_TABLE} SET heartbeat = {DB_NOW}
                WHERE owner = $1 AND run_id = ANY($2) AND state = 'running' RETURNING run_id)
             SELECT run_id FROM renewed
             UNION ALL
             SELECT run_id FROM {RUNS_TABLE} WHERE owner = $1 AND run_id = ANY($2) AND state <> 'running'"
        );
        let rows = c
            .query(&sql, &[&replica, &runs])
            .await
            .map_err(query("renew leases"))?;
        Ok(rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
    }

    /// Gives this replica's running leases up (graceful shutdown): another replica claims them at once.
    pub async fn release(&self, replica: &str) -> Result<u64, StoreError> {
        let c = self.conn().await?;
        let sql = format!(
            "UPDATE {RUNS_TABLE} SET owner = NULL, heartbeat = NULL WHERE owner = $1 AND state = 'running'"
        );
        c.execute(&sql, &[&replica])
            .await
            .map_err(query("release leases"))
    }

    /// Marks a run's lease finished (`finished` or `failed` with the reason).
    pub async fn finish(
        &self,
        run_id: &str,
        replica: &str,
        state: &str,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let c = self.conn().await?;
        let sql = format!(
            "UPDATE {RUNS_TABLE} SET state = $3, error = $4, finished_at = {DB_NOW}
             WHERE run_id = $1 AND owner = $2"
        );
        c.execute(&sql, &[&run_id, &replica, &state, &error])
            .await
            .map_err(query("finish run lease"))?;
        Ok(())
    }

    /// Statuses (`runs.status`) of runs, for cancellation and outside changes.
    pub async fn run_statuses(&self, runs: &[String]) -> Result<Vec<(String, String)>, StoreError> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.conn().await?;
        let rows = c
            .query(
                "SELECT run_id, status FROM runs WHERE run_id = ANY($1)",
                &[&runs],
            )
            .await
            .map_err(query("read run statuses"))?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
            .collect())
    }

    /// The run's status column and stored body.
    pub async fn run_row(&self, run_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let c = self.conn().await?;
        let row = c
            .query_opt(
                "SELECT status, run_body FROM runs WHERE run_id = $1",
                &[&run_id],
            )
            .await
            .map_err(query("read run"))?;
        Ok(row.and_then(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?))))
    }

    /// A client for reads that need the Dagster schema (run record, plan snapshot).
    pub async fn with_client<T>(&self, f: impl AsyncFnOnce(&Client) -> T) -> Result<T, StoreError> {
        let c = self.conn().await?;
        let client: &Client = &c;
        Ok(f(client).await)
    }

    /// The run's step tasks, in submission order.
    pub async fn tasks(&self, run_id: &str) -> Result<Vec<TaskRow>, StoreError> {
        let c = self.conn().await?;
        let sql = format!(
            "SELECT task_id, run_id, step_key, attempt, queue, submitted_at, message, published, result,
                    applied_at
             FROM {TASKS_TABLE} WHERE run_id = $1 ORDER BY submitted_at, task_id"
        );
        let rows = c
            .query(&sql, &[&run_id])
            .await
            .map_err(query("read tasks"))?;
        rows.iter()
            .map(|r| {
                let message: String = r.try_get(6).map_err(query("read task message"))?;
                let result: Option<String> = r.try_get(8).map_err(query("read task result"))?;
                Ok(TaskRow {
                    task_id: r.try_get(0).map_err(query("read task id"))?,
                    run_id: r.try_get(1).map_err(query("read task run"))?,
                    step_key: r.try_get(2).map_err(query("read task step"))?,
                    attempt: r.try_get(3).map_err(query("read task attempt"))?,
                    queue: r.try_get(4).map_err(query("read task queue"))?,
                    submitted_at: r.try_get(5).map_err(query("read task time"))?,
                    message: serde_json::from_str(&message).unwrap_or(Value::Null),
                    published: r.try_get(7).map_err(query("read task published"))?,
                    result: result.and_then(|t| serde_json::from_str(&t).ok()),
                    applied_at: r.try_get(9).map_err(query("read task applied"))?,
                })
            })
            .collect()
    }

    /// The order in which results were applied (by `applied_seq`).
    pub async fn applied_order(&self, run_id: &str) -> Result<Vec<String>, StoreError> {
        let c = self.conn().await?;
        let sql = format!(
            "SELECT task_id FROM {TASKS_TABLE} WHERE run_id = $1 AND applied_seq IS NOT NULL
             ORDER BY applied_seq"
        );
        let rows = c
            .query(&sql, &[&run_id])
            .await
            .map_err(query("read applied order"))?;
        Ok(rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
    }

    /// Marks tasks as published.
    pub async fn mark_published(&self, task_ids: &[String]) -> Result<(), StoreError> {
        if task_ids.is_empty() {
            return Ok(());
        }
        let c = self.conn().await?;
        let sql = format!("UPDATE {TASKS_TABLE} SET published = true WHERE task_id = ANY($1)");
        c.execute(&sql, &[&task_ids])
            .await
            .map_err(query("mark tasks published"))?;
        Ok(())
    }

    /// Writes one decision of a run in one transaction, if this replica still owns the run.
    /// Returns `false` when the result was already applied (a redelivered result: nothing written).
    pub async fn commit(
        &self,
        run_id: &str,
        replica: &str,
        commit: &Commit,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(query("begin"))?;
        // Every statement is sent at once (pipelined, in order); the lease check decides afterwards
        // whether the transaction commits or rolls back.
        let lock_sql = format!("SELECT owner FROM {RUNS_TABLE} WHERE run_id = $1 FOR UPDATE");
        let lock = async {
            let row = tx
                .query_opt(&lock_sql, &[&run_id])
                .await
                .map_err(query("lock run lease"))?;
            Ok::<_, StoreError>(
                row.and_then(|r| r.try_get::<_, Option<String>>(0).ok())
                    .flatten(),
            )
        };
        let apply_sql = format!(
            "UPDATE {TASKS_TABLE} SET result = $2, applied_at = $3,
               applied_seq = nextval('{TASKS_TABLE}_applied_seq')
             WHERE task_id = $1 AND result IS NULL"
        );
        // One statement per result, sent in order: `applied_seq` keeps the order they were applied in.
        let results: Vec<String> = commit.applied.iter().map(|a| a.1.to_string()).collect();
        let applied = futures::future::try_join_all(commit.applied.iter().zip(&results).map(
            |((task_id, _, at), result)| async {
                tx.execute(&apply_sql, &[task_id, result, at])
                    .await
                    .map_err(query("record task result"))
            },
        ));
        let tasks = async {
            if commit.new_tasks.is_empty() {
                Ok(())
            } else {
                insert_tasks(&tx, &commit.new_tasks).await
            }
        };
        let events = async {
            if commit.events.is_empty() {
                Ok(())
            } else {
                insert_events(&tx, run_id, &commit.events).await
            }
        };
        let status = async {
            // The status follows the first event that changes it (RUN_START, RUN_SUCCESS, …).
            let first = commit.events.iter().find_map(|e| {
                let status = e.event_type.as_deref().and_then(status_of)?;
                Some((status, e.timestamp))
            });
            match (&commit.status, first) {
                (Some(change), Some((status, at))) => {
                    apply_status(&tx, run_id, status, change, chrono_naive(at)).await
                }
                _ => Ok(()),
            }
        };
        let (owner, applied, (), (), ()) = tokio::try_join!(lock, applied, tasks, events, status)?;
        if owner.as_deref() != Some(replica) {
            return Err(StoreError::LostLease(run_id.to_string()));
        }
        if applied.contains(&0) {
            return Ok(false); // a result was applied before (redelivered): roll back everything
        }
        tx.commit().await.map_err(query("commit"))?;
        Ok(true)
    }
}

/// `$1, $2, …` groups of `width` placeholders for `rows` rows.
fn placeholders(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let cols: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
            format!("({})", cols.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Step tasks of one decision, in one statement.
async fn insert_tasks(
    tx: &tokio_postgres::Transaction<'_>,
    tasks: &[TaskRow],
) -> Result<(), StoreError> {
    let messages: Vec<String> = tasks.iter().map(|t| t.message.to_string()).collect();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    for (t, message) in tasks.iter().zip(&messages) {
        params.extend([
            &t.task_id as &(dyn tokio_postgres::types::ToSql + Sync),
            &t.run_id,
            &t.step_key,
            &t.attempt,
            &t.queue,
            &t.submitted_at,
            message,
        ]);
    }
    let sql = format!(
        "INSERT INTO {TASKS_TABLE} (task_id, run_id, step_key, attempt, queue, submitted_at, message)
         VALUES {}",
        placeholders(tasks.len(), 7)
    );
    tx.execute(&sql, &params)
        .await
        .map_err(query("record step tasks"))?;
    Ok(())
}

/// Events of one decision and their notifications, in one statement.
async fn insert_events(
    tx: &tokio_postgres::Transaction<'_>,
    run_id: &str,
    events: &[EventRow],
) -> Result<(), StoreError> {
    let bodies: Vec<String> = events.iter().map(EventRow::entry_json).collect();
    let times: Vec<chrono::NaiveDateTime> =
        events.iter().map(|e| chrono_naive(e.timestamp)).collect();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    for ((e, body), ts) in events.iter().zip(&bodies).zip(&times) {
        params.extend([
            &run_id as &(dyn tokio_postgres::types::ToSql + Sync),
            body,
            &e.event_type,
            ts,
            &e.step_key,
        ]);
    }
    // One statement: the rows, then `NOTIFY run_events, '<run_id>_<id>'` for each (as dagster-postgres
    // signals every stored event).
    let sql = format!(
        "WITH stored AS (
           INSERT INTO event_logs (run_id, event, dagster_event_type, timestamp, step_key)
           VALUES {} RETURNING run_id, id)
         SELECT pg_notify('run_events', run_id || '_' || id) FROM stored",
        placeholders(events.len(), 5)
    );
    tx.execute(&sql, &params)
        .await
        .map_err(query("store events"))?;
    Ok(())
}

/// `SqlRunStorage.handle_run_event`: the failure-reason tag first, then status, body and times.
async fn apply_status(
    tx: &tokio_postgres::Transaction<'_>,
    run_id: &str,
    status: &str,
    change: &StatusChange,
    ts: chrono::NaiveDateTime,
) -> Result<(), StoreError> {
    if let Some(reason) = change.failure_reason {
        let updated = tx
            .execute(
                "UPDATE run_tags SET value = $3 WHERE run_id = $1 AND key = $2",
                &[&run_id, &RUN_FAILURE_REASON_TAG, &reason.as_str()],
            )
            .await
            .map_err(query("update failure reason tag"))?;
        if updated == 0 {
            tx.execute(
                "INSERT INTO run_tags (run_id, key, value) VALUES ($1, $2, $3)",
                &[&run_id, &RUN_FAILURE_REASON_TAG, &reason.as_str()],
            )
            .await
            .map_err(query("add failure reason tag"))?;
        }
    }
    let body = celeriac_dagster::run_events::run_body_with_status(
        &change.body,
        status,
        change.failure_reason,
    );
    let epoch = ts.and_utc().timestamp_micros() as f64 / 1e6;
    let (start, end): (Option<f64>, Option<f64>) = match status {
        "STARTED" => (Some(epoch), None),
        "SUCCESS" | "FAILURE" | "CANCELED" => (None, Some(epoch)),
        _ => (None, None),
    };
    tx.execute(
        "UPDATE runs SET status = $2, run_body = $3, update_timestamp = $4,
           start_time = COALESCE($5, start_time), end_time = COALESCE($6, end_time)
         WHERE run_id = $1",
        &[
            &run_id,
            &status,
            &celeriac_dagster::serdes::to_string(&body),
            &ts,
            &start,
            &end,
        ],
    )
    .await
    .map_err(query("update run status"))?;
    Ok(())
}

fn chrono_naive(epoch: f64) -> chrono::NaiveDateTime {
    chrono::DateTime::from_timestamp_micros((epoch * 1e6).round() as i64)
        .map(|d| d.naive_utc())
        .unwrap_or_default()
}

/// A pooled connection, exclusively held (its slot, and the pool's permit for it).
struct Conn<'a>(
    MutexGuard<'a, Option<Client>>,
    #[allow(dead_code)] // held for its Drop: the permit returns with the slot
    SemaphorePermit<'a>,
);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        // `conn()` only hands out a slot it filled.
        self.0.as_ref().expect("connected slot")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("connected slot")
    }
}
