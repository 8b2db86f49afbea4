//! Merging the user-defined Kubernetes config of a step (spec §3.1 step 9): the op tag's
//! `UserDefinedDagsterK8sConfig` with the executor's `per_step_k8s_config[step_key]` merged onto it,
//! as `K8sContainerContext.merge` does (`dagster_k8s/container_context.py`).
//!
//! The per-step config is raw user config (camelCase allowed inside the Kubernetes objects); Python
//! snake_cases it against the Kubernetes OpenAPI models before merging. That conversion is
//! schema-driven and belongs to whoever builds Kubernetes objects; [`merge_user_config`] merges the
//! trees as given.

use serde_json::{Map, Value};

/// The top-level keys of `UserDefinedDagsterK8sConfig.to_dict()` (dagster 1.13) holding mappings.
pub const CONFIG_KEYS: [&str; 9] = [
    "container_config",
    "pod_template_spec_metadata",
    "pod_spec_config",
    "job_config",
    "job_metadata",
    "job_spec_config",
    "deployment_metadata",
    "service_metadata",
    "service_spec_config",
];

/// Version skew: keys of [`CONFIG_KEYS`] that older supported releases' `to_dict()` does not send, with
/// the release that added them (`dagster/tests/fixtures/versions/`). A task from such a publisher
/// lacks the key; [`normalize`] fills it with `{}`, as `from_dict` does, so the merge and the Job body
/// are the same as for a newer publisher that sends it empty. (`deployment_metadata`/`service_metadata`
/// came in 1.9 and `merge_behavior` in 1.6, both before the oldest supported release, 1.9.)
pub const CONFIG_KEYS_ADDED: [(&str, &str); 1] = [("service_spec_config", "1.12.0")];

/// Lists that are replaced rather than concatenated (`ALWAYS_SHALLOW_MERGE_LIST_FIELDS`).
const ALWAYS_SHALLOW_MERGE_LIST_FIELDS: [&str; 2] = ["command", "args"];

/// `UserDefinedDagsterK8sConfig.from_dict(d).to_dict()`: every known key present (missing or null → `{}`),
/// `merge_behavior` defaulting to `DEEP`. Unknown keys are dropped, as `from_dict` ignores them.
pub fn normalize(config: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    for key in CONFIG_KEYS {
        let v = match config.get(key) {
            Some(v @ Value::Object(_)) => v.clone(),
            _ => Value::Object(Map::new()),
        };
        out.insert(key.to_string(), v);
    }
    let behavior = config
        .get("merge_behavior")
        .and_then(Value::as_str)
        .unwrap_or("DEEP");
    out.insert("merge_behavior".into(), Value::String(behavior.to_string()));
    out
}

/// `K8sContainerContext(run_k8s_config=tag).merge(K8sContainerContext(run_k8s_config=per_step)).run_k8s_config`,
/// using the per-step config's `merge_behavior`: `DEEP` merges mappings recursively, concatenates and
/// de-duplicates lists (except `command`/`args`, replaced) and replaces scalars; `SHALLOW` merges each
/// top-level mapping one level deep (`{**onto, **from}`).
pub fn merge_user_config(tag: &Value, per_step: &Value) -> Value {
    let onto = normalize(tag);
    let from = normalize(per_step);
    let shallow = from.get("merge_behavior").and_then(Value::as_str) == Some("SHALLOW");
    if shallow {
        let mut merged = Map::new();
        for (key, onto_v) in onto {
            let from_v = from.get(&key).cloned().unwrap_or(Value::Null);
            let v = match (onto_v, from_v) {
                (Value::Object(mut a), Value::Object(b)) => {
                    a.extend(b);
                    Value::Object(a)
                }
                (_, b) => b,
            };
            merged.insert(key, v);
        }
        Value::Object(merged)
    } else {
        Value::Object(deep_merge(onto, from))
    }
}

fn deep_merge(mut onto: Map<String, Value>, from: Map<String, Value>) -> Map<String, Value> {
    for (key, from_v) in from {
        let merged = match (onto.remove(&key), from_v) {
            (None, v) => v,
            (Some(Value::Array(a)), Value::Array(b))
                if !ALWAYS_SHALLOW_MERGE_LIST_FIELDS.contains(&key.as_str()) =>
            {
                let mut out: Vec<Value> = Vec::with_capacity(a.len() + b.len());
                for item in a.into_iter().chain(b) {
                    if !out.contains(&item) {
                        out.push(item);
                    }
                }
                Value::Array(out)
            }
            (Some(Value::Object(a)), Value::Object(b)) => Value::Object(deep_merge(a, b)),
            // Python asserts matching types (check.invariant); replacing is the lenient equivalent.
            (Some(_), v) => v,
        };
        onto.insert(key, merged);
    }
    onto
}

/// The literal `env` entries (`{name, value}`) of a merged config's `container_config`; entries with
/// `value_from`/`valueFrom` (secrets, field refs) have no local value and are skipped.
pub fn literal_container_env(merged: &Value) -> Vec<(String, String)> {
    let Some(Value::Array(entries)) = merged.pointer("/container_config/env") else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let name = e.get("name")?.as_str()?;
            let value = match e.get("value") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => if *b { "True" } else { "False" }.to_string(),
                _ => return None,
            };
            Some((name.to_string(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deep_merge_concatenates_dedupes_and_recurses() {
        let tag = json!({"container_config": {"env": [{"name": "A", "value": "1"}], "args": ["x"], "resources": {"limits": {"cpu": "1"}}}});
        let step = json!({"container_config": {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "args": ["y"],
                          "resources": {"limits": {"memory": "1Gi"}}}});
        let m = merge_user_config(&tag, &step);
        assert_eq!(
            m["container_config"]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        assert_eq!(m["container_config"]["args"], json!(["y"]));
        assert_eq!(
            m["container_config"]["resources"]["limits"],
            json!({"cpu": "1", "memory": "1Gi"})
        );
        assert_eq!(m["pod_spec_config"], json!({}));
        assert_eq!(m["merge_behavior"], json!("DEEP"));
        assert_eq!(
            literal_container_env(&m),
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
    }

    #[test]
    fn shallow_merge_replaces_second_level() {
        let tag = json!({"container_config": {"env": [{"name": "A", "value": "1"}], "image": "i"}});
        let step = json!({"container_config": {"env": [{"name": "B", "value": "2"}]}, "merge_behavior": "SHALLOW"});
        let m = merge_user_config(&tag, &step);
        assert_eq!(
            m["container_config"],
            json!({"env": [{"name": "B", "value": "2"}], "image": "i"})
        );
        assert_eq!(m["merge_behavior"], json!("SHALLOW"));
    }

    #[test]
    fn null_and_missing_configs_are_empty() {
        let m = merge_user_config(&Value::Null, &json!({}));
        assert_eq!(m["container_config"], json!({}));
        assert!(literal_container_env(&m).is_empty());
    }
}
