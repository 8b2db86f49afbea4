//! Remote control (Celery's pidbox): `celery inspect`, `celery control`, Flower and Dagster's liveness
//! probe talk to the worker through these commands. Replies follow `celery/worker/control.py` so Python
//! clients render them unchanged; commands that have no meaning for Dagster steps answer with a clear
//! error instead of pretending.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use celeriac_wire::broker::{ExchangeSpec, Subscription};
use celeriac_wire::json::{parse_lenient, truncate_repr};
use celeriac_wire::pidbox::ControlRequest;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::state::ActiveRequest;
use super::Shared;
use crate::config::{AckPolicy, QueueConfig};

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
    let mut backoff = Duration::from_millis(500);
    while !stop.is_cancelled() {
        let mut mailbox = match shared.broker.subscribe(&subscription).await {
            Ok(m) => {
                debug!(queue = %subscription.queue, "remote control mailbox ready");
                backoff = Duration::from_millis(500);
                m
            }
            Err(e) => {
                warn!("cannot open the remote-control mailbox: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
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
    if req.method == "shutdown" {
        info!("remote control: shutdown");
        shared.shutdown_requested.cancel();
        return; // Celery exits before replying
    }
    let reply = match handle(shared, &req) {
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

fn arg_str<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

/// Task ids from `task_id` (a string from the API, a list from the CLI).
fn task_ids(args: &Map<String, Value>) -> Vec<String> {
    match args.get("task_id") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Python's repr of a set of strings: `{'a', 'b'}`.
fn py_set(ids: &[String]) -> String {
    format!(
        "{{{}}}",
        ids.iter()
            .map(|i| format!("'{i}'"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn handle(shared: &Arc<Shared>, req: &ControlRequest) -> Result<Value, String> {
    let args = &req.arguments;
    let state = &shared.state;
    Ok(match req.method.as_str() {
        "ping" => json!({"ok": "pong"}),
        "clock" => json!({"clock": shared.events.clock().value()}),
        "hello" => {
            if arg_str(args, "from_node") == Some(shared.config.hostname.as_str()) {
                Value::Null
            } else {
                let revoked: Vec<String> = match args.get("revoked") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect(),
                    Some(Value::Object(m)) => m.keys().cloned().collect(),
                    _ => Vec::new(),
                };
                for id in &revoked {
                    state.revoke(id);
                }
                json!({"revoked": state.revoked_ids(), "clock": shared.events.clock().value()})
            }
        }
        "heartbeat" => {
            shared.events.heartbeat_now(state, 5.0);
            Value::Null
        }
        "enable_events" => {
            let was = shared.events.set_task_events(true);
            json!({"ok": if was { "task events already enabled" } else { "task events enabled" }})
        }
        "disable_events" => {
            let was = shared.events.set_task_events(false);
            json!({"ok": if was { "task events disabled" } else { "task events already disabled" }})
        }
        "stats" => stats(shared),
        "active" => Value::Array(
            state
                .active()
                .iter()
                .map(|r| request_info(shared, r, true))
                .collect(),
        ),
        "reserved" | "scheduled" => json!([]),
        "revoked" => json!(state.revoked_ids()),
        "registered" => json!(shared.registry.names()),
        "active_queues" => Value::Array(
            shared
                .queues
                .all()
                .iter()
                .map(|q| queue_info(&q.config.name))
                .collect(),
        ),
        "conf" => conf(shared),
        "report" => json!({"ok": report(shared)}),
        "query_task" => {
            let ids: Vec<String> = match args.get("ids") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => Vec::new(),
            };
            let mut out = Map::new();
            for r in state.active() {
                if ids.contains(&r.id) {
                    out.insert(
                        r.id.clone(),
                        json!(["active", request_info(shared, &r, true)]),
                    );
                }
            }
            Value::Object(out)
        }
        "revoke" | "terminate" => {
            let ids = task_ids(args);
            for id in &ids {
                state.revoke(id);
            }
            let terminate = req.method == "terminate"
                || args
                    .get("terminate")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            if terminate {
                let hit: Vec<String> = ids
                    .iter()
                    .filter(|id| state.terminate(id))
                    .cloned()
                    .collect();
                info!(?hit, "remote control: terminate");
                if hit.is_empty() {
                    json!({"ok": "terminate: tasks unknown"})
                } else {
                    json!({"ok": format!("terminate: {}", hit.join(", "))})
                }
            } else {
                // A revoke can carry thousands of ids: log how many and the first few.
                let first: Vec<&String> = ids.iter().take(10).collect();
                info!(count = ids.len(), ?first, "remote control: revoke");
                json!({"ok": format!("tasks {} flagged as revoked", py_set(&ids))})
            }
        }
        "add_consumer" => {
            let queue = arg_str(args, "queue")
                .ok_or("add_consumer needs a queue")?
                .to_string();
            let concurrency = shared
                .config
                .queues
                .first()
                .map(|q| q.concurrency)
                .unwrap_or(1);
            let ack = shared
                .config
                .queues
                .first()
                .map(|q| q.ack)
                .unwrap_or(AckPolicy::Late);
            if shared.add_queue(QueueConfig {
                name: queue.clone(),
                concurrency,
                ack,
            }) {
                info!(%queue, "remote control: add consumer");
                json!({"ok": format!("add consumer {queue}")})
            } else {
                json!({"ok": format!("already consuming from {queue}")})
            }
        }
        "cancel_consumer" => {
            let queue = arg_str(args, "queue")
                .ok_or("cancel_consumer needs a queue")?
                .to_string();
            shared.cancel_queue(&queue);
            info!(%queue, "remote control: cancel consumer");
            json!({"ok": format!("no longer consuming from {queue}")})
        }
        "pool_grow" | "pool_shrink" => {
            let n = args.get("n").and_then(Value::as_i64).unwrap_or(1).max(0);
            let delta = if req.method == "pool_grow" { n } else { -n };
            let limits = shared.queues.resize(delta);
            info!(?limits, "remote control: {}", req.method);
            json!({"ok": if delta >= 0 { "pool will grow" } else { "pool will shrink" }})
        }
        "autoscale" => {
            let max = args
                .get("max")
                .and_then(Value::as_i64)
                .ok_or("autoscale needs max")?;
            let min = args.get("min").and_then(Value::as_i64).unwrap_or(0);
            // Per-queue concurrency is the pool: set every queue's limit to `max`.
            for q in shared.queues.all() {
                shared
                    .queues
                    .resize_one(&q.config.name, max.max(1) as usize);
            }
            json!({"ok": format!("autoscale now max={max} min={min}")})
        }
        "rate_limit" => {
            let task = arg_str(args, "task_name").unwrap_or_default();
            if shared.registry.get(task).is_none() {
                return Err("unknown task".into());
            }
            return Err("rate limits are not supported by celeriac: a queue's steps are limited by its concurrency (pool_grow/pool_shrink, queue_concurrency)".into());
        }
        "time_limit" => {
            let task = arg_str(args, "task_name").unwrap_or_default();
            if shared.registry.get(task).is_none() {
                return Err("unknown task".into());
            }
            return Err("time limits are not supported by celeriac: a step's limit is Dagster's job_wait_timeout".into());
        }
        "pool_restart" => {
            return Err(
                "pool_restart is not supported by celeriac: there is no Python pool to reload"
                    .into(),
            )
        }
        other => return Err(format!("KeyError('{other}')")),
    })
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// `Request.info()`: the shape `inspect active` and Flower's worker page read.
fn request_info(shared: &Shared, r: &ActiveRequest, safe: bool) -> Value {
    let _ = safe; // celeriac always returns the repr strings: kwargs may carry credentials
    json!({
        "id": r.id, "name": r.name, "args": r.argsrepr, "kwargs": r.kwargsrepr, "type": r.task,
        "hostname": shared.config.hostname, "time_start": epoch(r.started), "acknowledged": r.acknowledged,
        "delivery_info": {"exchange": r.exchange, "routing_key": r.routing_key, "priority": r.priority, "redelivered": r.redelivered},
        "worker_pid": std::process::id(),
    })
}

/// kombu `Queue.as_dict(recurse=True)` for a Dagster queue.
fn queue_info(name: &str) -> Value {
    json!({
        "name": name,
        "exchange": {"name": name, "type": "direct", "arguments": null, "durable": true, "passive": false,
                     "auto_delete": false, "delivery_mode": null, "no_declare": false},
        "routing_key": name, "queue_arguments": {"x-max-priority": 10}, "binding_arguments": null,
        "consumer_arguments": null, "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
        "alias": null, "bindings": [], "no_declare": null, "expires": null, "message_ttl": null,
        "max_length": null, "max_length_bytes": null, "max_priority": null,
    })
}

fn broker_info(shared: &Shared) -> Value {
    let info = celeriac_wire::url::parse_broker(&shared.config.broker_url)
        .map(|b| b.describe())
        .ok();
    let (host, port, user, vhost, ssl) = match info {
        Some(i) => (i.hostname, i.port, i.userid, i.virtual_host, i.ssl),
        None => ("localhost".into(), 0, None, "/".into(), false),
    };
    json!({
        "hostname": host, "userid": user, "virtual_host": vhost, "port": port, "insist": false,
        "ssl": ssl, "transport": shared.broker.transport(), "connect_timeout": 4, "transport_options": {},
        "login_method": null, "uri_prefix": null, "heartbeat": 120.0, "failover_strategy": "round-robin",
        "alternates": [],
    })
}

fn rusage() -> Value {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            json!({
                "utime": tv(u.user_time()), "stime": tv(u.system_time()), "maxrss": u.max_rss(),
                "ixrss": 0, "idrss": 0, "isrss": 0, "minflt": u.minor_page_faults(), "majflt": u.major_page_faults(),
                "nswap": 0, "inblock": u.block_reads(), "oublock": u.block_writes(), "msgsnd": 0, "msgrcv": 0,
                "nsignals": 0, "nvcsw": u.voluntary_context_switches(), "nivcsw": u.involuntary_context_switches(),
            })
        }
        Err(_) => json!({}),
    }
}

fn stats(shared: &Shared) -> Value {
    let limits: usize = shared.queues.all().iter().map(|q| q.limit()).sum();
    let uptime = shared.started.elapsed().as_secs();
    json!({
        "total": shared.state.totals(),
        "pid": std::process::id(),
        "clock": shared.events.clock().value().to_string(),
        "uptime": uptime,
        "pool": {
            "implementation": "celeriac:tokio", "max-concurrency": limits, "processes": [std::process::id()],
            "max-tasks-per-child": "N/A", "put-guarded-by-semaphore": false, "timeouts": [0, 0], "writes": {},
            "queues": shared.queues.all().iter().map(|q| (q.config.name.clone(), json!(q.limit()))).collect::<Map<String, Value>>(),
        },
        "broker": broker_info(shared),
        "prefetch_count": limits,
        "rusage": rusage(),
    })
}

fn conf(shared: &Shared) -> Value {
    let c = &shared.config;
    json!({
        "broker_url": celeriac_wire::url::redact(&c.broker_url),
        "result_backend": celeriac_wire::url::redact(&c.result_backend),
        "task_default_queue": c.queues.first().map(|q| q.name.clone()),
        "task_queue_max_priority": 10,
        "task_default_priority": 5,
        "task_track_started": c.track_started,
        "worker_send_task_events": shared.events.task_events_enabled(),
        "task_acks_late": c.queues.first().map(|q| q.ack == AckPolicy::Late),
        "worker_prefetch_multiplier": 1,
        "accept_content": c.accept_content,
        "result_expires": c.result_expires.as_secs(),
        "broker_transport_options": {"visibility_timeout": c.redis.visibility_timeout.as_secs()},
        "include": ["dagster_celery_k8s.app"],
    })
}

fn report(shared: &Shared) -> String {
    format!(
        "\nsoftware -> celeriac:{} (rust) celery-protocol:5.7\nplatform -> system:{} arch:{}\nsettings -> transport:{} results:{}\n\nbroker_url: '{}'\nresult_backend: '{}'\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        shared.broker.transport(),
        celeriac_wire::url::redact(&shared.config.result_backend),
        celeriac_wire::url::redact(&shared.config.broker_url),
        celeriac_wire::url::redact(&shared.config.result_backend),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_set_repr() {
        assert_eq!(py_set(&["a".into()]), "{'a'}");
        assert_eq!(py_set(&["a".into(), "b".into()]), "{'a', 'b'}");
    }

    #[test]
    fn queue_dict_matches_capture_keys() {
        let q = queue_info("research_q");
        let keys: Vec<&String> = q
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        // captures/amqp_inspect_active_queues.json, in order.
        assert_eq!(
            keys,
            [
                "name",
                "exchange",
                "routing_key",
                "queue_arguments",
                "binding_arguments",
                "consumer_arguments",
                "durable",
                "exclusive",
                "auto_delete",
                "no_ack",
                "alias",
                "bindings",
                "no_declare",
                "expires",
                "message_ttl",
                "max_length",
                "max_length_bytes",
                "max_priority"
            ]
        );
        assert_eq!(q["queue_arguments"]["x-max-priority"], 10);
    }
}
