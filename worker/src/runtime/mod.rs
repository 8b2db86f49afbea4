//! The worker runtime: consumers per queue, request handlers, warm shutdown.
//!
//! Layout follows Celery's own split: [`consumer`] (fetch under a concurrency limit), [`request`]
//! (one delivery from decode to ack), `control` (remote control), [`state`] (what runs now), `shared`
//! (what they all hold). Shutdown is two-phase: stop consuming
//! and let running steps finish within `shutdown_grace`; past it, terminate them and hand their
//! messages back to the broker so no task is lost.

mod consumer;
mod control;
mod memory;
pub mod queues;
mod request;
mod shared;
pub mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use celeriac_wire::backend::ResultBackend;
use celeriac_wire::broker::Broker;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use crate::tasks::Registry;
use shared::Shared;
use state::WorkerState;

/// Exports `celery_queue_length` (ready messages; Redis: all priority lists) every 10 s.
async fn poll_queue_lengths(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        for q in shared.queues.all() {
            match shared.broker.queue_length(&q.config.name).await {
                Ok(n) => {
                    let running = q.in_flight();
                    shared.metrics.queue_length(&q.config.name, n, running)
                }
                Err(e) => tracing::debug!(queue = %q.config.name, "queue length unavailable: {e}"),
            }
        }
    }
}

/// A running worker.
pub struct Worker {
    shared: Arc<Shared>,
    /// Stops the remote-control mailbox and, last of all, the event publisher (`worker-offline`).
    events_stop: CancellationToken,
    events_task: tokio::task::JoinHandle<()>,
    control_task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Starts one consumer per configured queue.
    pub fn start(
        config: WorkerConfig,
        registry: Registry,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
    ) -> Worker {
        let events_stop = CancellationToken::new();
        let (shared, events_task) =
            Shared::start(config, registry, broker, backend, events_stop.clone());
        let shared = Arc::new(shared);
        let control_task = tokio::spawn(control::run(shared.clone(), events_stop.clone()));
        tokio::spawn(poll_queue_lengths(shared.clone(), events_stop.clone()));
        tokio::spawn(memory::hand_back(shared.clone(), events_stop.clone()));
        for queue in shared.config.queues.clone() {
            consumer::start(&shared, queue);
        }
        info!(
            hostname = %shared.config.hostname,
            transport = shared.broker.transport(),
            backend = shared.backend.scheme(),
            queues = %shared.config.queues.iter().map(|q| format!("{}(concurrency={}, ack={:?})", q.name, q.concurrency, q.ack)).collect::<Vec<_>>().join(", "),
            tasks = %shared.registry.names().join(", "),
            "celeriac worker ready"
        );
        Worker {
            shared,
            events_stop,
            events_task,
            control_task,
        }
    }

    /// The worker's live state (running requests, counters).
    pub fn state(&self) -> Arc<WorkerState> {
        self.shared.state.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Runs until `shutdown` resolves, then shuts down warmly (see the module docs).
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => {}
            _ = self.shared.shutdown_requested.cancelled() => info!("shutdown requested by remote control"),
        }
        self.shutdown().await;
    }

    /// Warm shutdown: stop consuming, wait up to the grace period, then hand running steps back.
    pub async fn shutdown(self) {
        let grace = self.shared.config.shutdown_grace;
        let running = self.shared.state.active_count();
        info!(
            running,
            ?grace,
            "warm shutdown: no new tasks; waiting for running tasks"
        );
        self.shared.stop_consuming.cancel();
        self.shared.metrics.set_up(false);
        self.shared.tracker.close();
        if tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_err()
        {
            let left = self.shared.state.active_count();
            warn!(left, "grace period over: terminating running tasks and returning their messages to the broker");
            self.shared.force_stop.cancel();
            if tokio::time::timeout(Duration::from_secs(60), self.shared.tracker.wait())
                .await
                .is_err()
            {
                warn!("tasks did not stop within 60 s of termination; exiting anyway (their messages stay unacknowledged)");
            }
        }
        // Subscriptions close last: running steps needed them to settle their messages.
        self.shared.queues.consumers.close();
        if tokio::time::timeout(Duration::from_secs(30), self.shared.queues.consumers.wait())
            .await
            .is_err()
        {
            warn!(
                "consumers did not close within 30 s; exiting (the broker returns their messages)"
            );
        }
        self.events_stop.cancel();
        let _ = self.control_task.await;
        if tokio::time::timeout(Duration::from_secs(10), self.events_task)
            .await
            .is_err()
        {
            warn!("could not send worker-offline within 10 s");
        }
        info!(processed = self.shared.state.processed(), "worker stopped");
    }
}
