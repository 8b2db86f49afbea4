//! `ActiveExecution` (`dagster/_core/execution/plan/active.py`): the state machine that walks a run
//! through its plan. Steps move pending → executable → in flight → success / failed / skipped /
//! abandoned (or unknown: finished without a terminal event), retries wait in `waiting_to_retry`, and
//! dynamic outputs grow the plan as their mapping keys arrive.
//!
//! The port keeps Python's data structures where their order shows (pending and waiting are insertion
//! ordered maps, executable a list), so submission order, skips and known state come out identical.
//! Time is an argument (`now`, seconds since the epoch) instead of `time.time()`, so a trace can be
//! replayed exactly.
//!
//! One file per concern of the machine, so each of Python's methods has one place to be read:
//!
//! * `execution`: the state itself (which set each step is in), its construction and queries;
//! * `schedule`: `_update` and `get_steps_to_execute`, which move steps from pending to executable
//!   and hand them out in sort-key order;
//! * `plan_events`: `plan_events_iterator`, the steps skipped or abandoned without running;
//! * `results`: `handle_event` and the `mark_*` transitions a reported step event causes;
//! * `priority`: the sort keys and the tags they read; `pools`: instance concurrency pools.

mod execution;
mod plan_events;
mod pools;
mod priority;
mod results;
mod schedule;

pub use execution::{ActiveExecution, Snapshot};
pub use plan_events::{Abandoned, PlanEvents, Skipped};
pub use pools::{ConcurrencyClaims, NoPools};
pub use priority::{
    python_int, SortKey, CELERY_STEP_PRIORITY_TAG, GLOBAL_CONCURRENCY_TAG, PRIORITY_TAG,
};
