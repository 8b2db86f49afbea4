//! What the worker knows about itself right now: running requests, counters, revoked ids.
//!
//! Shared by the request handlers (which update it) and, later, remote control and metrics (which read it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

/// A request that is executing.
#[derive(Debug, Clone)]
pub struct ActiveRequest {
    pub id: String,
    /// Registered task name (`headers.task`).
    pub task: String,
    /// Display name (shadow or task).
    pub name: String,
    pub queue: String,
    pub started: SystemTime,
    pub argsrepr: String,
    pub kwargsrepr: String,
    pub exchange: String,
    pub routing_key: String,
    pub priority: u8,
    pub redelivered: bool,
    pub acknowledged: bool,
    /// Cancelled to terminate this task (`revoke(terminate=True)`).
    pub terminate: CancellationToken,
}

/// Live worker state.
#[derive(Debug, Default)]
pub struct WorkerState {
    active: Mutex<HashMap<String, ActiveRequest>>,
    revoked: Mutex<HashSet<String>>,
    /// Per queue: (running now, highest ever seen).
    in_flight: Mutex<BTreeMap<String, (usize, usize)>>,
    processed: AtomicU64,
    /// Tasks finished per task name (`stats.total`).
    totals: Mutex<BTreeMap<String, u64>>,
    /// Queues with a live broker subscription.
    consuming: Mutex<HashSet<String>>,
    /// Queues the worker is configured (or was told by remote control) to consume.
    expected: Mutex<HashSet<String>>,
}

impl WorkerState {
    pub fn start(&self, req: ActiveRequest) {
        let mut in_flight = lock(&self.in_flight);
        let entry = in_flight.entry(req.queue.clone()).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(entry.0);
        lock(&self.active).insert(req.id.clone(), req);
    }

    pub fn finish(&self, id: &str) {
        if let Some(req) = lock(&self.active).remove(id) {
            if let Some(entry) = lock(&self.in_flight).get_mut(&req.queue) {
                entry.0 = entry.0.saturating_sub(1);
            }
            *lock(&self.totals).entry(req.task).or_default() += 1;
            self.processed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn active(&self) -> Vec<ActiveRequest> {
        lock(&self.active).values().cloned().collect()
    }

    /// Running requests per queue and the peak since start.
    pub fn in_flight(&self) -> BTreeMap<String, (usize, usize)> {
        lock(&self.in_flight).clone()
    }

    pub fn totals(&self) -> BTreeMap<String, u64> {
        lock(&self.totals).clone()
    }

    pub fn revoked_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.revoked).iter().cloned().collect();
        ids.sort();
        ids
    }

    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// Records whether `queue` currently has a live subscription.
    pub fn set_consuming(&self, queue: &str, on: bool) {
        let mut c = lock(&self.consuming);
        if on {
            c.insert(queue.to_string());
        } else {
            c.remove(queue);
        }
    }

    pub fn consuming_queues(&self) -> usize {
        lock(&self.consuming).len()
    }

    pub fn set_expected(&self, queue: &str, on: bool) {
        let mut e = lock(&self.expected);
        if on {
            e.insert(queue.to_string());
        } else {
            e.remove(queue);
        }
    }

    /// Ready = every expected queue has a live subscription.
    pub fn is_ready(&self) -> bool {
        let expected = lock(&self.expected).clone();
        let consuming = lock(&self.consuming);
        !expected.is_empty() && expected.iter().all(|q| consuming.contains(q))
    }

    pub fn revoke(&self, id: &str) {
        lock(&self.revoked).insert(id.to_string());
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        lock(&self.revoked).contains(id)
    }

    /// Cancels a running request; false if it is not running here.
    pub fn terminate(&self, id: &str) -> bool {
        match lock(&self.active).get(id) {
            Some(req) => {
                req.terminate.cancel();
                true
            }
            None => false,
        }
    }
}

/// Locks a mutex, recovering the data if a panicking holder poisoned it (the state stays usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
