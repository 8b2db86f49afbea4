//! What the consumers, request handlers and remote control share: configuration, broker and backend,
//! the task registry, live state, metrics, and the tokens of the two-phase shutdown. Apart from the
//! runtime's entry point so that the modules using it never import the module that starts them.

use std::sync::Arc;

use celeriac_wire::backend::ResultBackend;
use celeriac_wire::broker::Broker;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::queues::QueueSet;
use super::state::WorkerState;
use crate::config::WorkerConfig;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::tasks::Registry;

/// Everything the consumers and handlers share.
pub(crate) struct Shared {
    pub config: WorkerConfig,
    pub broker: Arc<dyn Broker>,
    pub backend: Arc<dyn ResultBackend>,
    pub registry: Registry,
    pub state: Arc<WorkerState>,
    pub metrics: Arc<Metrics>,
    /// Fired when the worker starts shutting down: no new messages are taken.
    pub stop_consuming: CancellationToken,
    /// Fired when the grace period is over: running tasks are terminated and handed back.
    pub force_stop: CancellationToken,
    pub tracker: TaskTracker,
    pub queues: QueueSet,
    /// Fired by remote control `shutdown`: the worker shuts down warmly, as on SIGTERM.
    pub shutdown_requested: CancellationToken,
    pub events: Arc<Events>,
    pub started: std::time::Instant,
}

impl Shared {
    /// Stops consuming `queue`; false if it was not consumed.
    pub fn cancel_queue(&self, queue: &str) -> bool {
        self.state.set_expected(queue, false);
        self.queues.remove(queue).is_some()
    }

    /// Everything a worker shares, with its event publisher started (it runs until `events_stop`).
    pub fn start(
        config: WorkerConfig,
        registry: Registry,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        events_stop: CancellationToken,
    ) -> (Shared, tokio::task::JoinHandle<()>) {
        let state = Arc::new(WorkerState::default());
        let (events, events_task) = Events::start(
            broker.clone(),
            &config.hostname,
            config.task_events,
            state.clone(),
            events_stop,
        );
        let shared = Shared {
            metrics: Arc::new(Metrics::new(&config.hostname)),
            config,
            broker,
            backend,
            registry,
            state,
            stop_consuming: CancellationToken::new(),
            force_stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            queues: QueueSet::default(),
            shutdown_requested: CancellationToken::new(),
            events,
            started: std::time::Instant::now(),
        };
        (shared, events_task)
    }
}
