//! The Helm chart (`charts/celeriac`), through real Helm and a real cluster:
//!
//! * every `ci/*-values.yaml` renders and lints clean with Helm v4; each built-in object survives a
//!   field-by-field round trip through its k8s-openapi type; each custom resource passes the upstream
//!   prometheus-operator / KEDA models; what the chart promises (one Deployment per queue, the
//!   worker's exact RBAC, drain time, scaling signal, `job` label) is checked on the output;
//! * the schema rejects bad values with a message that names the field;
//! * the rendered RBAC, Secrets, ConfigMaps, the worker Deployment and flower-compat are applied to
//!   the real 1.20 cluster; the process kubelet runs the worker pod (image `celeriac/celeriac` →
//!   the built binary, its celery YAML mounted from the ConfigMap); a real Dagster run succeeds
//!   through it with only the chart's RBAC; every metric name in the dashboards, alert rules and
//!   KEDA query is found in live `/metrics` scrapes of that worker and flower-compat.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celeriac_tests::chart::{
    builtin_problems, ci_values_files, crd_problems, lint, metric_names, promql_expressions,
    rejection, render, render_file, scraped_names, Rendered,
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
    Ok(())
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
        ("workerQueue: [{name: q}]", "workerQueue"),
        (
            "apiVersionOverrides: {podDisruptionBudget: policy/v2}",
            "/apiVersionOverrides/podDisruptionBudget",
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
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut used = BTreeSet::new();
    for (place, expr) in &exprs {
        for m in metric_names(expr) {
            used.insert(m.clone());
            if !live.contains(&m) {
                missing.entry(m).or_default().push(place.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics not in live /metrics: {missing:#?}"
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
