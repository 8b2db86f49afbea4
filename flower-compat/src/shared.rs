//! What the HTTP handlers and the background loops share, and how they take its locks.
//!
//! In a module of its own (not in `lib.rs`) so that every module that needs it imports it from here and
//! no import runs back up to the crate root. The locks are `std` locks held for short, synchronous
//! spells (never across an `.await`); a poisoned lock is taken over as it is, because one panicked
//! handler must not take the API down with it: the state is only ever a merge of events.

use std::sync::{Arc, LockResult, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use celeriac_wire::broker::Broker;

use crate::config::FlowerArgs;
use crate::eventlog::EventLog;
use crate::inspector::Inspector;
use crate::metrics::FlowerMetrics;
use crate::results::ResultReader;
use crate::samples::QueueSamples;
use crate::state::EventsState;

/// Everything the HTTP handlers and background loops share.
pub struct Shared {
    pub config: FlowerArgs,
    pub state: RwLock<EventsState>,
    pub metrics: FlowerMetrics,
    pub broker: Arc<dyn Broker>,
    pub inspector: Inspector,
    pub results: ResultReader,
    pub history_description: Option<String>,
    /// Queue measurements for the charts.
    pub samples: RwLock<QueueSamples>,
    /// The Dagster event log, when `--dagster-db` is given.
    pub event_log: Option<EventLog>,
}

impl Shared {
    /// The workers and tasks, for reading.
    pub fn read_state(&self) -> RwLockReadGuard<'_, EventsState> {
        unpoisoned(self.state.read())
    }

    /// The workers and tasks, for merging events, eviction and the history write-behind.
    pub fn write_state(&self) -> RwLockWriteGuard<'_, EventsState> {
        unpoisoned(self.state.write())
    }

    /// The queue samples, for the charts.
    pub fn read_samples(&self) -> RwLockReadGuard<'_, QueueSamples> {
        unpoisoned(self.samples.read())
    }

    /// The queue samples, for the sampling loop.
    pub fn write_samples(&self) -> RwLockWriteGuard<'_, QueueSamples> {
        unpoisoned(self.samples.write())
    }
}

/// The guard of a lock, poisoned or not.
fn unpoisoned<G>(r: LockResult<G>) -> G {
    r.unwrap_or_else(PoisonError::into_inner)
}
