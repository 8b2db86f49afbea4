//! The settlement rules of a request, checked against an in-memory broker, acker and result backend
//! that write what they are asked to do into one journal, in order: late ack only after the result is
//! stored, early ack before the task runs, a message handed back when no result can be stored or the
//! worker shuts down, revoked and bad input settled so they cannot loop.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use celeriac_wire::backend::{BackendError, ReplyTarget, ResultBackend};
use celeriac_wire::broker::{
    Acker, Broker, BrokerError, Consumer, Delivery, ExchangeSpec, OutgoingMessage, QueueSpec,
};
use celeriac_wire::message::{DeliveryInfo, Properties, RawMessage, TaskRequest};
use celeriac_wire::result::{ExceptionInfo, ResultMeta};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::handle_inner;
use crate::config::{AckPolicy, QueueConfig, Settings};
use crate::runtime::shared::Shared;
use crate::tasks::{Registry, Task, TaskContext, TaskOutcome};

const TASK: &str = "test.step";
const QUEUE: &str = "dagster";

/// What the fakes were asked to do, in order.
#[derive(Default)]
struct Journal(Mutex<Vec<String>>);

impl Journal {
    fn note(&self, entry: impl Into<String>) {
        self.0.lock().expect("journal").push(entry.into());
    }
    fn entries(&self) -> Vec<String> {
        self.0.lock().expect("journal").clone()
    }
}

/// Publishes into the journal (task events are dropped: they are not settlement).
struct MemoryBroker(Arc<Journal>);

#[async_trait]
impl Broker for MemoryBroker {
    async fn consume(&self, _: &QueueSpec, _: u16) -> Result<Box<dyn Consumer>, BrokerError> {
        Err(BrokerError::Refused {
            operation: "consume".into(),
            reason: "the tests hand deliveries in directly".into(),
        })
    }
    async fn publish(
        &self,
        _exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        let redelivered = message.headers.get("redelivered") == Some(&json!(true));
        self.0
            .note(format!("publish {routing_key} redelivered={redelivered}"));
        Ok(())
    }
    async fn broadcast(
        &self,
        _: &ExchangeSpec,
        _: &str,
        _: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        Ok(())
    }
    fn transport(&self) -> &'static str {
        "memory"
    }
}

struct MemoryAcker(Arc<Journal>);

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.0.note("ack");
        Ok(())
    }
    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        self.0.note(format!("reject requeue={requeue}"));
        Ok(())
    }
}

/// Stores into the journal after failing `failures` times.
struct MemoryBackend {
    journal: Arc<Journal>,
    failures: AtomicU32,
}

#[async_trait]
impl ResultBackend for MemoryBackend {
    async fn store(&self, _: &ReplyTarget, meta: &ResultMeta) -> Result<(), BackendError> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            self.journal.note("store failed");
            return Err(BackendError::Unavailable("down for the test".into()));
        }
        self.journal.note(format!("store {}", meta.state.as_str()));
        Ok(())
    }
    fn scheme(&self) -> &'static str {
        "memory"
    }
}

#[derive(Clone, Copy)]
enum Behaviour {
    Succeed,
    Fail,
    /// Runs until terminated (revoke with terminate, or a shutdown past its grace).
    RunUntilTerminated,
}

struct StepTask {
    journal: Arc<Journal>,
    behaviour: Behaviour,
}

#[async_trait]
impl Task for StepTask {
    fn name(&self) -> &'static str {
        TASK
    }
    async fn run(&self, ctx: TaskContext, _request: &mut TaskRequest) -> TaskOutcome {
        self.journal.note("run");
        match self.behaviour {
            Behaviour::Succeed => TaskOutcome::Success(json!([])),
            Behaviour::Fail => TaskOutcome::Failure {
                exc: ExceptionInfo::new("Exception", "builtins", "boom"),
                traceback: None,
            },
            Behaviour::RunUntilTerminated => {
                ctx.terminate.cancelled().await;
                TaskOutcome::Terminated
            }
        }
    }
}

struct Fixture {
    shared: Arc<Shared>,
    queue: QueueConfig,
    journal: Arc<Journal>,
}

fn fixture(ack: AckPolicy, behaviour: Behaviour, store_failures: u32) -> Fixture {
    let journal = Arc::new(Journal::default());
    let queue = QueueConfig {
        name: QUEUE.into(),
        concurrency: 1,
        ack,
    };
    let mut config = Settings::default().resolve().expect("default settings");
    config.queues = vec![queue.clone()];
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker(journal.clone()));
    let mut registry = Registry::default();
    registry.register(Arc::new(StepTask {
        journal: journal.clone(),
        behaviour,
    }));
    let backend = Arc::new(MemoryBackend {
        journal: journal.clone(),
        failures: AtomicU32::new(store_failures),
    });
    let (shared, _) = Shared::start(config, registry, broker, backend, CancellationToken::new());
    let shared = Arc::new(shared);
    Fixture {
        shared,
        queue,
        journal,
    }
}

/// A protocol-2 task message as Celery (and Dagster) publish it.
fn message(task: &str, id: &str) -> RawMessage {
    let headers = json!({"lang": "py", "task": task, "id": id, "root_id": id, "parent_id": null,
                         "retries": 0, "eta": null, "expires": null, "argsrepr": "()", "kwargsrepr": "{}"});
    RawMessage {
        body: br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
            .to_vec(),
        content_type: "application/json".into(),
        content_encoding: "utf-8".into(),
        headers: headers.as_object().cloned().unwrap_or_default(),
        properties: Properties {
            correlation_id: Some(id.into()),
            reply_to: Some("reply-queue".into()),
            priority: Some(5),
            delivery_mode: Some(2),
            ..Default::default()
        },
        delivery_info: DeliveryInfo {
            routing_key: QUEUE.into(),
            queue: QUEUE.into(),
            ..Default::default()
        },
    }
}

impl Fixture {
    fn delivery(&self, message: RawMessage) -> Delivery {
        Delivery {
            message,
            acker: Box::new(MemoryAcker(self.journal.clone())),
        }
    }

    async fn handle(&self, message: RawMessage) -> Vec<String> {
        handle_inner(&self.shared, &self.queue, self.delivery(message)).await;
        self.journal.entries()
    }

    /// Handles `message` in the background and waits until its task is running.
    async fn start(&self, message: RawMessage) -> tokio::task::JoinHandle<()> {
        let (shared, queue, delivery) = (
            self.shared.clone(),
            self.queue.clone(),
            self.delivery(message),
        );
        let handle = tokio::spawn(async move { handle_inner(&shared, &queue, delivery).await });
        for _ in 0..500 {
            if self.journal.entries().iter().any(|e| e == "run") {
                return handle;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the task never started: {:?}", self.journal.entries());
    }
}

#[tokio::test]
async fn late_ack_settles_only_after_the_result_is_stored() {
    let f = fixture(AckPolicy::Late, Behaviour::Succeed, 0);
    assert_eq!(
        f.handle(message(TASK, "t1")).await,
        ["run", "store SUCCESS", "ack"]
    );
    let f = fixture(AckPolicy::Late, Behaviour::Fail, 0);
    assert_eq!(
        f.handle(message(TASK, "t2")).await,
        ["run", "store FAILURE", "ack"]
    );
    assert!(
        f.shared.state.active().is_empty(),
        "finished requests leave the active list"
    );
}

#[tokio::test]
async fn early_ack_settles_before_the_task_runs() {
    let f = fixture(AckPolicy::Early, Behaviour::Succeed, 0);
    assert_eq!(
        f.handle(message(TASK, "t1")).await,
        ["ack", "run", "store SUCCESS"]
    );
}

/// A result that cannot be stored must not be acknowledged away: the publisher would wait forever.
#[tokio::test]
async fn late_ack_hands_the_message_back_when_no_result_can_be_stored() {
    let f = fixture(AckPolicy::Late, Behaviour::Succeed, u32::MAX);
    let journal = f.handle(message(TASK, "t1")).await;
    assert_eq!(journal.first().map(String::as_str), Some("run"));
    assert_eq!(
        journal.last().map(String::as_str),
        Some("reject requeue=true")
    );
    assert!(!journal.iter().any(|e| e == "ack"), "{journal:?}");
    assert_eq!(journal.iter().filter(|e| *e == "store failed").count(), 8);

    // A store that succeeds on a later attempt is acknowledged as usual.
    let f = fixture(AckPolicy::Late, Behaviour::Succeed, 2);
    assert_eq!(
        f.handle(message(TASK, "t2")).await,
        [
            "run",
            "store failed",
            "store failed",
            "store SUCCESS",
            "ack"
        ]
    );
}

#[tokio::test]
async fn a_revoked_task_is_discarded_with_a_revoked_result_and_never_runs() {
    let f = fixture(AckPolicy::Late, Behaviour::Succeed, 0);
    f.shared.state.revoke("t1");
    assert_eq!(
        f.handle(message(TASK, "t1")).await,
        ["store REVOKED", "ack"]
    );
}

#[tokio::test]
async fn terminate_stores_revoked_then_settles() {
    let f = fixture(AckPolicy::Late, Behaviour::RunUntilTerminated, 0);
    let running = f.start(message(TASK, "t1")).await;
    assert!(f.shared.state.terminate("t1"));
    running.await.expect("handler");
    assert_eq!(f.journal.entries(), ["run", "store REVOKED", "ack"]);
}

/// Past the shutdown grace a running step goes back to the broker, with no result: another worker
/// runs it (late ack: the unacknowledged message is requeued).
#[tokio::test]
async fn shutdown_past_grace_requeues_a_late_ack_message() {
    let f = fixture(AckPolicy::Late, Behaviour::RunUntilTerminated, 0);
    let running = f.start(message(TASK, "t1")).await;
    f.shared.force_stop.cancel();
    running.await.expect("handler");
    assert_eq!(f.journal.entries(), ["run", "reject requeue=true"]);
}

/// Early ack: the broker no longer holds the message, so the worker publishes it again, marked
/// redelivered.
#[tokio::test]
async fn shutdown_past_grace_republishes_an_early_ack_message() {
    let f = fixture(AckPolicy::Early, Behaviour::RunUntilTerminated, 0);
    let running = f.start(message(TASK, "t1")).await;
    f.shared.force_stop.cancel();
    running.await.expect("handler");
    assert_eq!(
        f.journal.entries(),
        ["ack", "run", "publish dagster redelivered=true"]
    );
}

/// Bad input is settled without a requeue, so a redelivery loop cannot start: an unknown task name
/// fails (FAILURE stored) and is rejected, an undecodable body is acknowledged.
#[tokio::test]
async fn bad_input_is_settled_so_it_cannot_loop() {
    let f = fixture(AckPolicy::Late, Behaviour::Succeed, 0);
    assert_eq!(
        f.handle(message("no.such.task", "t1")).await,
        ["store FAILURE", "reject requeue=false"]
    );
    let f = fixture(AckPolicy::Late, Behaviour::Succeed, 0);
    let mut garbage = message(TASK, "t2");
    garbage.body = b"\xff not json".to_vec();
    let journal = f.handle(garbage).await;
    assert!(!journal.iter().any(|e| e == "run"), "{journal:?}");
    assert_eq!(
        journal.last().map(String::as_str),
        Some("ack"),
        "{journal:?}"
    );
}

/// A shutdown while a message waits for its ETA hands it back untouched.
#[tokio::test]
async fn a_message_waiting_for_its_eta_is_handed_back_on_shutdown() {
    let f = fixture(AckPolicy::Late, Behaviour::Succeed, 0);
    let mut later = message(TASK, "t1");
    let eta = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    later.headers.insert("eta".into(), json!(eta));
    let shared = f.shared.clone();
    let waiting = tokio::spawn({
        let (queue, delivery) = (f.queue.clone(), f.delivery(later));
        async move { handle_inner(&shared, &queue, delivery).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.shared.stop_consuming.cancel();
    waiting.await.expect("handler");
    assert_eq!(f.journal.entries(), ["reject requeue=true"]);
}
