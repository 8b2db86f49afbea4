//! What became of the published steps, read back after the fact from what the steps and the result
//! backend leave behind (the result's status and `date_done` in Redis, the exit times the load-step
//! program notes in its done file), so that neither worker has to report on itself.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::params::BACKEND;
use super::steps::Sent;
use crate::clock::parse_time;

/// `date_done` and status of each task's stored result (`None`: no result).
pub fn results(ids: &[String]) -> Result<HashMap<String, (String, f64)>> {
    let client = redis::Client::open(BACKEND)?;
    let mut con = client.get_connection()?;
    let mut out = HashMap::new();
    for chunk in ids.chunks(500) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|id| format!("celery-task-meta-{id}"))
            .collect();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut con)?;
        for (id, v) in chunk.iter().zip(values) {
            let Some(v) = v else { continue };
            let meta: Value = serde_json::from_str(&v).unwrap_or(Value::Null);
            let status = meta["status"].as_str().unwrap_or_default().to_string();
            let done = meta["date_done"]
                .as_str()
                .and_then(parse_time)
                .unwrap_or(f64::NAN);
            out.insert(id.clone(), (status, done));
        }
    }
    Ok(out)
}

/// How many of `sent` have a result stored (success or failure: a failed step is finished too, and
/// reported as such afterwards).
pub fn stored_counter(sent: &[Sent]) -> impl Fn() -> usize {
    let ids: Vec<String> = sent.iter().map(|s| s.task_id.clone()).collect();
    move || results(&ids).map_or(0, |r| r.len())
}

/// When each step program exited (`LOAD_STEP_DONE_FILE`), by step key; also how often each ran.
pub fn step_exits(path: &Path) -> (HashMap<String, f64>, HashMap<String, usize>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut at = HashMap::new();
    let mut runs: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(_run), Some(step), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        *runs.entry(step.to_string()).or_default() += 1;
        if let Ok(t) = t.parse::<f64>() {
            at.insert(step.to_string(), t);
        }
    }
    (at, runs)
}
