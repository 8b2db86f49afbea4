//! Remote control (Celery's pidbox): `celery inspect`, `celery control`, Flower and Dagster's liveness
//! probe talk to the worker through these commands. Replies follow `celery/worker/control.py` so Python
//! clients render them unchanged; commands that have no meaning for Dagster steps answer with a clear
//! error instead of pretending.
//!
//! `commands` runs each command, `replies` builds the inspect replies; this file serves the mailbox.

mod commands;
mod replies;

use std::sync::Arc;
use std::time::Duration;

use celeriac_wire::backoff::Backoff;
use celeriac_wire::broker::{ExchangeSpec, Subscription};
use celeriac_wire::json::{parse_lenient, truncate_repr};
use celeriac_wire::pidbox::{ControlCommand, ControlRequest};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::shared::Shared;

/// Serves remote-control requests until `stop` fires, resubscribing after broker failures.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let subscription = Subscription {
        exchange: ExchangeSpec::pidbox(),
        queue: format!("{}.celery.pidbox", shared.config.hostname),
        binding_key: String::new(),
        exclusive: true,
        message_ttl_ms: Some(300_000),
        expires_ms: Some(10_000),
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    while !stop.is_cancelled() {
        let mut mailbox = match shared.broker.subscribe(&subscription).await {
            Ok(m) => {
                debug!(queue = %subscription.queue, "remote control mailbox ready");
                backoff.reset();
                m
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!("cannot open the remote-control mailbox: {e}; retrying in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                n = mailbox.next() => n,
                _ = stop.cancelled() => break,
            };
            match next {
                Ok(Some(delivery)) => {
                    let _ = delivery.acker.ack().await;
                    let clock = delivery
                        .message
                        .headers
                        .get("clock")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    shared.events.clock().adjust(clock);
                    match parse_lenient(&delivery.message.body)
                        .map_err(|e| e.to_string())
                        .and_then(|b| ControlRequest::parse(&b).map_err(|e| e.to_string()))
                    {
                        Ok(req) if req.addressed_to(&shared.config.hostname) => {
                            dispatch(&shared, req).await
                        }
                        Ok(_) => {}
                        Err(e) => warn!("ignoring malformed remote-control message: {e}"),
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!("remote-control mailbox failed: {e}; resubscribing");
                    break;
                }
            }
        }
        let _ = mailbox.cancel().await;
    }
}

async fn dispatch(shared: &Arc<Shared>, req: ControlRequest) {
    // The method name comes from any client on the broker: never log it whole.
    debug!(method = %truncate_repr(req.method.clone(), 100), "remote control");
    let command = req.command();
    if command == Ok(ControlCommand::Shutdown) {
        info!("remote control: shutdown");
        shared.shutdown_requested.cancel();
        return; // Celery exits before replying
    }
    let reply = match command.and_then(|c| commands::handle(shared, c)) {
        Ok(v) => v,
        Err(e) => json!({"error": e}),
    };
    let clock = shared.events.clock().forward();
    if let Some((_, routing_key, msg)) = req.reply(&shared.config.hostname, reply, clock) {
        if let Err(e) = shared
            .broker
            .broadcast(&ExchangeSpec::pidbox_reply(), &routing_key, msg)
            .await
        {
            warn!(method = %req.method, "cannot send remote-control reply: {e}");
        }
    }
}
