//! Checks the figures of a scenario (none missing, no run lost) and renders `loadtest/REPORT.md` from the
//! full runs' results.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::worker::BrokerKind;

fn num(v: &Value, path: &str) -> Option<f64> {
    v.pointer(path)
        .and_then(Value::as_f64)
        .filter(|f| f.is_finite())
}

/// The scenario a results file belongs to: the worker scenario's is named by its broker.
fn scenario_of(stem: &str) -> &str {
    if stem == BrokerKind::Redis.results_stem() {
        "worker"
    } else {
        stem
    }
}

/// The figures each scenario must produce (JSON pointers).
fn required(scenario: &str) -> &'static [&'static str] {
    match scenario_of(scenario) {
        "coordinator" => &[
            "/celeriac/peak_rss_bytes",
            "/celeriac/rss_per_run_bytes",
            "/celeriac/launch_to_first_step_p99_s",
            "/celeriac/result_to_next_step_p99_s",
            "/celeriac/histogram_result_to_submit_p99_s",
            "/celeriac/cpu_ms_per_step",
            "/python/run_worker_pss_bytes_mean",
            "/python/launch_to_first_step_p50_s",
            "/python/result_to_next_step_p50_s",
        ],
        "worker" => &[
            "/celeriac/pss_slope_bytes_per_step",
            "/celeriac/pss_intercept_bytes",
            "/celeriac/publish_to_job_created_p50_s",
            "/celeriac/publish_to_job_created_p99_s",
            "/celeriac/step_exit_to_result_p50_s",
            "/celeriac/step_exit_to_result_p99_s",
            "/celeriac/api_requests_per_step",
            "/celeriac/startup_s",
            "/celeriac/job_complete_to_result_p99_s",
            "/python/job_complete_to_result_p99_s",
            "/celeriac/cpu_ms_per_step",
            "/python/pss_slope_bytes_per_step",
            "/python/pss_intercept_bytes",
            "/python/publish_to_job_created_p50_s",
            "/python/publish_to_job_created_p99_s",
            "/python/step_exit_to_result_p50_s",
            "/python/step_exit_to_result_p99_s",
            "/python/api_requests_per_step",
            "/python/startup_s",
        ],
        _ => &[],
    }
}

/// Problems that make a run of the scenario invalid: a missing figure, a run that did not succeed.
pub fn check(scenario: &str, f: &Value) -> Vec<String> {
    let mut out: Vec<String> = required(scenario)
        .iter()
        .filter(|p| num(f, p).is_none())
        .map(|p| format!("figure {p} is missing"))
        .collect();
    // Every figure of the report must be there: a missing one renders as NaN.
    let rendered = section(scenario, f);
    let missing: Vec<&str> = rendered.lines().filter(|l| l.contains("NaN")).collect();
    if !missing.is_empty() {
        out.push(format!(
            "the report lacks figures (NaN) in:\n{}",
            missing.join("\n")
        ));
    }
    if scenario_of(scenario) == "coordinator" {
        let runs = num(f, "/params/runs").unwrap_or(0.0);
        let ok = num(f, "/celeriac/runs_succeeded").unwrap_or(-1.0);
        if ok != runs {
            out.push(format!("{ok} of {runs} coordinator runs succeeded"));
        }
        let py_runs = num(f, "/params/python_runs").unwrap_or(0.0);
        let py_ok = num(f, "/python/runs_succeeded").unwrap_or(-1.0);
        if py_ok != py_runs {
            out.push(format!("{py_ok} of {py_runs} Python runs succeeded"));
        }
    }
    if scenario_of(scenario) == "worker" {
        for p in f["problems"].as_array().into_iter().flatten() {
            out.push(p.as_str().unwrap_or_default().to_string());
        }
        for side in ["celeriac", "python"] {
            let steps = num(f, &format!("/{side}/steps")).unwrap_or(0.0);
            let ok = num(f, &format!("/{side}/results_success")).unwrap_or(-1.0);
            if steps == 0.0 || ok != steps {
                out.push(format!("{side}: {ok} of {steps} steps succeeded"));
            }
        }
    }
    out
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}
fn kb(bytes: f64) -> String {
    format!("{:.1} KB", bytes / 1e3)
}
fn ms(s: f64) -> String {
    format!("{:.1} ms", s * 1000.0)
}

/// How the worker fleet shared the machine with the coordinator (`LOAD_FLEET_NICE`; results from before
/// the knob ran at 0).
fn fleet_placement(nice: f64) -> String {
    if nice == 0.0 {
        "The worker and its step processes shared the machine's cores with the coordinator, the broker and \
         PostgreSQL at equal priority."
            .into()
    } else {
        format!(
            "The worker and its step processes ran at `nice {nice}` (`LOAD_FLEET_NICE`), standing for pods \
             on other nodes: the coordinator, the broker and PostgreSQL got the machine's cores first."
        )
    }
}

/// The report section of a scenario.
pub fn section(scenario: &str, f: &Value) -> String {
    let g = |p: &str| num(f, p).unwrap_or(f64::NAN);
    match scenario_of(scenario) {
        "coordinator" => format!(
            "## Run coordinator: {runs} concurrent runs of a 10-step job\n\n\
             One `celeriac coordinator` ({build} build) was handed {runs} runs at {rate}/s (steps of \
             {step} s on celeriac workers, `-c {wc}`, RabbitMQ + `rpc://`); {py} run(s) of the same job \
             went through Python's run worker (`dagster api execute_run`, one process per run) on the same \
             fleet right after. {placement} Machine load (1-minute average) {load0:.1} at the start, {load1:.1} at the \
             end.\n\n\
             | figure | celeriac coordinator | Python run worker |\n|---|---|---|\n\
             | runs succeeded | {ok} / {runs} | {pyok} / {py} |\n\
             | peak runs in flight | {peak} | {py} |\n\
             | memory | peak RSS {prss} for all runs (idle {irss}); **{per_run} per run** | **{pypss} PSS per run** (RSS {pyrss}) |\n\
             | launch → first step published, p50 / p99 | {l50} / {l99} | {pyl50} / {pylmax} (max) |\n\
             | step result → next step published, p50 / p99 | {n50} / {n99} (histogram: {h50} / {h99}) | {pyn50} / {pynmax} (max) |\n\
             | CPU per step | {cpu:.2} ms | — |\n\
             | wall time | {el:.1} s | — |\n\n\
             Result → next step is measured the same way on both sides from the event log: the last leaf \
             step's worker event written just before its result is stored, to the \"Submitting celery task\" \
             event of the join step (the histogram is the coordinator's own, from result received to the next \
             tasks published).\n",
            runs = g("/params/runs"),
            placement = fleet_placement(num(f, "/params/fleet_nice").unwrap_or(0.0)),
            build = f.pointer("/params/build").and_then(Value::as_str).unwrap_or("release"),
            load0 = g("/params/load_average_1m/start"),
            load1 = g("/params/load_average_1m/end"),
            rate = g("/params/rate"),
            step = g("/params/step_seconds"),
            wc = g("/params/worker_concurrency"),
            py = g("/params/python_runs"),
            ok = g("/celeriac/runs_succeeded"),
            pyok = g("/python/runs_succeeded"),
            peak = g("/celeriac/peak_runs_in_flight"),
            prss = mb(g("/celeriac/peak_rss_bytes")),
            irss = mb(g("/celeriac/idle_rss_bytes")),
            per_run = kb(g("/celeriac/rss_per_run_bytes")),
            pypss = mb(g("/python/run_worker_pss_bytes_mean")),
            pyrss = mb(g("/python/run_worker_rss_bytes_mean")),
            l50 = ms(g("/celeriac/launch_to_first_step_p50_s")),
            l99 = ms(g("/celeriac/launch_to_first_step_p99_s")),
            pyl50 = ms(g("/python/launch_to_first_step_p50_s")),
            pylmax = ms(g("/python/launch_to_first_step_max_s")),
            n50 = ms(g("/celeriac/result_to_next_step_p50_s")),
            n99 = ms(g("/celeriac/result_to_next_step_p99_s")),
            h50 = ms(g("/celeriac/histogram_result_to_submit_p50_s")),
            h99 = ms(g("/celeriac/histogram_result_to_submit_p99_s")),
            pyn50 = ms(g("/python/result_to_next_step_p50_s")),
            pynmax = ms(g("/python/result_to_next_step_max_s")),
            cpu = g("/celeriac/cpu_ms_per_step"),
            el = g("/celeriac/elapsed_s"),
        ),
        "worker" => worker_section(f),
        "soak" => soak_section(f),
        other => format!("## {other}\n\n(no renderer)\n"),
    }
}

/// The soak's section (`tests/tests/soak.rs` writes `soak.json`): runs, faults by kind, memory flatness.
fn soak_section(f: &Value) -> String {
    let mut faults: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for fault in f["faults"].as_array().into_iter().flatten() {
        *faults
            .entry(fault["fault"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let faults = faults
        .iter()
        .map(|(kind, n)| format!("{n} × {kind}"))
        .collect::<Vec<_>>()
        .join(", ");
    let memory = f["memory"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "{} {:.1} → {:.1} MB ({})",
                m["process"].as_str().unwrap_or("?"),
                m["early_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                m["late_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                if m["flat"].as_bool() == Some(true) {
                    "flat"
                } else {
                    "growing"
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    format!(
        "## Soak: {minutes} minutes of faults\n\n| figure | value |\n|---|---|\n| runs succeeded | {ok} / {runs} |\n\
         | faults | {faults} |\n| RSS per process, early → late | {memory} |\n| problems | {problems} |\n",
        minutes = f["minutes"].as_f64().unwrap_or(0.0),
        ok = f["succeeded"],
        runs = f["runs"],
        problems = f["problems"].as_array().map_or(0, Vec::len),
    )
}

/// The worker scenario's section: what ran, the table of figures per side, the table per level and
/// the ratio of the memory slopes.
fn worker_section(f: &Value) -> String {
    let mut s = worker_intro(f);
    worker_rows(f, &mut s);
    worker_levels(f, &mut s);
    worker_closing(f, &mut s);
    s
}

/// What ran, and the head of the table of figures.
fn worker_intro(f: &Value) -> String {
    let g = |p: &str| num(f, p).unwrap_or(f64::NAN);
    format!(
        "## Worker: `execute_step_k8s_job` through celeriac and Python's dagster-celery-k8s worker{on}\n\n\
         One `celeriac worker` ({build} build, Kubernetes launcher, `-c {cc}`) and Python's `celery -A \
         dagster_celery_k8s.app worker` (prefork, `-c` per level, `--prefetch-multiplier=1` as \
         `dagster-celery worker start` runs it) took the same tasks from {broker} (built with \
         `celeriac_dagster::submission::step_task` from `CeleriacRunLauncher`'s hand-off: Dagster's exact \
         queue, priority and kwargs), results to Redis, step Jobs on the Kubernetes 1.20 test cluster \
         (process kubelet, 1,000 pods; more Jobs wait unscheduled, tracked by the worker as running ones). \
         Each batch of steps (the load-step program) is held until the whole batch is in flight and the \
         worker side's PSS (every process of it, `/proc/<pid>/smaps_rollup`) has been sampled, then \
         released. Machine load (1-minute average) {load0:.1} at the start, {load1:.1} at the end; per \
         level below.\n\n\
         | figure | celeriac | Python |\n|---|---|---|\n",
        build = f
            .pointer("/params/build")
            .and_then(Value::as_str)
            .unwrap_or("release"),
        on = if redis_broker(f) { ", Redis broker" } else { "" },
        broker = if redis_broker(f) {
            "Redis (kombu's layout)"
        } else {
            "RabbitMQ"
        },
        cc = g("/params/celeriac_concurrency"),
        load0 = g("/params/load_average_1m/start"),
        load1 = g("/params/load_average_1m/end"),
    )
}

/// The rows of the table of figures, celeriac's column then Python's.
fn worker_rows(f: &Value, s: &mut String) {
    let g = |p: &str| num(f, p).unwrap_or(f64::NAN);
    let row = |figure: &str, key: &str, fmt: &dyn Fn(f64) -> String| {
        format!(
            "| {figure} | {} | {} |\n",
            fmt(g(&format!("/celeriac/{key}"))),
            fmt(g(&format!("/python/{key}")))
        )
    };
    s.push_str(&row(
        "memory per in-flight step (PSS slope)",
        "pss_slope_bytes_per_step",
        &kb,
    ));
    s.push_str(&row("memory intercept (PSS)", "pss_intercept_bytes", &mb));
    s.push_str(&row("idle worker side (PSS)", "idle_pss_bytes", &mb));
    s.push_str(&row(
        "publish → Job created p50",
        "publish_to_job_created_p50_s",
        &ms,
    ));
    s.push_str(&row(
        "publish → Job created p99",
        "publish_to_job_created_p99_s",
        &ms,
    ));
    s.push_str(&row(
        "step exit → result stored p50",
        "step_exit_to_result_p50_s",
        &ms,
    ));
    s.push_str(&row(
        "step exit → result stored p99",
        "step_exit_to_result_p99_s",
        &ms,
    ));
    s.push_str(&format!(
        "| Job complete → result p50 / p99 | {} / {} (the worker's histogram: watch event → events ready) | {} / {} (Job `completionTime`, whole seconds → result stored) |\n",
        ms(g("/celeriac/job_complete_to_result_p50_s")),
        ms(g("/celeriac/job_complete_to_result_p99_s")),
        ms(g("/python/job_complete_to_result_p50_s")),
        ms(g("/python/job_complete_to_result_p99_s")),
    ));
    s.push_str(&row(
        "API requests per step (+ shared watches)",
        "api_requests_per_step",
        &|v| format!("{v:.2}"),
    ));
    s.push_str(&format!(
        "| shared LIST/WATCH requests (whole run) | {} | {} |\n",
        g("/celeriac/api_requests_shared_watches"),
        g("/python/api_requests_shared_watches")
    ));
    s.push_str(&row(
        "API requests per second of step runtime",
        "api_requests_per_step_second",
        &|v| format!("{v:.4}"),
    ));
    s.push_str(&row(
        "start-up (process start → consuming)",
        "startup_s",
        &|v| format!("{v:.2} s"),
    ));
    s.push_str(&row("worker CPU per step", "cpu_ms_per_step", &|v| {
        format!("{v:.1} ms")
    }));
    let tally = |side: &str| {
        format!(
            "{} / {} / {}",
            g(&format!("/{side}/steps")),
            g(&format!("/{side}/lost")),
            g(&format!("/{side}/ran_twice"))
        )
    };
    s.push_str(&format!(
        "| steps / lost / ran twice | {} | {} |\n",
        tally("celeriac"),
        tally("python")
    ));
}

/// The table of figures per level (batch), celeriac's levels first.
fn worker_levels(f: &Value, s: &mut String) {
    // Redis has no publisher confirms: a publish is done when Redis answered the push.
    let published = if redis_broker(f) {
        "Redis took them"
    } else {
        "RabbitMQ confirmed them"
    };
    s.push_str(&format!(
        "\nPer level (one batch each; latencies of that batch; publish rate = as fast as {published}; \
         drain = release → every result stored):\n\n\
         | side | steps | in flight | PSS | RSS | published/s | publish → Job created p50 / p99 | step exit → result p50 / p99 | drain | load avg |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    ));
    for side in ["celeriac", "python"] {
        for l in f
            .pointer(&format!("/{side}/levels"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let v = |k: &str| l[k].as_f64().unwrap_or(f64::NAN);
            s.push_str(&format!(
                "| {side} | {} | {} | {} | {} | {:.0} | {} / {} | {} / {} | {:.1} s | {:.1} |\n",
                v("steps"),
                v("in_flight"),
                mb(v("pss_bytes")),
                mb(v("rss_bytes")),
                v("publish_per_s"),
                ms(v("publish_to_job_created_p50_s")),
                ms(v("publish_to_job_created_p99_s")),
                ms(v("step_exit_to_result_p50_s")),
                ms(v("step_exit_to_result_p99_s")),
                v("drain_s"),
                v("load_average_1m"),
            ));
        }
    }
}

fn redis_broker(f: &Value) -> bool {
    BrokerKind::of_figures(f) == BrokerKind::Redis
}

/// How much more memory per step Python takes, and where the plots are.
fn worker_closing(f: &Value, s: &mut String) {
    let g = |p: &str| num(f, p).unwrap_or(f64::NAN);
    let ratio = g("/python/pss_slope_bytes_per_step") / g("/celeriac/pss_slope_bytes_per_step");
    let stem = BrokerKind::of_figures(f).results_stem();
    s.push_str(&format!(
        "\nPython's memory per in-flight step is {ratio:.0}× celeriac's. Plots: [`results/{stem}-memory.png`](results/{stem}-memory.png), \
         [`results/{stem}-latency.png`](results/{stem}-latency.png). Step exit → result stored starts when the step program exits (before the \
         kubelet reports the pod and the Job controller marks the Job complete), so both sides' figures \
         include the cluster's own reaction time.\n"
    ));
}

/// Renders `REPORT.md` from `results/*.json`.
pub fn write(loadtest_dir: &Path) -> Result<()> {
    let mut body = String::from(
        "# Load test report\n\nGenerated by `cargo run -p celeriac-loadtest --release -- <scenario>` from \
         `loadtest/results/*.json` (raw figures there). Machine: 2 cores, 24 GB (the project's CI machine \
         kind), services on loopback.\n\n",
    );
    let mut entries: Vec<_> = std::fs::read_dir(loadtest_dir.join("results"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let f: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        body.push_str(&section(&name, &f));
        body.push('\n');
        // What the figures mean, written by hand after the run: `results/<scenario>.notes.md`.
        if let Ok(notes) = std::fs::read_to_string(path.with_extension("notes.md")) {
            body.push_str(&notes);
            body.push('\n');
        }
    }
    std::fs::write(loadtest_dir.join("REPORT.md"), body)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed report holds each scenario's section as rendered from its committed figures: the
    /// renderer still writes the same rows from the same keys.
    #[test]
    fn committed_report_renders_from_committed_results() {
        let dir = crate::env::repo_root().join("loadtest");
        let report = std::fs::read_to_string(dir.join("REPORT.md")).expect("REPORT.md");
        for scenario in ["coordinator", "worker"] {
            let path = dir.join("results").join(format!("{scenario}.json"));
            let f: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("results"))
                .expect("JSON");
            let rendered = section(scenario, &f);
            assert!(
                report.contains(&rendered),
                "REPORT.md lacks the {scenario} section as rendered now:\n{rendered}"
            );
            assert!(check(scenario, &f).is_empty(), "{:?}", check(scenario, &f));
        }
    }

    /// A worker run on Redis is checked as a worker run and rendered as one, with its broker named and
    /// its own plots linked (not the RabbitMQ run's).
    #[test]
    fn a_redis_worker_run_renders_as_the_worker_scenario_on_redis() {
        let dir = crate::env::repo_root().join("loadtest");
        let path = dir.join("results").join("worker.json");
        let mut f: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("results")).expect("JSON");
        f["params"]["broker"] = Value::from("redis");
        let stem = BrokerKind::of_figures(&f).results_stem();
        assert_eq!(stem, "worker-redis");
        assert!(check(stem, &f).is_empty(), "{:?}", check(stem, &f));
        let rendered = section(stem, &f);
        assert!(rendered.contains("worker, Redis broker"), "{rendered}");
        assert!(
            rendered.contains("from Redis (kombu's layout)"),
            "{rendered}"
        );
        assert!(
            rendered.contains("results/worker-redis-memory.png"),
            "{rendered}"
        );
        assert!(
            !rendered.contains("results/worker-memory.png"),
            "{rendered}"
        );
    }
}
