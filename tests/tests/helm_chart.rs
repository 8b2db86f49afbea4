//! The Helm chart (`charts/celeriac`), through real Helm and a real cluster:
//!
//! * every `ci/*-values.yaml` renders and lints clean with Helm v4; each built-in object survives a
//!   field-by-field round trip through its k8s-openapi type; each custom resource passes the upstream
//!   prometheus-operator / KEDA models; what the chart promises (one Deployment per queue, the
//!   worker's exact RBAC, drain time, scaling signal, `job` label; the run coordinator's lack of any
//!   Kubernetes API access, its Dagster inputs, replicas, PDB and alerts) is checked on the output;
//! * the schema rejects bad values with a message that names the field;
//! * the rendered RBAC, Secrets, ConfigMaps, the worker Deployment and flower-compat are applied to
//!   the real 1.20 cluster; the process kubelet runs the worker pod (image `celeriac/celeriac` →
//!   the built binary, its celery YAML mounted from the ConfigMap); a real Dagster run succeeds
//!   through it with only the chart's RBAC; every metric name in the dashboards, alert rules and
//!   KEDA query is found in live `/metrics` scrapes of that worker and flower-compat (the run
//!   coordinator's, `celeriac_coordinator_*`, in its list of exported metrics).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celeriac_tests::chart::{
    builtin_problems, chart_dir, ci_values_files, coordinator_series_names, crd_problems, lint,
    metric_names, promql_expressions, rejection, render, render_file, scraped_names, Rendered,
    COORDINATOR_METRICS, COORDINATOR_METRIC_PREFIX,
};
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::k8s::{audit_requests, block_on, cluster, pod_running, TestNamespace};
use celeriac_tests::{ensure_services, free_port, http_get, unique, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::Value;

fn kinds(rendered: &[Rendered], kind: &str) -> Vec<Rendered> {
    rendered
        .iter()
        .filter(|r| r.kind() == kind)
        .cloned()
        .collect()
}

/// The worker queues of a values file, as Helm merges them with the defaults.
fn queue_names(rendered: &[Rendered]) -> BTreeSet<String> {
    kinds(rendered, "Deployment")
        .iter()
        .filter_map(|d| {
            d.object["metadata"]["labels"]["celeriac.dev/queue"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn every_values_file_renders_lints_and_matches_the_kubernetes_models() -> Result<()> {
    let files = ci_values_files();
    assert!(
        files.len() >= 5,
        "expected ≥ 5 ci values files, found {files:?}"
    );
    let mut report = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let findings = lint(file)?;
        let serious: Vec<_> = findings.iter().filter(|(sev, _, _)| *sev >= 2).collect();
        assert!(serious.is_empty(), "{name}: helm lint: {serious:?}");

        let rendered = render_file(file, "celeriac", "dagster")?;
        let mut custom = Vec::new();
        for r in &rendered {
            match builtin_problems(&r.object) {
                Some(problems) => assert!(
                    problems.is_empty(),
                    "{name}: {} {} ({}) does not match its k8s-openapi type: {problems:#?}",
                    r.kind(),
                    r.name(),
                    r.template
                ),
                None => custom.push(r.object.clone()),
            }
        }
        for c in &custom {
            let kind = c["kind"].as_str().unwrap_or_default();
            assert!(
                matches!(kind, "ServiceMonitor" | "PrometheusRule" | "ScaledObject"),
                "{name}: unexpected kind {kind}"
            );
        }
        if !custom.is_empty() {
            let problems = crd_problems(&custom)?;
            assert!(
                problems.is_empty(),
                "{name}: custom resources: {problems:#?}"
            );
        }
        check_promises(&name, &rendered)?;
        report.push(format!(
            "{name}: {} objects ({} custom resources)",
            rendered.len(),
            custom.len()
        ));
    }
    eprintln!("{}", report.join("\n"));
    Ok(())
}

/// What the chart promises, checked on one rendering.
fn check_promises(name: &str, rendered: &[Rendered]) -> Result<()> {
    let deployments: Vec<_> = kinds(rendered, "Deployment")
        .into_iter()
        .filter(|d| d.object["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
        .collect();
    let queues = queue_names(rendered);
    assert_eq!(
        deployments.len(),
        queues.len(),
        "{name}: one Deployment per queue"
    );
    for d in &deployments {
        let queue = d.object["metadata"]["labels"]["celeriac.dev/queue"]
            .as_str()
            .unwrap_or_default();
        let pod = &d.object["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| *a == flag)
                .and_then(|i| args.get(i + 1))
                .copied()
        };
        assert_eq!(
            after("-Q"),
            Some(queue),
            "{name}: {} consumes its queue",
            d.name()
        );
        assert_eq!(after("--launcher"), Some("kubernetes"));
        let config = after("-y").unwrap_or_default();
        let mounted = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["mountPath"] == config && m["subPath"] == "celery.yaml");
        assert!(mounted, "{name}: the celery YAML {config} is mounted");
        // Drain: the pod's grace period covers the worker's own shutdown grace.
        let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
        let env_cm = kinds(rendered, "ConfigMap")
            .into_iter()
            .find(|cm| cm.object["data"]["CELERIAC_SHUTDOWN_GRACE_SECONDS"].is_string())
            .context("the worker env ConfigMap")?;
        let worker_grace: i64 = env_cm.object["data"]["CELERIAC_SHUTDOWN_GRACE_SECONDS"]
            .as_str()
            .unwrap_or_default()
            .parse()?;
        assert!(
            worker_grace > 0 && worker_grace < grace,
            "{name}: worker drain {worker_grace}s must end before the pod's {grace}s grace"
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    }

    // RBAC: exactly the verbs the worker checks for (celeriac_dagster::kubernetes::access::REQUIRED).
    if let Some(role) = kinds(rendered, "Role").first() {
        let mut granted = BTreeSet::new();
        for rule in role.object["rules"].as_array().into_iter().flatten() {
            for g in rule["apiGroups"].as_array().into_iter().flatten() {
                for r in rule["resources"].as_array().into_iter().flatten() {
                    for v in rule["verbs"].as_array().into_iter().flatten() {
                        granted.insert((
                            g.as_str().unwrap_or_default().to_string(),
                            r.as_str().unwrap_or_default().to_string(),
                            v.as_str().unwrap_or_default().to_string(),
                        ));
                    }
                }
            }
        }
        let required: BTreeSet<_> = celeriac_dagster::kubernetes::access::REQUIRED
            .iter()
            .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            granted, required,
            "{name}: the Role grants exactly what the worker uses"
        );
    }

    // Autoscaling: per queue, on the backlog; never both an HPA and KEDA for one Deployment.
    let hpas = kinds(rendered, "HorizontalPodAutoscaler");
    let scaled = kinds(rendered, "ScaledObject");
    assert!(
        hpas.is_empty() || scaled.is_empty(),
        "{name}: HPA and KEDA both rendered"
    );
    for h in &hpas {
        let m = &h.object["spec"]["metrics"][0]["external"];
        assert_eq!(m["metric"]["name"], "celeriac_queue_backlog");
        assert!(m["metric"]["selector"]["matchLabels"]["queue_name"].is_string());
        assert!(
            h.object["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
                .as_i64()
                .unwrap_or(0)
                >= 300,
            "{name}: scale-in is damped"
        );
    }
    if !hpas.is_empty() || !scaled.is_empty() {
        for d in &deployments {
            assert!(
                d.object["spec"]["replicas"].is_null(),
                "{name}: the autoscaler owns replicas"
            );
        }
        assert_eq!(hpas.len() + scaled.len(), deployments.len());
    }

    // Prometheus: the job label of the worker scrape matches `.*celery.*`.
    for sm in kinds(rendered, "ServiceMonitor") {
        let label = sm.object["spec"]["jobLabel"].as_str().unwrap_or_default();
        let svc = kinds(rendered, "Service")
            .into_iter()
            .find(|s| s.object["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
            .context("worker metrics Service")?;
        let job = svc.object["metadata"]["labels"][label]
            .as_str()
            .unwrap_or_default();
        assert!(
            job.contains("celery"),
            "{name}: job label {job:?} must match .*celery.*"
        );
    }
    check_flower(name, rendered)?;
    check_coordinator(name, rendered)
}

/// flower-compat reads the Dagster event log with the instance's Secret, never a password in values.
fn check_flower(name: &str, rendered: &[Rendered]) -> Result<()> {
    let flower = kinds(rendered, "Deployment")
        .into_iter()
        .find(|d| d.object["metadata"]["labels"]["app.kubernetes.io/component"] == "flower");
    let Some(flower) = flower else {
        return Ok(());
    };
    let c = &flower.object["spec"]["template"]["spec"]["containers"][0];
    let db = env_of(c, "FLOWER_DAGSTER_DB");
    if name == "autoscaling-values.yaml" {
        assert_eq!(
            db.map(|e| &e["value"]),
            Some(&Value::from(
                "postgresql://dagster@dagster-postgresql:5432/dagster"
            )),
            "{name}: flower.dagsterDb renders the event-log URL"
        );
    }
    if let Some(db) = db {
        let url = db["value"].as_str().context("FLOWER_DAGSTER_DB value")?;
        let userinfo = url
            .trim_start_matches("postgresql://")
            .split('@')
            .next()
            .unwrap_or_default();
        assert!(
            !userinfo.contains(':'),
            "{name}: no password in FLOWER_DAGSTER_DB ({url})"
        );
        let password = env_of(c, "FLOWER_DAGSTER_DB_PASSWORD")
            .context("FLOWER_DAGSTER_DB_PASSWORD beside FLOWER_DAGSTER_DB")?;
        assert_eq!(
            password["valueFrom"]["secretKeyRef"]["key"], "postgresql-password",
            "{name}: the event-log password comes from the instance Secret"
        );
        assert!(password["value"].is_null());
    }
    Ok(())
}

/// The alerts the PrometheusRule carries for the run coordinator.
const COORDINATOR_ALERTS: &[&str] = &[
    "CeleriacCoordinatorDown",
    "CeleriacRunStuck",
    "CeleriacCoordinatorTakeovers",
];

fn is_coordinator(r: &Rendered) -> bool {
    r.object["metadata"]["labels"]["app.kubernetes.io/component"] == "coordinator"
}

/// The value following `flag` in a container's args.
fn arg_after<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    let args = container["args"].as_array()?;
    let i = args.iter().position(|a| *a == flag)?;
    args.get(i + 1)?.as_str()
}

/// A container's env entry `name`.
fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
}

/// `matchLabels` is a subset of `labels`.
fn selects(match_labels: &Value, labels: &Value) -> bool {
    match_labels
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[k] == *v))
}

/// The alert rules of the rendered PrometheusRules, by alert name.
fn alerts(rendered: &[Rendered]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for r in kinds(rendered, "PrometheusRule") {
        for g in r.object["spec"]["groups"].as_array().into_iter().flatten() {
            for rule in g["rules"].as_array().into_iter().flatten() {
                if let Some(a) = rule["alert"].as_str() {
                    out.insert(a.to_string(), rule.clone());
                }
            }
        }
    }
    out
}

/// The run coordinator, when the values enable it: no Kubernetes API access (own service account,
/// no token, no Role or binding), the Dagster instance and secrets exactly as the workers get them,
/// the lease/heartbeat relation, probes, the workers' security context, replicas on different nodes
/// under a PDB, its own scrape job and its alerts. Disabled: none of its objects or alerts.
fn check_coordinator(name: &str, rendered: &[Rendered]) -> Result<()> {
    let objects: Vec<&Rendered> = rendered.iter().filter(|r| is_coordinator(r)).collect();
    let rules = alerts(rendered);
    let deployments: Vec<_> = objects
        .iter()
        .filter(|r| r.kind() == "Deployment")
        .collect();
    let Some(d) = deployments.first() else {
        assert!(
            objects.is_empty(),
            "{name}: coordinator objects without its Deployment: {:?}",
            objects.iter().map(|o| o.name()).collect::<Vec<_>>()
        );
        for a in COORDINATOR_ALERTS {
            assert!(!rules.contains_key(*a), "{name}: {a} without a coordinator");
        }
        return Ok(());
    };
    assert_eq!(deployments.len(), 1, "{name}: one coordinator Deployment");
    let template = &d.object["spec"]["template"];
    let pod = &template["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let sub = args.iter().position(|a| *a == "coordinator");
    assert!(
        c["command"][0] == "celeriac" && sub.is_some(),
        "{name}: runs `celeriac coordinator`: {args:?}"
    );

    // No Kubernetes API access: its own service account, no token, nothing granted to it.
    let sa = pod["serviceAccountName"].as_str().unwrap_or_default();
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "{name}: no service account token in the coordinator pod"
    );
    let worker = kinds(rendered, "Deployment")
        .into_iter()
        .find(|w| w.object["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
        .context("a worker Deployment")?;
    let worker_pod = &worker.object["spec"]["template"]["spec"];
    let wc = &worker_pod["containers"][0];
    assert_ne!(
        worker_pod["serviceAccountName"].as_str(),
        Some(sa),
        "{name}: the coordinator does not share the workers' service account (it has a Role)"
    );
    if let Some(account) = kinds(rendered, "ServiceAccount")
        .iter()
        .find(|a| a.name() == sa)
    {
        assert!(is_coordinator(account), "{name}: {sa} is the coordinator's");
        assert_eq!(
            account.object["automountServiceAccountToken"], false,
            "{name}: the coordinator's service account does not automount a token"
        );
    }
    for r in rendered {
        match r.kind() {
            "Role" | "ClusterRole" => assert!(
                !is_coordinator(r),
                "{name}: {} {} is a coordinator Role",
                r.kind(),
                r.name()
            ),
            "RoleBinding" | "ClusterRoleBinding" => {
                for s in r.object["subjects"].as_array().into_iter().flatten() {
                    assert!(
                        !(s["kind"] == "ServiceAccount" && s["name"] == sa),
                        "{name}: {} {} binds the coordinator's service account {sa}",
                        r.kind(),
                        r.name()
                    );
                }
            }
            _ => {}
        }
    }

    // The Dagster instance and the secrets, exactly as the workers get them.
    let pg = env_of(c, "DAGSTER_PG_PASSWORD").context("DAGSTER_PG_PASSWORD")?;
    let worker_pg =
        env_of(wc, "DAGSTER_PG_PASSWORD").context("the worker's DAGSTER_PG_PASSWORD")?;
    assert_eq!(
        pg["valueFrom"], worker_pg["valueFrom"],
        "{name}: DAGSTER_PG_PASSWORD from the workers' Postgres secret"
    );
    // The worker's celery-config Secret: the first Secret of its envFrom.
    let celery_secret = wc["envFrom"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| e["secretRef"]["name"].as_str())
        .context("the workers' celery-config Secret")?;
    for var in ["DAGSTER_CELERY_BROKER_URL", "DAGSTER_CELERY_BACKEND_URL"] {
        let e = env_of(c, var).with_context(|| format!("{name}: coordinator env {var}"))?;
        assert_eq!(
            e["valueFrom"]["secretKeyRef"],
            serde_json::json!({"name": celery_secret, "key": var}),
            "{name}: {var} from the workers' celery-config Secret"
        );
    }
    let dagster_home = kinds(rendered, "ConfigMap")
        .into_iter()
        .find_map(|cm| {
            cm.object["data"]["DAGSTER_HOME"]
                .as_str()
                .map(str::to_string)
        })
        .context("the workers' DAGSTER_HOME")?;
    let instance = format!("{dagster_home}/dagster.yaml");
    assert_eq!(
        arg_after(c, "--instance-config"),
        Some(instance.as_str()),
        "{name}: --instance-config is the instance mounted at <dagsterHome>/dagster.yaml"
    );
    assert_eq!(
        env_of(c, "DAGSTER_HOME").map(|e| &e["value"]),
        Some(&Value::from(dagster_home.as_str()))
    );
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"] == instance.as_str())
        .with_context(|| format!("{name}: a mount at {instance}"))?;
    assert_eq!(mount["subPath"], "dagster.yaml");
    let volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .context("the instance volume")?;
    assert!(
        volume["configMap"]["name"]
            .as_str()
            .is_some_and(|n| !n.is_empty()),
        "{name}: the instance comes from the Dagster chart's ConfigMap: {volume}"
    );
    assert_eq!(
        env_of(c, "CELERIAC_COORDINATOR_REPLICA").map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&Value::from("metadata.name")),
        "{name}: the replica is named after its pod"
    );

    // Leases survive a missed renewal.
    let lease: u64 = arg_after(c, "--lease-timeout")
        .unwrap_or_default()
        .parse()?;
    let heartbeat: u64 = arg_after(c, "--heartbeat-interval")
        .unwrap_or_default()
        .parse()?;
    assert!(
        heartbeat >= 1 && lease >= 2 * heartbeat,
        "{name}: lease {lease}s vs heartbeat {heartbeat}s"
    );
    assert!(
        arg_after(c, "--max-runs")
            .unwrap_or_default()
            .parse::<u64>()?
            >= 1
    );

    // HTTP: probes, the scrape Service with its own job.
    let port = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "http")
        .and_then(|p| p["containerPort"].as_i64())
        .context("the coordinator's http port")?;
    assert_eq!(
        arg_after(c, "--http-addr"),
        Some(format!("0.0.0.0:{port}").as_str())
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let svc = objects
        .iter()
        .find(|r| r.kind() == "Service")
        .context("the coordinator Service")?;
    assert!(selects(
        &svc.object["spec"]["selector"],
        &template["metadata"]["labels"]
    ));
    assert_eq!(svc.object["spec"]["ports"][0]["targetPort"], "http");
    let job = svc.object["metadata"]["labels"]["celeriac.dev/job"]
        .as_str()
        .unwrap_or_default();
    assert!(
        job.ends_with("-celeriac-coordinator"),
        "{name}: the coordinator's own job: {job:?}"
    );
    assert_eq!(
        svc.object["metadata"]["labels"]["celeriac.dev/scrape"],
        "true"
    );

    // The workers' security context; a quick, clean stop.
    assert_eq!(c["securityContext"], wc["securityContext"]);
    assert_eq!(pod["securityContext"], worker_pod["securityContext"]);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
    assert!(
        (5..=60).contains(&grace),
        "{name}: the coordinator stops within seconds (grace {grace}s)"
    );

    // Replicas on different nodes, a PDB that keeps one when there are several.
    let replicas = d.object["spec"]["replicas"].as_i64().unwrap_or(1);
    let anti = &pod["affinity"]["podAntiAffinity"];
    assert!(anti.is_object(), "{name}: replicas prefer different nodes");
    let pdbs: Vec<_> = objects
        .iter()
        .filter(|r| r.kind() == "PodDisruptionBudget")
        .collect();
    if replicas > 1 && !pdbs.is_empty() {
        let spec = &pdbs[0].object["spec"];
        assert!(selects(
            &spec["selector"]["matchLabels"],
            &template["metadata"]["labels"]
        ));
        if let Some(min) = spec["minAvailable"].as_i64() {
            assert!(
                (1..replicas).contains(&min),
                "{name}: minAvailable {min} of {replicas}"
            );
        }
    }
    if replicas <= 1 {
        assert!(
            pdbs.is_empty(),
            "{name}: no PDB for a single coordinator (it would block drains)"
        );
    }

    // Alerts: on the coordinator's own job.
    if !kinds(rendered, "PrometheusRule").is_empty() {
        for a in COORDINATOR_ALERTS {
            let rule = rules
                .get(*a)
                .with_context(|| format!("{name}: alert {a}"))?;
            let expr = rule["expr"].as_str().unwrap_or_default();
            assert!(
                expr.contains(&format!("job=\"{job}\"")),
                "{name}: {a} reads the coordinator's job {job}: {expr}"
            );
        }
    }
    Ok(())
}

/// Metric names the expressions read that are not exported, with where they are read, and every
/// name read. The run coordinator's (`celeriac_coordinator_*`) are checked against its list of
/// metrics, [`COORDINATOR_METRICS`]: no coordinator runs here, the coordinator's own test scrapes a
/// live one for them. All other names are checked against `live`.
fn unexported_metrics(
    exprs: &[(String, String)],
    live: &BTreeSet<String>,
) -> (BTreeMap<String, Vec<String>>, BTreeSet<String>) {
    let coordinator = coordinator_series_names();
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut used = BTreeSet::new();
    for (place, expr) in exprs {
        for m in metric_names(expr) {
            used.insert(m.clone());
            let known = if m.starts_with(COORDINATOR_METRIC_PREFIX) {
                coordinator.contains(&m)
            } else {
                live.contains(&m)
            };
            if !known {
                missing.entry(m).or_default().push(place.clone());
            }
        }
    }
    (missing, used)
}

#[test]
fn the_schema_rejects_bad_values_with_a_clear_message() -> Result<()> {
    let cases: &[(&str, &str)] = &[
        ("workerQueues: []", "/workerQueues"),
        (
            "workerQueues: [{name: 'bad queue!'}]",
            "/workerQueues/0/name",
        ),
        ("workerQueues: [{name: q, replicas: 2}]", "replicas"),
        (
            "workerQueues: [{name: q, concurrency: 0}]",
            "/workerQueues/0/concurrency",
        ),
        (
            "kubernetes: {jobRetention: forever}",
            "/kubernetes/jobRetention",
        ),
        (
            "autoscaling: {enabled: true, minReplicas: 0}",
            "/autoscaling/minReplicas",
        ),
        ("image: {pullPolicy: Sometimes}", "/image/pullPolicy"),
        (
            "flower: {historyBackend: 'mysql://x'}",
            "/flower/historyBackend",
        ),
        (
            "flower: {dagsterDb: {host: pg, password: hunter2}}",
            "password",
        ),
        ("workerQueue: [{name: q}]", "workerQueue"),
        (
            "apiVersionOverrides: {podDisruptionBudget: policy/v2}",
            "/apiVersionOverrides/podDisruptionBudget",
        ),
        (
            "coordinator: {leaseTimeoutSeconds: -1}",
            "/coordinator/leaseTimeoutSeconds",
        ),
        (
            "coordinator: {enabled: true, replicaCount: 0}",
            "/coordinator/replicaCount",
        ),
        (
            "coordinator: {heartbeatIntervalSeconds: 0}",
            "/coordinator/heartbeatIntervalSeconds",
        ),
        ("coordinator: {maxRuns: 0}", "/coordinator/maxRuns"),
        (
            "coordinator: {enabled: true, leaseTimout: 30}",
            "additional properties 'leaseTimout' not allowed",
        ),
        (
            "coordinator: {instanceConfigMap: ''}",
            "/coordinator/instanceConfigMap",
        ),
        (
            "coordinator: {image: {pullPolicy: Sometimes}}",
            "/coordinator/image/pullPolicy",
        ),
        (
            "coordinator: {podDisruptionBudget: {minAvailable: 0}}",
            "/coordinator/podDisruptionBudget/minAvailable",
        ),
        (
            "prometheusRule: {runStuckMinutes: 0}",
            "/prometheusRule/runStuckMinutes",
        ),
        // Across fields: the template refuses them, naming both keys.
        (
            "coordinator: {enabled: true, leaseTimeoutSeconds: 8, heartbeatIntervalSeconds: 5}",
            "coordinator.leaseTimeoutSeconds (8) must be at least twice coordinator.heartbeatIntervalSeconds (5)",
        ),
        (
            "coordinator: {enabled: true, replicaCount: 2, podDisruptionBudget: {minAvailable: 2}}",
            "coordinator.podDisruptionBudget.minAvailable (2) must be below coordinator.replicaCount (2)",
        ),
        // Not a schema matter, but a clear failure all the same.
        ("rabbitmq: {enabled: false}", "needs a broker"),
        (
            "rabbitmq: {enabled: false}\nredis: {enabled: true}",
            "redis.host is required",
        ),
    ];
    for (values, expected) in cases {
        let message = rejection(values)?;
        assert!(
            message.contains(expected),
            "values {values:?}: Helm's message should name {expected:?}, got: {message}"
        );
    }
    Ok(())
}

/// The run coordinator as `ci/coordinator-values.yaml` deploys it next to the Dagster chart: two
/// replicas under a PDB, no Kubernetes API access, the Dagster chart's instance ConfigMap and Secrets;
/// without `coordinator.enabled` nothing of it; one replica, no PDB.
#[test]
fn the_coordinator_values_deploy_two_replicas_without_kubernetes_access() -> Result<()> {
    let file = chart_dir().join("ci/coordinator-values.yaml");
    let rendered = render_file(&file, "dagster", "dagster")?;
    let coordinator: Vec<&Rendered> = rendered.iter().filter(|r| is_coordinator(r)).collect();
    let of_kind = |kind: &str| -> Vec<&Rendered> {
        coordinator
            .iter()
            .copied()
            .filter(|r| r.kind() == kind)
            .collect()
    };
    let d = of_kind("Deployment")
        .first()
        .copied()
        .context("the coordinator Deployment")?;
    assert_eq!(d.name(), "dagster-celeriac-coordinator");
    assert_eq!(d.object["spec"]["replicas"], 2);
    let pdb = of_kind("PodDisruptionBudget");
    assert_eq!(pdb.len(), 1, "a PDB for the two replicas");
    assert_eq!(pdb[0].object["spec"]["minAvailable"], 1);

    let pod = &d.object["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sa = of_kind("ServiceAccount");
    assert_eq!(sa.len(), 1);
    assert_eq!(pod["serviceAccountName"], sa[0].name());
    assert_eq!(sa[0].object["automountServiceAccountToken"], false);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let bound: Vec<_> = rendered
        .iter()
        .filter(|r| {
            r.object["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == sa[0].name())
        })
        .map(|r| format!("{} {}", r.kind(), r.name()))
        .collect();
    assert!(bound.is_empty(), "nothing binds the coordinator: {bound:?}");
    assert!(of_kind("Role").is_empty() && of_kind("RoleBinding").is_empty());

    let secret_of = |var: &str| env_of(c, var).map(|e| e["valueFrom"]["secretKeyRef"].clone());
    assert_eq!(
        secret_of("DAGSTER_PG_PASSWORD"),
        Some(
            serde_json::json!({"name": "dagster-postgresql-secret", "key": "postgresql-password"})
        )
    );
    for var in ["DAGSTER_CELERY_BROKER_URL", "DAGSTER_CELERY_BACKEND_URL"] {
        assert_eq!(
            secret_of(var),
            Some(serde_json::json!({"name": "dagster-celery-config-secret", "key": var}))
        );
    }
    assert_eq!(
        c["volumeMounts"][0],
        serde_json::json!({"name": "dagster-instance", "mountPath": "/opt/dagster/dagster_home/dagster.yaml",
            "subPath": "dagster.yaml", "readOnly": true})
    );
    assert_eq!(
        pod["volumes"][0],
        serde_json::json!({"name": "dagster-instance", "configMap": {"name": "dagster-instance"}})
    );
    assert_eq!(arg_after(c, "--lease-timeout"), Some("45"));
    assert_eq!(arg_after(c, "--max-runs"), Some("500"));
    // The user's nodeAffinity is kept, the default anti-affinity added next to it.
    let affinity = &pod["affinity"];
    assert!(affinity["nodeAffinity"].is_object());
    let term = &affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        ["podAffinityTerm"];
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    assert!(selects(
        &term["labelSelector"]["matchLabels"],
        &d.object["spec"]["template"]["metadata"]["labels"]
    ));
    let rules = alerts(&rendered);
    assert!(rules["CeleriacRunStuck"]["expr"]
        .as_str()
        .unwrap_or_default()
        .ends_with("> 1200"));

    // Disabled (the default): none of it.
    let off = render("{}", "dagster", "dagster")?;
    assert!(off.iter().all(|r| !is_coordinator(r)));
    assert!(COORDINATOR_ALERTS
        .iter()
        .all(|a| !alerts(&off).contains_key(*a)));
    // One replica: no PDB (it would block node drains); a service account of the user's.
    let one = render(
        "coordinator: {enabled: true, replicaCount: 1, serviceAccount: {create: false, name: celeriac-coordinator}}",
        "dagster",
        "dagster",
    )?;
    check_coordinator("one replica", &one)?;
    let kinds_one: Vec<&str> = one
        .iter()
        .filter(|r| is_coordinator(r))
        .map(|r| r.kind())
        .collect();
    assert_eq!(kinds_one, ["Deployment", "Service"]);
    let d1 = one
        .iter()
        .find(|r| is_coordinator(r) && r.kind() == "Deployment")
        .context("coordinator Deployment")?;
    assert_eq!(
        d1.object["spec"]["template"]["spec"]["serviceAccountName"],
        "celeriac-coordinator"
    );
    Ok(())
}

/// The coordinator's alert rules and dashboard panels read only metrics the coordinator exports
/// (its list, [`COORDINATOR_METRICS`]; the coordinator's own test scrapes them live), and the
/// dashboards show every one of them. The other names are checked live by the cluster test.
#[test]
fn the_coordinators_promql_reads_only_metrics_it_exports() -> Result<()> {
    let rendered = render_file(
        &chart_dir().join("ci/coordinator-values.yaml"),
        "celeriac",
        "dagster",
    )?;
    let exprs = promql_expressions(&rendered);
    let coordinator_exprs: Vec<(String, String)> = exprs
        .iter()
        .filter(|(place, expr)| {
            COORDINATOR_ALERTS
                .iter()
                .any(|a| place == &format!("PrometheusRule {:?}", Some(*a)))
                || metric_names(expr)
                    .iter()
                    .any(|m| m.starts_with(COORDINATOR_METRIC_PREFIX))
        })
        .cloned()
        .collect();
    assert!(
        coordinator_exprs.len() >= COORDINATOR_ALERTS.len() + COORDINATOR_METRICS.len(),
        "the coordinator's alerts and panels: {coordinator_exprs:#?}"
    );
    // Checked against no live names: every name of these expressions must be the coordinator's.
    let (missing, used) = unexported_metrics(&coordinator_exprs, &BTreeSet::new());
    assert!(
        missing.is_empty(),
        "coordinator expressions read metrics the coordinator does not export: {missing:#?}"
    );
    for (metric, kind) in COORDINATOR_METRICS {
        let read = match *kind {
            "histogram" => used.contains(&format!("{metric}_bucket")),
            _ => used.contains(*metric),
        };
        assert!(read, "no dashboard panel or alert reads {metric}");
    }
    eprintln!(
        "{} coordinator expressions read {:?}",
        coordinator_exprs.len(),
        used
    );
    Ok(())
}

/// Kinds the 1.20 test cluster serves, applied in dependency order.
const APPLY_ORDER: &[&str] = &[
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "Role",
    "RoleBinding",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
];

async fn create<K>(client: &kube::Client, ns: &str, object: Value) -> Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &serde_json::from_value(object)?)
        .await?;
    Ok(())
}

async fn apply(client: &kube::Client, ns: &str, r: &Rendered) -> Result<()> {
    let o = r.object.clone();
    match r.kind() {
        "ServiceAccount" => create::<ServiceAccount>(client, ns, o).await?,
        "Secret" => create::<Secret>(client, ns, o).await?,
        "ConfigMap" => create::<ConfigMap>(client, ns, o).await?,
        "Role" => create::<Role>(client, ns, o).await?,
        "RoleBinding" => create::<RoleBinding>(client, ns, o).await?,
        "Service" => create::<Service>(client, ns, o).await?,
        "Deployment" => create::<Deployment>(client, ns, o).await?,
        // The 1.20 forms (policy/v1beta1, autoscaling/v2beta2), which k8s-openapi 0.29 no longer
        // models: created as dynamic objects, validated by the 1.20 API server itself.
        "PodDisruptionBudget" | "HorizontalPodAutoscaler" => {
            let (group, version) = r
                .api_version()
                .split_once('/')
                .unwrap_or(("", r.api_version()));
            let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, r.kind()));
            Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource)
                .create(&PostParams::default(), &serde_json::from_value(o)?)
                .await?;
        }
        other => bail!("not applied: {other}"),
    }
    eprintln!("applied {} {}", r.kind(), r.name());
    Ok(())
}

/// Polls `ready` until it holds (see [`wait_until`]).
fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    wait_until(what, timeout, || Ok(ready()?.then_some(())))
}

/// The value of an object's label.
fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

#[test]
fn the_chart_deploys_a_worker_that_runs_a_dagster_run_with_only_its_rbac_on_rabbitmq() -> Result<()>
{
    deploy_and_run(
        "rabbitmq: {enabled: true, host: 127.0.0.1, rabbitmq: {username: guest, password: guest}, service: {port: 5672}}",
        "amqp://guest:guest@127.0.0.1:5672//",
        "rpc://",
        "autoscaling: {enabled: true, keda: {enabled: true}}",
    )
}

#[test]
fn the_chart_deploys_a_worker_that_runs_a_dagster_run_with_only_its_rbac_on_redis() -> Result<()> {
    deploy_and_run(
        "rabbitmq: {enabled: false}\nredis: {enabled: true, host: 127.0.0.1, port: 6379, brokerDbNumber: 9, backendDbNumber: 9}",
        "redis://127.0.0.1:6379/9",
        "redis://127.0.0.1:6379/9",
        "autoscaling: {enabled: true}",
    )
}

/// Installs the chart's objects with `broker_values` and `autoscaling` (KEDA or HPA) into a fresh
/// namespace, with the PDB/HPA in their 1.20 API versions, and runs Dagster jobs through the worker
/// it deploys (the run coordinator publishing to `broker` / reading `backend`).
fn deploy_and_run(
    broker_values: &str,
    broker: &str,
    backend: &str,
    autoscaling: &str,
) -> Result<()> {
    ensure_services();
    let cluster = cluster();
    let ns = TestNamespace::bare()?;
    let queue = unique("helm");
    let (worker_port, flower_port) = (free_port()?, free_port()?);
    let release = format!("r{}", &unique("x")[2..8]);
    let values = format!(
        r#"
image: {{repository: celeriac/celeriac, tag: test, pullPolicy: IfNotPresent}}
{broker_values}
generatePostgresqlPasswordSecret: true
postgresqlPassword: unused-with-trust-auth
workerQueues:
  - {{name: {queue}, replicaCount: 1, concurrency: 4, additionalCeleryArgs: ["-E"]}}
metrics: {{port: {worker_port}}}
logFormat: text
terminationGracePeriodSeconds: 60
flower: {{enabled: true, port: {flower_port}}}
{autoscaling}
apiVersionOverrides: {{podDisruptionBudget: policy/v1beta1, horizontalPodAutoscaler: autoscaling/v2beta2}}
serviceMonitor: {{enabled: true}}
prometheusRule: {{enabled: true}}
grafanaDashboards: {{enabled: true}}
"#
    );
    let rendered = render(&values, &release, &ns.name)?;
    let versions: BTreeSet<(String, String)> = rendered
        .iter()
        .filter(|r| matches!(r.kind(), "PodDisruptionBudget" | "HorizontalPodAutoscaler"))
        .map(|r| (r.kind().to_string(), r.api_version().to_string()))
        .collect();
    assert!(
        versions.contains(&("PodDisruptionBudget".into(), "policy/v1beta1".into())),
        "the 1.20 PDB is applied: {versions:?}"
    );
    let client = ns.client();
    block_on(async {
        for kind in APPLY_ORDER {
            for r in rendered.iter().filter(|r| r.kind() == *kind) {
                apply(&client, &ns.name, r)
                    .await
                    .with_context(|| format!("applying {} {}", r.kind(), r.name()))?;
            }
        }
        anyhow::Ok(())
    })?;

    // The kubelet runs the worker and flower-compat pods; the worker reads its mounted celery YAML
    // and starts consuming the queue (readiness).
    let pods_of = |component: &str| -> Vec<Pod> {
        ns.pods()
            .into_iter()
            .filter(|p| label(&p.metadata, "app.kubernetes.io/component") == Some(component))
            .collect()
    };
    // Ready comes from the chart's readiness probes (the kubelet's GET /readyz and /healthcheck):
    // the Deployments count their replicas ready only then.
    let ready_replicas = |component: &str| -> Result<i32> {
        let deployments = block_on(
            Api::<Deployment>::namespaced(client.clone(), &ns.name).list(&Default::default()),
        )?;
        Ok(deployments
            .items
            .iter()
            .filter(|d| label(&d.metadata, "app.kubernetes.io/component") == Some(component))
            .filter_map(|d| d.status.as_ref().and_then(|s| s.ready_replicas))
            .sum())
    };
    wait_for(
        "the worker Deployment has a ready replica (readiness probe on /readyz)",
        Duration::from_secs(120),
        || Ok(ready_replicas("worker")? == 1),
    )
    .with_context(|| format!("pods: {:?}", pod_summary(&ns.pods())))?;
    let worker_ready = format!("http://127.0.0.1:{worker_port}/readyz");
    assert_eq!(http_get(&worker_ready)?.0, 200, "ready means consuming");
    let flower = format!("http://127.0.0.1:{flower_port}");
    wait_for(
        "the flower-compat Deployment has a ready replica (probe on /healthcheck)",
        Duration::from_secs(60),
        || Ok(ready_replicas("flower")? == 1),
    )?;

    // A real Dagster run, steps as Jobs created with the worker pod's own service account.
    let home = DagsterHome::create_k8s_incluster(broker, backend, &ns.name)?;
    let run = home.run_job(
        "diamond",
        Duration::from_secs(420),
        &[("CELERIAC_QUEUE", &queue)],
    )?;
    assert_eq!(run.status, "SUCCESS", "run: {run:?}");
    assert_eq!(
        run.steps_with("STEP_SUCCESS").len(),
        6,
        "all six steps: {run:?}"
    );

    let sa = rendered
        .iter()
        .find(|r| r.kind() == "ServiceAccount")
        .map(|r| r.name().to_string())
        .context("the chart's ServiceAccount")?;
    let user = format!("system:serviceaccount:{}:{sa}", ns.name);
    let requests = audit_requests(cluster, &user);
    let created: Vec<_> = requests
        .iter()
        .filter(|(verb, resource, _, code)| verb == "create" && resource == "jobs" && *code == 201)
        .collect();
    assert_eq!(
        created.len(),
        6,
        "the worker's service account created the six step Jobs: {requests:?}"
    );
    let denied: Vec<_> = requests
        .iter()
        .filter(|(_, _, _, code)| *code == 403)
        .collect();
    assert!(
        denied.is_empty(),
        "nothing the worker did was forbidden: {denied:?}"
    );

    // Every metric the dashboards, alerts and KEDA read is exported by this worker or flower-compat.
    let (s1, worker_metrics) = http_get(&format!("http://127.0.0.1:{worker_port}/metrics"))?;
    let (s2, flower_metrics) = http_get(&format!("{flower}/metrics"))?;
    assert_eq!((s1, s2), (200, 200));
    let mut live = scraped_names(&worker_metrics);
    live.extend(scraped_names(&flower_metrics));
    let exprs = promql_expressions(&rendered);
    assert!(
        exprs.len() >= 30,
        "dashboards, rules and KEDA carry expressions: {}",
        exprs.len()
    );
    let (missing, used) = unexported_metrics(&exprs, &live);
    assert!(
        missing.is_empty(),
        "metrics not in live /metrics (or, celeriac_coordinator_*, not exported by the coordinator): {missing:#?}"
    );
    eprintln!(
        "{} PromQL expressions read {} metric names, all live: {used:?}",
        exprs.len(),
        used.len()
    );

    // Scale-in drains: a step is running when the queue's Deployment is scaled to 0 (what an HPA
    // or KEDA scale-in does). The pod gets SIGTERM; the worker stops taking steps but keeps its
    // running one to the end, reports it, and only then exits: the run succeeds, the step ran once.
    let worker_pod = pods_of("worker")
        .first()
        .and_then(|p| p.metadata.name.clone())
        .context("worker pod")?;
    let deployment = rendered
        .iter()
        .find(|r| {
            r.kind() == "Deployment"
                && r.object["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
        })
        .map(|r| r.name().to_string())
        .context("worker Deployment")?;
    let worker_present = || {
        ns.pods()
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(worker_pod.as_str()))
    };
    let step_running = || {
        pods_of("step_worker")
            .iter()
            .any(|p| pod_running(p) && label(&p.metadata, "dagster/op") == Some("sleepy_op"))
    };
    let (summary, drained) = std::thread::scope(|s| -> Result<_> {
        let run = s.spawn(|| {
            home.run_job(
                "sleepy",
                Duration::from_secs(300),
                &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", "15")],
            )
        });
        wait_for(
            "the sleepy step's pod runs",
            Duration::from_secs(120),
            || Ok(step_running()),
        )?;
        block_on(
            Api::<Deployment>::namespaced(client.clone(), &ns.name).patch(
                &deployment,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
            ),
        )?;
        let scaled = Instant::now();
        // While its step runs the worker is still there, draining.
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            worker_present() || !step_running(),
            "the worker pod ended while its step still ran"
        );
        wait_for(
            "the draining worker pod is gone",
            Duration::from_secs(90),
            || Ok(!worker_present()),
        )?;
        let drained = scaled.elapsed();
        Ok((run.join().expect("run thread")?, drained))
    })?;
    summary.assert_succeeded_running_once("sleepy_op", "the run survives the scale-in");
    assert!(
        drained < Duration::from_secs(60),
        "the pod ended by draining, not by the grace period's SIGKILL ({drained:?})"
    );
    eprintln!(
        "scale-in: the worker drained its running step and exited {drained:?} after the scale to 0"
    );
    Ok(())
}

fn pod_summary(pods: &[Pod]) -> Vec<(Option<String>, Option<String>, Option<String>)> {
    pods.iter()
        .map(|p| {
            let status = p.status.as_ref();
            (
                p.metadata.name.clone(),
                status.and_then(|s| s.phase.clone()),
                status
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first())
                    .and_then(|c| c.state.as_ref())
                    .and_then(|s| s.waiting.as_ref())
                    .and_then(|w| w.message.clone()),
            )
        })
        .collect()
}
