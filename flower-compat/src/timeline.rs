//! The timeline of one Dagster run on the fleet: per step and per attempt, where the time went —
//! waiting in the queue, the worker launching the step's Job, the step running, the result coming back —
//! with the worker and queue of each attempt (`/api/celeriac/runs/<run_id>/timeline`, the dashboard's
//! Gantt view).
//!
//! Bar edges and where each comes from (nothing new is emitted for this; see the README's table):
//!
//! | edge | source |
//! | --- | --- |
//! | `published` | Dagster event log: `Submitting celery task for step …` (run worker / coordinator); else the Celery `task-sent` event |
//! | `received` | Celery `task-received` (the worker got the message) |
//! | `started` | Celery `task-started` (a slot of the queue took it) |
//! | `job_created` | Dagster event log: celeriac's `Executing step … in Kubernetes job …` |
//! | `step_start` | Dagster event log: `STEP_START` / `STEP_RESTARTED` (the step process runs in its pod) |
//! | `step_end` | Dagster event log: `STEP_SUCCESS` / `STEP_FAILURE` / `STEP_UP_FOR_RETRY` |
//! | `job_finished` | Dagster event log: celeriac's `Retrieving logs from Kubernetes Job pods` |
//! | `result_stored` | Celery `task-succeeded` / `task-failed` (sent as the result is stored) |
//!
//! Attempts are paired in order: the n-th `Submitting …` of a step (event-log rows taken in time order)
//! with the n-th Celery task of that step (ordered by when it was published or received).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::dagster;
use crate::eventlog::{StepEvent, StepMark};
use crate::task::Task;

/// What the timeline needs of one Celery task of the run.
#[derive(Debug, Clone, Default)]
pub struct TaskFacts {
    pub uuid: String,
    pub step_key: String,
    pub state: String,
    pub worker: Option<String>,
    pub routing_key: Option<String>,
    pub sent: Option<f64>,
    pub received: Option<f64>,
    pub started: Option<f64>,
    /// `succeeded`, `failed`, `revoked` or `rejected`: when the task ended.
    pub finished: Option<f64>,
    pub first_seen: f64,
}

/// One phase of an attempt's bar.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Segment {
    /// `queued` (published → received), `reserved` (received → started), `launching` (started → Job
    /// created), `pod_starting` (Job created → step start), `running` (step start → step end),
    /// `finishing` (step end → result stored).
    pub phase: &'static str,
    pub from: f64,
    pub to: f64,
}

/// One attempt of a step.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Attempt {
    /// 0 for the first run of the step, 1 for its first retry, …
    pub attempt: usize,
    pub task_id: Option<String>,
    pub worker: Option<String>,
    pub queue: Option<String>,
    /// The Celery state of the task (`SUCCESS`, `STARTED`, …).
    pub state: Option<String>,
    /// `success`, `failure`, `retry` (failed, retried), `revoked`, `running` or `waiting`.
    pub outcome: &'static str,
    pub published: Option<f64>,
    pub received: Option<f64>,
    pub started: Option<f64>,
    pub job_created: Option<f64>,
    pub k8s_job: Option<String>,
    pub step_start: Option<f64>,
    pub step_end: Option<f64>,
    pub job_finished: Option<f64>,
    pub result_stored: Option<f64>,
    /// Seconds from published to started (broker and worker reserve together); `None` unless both known.
    pub queue_wait: Option<f64>,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepTimeline {
    pub step_key: String,
    pub attempts: Vec<Attempt>,
}

/// A task of another run (or no run) that held a slot on one of this run's workers meanwhile.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Neighbour {
    pub task_id: String,
    pub name: Option<String>,
    pub run_id: Option<String>,
    pub step_key: Option<String>,
    pub worker: Option<String>,
    pub queue: Option<String>,
    pub state: String,
    pub started: Option<f64>,
    pub finished: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Timeline {
    pub run_id: String,
    pub job: Option<String>,
    /// First and last edge of any attempt.
    pub start: Option<f64>,
    pub end: Option<f64>,
    /// Steps in the order they were first published (or received).
    pub steps: Vec<StepTimeline>,
    /// Whether the Dagster event log was read (`false`: only Celery events; the Job/step edges are null).
    pub event_log: bool,
    /// Why the event log could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_log_error: Option<String>,
    /// Present when asked for (`?others=1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub others: Option<Vec<Neighbour>>,
}

/// The event-log side of one attempt.
#[derive(Debug, Default, Clone)]
struct LogAttempt {
    published: Option<f64>,
    queue: Option<String>,
    job_created: Option<f64>,
    k8s_job: Option<String>,
    step_start: Option<f64>,
    step_end: Option<f64>,
    outcome: Option<&'static str>,
    job_finished: Option<f64>,
}

/// Splits one step's rows into attempts: each `Submitting …` opens one; a step start seen when the
/// current attempt already started (no submission recorded in between) opens one too.
fn log_attempts(events: &[&StepEvent]) -> Vec<LogAttempt> {
    let mut out: Vec<LogAttempt> = Vec::new();
    for e in events {
        let opens = match &e.mark {
            StepMark::Submitted { .. } => true,
            StepMark::StepStart => out.last().is_none_or(|a| a.step_start.is_some()),
            _ => out.is_empty(),
        };
        if opens {
            out.push(LogAttempt::default());
        }
        let Some(a) = out.last_mut() else { continue };
        match &e.mark {
            StepMark::Submitted { queue } => {
                a.published = Some(e.ts);
                a.queue = queue.clone();
            }
            StepMark::JobCreated { k8s_job } => {
                a.job_created.get_or_insert(e.ts);
                a.k8s_job = k8s_job.clone().or(a.k8s_job.take());
            }
            StepMark::StepStart => a.step_start = Some(e.ts),
            StepMark::StepEnd { outcome } => {
                a.step_end = Some(e.ts);
                a.outcome = Some(*outcome);
            }
            StepMark::JobFinished => a.job_finished = Some(e.ts),
        }
    }
    out
}

fn celery_outcome(state: &str) -> &'static str {
    match state {
        "SUCCESS" => "success",
        "FAILURE" => "failure",
        "REVOKED" | "REJECTED" => "revoked",
        "STARTED" => "running",
        _ => "waiting",
    }
}

fn round_ms(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn segments(a: &Attempt) -> Vec<Segment> {
    // Without the event log nothing splits the task's run: it is all `running`.
    let after_start = if a.job_created.is_none() && a.step_start.is_none() {
        "running"
    } else {
        "launching"
    };
    let edges: [(&'static str, Option<f64>); 7] = [
        ("queued", a.published),
        ("reserved", a.received),
        (after_start, a.started),
        ("pod_starting", a.job_created),
        ("running", a.step_start),
        ("finishing", a.step_end),
        ("", a.result_stored),
    ];
    // Each phase runs from its edge to the next known edge; unknown edges are skipped.
    let known: Vec<(&'static str, f64)> = edges
        .iter()
        .filter_map(|(p, t)| t.map(|t| (*p, t)))
        .collect();
    known
        .windows(2)
        .filter(|w| !w[0].0.is_empty() && w[1].1 >= w[0].1)
        .map(|w| Segment {
            phase: w[0].0,
            from: w[0].1,
            to: w[1].1,
        })
        .collect()
}

/// Builds the timeline of `run_id` from its Celery tasks and (when read) its event-log rows.
/// `worker_queues` names the queues each worker consumes, for attempts whose queue nothing else tells.
pub fn build(
    run_id: &str,
    job: Option<String>,
    tasks: &[TaskFacts],
    events: Option<&[StepEvent]>,
    worker_queues: &HashMap<String, Vec<String>>,
) -> Timeline {
    let mut by_step: BTreeMap<&str, (Vec<&TaskFacts>, Vec<&StepEvent>)> = BTreeMap::new();
    for t in tasks {
        by_step.entry(t.step_key.as_str()).or_default().0.push(t);
    }
    for e in events.unwrap_or_default() {
        by_step.entry(e.step_key.as_str()).or_default().1.push(e);
    }
    let mut steps: Vec<StepTimeline> = by_step
        .into_iter()
        .map(|(step_key, (celery, log))| StepTimeline {
            step_key: step_key.to_string(),
            attempts: step_attempts(celery, log, worker_queues),
        })
        .collect();
    let first = |s: &StepTimeline| {
        s.attempts
            .first()
            .and_then(|a| a.published.or(a.received).or(a.started).or(a.step_start))
            .unwrap_or(f64::INFINITY)
    };
    steps.sort_by(|a, b| {
        first(a)
            .total_cmp(&first(b))
            .then_with(|| a.step_key.cmp(&b.step_key))
    });
    let (start, end) = span(&steps);
    Timeline {
        run_id: run_id.to_string(),
        job,
        start,
        end,
        steps,
        event_log: events.is_some(),
        event_log_error: None,
        others: None,
    }
}

/// One step's attempts: its Celery tasks (by when they were published) paired in order with the
/// attempts its event-log rows tell.
fn step_attempts(
    mut celery: Vec<&TaskFacts>,
    mut log: Vec<&StepEvent>,
    worker_queues: &HashMap<String, Vec<String>>,
) -> Vec<Attempt> {
    celery.sort_by(|a, b| {
        let key = |t: &TaskFacts| t.sent.or(t.received).or(t.started).unwrap_or(t.first_seen);
        key(a).total_cmp(&key(b)).then_with(|| a.uuid.cmp(&b.uuid))
    });
    // By time, not by row id: the worker writes its engine events behind, so a row can land after
    // a later event of the step process.
    log.sort_by(|a, b| a.ts.total_cmp(&b.ts));
    let logged = log_attempts(&log);
    let n = celery.len().max(logged.len());
    let mut attempts = Vec::with_capacity(n);
    for i in 0..n {
        let t = celery.get(i).copied();
        let l = logged.get(i).cloned().unwrap_or_default();
        attempts.push(attempt(i, t, l, worker_queues));
    }
    attempts
}

/// Attempt `i` of a step from its Celery task `t` and its event-log side `l` (either may be missing).
fn attempt(
    i: usize,
    t: Option<&TaskFacts>,
    l: LogAttempt,
    worker_queues: &HashMap<String, Vec<String>>,
) -> Attempt {
    let worker = t.and_then(|t| t.worker.clone());
    let queue = l
        .queue
        .clone()
        .or_else(|| t.and_then(|t| t.routing_key.clone()))
        .or_else(|| {
            let consumed = worker_queues.get(worker.as_deref()?)?;
            (consumed.len() == 1).then(|| consumed[0].clone())
        });
    let state = t.map(|t| t.state.clone());
    let outcome = match (l.outcome, state.as_deref()) {
        (Some(o), _) => o,
        (None, Some(s)) => celery_outcome(s),
        (None, None) if l.step_start.is_some() => "running",
        (None, None) => "waiting",
    };
    let mut a = Attempt {
        attempt: i,
        task_id: t.map(|t| t.uuid.clone()),
        worker,
        queue,
        state,
        outcome,
        published: l.published.or_else(|| t.and_then(|t| t.sent)),
        received: t.and_then(|t| t.received),
        started: t.and_then(|t| t.started),
        job_created: l.job_created,
        k8s_job: l.k8s_job,
        step_start: l.step_start,
        step_end: l.step_end,
        job_finished: l.job_finished,
        result_stored: t.and_then(|t| t.finished),
        ..Default::default()
    };
    a.queue_wait = match (a.published, a.started.or(a.received)) {
        (Some(p), Some(s)) => Some(round_ms((s - p).max(0.0))),
        _ => None,
    };
    a.segments = segments(&a);
    a
}

/// The first and the last edge of any attempt.
fn span(steps: &[StepTimeline]) -> (Option<f64>, Option<f64>) {
    let all_edges = steps.iter().flat_map(|s| &s.attempts).flat_map(|a| {
        [
            a.published,
            a.received,
            a.started,
            a.job_created,
            a.step_start,
            a.step_end,
            a.job_finished,
            a.result_stored,
        ]
        .into_iter()
        .flatten()
    });
    all_edges.fold((None, None), |(lo, hi): (Option<f64>, Option<f64>), t| {
        (
            Some(lo.map_or(t, |l| l.min(t))),
            Some(hi.map_or(t, |h| h.max(t))),
        )
    })
}

/// The step tasks of `run_id` among `tasks` (found by their kwargs repr, which names the run), and the
/// run's job name.
pub fn facts_of_run<'a>(
    tasks: impl Iterator<Item = &'a Task>,
    run_id: &str,
) -> (Vec<TaskFacts>, Option<String>) {
    let mut facts = Vec::new();
    let mut job = None;
    for t in tasks {
        let Some(kwargs) = &t.kwargs else { continue };
        // A substring test first: parsing every task's kwargs would cost far more.
        let mentions = match kwargs {
            serde_json::Value::String(s) => s.contains(run_id),
            other => other.to_string().contains(run_id),
        };
        if !mentions {
            continue;
        }
        let Some(ctx) = dagster::context(Some(kwargs), None) else {
            continue;
        };
        if ctx.run_id.as_deref() != Some(run_id) {
            continue;
        }
        let Some(step_key) = ctx.step_key else {
            continue;
        };
        job = job.or(ctx.job);
        facts.push(TaskFacts {
            uuid: t.uuid.clone(),
            step_key,
            state: t.state.clone(),
            worker: t.worker.clone(),
            routing_key: t
                .routing_key
                .as_ref()
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            sent: t.sent,
            received: t.received,
            started: t.started,
            finished: t.succeeded.or(t.failed).or(t.revoked).or(t.rejected),
            first_seen: t.first_seen,
        });
    }
    (facts, job)
}

/// The workers and queues the timeline's attempts used.
pub fn workers_and_queues(t: &Timeline) -> (HashSet<String>, HashSet<String>) {
    let mut workers = HashSet::new();
    let mut queues = HashSet::new();
    for a in t.steps.iter().flat_map(|s| &s.attempts) {
        workers.extend(a.worker.clone());
        queues.extend(a.queue.clone());
    }
    (workers, queues)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(step: &str, ts: f64, mark: StepMark) -> StepEvent {
        StepEvent {
            step_key: step.into(),
            ts,
            mark,
        }
    }

    fn task(
        uuid: &str,
        step: &str,
        state: &str,
        received: f64,
        started: f64,
        done: f64,
    ) -> TaskFacts {
        TaskFacts {
            uuid: uuid.into(),
            step_key: step.into(),
            state: state.into(),
            worker: Some("celeriac-a@h".into()),
            received: Some(received),
            started: Some(started),
            finished: Some(done),
            first_seen: received,
            ..Default::default()
        }
    }

    #[test]
    fn a_retried_step_has_two_attempts_in_order() {
        let q = || StepMark::Submitted {
            queue: Some("q".into()),
        };
        let job = |j: &str| StepMark::JobCreated {
            k8s_job: Some(j.into()),
        };
        let events = vec![
            ev("a", 10.0, q()),
            ev("b", 10.1, q()),
            ev("a", 12.0, job("dagster-step-x")),
            ev("a", 14.0, StepMark::StepStart),
            ev("a", 15.0, StepMark::StepEnd { outcome: "retry" }),
            ev("a", 15.5, StepMark::JobFinished),
            ev("a", 17.0, q()),
            ev("a", 18.0, job("dagster-step-x-1")),
            ev("a", 20.0, StepMark::StepStart),
            ev("a", 21.0, StepMark::StepEnd { outcome: "success" }),
        ];
        let tasks = vec![
            task("t2", "a", "SUCCESS", 17.5, 17.6, 22.0),
            task("t1", "a", "SUCCESS", 11.0, 11.5, 16.0),
            task("tb", "b", "RECEIVED", 10.5, f64::NAN, f64::NAN),
        ];
        let mut tasks = tasks;
        tasks[2].started = None;
        tasks[2].finished = None;
        let wq = HashMap::from([("celeriac-a@h".to_string(), vec!["q".to_string()])]);
        let t = build("r", Some("j".into()), &tasks, Some(&events), &wq);
        assert_eq!(t.steps.len(), 2);
        assert_eq!(t.steps[0].step_key, "a", "published first");
        let a = &t.steps[0].attempts;
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].task_id.as_deref(), Some("t1"));
        assert_eq!(a[0].outcome, "retry");
        assert_eq!(a[0].queue_wait, Some(1.5));
        assert_eq!(a[1].task_id.as_deref(), Some("t2"));
        assert_eq!(a[1].outcome, "success");
        assert_eq!(a[1].k8s_job.as_deref(), Some("dagster-step-x-1"));
        let phases: Vec<&str> = a[0].segments.iter().map(|s| s.phase).collect();
        assert_eq!(
            phases,
            [
                "queued",
                "reserved",
                "launching",
                "pod_starting",
                "running",
                "finishing"
            ]
        );
        assert_eq!(a[0].segments[4].from, 14.0);
        assert_eq!(a[0].segments[4].to, 15.0);
        let b = &t.steps[1].attempts[0];
        assert_eq!(b.outcome, "waiting");
        assert_eq!(b.queue.as_deref(), Some("q"));
        assert_eq!(t.start, Some(10.0));
        assert_eq!(t.end, Some(22.0));
        let (workers, queues) = workers_and_queues(&t);
        assert!(workers.contains("celeriac-a@h") && queues.contains("q"));
    }

    #[test]
    fn without_the_event_log_celery_events_still_draw_bars() {
        let tasks = vec![task("t1", "a", "FAILURE", 1.0, 2.0, 5.0)];
        let t = build("r", None, &tasks, None, &HashMap::new());
        let a = &t.steps[0].attempts[0];
        assert!(!t.event_log);
        assert_eq!(a.outcome, "failure");
        assert_eq!(a.queue_wait, None);
        let phases: Vec<&str> = a.segments.iter().map(|s| s.phase).collect();
        assert_eq!(phases, ["reserved", "running"]);
    }
}
