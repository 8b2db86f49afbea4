//! Real Dagster runs through celeriac with the Kubernetes launcher against the real 1.20.2 cluster,
//! where celeriac's process kubelet executes `dagster api execute_step` in each step pod.
//!
//! The worker runs as `celeriac-worker-<n>` holding only the documented least-privilege Role.

use std::time::Duration;

use anyhow::Result;
use celeriac_tests::dagster::{DagsterHome, RunSummary};
use celeriac_tests::k8s::TestNamespace;
use celeriac_tests::{ensure_services, unique, WorkerProcess};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS: &str = "redis://127.0.0.1:6379/4";
const DIAMOND_STEPS: [&str; 6] = ["finish", "join", "left", "middle", "right", "start"];

struct K8sRun {
    summary: RunSummary,
    log: String,
    ns: TestNamespace,
}

fn run(broker: &str, backend: &str, job: &str, envs: &[(&str, &str)]) -> Result<K8sRun> {
    ensure_services();
    let ns = TestNamespace::create()?;
    let queue = unique("k8s");
    let home = DagsterHome::create_k8s(broker, backend, &ns.name, &ns.kubeconfig)?;
    let kubeconfig = ns.kubeconfig.display().to_string();
    let mut all_envs = vec![("KUBECONFIG", kubeconfig.as_str())];
    all_envs.extend_from_slice(envs);
    let mut worker = WorkerProcess::start(
        &[
            "-b",
            broker,
            "--result-backend",
            backend,
            "-Q",
            &queue,
            "-c",
            "3",
            "--launcher",
            "kubernetes",
        ],
        &all_envs,
    )?;
    let summary = home.run_job(job, Duration::from_secs(300), &[("CELERIAC_QUEUE", &queue)])?;
    worker.terminate(Duration::from_secs(60))?;
    Ok(K8sRun {
        summary,
        log: worker.log_text(),
        ns,
    })
}

/// The engine events the Python worker writes for a step, with the same metadata labels.
fn assert_python_engine_events(r: &K8sRun, step: &str) {
    let prefix = "[CeleryK8sJobExecutor] ";
    let find = |start: &str| {
        r.summary
            .engine_events
            .iter()
            .find(|e| e.message.starts_with(&format!("{prefix}{start}")))
            .unwrap_or_else(|| {
                panic!(
                    "no engine event {start:?} in {:#?}",
                    r.summary.engine_events
                )
            })
    };
    let picked = find(&format!("Task for step {step} picked up by Celery"));
    assert_eq!(
        picked.labels,
        ["Celery worker name", "Celery worker Kubernetes Pod name"]
    );
    let executing = find(&format!(
        "Executing step \"{step}\" in Kubernetes job dagster-step-"
    ));
    assert_eq!(
        executing.labels,
        [
            "Step key",
            "Kubernetes Job name",
            "Job image",
            "Image pull policy",
            "Image pull secrets",
            "Service account name"
        ]
    );
    let retrieving = r
        .summary
        .engine_events
        .iter()
        .find(|e| e.message == format!("{prefix}Retrieving logs from Kubernetes Job pods"))
        .expect("Retrieving logs engine event");
    assert_eq!(retrieving.labels, ["Pod names"]);
}

fn assert_diamond_success(r: &K8sRun) {
    assert_eq!(
        r.summary.status, "SUCCESS",
        "run did not succeed: {:#?}\nworker log:\n{}",
        r.summary, r.log
    );
    assert_eq!(r.summary.steps_with("STEP_SUCCESS"), DIAMOND_STEPS);
    for step in DIAMOND_STEPS {
        assert_eq!(
            r.summary.count("STEP_START", step),
            1,
            "{step} ran exactly once"
        );
        assert_python_engine_events(r, step);
    }
    assert!(
        r.log.contains("step Job running"),
        "the Kubernetes launcher ran the steps:\n{}",
        r.log
    );
    // Retention `delete` (default): every step Job is gone once its logs were read.
    r.ns.wait_until(
        "step Jobs deleted",
        Duration::from_secs(30),
        |jobs, pods| jobs.is_empty() && pods.is_empty(),
    )
    .expect("finished step Jobs and their pods are deleted");
}

#[test]
fn diamond_succeeds_on_rabbitmq_with_kubernetes_jobs() -> Result<()> {
    let r = run(AMQP, "rpc://", "diamond", &[])?;
    assert_diamond_success(&r);
    Ok(())
}

#[test]
fn diamond_succeeds_on_redis_with_kubernetes_jobs() -> Result<()> {
    let r = run(REDIS, REDIS, "diamond", &[])?;
    assert_diamond_success(&r);
    Ok(())
}

#[test]
fn failing_op_fails_the_run_with_its_error() -> Result<()> {
    let r = run(AMQP, "rpc://", "diamond_failing", &[])?;
    assert_eq!(r.summary.status, "FAILURE", "{:#?}\n{}", r.summary, r.log);
    assert!(
        r.summary
            .failure_messages
            .iter()
            .any(|m| m.contains("celeriac test failure: middle exploded")),
        "the op's error is in the event log: {:#?}",
        r.summary.failure_messages
    );
    assert_eq!(r.summary.steps_with("STEP_FAILURE"), ["middle"]);
    for skipped in ["join", "finish"] {
        assert_eq!(r.summary.count("STEP_START", skipped), 0);
    }
    Ok(())
}

/// The Python worker reads pod logs without a container name, so a sidecar makes it lose every
/// event of the step (HTTP 400). celeriac reads the step container by name.
#[test]
fn a_sidecar_does_not_lose_the_steps_events() -> Result<()> {
    let r = run(REDIS, REDIS, "diamond_sidecar", &[])?;
    assert_diamond_success(&r);
    Ok(())
}

#[test]
fn oom_killed_step_fails_with_the_reason() -> Result<()> {
    let r = run(AMQP, "rpc://", "oom", &[])?;
    assert_eq!(r.summary.status, "FAILURE", "{:#?}\n{}", r.summary, r.log);
    assert!(
        r.summary
            .failure_messages
            .iter()
            .any(|m| m.contains("OOMKilled") && m.contains("memory limit")),
        "STEP_FAILURE names OOMKilled: {:#?}",
        r.summary.failure_messages
    );
    Ok(())
}

#[test]
fn unpullable_image_fails_the_step_instead_of_hanging() -> Result<()> {
    let r = run(
        AMQP,
        "rpc://",
        "bad_image",
        &[("CELERIAC_KUBERNETES__IMAGE_PULL_TIMEOUT", "3")],
    )?;
    assert_eq!(r.summary.status, "FAILURE", "{:#?}\n{}", r.summary, r.log);
    assert!(
        r.summary
            .failure_messages
            .iter()
            .any(|m| m.contains("ImagePullBackOff")
                && m.contains("registry.invalid/celeriac/missing:1")),
        "STEP_FAILURE names the image and ImagePullBackOff: {:#?}",
        r.summary.failure_messages
    );
    r.ns.wait_until("stuck Job deleted", Duration::from_secs(30), |jobs, _| {
        jobs.is_empty()
    })?;
    Ok(())
}
