//! The coordinator's tables in the instance database and the rows it reads and writes. Only this
//! module says what the tables look like; the queries ([`super`]) and the transaction of a decision
//! ([`super::commit`]) use its names.

use celeriac_dagster::run_events::{EventRow, FailureReason};
use serde_json::Value;

/// The hand-off table (shared with `dagster_celeriac`).
pub const RUNS_TABLE: &str = "celeriac_coordinator_runs";
/// Published step tasks, one row per task.
pub const TASKS_TABLE: &str = "celeriac_coordinator_tasks";
/// `NOTIFY` channel of hand-offs and terminations.
pub const NOTIFY_CHANNEL: &str = "celeriac_coordinator";
/// `NOTIFY` channel Dagster's Postgres event log signals each stored event on (`<run_id>_<id>`).
pub const EVENTS_CHANNEL: &str = "run_events";
pub(super) const DB_NOW: &str = "EXTRACT(EPOCH FROM clock_timestamp())::double precision";

pub(super) fn ddl() -> String {
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
