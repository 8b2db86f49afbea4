//! What an execution knows and hands down to each step: output handles, `KnownExecutionState`,
//! `PastExecutionState` and the retry mode (`dagster/_core/execution/plan/state.py`, `retries.py`).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use celeriac_wire::json::python_repr;
use serde_json::{json, Map, Value};

use crate::serdes::{self, Obj, SerdesError};

/// `StepOutputHandle`: one output of one step (`mapping_key` for each `DynamicOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutputHandle {
    pub step_key: String,
    pub output_name: String,
    pub mapping_key: Option<String>,
}

impl OutputHandle {
    pub fn new(step_key: &str, output_name: &str, mapping_key: Option<&str>) -> Self {
        Self {
            step_key: step_key.to_string(),
            output_name: output_name.to_string(),
            mapping_key: mapping_key.map(str::to_string),
        }
    }

    pub fn decode(v: &Value, path: &str) -> Result<Self, SerdesError> {
        let o = Obj::expect(v, &["StepOutputHandle"], path)?;
        Ok(Self {
            step_key: o.str("step_key")?.to_string(),
            // `StepOutputHandle.__new__` defaults the output name to "result".
            output_name: o.opt_str("output_name")?.unwrap_or("result").to_string(),
            mapping_key: o.opt_str("mapping_key")?.map(str::to_string),
        })
    }

    pub fn pack(&self) -> Value {
        json!({"__class__": "StepOutputHandle", "step_key": self.step_key,
               "output_name": self.output_name, "mapping_key": self.mapping_key})
    }

    /// Python's `str()` of the named tuple: the key serdes sorts set items by.
    pub fn python_str(&self) -> String {
        let mapping = match &self.mapping_key {
            Some(k) => python_repr(&Value::String(k.clone())),
            None => "None".into(),
        };
        format!(
            "StepOutputHandle(step_key={}, output_name={}, mapping_key={mapping})",
            python_repr(&Value::String(self.step_key.clone())),
            python_repr(&Value::String(self.output_name.clone())),
        )
    }

    /// `step_key.output_name`, as skip messages name a missing output.
    pub fn dotted(&self) -> String {
        format!("{}.{}", self.step_key, self.output_name)
    }
}

/// Packs a set of handles as serdes does: `{"__set__": [...]}` sorted by `str(handle)`.
pub fn pack_handle_set<'a>(handles: impl IntoIterator<Item = &'a OutputHandle>) -> Value {
    let mut items: Vec<&OutputHandle> = handles.into_iter().collect();
    items.sort_by_cached_key(|h| h.python_str());
    serdes::pack_set(items.into_iter().map(OutputHandle::pack).collect())
}

fn decode_handle_set(v: &Value, path: &str) -> Result<HashSet<OutputHandle>, SerdesError> {
    serdes::set_items(v, path)?
        .iter()
        .enumerate()
        .map(|(i, item)| OutputHandle::decode(item, &format!("{path}[{i}]")))
        .collect()
}

/// `mapping keys` of one dynamic output; `None` when the output was skipped (not the same as empty).
pub type MappingKeys = Option<Vec<String>>;
/// `step_key -> output_name -> mapping keys`.
pub type DynamicMappings = BTreeMap<String, BTreeMap<String, MappingKeys>>;

fn decode_mappings(o: &Obj, field: &str) -> Result<DynamicMappings, SerdesError> {
    let mut out = DynamicMappings::new();
    let Some(steps) = o.dict(field)? else {
        return Ok(out);
    };
    for (step, outputs) in steps {
        let path = format!("{}[{step:?}]", o.path_of(field));
        let Value::Object(outputs) = outputs else {
            return Err(SerdesError::Shape {
                path,
                expected: "dict of output name to mapping keys".into(),
                found: serdes::kind(outputs).into(),
            });
        };
        let mut per_output = BTreeMap::new();
        for (name, keys) in outputs {
            let keys = match keys {
                Value::Null => None,
                Value::Array(items) => Some(
                    items
                        .iter()
                        .map(|k| {
                            k.as_str()
                                .map(str::to_string)
                                .ok_or_else(|| SerdesError::Shape {
                                    path: format!("{path}[{name:?}]"),
                                    expected: "mapping key strings".into(),
                                    found: serdes::kind(k).into(),
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                other => {
                    return Err(SerdesError::Shape {
                        path: format!("{path}[{name:?}]"),
                        expected: "list of mapping keys or None".into(),
                        found: serdes::kind(other).into(),
                    })
                }
            };
            per_output.insert(name.clone(), keys);
        }
        out.insert(step.clone(), per_output);
    }
    Ok(out)
}

fn pack_mappings(m: &DynamicMappings) -> Value {
    let mut steps = Map::new();
    for (step, outputs) in m {
        let mut per_output = Map::new();
        for (name, keys) in outputs {
            per_output.insert(name.clone(), json!(keys));
        }
        steps.insert(step.clone(), Value::Object(per_output));
    }
    Value::Object(steps)
}

/// `PastExecutionState`: outputs produced by an ancestor run, for re-execution. Kept as stored so it is
/// handed down byte for byte; only `produced_outputs` is read.
#[derive(Debug, Clone, PartialEq)]
pub struct PastState {
    pub run_id: String,
    pub produced_outputs: HashSet<OutputHandle>,
    pub parent: Option<Box<PastState>>,
    raw: Value,
}

impl PastState {
    fn decode(v: &Value, path: &str) -> Result<Option<Self>, SerdesError> {
        if v.is_null() {
            return Ok(None);
        }
        let o = Obj::expect(v, &["PastExecutionState"], path)?;
        let parent = match o.get("parent_state") {
            Some(p) => PastState::decode(p, &o.path_of("parent_state"))?.map(Box::new),
            None => None,
        };
        Ok(Some(Self {
            run_id: o.str("run_id")?.to_string(),
            produced_outputs: decode_handle_set(
                o.get("produced_outputs").unwrap_or(&Value::Null),
                &o.path_of("produced_outputs"),
            )?,
            parent,
            raw: v.clone(),
        }))
    }

    /// Whether this run or one of its ancestors produced `handle`.
    pub fn produced(&self, handle: &OutputHandle) -> bool {
        let mut state = Some(self);
        while let Some(s) = state {
            if s.produced_outputs.contains(handle) {
                return true;
            }
            state = s.parent.as_deref();
        }
        false
    }
}

/// `KnownExecutionState`: retries so far, resolved dynamic outputs, outputs ready, and the ancestry of a
/// re-execution. Every step task carries the one current at its submission.
#[derive(Debug, Clone, PartialEq)]
pub struct KnownState {
    pub previous_retry_attempts: BTreeMap<String, i64>,
    pub dynamic_mappings: DynamicMappings,
    /// The stored form (a list of `StepOutputVersionData`), passed through untouched.
    pub step_output_versions: Value,
    pub ready_outputs: HashSet<OutputHandle>,
    pub parent_state: Option<PastState>,
}

/// `KnownExecutionState()`: nothing known. `step_output_versions` is an empty list, as Python packs it
/// (a `null` there makes Python's worker fail to unpack the step's arguments: "'NoneType' object is not
/// iterable").
impl Default for KnownState {
    fn default() -> Self {
        KnownState {
            previous_retry_attempts: BTreeMap::new(),
            dynamic_mappings: DynamicMappings::new(),
            step_output_versions: json!([]),
            ready_outputs: HashSet::new(),
            parent_state: None,
        }
    }
}

impl KnownState {
    pub fn decode(v: &Value, path: &str) -> Result<Self, SerdesError> {
        let o = Obj::expect(v, &["KnownExecutionState"], path)?;
        let mut attempts = BTreeMap::new();
        if let Some(m) = o.dict("previous_retry_attempts")? {
            for (k, n) in m {
                let n = n.as_i64().ok_or_else(|| SerdesError::Shape {
                    path: format!("{}[{k:?}]", o.path_of("previous_retry_attempts")),
                    expected: "int".into(),
                    found: serdes::kind(n).into(),
                })?;
                attempts.insert(k.clone(), n);
            }
        }
        Ok(Self {
            previous_retry_attempts: attempts,
            dynamic_mappings: decode_mappings(&o, "dynamic_mappings")?,
            step_output_versions: match o.get("step_output_versions") {
                None | Some(Value::Null) => json!([]),
                Some(v) => v.clone(),
            },
            ready_outputs: decode_handle_set(
                o.get("ready_outputs").unwrap_or(&Value::Null),
                &o.path_of("ready_outputs"),
            )?,
            parent_state: PastState::decode(
                o.get("parent_state").unwrap_or(&Value::Null),
                &o.path_of("parent_state"),
            )?,
        })
    }

    /// `pack_value(known_state)`.
    pub fn pack(&self) -> Value {
        // `pack_value` order: the class, then the fields as declared.
        json!({
            "__class__": "KnownExecutionState",
            "previous_retry_attempts": self.previous_retry_attempts,
            "dynamic_mappings": pack_mappings(&self.dynamic_mappings),
            "step_output_versions": self.step_output_versions,
            "ready_outputs": pack_handle_set(&self.ready_outputs),
            "parent_state": self.parent_state.as_ref().map(|p| p.raw.clone()),
        })
    }

    /// `serialize_value(known_state)`.
    pub fn to_serdes_string(&self) -> String {
        serdes::to_string(&self.pack())
    }

    /// The sorted keys of the ready outputs (handy for comparisons and logs).
    pub fn ready_outputs_sorted(&self) -> BTreeSet<&OutputHandle> {
        self.ready_outputs.iter().collect()
    }
}

/// `RetryMode`: what happens to a step that asks to be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryMode {
    /// Re-queued by this execution (the run coordinator's mode).
    Enabled,
    /// A retry request is an error.
    Disabled,
    /// Left to the outer engine: the step is abandoned here (the mode a step process runs in).
    Deferred,
}

impl RetryMode {
    /// From the enum member name (`ENABLED`) or the config selector (`enabled`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "enabled" => Some(Self::Enabled),
            "disabled" => Some(Self::Disabled),
            "deferred" => Some(Self::Deferred),
            _ => None,
        }
    }

    /// The member name, as `{"__enum__": "RetryMode.<NAME>"}` stores it.
    pub fn member(self) -> &'static str {
        match self {
            Self::Enabled => "ENABLED",
            Self::Disabled => "DISABLED",
            Self::Deferred => "DEFERRED",
        }
    }

    /// `RetryMode.for_inner_plan`: what a step process is told (enabled → deferred).
    pub fn for_inner_plan(self) -> Self {
        match self {
            Self::Enabled => Self::Deferred,
            other => other,
        }
    }

    pub fn pack(self) -> Value {
        serdes::pack_enum("RetryMode", self.member())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_str_matches_python() {
        let h = OutputHandle::new("a", "result", None);
        assert_eq!(
            h.python_str(),
            "StepOutputHandle(step_key='a', output_name='result', mapping_key=None)"
        );
        let m = OutputHandle::new("it's", "out", Some("k0"));
        assert_eq!(
            m.python_str(),
            "StepOutputHandle(step_key=\"it's\", output_name='out', mapping_key='k0')"
        );
    }

    #[test]
    fn empty_known_state_packs_as_python_does() {
        // serialize_value(KnownExecutionState()) from Dagster 1.13.27 (an empty set unpacks the same
        // from `__set__` or `__frozenset__`). A plan snapshot without `initial_known_state` starts
        // from this; `step_output_versions` was packed as null, which Python's worker cannot unpack.
        let python = r#"{"__class__": "KnownExecutionState", "dynamic_mappings": {}, "parent_state": null, "previous_retry_attempts": {}, "ready_outputs": {"__frozenset__": []}, "step_output_versions": []}"#;
        let packed = KnownState::default().pack();
        assert_eq!(packed["step_output_versions"], json!([]));
        let mut expected: Value = serde_json::from_str(python).expect("json");
        expected["ready_outputs"] = json!({"__set__": []});
        assert_eq!(packed, expected);
        let v = serdes::parse(python.as_bytes()).expect("json");
        assert_eq!(
            KnownState::decode(&v, "known_state").expect("decode"),
            KnownState::default()
        );
    }

    #[test]
    fn known_state_round_trips_in_python_form() {
        // serialize_value(KnownExecutionState(...)) from Dagster 1.13.27.
        let text = r#"{"__class__": "KnownExecutionState", "dynamic_mappings": {"emit": {"result": ["k0", "k1"]}, "opt": {"result": null}}, "parent_state": null, "previous_retry_attempts": {"flaky": 1}, "ready_outputs": {"__set__": [{"__class__": "StepOutputHandle", "mapping_key": null, "output_name": "result", "step_key": "a"}, {"__class__": "StepOutputHandle", "mapping_key": "k0", "output_name": "result", "step_key": "emit"}, {"__class__": "StepOutputHandle", "mapping_key": "k1", "output_name": "result", "step_key": "emit"}]}, "step_output_versions": []}"#;
        let v = serdes::parse(text.as_bytes()).expect("json");
        let k = KnownState::decode(&v, "known_state").expect("decode");
        assert_eq!(k.previous_retry_attempts.get("flaky"), Some(&1));
        assert_eq!(k.dynamic_mappings["opt"]["result"], None);
        assert_eq!(k.ready_outputs.len(), 3);
        assert_eq!(k.to_serdes_string(), text);
    }
}
