//! Remote-control commands as types: what `celery inspect`, `celery control`, Flower and Dagster send,
//! read once from the request's `method` and `arguments` (the names and argument shapes of
//! `celery/worker/control.py`), so a worker matches on an enum instead of strings and each command's
//! arguments are checked in one place.

use serde_json::{Map, Value};

/// One remote-control command with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlCommand {
    Ping,
    Clock,
    /// Another node's greeting: its name and the task ids it holds revoked (a list, or a dict keyed by id).
    Hello {
        from_node: Option<String>,
        revoked: Vec<String>,
    },
    Heartbeat,
    EnableEvents,
    DisableEvents,
    Stats,
    Active,
    Reserved,
    Scheduled,
    Revoked,
    Registered,
    ActiveQueues,
    Conf,
    Report,
    /// `ids`: a list, or one id.
    QueryTask {
        ids: Vec<String>,
    },
    /// `revoke` (with `terminate=True` from the API or `--terminate`) and `terminate`.
    Revoke {
        task_ids: Vec<String>,
        terminate: bool,
    },
    AddConsumer {
        queue: String,
    },
    CancelConsumer {
        queue: String,
    },
    /// `pool_grow` (positive) and `pool_shrink` (negative) by `n` (default 1).
    PoolResize {
        delta: i64,
    },
    Autoscale {
        max: i64,
        min: i64,
    },
    RateLimit {
        task_name: String,
    },
    TimeLimit {
        task_name: String,
    },
    PoolRestart,
    Shutdown,
}

impl ControlCommand {
    /// Reads `method` with its `arguments`. The error is the text of the `{"error": …}` reply Celery
    /// would give: `KeyError('<method>')` for an unknown command, or which argument is missing.
    pub fn parse(method: &str, args: &Map<String, Value>) -> Result<ControlCommand, String> {
        use ControlCommand::*;
        let queue = |what: &str| {
            str_arg(args, "queue")
                .map(str::to_owned)
                .ok_or_else(|| format!("{what} needs a queue"))
        };
        let task_name = || str_arg(args, "task_name").unwrap_or_default().to_string();
        Ok(match method {
            "ping" => Ping,
            "clock" => Clock,
            "hello" => Hello {
                from_node: str_arg(args, "from_node").map(str::to_owned),
                revoked: match args.get("revoked") {
                    Some(Value::Object(m)) => m.keys().cloned().collect(),
                    Some(list @ Value::Array(_)) => strings(Some(list)),
                    _ => Vec::new(),
                },
            },
            "heartbeat" => Heartbeat,
            "enable_events" => EnableEvents,
            "disable_events" => DisableEvents,
            "stats" => Stats,
            "active" => Active,
            "reserved" => Reserved,
            "scheduled" => Scheduled,
            "revoked" => Revoked,
            "registered" => Registered,
            "active_queues" => ActiveQueues,
            "conf" => Conf,
            "report" => Report,
            "query_task" => QueryTask {
                ids: strings(args.get("ids")),
            },
            "revoke" | "terminate" => Revoke {
                task_ids: strings(args.get("task_id")),
                terminate: method == "terminate"
                    || args
                        .get("terminate")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
            },
            "add_consumer" => AddConsumer {
                queue: queue("add_consumer")?,
            },
            "cancel_consumer" => CancelConsumer {
                queue: queue("cancel_consumer")?,
            },
            "pool_grow" | "pool_shrink" => {
                let n = args.get("n").and_then(Value::as_i64).unwrap_or(1).max(0);
                PoolResize {
                    delta: if method == "pool_grow" { n } else { -n },
                }
            }
            "autoscale" => Autoscale {
                max: args
                    .get("max")
                    .and_then(Value::as_i64)
                    .ok_or("autoscale needs max")?,
                min: args.get("min").and_then(Value::as_i64).unwrap_or(0),
            },
            "rate_limit" => RateLimit {
                task_name: task_name(),
            },
            "time_limit" => TimeLimit {
                task_name: task_name(),
            },
            "pool_restart" => PoolRestart,
            "shutdown" => Shutdown,
            other => return Err(format!("KeyError('{other}')")),
        })
    }
}

fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

/// A list of strings, or one string (the API sends one id where the CLI sends a list).
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(method: &str, args: Value) -> Result<ControlCommand, String> {
        ControlCommand::parse(method, args.as_object().expect("an object"))
    }

    #[test]
    fn arguments_in_the_shapes_clients_send() {
        assert_eq!(
            parse("revoke", json!({"task_id": "a", "terminate": true})),
            Ok(ControlCommand::Revoke {
                task_ids: vec!["a".into()],
                terminate: true
            })
        );
        assert_eq!(
            parse(
                "terminate",
                json!({"task_id": ["a", "b"], "signal": "SIGTERM"})
            ),
            Ok(ControlCommand::Revoke {
                task_ids: vec!["a".into(), "b".into()],
                terminate: true
            })
        );
        assert_eq!(
            parse("hello", json!({"from_node": "w@h", "revoked": {"x": 1}})),
            Ok(ControlCommand::Hello {
                from_node: Some("w@h".into()),
                revoked: vec!["x".into()]
            })
        );
        assert_eq!(
            parse("pool_shrink", json!({"n": 3})),
            Ok(ControlCommand::PoolResize { delta: -3 })
        );
        assert_eq!(
            parse("pool_grow", json!({})),
            Ok(ControlCommand::PoolResize { delta: 1 })
        );
        assert_eq!(
            parse("query_task", json!({"ids": "t"})),
            Ok(ControlCommand::QueryTask {
                ids: vec!["t".into()]
            })
        );
    }

    #[test]
    fn missing_arguments_and_unknown_methods_say_so() {
        assert_eq!(
            parse("add_consumer", json!({})),
            Err("add_consumer needs a queue".into())
        );
        assert_eq!(
            parse("autoscale", json!({"min": 1})),
            Err("autoscale needs max".into())
        );
        assert_eq!(
            parse("dump_tasks", json!({})),
            Err("KeyError('dump_tasks')".into())
        );
    }
}
