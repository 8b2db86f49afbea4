//! What the worker knows about itself right now: running requests, counters, revoked ids.
//!
//! Shared by the request handlers (which update it) and, later, remote control and metrics (which read it).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
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
    revoked: Mutex<Revoked>,
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

/// Revoked ids Celery keeps at most (`celery.worker.state.REVOKES_MAX`); the oldest go first. Revokes
/// come from any client on the broker: an unbounded set is a memory leak a flood can drive.
pub const REVOKES_MAX: usize = 50_000;

/// The revoked ids, bounded like Celery's `LimitedSet(maxlen=REVOKES_MAX)`.
#[derive(Debug, Default)]
struct Revoked {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Revoked {
    fn insert(&mut self, id: &str) {
        if self.set.contains(id) {
            return;
        }
        if self.order.len() >= REVOKES_MAX {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
    }
}

impl WorkerState {
    // Never hold two of the locks at once: `start` and `finish` run concurrently on different
    // threads, and nested locks taken in different orders deadlocked the whole worker (both runtime
    // threads parked on each other's mutex: found by the coordinator load test).

    pub fn start(&self, req: ActiveRequest) {
        {
            let mut in_flight = lock(&self.in_flight);
            let entry = in_flight.entry(req.queue.clone()).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(entry.0);
        }
        lock(&self.active).insert(req.id.clone(), req);
    }

    pub fn finish(&self, id: &str) {
        let removed = lock(&self.active).remove(id);
        if let Some(req) = removed {
            if let Some(entry) = lock(&self.in_flight).get_mut(&req.queue) {
                entry.0 = entry.0.saturating_sub(1);
            }
            *lock(&self.totals).entry(req.task).or_default() += 1;
            self.processed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many requests run now.
    pub fn active_count(&self) -> usize {
        lock(&self.active).len()
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
        let mut ids: Vec<String> = lock(&self.revoked).set.iter().cloned().collect();
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
        lock(&self.revoked).insert(id);
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        lock(&self.revoked).set.contains(id)
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

#[cfg(test)]
mod revoked_tests {
    use super::*;

    /// Regression (issue 14): revokes from the broker grew the set without bound.
    #[test]
    fn revoked_ids_are_bounded_oldest_first() {
        let s = WorkerState::default();
        for i in 0..REVOKES_MAX + 10 {
            s.revoke(&format!("id-{i}"));
        }
        s.revoke("id-20"); // already known: not re-added
        assert_eq!(s.revoked_ids().len(), REVOKES_MAX);
        assert!(!s.is_revoked("id-0"));
        assert!(!s.is_revoked("id-9"));
        assert!(s.is_revoked("id-10"));
        assert!(s.is_revoked(&format!("id-{}", REVOKES_MAX + 9)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn request(id: String) -> ActiveRequest {
        ActiveRequest {
            id,
            task: "t".into(),
            name: "t".into(),
            queue: "q".into(),
            started: SystemTime::now(),
            argsrepr: String::new(),
            kwargsrepr: String::new(),
            exchange: String::new(),
            routing_key: "q".into(),
            priority: 0,
            redelivered: false,
            acknowledged: false,
            terminate: CancellationToken::new(),
        }
    }

    /// Requests start and finish on every runtime thread at once; the worker must never deadlock
    /// on its own state (it did: `start` and `finish` took two locks in opposite orders).
    #[test]
    fn concurrent_start_and_finish_never_deadlock() {
        let state = Arc::new(WorkerState::default());
        let (done, finished) = std::sync::mpsc::channel();
        let threads = 4;
        for t in 0..threads {
            let (state, done) = (state.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..50_000 {
                    let id = format!("{t}-{i}");
                    state.start(request(id.clone()));
                    state.finish(&id);
                }
                let _ = done.send(());
            });
        }
        for _ in 0..threads {
            finished
                .recv_timeout(Duration::from_secs(60))
                .expect("a thread is stuck: the state deadlocked");
        }
        assert_eq!(state.processed(), threads * 50_000);
        assert_eq!(
            state.in_flight().get("q"),
            Some(&(0, state.in_flight()["q"].1))
        );
        assert!(state.active().is_empty());
    }
}
