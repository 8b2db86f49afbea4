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

    /// Changes every queue's limit by `delta` (never below 1). Returns the new limits.
    pub fn resize(&self, delta: i64) -> Vec<(String, usize)> {
        self.all()
            .into_iter()
            .map(|q| {
                let new = (q.limit() as i64 + delta).max(1) as usize;
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

fn set_limit(q: &QueueHandle, new: usize) {
    let old = q.limit.swap(new, Ordering::SeqCst);
    if new > old {
        q.slots.add_permits(new - old);
    } else if new < old {
        let (slots, take) = (q.slots.clone(), (old - new) as u32);
        // Take the permits away as running steps release them; running steps are never interrupted.
        tokio::spawn(async move {
            if let Ok(p) = slots.acquire_many_owned(take).await {
                p.forget();
            }
        });
    }
}
