//! 100,000 tasks of history: memory per task and the time `/api/tasks?limit=100` takes (filter, order,
//! page and JSON encoding exactly as the handler does), on tasks shaped like Dagster step tasks with
//! Celery's 1024-character `kwargs`/`result` reprs (the worst case a step task can send).
//!
//!     cargo bench -p celeriac-flower --bench history
//!
//! Measured numbers are recorded in flower-compat/README.md.

use std::hint::black_box;

use celeriac_flower::state::{EventsState, TaskQuery};
use celeriac_wire::json::to_python_string;
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Map, Value};

const TASKS: usize = 100_000;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn kwargs_repr(i: usize) -> String {
    let head = format!(
        "{{'execute_step_args_packed': {{'__class__': 'ExecuteStepArgs', 'pipeline_origin': {{'__class__': \
         'PipelinePythonOrigin', 'pipeline_name': 'job_{}', 'repository_origin': {{...}}}}, 'pipeline_run_id': \
         '{:08x}-6cab-4ef7-9f6b-ee3c7a9eef4a', 'step_keys_to_execute': ['step_{}'], 'instance_ref': {{",
        i % 50,
        i / 6,
        i % 6
    );
    let mut s = head;
    while s.len() < 1020 {
        s.push_str("'x': {...}, ");
    }
    s.truncate(1020);
    s.push_str("...}");
    s
}

/// A full lifecycle (received, started, succeeded) for `n` tasks over 20 workers.
fn build(n: usize) -> EventsState {
    let mut state = EventsState::new(n, None);
    let result = format!(
        "'[{}]'",
        "\"{\\\"__class__\\\": \\\"DagsterEvent\\\"}\", ".repeat(24)
    );
    for i in 0..n {
        let uuid = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
        let host = format!("celeriac-{}@worker-{}", i % 20, i % 20);
        let t = 1_700_000_000.0 + i as f64;
        state.apply(&obj(json!({"type": "task-received", "uuid": uuid, "hostname": host, "timestamp": t,
            "local_received": t, "clock": i * 3, "name": "execute_step_k8s_job", "args": "()",
            "kwargs": kwargs_repr(i), "root_id": uuid, "parent_id": null, "retries": 0, "eta": null, "expires": null})));
        state.apply(&obj(
            json!({"type": "task-started", "uuid": uuid, "hostname": host, "timestamp": t + 1.0,
            "local_received": t + 1.0, "clock": i * 3 + 1}),
        ));
        let state_kind = if i % 10 == 0 {
            "task-failed"
        } else {
            "task-succeeded"
        };
        state.apply(&obj(json!({"type": state_kind, "uuid": uuid, "hostname": host, "timestamp": t + 30.0,
            "local_received": t + 30.0, "clock": i * 3 + 2, "result": result, "runtime": 29.0,
            "exception": "Failure('step failed')", "traceback": "Traceback (most recent call last):\n  ...\n"})));
    }
    state
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// The `/api/tasks` handler's work for one query.
fn api_tasks(state: &EventsState, q: &TaskQuery) -> String {
    let page = state.query(q).expect("valid query");
    let out: Map<String, Value> = page
        .tasks
        .iter()
        .map(|t| (t.uuid.clone(), Value::Object(t.list_entry())))
        .collect();
    to_python_string(&Value::Object(out), false)
}

fn bench(c: &mut Criterion) {
    let before = rss_bytes();
    let started = std::time::Instant::now();
    let state = build(TASKS);
    let built = started.elapsed();
    let after = rss_bytes();
    eprintln!(
        "history: {TASKS} tasks applied (3 events each) in {:.2} s; resident memory +{:.1} MiB ({} bytes/task)",
        built.as_secs_f64(),
        (after.saturating_sub(before)) as f64 / 1048576.0,
        after.saturating_sub(before) / TASKS as u64
    );
    let newest = TaskQuery {
        limit: Some(100),
        ..Default::default()
    };
    let body = api_tasks(&state, &newest);
    eprintln!(
        "history: /api/tasks?limit=100 body is {} KiB",
        body.len() / 1024
    );
    c.bench_function("api_tasks_limit_100 (100k tasks)", |b| {
        b.iter(|| black_box(api_tasks(&state, black_box(&newest))))
    });
    let filtered = TaskQuery {
        limit: Some(100),
        state: Some("FAILURE".into()),
        sort_by: Some("-received".into()),
        ..Default::default()
    };
    c.bench_function("api_tasks_failure_sorted_limit_100 (100k tasks)", |b| {
        b.iter(|| black_box(api_tasks(&state, black_box(&filtered))))
    });
    let search = TaskQuery {
        limit: Some(100),
        search: Some("step_3".into()),
        ..Default::default()
    };
    c.bench_function("api_tasks_search_limit_100 (100k tasks)", |b| {
        b.iter(|| black_box(api_tasks(&state, black_box(&search))))
    });
    c.bench_function("apply_event (bounded state, evicting)", |b| {
        let mut state = build(1000);
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let uuid = format!("bench-{i}");
            state.apply(&obj(json!({"type": "task-received", "uuid": uuid, "hostname": "w@h",
                "timestamp": 1.0, "local_received": 1.0, "name": "execute_step_k8s_job", "kwargs": "{}"})))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
