//! The [`Task`] trait and the [`Registry`] the consumer dispatches on (`headers.task`).
//!
//! A task is async code that turns a [`TaskRequest`] into a [`TaskOutcome`]; it never touches the broker
//! or the result backend: the request handler (`crate::runtime::request`) owns acks, results and events,
//! so every task gets the same delivery guarantees. The worker ships `celery.ping` ([`ping`]); the tasks
//! it serves are registered by whoever starts it (the `celeriac` binary registers Dagster's
//! `execute_step_k8s_job` from the `celeriac-dagster` crate).

pub mod ping;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use celeriac_wire::message::TaskRequest;
use celeriac_wire::result::ExceptionInfo;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// What running a task produced.
#[derive(Debug, Clone)]
pub enum TaskOutcome {
    /// Stored as `SUCCESS` with this return value.
    Success(Value),
    /// Stored as `FAILURE`.
    Failure {
        exc: ExceptionInfo,
        traceback: Option<String>,
    },
    /// The task was revoked with `terminate` (or the worker is shutting down past its grace period)
    /// and stopped before finishing: stored as `REVOKED`.
    Terminated,
}

/// Per-execution context handed to a task.
#[derive(Clone)]
pub struct TaskContext {
    /// Worker node name (`celeriac-xxxx@host`), as Celery's `self.request.hostname`.
    pub hostname: String,
    /// Cancelled when the task is revoked with `terminate=True`. Tasks stop their work and clean up
    /// (Dagster's step task deletes its Job / kills its process) and return [`TaskOutcome::Terminated`].
    pub terminate: CancellationToken,
}

/// A task the worker can run.
#[async_trait]
pub trait Task: Send + Sync {
    /// The registered name (`execute_step_k8s_job`, `celery.ping`).
    fn name(&self) -> &'static str;
    /// Runs the task. The request is the task's to take from: a task that has read its arguments
    /// may move them out (`std::mem::take(&mut request.kwargs)`) so they are not held while it runs;
    /// the worker only uses the request's identity and routing fields afterwards.
    async fn run(&self, ctx: TaskContext, request: &mut TaskRequest) -> TaskOutcome;
}

/// Registered tasks by name.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<&'static str, Arc<dyn Task>>,
}

impl Registry {
    pub fn register(&mut self, task: Arc<dyn Task>) {
        self.tasks.insert(task.name(), task);
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Task>> {
        self.tasks.get(name).cloned()
    }

    /// Names, sorted, as `inspect registered` lists them.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.keys().copied().collect()
    }
}
