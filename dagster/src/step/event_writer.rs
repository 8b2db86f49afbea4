//! Writes a step task's Dagster events to the run's event log in the background, in order. A database
//! that is down, reset or silent does not fail the step or hold it up: each event is retried with
//! backoff until it is stored (a retry first looks for the row an unanswered INSERT may have committed,
//! so nothing is stored twice); the task's end waits up to [`EVENT_FLUSH_BUDGET`] for the rest.
//!
//! Memory is the reason for its shape. A step task lives as long as its step, hours perhaps, in
//! thousands of concurrent steps per worker, but writes a handful of events at its start and end. So
//! a writer holds only a queue (empty, no allocation, while the step runs) and spawns its drain task
//! when an event arrives and nobody is draining; the task ends when the queue is empty. No channel
//! and no task per step stay allocated while the step runs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::events::Event;
use crate::instance::Instance;

/// How long the end of a step task waits for its events to reach a database that is not answering.
pub const EVENT_FLUSH_BUDGET: Duration = Duration::from_secs(120);

/// A step task's event writer (see the module docs).
pub(super) struct EventWriter {
    shared: Arc<Shared>,
}

struct Shared {
    instance: Instance,
    run_id: String,
    queue: Mutex<Queue>,
    /// Set once the task ends: retries stop at this instant.
    finish_by: Mutex<Option<Instant>>,
    /// Woken when a drain task ends with the queue empty.
    drained: Notify,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    /// A drain task is running (it alone writes, so events stay in order).
    draining: Option<tokio::task::AbortHandle>,
    lost: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EventWriter {
    pub(super) fn start(instance: Instance, run_id: String) -> EventWriter {
        EventWriter {
            shared: Arc::new(Shared {
                instance,
                run_id,
                queue: Mutex::new(Queue::default()),
                finish_by: Mutex::new(None),
                drained: Notify::new(),
            }),
        }
    }

    /// Queues `event`; a drain task starts unless one is running.
    pub(super) fn send(&self, event: Event) {
        let mut queue = lock(&self.shared.queue);
        queue.events.push_back(event);
        if queue.draining.is_none() {
            let task = tokio::spawn(drain(self.shared.clone()));
            queue.draining = Some(task.abort_handle());
        }
    }

    /// Waits (up to `budget`) until every event is written.
    pub(super) async fn finish(self, budget: Duration) {
        *lock(&self.shared.finish_by) = Some(Instant::now() + budget);
        // Slack for the attempt in flight at the deadline (query + connect timeouts).
        let waited = tokio::time::timeout(budget + Duration::from_secs(25), async {
            loop {
                let drained = self.shared.drained.notified();
                if lock(&self.shared.queue).draining.is_none() {
                    return;
                }
                drained.await;
            }
        })
        .await;
        let mut queue = lock(&self.shared.queue);
        if waited.is_err() {
            if let Some(task) = queue.draining.take() {
                task.abort();
            }
            error!("Dagster events were still unwritten when the step task ended");
        }
        let lost = queue.lost + queue.events.len();
        if lost > 0 {
            error!(run_id = %self.shared.run_id, lost, "Dagster events could not be written to the event log");
        }
    }
}

/// Writes queued events in order until the queue is empty.
async fn drain(shared: Arc<Shared>) {
    loop {
        let event = {
            let mut queue = lock(&shared.queue);
            match queue.events.pop_front() {
                Some(event) => event,
                None => {
                    queue.draining = None;
                    drop(queue);
                    shared.drained.notify_waiters();
                    return;
                }
            }
        };
        if !deliver(&shared.instance, &shared.run_id, &event, &shared.finish_by).await {
            lock(&shared.queue).lost += 1;
        }
    }
}

/// Stores one event, retrying transient failures until it is stored or the writer's deadline passed.
async fn deliver(
    instance: &Instance,
    run_id: &str,
    event: &Event,
    deadline: &Mutex<Option<Instant>>,
) -> bool {
    let mut backoff =
        celeriac_wire::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut maybe_stored = false;
    let mut attempts = 0u32;
    loop {
        match instance.report_checked(run_id, event, maybe_stored).await {
            Ok(_) => {
                if attempts > 0 {
                    info!(
                        run_id,
                        event = event.event_type,
                        attempts = attempts + 1,
                        "Dagster event written once the database answered again"
                    );
                }
                return true;
            }
            Err(e) if !e.is_transient() => {
                warn!(
                    run_id,
                    event = event.event_type,
                    "cannot write a Dagster event: {e}"
                );
                return false;
            }
            Err(e) => {
                if attempts == 0 {
                    warn!(
                        run_id,
                        event = event.event_type,
                        "cannot write a Dagster event ({e}); retrying until the database answers"
                    );
                }
                attempts += 1;
                maybe_stored = true;
                let delay = backoff.next_delay();
                let give_up = lock(deadline).is_some_and(|d| Instant::now() + delay > d);
                if give_up {
                    error!(
                        run_id,
                        event = event.event_type,
                        attempts,
                        "giving up writing a Dagster event: {e}"
                    );
                    return false;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}
