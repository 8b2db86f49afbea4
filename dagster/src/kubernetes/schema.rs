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

/// Why [`to_snake`] refused a value (Python raises the same cases).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SnakeCaseError {
    #[error("Unexpected keys in model class {model}: {keys:?}")]
    UnknownKeys { model: String, keys: Vec<String> },
    #[error("Model class {model} cannot contain both {camel} and {snake} keys")]
    BothForms {
        model: String,
        camel: String,
        snake: String,
    },
    #[error("Attribute {attr} of type {model} must be a dict (or list), received {value} instead")]
    NotADict {
        attr: String,
        model: String,
        value: String,
    },
}

/// Port of `dagster_k8s.models.k8s_snake_case_dict(model_class, value)`: camelCase attribute names become
/// their Python names, recursively by type; map keys stay as given; unknown attributes are refused.
pub fn to_snake(
    value: &Map<String, Value>,
    ty: &str,
) -> Result<Map<String, Value>, SnakeCaseError> {
    let Some(model) = schema().get(ty) else {
        return Ok(value.clone());
    };
    let mut snake = Map::new();
    for (key, v) in value {
        let name = model
            .iter()
            .find(|(_, (json, _))| json == key)
            .map_or(key.as_str(), |(py, _)| py.as_str());
        if name != key && value.contains_key(name) {
            return Err(SnakeCaseError::BothForms {
                model: ty.to_string(),
                camel: key.clone(),
                snake: name.to_string(),
            });
        }
        snake.insert(name.to_string(), v.clone());
    }
    let unknown: Vec<String> = snake
        .keys()
        .filter(|k| !model.contains_key(*k))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(SnakeCaseError::UnknownKeys {
            model: ty.to_string(),
            keys: unknown,
        });
    }
    let mut out = Map::new();
    for (key, v) in snake {
        let attr_type = &model[&key].1;
        let converted = snake_value(&v, attr_type, &key)?;
        out.insert(key, converted);
    }
    Ok(out)
}

fn snake_value(v: &Value, ty: &str, attr: &str) -> Result<Value, SnakeCaseError> {
    if let Some(inner) = ty.strip_prefix("list[").and_then(|t| t.strip_suffix(']')) {
        let Value::Array(items) = v else {
            return Err(SnakeCaseError::NotADict {
                attr: attr.to_string(),
                model: ty.to_string(),
                value: celeriac_wire::json::python_repr(v),
            });
        };
        return items
            .iter()
            .enumerate()
            .map(|(i, item)| snake_value(item, inner, &format!("{attr}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array);
    }
    if let Some(inner) = ty
        .strip_prefix("dict(str, ")
        .and_then(|t| t.strip_suffix(')'))
    {
        let Value::Object(m) = v else {
            return Err(SnakeCaseError::NotADict {
                attr: attr.to_string(),
                model: ty.to_string(),
                value: celeriac_wire::json::python_repr(v),
            });
        };
        let mut out = Map::new();
        for (k, item) in m {
            out.insert(
                k.clone(),
                snake_value(item, inner, &format!("{attr}[{k}]"))?,
            );
        }
        return Ok(Value::Object(out));
    }
    if !schema().contains_key(ty) {
        // Primitive types (`str`, `int`, `object`, `datetime`…) pass through.
        return Ok(v.clone());
    }
    match v {
        Value::Object(m) => to_snake(m, ty).map(Value::Object),
        other => Err(SnakeCaseError::NotADict {
            attr: attr.to_string(),
            model: ty.to_string(),
            value: celeriac_wire::json::python_repr(other),
        }),
    }
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

    #[test]
    fn snake_cases_like_dagster_k8s() {
        let container = json!({"imagePullPolicy": "Always", "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                               "resources": {"limits": {"nvidia.com/gpu": "1"}}});
        let Value::Object(m) = container else {
            unreachable!()
        };
        assert_eq!(
            Value::Object(to_snake(&m, "V1Container").expect("valid")),
            json!({"image_pull_policy": "Always", "env": [{"name": "A", "value_from": {"secret_key_ref": {"name": "s", "key": "k"}}}],
                   "resources": {"limits": {"nvidia.com/gpu": "1"}}})
        );
        let bad = json!({"imagePullPolicy": "x", "image_pull_policy": "y"});
        let Value::Object(b) = bad else {
            unreachable!()
        };
        assert!(matches!(
            to_snake(&b, "V1Container"),
            Err(SnakeCaseError::BothForms { .. })
        ));
        let unknown = json!({"nope": 1});
        let Value::Object(u) = unknown else {
            unreachable!()
        };
        assert!(matches!(
            to_snake(&u, "V1Container"),
            Err(SnakeCaseError::UnknownKeys { .. })
        ));
        let not_dict = json!({"resources": "big"});
        let Value::Object(n) = not_dict else {
            unreachable!()
        };
        assert!(matches!(
            to_snake(&n, "V1Container"),
            Err(SnakeCaseError::NotADict { .. })
        ));
    }
}
