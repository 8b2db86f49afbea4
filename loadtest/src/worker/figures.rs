//! The scenario's figures, assembled after both sides ran from what each left behind (its lane's
//! audit log, results and step exits) rather than from the workers' own reports, so that both sides
//! are measured by the same ruler. The JSON written here is `loadtest/results/worker.json`, which
//! `report` renders.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

use super::cluster::Audit;
use super::outcome::{results, step_exits};
use super::params::Params;
use super::setup::Setup;
use super::side::{Lane, Side};
use super::steps::Sent;
use crate::procs;

/// All figures of the run: parameters, each side's figures, Python's step timelines and the
/// problems (lost steps, steps run twice).
pub fn assemble(
    p: &Params,
    setup: &Setup,
    (c_lane, c, job_to_result): (&Lane, &Side, [f64; 2]),
    (py_lane, py, completed): (&Lane, &Side, &HashMap<String, f64>),
) -> Result<Value> {
    let mut out = json!({
        "params": {"celeriac_levels": p.celeriac_levels, "python_levels": p.python_levels,
                   "step_seconds_max": p.step_seconds, "celeriac_concurrency": p.celeriac_concurrency,
                   "broker": p.broker.name(), "backend": "redis", "build": setup.build,
                   "load_average_1m": {"start": setup.load_start, "end": procs::load_average()}},
    });
    let mut problems = Vec::new();
    for (name, side, lane) in [("celeriac", c, c_lane), ("python", py, py_lane)] {
        out[name] = side_figures(name, side, &lane.done_file, &mut problems)?;
    }
    out["celeriac"]["job_complete_to_result_p50_s"] = json!(job_to_result[0]);
    out["celeriac"]["job_complete_to_result_p99_s"] = json!(job_to_result[1]);
    python_completions(&mut out["python"], py, &py_lane.done_file, completed)?;
    out["problems"] = json!(problems);
    Ok(out)
}

/// The figures of one side; what makes the side's run invalid goes to `problems`.
fn side_figures(
    name: &str,
    side: &Side,
    done_file: &Path,
    problems: &mut Vec<String>,
) -> Result<Value> {
    let stored = results(&task_ids(&side.sent))?;
    let (exits, runs_of) = step_exits(done_file);
    let ok = stored.values().filter(|(s, _)| s == "SUCCESS").count();
    let lost = side.sent.len() - stored.len();
    let twice = runs_of.values().filter(|&&n| n > 1).count();
    let never = side
        .sent
        .iter()
        .filter(|s| !runs_of.contains_key(&s.step_key))
        .count();
    if lost > 0 || never > 0 {
        problems.push(format!(
            "{name}: {lost} of {} steps have no result, {never} never ran",
            side.sent.len()
        ));
    }
    if twice > 0 {
        problems.push(format!("{name}: {twice} steps ran more than once"));
    }
    let t = Timings {
        creates: job_creates(&side.audit),
        stored: &stored,
        exits: &exits,
    };
    let all_dispatch = t.dispatch(&side.sent);
    let all_result = t.result(&side.sent);
    let shared = side.audit.iter().filter(|a| a.shared()).count();
    let steps = side.sent.len().max(1) as f64;
    let runtime = t.runtime(&side.sent);
    let points: Vec<(f64, f64)> = side
        .levels
        .iter()
        .map(|l| (l.in_flight as f64, l.pss))
        .collect();
    let (intercept, slope) = fit(&points);
    Ok(json!({
        "steps": side.sent.len(), "results_success": ok, "lost": lost, "ran_twice": twice,
        "never_ran": never,
        "memory_points": points.iter().map(|(x, y)| json!({"in_flight": x, "pss_bytes": y})).collect::<Vec<_>>(),
        "levels": level_figures(side, &t),
        "pss_slope_bytes_per_step": slope, "pss_intercept_bytes": intercept,
        "idle_pss_bytes": side.idle_pss, "idle_rss_bytes": side.idle_rss,
        "rss_after_batches_bytes": side.after_rss,
        "publish_to_job_created_p50_s": procs::quantile(&all_dispatch, 0.5),
        "publish_to_job_created_p99_s": procs::quantile(&all_dispatch, 0.99),
        "dispatch_samples": all_dispatch.len(),
        "step_exit_to_result_p50_s": procs::quantile(&all_result, 0.5),
        "step_exit_to_result_p99_s": procs::quantile(&all_result, 0.99),
        "result_samples": all_result.len(),
        "api_requests_total": side.audit.len(),
        "api_requests_per_step": (side.audit.len() - shared) as f64 / steps,
        "api_requests_shared_watches": shared,
        "step_runtime_total_s": runtime,
        "api_requests_per_step_second": side.audit.len() as f64 / runtime,
        "api_requests_by_kind": by_kind(&side.audit),
        "startup_s": side.startup_s.iter().cloned().fold(f64::NAN, f64::min),
        "cpu_ms_per_step": side.cpu_s * 1000.0 / steps,
    }))
}

/// Each level (batch) of a side with the latencies of its own steps.
fn level_figures(side: &Side, t: &Timings) -> Vec<Value> {
    side.levels
        .iter()
        .map(|l| {
            let sent = &side.sent[l.sent.clone()];
            let (d, r) = (t.dispatch(sent), t.result(sent));
            json!({
                "steps": l.n, "in_flight": l.in_flight, "pss_bytes": l.pss, "rss_bytes": l.rss,
                "publish_per_s": l.publish_per_s, "drain_s": l.drain_s,
                "load_average_1m": l.load_average,
                "publish_to_job_created_p50_s": procs::quantile(&d, 0.5),
                "publish_to_job_created_p99_s": procs::quantile(&d, 0.99),
                "step_exit_to_result_p50_s": procs::quantile(&r, 0.5),
                "step_exit_to_result_p99_s": procs::quantile(&r, 0.99),
            })
        })
        .collect()
}

/// Python's Job complete → result (from the Jobs' `completionTime`) and its steps one by one (few),
/// to read the timelines behind its figures; added to `out`, Python's figures.
fn python_completions(
    out: &mut Value,
    py: &Side,
    done_file: &Path,
    completed: &HashMap<String, f64>,
) -> Result<()> {
    let stored = results(&task_ids(&py.sent))?;
    let py_job_to_result: Vec<f64> = py
        .sent
        .iter()
        .filter_map(|s| Some(stored.get(&s.task_id)?.1 - completed.get(&s.job_name)?))
        .filter(|d| d.is_finite())
        .collect();
    let py_creates = job_creates(&py.audit);
    let (py_exits, _) = step_exits(done_file);
    out["timelines"] = json!(py
        .sent
        .iter()
        .map(|s| json!({
            "step": s.step_key, "published": s.published_at,
            "job_created": py_creates.get(s.job_name.as_str()),
            "step_exited": py_exits.get(&s.step_key),
            "job_completion_time": completed.get(&s.job_name),
            "result_date_done": stored.get(&s.task_id).map(|r| r.1),
        }))
        .collect::<Vec<_>>());
    out["job_complete_to_result_p50_s"] = json!(procs::quantile(&py_job_to_result, 0.5));
    out["job_complete_to_result_p99_s"] = json!(procs::quantile(&py_job_to_result, 0.99));
    Ok(())
}

fn task_ids(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(|s| s.task_id.clone()).collect()
}

/// When each step Job was created (the audit log's `create jobs`), by Job name.
fn job_creates(audit: &[Audit]) -> HashMap<&str, f64> {
    audit
        .iter()
        .filter(|a| a.verb == "create" && a.resource == "jobs")
        .map(|a| (a.name.as_str(), a.at))
        .collect()
}

/// API requests by `verb resource`.
fn by_kind(audit: &[Audit]) -> BTreeMap<String, usize> {
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for a in audit {
        *by_kind
            .entry(format!("{} {}", a.verb, a.resource))
            .or_default() += 1;
    }
    by_kind
}

/// A side's instants per step: Job created (audit log), result stored (`date_done`), step exited.
struct Timings<'a> {
    creates: HashMap<&'a str, f64>,
    stored: &'a HashMap<String, (String, f64)>,
    exits: &'a HashMap<String, f64>,
}

impl Timings<'_> {
    /// Publish → Job created, per step of `sent` that has both.
    fn dispatch(&self, sent: &[Sent]) -> Vec<f64> {
        sent.iter()
            .filter_map(|s| Some(self.creates.get(s.job_name.as_str())? - s.published_at))
            .collect()
    }

    /// Step exited → result stored, per step of `sent` that has both.
    fn result(&self, sent: &[Sent]) -> Vec<f64> {
        sent.iter()
            .filter_map(|s| {
                let (_, done) = self.stored.get(&s.task_id)?;
                Some(done - self.exits.get(&s.step_key)?)
            })
            .filter(|d| d.is_finite())
            .collect()
    }

    /// Step runtime: Job created → step program exited, summed.
    fn runtime(&self, sent: &[Sent]) -> f64 {
        sent.iter()
            .filter_map(|s| {
                Some(self.exits.get(&s.step_key)? - self.creates.get(s.job_name.as_str())?)
            })
            .filter(|d| d.is_finite() && *d > 0.0)
            .sum()
    }
}

/// Linear fit y = a + b·x (least squares): (intercept, slope).
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if points.len() < 2 {
        return (f64::NAN, f64::NAN);
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let b = sxy / sxx;
    (my - b * mx, b)
}
