//! Schema-driven key conversion for Kubernetes objects.
//!
//! `k8s_schema.json` holds, for every model reachable from `V1Job`, each attribute's Python name, its
//! JSON (API) name and its type (`V1Container`, `list[V1EnvVar]`, `dict(str, str)`, `str`…), taken from
//! the Kubernetes Python client's `attribute_map`/`openapi_types` — the same tables Dagster relies on.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::{Map, Value};

type Model = HashMap<String, (String, String)>;

fn schema() -> &'static HashMap<String, Model> {
    static SCHEMA: OnceLock<HashMap<String, Model>> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let raw: HashMap<String, HashMap<String, (String, String)>> =
            serde_json::from_str(include_str!("k8s_schema.json")).unwrap_or_default();
        raw
    })
}

/// Converts `value` of Kubernetes type `ty` to API JSON: known attributes (given in snake_case or
/// camelCase) get their JSON names; map values and unknown keys are kept as given; null attributes are
/// dropped, as the Kubernetes client's serializer does.
pub fn to_api(value: &Value, ty: &str) -> Value {
    if let Some(inner) = ty.strip_prefix("list[").and_then(|t| t.strip_suffix(']')) {
        return match value {
            Value::Array(items) => Value::Array(items.iter().map(|i| to_api(i, inner)).collect()),
            other => other.clone(),
        };
    }
    if let Some(inner) = ty
        .strip_prefix("dict(str, ")
        .and_then(|t| t.strip_suffix(')'))
    {
        return match value {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), to_api(v, inner)))
                    .collect(),
            ),
            other => other.clone(),
        };
    }
    let (Some(model), Value::Object(obj)) = (schema().get(ty), value) else {
        return value.clone();
    };
    let mut out = Map::new();
    for (k, v) in obj {
        if v.is_null() {
            continue;
        }
        let found = model
            .get(k)
            .or_else(|| model.values().find(|(json, _)| json == k));
        match found {
            Some((json, inner)) => {
                out.insert(json.clone(), to_api(v, inner));
            }
            None => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_by_schema_and_keeps_map_keys() {
        let container = json!({"image_pull_policy": "Always", "env": [{"name": "A", "value_from": {"secret_key_ref": {"name": "s", "key": "k"}}}],
                               "resources": {"limits": {"nvidia.com/gpu": "1"}, "claims": null}, "securityContext": {"run_as_user": 1}});
        assert_eq!(
            to_api(&container, "V1Container"),
            json!({"imagePullPolicy": "Always", "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                   "resources": {"limits": {"nvidia.com/gpu": "1"}}, "securityContext": {"runAsUser": 1}})
        );
        assert_eq!(
            to_api(
                &json!({"host_ipc": true, "node_selector": {"disk_type": "ssd"}}),
                "V1PodSpec"
            ),
            json!({"hostIPC": true, "nodeSelector": {"disk_type": "ssd"}})
        );
    }
}
