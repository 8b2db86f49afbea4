//! Monitoring proven in a real Prometheus (Debian's 2.42, `scripts/prometheus.sh`):
//!
//! * `promtool check rules` accepts the rendered PrometheusRule and `promtool test rules` passes the unit
//!   tests in `charts/celeriac/tests/rules/` against it, with a firing and a non-firing case per alert;
//! * Prometheus, started on loopback with the scrape configuration the chart's ServiceMonitor implies
//!   (job labels and relabelling derived from the rendered objects), scrapes a worker (Kubernetes
//!   launcher, on the real 1.20 test cluster), flower-compat and the run coordinator during real Dagster
//!   runs, and every PromQL expression of the dashboards, the alert rules and the KEDA trigger is
//!   evaluated through `/api/v1/query`: each returns data, except the alerts that must be silent in a
//!   healthy fleet (listed with their reason); their scrapes parse with `promtool check metrics`;
//! * the per-queue backlog series the scalers read rises with a real backlog and falls when a worker
//!   is added.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use celeriac_tests::chart::{metric_names, promql_expressions, render, Rendered};
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::k8s::TestNamespace;
use celeriac_tests::prometheus::{
    check_metrics, promtool, rule_file, scrape_config, values, Prometheus, ScrapeTarget,
};
use celeriac_tests::{
    artifacts_dir, celeriac_bin, ensure_services, free_port, http_get, repo_root, unique,
    wait_until, CeleriacProcess, WorkerProcess,
};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";

/// The alerts that must stay silent while the fleet is healthy, and why. Every other expression
/// must return data.
const SILENT_ALERTS: &[(&str, &str)] = &[
    ("CeleriacWorkerDown", "the worker is up and consuming"),
    (
        "CeleriacStepFailureRatioHigh",
        "each job's failure ratio (its signal, in the report) is under failureRatio 0.25",
    ),
    (
        "CeleriacBacklogStuck",
        "steps started on the queue within the window",
    ),
    (
        "CeleriacKubernetesApiErrors",
        "no Kubernetes API request failed (firing case: promtool unit test)",
    ),
    ("CeleriacCoordinatorDown", "the coordinator is scraped"),
    ("CeleriacRunStuck", "runs progressed within runStuckMinutes"),
    (
        "CeleriacCoordinatorTakeovers",
        "no replica died, nothing was taken over",
    ),
];

/// Expressions that read a series which exists only after an event a healthy run does not have.
const EMPTY_WITHOUT_EVENT: &[(&str, &str)] = &[(
    "celeriac_kubernetes_api_errors_total",
    "no Kubernetes API request failed during the runs; the series appears with the first failed request (the alert's firing case is in the promtool unit tests)",
)];

/// The chart values for the monitoring tests: one queue, coordinator, flower-compat, KEDA, the
/// ServiceMonitor (2 s scrapes), rules and dashboards.
fn values_for(queue: &str) -> String {
    format!(
        r#"
workerQueues:
  - {{name: {queue}, replicaCount: 1, concurrency: 4}}
coordinator: {{enabled: true}}
flower: {{enabled: true}}
autoscaling: {{enabled: true, keda: {{enabled: true}}}}
serviceMonitor: {{enabled: true, interval: "2s", scrapeTimeout: "1s"}}
prometheusRule: {{enabled: true}}
grafanaDashboards: {{enabled: true}}
"#
    )
}

fn deployment_name(rendered: &[Rendered], component: &str) -> String {
    rendered
        .iter()
        .find(|r| {
            r.kind() == "Deployment"
                && r.object["metadata"]["labels"]["app.kubernetes.io/component"] == component
        })
        .map(|r| r.name().to_string())
        .unwrap_or_else(|| component.to_string())
}

/// `promtool check rules` on the rendered PrometheusRule; `promtool test rules` with the repo's unit
/// tests against it; every alert has a firing and a non-firing case.
#[test]
fn promtool_checks_the_rendered_rules_and_passes_their_unit_tests() -> Result<()> {
    let rendered = render(
        "coordinator: {enabled: true}\nprometheusRule: {enabled: true}\n",
        "celeriac",
        "dagster",
    )?;
    let rules = rule_file(&rendered)?;
    let dir = artifacts_dir().join(unique("promtool_rules"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("rules.yaml"), serde_json::to_vec_pretty(&rules)?)?;
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"], &dir)?;
    assert!(ok, "promtool check rules:\n{out}");
    let alerts: BTreeSet<String> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    assert_eq!(alerts.len(), 7, "the chart's alerts: {alerts:?}");
    println!("promtool check rules: {}", out.trim());

    let tests_dir = repo_root().join("charts/celeriac/tests/rules");
    let mut files = Vec::new();
    let mut firing: BTreeSet<String> = BTreeSet::new();
    let mut silent: BTreeSet<String> = BTreeSet::new();
    for entry in std::fs::read_dir(&tests_dir)? {
        let path = entry?.path();
        if !path.to_string_lossy().ends_with(".test.yaml") {
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_owned();
        std::fs::copy(&path, dir.join(&name))?;
        files.push(name.to_string_lossy().into_owned());
        // The cases per alert, read with the YAML parser promtool itself uses would be best; the
        // files are simple enough for a line scan: `alertname:` then `exp_alerts: []` or a list.
        let text = std::fs::read_to_string(&path)?;
        let mut alert = None;
        for line in text.lines().map(str::trim) {
            if let Some(a) = line.strip_prefix("alertname:") {
                alert = Some(a.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
                if let Some(a) = alert.take() {
                    if rest.trim() == "[]" {
                        silent.insert(a);
                    } else {
                        firing.insert(a);
                    }
                }
            }
        }
    }
    assert!(
        !files.is_empty(),
        "no *.test.yaml in {}",
        tests_dir.display()
    );
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    let (ok, out) = promtool(&args, &dir)?;
    assert!(ok, "promtool test rules:\n{out}");
    println!("promtool test rules: {}", out.trim());
    for a in &alerts {
        assert!(firing.contains(a), "{a}: no firing case in the unit tests");
        assert!(
            silent.contains(a),
            "{a}: no non-firing case in the unit tests"
        );
    }
    assert!(
        firing.is_subset(&alerts) && silent.is_subset(&alerts),
        "unit tests name alerts the chart does not have: {firing:?} {silent:?}"
    );
    Ok(())
}

/// `celeriac flower` on a free port, until dropped.
struct Flower {
    child: std::process::Child,
    port: u16,
}

impl Flower {
    fn start(broker: &str, backend: &str) -> Result<Flower> {
        let port = free_port()?;
        let log = std::fs::File::create(artifacts_dir().join(format!("{}.log", unique("flower"))))?;
        let child = Command::new(celeriac_bin())
            .args(["flower", "-b", broker, "--result-backend", backend])
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()?;
        let f = Flower { child, port };
        wait_until("flower-compat healthy", Duration::from_secs(30), || {
            Ok(http_get(&format!("http://127.0.0.1:{port}/healthcheck"))
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|_| ()))
        })?;
        Ok(f)
    }
}

impl Drop for Flower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces Grafana's variables: template variables by the regex of their values (as "All"),
/// `$__rate_interval` and `$__range` by windows that cover the test's runs (the four runs take
/// minutes: with a 1 m rate window the per-job ratios of the earlier runs' jobs were 0/0 by the
/// "after" pass, and the test failed or passed on how long they had taken).
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let mut e = expr
        .replace("$__rate_interval", "10m")
        .replace("$__range", "15m");
    // Longest names first ($coordinator_job before $job).
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for n in names {
        e = e.replace(&format!("${n}"), &vars[n]);
    }
    e
}

/// `label_values(metric, label)` → `(metric, label)`.
fn label_values_query(q: &str) -> Option<(String, String)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (m, l) = inner.split_once(',')?;
    Some((m.trim().to_string(), l.trim().to_string()))
}

/// An alert expression without its final `> N` threshold (the quantity the alert watches).
fn alert_signal(expr: &str) -> Option<String> {
    let e = expr.trim();
    if [" unless ", " and ", " or "]
        .iter()
        .any(|op| e.contains(op))
    {
        return None; // a set expression: no single watched quantity
    }
    let i = e.rfind('>')?;
    let threshold = e[i + 1..].trim();
    threshold
        .parse::<f64>()
        .ok()
        .map(|_| e[..i].trim().to_string())
}

fn alert_name(place: &str) -> Option<&str> {
    place
        .strip_prefix("PrometheusRule Some(\"")
        .and_then(|s| s.strip_suffix("\")"))
}

/// The real test: a worker (Kubernetes launcher), flower-compat and the coordinator scraped by
/// Prometheus as the ServiceMonitor says, real Dagster runs, every expression evaluated.
#[test]
fn prometheus_evaluates_every_dashboard_rule_and_scaler_expression_on_a_live_run() -> Result<()> {
    ensure_services();
    let ns = TestNamespace::create()?;
    let queue = unique("prom");
    let rendered = render(&values_for(&queue), "celeriac", "dagster")?;
    let home = DagsterHome::create_coordinator(
        AMQP,
        "rpc://",
        &[
            "--namespace",
            &ns.name,
            "--kubeconfig",
            &ns.kubeconfig.display().to_string(),
            "--image",
            "celeriac/dagster-step:test",
        ],
    )?;
    let kubeconfig = ns.kubeconfig.display().to_string();
    let envs = [
        ("CELERIAC_QUEUE", queue.as_str()),
        ("SLEEP_SECONDS", "4"),
        ("KUBECONFIG", kubeconfig.as_str()),
    ];
    let worker = WorkerProcess::start(
        &[
            "-b",
            AMQP,
            "--result-backend",
            "rpc://",
            "-Q",
            &queue,
            "-c",
            "4",
            "-E",
            "--launcher",
            "kubernetes",
        ],
        &envs,
    )?;
    let coordinator_pod = format!("{}-0", deployment_name(&rendered, "coordinator"));
    let coordinator = CeleriacProcess::coordinator(
        &home.dir.join("dagster.yaml"),
        AMQP,
        "rpc://",
        &coordinator_pod,
        &[],
    )?;
    let flower = Flower::start(AMQP, "rpc://")?;
    let targets = [
        ScrapeTarget {
            component: "worker".into(),
            address: worker.http_addr().context("worker HTTP address")?,
            pod: format!("{}-0", deployment_name(&rendered, "worker")),
        },
        ScrapeTarget {
            component: "flower".into(),
            address: format!("127.0.0.1:{}", flower.port),
            pod: format!("{}-0", deployment_name(&rendered, "flower")),
        },
        ScrapeTarget {
            component: "coordinator".into(),
            address: coordinator
                .http_addr()
                .context("coordinator HTTP address")?,
            pod: coordinator_pod.clone(),
        },
    ];
    let scrape = scrape_config(&rendered, "dagster", &targets)?;
    let prometheus = Prometheus::start(&[scrape], "2s", &[rule_file(&rendered)?])?;
    prometheus.wait_targets_up(3, Duration::from_secs(30))?;
    // The job labels the dashboards and alerts select are the ones a cluster would give.
    let jobs: BTreeSet<String> = prometheus
        .targets()?
        .iter()
        .filter_map(|(l, _, _)| l["job"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        jobs,
        BTreeSet::from([
            "celeriac-celery-workers".to_string(),
            "celeriac-celeriac-flower".to_string(),
            "celeriac-celeriac-coordinator".to_string(),
        ]),
        "job labels from the ServiceMonitor's jobLabel"
    );

    let exprs = promql_expressions(&rendered);
    // Real Dagster runs through the coordinator and the worker: a slow fan-in (steps in flight while
    // the "during" pass samples), a run with a failing step, a run with a retried step.
    let started = Instant::now();
    let (during, runs) = std::thread::scope(|s| -> Result<_> {
        let runner = s.spawn(|| -> Result<Vec<(String, String)>> {
            let mut out = Vec::new();
            for shape in ["slow", "fail_abandon", "retry_success"] {
                let r = home.run_shape(shape, "launch", Duration::from_secs(300), &envs)?;
                out.push((
                    shape.to_string(),
                    r["status"].as_str().unwrap_or("").to_string(),
                ));
            }
            // A run terminated while its steps run (Dagster's termination: the coordinator revokes
            // them with terminate): the cancelled outcome.
            let mut slow_envs = envs.to_vec();
            slow_envs[1] = ("SLEEP_SECONDS", "30");
            let r = home.run_shape_with(
                "slow",
                "launch",
                &["--no-wait"],
                Duration::from_secs(60),
                &slow_envs,
            )?;
            let run_id = r["run_id"].as_str().context("launched run id")?.to_string();
            wait_until("the slow steps in flight", Duration::from_secs(120), || {
                let r = prometheus.query(&format!(
                    "sum(celeriac_queue_in_flight{{queue_name=\"{queue}\"}}) > 1"
                ))?;
                Ok((!values(&r).is_empty()).then_some(()))
            })?;
            home.run_shape_with(
                "-",
                "terminate",
                &["--run-id", &run_id],
                Duration::from_secs(60),
                &[],
            )?;
            let status = wait_until("the terminated run ends", Duration::from_secs(90), || {
                let s = home.run_shape_with(
                    "-",
                    "summary",
                    &["--run-id", &run_id],
                    Duration::from_secs(60),
                    &[],
                )?;
                let status = s["status"].as_str().unwrap_or("").to_string();
                Ok(matches!(status.as_str(), "CANCELED" | "FAILURE" | "SUCCESS").then_some(status))
            })?;
            out.push(("slow (terminated)".to_string(), status));
            Ok(out)
        });
        // During: once a step is in flight, evaluate everything once (recorded in the report).
        wait_until("a step in flight", Duration::from_secs(120), || {
            let r = prometheus.query(&format!(
                "sum(celeriac_queue_in_flight{{queue_name=\"{queue}\"}}) > 0"
            ))?;
            Ok((!values(&r).is_empty()).then_some(()))
        })?;
        let during = evaluate(&prometheus, &exprs)?;
        let runs = runner
            .join()
            .map_err(|_| anyhow::anyhow!("runner panicked"))??;
        Ok((during, runs))
    })?;
    println!("runs: {runs:?} in {:?}", started.elapsed());
    assert_eq!(
        runs.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        ["SUCCESS", "FAILURE", "SUCCESS", "CANCELED"],
        "the runs end as their shapes say"
    );
    // After: two scrapes and the workers' 10 s queue-length poll later.
    std::thread::sleep(Duration::from_secs(12));
    let after = evaluate(&prometheus, &exprs)?;

    // Prometheus's own parser on each process's /metrics.
    let mut parse_report = String::new();
    for t in &targets {
        let (status, body) = http_get(&format!("http://{}/metrics", t.address))?;
        assert_eq!(status, 200, "{} /metrics", t.component);
        let (ok, out) = check_metrics(&body)?;
        let _ = writeln!(
            parse_report,
            "{}: {} series lines, promtool check metrics: {}",
            t.component,
            body.lines().filter(|l| !l.starts_with('#')).count(),
            if out.trim().is_empty() {
                "clean"
            } else {
                out.trim()
            }
        );
        assert!(ok, "promtool check metrics on {}:\n{out}", t.component);
    }

    // The report, then the verdict.
    let mut report = String::from(
        "# PromQL evaluated by Prometheus 2.42 against a live run\n\n| where | expression | during | after |\n|---|---|---|---|\n",
    );
    let mut problems = Vec::new();
    let mut empty_listed = Vec::new();
    for (i, (place, expr)) in exprs.iter().enumerate() {
        let (d, a) = (&during[i], &after[i]);
        let _ = writeln!(
            report,
            "| {} | `{}` | {} | {} |",
            place.replace('|', "/"),
            expr.replace('|', "\\|").replace('\n', " "),
            d.1,
            a.1
        );
        if let Some(alert) = alert_name(place) {
            if let Some((_, why)) = SILENT_ALERTS.iter().find(|(n, _)| *n == alert) {
                if !a.0.is_empty() {
                    problems.push(format!("{alert} fires in a healthy fleet: {}", a.1));
                }
                // Its signal (the expression before its final threshold) reads live data.
                let waits_for_event = EMPTY_WITHOUT_EVENT
                    .iter()
                    .any(|(m, _)| metric_names(expr).contains(*m));
                let signal = alert_signal(expr).map(|e| -> Result<String> {
                    let v = values(&prometheus.query(&e)?);
                    if v.is_empty() && !waits_for_event {
                        problems.push(format!("{alert}: its signal has no data: {e}"));
                    }
                    Ok(format!("signal `{e}` = {v:?}"))
                });
                let signal = match signal {
                    Some(r) => format!("; {}", r?),
                    None => String::new(),
                };
                empty_listed.push(format!("{alert}: silent ({why}){signal}"));
                continue;
            }
        }
        let names = metric_names(expr);
        if let Some((m, why)) = EMPTY_WITHOUT_EVENT.iter().find(|(m, _)| names.contains(*m)) {
            if a.0.is_empty() && d.0.is_empty() {
                empty_listed.push(format!("{place}: empty ({m}: {why})"));
                continue;
            }
        }
        if a.0.is_empty() && d.0.is_empty() {
            problems.push(format!("{place}: no data: {expr}"));
        } else if a.0.iter().any(|v| v.is_nan()) && d.0.iter().all(|v| v.is_nan()) {
            problems.push(format!("{place}: NaN: {expr} (after: {})", a.1));
        }
    }
    let _ = writeln!(
        report,
        "\nDeliberately empty:\n\n{}\n\n{parse_report}",
        empty_listed
            .iter()
            .map(|e| format!("- {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    std::fs::write(artifacts_dir().join("prometheus_promql.md"), &report)?;
    println!(
        "{} expressions evaluated; {} deliberately empty: {empty_listed:#?}\n{parse_report}",
        exprs.len(),
        empty_listed.len()
    );
    assert!(
        problems.is_empty(),
        "{} expressions without data:\n{}\nreport: tests/artifacts/prometheus_promql.md\n{}",
        problems.len(),
        problems.join("\n"),
        prometheus.log_text()
    );
    drop(coordinator);
    drop(worker);
    Ok(())
}

/// Evaluates every expression (Grafana variables resolved through Prometheus itself): per
/// expression, its numbers and a short rendering for the report.
fn evaluate(
    prometheus: &Prometheus,
    exprs: &[(String, String)],
) -> Result<Vec<(Vec<f64>, String)>> {
    let mut vars = BTreeMap::new();
    for (_, e) in exprs {
        if let Some((metric, label)) = label_values_query(e) {
            let values = prometheus.label_values(&label, &metric)?;
            let name = match label.as_str() {
                "queue_name" => "queue".to_string(),
                "job" if metric.starts_with("celeriac_coordinator_") => "coordinator_job".into(),
                other => other.to_string(),
            };
            vars.insert(name, values.join("|"));
        }
    }
    let mut out = Vec::new();
    for (_, e) in exprs {
        if let Some((metric, label)) = label_values_query(e) {
            let v = prometheus.label_values(&label, &metric)?;
            out.push((
                vec![v.len() as f64; usize::from(!v.is_empty())],
                format!("{v:?}"),
            ));
            continue;
        }
        let q = substitute(e, &vars);
        let r = prometheus.query(&q).with_context(|| format!("query {q}"))?;
        let nums = values(&r);
        let shown = if nums.is_empty() {
            "empty".to_string()
        } else {
            let mut s: Vec<String> = nums.iter().take(4).map(|v| format!("{v:.3}")).collect();
            if nums.len() > 4 {
                s.push(format!("… ({} series)", nums.len()));
            }
            s.join(", ")
        };
        out.push((nums, shown));
    }
    Ok(out)
}

/// The per-queue backlog series the scalers read (the rendered KEDA query; the HPA's External
/// metric is the same sum) follows a real backlog: the queue's only worker has one slot, so the
/// steps of a fan-out run wait in the broker and the series rises; a second worker joins and the
/// series falls back to zero.
#[test]
fn the_backlog_series_rises_and_falls_with_a_real_backlog() -> Result<()> {
    ensure_services();
    let (qa, qb) = (unique("blga"), unique("blgb"));
    let rendered = render(
        &format!(
            r#"
workerQueues:
  - {{name: {qa}, replicaCount: 1, concurrency: 1}}
autoscaling: {{enabled: true, keda: {{enabled: true}}}}
serviceMonitor: {{enabled: true, interval: "2s", scrapeTimeout: "1s"}}
"#
        ),
        "celeriac",
        "dagster",
    )?;
    let keda_query = rendered
        .iter()
        .find(|r| r.kind() == "ScaledObject")
        .and_then(|r| r.object["spec"]["triggers"][0]["metadata"]["query"].as_str())
        .context("the KEDA query")?
        .to_string();
    assert!(keda_query.contains(&qa), "{keda_query}");
    let home = DagsterHome::create(AMQP, "rpc://")?;
    let envs = [
        ("CELERIAC_QUEUE", qa.as_str()),
        ("CELERIAC_QUEUE_A", qa.as_str()),
        ("CELERIAC_QUEUE_B", qb.as_str()),
        ("SLEEP_SECONDS", "3"),
    ];
    // The queue's one replica (minReplicas is 1: a queue always has a worker exporting the series).
    let first = WorkerProcess::start(
        &[
            "-b",
            AMQP,
            "--result-backend",
            "rpc://",
            "-Q",
            &qa,
            "-c",
            "1",
        ],
        &envs,
    )?;
    let second_b = WorkerProcess::start(
        &[
            "-b",
            AMQP,
            "--result-backend",
            "rpc://",
            "-Q",
            &qb,
            "-c",
            "8",
        ],
        &envs,
    )?;
    let targets = [ScrapeTarget {
        component: "worker".into(),
        address: first.http_addr().context("worker address")?,
        pod: format!("{}-0", deployment_name(&rendered, "worker")),
    }];
    let prometheus =
        Prometheus::start(&[scrape_config(&rendered, "dagster", &targets)?], "2s", &[])?;
    prometheus.wait_targets_up(1, Duration::from_secs(30))?;
    let backlog = |p: &Prometheus| -> Result<Option<f64>> {
        Ok(values(&p.query(&keda_query)?).first().copied())
    };
    wait_until("the idle backlog reads 0", Duration::from_secs(40), || {
        Ok((backlog(&prometheus)? == Some(0.0)).then_some(()))
    })?;

    // `two_queues`: 8 sleeping ops on queue A, 8 on B, all ready at once.
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let t0 = Instant::now();
    let mut peak = 0.0f64;
    std::thread::scope(|s| -> Result<()> {
        let run = s.spawn(|| home.run_job("two_queues", Duration::from_secs(300), &envs));
        wait_until("the backlog rises", Duration::from_secs(90), || {
            let b = backlog(&prometheus)?.unwrap_or(0.0);
            samples.push((t0.elapsed().as_secs_f64(), b));
            peak = peak.max(b);
            Ok((b >= 6.0).then_some(()))
        })?;
        // A second replica for queue A (what KEDA/the HPA does on that signal).
        let second = WorkerProcess::start(
            &[
                "-b",
                AMQP,
                "--result-backend",
                "rpc://",
                "-Q",
                &qa,
                "-c",
                "8",
            ],
            &envs,
        )?;
        let mut targets2 = targets.to_vec();
        targets2.push(ScrapeTarget {
            component: "worker".into(),
            address: second.http_addr().context("second worker address")?,
            pod: format!("{}-1", deployment_name(&rendered, "worker")),
        });
        // The new replica becomes a target (its in-flight steps are part of the sum).
        prometheus.reload(&[scrape_config(&rendered, "dagster", &targets2)?])?;
        prometheus.wait_targets_up(2, Duration::from_secs(30))?;
        let falling = std::cell::RefCell::new(Vec::new());
        wait_until("the backlog falls to 0", Duration::from_secs(120), || {
            let b = backlog(&prometheus)?.unwrap_or(f64::NAN);
            falling.borrow_mut().push((t0.elapsed().as_secs_f64(), b));
            Ok((b == 0.0).then_some(()))
        })
        .with_context(|| {
            format!(
                "rising {samples:?}, falling {:?}; series: {:?}",
                falling.borrow(),
                prometheus.query("{__name__=~\"celery_queue_length|celeriac_queue_in_flight\"}")
            )
        })?;
        samples.extend(falling.into_inner());
        let summary = run.join().map_err(|_| anyhow::anyhow!("run panicked"))??;
        assert_eq!(summary.status, "SUCCESS", "{summary:?}");
        drop(second);
        Ok(())
    })?;
    drop(second_b);
    samples.dedup_by(|b, a| a.1 == b.1);
    let changes: Vec<String> = samples
        .iter()
        .map(|(t, b)| format!("{t:.1}s: {b}"))
        .collect();
    println!("backlog series (changes): {}", changes.join(", "));
    assert_eq!(samples.last().map(|s| s.1), Some(0.0), "falls back to 0");
    assert!(peak >= 6.0, "peak {peak}");
    Ok(())
}
