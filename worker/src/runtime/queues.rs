//! The set of consumed queues, changeable at run time by remote control (`add_consumer`,
//! `cancel_consumer`, `pool_grow`, `pool_shrink`, `autoscale`).
//!
//! Each queue owns a slot semaphore whose size is the queue's concurrency limit; growing adds permits,
//! shrinking takes permits away as running steps give them back (a running step is never interrupted).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::QueueConfig;

/// One consumed queue.
pub struct QueueHandle {
    pub config: QueueConfig,
    pub slots: Arc<Semaphore>,
    /// Current limit (the configured concurrency after grow/shrink).
    pub limit: AtomicUsize,
    /// Cancelled by `cancel_consumer` (a child of the worker's stop token).
    pub stop: CancellationToken,
    /// Deliveries being handled now. Not `limit - free permits`: the consumer takes a permit
    /// *before* it waits for the next message, so an idle consumer holds one and permit arithmetic
    /// reports a step in flight that does not exist (every idle replica added 1 to the backlog the
    /// autoscalers read, so a fleet could never scale in to its minimum).
    pub handling: AtomicUsize,
}

impl QueueHandle {
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::SeqCst)
    }

    /// Deliveries being handled now (running steps of this queue in this worker).
    pub fn in_flight(&self) -> usize {
        self.handling.load(Ordering::SeqCst)
    }
}

/// The queues this worker consumes.
#[derive(Default)]
pub struct QueueSet {
    queues: Mutex<BTreeMap<String, Arc<QueueHandle>>>,
    pub consumers: TaskTracker,
}

impl QueueSet {
    /// Registers a queue; `None` if it is already consumed.
    pub fn insert(
        &self,
        config: QueueConfig,
        parent: &CancellationToken,
    ) -> Option<Arc<QueueHandle>> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if queues.contains_key(&config.name) {
            return None;
        }
        let handle = Arc::new(QueueHandle {
            slots: Arc::new(Semaphore::new(config.concurrency)),
            limit: AtomicUsize::new(config.concurrency),
            stop: parent.child_token(),
            handling: AtomicUsize::new(0),
            config,
        });
        queues.insert(handle.config.name.clone(), handle.clone());
        Some(handle)
    }

    /// Stops consuming `name`; running steps of it finish normally.
    pub fn remove(&self, name: &str) -> Option<Arc<QueueHandle>> {
        let handle = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        handle.stop.cancel();
        Some(handle)
    }

    pub fn all(&self) -> Vec<Arc<QueueHandle>> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Changes every queue's limit by `delta` (between 1 and [`MAX_QUEUE_CONCURRENCY`]). Returns the new
    /// limits.
    pub fn resize(&self, delta: i64) -> Vec<(String, usize)> {
        self.all()
            .into_iter()
            .map(|q| {
                let new = usize::try_from((q.limit() as i64).saturating_add(delta))
                    .unwrap_or(1)
                    .clamp(1, MAX_QUEUE_CONCURRENCY);
                set_limit(&q, new);
                (q.config.name.clone(), new)
            })
            .collect()
    }

    /// Sets one queue's limit (at least 1); false if the queue is not consumed.
    pub fn resize_one(&self, name: &str, limit: usize) -> bool {
        match self.all().into_iter().find(|q| q.config.name == name) {
            Some(q) => {
                set_limit(&q, limit.max(1));
                true
            }
            None => false,
        }
    }
}

/// Highest per-queue concurrency remote control may set. `pool_grow`/`autoscale` arguments come from any
/// client on the broker; tokio's semaphore panics past `usize::MAX >> 3` permits.
pub const MAX_QUEUE_CONCURRENCY: usize = 10_000;

fn set_limit(q: &QueueHandle, new: usize) {
    let new = new.clamp(1, MAX_QUEUE_CONCURRENCY);
    let old = q.limit.swap(new, Ordering::SeqCst);
    if new > old {
        q.slots.add_permits(new - old);
    } else if new < old {
        let (slots, take) = (
            q.slots.clone(),
            u32::try_from(old - new).unwrap_or(u32::MAX),
        );
        // Take the permits away as running steps release them; running steps are never interrupted.
        tokio::spawn(async move {
            if let Ok(p) = slots.acquire_many_owned(take).await {
                p.forget();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AckPolicy;

    /// Regression (issue 14): `pool_grow` with `n` near `i64::MAX` overflowed the addition and then
    /// panicked in tokio's semaphore (more than `usize::MAX >> 3` permits); `autoscale` likewise.
    #[tokio::test]
    async fn hostile_pool_sizes_are_clamped() {
        let set = QueueSet::default();
        let stop = CancellationToken::new();
        let q = set
            .insert(
                QueueConfig {
                    name: "q".into(),
                    concurrency: 2,
                    ack: AckPolicy::Late,
                },
                &stop,
            )
            .expect("new queue");
        assert_eq!(
            set.resize(i64::MAX),
            vec![("q".into(), MAX_QUEUE_CONCURRENCY)]
        );
        assert_eq!(q.limit(), MAX_QUEUE_CONCURRENCY);
        assert_eq!(q.slots.available_permits(), MAX_QUEUE_CONCURRENCY);
        assert_eq!(set.resize(i64::MIN), vec![("q".into(), 1)]);
        assert!(set.resize_one("q", usize::MAX));
        assert_eq!(q.limit(), MAX_QUEUE_CONCURRENCY);
    }
}
