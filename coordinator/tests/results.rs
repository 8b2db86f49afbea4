//! How step results reach a run's driver, against the real RabbitMQ.

use celeriac_coordinator::results::{reply_queue, Results};
use celeriac_wire::broker::redis::RedisTransportOptions;
use celeriac_wire::broker::OutgoingMessage;
use tokio_util::sync::CancellationToken;

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";

/// A worker publishes a result to the run's reply queue through the default exchange, which drops a
/// message for a queue that does not exist. A fast step can finish before a consumer started in the
/// background declares the queue, so `attach` must have declared it when it returns (found by the load
/// test: 90 of 150 runs waited forever for a root step whose result had been dropped).
#[tokio::test]
async fn rpc_attach_declares_the_reply_queue_before_it_returns() {
    let broker = celeriac_wire::connect::broker(BROKER, RedisTransportOptions::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let results = Results::Rpc {
        broker: broker.clone(),
    };
    let run_id = uuid::Uuid::new_v4().to_string();
    let queue = reply_queue(&run_id);
    // A driver that stops at once: nothing consumes, so the queue keeps what is published to it.
    let stop = CancellationToken::new();
    stop.cancel();
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    results.attach(&run_id, &[], tx, stop).await;

    broker
        .publish("", &queue, OutgoingMessage::json("{}".into()))
        .await
        .expect("publish the reply");
    let depth = broker
        .queue_length(&queue)
        .await
        .expect("the reply queue exists once attach returned");
    assert_eq!(depth, 1, "the reply was kept");
    // The queue expires unused like every reply queue (a day, Celery's `result_expires`).
}
