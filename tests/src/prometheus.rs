//! Real Prometheus (Debian's 2.42 package, `scripts/prometheus.sh`) for the monitoring tests: started
//! on loopback with its own data directory, scraping celeriac processes with the scrape configuration
//! the chart's ServiceMonitor implies, and queried through its HTTP API; `promtool` for rule checks,
//! rule unit tests and exposition parsing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::chart::Rendered;
use crate::{artifacts_dir, free_port, http_get, prepared_dir, tail, unique, wait_until};

/// The directory holding `prometheus` and `promtool` (installed once by `scripts/prometheus.sh`).
pub fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| prepared_dir("prometheus.sh"))
}

/// Runs `promtool <args>` in `dir`: `(exit success, stdout + stderr)`.
pub fn promtool(args: &[&str], dir: &Path) -> Result<(bool, String)> {
    let out = Command::new(bin_dir().join("promtool"))
        .args(args)
        .current_dir(dir)
        .output()
        .context("running promtool")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// `promtool check metrics` on a text exposition (Prometheus's own parser and linter):
/// `(exit success, promtool's report)`.
pub fn check_metrics(exposition: &str) -> Result<(bool, String)> {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool check metrics")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(exposition.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The rendered PrometheusRule's `spec` (its `groups`): a Prometheus rule file.
pub fn rule_file(rendered: &[Rendered]) -> Result<Value> {
    let rule = rendered
        .iter()
        .find(|r| r.kind() == "PrometheusRule")
        .context("no PrometheusRule rendered")?;
    Ok(rule.object["spec"].clone())
}

/// A process behind one of the chart's scraped Services: the Service it stands for (by component:
/// `worker`, `flower`, `coordinator`), its `/metrics` address and the pod name Prometheus would see.
#[derive(Debug, Clone)]
pub struct ScrapeTarget {
    pub component: String,
    pub address: String,
    pub pod: String,
}

/// Prometheus label names from Kubernetes label keys, as service discovery forms them
/// (`celeriac.dev/job` → `celeriac_dev_job`).
fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The scrape configuration prometheus-operator generates for the chart's ServiceMonitor, with each
/// Kubernetes endpoint replaced by a static target carrying the `__meta_kubernetes_*` labels service
/// discovery would attach (Service labels, namespace, Service name, pod, container, port name).
/// Everything else comes from the rendered objects: which Services are selected (the
/// ServiceMonitor's `selector.matchLabels`), the port (`endpoints[0].port`), path, interval and scrape
/// timeout, and `job` from the Service label named by `jobLabel`, so the job labels the dashboards
/// and alerts select cannot drift from what a real cluster scrapes. The relabelling is the
/// operator's (`job`, `namespace`, `service`, `pod`, `container`, `endpoint`; `honor_labels: false`).
pub fn scrape_config(
    rendered: &[Rendered],
    namespace: &str,
    targets: &[ScrapeTarget],
) -> Result<Value> {
    let sm = rendered
        .iter()
        .find(|r| r.kind() == "ServiceMonitor")
        .context("no ServiceMonitor rendered")?;
    let spec = &sm.object["spec"];
    let job_label = spec["jobLabel"]
        .as_str()
        .context("ServiceMonitor jobLabel")?;
    let selector = spec["selector"]["matchLabels"]
        .as_object()
        .context("ServiceMonitor selector.matchLabels")?;
    let endpoint = &spec["endpoints"][0];
    let port = endpoint["port"].as_str().context("endpoint port")?;
    let services: Vec<&Rendered> = rendered
        .iter()
        .filter(|r| r.kind() == "Service")
        .filter(|r| {
            let labels = &r.object["metadata"]["labels"];
            selector.iter().all(|(k, v)| &labels[k] == v)
        })
        .collect();
    let mut static_configs = Vec::new();
    for t in targets {
        let service = services
            .iter()
            .find(|s| s.object["metadata"]["labels"]["app.kubernetes.io/component"] == t.component)
            .with_context(|| {
                format!(
                    "the ServiceMonitor selects no Service of component {:?}",
                    t.component
                )
            })?;
        let port_name = service.object["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|p| p["name"].as_str())
            .unwrap_or_default();
        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in service.object["metadata"]["labels"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let v = v.as_str().unwrap_or_default().to_string();
            labels.insert(
                format!("__meta_kubernetes_service_label_{}", sanitize(k)),
                v.clone(),
            );
            labels.insert(
                format!("__meta_kubernetes_service_labelpresent_{}", sanitize(k)),
                "true".into(),
            );
        }
        labels.insert("__meta_kubernetes_namespace".into(), namespace.into());
        labels.insert(
            "__meta_kubernetes_service_name".into(),
            service.name().into(),
        );
        labels.insert("__meta_kubernetes_pod_name".into(), t.pod.clone());
        labels.insert(
            "__meta_kubernetes_pod_container_name".into(),
            t.component.clone(),
        );
        labels.insert(
            "__meta_kubernetes_endpoint_port_name".into(),
            port_name.into(),
        );
        labels.insert(
            "__meta_kubernetes_endpoint_address_target_kind".into(),
            "Pod".into(),
        );
        labels.insert(
            "__meta_kubernetes_endpoint_address_target_name".into(),
            t.pod.clone(),
        );
        static_configs.push(json!({"targets": [t.address], "labels": labels}));
    }
    let meta_job = format!("__meta_kubernetes_service_label_{}", sanitize(job_label));
    let keep_selector: Vec<Value> = selector
        .iter()
        .map(|(k, v)| {
            json!({"action": "keep",
                   "source_labels": [format!("__meta_kubernetes_service_label_{}", sanitize(k)),
                                     format!("__meta_kubernetes_service_labelpresent_{}", sanitize(k))],
                   "regex": format!("({});true", v.as_str().unwrap_or_default())})
        })
        .collect();
    let mut relabel =
        vec![json!({"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"})];
    relabel.extend(keep_selector);
    relabel.extend([
        json!({"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": port}),
        json!({"source_labels": ["__meta_kubernetes_endpoint_address_target_kind", "__meta_kubernetes_endpoint_address_target_name"],
               "separator": ";", "regex": "Node;(.*)", "replacement": "${1}", "target_label": "node"}),
        json!({"source_labels": ["__meta_kubernetes_endpoint_address_target_kind", "__meta_kubernetes_endpoint_address_target_name"],
               "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"}),
        json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}),
        json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"}),
        json!({"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}),
        json!({"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"}),
        json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"}),
        json!({"source_labels": [meta_job], "target_label": "job", "regex": "(.+)", "replacement": "${1}"}),
        json!({"target_label": "endpoint", "replacement": port}),
    ]);
    Ok(json!({
        "job_name": format!("serviceMonitor/{namespace}/{}/0", sm.name()),
        "honor_labels": false,
        "metrics_path": endpoint["path"].as_str().unwrap_or("/metrics"),
        "scrape_interval": endpoint["interval"],
        "scrape_timeout": endpoint["scrapeTimeout"],
        "static_configs": static_configs,
        "relabel_configs": relabel,
    }))
}

/// Percent-encodes a query parameter.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Prometheus server on loopback with its own data directory (under `tests/artifacts`).
pub struct Prometheus {
    child: Child,
    pub url: String,
    pub dir: PathBuf,
    log: PathBuf,
    global: Value,
    rule_paths: Vec<String>,
}

impl Prometheus {
    /// Starts Prometheus with `scrape_configs` and the rule files (as Prometheus rule-file documents).
    pub fn start(
        scrape_configs: &[Value],
        evaluation_interval: &str,
        rule_files: &[Value],
    ) -> Result<Prometheus> {
        let dir = artifacts_dir().join(unique("prometheus"));
        std::fs::create_dir_all(dir.join("data"))?;
        let mut rule_paths = Vec::new();
        for (i, r) in rule_files.iter().enumerate() {
            let p = dir.join(format!("rules-{i}.yaml"));
            std::fs::write(&p, serde_json::to_vec_pretty(r)?)?;
            rule_paths.push(p.display().to_string());
        }
        let global = json!({"scrape_interval": "15s", "evaluation_interval": evaluation_interval});
        let config_path = dir.join("prometheus.yml");
        write_config(&config_path, &global, &rule_paths, scrape_configs)?;
        let port = free_port()?;
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin_dir().join("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-lifecycle")
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting prometheus")?;
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            log,
            global,
            rule_paths,
        };
        wait_until("prometheus ready", Duration::from_secs(60), || {
            Ok(http_get(&format!("{}/-/ready", p.url))
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|_| ()))
        })
        .with_context(|| tail(&p.log, 30))?;
        Ok(p)
    }

    /// Replaces the scrape configurations and reloads (`POST /-/reload`), as the operator does when
    /// endpoints change.
    pub fn reload(&self, scrape_configs: &[Value]) -> Result<()> {
        write_config(
            &self.dir.join("prometheus.yml"),
            &self.global,
            &self.rule_paths,
            scrape_configs,
        )?;
        let (status, body) = crate::http("POST", &format!("{}/-/reload", self.url), None, None)?;
        if status != 200 {
            bail!("reload: HTTP {status} {body}");
        }
        Ok(())
    }

    fn api(&self, path_and_query: &str) -> Result<Value> {
        let (status, body) = http_get(&format!("{}{path_and_query}", self.url))?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("{path_and_query}: HTTP {status} {body}"))?;
        if v["status"] != "success" {
            bail!("{path_and_query}: {v}");
        }
        Ok(v["data"].clone())
    }

    /// An instant query (`/api/v1/query`): the result (`resultType`, `result`).
    pub fn query(&self, expr: &str) -> Result<Value> {
        self.api(&format!("/api/v1/query?query={}", encode(expr)))
    }

    /// The values of `label` on series matching `selector` (Grafana's `label_values(metric, label)`).
    pub fn label_values(&self, label: &str, selector: &str) -> Result<Vec<String>> {
        let v = self.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            encode(selector)
        ))?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect())
    }

    /// The active targets (`/api/v1/targets`): `(labels, health, last error)`.
    pub fn targets(&self) -> Result<Vec<(Value, String, String)>> {
        let v = self.api("/api/v1/targets?state=active")?;
        Ok(v["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["labels"].clone(),
                    t["health"].as_str().unwrap_or_default().to_string(),
                    t["lastError"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    /// Waits until `n` targets are up.
    pub fn wait_targets_up(&self, n: usize, timeout: Duration) -> Result<()> {
        wait_until("Prometheus targets up", timeout, || {
            let t = self.targets()?;
            Ok((t.iter().filter(|(_, h, _)| h == "up").count() >= n).then_some(()))
        })
        .with_context(|| format!("targets: {:?}", self.targets()))
    }

    /// The server's log (for failure messages).
    pub fn log_text(&self) -> String {
        tail(&self.log, 40)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
    }
}

/// Writes a configuration file (JSON is YAML: Prometheus reads it as its configuration).
fn write_config(
    path: &Path,
    global: &Value,
    rule_paths: &[String],
    scrape_configs: &[Value],
) -> Result<()> {
    let config = json!({
        "global": global,
        "rule_files": rule_paths,
        "scrape_configs": scrape_configs,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// A vector/scalar result's numbers (a scalar or each series' value), NaN kept as NaN.
pub fn values(result: &Value) -> Vec<f64> {
    let num = |v: &Value| {
        v[1].as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    match result["resultType"].as_str() {
        Some("scalar") => vec![num(&result["result"])],
        Some("vector") => result["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| num(&s["value"]))
            .collect(),
        _ => Vec::new(),
    }
}
