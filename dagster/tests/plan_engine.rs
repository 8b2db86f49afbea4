//! The plan engine on a snapshot Dagster 1.13.27 wrote (`fixtures/plan_snapshot_fan_in_and_nested_map.json`:
//! `two` with an optional output `a` and a required `b` fanned into `fan`; `emit` (DynamicOut) mapped
//! over `m` then `m2`, collected by `coll`). The exhaustive comparison with Dagster's own engine is the
//! differential test in `tests/tests/plan_differential.rs`; this one pins the basic walk.

use celeriac_dagster::plan::{
    ActiveExecution, ExecutionPlan, PlanSnapshot, RetryMode, SortKey, StepEvent,
};
use serde_json::json;

fn engine() -> ActiveExecution {
    let text = include_str!("fixtures/plan_snapshot_fan_in_and_nested_map.json");
    let v = celeriac_dagster::serdes::parse(text.as_bytes()).expect("fixture JSON");
    let snap = PlanSnapshot::decode(&v).expect("snapshot");
    let plan = ExecutionPlan::rebuild("j", &snap).expect("plan");
    ActiveExecution::new(plan, RetryMode::Enabled, SortKey::Default, 0.0).expect("engine")
}

fn event(kind: &str, step: &str, output: Option<(&str, Option<&str>)>) -> StepEvent {
    let data = match output {
        Some((name, mk)) => json!({"__class__": "StepOutputData", "step_output_handle":
            {"__class__": "StepOutputHandle", "step_key": step, "output_name": name, "mapping_key": mk}}),
        None => serde_json::Value::Null,
    };
    StepEvent::decode(
        &json!({"__class__": "DagsterEvent", "event_type_value": kind,
        "step_key": step, "event_specific_data": data, "pipeline_name": "j"}),
    )
    .expect("event")
}

#[test]
fn fan_in_runs_with_one_source_missing_and_nested_maps_resolve() {
    let mut e = engine();
    assert_eq!(
        e.get_steps_to_execute(0.0).expect("submit"),
        vec!["emit", "two"]
    );
    // `two` emits only its required output `b`: the fan-in still runs (one of two sources present).
    e.handle_event(&event("STEP_OUTPUT", "two", Some(("b", None))), 1.0)
        .expect("output");
    e.handle_event(&event("STEP_SUCCESS", "two", None), 1.0)
        .expect("success");
    assert_eq!(e.plan_events(1.0).expect("plan events").skipped, vec![]);
    assert_eq!(e.get_steps_to_execute(1.0).expect("submit"), vec!["fan"]);
    // `emit` yields two mapping keys: m[x], m[y] become executable, then m2[x] after m[x].
    for k in ["x", "y"] {
        e.handle_event(
            &event("STEP_OUTPUT", "emit", Some(("result", Some(k)))),
            2.0,
        )
        .expect("dyn");
    }
    e.handle_event(&event("STEP_SUCCESS", "emit", None), 2.0)
        .expect("success");
    assert_eq!(
        e.get_steps_to_execute(2.0).expect("submit"),
        vec!["m[x]", "m[y]"]
    );
    e.handle_event(&event("STEP_OUTPUT", "m[x]", Some(("result", None))), 3.0)
        .expect("out");
    e.handle_event(&event("STEP_SUCCESS", "m[x]", None), 3.0)
        .expect("success");
    assert_eq!(e.get_steps_to_execute(3.0).expect("submit"), vec!["m2[x]"]);
    let known = e.get_known_state();
    assert_eq!(
        known.dynamic_mappings["emit"]["result"],
        Some(vec!["x".to_string(), "y".to_string()])
    );
    // A step finishing without a terminal event is unknown and abandons what depends on it.
    assert!(e.verify_complete("m[y]").expect("verify").is_some());
    let events = e.plan_events(3.0).expect("plan events");
    assert_eq!(events.abandoned.len(), 1);
    assert_eq!(events.abandoned[0].step_key, "m2[y]");
    assert!(!e.is_complete());
}
