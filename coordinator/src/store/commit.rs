//! Writing one decision of a run: the results it applied, the Dagster events, the new step tasks and
//! the run's status, all in one transaction that first checks this replica still holds the run's lease
//! (a replica that lost it can never write for a run another one took over).

use std::time::Instant;

use celeriac_dagster::run_events::{status_of, EventRow, RUN_FAILURE_REASON_TAG};
use tracing::debug;

use super::error::{query, StoreError};
use super::pool::Store;
use super::schema::{Commit, StatusChange, TaskRow, RUNS_TABLE, TASKS_TABLE};

/// The statement that checks, at the start of a decision, that this replica owns the run, and keeps
/// the owner fixed until the decision's transaction ends.
///
/// `FOR KEY SHARE`, the weakest row lock, is enough for that: a takeover claims with `FOR UPDATE SKIP
/// LOCKED`, which skips a row held even this way, so no other replica can take the run over
/// mid-decision. A stronger lock (`FOR UPDATE`, as before) also conflicted with the lease renewal's
/// `UPDATE … SET heartbeat` of all this replica's runs every few seconds: each renewal queued behind
/// the decisions in progress while the decisions of the rows it had already updated queued behind it,
/// a convoy that was the tail of result → next step in the load test.
pub fn decision_lock_sql() -> String {
    format!("SELECT owner FROM {RUNS_TABLE} WHERE run_id = $1 FOR KEY SHARE")
}

impl Store {
    /// Writes one decision of a run in one transaction, if this replica still owns the run.
    /// Returns `false` when the result was already applied (a redelivered result: nothing written).
    pub async fn commit(
        &self,
        run_id: &str,
        replica: &str,
        commit: &Commit,
    ) -> Result<bool, StoreError> {
        // Where a slow decision's time went (debug log): waiting for a pooled connection, the
        // statements (row locks included), or the commit itself (the WAL flush).
        let asked = Instant::now();
        let mut c = self.conn().await?;
        let connected = asked.elapsed();
        let tx = c.transaction().await.map_err(query("begin"))?;
        // Every statement is sent at once (pipelined, in order); the lease check decides afterwards
        // whether the transaction commits or rolls back.
        let lock_sql = decision_lock_sql();
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
        let stated = asked.elapsed();
        if owner.as_deref() != Some(replica) {
            return Err(StoreError::LostLease(run_id.to_string()));
        }
        if applied.contains(&0) {
            return Ok(false); // a result was applied before (redelivered): roll back everything
        }
        tx.commit().await.map_err(query("commit"))?;
        debug!(
            run_id,
            connection_wait_ms = ms(connected),
            statements_ms = ms(stated - connected),
            commit_ms = ms(asked.elapsed() - stated),
            "decision written"
        );
        Ok(true)
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
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
