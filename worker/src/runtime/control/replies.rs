//! Reply builders of the inspect commands, in the shapes `celery/worker/control.py` and kombu give
//! them (keys in the captured order), so `celery inspect` and Flower render celeriac's replies as a
//! Python worker's.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::config::AckPolicy;
use crate::runtime::shared::Shared;
use crate::runtime::state::ActiveRequest;

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// `Request.info()`: the shape `inspect active` and Flower's worker page read.
pub(super) fn request_info(shared: &Shared, r: &ActiveRequest, safe: bool) -> Value {
    let _ = safe; // celeriac always returns the repr strings: kwargs may carry credentials
    json!({
        "id": r.id, "name": r.name, "args": r.argsrepr, "kwargs": r.kwargsrepr, "type": r.task,
        "hostname": shared.config.hostname, "time_start": epoch(r.started), "acknowledged": r.acknowledged,
        "delivery_info": {"exchange": r.exchange, "routing_key": r.routing_key, "priority": r.priority, "redelivered": r.redelivered},
        "worker_pid": std::process::id(),
    })
}

/// kombu `Queue.as_dict(recurse=True)` for a Dagster queue.
pub(super) fn queue_info(name: &str) -> Value {
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

pub(super) fn stats(shared: &Shared) -> Value {
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

pub(super) fn conf(shared: &Shared) -> Value {
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

pub(super) fn report(shared: &Shared) -> String {
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
#[cfg(test)]
mod tests {
    use super::*;

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
