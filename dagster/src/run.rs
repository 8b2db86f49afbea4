//! A run as Dagster stores it in its run storage: the `runs.run_body` record (`DagsterRun`, stored
//! under its old name `PipelineRun`) and the execution plan snapshot it points to
//! (`snapshots.snapshot_body`, zlib-compressed serdes JSON).

use std::collections::BTreeMap;

use serde_json::Value;
use tokio_postgres::Client;

use crate::plan::PlanSnapshot;
use crate::serdes::{self, Obj, SerdesError};

/// What the coordinator reads of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub run_id: String,
    pub job_name: String,
    /// `DagsterRunStatus` member name (`NOT_STARTED`, `STARTING`, `STARTED`, …).
    pub status: String,
    pub tags: BTreeMap<String, String>,
    pub step_keys_to_execute: Option<Vec<String>>,
    pub execution_plan_snapshot_id: Option<String>,
    pub parent_run_id: Option<String>,
    pub root_run_id: Option<String>,
    /// `job_code_origin` (stored as `pipeline_code_origin`): what `ExecuteStepArgs.pipeline_origin`
    /// carries; opaque.
    pub job_code_origin: Option<Value>,
    /// `remote_job_origin` (stored as `external_pipeline_origin`); opaque.
    pub remote_job_origin: Option<Value>,
    /// The whole stored body, for fields read elsewhere.
    pub body: Value,
}

impl RunRecord {
    /// Reads a packed `DagsterRun` / `PipelineRun`.
    pub fn decode(v: &Value) -> Result<Self, SerdesError> {
        let o = Obj::expect(v, &["PipelineRun", "DagsterRun"], "run_body")?;
        let status = match o.get("status") {
            Some(s @ Value::Object(_)) => {
                let text = s
                    .get("__enum__")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                text.rsplit_once('.').map_or(text, |(_, m)| m).to_string()
            }
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let mut tags = BTreeMap::new();
        if let Some(m) = o.dict("tags")? {
            for (k, t) in m {
                if let Some(t) = t.as_str() {
                    tags.insert(k.clone(), t.to_string());
                }
            }
        }
        let opaque = |field: &str| o.get(field).filter(|x| !x.is_null()).cloned();
        let step_keys_to_execute = match o.get("step_keys_to_execute") {
            None | Some(Value::Null) => None,
            Some(Value::Array(keys)) => Some(
                keys.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            ),
            Some(other) => {
                return Err(SerdesError::Shape {
                    path: o.path_of("step_keys_to_execute"),
                    expected: "list of step keys".into(),
                    found: serdes::kind(other).into(),
                })
            }
        };
        Ok(RunRecord {
            run_id: o.str("run_id")?.to_string(),
            job_name: o
                .opt_str("pipeline_name")?
                .or(o.opt_str("job_name")?)
                .unwrap_or_default()
                .to_string(),
            status,
            tags,
            step_keys_to_execute,
            execution_plan_snapshot_id: o
                .opt_str("execution_plan_snapshot_id")?
                .map(str::to_string),
            parent_run_id: o.opt_str("parent_run_id")?.map(str::to_string),
            root_run_id: o.opt_str("root_run_id")?.map(str::to_string),
            job_code_origin: opaque("pipeline_code_origin"),
            remote_job_origin: opaque("external_pipeline_origin"),
            body: v.clone(),
        })
    }

    /// The code location of a run launched from a code location (`dagster/code-location` label).
    pub fn location_name(&self) -> Option<&str> {
        self.remote_job_origin
            .as_ref()?
            .pointer("/external_repository_origin/repository_location_origin/location_name")?
            .as_str()
    }
}

/// Why a run or its plan could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("run {run_id} not found in the run storage")]
    RunNotFound { run_id: String },
    #[error("run {run_id} has no execution plan snapshot")]
    NoSnapshot { run_id: String },
    #[error("execution plan snapshot {snapshot_id} of run {run_id} not found")]
    SnapshotNotFound { run_id: String, snapshot_id: String },
    #[error("cannot read run {run_id}: {source}")]
    Unreadable {
        run_id: String,
        #[source]
        source: SerdesError,
    },
    #[error("cannot read the execution plan snapshot {snapshot_id} of run {run_id}: {source}")]
    UnreadableSnapshot {
        run_id: String,
        snapshot_id: String,
        #[source]
        source: SerdesError,
    },
    #[error("Dagster run storage query failed ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Reads `runs.run_body` of `run_id`.
pub async fn load_run(client: &Client, run_id: &str) -> Result<RunRecord, LoadError> {
    let row = client
        .query_opt("SELECT run_body FROM runs WHERE run_id = $1", &[&run_id])
        .await
        .map_err(|source| LoadError::Query {
            what: "read run",
            source,
        })?
        .ok_or_else(|| LoadError::RunNotFound {
            run_id: run_id.to_string(),
        })?;
    let body: String = row.try_get(0).map_err(|source| LoadError::Query {
        what: "read run body",
        source,
    })?;
    let unreadable = |source| LoadError::Unreadable {
        run_id: run_id.to_string(),
        source,
    };
    RunRecord::decode(&serdes::parse(body.as_bytes()).map_err(unreadable)?).map_err(unreadable)
}

/// Reads and decodes the run's execution plan snapshot.
pub async fn load_plan(client: &Client, run: &RunRecord) -> Result<PlanSnapshot, LoadError> {
    let snapshot_id =
        run.execution_plan_snapshot_id
            .clone()
            .ok_or_else(|| LoadError::NoSnapshot {
                run_id: run.run_id.clone(),
            })?;
    let row = client
        .query_opt(
            "SELECT snapshot_body FROM snapshots WHERE snapshot_id = $1",
            &[&snapshot_id],
        )
        .await
        .map_err(|source| LoadError::Query {
            what: "read execution plan snapshot",
            source,
        })?
        .ok_or_else(|| LoadError::SnapshotNotFound {
            run_id: run.run_id.clone(),
            snapshot_id: snapshot_id.clone(),
        })?;
    let body: Vec<u8> = row.try_get(0).map_err(|source| LoadError::Query {
        what: "read snapshot body",
        source,
    })?;
    PlanSnapshot::from_stored(&body).map_err(|source| LoadError::UnreadableSnapshot {
        run_id: run.run_id.clone(),
        snapshot_id,
        source,
    })
}
