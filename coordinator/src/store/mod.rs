//! The coordinator's state in the Dagster instance database: run leases (the hand-off table that
//! `CeleriacRunLauncher` fills), the step tasks each run published, and the transactional writes that
//! keep Dagster's event log, the run's status and that state in step.
//!
//! Every write for a run happens in one transaction that first locks the run's lease row and checks that
//! this replica still owns it, so a replica that lost its lease (paused, partitioned) can never write
//! for a run another replica took over. Times of leases come from the database clock, like the plugin's
//! health check, so replicas' clocks do not matter.
//!
//! [`schema`] holds the tables and rows, [`pool`] the connections, [`commit`] the transaction of a
//! decision; this module the queries of leases, run statuses and tasks.

mod commit;
mod error;
mod pool;
mod schema;

use serde_json::Value;
use tokio_postgres::Client;

pub use commit::decision_lock_sql;
pub use error::StoreError;
pub use pool::Store;
pub use schema::{
    Claimed, Commit, StatusChange, TaskRow, EVENTS_CHANNEL, NOTIFY_CHANNEL, RUNS_TABLE, TASKS_TABLE,
};

use error::query;
use schema::DB_NOW;

impl Store {
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
}
