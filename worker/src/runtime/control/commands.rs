//! One handler per remote-control command. A handler returns the reply's value, or the text of an
//! `{"error": …}` reply: commands that have no meaning for Dagster steps say so instead of pretending.

use std::sync::Arc;

use celeriac_wire::pidbox::ControlCommand;
use serde_json::{json, Map, Value};
use tracing::info;

use super::replies::{conf, queue_info, report, request_info, stats};
use crate::config::{AckPolicy, QueueConfig};
use crate::runtime::shared::Shared;

/// Runs `command` (every command but `shutdown`, which ends the worker without a reply).
pub(super) fn handle(shared: &Arc<Shared>, command: ControlCommand) -> Result<Value, String> {
    use ControlCommand::*;
    let state = &shared.state;
    Ok(match command {
        Ping => json!({"ok": "pong"}),
        Clock => json!({"clock": shared.events.clock().value()}),
        Hello { from_node, revoked } => hello(shared, from_node.as_deref(), &revoked),
        Heartbeat => {
            shared.events.heartbeat_now(state, 5.0);
            Value::Null
        }
        EnableEvents => {
            let was = shared.events.set_task_events(true);
            json!({"ok": if was { "task events already enabled" } else { "task events enabled" }})
        }
        DisableEvents => {
            let was = shared.events.set_task_events(false);
            json!({"ok": if was { "task events disabled" } else { "task events already disabled" }})
        }
        Stats => stats(shared),
        Active => Value::Array(
            state
                .active()
                .iter()
                .map(|r| request_info(shared, r, true))
                .collect(),
        ),
        Reserved | Scheduled => json!([]),
        Revoked => json!(state.revoked_ids()),
        Registered => json!(shared.registry.names()),
        ActiveQueues => Value::Array(
            shared
                .queues
                .all()
                .iter()
                .map(|q| queue_info(&q.config.name))
                .collect(),
        ),
        Conf => conf(shared),
        Report => json!({"ok": report(shared)}),
        QueryTask { ids } => query_task(shared, &ids),
        Revoke {
            task_ids,
            terminate,
        } => revoke(shared, &task_ids, terminate),
        AddConsumer { queue } => add_consumer(shared, queue),
        CancelConsumer { queue } => {
            shared.cancel_queue(&queue);
            info!(%queue, "remote control: cancel consumer");
            json!({"ok": format!("no longer consuming from {queue}")})
        }
        PoolResize { delta } => {
            let limits = shared.queues.resize(delta);
            let method = if delta >= 0 {
                "pool_grow"
            } else {
                "pool_shrink"
            };
            info!(?limits, "remote control: {method}");
            json!({"ok": if delta >= 0 { "pool will grow" } else { "pool will shrink" }})
        }
        Autoscale { max, min } => {
            // Per-queue concurrency is the pool: set every queue's limit to `max`.
            for q in shared.queues.all() {
                shared
                    .queues
                    .resize_one(&q.config.name, max.max(1) as usize);
            }
            json!({"ok": format!("autoscale now max={max} min={min}")})
        }
        RateLimit { task_name } => {
            known_task(shared, &task_name)?;
            return Err("rate limits are not supported by celeriac: a queue's steps are limited by its concurrency (pool_grow/pool_shrink, queue_concurrency)".into());
        }
        TimeLimit { task_name } => {
            known_task(shared, &task_name)?;
            return Err("time limits are not supported by celeriac: a step's limit is Dagster's job_wait_timeout".into());
        }
        PoolRestart => {
            return Err(
                "pool_restart is not supported by celeriac: there is no Python pool to reload"
                    .into(),
            )
        }
        Shutdown => return Err("shutdown is handled before any reply".into()),
    })
}

fn known_task(shared: &Shared, name: &str) -> Result<(), String> {
    match shared.registry.get(name) {
        Some(_) => Ok(()),
        None => Err("unknown task".into()),
    }
}

/// A peer's greeting: adopt its revoked ids and answer with ours (nothing to our own greeting).
fn hello(shared: &Shared, from_node: Option<&str>, revoked: &[String]) -> Value {
    if from_node == Some(shared.config.hostname.as_str()) {
        return Value::Null;
    }
    for id in revoked {
        shared.state.revoke(id);
    }
    json!({"revoked": shared.state.revoked_ids(), "clock": shared.events.clock().value()})
}

fn query_task(shared: &Shared, ids: &[String]) -> Value {
    let mut out = Map::new();
    for r in shared.state.active() {
        if ids.contains(&r.id) {
            out.insert(
                r.id.clone(),
                json!(["active", request_info(shared, &r, true)]),
            );
        }
    }
    Value::Object(out)
}

/// Flags the ids as revoked (a later delivery is dropped) and, with `terminate`, stops the running
/// ones (their step Jobs are deleted by the task).
fn revoke(shared: &Shared, ids: &[String], terminate: bool) -> Value {
    let state = &shared.state;
    for id in ids {
        state.revoke(id);
    }
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
        json!({"ok": format!("tasks {} flagged as revoked", py_set(ids))})
    }
}

/// Starts consuming `queue` with the first queue's concurrency and ack policy.
fn add_consumer(shared: &Arc<Shared>, queue: String) -> Value {
    let first = shared.config.queues.first();
    let concurrency = first.map(|q| q.concurrency).unwrap_or(1);
    let ack = first.map(|q| q.ack).unwrap_or(AckPolicy::Late);
    if crate::runtime::consumer::start(
        shared,
        QueueConfig {
            name: queue.clone(),
            concurrency,
            ack,
        },
    ) {
        info!(%queue, "remote control: add consumer");
        json!({"ok": format!("add consumer {queue}")})
    } else {
        json!({"ok": format!("already consuming from {queue}")})
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_set_repr() {
        assert_eq!(py_set(&["a".into()]), "{'a'}");
        assert_eq!(py_set(&["a".into(), "b".into()]), "{'a', 'b'}");
    }
}
