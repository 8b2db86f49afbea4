//! The one error of the plan and its engine. Its own module so the plan's files name it without
//! reaching back up into `plan/mod.rs`, which only declares and re-exports.

use crate::serdes::SerdesError;

/// Why a plan cannot be built or an event cannot be applied. Python raises (and fails the run) in
/// each of these cases; the coordinator fails the run with the message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Serdes(#[from] SerdesError),
    #[error("invalid execution plan: {0}")]
    Invalid(String),
    #[error("Attempted to mark step {0} as complete that was not known to be in flight")]
    NotInFlight(String),
    #[error("Attempted to mark {0} as up for retry but retries are disabled")]
    RetriesDisabled(String),
    #[error("event {0} has no step key")]
    NoStepKey(String),
    #[error("step {step_key}: tag {tag}={value:?} is not an integer")]
    Priority {
        step_key: String,
        tag: String,
        value: String,
    },
}
