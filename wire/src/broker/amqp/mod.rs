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
//!
//! Split by concept: [`topology`] (what is declared), [`fields`] (headers and properties in py-amqp's
//! types), `consumer` (deliveries and their settling); this file holds the connection, the publisher
//! and the [`Broker`] implementation.

mod consumer;
pub mod fields;
pub mod topology;

pub use fields::{
    amqp_to_json, json_to_amqp, json_to_table, table_to_json, MAX_HEADER_DEPTH, TOO_DEEP,
};
pub use topology::CONSUMER_TIMEOUT_MS;

use consumer::AmqpConsumer;
use fields::{outgoing_properties, short};
use topology::{consumer_arguments, declare_subscription, declare_task_queue, lapin_kind, Setup};

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::protocol::BasicProperties;
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use tokio::sync::Mutex;

use super::{
    Broker, BrokerError, Consumer, ExchangeSpec, OutgoingMessage, QueueSpec, Subscription,
};

/// Heartbeat asked for when the URI does not set one (what py-amqp negotiates with RabbitMQ's default).
const DEFAULT_HEARTBEAT_SECS: u16 = 60;
/// Longest wait for the TCP + AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Consumer::next`] waits for a delivery before returning `Ok(None)`.
pub(super) const POLL_INTERVAL: Duration = Duration::from_secs(1);

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
        let mut retried = false;
        loop {
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
                Ok(()) => return Ok(()),
                Err((true, e)) if !retried => {
                    tracing::warn!(error = %e, "publish failed on a dead connection; retrying once");
                    retried = true;
                }
                Err((_, e)) => return Err(e),
            }
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

fn is_connection_error(e: &lapin::Error) -> bool {
    !matches!(e.kind(), ErrorKind::ProtocolError(_))
        || matches!(e.kind(), ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Hard(_)))
}

/// Broker answers (406 PRECONDITION_FAILED, 404 NOT_FOUND, 403 ACCESS_REFUSED…) are refusals; anything
/// else means the connection or channel is gone.
pub(super) fn classify(operation: &str, e: &lapin::Error) -> BrokerError {
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
