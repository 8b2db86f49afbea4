//! Task messages as a Celery client publishes them (protocol v2, `celery/app/amqp.py::as_task_v2` and
//! `send_task_message`): the headers in Celery's order, the `[args, kwargs, embed]` body, and the
//! properties (`correlation_id` = task id, `reply_to`, persistent delivery, priority).
//!
//! The run coordinator publishes Dagster's step tasks with it, so a worker (Python or celeriac) sees
//! exactly what `apply_async` would have sent.

use serde_json::{json, Map, Value};

use crate::broker::OutgoingMessage;
use crate::json::to_python_string;
use crate::message::Properties;

/// One task to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub id: String,
    /// Registered task name (`execute_step_k8s_job`).
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// `saferepr(args)` / `saferepr(kwargs)` as Celery computes them (display only).
    pub argsrepr: String,
    pub kwargsrepr: String,
    /// `<pid>@<host>` of the publisher.
    pub origin: String,
    /// Where `rpc://` results go (`None` when the backend is not rpc and no reply is wanted).
    pub reply_to: Option<String>,
    pub priority: Option<u8>,
    /// `root_id` (the task itself when `None`) and `parent_id`.
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
}

impl TaskMessage {
    /// The protocol-v2 headers, in the order Celery writes them.
    pub fn headers(&self) -> Map<String, Value> {
        let mut h = Map::new();
        h.insert("lang".into(), json!("py"));
        h.insert("task".into(), json!(self.task));
        h.insert("id".into(), json!(self.id));
        h.insert("shadow".into(), Value::Null);
        h.insert("eta".into(), Value::Null);
        h.insert("expires".into(), Value::Null);
        h.insert("group".into(), Value::Null);
        h.insert("group_index".into(), Value::Null);
        h.insert("retries".into(), json!(0));
        h.insert("timelimit".into(), json!([null, null]));
        h.insert(
            "root_id".into(),
            json!(self.root_id.as_deref().unwrap_or(&self.id)),
        );
        h.insert("parent_id".into(), json!(self.parent_id));
        h.insert("argsrepr".into(), json!(self.argsrepr));
        h.insert("kwargsrepr".into(), json!(self.kwargsrepr));
        h.insert("origin".into(), json!(self.origin));
        h.insert("ignore_result".into(), json!(false));
        h.insert("replaced_task_nesting".into(), json!(0));
        h.insert("stamped_headers".into(), Value::Null);
        h.insert("stamps".into(), json!({}));
        h
    }

    /// The body: `[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]`, serialized as kombu's
    /// `json.dumps` does (insertion order, Python separators).
    pub fn body(&self) -> String {
        let embed = json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null});
        to_python_string(
            &json!([self.args, Value::Object(self.kwargs.clone()), embed]),
            false,
        )
    }

    /// The message to hand to [`crate::broker::Broker::publish`] (default exchange, routing key = queue).
    pub fn to_outgoing(&self) -> OutgoingMessage {
        let mut out = OutgoingMessage::json(self.body());
        out.headers = self.headers();
        out.properties = Properties {
            correlation_id: Some(self.id.clone()),
            reply_to: self.reply_to.clone(),
            delivery_mode: Some(2),
            priority: self.priority,
            expiration: None,
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{decode, RawMessage};

    #[test]
    fn published_message_decodes_as_a_celery_worker_reads_it() {
        let mut kwargs = Map::new();
        kwargs.insert("x".into(), json!(1));
        let t = TaskMessage {
            id: "abc".into(),
            task: "execute_step_k8s_job".into(),
            args: vec![],
            kwargs,
            argsrepr: "()".into(),
            kwargsrepr: "{'x': 1}".into(),
            origin: "1@host".into(),
            reply_to: Some("reply".into()),
            priority: Some(7),
            root_id: None,
            parent_id: None,
        };
        let out = t.to_outgoing();
        assert_eq!(
            String::from_utf8_lossy(&out.body),
            r#"[[], {"x": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        let keys: Vec<&String> = out.headers.keys().collect();
        assert_eq!(keys[..3], ["lang", "task", "id"]);
        let raw = RawMessage {
            body: out.body.clone(),
            content_type: out.content_type.clone(),
            content_encoding: out.content_encoding.clone(),
            headers: out.headers.clone(),
            properties: out.properties.clone(),
            ..Default::default()
        };
        let req = decode(&raw, &["application/json".to_string()], None).expect("decodes");
        assert_eq!(req.id, "abc");
        assert_eq!(req.root_id.as_deref(), Some("abc"));
        assert_eq!(req.kwargs["x"], json!(1));
        assert_eq!(req.reply_to.as_deref(), Some("reply"));
    }
}
