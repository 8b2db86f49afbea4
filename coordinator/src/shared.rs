//! What every run's driver shares with the service and the HTTP surface: the store, the broker, where
//! results come from, the metrics and the settings.
//!
//! It stands in its own module, importing none of `service`, `run` or `http`, so those three depend on
//! it and not on one another (the service starts drivers and the HTTP server; neither reaches back).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use celeriac_wire::broker::Broker;
use tokio::sync::Mutex;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::plans::PlanCache;
use crate::results::Results;
use crate::store::Store;

/// What every run's driver shares.
pub struct Shared {
    pub store: Store,
    pub broker: Arc<dyn Broker>,
    pub results: Results,
    pub replica: String,
    pub hostname: String,
    pub metrics: Metrics,
    pub settings: Settings,
    /// Task queues already declared on the broker.
    pub declared: Mutex<HashSet<String>>,
    /// Execution plans rebuilt for earlier runs of the same job.
    pub plans: PlanCache,
    /// Runs taken over from another replica: a note for the resume event.
    pub(crate) takeovers: std::sync::Mutex<HashMap<String, String>>,
    pub ready: AtomicBool,
}

impl Shared {
    /// `" from <replica> (lease N s old)"` when the run was taken over, else empty.
    pub fn takeover_note(&self, run_id: &str) -> String {
        self.takeovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(run_id)
            .unwrap_or_default()
    }
}
