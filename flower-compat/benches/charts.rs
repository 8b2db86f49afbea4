//! The chart and timeline endpoints over 100,000 tasks of history: the handlers' work (series over the
//! tasks in memory, queue series over a full sample buffer, a run's timeline found among all tasks),
//! JSON encoding included. Target: each < 50 ms.
//!
//!     cargo bench -p celeriac-flower --bench charts
//!
//! Measured numbers are recorded in flower-compat/README.md.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;

use celeriac_flower::samples::{QueueSample, QueueSamples, MAX_SAMPLES};
use celeriac_flower::series::{self, Window};
use celeriac_flower::state::EventsState;
use celeriac_flower::timeline;
use celeriac_wire::json::to_python_string;
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Map, Value};

const TASKS: usize = 100_000;
const NOW: f64 = 1_700_086_400.0;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A Dagster step task's kwargs repr at Celery's 1024-character limit; six steps per run.
fn kwargs_repr(i: usize) -> String {
    let mut s = format!(
        "{{'execute_step_args_packed': {{'__class__': 'ExecuteStepArgs', 'pipeline_origin': {{'__class__': \
         'PipelinePythonOrigin', 'pipeline_name': 'job_{}', 'repository_origin': {{...}}}}, 'pipeline_run_id': \
         '{:08x}-6cab-4ef7-9f6b-ee3c7a9eef4a', 'step_keys_to_execute': ['step_{}'], 'instance_ref': {{",
        i % 50,
        i / 6,
        i % 6
    );
    while s.len() < 1020 {
        s.push_str("'x': {...}, ");
    }
    s.truncate(1020);
    s.push_str("...}");
    s
}

/// 100,000 step tasks finished over the last 24 h (one every 0.864 s), 10 % failed, 20 workers.
fn build() -> EventsState {
    let mut state = EventsState::new(TASKS, None);
    for i in 0..TASKS {
        let uuid = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
        let host = format!("celeriac-{}@worker-{}", i % 20, i % 20);
        let t = NOW - 86_400.0 + i as f64 * 0.864;
        state.apply(&obj(json!({"type": "task-received", "uuid": uuid, "hostname": host, "timestamp": t,
            "local_received": t, "name": "execute_step_k8s_job", "args": "()", "kwargs": kwargs_repr(i),
            "retries": 0})));
        state.apply(&obj(
            json!({"type": "task-started", "uuid": uuid, "hostname": host,
            "timestamp": t + 1.0, "local_received": t + 1.0}),
        ));
        let kind = if i % 10 == 0 {
            "task-failed"
        } else {
            "task-succeeded"
        };
        state.apply(&obj(
            json!({"type": kind, "uuid": uuid, "hostname": host, "timestamp": t + 5.0,
            "local_received": t + 5.0, "runtime": 4.0 + (i % 17) as f64}),
        ));
    }
    state
}

/// A full sample buffer: 5 queues every 5 s, with Redis priority splits.
fn samples() -> QueueSamples {
    let mut q = QueueSamples::default();
    for i in 0..MAX_SAMPLES {
        q.push(QueueSample {
            ts: NOW - (MAX_SAMPLES - i) as f64,
            queue: format!("queue-{}", i % 5),
            ready: (i % 40) as u64,
            priorities: Some(BTreeMap::from([
                ("0".into(), (i % 10) as u64),
                ("3".into(), 1),
                ("6".into(), 0),
                ("9".into(), (i % 3) as u64),
            ])),
            reserved: 1,
            running: (i % 4) as u64,
            limit: Some(4),
        });
    }
    q
}

fn bench(c: &mut Criterion) {
    let state = build();
    let q = samples();
    for w in [Window::Minutes15, Window::Hour1, Window::Hours24] {
        c.bench_function(
            &format!("series_tasks window={} (100k tasks)", w.name()),
            |b| {
                b.iter(|| {
                    let s =
                        series::task_series(state.tasks(), w, NOW, Some("execute_step_k8s_job"));
                    black_box(to_python_string(
                        &serde_json::to_value(&s).expect("json"),
                        false,
                    ))
                })
            },
        );
    }
    for w in [Window::Minutes15, Window::Hours24] {
        c.bench_function(
            &format!("series_queues window={} ({MAX_SAMPLES} samples)", w.name()),
            |b| {
                b.iter(|| {
                    let s = series::queue_series(&q, w, NOW);
                    black_box(to_python_string(
                        &serde_json::to_value(&s).expect("json"),
                        false,
                    ))
                })
            },
        );
    }
    let run_id = format!("{:08x}-6cab-4ef7-9f6b-ee3c7a9eef4a", 12_345);
    c.bench_function("run_timeline (Celery side, 100k tasks)", |b| {
        b.iter(|| {
            let (facts, job) = timeline::facts_of_run(state.tasks_of_run(&run_id), &run_id);
            assert_eq!(facts.len(), 6);
            let t = timeline::build(&run_id, job, &facts, None, &HashMap::new());
            black_box(to_python_string(
                &serde_json::to_value(&t).expect("json"),
                false,
            ))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
