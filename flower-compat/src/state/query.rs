//! `/api/tasks`' filters, order and paging (Flower's `iter_tasks` and `_task_sort_key`) over the tasks
//! in memory. Apart from [`super::EventsState`], which only hands its tasks over: how a page is chosen
//! does not depend on how events are merged.

use crate::search::{self, Query, QueryError};
use crate::task::Task;

/// Filters, order and page of `/api/tasks` (Flower's `iter_tasks`).
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub limit: Option<usize>,
    pub offset: usize,
    pub taskname: Option<String>,
    pub workername: Option<String>,
    pub state: Option<String>,
    pub received_start: Option<f64>,
    pub received_end: Option<f64>,
    /// One of `name, state, received, started`, optionally prefixed with `-` (descending).
    pub sort_by: Option<String>,
    pub search: Option<String>,
}

/// Sort keys `/api/tasks` accepts.
pub const SORT_KEYS: [&str; 4] = ["name", "received", "started", "state"];

/// A page of tasks with the counts the dashboard shows.
pub struct TaskPage<'a> {
    pub tasks: Vec<&'a Task>,
    pub filtered: usize,
    pub total: usize,
}

/// `/api/tasks`: filters `tasks` (all `total` tasks in memory), orders them and cuts the page.
pub fn page<'a>(
    tasks: impl Iterator<Item = &'a Task>,
    total: usize,
    q: &TaskQuery,
) -> Result<TaskPage<'a>, QueryError> {
    let parsed: Query = search::parse(q.search.as_deref().unwrap_or(""))?;
    let fold = |s: &Option<String>| s.as_deref().map(str::to_lowercase);
    let (name, worker, state) = (fold(&q.taskname), fold(&q.workername), fold(&q.state));
    let mut hits: Vec<&Task> = tasks
        .filter(|t| {
            name.as_ref()
                .is_none_or(|n| t.name.as_deref().is_some_and(|x| search::eq_ci(x, n)))
                && worker
                    .as_ref()
                    .is_none_or(|w| t.worker.as_deref().is_some_and(|x| search::eq_ci(x, w)))
                && state.as_ref().is_none_or(|s| search::eq_ci(&t.state, s))
                && in_range(t, q.received_start, q.received_end)
                && parsed.matches(t)
        })
        .collect();
    let filtered = hits.len();
    let (key, descending) = match q.sort_by.as_deref() {
        Some(s) => (Some(s.trim_start_matches('-')), s.starts_with('-')),
        None => (None, true),
    };
    let cmp = |a: &&Task, b: &&Task| -> std::cmp::Ordering {
        let o = match key {
            None => a
                .timestamp
                .unwrap_or(0.0)
                .total_cmp(&b.timestamp.unwrap_or(0.0))
                .then_with(|| a.uuid.cmp(&b.uuid)),
            Some(k) => sort_key(a, k)
                .partial_cmp(&sort_key(b, k))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.uuid.cmp(&b.uuid)),
        };
        if descending {
            o.reverse()
        } else {
            o
        }
    };
    let end = q.limit.map(|l| q.offset.saturating_add(l));
    match end {
        Some(end) if end < hits.len() => {
            if end > 0 {
                hits.select_nth_unstable_by(end - 1, cmp);
            }
            hits.truncate(end);
            hits.sort_unstable_by(cmp);
        }
        _ => hits.sort_unstable_by(cmp),
    }
    let page: Vec<&Task> = hits.into_iter().skip(q.offset).collect();
    Ok(TaskPage {
        tasks: page,
        filtered,
        total,
    })
}

#[derive(PartialEq, PartialOrd)]
enum SortValue {
    Missing,
    Num(f64),
    Text(String),
}

/// `_task_sort_key`: tasks without the value first, then by value (numbers for times, case-folded text).
fn sort_key(t: &Task, key: &str) -> (bool, SortValue) {
    let v = match key {
        "received" => t.received.map(SortValue::Num),
        "started" => t.started.map(SortValue::Num),
        "name" => t.name.as_deref().map(|n| SortValue::Text(n.to_lowercase())),
        "state" => Some(SortValue::Text(t.state.to_lowercase())),
        _ => None,
    };
    match v {
        Some(v) => (true, v),
        None => (false, SortValue::Missing),
    }
}

fn in_range(t: &Task, start: Option<f64>, end: Option<f64>) -> bool {
    if let (Some(s), Some(r)) = (start, t.received) {
        if r < s {
            return false;
        }
    }
    match (end, t.received) {
        (Some(e), Some(r)) => r <= e,
        _ => true,
    }
}
