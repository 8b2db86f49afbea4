//! Driving one run: `core_celery_execution_loop` without its one-second tick.
//!
//! The plan engine decides; each decision (a result applied, the run started, a retry due) is written in
//! one transaction — the events Python's run worker would write, the new step tasks, the run's status —
//! and only then are the new tasks published and the result acknowledged. A replica that dies anywhere
//! in between leaves the run in a state the next owner rebuilds exactly ([`resume`]): the applied
//! results replayed through the engine in their original order, in-flight tasks re-attached, unpublished
//! tasks published (with their original ids).
//!
//! One module per kind of decision, all of them methods of the one [`Driver`] defined in [`driver`]
//! (its state and the loop that waits for results, wake-ups and timers):
//! [`open`] reads the run and builds its engine, [`start`] begins a fresh run, [`resume`] takes one
//! over, [`submit`] turns steps into tasks and publishes them, [`apply`] applies arriving results,
//! [`cancel`] honours termination, [`finish`] writes the terminal event.

mod apply;
mod cancel;
mod driver;
mod finish;
mod open;
mod resume;
mod start;
mod submit;

pub use driver::{now, Driver, Ended};
