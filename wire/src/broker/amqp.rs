//! RabbitMQ (AMQP 0-9-1) broker via lapin.
//!
//! Layout on the wire (spec §0, §4.2, §6.1):
//! * one TCP connection per [`AmqpBroker`], heartbeat 60 s unless the URI says otherwise, re-opened
//!   transparently by [`Broker::consume`] / [`Broker::publish`] once it died;
//! * one channel per task consumer, declaring exactly what Celery declares (exchange `<q>` direct durable,
//!   queue `<q>` durable with `x-max-priority` as a signed 32-bit `I`, binding `<q>`←`<q>` rk `<q>`), then
//!   a per-consumer `basic.qos(prefetch, global=false)` and `basic.consume(no_ack=false)`;
//! * one shared publishing channel in publisher-confirm mode: [`Broker::publish`] returns only after
//!   RabbitMQ confirmed the message;
//! * headers are converted JSON ⇄ AMQP field tables with py-amqp's type choices (`I` for ints that fit in
//!   32 bits, 64-bit otherwise, `d` floats, `V` null, `t` bools, `S` strings, `A` lists, `F` dicts).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use serde_json::{Map, Number, Value};
use tokio::sync::Mutex;

use super::{
    Acker, Broker, BrokerError, Consumer, Delivery, ExchangeKind, ExchangeSpec, NoAck,
    OutgoingMessage, QueueSpec, Subscription,
};
use crate::message::{DeliveryInfo, Properties, RawMessage};

/// Heartbeat asked for when the URI does not set one (what py-amqp negotiates with RabbitMQ's default).
const DEFAULT_HEARTBEAT_SECS: u16 = 60;
/// Longest wait for the TCP + AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Consumer::next`] waits for a delivery before returning `Ok(None)`.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A RabbitMQ connection shared by every consumer and publisher of one worker.
pub struct AmqpBroker {
    uri: AMQPUri,
    redacted: String,
    connection_name: String,
    /// CA and client certificate for `amqps://` (empty: the system's roots).
    tls: lapin::tcp::OwnedTLSConfig,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    connection: Option<Arc<Connection>>,
    /// Publishing channel (confirm mode) on `connection`.
    publisher: Option<Channel>,
    /// Exchanges declared on `connection` by [`Broker::broadcast`].
    declared_exchanges: HashSet<String>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &self.redacted)
            .finish_non_exhaustive()
    }
}

impl AmqpBroker {
    /// Connects to `uri` (a normalized `amqp(s)://user:pass@host:port/<vhost>` as produced by
    /// [`crate::url::parse_broker`]). Errors name the redacted URL and the cause.
    pub async fn connect(uri: &str) -> Result<AmqpBroker, BrokerError> {
        Self::connect_named(uri, "celeriac").await
    }

    /// Like [`AmqpBroker::connect`], with the connection name RabbitMQ shows (`connection_name` client
    /// property, e.g. the worker's nodename).
    pub async fn connect_named(
        uri: &str,
        connection_name: &str,
    ) -> Result<AmqpBroker, BrokerError> {
        Self::connect_with_tls(uri, connection_name, &crate::tls::TlsMaterial::default()).await
    }

    /// Like [`AmqpBroker::connect_named`], trusting `tls`'s CA for `amqps://` (and presenting its client
    /// certificate). The server certificate is always verified.
    pub async fn connect_with_tls(
        uri: &str,
        connection_name: &str,
        tls: &crate::tls::TlsMaterial,
    ) -> Result<AmqpBroker, BrokerError> {
        let redacted = crate::url::redact(uri);
        let mut parsed: AMQPUri = uri.parse().map_err(|e: String| BrokerError::Connect {
            url: redacted.clone(),
            reason: format!("invalid AMQP URI: {e}"),
        })?;
        if parsed.query.heartbeat.is_none() {
            parsed.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
        }
        let broker = AmqpBroker {
            uri: parsed,
            redacted,
            connection_name: connection_name.to_string(),
            tls: crate::tls::amqp_config(tls),
            state: Mutex::new(ConnState::default()),
        };
        {
            let mut state = broker.state.lock().await;
            broker.connection(&mut state).await?;
        }
        Ok(broker)
    }

    /// The connection, re-opened if it is gone. Called with the state lock held.
    async fn connection(&self, state: &mut ConnState) -> Result<Arc<Connection>, BrokerError> {
        let replacing = state.connection.is_some();
        if let Some(conn) = &state.connection {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
            // Closed by the broker, reset, or silent for two heartbeat intervals (lapin's check).
            tracing::warn!(url = %self.redacted, "AMQP connection lost; reconnecting");
        }
        state.connection = None;
        state.publisher = None;
        state.declared_exchanges.clear();
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.connection_name.as_bytes()));
        if self.uri.scheme == lapin::uri::AMQPScheme::AMQPS {
            crate::tls::install_crypto_provider();
        }
        let runtime = lapin::runtime::default_runtime().map_err(|e| BrokerError::Connect {
            url: self.redacted.clone(),
            reason: e.to_string(),
        })?;
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            lapin::Connect::connect_with_config(self.uri.clone(), props, self.tls.clone(), runtime),
        )
        .await
        .map_err(|_| BrokerError::Connect {
            url: self.redacted.clone(),
            reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        })?
        .map_err(|e| BrokerError::Connect {
            url: self.redacted.clone(),
            reason: crate::tls::explain(e.to_string()),
        })?;
        tracing::info!(url = %self.redacted, "connected to RabbitMQ");
        if replacing {
            crate::reconnects::record("rabbitmq");
        }
        let conn = Arc::new(conn);
        state.connection = Some(conn.clone());
        Ok(conn)
    }

    /// A fresh channel on a live connection.
    async fn open_channel(&self) -> Result<(Arc<Connection>, Channel), BrokerError> {
        let mut state = self.state.lock().await;
        let conn = self.connection(&mut state).await?;
        match conn.create_channel().await {
            Ok(ch) => Ok((conn, ch)),
            Err(e) => {
                // A connection that cannot open channels is as good as dead: start over once.
                tracing::warn!(url = %self.redacted, error = %e, "AMQP connection lost (cannot open a channel); reconnecting");
                state.connection = None;
                let conn = self.connection(&mut state).await?;
                crate::reconnects::record("rabbitmq");
                let ch = conn
                    .create_channel()
                    .await
                    .map_err(|e| lost("channel.open", &e))?;
                Ok((conn, ch))
            }
        }
    }

    /// The shared publishing channel (confirm mode), re-opened if needed.
    async fn publisher(&self, state: &mut ConnState) -> Result<Channel, BrokerError> {
        let conn = self.connection(state).await?;
        if let Some(ch) = &state.publisher {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        state.publisher = None;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| lost("channel.open", &e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| classify("confirm.select", &e))?;
        state.publisher = Some(ch.clone());
        Ok(ch)
    }

    /// One publish attempt: returns `Err((retryable, error))`.
    async fn publish_once(
        &self,
        exchange: Option<&ExchangeSpec>,
        exchange_name: &ShortString,
        routing_key: &ShortString,
        body: &[u8],
        props: &BasicProperties,
    ) -> Result<(), (bool, BrokerError)> {
        let channel = {
            let mut state = self.state.lock().await;
            let ch = self.publisher(&mut state).await.map_err(|e| (true, e))?;
            if let Some(spec) = exchange {
                if !state.declared_exchanges.contains(&spec.name) {
                    ch.exchange_declare(
                        exchange_name.clone(),
                        lapin_kind(spec.kind),
                        ExchangeDeclareOptions {
                            durable: spec.durable,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        (
                            is_connection_error(&e),
                            classify(&format!("exchange.declare {}", spec.name), &e),
                        )
                    })?;
                    state.declared_exchanges.insert(spec.name.clone());
                }
            }
            ch
        };
        let confirm = channel
            .basic_publish(
                exchange_name.clone(),
                routing_key.clone(),
                BasicPublishOptions::default(),
                body,
                props.clone(),
            )
            .await
            .map_err(|e| (is_connection_error(&e), classify("basic.publish", &e)))?;
        match confirm.await {
            Ok(Confirmation::Ack(_)) | Ok(Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Nack(_)) => Err((
                false,
                BrokerError::Refused {
                    operation: "basic.publish".into(),
                    reason: "RabbitMQ nacked the message (not stored)".into(),
                },
            )),
            Err(e) => Err((
                is_connection_error(&e),
                classify("basic.publish confirm", &e),
            )),
        }
    }

    async fn publish_inner(
        &self,
        exchange: Option<&ExchangeSpec>,
        exchange_name: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        let exchange_short = short("exchange", exchange_name)?;
        let routing_key = short("routing key", routing_key)?;
        let props = outgoing_properties(&message)?;
        // A publish that died with the connection is retried once on a fresh one: a result published
        // twice is harmless (the client keeps the latest state), a lost one leaves it waiting forever.
        match self
            .publish_once(
                exchange,
                &exchange_short,
                &routing_key,
                &message.body,
                &props,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err((true, e)) => {
                tracing::warn!(error = %e, "publish failed on a dead connection; retrying once");
                self.publish_once(
                    exchange,
                    &exchange_short,
                    &routing_key,
                    &message.body,
                    &props,
                )
                .await
                .map_err(|(_, e)| e)
            }
            Err((false, e)) => Err(e),
        }
    }

    async fn subscribe_queue(
        &self,
        queue: &str,
        setup: Setup,
        prefetch: Option<u16>,
        no_ack: bool,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        let name = short("queue name", queue)?;
        let (conn, channel) = self.open_channel().await?;
        let result = async {
            match setup {
                Setup::TaskQueue(spec) => declare_task_queue(&channel, name.clone(), spec).await?,
                Setup::Subscription(sub) => {
                    declare_subscription(&channel, name.clone(), sub).await?
                }
            }
            if let Some(prefetch) = prefetch {
                channel
                    .basic_qos(prefetch, BasicQosOptions { global: false })
                    .await
                    .map_err(|e| classify("basic.qos", &e))?;
            }
            channel
                .basic_consume(
                    name.clone(),
                    ShortString::from(""),
                    BasicConsumeOptions {
                        no_ack,
                        ..Default::default()
                    },
                    consumer_arguments(no_ack),
                )
                .await
                .map_err(|e| classify(&format!("basic.consume {queue}"), &e))
        }
        .await;
        match result {
            Ok(consumer) => Ok(Box::new(AmqpConsumer {
                _connection: conn,
                channel,
                tag: consumer.tag(),
                consumer,
                queue: queue.to_string(),
                no_ack,
                cancelled: false,
            })),
            Err(e) => {
                // A refused declare already closed the channel; close it anyway for the other failures.
                let _ = channel.close(200, ShortString::from("OK")).await;
                Err(e)
            }
        }
    }
}

/// What to declare before consuming.
enum Setup {
    TaskQueue(QueueSpec),
    Subscription(Subscription),
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn consume(
        &self,
        queue: &QueueSpec,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        self.subscribe_queue(
            &queue.name,
            Setup::TaskQueue(queue.clone()),
            Some(prefetch),
            false,
        )
        .await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        self.publish_inner(None, exchange, routing_key, message)
            .await
    }

    async fn broadcast(
        &self,
        exchange: &ExchangeSpec,
        routing_key: &str,
        message: OutgoingMessage,
    ) -> Result<(), BrokerError> {
        self.publish_inner(Some(exchange), &exchange.name, routing_key, message)
            .await
    }

    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> Result<Box<dyn Consumer>, BrokerError> {
        self.subscribe_queue(
            &subscription.queue,
            Setup::Subscription(subscription.clone()),
            None,
            true,
        )
        .await
    }

    async fn declare(&self, queue: &QueueSpec) -> Result<(), BrokerError> {
        let name = short("queue name", &queue.name)?;
        let (_conn, channel) = self.open_channel().await?;
        let result = declare_task_queue(&channel, name, queue.clone()).await;
        let _ = channel.close(200, ShortString::from("OK")).await;
        result
    }

    async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        let name = short("queue name", queue)?;
        let (_conn, channel) = self.open_channel().await?;
        let result = channel
            .queue_declare(
                name,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, ShortString::from("OK")).await;
        match result {
            Ok(q) => Ok(u64::from(q.message_count())),
            Err(e) => Err(classify(&format!("queue.declare(passive) {queue}"), &e)),
        }
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        None
    }

    fn transport(&self) -> &'static str {
        "amqp"
    }
}

/// Exchange `<q>` direct durable, queue `<q>` durable (+ `x-max-priority` as `I`), binding rk `<q>`.
async fn declare_task_queue(
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
async fn declare_subscription(
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

fn lapin_kind(kind: ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
    }
}

/// A subscription on its own channel.
struct AmqpConsumer {
    /// Keeps the connection open while this consumer lives, even if the broker reconnected meanwhile.
    _connection: Arc<Connection>,
    channel: Channel,
    consumer: lapin::Consumer,
    tag: ShortString,
    queue: String,
    no_ack: bool,
    cancelled: bool,
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if self.cancelled {
            return Ok(None);
        }
        // The lapin consumer is a channel receiver: dropping this future on timeout loses nothing.
        match tokio::time::timeout(POLL_INTERVAL, self.consumer.next()).await {
            Err(_elapsed) => {
                if self.channel.status().connected() {
                    Ok(None)
                } else {
                    Err(BrokerError::ConnectionLost(format!(
                        "channel of consumer on {} closed",
                        self.queue
                    )))
                }
            }
            Ok(Some(Ok(delivery))) => {
                let message = convert_delivery(&delivery, &self.queue);
                let acker: Box<dyn Acker> = if self.no_ack {
                    Box::new(NoAck)
                } else {
                    Box::new(AmqpAcker {
                        acker: delivery.acker,
                    })
                };
                Ok(Some(Delivery { message, acker }))
            }
            Ok(Some(Err(e))) => Err(BrokerError::ConnectionLost(format!(
                "consumer on {}: {e}",
                self.queue
            ))),
            Ok(None) => Err(BrokerError::ConnectionLost(format!(
                "consumer on {} was cancelled by the broker (queue deleted?)",
                self.queue
            ))),
        }
    }

    async fn cancel(&mut self) -> Result<(), BrokerError> {
        if self.cancelled {
            return Ok(());
        }
        self.cancelled = true;
        if !self.channel.status().connected() {
            return Ok(()); // the broker already requeued everything unacked on this channel
        }
        let cancel = self
            .channel
            .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
            .await;
        // Closing the channel hands every unsettled delivery back to the queue.
        let close = self.channel.close(200, ShortString::from("OK")).await;
        match (cancel, close) {
            (_, Ok(())) => Ok(()),
            (Err(e), Err(_)) | (Ok(()), Err(e)) => {
                if self.channel.status().connected() {
                    Err(classify("channel.close", &e))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Settles one delivery on the channel it came from.
struct AmqpAcker {
    acker: lapin::Acker,
}

impl AmqpAcker {
    fn settled(&self, operation: &str, r: lapin::Result<bool>) -> Result<(), BrokerError> {
        match r {
            Ok(true) => Ok(()),
            // Already settled: a no-op. Poisoned: the channel died, the broker redelivers the message.
            Ok(false) if self.acker.poisoned() => Err(BrokerError::ConnectionLost(format!(
                "{operation}: the delivery's channel is closed; RabbitMQ will redeliver the message"
            ))),
            Ok(false) => Ok(()),
            Err(e) => Err(BrokerError::ConnectionLost(format!("{operation}: {e}"))),
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        let r = self.acker.ack(BasicAckOptions::default()).await;
        self.settled("basic.ack", r)
    }

    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        let r = self.acker.reject(BasicRejectOptions { requeue }).await;
        self.settled("basic.reject", r)
    }
}

fn convert_delivery(d: &lapin::message::Delivery, queue: &str) -> RawMessage {
    let p = &d.properties;
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_string());
    RawMessage {
        body: d.data.clone(),
        content_type: s(p.content_type()).unwrap_or_default(),
        content_encoding: s(p.content_encoding()).unwrap_or_default(),
        headers: p.headers().as_ref().map(table_to_json).unwrap_or_default(),
        properties: Properties {
            correlation_id: s(p.correlation_id()),
            reply_to: s(p.reply_to()),
            delivery_mode: *p.delivery_mode(),
            priority: *p.priority(),
            expiration: s(p.expiration()),
        },
        delivery_info: DeliveryInfo {
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            redelivered: d.redelivered,
            queue: queue.to_string(),
        },
    }
}

/// Deepest nesting of header tables/arrays converted; deeper values become the string
/// [`TOO_DEEP`]. Celery's headers nest two or three levels; a frame of 128 KiB can nest 20,000, and
/// the conversion (and the `Value` it builds) must not recurse that deep on a worker thread.
pub const MAX_HEADER_DEPTH: usize = 64;
/// What a header value nested deeper than [`MAX_HEADER_DEPTH`] becomes.
pub const TOO_DEEP: &str = "<nested too deep>";

/// AMQP field table → JSON object.
pub fn table_to_json(table: &FieldTable) -> Map<String, Value> {
    table_at(table, 0)
}

fn table_at(table: &FieldTable, depth: usize) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), value_at(v, depth + 1)))
        .collect()
}

/// One AMQP field value → JSON (strings and byte arrays as lossy UTF-8, decimals and timestamps as numbers).
pub fn amqp_to_json(v: &AMQPValue) -> Value {
    value_at(v, 0)
}

fn value_at(v: &AMQPValue, depth: usize) -> Value {
    if depth > MAX_HEADER_DEPTH {
        return Value::String(TOO_DEEP.into());
    }
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => {
            if d.scale == 0 {
                Value::from(d.value)
            } else {
                float(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
            }
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(
            a.as_slice()
                .iter()
                .map(|x| value_at(x, depth + 1))
                .collect(),
        ),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(table_at(t, depth)),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// JSON object → AMQP field table (py-amqp's encoding). Fails only on keys longer than 255 bytes.
pub fn json_to_table(map: &Map<String, Value>) -> Result<FieldTable, BrokerError> {
    let mut inner = BTreeMap::new();
    for (k, v) in map {
        inner.insert(short("header name", k)?, json_to_amqp(v)?);
    }
    Ok(FieldTable::from(inner))
}

/// One JSON value → AMQP, as py-amqp writes the equivalent Python value.
pub fn json_to_amqp(v: &Value) -> Result<AMQPValue, BrokerError> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                int_value(i)
            } else if let Some(u) = n.as_u64() {
                // Beyond i64: py-amqp cannot write it at all; a double keeps the magnitude.
                AMQPValue::Double(u as f64)
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(a) => {
            let items: Result<Vec<AMQPValue>, BrokerError> = a.iter().map(json_to_amqp).collect();
            AMQPValue::FieldArray(FieldArray::from(items?))
        }
        Value::Object(m) => AMQPValue::FieldTable(json_to_table(m)?),
    })
}

/// py-amqp: `I` when `-2147483647 <= v <= 2147483647`, else a signed 64-bit value (lapin writes tag `l`,
/// which RabbitMQ and py-amqp read as signed 64-bit, like py-amqp's own `L`).
fn int_value(i: i64) -> AMQPValue {
    if (-i64::from(i32::MAX)..=i64::from(i32::MAX)).contains(&i) {
        AMQPValue::LongInt(i as i32)
    } else {
        AMQPValue::LongLongInt(i)
    }
}

fn outgoing_properties(m: &OutgoingMessage) -> Result<BasicProperties, BrokerError> {
    let mut props = BasicProperties::default();
    if !m.content_type.is_empty() {
        props = props.with_content_type(short("content_type", &m.content_type)?);
    }
    if !m.content_encoding.is_empty() {
        props = props.with_content_encoding(short("content_encoding", &m.content_encoding)?);
    }
    // Celery always writes the headers table, even when empty (flags 0xfc00 on results).
    props = props.with_headers(json_to_table(&m.headers)?);
    let p = &m.properties;
    if let Some(mode) = p.delivery_mode {
        props = props.with_delivery_mode(mode);
    }
    if let Some(prio) = p.priority {
        props = props.with_priority(prio);
    }
    if let Some(c) = &p.correlation_id {
        props = props.with_correlation_id(short("correlation_id", c)?);
    }
    if let Some(r) = &p.reply_to {
        props = props.with_reply_to(short("reply_to", r)?);
    }
    if let Some(e) = &p.expiration {
        props = props.with_expiration(short("expiration", e)?);
    }
    Ok(props)
}

fn short(what: &str, s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|e| BrokerError::Refused {
        operation: format!("encoding {what}"),
        reason: format!(
            "{e} ({} bytes; AMQP short strings hold at most 255)",
            s.len()
        ),
    })
}

fn is_connection_error(e: &lapin::Error) -> bool {
    !matches!(e.kind(), ErrorKind::ProtocolError(_))
        || matches!(e.kind(), ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Hard(_)))
}

/// Broker answers (406 PRECONDITION_FAILED, 404 NOT_FOUND, 403 ACCESS_REFUSED…) are refusals; anything
/// else means the connection or channel is gone.
fn classify(operation: &str, e: &lapin::Error) -> BrokerError {
    if is_connection_error(e) {
        lost(operation, e)
    } else {
        BrokerError::Refused {
            operation: operation.to_string(),
            reason: e.to_string(),
        }
    }
}

fn lost(operation: &str, e: &lapin::Error) -> BrokerError {
    BrokerError::ConnectionLost(format!("{operation}: {e}"))
}

/// Per-consumer delivery-acknowledgement timeout for task consumers: 25 hours, above Dagster's default
/// `job_wait_timeout` (24 h). RabbitMQ's server default (30 min) would close the channel under a step that
/// runs longer while its message is held for late ack. RabbitMQ 3.12+ honours `x-consumer-timeout` per
/// consumer; older servers ignore the argument (their `consumer_timeout` must then be raised in
/// rabbitmq.conf, as for Python Celery with `acks_late`).
pub const CONSUMER_TIMEOUT_MS: i64 = 25 * 3600 * 1000;

fn consumer_arguments(no_ack: bool) -> FieldTable {
    let mut args = FieldTable::default();
    if !no_ack {
        args.insert(
            ShortString::from("x-consumer-timeout"),
            lapin::types::AMQPValue::LongLongInt(CONSUMER_TIMEOUT_MS),
        );
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Regression (issue 14): a header table nested thousands deep (a 128 KiB frame holds 20,000
    /// levels) made the conversion recurse past the thread's stack.
    #[test]
    fn deep_header_tables_are_cut() {
        let mut v = AMQPValue::LongString(LongString::from("leaf"));
        for _ in 0..10_000 {
            let mut t = FieldTable::default();
            t.insert("k".into(), v);
            v = AMQPValue::FieldTable(t);
        }
        let mut top = FieldTable::default();
        top.insert("stamps".into(), v);
        let j = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let j = Value::Object(table_to_json(&top));
                // Drop the deep AMQP value on the big-stack thread that built it; `j` is shallow.
                std::mem::forget(top);
                j
            })
            .expect("thread")
            .join()
            .expect("no stack overflow");
        let mut depth = 0;
        let mut cur = &j["stamps"];
        while let Some(next) = cur.get("k") {
            cur = next;
            depth += 1;
        }
        assert_eq!(depth, MAX_HEADER_DEPTH);
        assert_eq!(cur, &json!(TOO_DEEP));
    }

    #[test]
    fn json_to_amqp_follows_py_amqp_types() {
        assert_eq!(json_to_amqp(&json!(1)).ok(), Some(AMQPValue::LongInt(1)));
        assert_eq!(
            json_to_amqp(&json!(2147483647)).ok(),
            Some(AMQPValue::LongInt(i32::MAX))
        );
        assert_eq!(
            json_to_amqp(&json!(2147483648i64)).ok(),
            Some(AMQPValue::LongLongInt(2147483648))
        );
        assert_eq!(
            json_to_amqp(&json!(-2147483648i64)).ok(),
            Some(AMQPValue::LongLongInt(-2147483648))
        );
        assert_eq!(json_to_amqp(&json!(1.5)).ok(), Some(AMQPValue::Double(1.5)));
        assert_eq!(json_to_amqp(&json!(null)).ok(), Some(AMQPValue::Void));
        assert_eq!(
            json_to_amqp(&json!(true)).ok(),
            Some(AMQPValue::Boolean(true))
        );
        assert_eq!(
            json_to_amqp(&json!("x")).ok(),
            Some(AMQPValue::LongString("x".into()))
        );
        let nested = json!({"a": [1, null, {"b": "c"}]});
        let back = json_to_amqp(&nested).map(|v| amqp_to_json(&v)).ok();
        assert_eq!(back, Some(nested));
    }

    #[test]
    fn amqp_to_json_covers_every_type() {
        let cases = [
            (AMQPValue::ShortShortInt(-1), json!(-1)),
            (AMQPValue::ShortShortUInt(255), json!(255)),
            (AMQPValue::ShortInt(-300), json!(-300)),
            (AMQPValue::ShortUInt(60000), json!(60000)),
            (AMQPValue::LongUInt(4_000_000_000), json!(4_000_000_000u32)),
            (AMQPValue::Float(0.5), json!(0.5)),
            (AMQPValue::Timestamp(1_700_000_000), json!(1_700_000_000u64)),
            (AMQPValue::ByteArray(b"hi".to_vec().into()), json!("hi")),
            (
                AMQPValue::LongString(vec![0xff, b'a'].into()),
                json!("\u{fffd}a"),
            ),
            (
                AMQPValue::DecimalValue(lapin::types::DecimalValue {
                    scale: 2,
                    value: 150,
                }),
                json!(1.5),
            ),
            (AMQPValue::Float(f32::NAN), Value::Null),
        ];
        for (v, expected) in cases {
            assert_eq!(amqp_to_json(&v), expected, "{v:?}");
        }
    }

    #[test]
    fn long_header_names_are_refused_not_panicking() {
        let mut m = Map::new();
        m.insert("k".repeat(300), json!(1));
        assert!(matches!(
            json_to_table(&m),
            Err(BrokerError::Refused { .. })
        ));
    }
}
