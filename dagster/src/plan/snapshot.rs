//! `ExecutionPlanSnapshot` as Dagster stores it (`dagster/_core/snap/execution_plan_snapshot.py`): the
//! steps, their inputs' sources and their outputs' properties, as much as scheduling needs.
//!
//! Every class that decides scheduling is read strictly: an unknown step-input source, handle or enum
//! is an error naming the class and where it sits, never a silent guess.

use std::collections::BTreeMap;

use serde_json::Value;

use super::state::{KnownState, OutputHandle};
use crate::serdes::{self, Obj, SerdesError};

/// `StepKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Compute,
    /// Downstream of a dynamic output: becomes one step per mapping key.
    UnresolvedMapped,
    /// Collects a dynamic output (or is downstream of one): becomes one step once it resolves.
    UnresolvedCollect,
}

/// A step's handle. Keys: `node`, `node[?]` (unresolved) and `node[mapping_key]` (resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepHandle {
    Plain {
        node: String,
        key: String,
    },
    Unresolved {
        node: String,
    },
    Resolved {
        node: String,
        mapping_key: String,
        key: String,
    },
}

impl StepHandle {
    pub fn key(&self) -> String {
        match self {
            StepHandle::Plain { key, .. } | StepHandle::Resolved { key, .. } => key.clone(),
            StepHandle::Unresolved { node } => format!("{node}[?]"),
        }
    }

    /// `UnresolvedStepHandle.resolve(map_key)`.
    pub fn resolved(node: &str, mapping_key: &str) -> StepHandle {
        StepHandle::Resolved {
            node: node.to_string(),
            mapping_key: mapping_key.to_string(),
            key: format!("{node}[{mapping_key}]"),
        }
    }

    fn decode(v: &Value, path: &str) -> Result<Self, SerdesError> {
        let o = Obj::expect(
            v,
            &[
                "StepHandle",
                "UnresolvedStepHandle",
                "ResolvedFromDynamicStepHandle",
            ],
            path,
        )?;
        let node = node_handle(o.field("solid_handle")?, &o.path_of("solid_handle"))?;
        Ok(match o.class {
            "StepHandle" => StepHandle::Plain {
                key: o
                    .opt_str("key")?
                    .map_or_else(|| node.clone(), str::to_string),
                node,
            },
            "UnresolvedStepHandle" => StepHandle::Unresolved { node },
            _ => {
                let mapping_key = o.str("mapping_key")?.to_string();
                StepHandle::Resolved {
                    key: o
                        .opt_str("key")?
                        .map_or_else(|| format!("{node}[{mapping_key}]"), str::to_string),
                    node,
                    mapping_key,
                }
            }
        })
    }
}

/// `str(NodeHandle)`: `parent.child`.
fn node_handle(v: &Value, path: &str) -> Result<String, SerdesError> {
    let o = Obj::expect(v, &["SolidHandle", "NodeHandle"], path)?;
    let name = o.str("name")?;
    match o.get("parent") {
        None | Some(Value::Null) => Ok(name.to_string()),
        Some(parent) => Ok(format!(
            "{}.{name}",
            node_handle(parent, &o.path_of("parent"))?
        )),
    }
}

/// Where a step input's value comes from (`StepInputSource` and the unresolved sources).
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// `FromStepOutput`.
    StepOutput(OutputHandle),
    /// `FromMultipleSources` (fan-in; `load_single` for `FromMultipleSourcesLoadSingleSource`).
    Multiple {
        sources: Vec<Source>,
        load_single: bool,
    },
    /// `FromSourceAsset`: no output dependency, but ordering after these steps.
    Ordering(Vec<String>),
    /// `FromConfig`, `FromDefaultValue`, `FromDirectInputValue`, `FromRootInputManager`.
    Independent,
    /// `FromPendingDynamicStepOutput`: directly downstream of a dynamic output.
    PendingDynamic(OutputHandle),
    /// `FromUnresolvedStepOutput`: downstream of a step that is itself mapped.
    Unresolved {
        /// Node handle of the unresolved upstream step (`m` for `m[?]`).
        node: String,
        output_name: String,
        resolved_by_step_key: String,
        resolved_by_output_name: String,
    },
    /// `FromDynamicCollect` over a pending or unresolved source.
    DynamicCollect(Box<Source>),
}

const SOURCES: &[&str] = &[
    "FromStepOutput",
    "FromMultipleSources",
    "FromMultipleSourcesLoadSingleSource",
    "FromSourceAsset",
    "FromLoadableAsset",
    "FromConfig",
    "FromDefaultValue",
    "FromDirectInputValue",
    "FromRootInputManager",
    "FromInputManager",
    "FromPendingDynamicStepOutput",
    "FromUnresolvedStepOutput",
    "FromDynamicCollect",
];

impl Source {
    fn decode(v: &Value, path: &str) -> Result<Self, SerdesError> {
        let o = Obj::expect(v, SOURCES, path)?;
        Ok(match o.class {
            "FromStepOutput" => Source::StepOutput(OutputHandle::decode(
                o.field("step_output_handle")?,
                &o.path_of("step_output_handle"),
            )?),
            "FromMultipleSources" | "FromMultipleSourcesLoadSingleSource" => {
                if let Some(load) = o.get("source_to_load_from") {
                    // Not needed for scheduling, but a class Dagster would not load is an error here too.
                    Source::decode(load, &o.path_of("source_to_load_from"))?;
                }
                Source::Multiple {
                    sources: o
                        .list("sources")?
                        .iter()
                        .enumerate()
                        .map(|(i, s)| Source::decode(s, &format!("{}[{i}]", o.path_of("sources"))))
                        .collect::<Result<_, _>>()?,
                    load_single: o.class == "FromMultipleSourcesLoadSingleSource",
                }
            }
            "FromSourceAsset" | "FromLoadableAsset" => {
                let keys = match o.get("ordering_step_keys") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(v) => serdes::set_items(v, &o.path_of("ordering_step_keys"))?
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect(),
                };
                Source::Ordering(keys)
            }
            "FromPendingDynamicStepOutput" => Source::PendingDynamic(OutputHandle::decode(
                o.field("step_output_handle")?,
                &o.path_of("step_output_handle"),
            )?),
            "FromUnresolvedStepOutput" => {
                let path = o.path_of("unresolved_step_output_handle");
                let h = Obj::expect(
                    o.field("unresolved_step_output_handle")?,
                    &["UnresolvedStepOutputHandle"],
                    &path,
                )?;
                let step = StepHandle::decode(
                    h.field("unresolved_step_handle")?,
                    &h.path_of("unresolved_step_handle"),
                )?;
                let StepHandle::Unresolved { node } = step else {
                    return Err(SerdesError::Shape {
                        path: h.path_of("unresolved_step_handle"),
                        expected: "UnresolvedStepHandle".into(),
                        found: format!("{step:?}"),
                    });
                };
                Source::Unresolved {
                    node,
                    output_name: h.str("output_name")?.to_string(),
                    resolved_by_step_key: h.str("resolved_by_step_key")?.to_string(),
                    resolved_by_output_name: h.str("resolved_by_output_name")?.to_string(),
                }
            }
            "FromDynamicCollect" => {
                let inner = Source::decode(o.field("source")?, &o.path_of("source"))?;
                if !matches!(inner, Source::PendingDynamic(_) | Source::Unresolved { .. }) {
                    return Err(SerdesError::Shape {
                        path: o.path_of("source"),
                        expected: "FromPendingDynamicStepOutput or FromUnresolvedStepOutput".into(),
                        found: format!("{inner:?}"),
                    });
                }
                Source::DynamicCollect(Box::new(inner))
            }
            _ => Source::Independent,
        })
    }

    /// `step_key_dependencies`, in first-seen order.
    pub fn step_key_dependencies(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        let mut push = |k: &str| {
            if !keys.iter().any(|x| x == k) {
                keys.push(k.to_string());
            }
        };
        match self {
            Source::StepOutput(h) => push(&h.step_key),
            Source::Multiple { sources, .. } => {
                for s in sources {
                    for k in s.step_key_dependencies() {
                        push(&k);
                    }
                }
            }
            Source::Ordering(ks) => ks.iter().for_each(|k| push(k)),
            _ => {}
        }
        keys
    }

    /// `step_output_handle_dependencies`, in order.
    pub fn output_handle_dependencies(&self) -> Vec<OutputHandle> {
        match self {
            Source::StepOutput(h) => vec![h.clone()],
            Source::Multiple { sources, .. } => sources
                .iter()
                .flat_map(Source::output_handle_dependencies)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the source is unresolved (pending dynamic, unresolved or collect).
    pub fn is_unresolved(&self) -> bool {
        matches!(
            self,
            Source::PendingDynamic(_) | Source::Unresolved { .. } | Source::DynamicCollect(_)
        )
    }

    /// `(resolved_by_step_key, resolved_by_output_name)` of an unresolved source.
    pub fn resolved_by(&self) -> Option<(&str, &str)> {
        match self {
            Source::PendingDynamic(h) => Some((&h.step_key, &h.output_name)),
            Source::Unresolved {
                resolved_by_step_key,
                resolved_by_output_name,
                ..
            } => Some((resolved_by_step_key, resolved_by_output_name)),
            Source::DynamicCollect(inner) => inner.resolved_by(),
            _ => None,
        }
    }

    /// The upstream handle with a placeholder (`get_step_output_handle_dep_with_placeholder`).
    pub fn placeholder_handle(&self) -> Option<OutputHandle> {
        match self {
            Source::PendingDynamic(h) => Some(h.clone()),
            Source::Unresolved {
                node, output_name, ..
            } => Some(OutputHandle::new(&format!("{node}[?]"), output_name, None)),
            Source::DynamicCollect(inner) => inner.placeholder_handle(),
            _ => None,
        }
    }

    /// Resolves a mapped source for one mapping key (`FromPendingDynamicStepOutput.resolve`,
    /// `FromUnresolvedStepOutput.resolve`). Other sources are returned as they are.
    pub fn resolve_mapped(&self, mapping_key: &str) -> Source {
        match self {
            Source::PendingDynamic(h) => Source::StepOutput(OutputHandle::new(
                &h.step_key,
                &h.output_name,
                Some(mapping_key),
            )),
            Source::Unresolved {
                node, output_name, ..
            } => Source::StepOutput(OutputHandle::new(
                &format!("{node}[{mapping_key}]"),
                output_name,
                None,
            )),
            other => other.clone(),
        }
    }

    /// Resolves a collect source with the mapping keys of its dynamic output
    /// (`FromDynamicCollect.resolve`): `None` (the output was skipped) depends on the dynamic output
    /// itself so the skip cascades.
    pub fn resolve_collect(&self, mapping_keys: Option<&[String]>) -> Source {
        let Source::DynamicCollect(inner) = self else {
            return self.clone();
        };
        match mapping_keys {
            None => {
                let (step, output) = inner.resolved_by().unwrap_or_default();
                Source::StepOutput(OutputHandle::new(step, output, None))
            }
            Some(keys) => Source::Multiple {
                sources: keys.iter().map(|k| inner.resolve_mapped(k)).collect(),
                load_single: false,
            },
        }
    }
}

/// One input of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSnap {
    pub name: String,
    pub source: Source,
}

/// One output of a step and the properties scheduling reads.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSnap {
    pub name: String,
    pub is_required: bool,
    pub is_dynamic: bool,
    /// The output carries an asset check's result (such outputs never gate downstream steps).
    pub is_asset_check: bool,
}

/// One step of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSnap {
    pub key: String,
    pub kind: StepKind,
    pub handle: StepHandle,
    pub inputs: Vec<InputSnap>,
    pub outputs: Vec<OutputSnap>,
    pub tags: BTreeMap<String, String>,
    pub pool: Option<String>,
}

impl StepSnap {
    fn decode(v: &Value, path: &str) -> Result<Self, SerdesError> {
        let o = Obj::expect(v, &["ExecutionStepSnap"], path)?;
        let key = o.str("key")?.to_string();
        let kind = decode_kind(&o)?;
        let handle = decode_handle(&o, kind)?;
        let inputs = decode_inputs(&o)?;
        let outputs = decode_outputs(&o)?;
        let tags = decode_tags(&o)?;
        Ok(StepSnap {
            key,
            kind,
            handle,
            inputs,
            outputs,
            tags,
            pool: o.opt_str("pool")?.map(str::to_string),
        })
    }

    pub fn output(&self, name: &str) -> Option<&OutputSnap> {
        self.outputs.iter().find(|o| o.name == name)
    }
}

/// `kind`: the step's `StepKind` (Dagster's old name `UNRESOLVED` accepted).
fn decode_kind(o: &Obj) -> Result<StepKind, SerdesError> {
    let kind_path = o.path_of("kind");
    let kind = match serdes::enum_member(o.field("kind")?, "StepKind", &kind_path)? {
        "COMPUTE" => StepKind::Compute,
        // "UNRESOLVED" is the old name of UNRESOLVED_MAPPED (StepKindSerializer).
        "UNRESOLVED_MAPPED" | "UNRESOLVED" => StepKind::UnresolvedMapped,
        "UNRESOLVED_COLLECT" => StepKind::UnresolvedCollect,
        other => {
            return Err(SerdesError::UnknownClass {
                class: format!("StepKind.{other}"),
                path: kind_path,
                known: "StepKind.COMPUTE, StepKind.UNRESOLVED_MAPPED, StepKind.UNRESOLVED_COLLECT"
                    .into(),
            })
        }
    };
    Ok(kind)
}

/// `step_handle`, which must exist (Dagster 0.12 on) and fit the step's kind.
fn decode_handle(o: &Obj, kind: StepKind) -> Result<StepHandle, SerdesError> {
    let handle = match o.get("step_handle") {
        None | Some(Value::Null) => {
            return Err(SerdesError::Shape {
                path: o.path_of("step_handle"),
                expected: "a step handle (snapshots older than Dagster 0.12 cannot be rebuilt)"
                    .into(),
                found: "None".into(),
            })
        }
        Some(h) => StepHandle::decode(h, &o.path_of("step_handle"))?,
    };
    let handle_fits = matches!(
        (kind, &handle),
        (
            StepKind::Compute,
            StepHandle::Plain { .. } | StepHandle::Resolved { .. }
        ) | (StepKind::UnresolvedMapped, StepHandle::Unresolved { .. })
            | (StepKind::UnresolvedCollect, StepHandle::Plain { .. })
    );
    if !handle_fits {
        return Err(SerdesError::Shape {
            path: o.path_of("step_handle"),
            expected: format!("a handle for a {kind:?} step"),
            found: format!("{handle:?}"),
        });
    }
    Ok(handle)
}

/// `inputs`, each with its source.
fn decode_inputs(o: &Obj) -> Result<Vec<InputSnap>, SerdesError> {
    o.list("inputs")?
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let ipath = format!("{}[{i}]", o.path_of("inputs"));
            let io = Obj::expect(input, &["ExecutionStepInputSnap"], &ipath)?;
            let source = match io.get("source") {
                None | Some(Value::Null) => {
                    return Err(SerdesError::Shape {
                        path: io.path_of("source"),
                        expected: "a step input source".into(),
                        found: "None".into(),
                    })
                }
                Some(s) => Source::decode(s, &io.path_of("source"))?,
            };
            Ok(InputSnap {
                name: io.str("name")?.to_string(),
                source,
            })
        })
        .collect::<Result<Vec<_>, SerdesError>>()
}

/// `outputs`, with the properties scheduling reads.
fn decode_outputs(o: &Obj) -> Result<Vec<OutputSnap>, SerdesError> {
    o.list("outputs")?
        .iter()
        .enumerate()
        .map(|(i, output)| {
            let opath = format!("{}[{i}]", o.path_of("outputs"));
            let oo = Obj::expect(output, &["ExecutionStepOutputSnap"], &opath)?;
            let props = oo.field("properties")?;
            let p = Obj::expect(props, &["StepOutputProperties"], &oo.path_of("properties"))?;
            Ok(OutputSnap {
                name: oo.str("name")?.to_string(),
                is_required: p.bool_or("is_required", true)?,
                is_dynamic: p.bool_or("is_dynamic", false)?,
                is_asset_check: !matches!(p.get("asset_check_key"), None | Some(Value::Null)),
            })
        })
        .collect::<Result<Vec<_>, SerdesError>>()
}

/// `tags`, whose values must be strings.
fn decode_tags(o: &Obj) -> Result<BTreeMap<String, String>, SerdesError> {
    let mut tags = BTreeMap::new();
    if let Some(m) = o.dict("tags")? {
        for (k, v) in m {
            let v = v.as_str().ok_or_else(|| SerdesError::Shape {
                path: format!("{}[{k:?}]", o.path_of("tags")),
                expected: "str".into(),
                found: serdes::kind(v).into(),
            })?;
            tags.insert(k.clone(), v.to_string());
        }
    }
    Ok(tags)
}

/// The stored plan of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanSnapshot {
    pub steps: Vec<StepSnap>,
    pub step_keys_to_execute: Vec<String>,
    pub initial_known_state: Option<KnownState>,
    pub artifacts_persisted: bool,
    pub executor_name: Option<String>,
    pub job_snapshot_id: String,
}

impl PlanSnapshot {
    /// Reads a packed `ExecutionPlanSnapshot`.
    pub fn decode(v: &Value) -> Result<Self, SerdesError> {
        let o = Obj::expect(v, &["ExecutionPlanSnapshot"], "ExecutionPlanSnapshot")?;
        let version = o
            .get("snapshot_version")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if version < 1 {
            return Err(SerdesError::Shape {
                path: o.path_of("snapshot_version"),
                expected: "snapshot_version >= 1 (older snapshots cannot rebuild the plan)".into(),
                found: version.to_string(),
            });
        }
        let steps = o
            .list("steps")?
            .iter()
            .enumerate()
            .map(|(i, s)| StepSnap::decode(s, &format!("{}[{i}]", o.path_of("steps"))))
            .collect::<Result<Vec<_>, _>>()?;
        let step_keys_to_execute = o
            .list("step_keys_to_execute")?
            .iter()
            .map(|k| {
                k.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| SerdesError::Shape {
                        path: o.path_of("step_keys_to_execute"),
                        expected: "step key strings".into(),
                        found: serdes::kind(k).into(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let initial_known_state = match o.get("initial_known_state") {
            None | Some(Value::Null) => None,
            Some(k) => Some(KnownState::decode(k, &o.path_of("initial_known_state"))?),
        };
        Ok(PlanSnapshot {
            steps,
            step_keys_to_execute,
            initial_known_state,
            artifacts_persisted: o.bool_or("artifacts_persisted", false)?,
            executor_name: o.opt_str("executor_name")?.map(str::to_string),
            job_snapshot_id: o
                .opt_str("pipeline_snapshot_id")?
                .or(o.opt_str("job_snapshot_id")?)
                .unwrap_or_default()
                .to_string(),
        })
    }

    /// Reads `snapshots.snapshot_body` (zlib-compressed serdes JSON).
    pub fn from_stored(body: &[u8]) -> Result<Self, SerdesError> {
        Self::decode(&serdes::parse_zlib(body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_source_class_is_named_with_its_path() {
        let text = include_str!("../../tests/fixtures/plan_snapshot_fan_in_and_nested_map.json")
            .replacen("\"FromStepOutput\"", "\"FromTheFuture\"", 1);
        let v = crate::serdes::parse(text.as_bytes()).expect("json");
        let err = PlanSnapshot::decode(&v).expect_err("unknown class refused");
        let msg = err.to_string();
        assert!(
            msg.contains("FromTheFuture") && msg.contains("steps["),
            "{msg}"
        );
    }
}
