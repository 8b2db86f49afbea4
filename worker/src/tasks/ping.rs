//! `celery.ping`: registered by Dagster's worker app (`celery.contrib.testing.tasks`), returns `"pong"`.
//! Useful as a broker round-trip check that needs no Dagster run.

use async_trait::async_trait;
use celeriac_wire::message::TaskRequest;
use serde_json::Value;

use super::{Task, TaskContext, TaskOutcome};

pub struct Ping;

#[async_trait]
impl Task for Ping {
    fn name(&self) -> &'static str {
        "celery.ping"
    }

    async fn run(&self, _ctx: TaskContext, _request: &mut TaskRequest) -> TaskOutcome {
        TaskOutcome::Success(Value::String("pong".into()))
    }
}
