//! What celeriac declares on RabbitMQ before it consumes, exactly as Celery declares it: task queues
//! (exchange `<q>` direct durable, queue `<q>` durable with `x-max-priority`, binding rk `<q>`) and the
//! transient queues of broadcast subscriptions (events, remote control, replies).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Channel;

use super::classify;
use super::fields::{int_value, short};
use crate::broker::{BrokerError, ExchangeKind, QueueSpec, Subscription};

/// What to declare before consuming.
pub(super) enum Setup {
    TaskQueue(QueueSpec),
    Subscription(Subscription),
}

/// Exchange `<q>` direct durable, queue `<q>` durable (+ `x-max-priority` as `I`), binding rk `<q>`.
pub(super) async fn declare_task_queue(
    ch: &Channel,
    name: ShortString,
    spec: QueueSpec,
) -> Result<(), BrokerError> {
    if spec.with_exchange {
        ch.exchange_declare(
            name.clone(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| classify(&format!("exchange.declare {}", spec.name), &e))?;
    }
    let mut args = FieldTable::default();
    if let Some(max) = spec.max_priority {
        args.insert(
            ShortString::from("x-max-priority"),
            AMQPValue::LongInt(i32::from(max)),
        );
    }
    if let Some(ms) = spec.expires_ms {
        args.insert(
            ShortString::from("x-expires"),
            AMQPValue::LongInt(i32::try_from(ms).unwrap_or(i32::MAX)),
        );
    }
    ch.queue_declare(
        name.clone(),
        QueueDeclareOptions {
            durable: true,
            exclusive: false,
            auto_delete: false,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(|e| classify(&format!("queue.declare {}", spec.name), &e))?;
    if spec.with_exchange {
        ch.queue_bind(
            name.clone(),
            name.clone(),
            name,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| classify(&format!("queue.bind {}", spec.name), &e))?;
    }
    Ok(())
}

/// Broadcast subscription queues as kombu declares them (pidbox, gossip): transient, auto-delete.
pub(super) async fn declare_subscription(
    ch: &Channel,
    name: ShortString,
    sub: Subscription,
) -> Result<(), BrokerError> {
    let exchange = short("exchange", &sub.exchange.name)?;
    ch.exchange_declare(
        exchange.clone(),
        lapin_kind(sub.exchange.kind),
        ExchangeDeclareOptions {
            durable: sub.exchange.durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify(&format!("exchange.declare {}", sub.exchange.name), &e))?;
    let mut args = FieldTable::default();
    if let Some(ms) = sub.expires_ms {
        args.insert(ShortString::from("x-expires"), int_value(i64::from(ms)));
    }
    if let Some(ms) = sub.message_ttl_ms {
        args.insert(ShortString::from("x-message-ttl"), int_value(i64::from(ms)));
    }
    ch.queue_declare(
        name.clone(),
        QueueDeclareOptions {
            durable: false,
            exclusive: sub.exclusive,
            auto_delete: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map_err(|e| classify(&format!("queue.declare {}", sub.queue), &e))?;
    ch.queue_bind(
        name,
        exchange,
        short("binding key", &sub.binding_key)?,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| classify(&format!("queue.bind {}", sub.queue), &e))?;
    Ok(())
}

pub(super) fn lapin_kind(kind: ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
    }
}

/// Per-consumer delivery-acknowledgement timeout for task consumers: 25 hours, above Dagster's default
/// `job_wait_timeout` (24 h). RabbitMQ's server default (30 min) would close the channel under a step that
/// runs longer while its message is held for late ack. RabbitMQ 3.12+ honours `x-consumer-timeout` per
/// consumer; older servers ignore the argument (their `consumer_timeout` must then be raised in
/// rabbitmq.conf, as for Python Celery with `acks_late`).
pub const CONSUMER_TIMEOUT_MS: i64 = 25 * 3600 * 1000;

pub(super) fn consumer_arguments(no_ack: bool) -> FieldTable {
    let mut args = FieldTable::default();
    if !no_ack {
        args.insert(
            ShortString::from("x-consumer-timeout"),
            lapin::types::AMQPValue::LongLongInt(CONSUMER_TIMEOUT_MS),
        );
    }
    args
}
