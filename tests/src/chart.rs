//! The Helm chart (`charts/celeriac`) seen through real tools: Helm v4 (`helm-python-sdk`) renders,
//! lints and schema-checks it; k8s-openapi's types check every built-in object field by field; the
//! upstream prometheus-operator and KEDA models (npm `@kubernetes-models/*`, TypeScript + JSON
//! schema) check the custom resources; PromQL expressions are reduced to the metric names they read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::{artifacts_dir, prepared_dir, repo_root, run_with_timeout, unique};

/// The chart directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts").join("celeriac")
}

/// `charts/celeriac/ci/*-values.yaml`: the values files every render test covers.
pub fn ci_values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    files
}

/// The chart tool directory (`scripts/chart-peers.sh`: Helm's venv, the npm CRD models), made once.
fn tools() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| prepared_dir("chart-peers.sh"))
}

fn helm(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(tools().join("venv/bin/python"));
    cmd.arg(repo_root().join("tests/peers/chart.py")).args(args);
    run_with_timeout(cmd, Duration::from_secs(120)).with_context(|| format!("chart.py {args:?}"))
}

fn values_file(values_yaml: &str) -> Result<PathBuf> {
    let path = artifacts_dir().join(format!("{}.values.yaml", unique("chart")));
    std::fs::write(&path, values_yaml)?;
    Ok(path)
}

/// One rendered object and the template it came from.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub template: String,
    pub object: Value,
}

impl Rendered {
    pub fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or_default()
    }

    pub fn api_version(&self) -> &str {
        self.object["apiVersion"].as_str().unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// Renders the chart with a values file, as release `release` in `namespace`.
pub fn render_file(values: &Path, release: &str, namespace: &str) -> Result<Vec<Rendered>> {
    let out = helm(&[
        "render",
        &chart_dir().display().to_string(),
        &values.display().to_string(),
        release,
        namespace,
    ])?;
    let docs: Vec<Value> = serde_json::from_str(&out).context("chart.py render output")?;
    Ok(docs
        .into_iter()
        .map(|d| Rendered {
            template: d["template"].as_str().unwrap_or_default().to_string(),
            object: d["object"].clone(),
        })
        .collect())
}

/// Renders the chart with inline values.
pub fn render(values_yaml: &str, release: &str, namespace: &str) -> Result<Vec<Rendered>> {
    render_file(&values_file(values_yaml)?, release, namespace)
}

/// Helm's lint report for a values file: `(severity, path, message)` of every finding.
pub fn lint(values: &Path) -> Result<Vec<(u64, String, String)>> {
    let out = helm(&[
        "lint",
        &chart_dir().display().to_string(),
        &values.display().to_string(),
    ])?;
    let report: Value = serde_json::from_str(&out).context("chart.py lint output")?;
    let mut findings: Vec<(u64, String, String)> = report["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["severity"].as_u64().unwrap_or(0),
                m["path"].as_str().unwrap_or_default().to_string(),
                m["error"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for e in report["errors"].as_array().into_iter().flatten() {
        findings.push((3, String::new(), e.to_string()));
    }
    Ok(findings)
}

/// Renders inline values expecting Helm to refuse them; returns Helm's message (Err if accepted).
pub fn rejection(values_yaml: &str) -> Result<String> {
    let path = values_file(values_yaml)?;
    let out = helm(&[
        "schema",
        &chart_dir().display().to_string(),
        &path.display().to_string(),
    ])?;
    let v: Value = serde_json::from_str(&out)?;
    if v["ok"].as_bool() == Some(true) {
        bail!("Helm accepted the values:\n{values_yaml}");
    }
    Ok(v["error"].as_str().unwrap_or_default().to_string())
}

/// Checks custom resources against their upstream models; returns the problems found.
pub fn crd_problems(objects: &[Value]) -> Result<Vec<String>> {
    let input = artifacts_dir().join(format!("{}.crds.json", unique("chart")));
    std::fs::write(&input, serde_json::to_vec(objects)?)?;
    let mut cmd = Command::new("node");
    cmd.arg(repo_root().join("tests/peers/crd_check.mjs"))
        .arg(tools())
        .arg(&input);
    let out = run_with_timeout(cmd, Duration::from_secs(180)).context("crd_check.mjs")?;
    let v: Value = serde_json::from_str(out.trim()).context("crd_check.mjs output")?;
    if v["checked"].as_u64() != Some(objects.len() as u64) {
        bail!(
            "crd_check.mjs checked {} of {} objects",
            v["checked"],
            objects.len()
        );
    }
    Ok(v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e.as_str().unwrap_or_default().to_string())
        .collect())
}

/// Deserializes `object` into `T` and serializes it back; every field of the original that does
/// not survive (an unknown field, a misspelt key, a value of the wrong shape) is reported by path.
pub fn roundtrip_problems<T: DeserializeOwned + Serialize>(object: &Value) -> Vec<String> {
    let typed: T = match serde_json::from_value(object.clone()) {
        Ok(t) => t,
        Err(e) => return vec![format!("does not deserialize: {e}")],
    };
    let back = match serde_json::to_value(&typed) {
        Ok(v) => v,
        Err(e) => return vec![format!("does not serialize back: {e}")],
    };
    let mut problems = Vec::new();
    diff("", object, &back, &mut problems);
    problems
}

fn diff(path: &str, original: &Value, back: &Value, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => diff(&p, v, w, out),
                    None => out.push(format!("{p}: unknown field (dropped by the typed model)")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} came back as {b}")),
    }
}

/// Checks a built-in object against its k8s-openapi type (by apiVersion and kind).
pub fn builtin_problems(object: &Value) -> Option<Vec<String>> {
    use k8s_openapi::api::{apps, autoscaling, core, policy, rbac};
    let key = format!(
        "{}/{}",
        object["apiVersion"].as_str().unwrap_or_default(),
        object["kind"].as_str().unwrap_or_default()
    );
    Some(match key.as_str() {
        "v1/ConfigMap" => roundtrip_problems::<core::v1::ConfigMap>(object),
        "v1/Secret" => roundtrip_problems::<core::v1::Secret>(object),
        "v1/Service" => roundtrip_problems::<core::v1::Service>(object),
        "v1/ServiceAccount" => roundtrip_problems::<core::v1::ServiceAccount>(object),
        "apps/v1/Deployment" => roundtrip_problems::<apps::v1::Deployment>(object),
        "rbac.authorization.k8s.io/v1/Role" => roundtrip_problems::<rbac::v1::Role>(object),
        "rbac.authorization.k8s.io/v1/RoleBinding" => {
            roundtrip_problems::<rbac::v1::RoleBinding>(object)
        }
        "policy/v1/PodDisruptionBudget" => {
            roundtrip_problems::<policy::v1::PodDisruptionBudget>(object)
        }
        "autoscaling/v2/HorizontalPodAutoscaler" => {
            roundtrip_problems::<autoscaling::v2::HorizontalPodAutoscaler>(object)
        }
        _ => return None,
    })
}

/// Every PromQL expression in the rendered objects: dashboard panel targets and template
/// variables, PrometheusRule rules, KEDA Prometheus triggers. `(where, expression)`.
pub fn promql_expressions(rendered: &[Rendered]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in rendered {
        match r.kind() {
            "ConfigMap" => {
                for (key, text) in r.object["data"].as_object().into_iter().flatten() {
                    if !key.ends_with(".json") {
                        continue;
                    }
                    let Ok(dash) = serde_json::from_str::<Value>(text.as_str().unwrap_or(""))
                    else {
                        out.push((format!("{key}: not JSON"), String::new()));
                        continue;
                    };
                    for p in dash["panels"].as_array().into_iter().flatten() {
                        for t in p["targets"].as_array().into_iter().flatten() {
                            if let Some(e) = t["expr"].as_str() {
                                out.push((format!("{key}: {}", p["title"]), e.to_string()));
                            }
                        }
                    }
                    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
                        if let Some(q) = v["query"]["query"].as_str() {
                            out.push((format!("{key}: variable {}", v["name"]), q.to_string()));
                        }
                    }
                }
            }
            "PrometheusRule" => {
                for g in r.object["spec"]["groups"].as_array().into_iter().flatten() {
                    for rule in g["rules"].as_array().into_iter().flatten() {
                        if let Some(e) = rule["expr"].as_str() {
                            let name = rule["alert"].as_str().or(rule["record"].as_str());
                            out.push((format!("PrometheusRule {name:?}"), e.to_string()));
                        }
                    }
                }
            }
            "ScaledObject" => {
                for t in r.object["spec"]["triggers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if let Some(q) = t["metadata"]["query"].as_str() {
                        out.push((format!("ScaledObject {}", r.name()), q.to_string()));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// PromQL aggregation operators (`sum by (le) (…)`: not followed by their parenthesis).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// PromQL keywords (never metric names).
const PROMQL_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// The metric names a PromQL expression (or a Grafana `label_values(metric, label)` query) reads:
/// identifiers that are not functions, keywords, label names in `{…}` or in `by (…)`-style lists,
/// later arguments of `label_values`, range durations, `$variables` or string contents.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    /// An open parenthesis: the function it calls ("" for grouping), whether it is a label list,
    /// whether a comma has been seen in it.
    struct Open {
        function: String,
        label_list: bool,
        after_comma: bool,
    }
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut opens: Vec<Open> = Vec::new();
    let (mut brace, mut bracket) = (0usize, 0usize);
    let mut pending_label_list = false;
    let mut last_function = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '{' => brace += 1,
            '}' => brace = brace.saturating_sub(1),
            '[' => bracket += 1,
            ']' => bracket = bracket.saturating_sub(1),
            '(' => {
                opens.push(Open {
                    function: std::mem::take(&mut last_function),
                    label_list: std::mem::take(&mut pending_label_list),
                    after_comma: false,
                });
            }
            ')' => {
                opens.pop();
            }
            ',' => {
                if let Some(o) = opens.last_mut() {
                    o.after_comma = true;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let prev = chars[..start].iter().rev().find(|c| !c.is_whitespace());
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                let open = opens.last();
                let skip = brace > 0
                    || bracket > 0
                    || prev == Some(&'$')
                    || prev.is_some_and(|p| p.is_ascii_digit())
                    || open.is_some_and(|o| {
                        o.label_list || (o.function == "label_values" && o.after_comma)
                    });
                let lower = word.to_lowercase();
                if skip {
                } else if PROMQL_WORDS.contains(&lower.as_str()) {
                    pending_label_list = matches!(
                        lower.as_str(),
                        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                    );
                } else if next == Some(&'(') || AGGREGATIONS.contains(&word.as_str()) {
                    last_function = word;
                } else {
                    names.insert(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// Metric sample names in a Prometheus text exposition (`_bucket`/`_sum`/`_count` included).
pub fn scraped_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The prefix of every metric name the run coordinator (`celeriac coordinator`) exports.
pub const COORDINATOR_METRIC_PREFIX: &str = "celeriac_coordinator_";

/// The metrics `celeriac coordinator` exports (names final, all present from start-up): `(name, type)`.
///
/// The chart's dashboards and alert rules are checked against this list (`tests/tests/helm_chart.rs`
/// runs no coordinator); the coordinator's own test scrapes a live coordinator's `/metrics` and checks
/// that every series of [`coordinator_series_names`] is there, which ties this list to the binary.
pub const COORDINATOR_METRICS: &[(&str, &str)] = &[
    ("celeriac_coordinator_runs_owned", "gauge"),
    ("celeriac_coordinator_steps_in_flight", "gauge"),
    ("celeriac_coordinator_result_to_submit_seconds", "histogram"),
    (
        "celeriac_coordinator_launch_to_first_submit_seconds",
        "histogram",
    ),
    ("celeriac_coordinator_takeovers_total", "counter"),
    ("celeriac_coordinator_runs_finished_total", "counter"),
    ("celeriac_coordinator_seconds_since_progress", "gauge"),
    ("celeriac_coordinator_leases_renewed_total", "counter"),
];

/// The sample names of [`COORDINATOR_METRICS`] as PromQL reads them and a scrape shows them: a
/// histogram `h` as `h_bucket`, `h_sum` and `h_count`, every other metric under its own name.
pub fn coordinator_series_names() -> BTreeSet<String> {
    COORDINATOR_METRICS
        .iter()
        .flat_map(|(name, kind)| match *kind {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{name}{suffix}"))
                .collect::<Vec<_>>(),
            _ => vec![name.to_string()],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{metric_names, roundtrip_problems};
    use k8s_openapi::api::apps::v1::Deployment;
    use serde_json::json;

    #[test]
    fn the_round_trip_names_unknown_and_misshapen_fields() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": null},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"spec": {"containers": [
                {"name": "c", "image": "i", "imagePullPolcy": "Always", "ports": [{"containerPort": 80}]}]}}}});
        assert_eq!(
            roundtrip_problems::<Deployment>(&d),
            [".spec.template.spec.containers[0].imagePullPolcy: unknown field (dropped by the typed model)"]
        );
        let bad = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicas": "two", "selector": {}, "template": {}}});
        assert!(roundtrip_problems::<Deployment>(&bad)[0].starts_with("does not deserialize"));
        let ok = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicas": 2, "selector": {}, "template": {}}});
        assert!(roundtrip_problems::<Deployment>(&ok).is_empty());
    }

    fn names(e: &str) -> Vec<String> {
        metric_names(e).into_iter().collect()
    }

    #[test]
    fn the_coordinator_histograms_are_read_as_bucket_sum_and_count() {
        let names = super::coordinator_series_names();
        assert_eq!(names.len(), super::COORDINATOR_METRICS.len() + 2 * 2);
        assert!(names.contains("celeriac_coordinator_result_to_submit_seconds_bucket"));
        assert!(names.contains("celeriac_coordinator_launch_to_first_submit_seconds_count"));
        assert!(!names.contains("celeriac_coordinator_result_to_submit_seconds"));
        assert!(names.contains("celeriac_coordinator_runs_owned"));
        assert!(names
            .iter()
            .all(|n| n.starts_with(super::COORDINATOR_METRIC_PREFIX)));
    }

    #[test]
    fn reads_metric_names_out_of_promql() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.95, sum by (le, verb) (rate(a_bucket{job=~"$job", x="y"}[$__rate_interval])))"#
            ),
            ["a_bucket"]
        );
        assert_eq!(
            names("max by (queue_name) (q_len{job=\"j\"}) + on() sum by (queue_name) (in_flight) > 0 and b offset 5m"),
            ["b", "in_flight", "q_len"]
        );
        assert_eq!(
            names("label_values(celery_queue_length, queue_name)"),
            ["celery_queue_length"]
        );
        assert_eq!(names("sum(increase(x_total[30m])) / 2 > 0.25"), ["x_total"]);
        assert_eq!(names("absent(up{job=\"a\"}) or vector(0)"), ["up"]);
    }
}
