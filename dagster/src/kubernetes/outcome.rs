//! Pure decisions about a step Job from what the API reports: is it over, did it succeed, and if it
//! is stuck or failed, why, in words an operator can act on. No I/O here, so every Kubernetes
//! version's shapes (1.20's `Complete`/`Failed`, ≥1.31's `SuccessCriteriaMet`/`FailureTarget` first)
//! are covered by unit tests on recorded JSON.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

/// Where a Job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Not terminal yet.
    Running,
    /// `Complete` (or, on ≥1.31, `SuccessCriteriaMet`, set before `Complete`).
    Succeeded,
    /// `Failed` (or, on ≥1.31, `FailureTarget`), with the condition's reason and message.
    Failed {
        reason: Option<String>,
        message: Option<String>,
    },
}

fn condition_true<'a>(
    job: &'a Job,
    types: &[&str],
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.status == "True" && types.contains(&c.type_.as_str()))
}

/// Terminal iff a `Complete`/`Failed` condition (or their ≥1.31 forerunners) is `True`.
///
/// (kube-rs's `is_job_completed` only knows `Complete`: waiting on it hangs forever on a failed Job.)
pub fn job_state(job: &Job) -> JobState {
    if let Some(c) = condition_true(job, &["Failed", "FailureTarget"]) {
        return JobState::Failed {
            reason: c.reason.clone(),
            message: c.message.clone(),
        };
    }
    if condition_true(job, &["Complete", "SuccessCriteriaMet"]).is_some() {
        return JobState::Succeeded;
    }
    JobState::Running
}

/// A pod that cannot make progress on its own; the step fails if it lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stuck {
    /// `ErrImagePull` / `ImagePullBackOff` / `InvalidImageName`.
    ImagePull {
        pod: String,
        container: String,
        image: String,
        reason: String,
        message: String,
    },
    /// `PodScheduled=False` with reason `Unschedulable`.
    Unschedulable { pod: String, message: String },
    /// `CreateContainerConfigError`: a missing Secret / ConfigMap / key.
    ContainerConfig {
        pod: String,
        container: String,
        message: String,
    },
}

impl Stuck {
    /// The same condition of the same pod (the timer keeps running while it lasts).
    pub fn key(&self) -> String {
        match self {
            Stuck::ImagePull { pod, container, .. } => format!("image:{pod}/{container}"),
            Stuck::Unschedulable { pod, .. } => format!("sched:{pod}"),
            Stuck::ContainerConfig { pod, container, .. } => format!("config:{pod}/{container}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Stuck::ImagePull {
                pod,
                container,
                image,
                reason,
                message,
            } => format!(
                "Step pod {pod} cannot pull image {image:?} for container {container}: {reason}{}",
                suffix(message)
            ),
            Stuck::Unschedulable { pod, message } => {
                format!(
                    "Step pod {pod} cannot be scheduled (Unschedulable){}",
                    suffix(message)
                )
            }
            Stuck::ContainerConfig {
                pod,
                container,
                message,
            } => format!(
                "Step pod {pod} cannot start container {container} (CreateContainerConfigError){}",
                suffix(message)
            ),
        }
    }
}

fn suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Why `pod` cannot progress, if it cannot.
pub fn stuck(pod: &Pod) -> Option<Stuck> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref().is_some_and(|p| p != "Pending") {
        return None;
    }
    for c in status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
    {
        let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = w.reason.clone().unwrap_or_default();
        let message = w.message.clone().unwrap_or_default();
        match reason.as_str() {
            "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
                return Some(Stuck::ImagePull {
                    pod: pod_name(pod),
                    container: c.name.clone(),
                    image: c.image.clone(),
                    reason,
                    message,
                })
            }
            "CreateContainerConfigError" => {
                return Some(Stuck::ContainerConfig {
                    pod: pod_name(pod),
                    container: c.name.clone(),
                    message,
                })
            }
            _ => {}
        }
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })?;
    Some(Stuck::Unschedulable {
        pod: pod_name(pod),
        message: unschedulable.message.clone().unwrap_or_default(),
    })
}

/// How the step container of each pod ended, for the failure message: OOMKilled, exit codes,
/// signals. Pods are described in creation order.
pub fn container_report(pods: &[&Pod], step_container: &str) -> Vec<String> {
    let mut out = Vec::new();
    for pod in pods {
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        for c in status.container_statuses.iter().flatten() {
            let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) else {
                continue;
            };
            if t.exit_code == 0 && c.name != step_container {
                continue;
            }
            let reason = t.reason.as_deref().unwrap_or("Error");
            let what = match reason {
                "OOMKilled" => format!(
                    "container {} of pod {} was OOMKilled (exit code {}): it exceeded its memory limit",
                    c.name,
                    pod_name(pod),
                    t.exit_code
                ),
                _ if t.exit_code == 0 => continue,
                _ => format!(
                    "container {} of pod {} exited with code {} ({reason}){}",
                    c.name,
                    pod_name(pod),
                    t.exit_code,
                    t.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
                ),
            };
            out.push(what);
        }
    }
    out
}

/// The STEP_FAILURE message of a failed Job: Python's wording first ("Encountered failed job pods for
/// job … with status: …, in namespace …") so searches keep working, then what actually happened.
pub fn failure_message(
    job_name: &str,
    namespace: &str,
    job: &Job,
    pods: &[&Pod],
    step_container: &str,
) -> String {
    let status = job
        .status
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
        .map(|v| v.to_string())
        .unwrap_or_else(|| "{}".into());
    let mut msg = format!("Encountered failed job pods for job {job_name} with status: {status}, in namespace {namespace}");
    if let JobState::Failed { reason, message } = job_state(job) {
        let why = match reason.as_deref() {
            Some("DeadlineExceeded") => Some("the Job ran longer than its activeDeadlineSeconds (DeadlineExceeded)".to_string()),
            Some("BackoffLimitExceeded") => Some("the Job's pods failed more often than its backoffLimit allows (BackoffLimitExceeded)".to_string()),
            Some(r) => Some(format!("Job failed: {r}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())),
            None => None,
        };
        if let Some(w) = why {
            msg.push_str(". ");
            msg.push_str(&w);
        }
    }
    for line in container_report(pods, step_container) {
        msg.push_str("; ");
        msg.push_str(&line);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(status: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "dagster-step-x"}, "status": status}))
            .expect("job")
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "dagster-step-x-abcde"}, "status": status}),
        )
        .expect("pod")
    }

    // Recorded from the real 1.20.2 API server (k8s-testing.md §1.4).
    #[test]
    fn v1_20_complete_and_failed() {
        let ok = job(
            json!({"completionTime":"2026-11-23T10:00:02Z","conditions":[{"lastProbeTime":"2026-11-23T10:00:02Z","lastTransitionTime":"2026-11-23T10:00:02Z","status":"True","type":"Complete"}],"startTime":"2026-11-23T10:00:00Z","succeeded":1}),
        );
        assert_eq!(job_state(&ok), JobState::Succeeded);
        let failed = job(
            json!({"conditions":[{"type":"Failed","status":"True","reason":"BackoffLimitExceeded","message":"Job has reached the specified backoff limit","lastProbeTime":"2026-11-23T10:00:02Z","lastTransitionTime":"2026-11-23T10:00:02Z"}],"failed":1,"startTime":"2026-11-23T10:00:00Z"}),
        );
        assert!(
            matches!(job_state(&failed), JobState::Failed { reason: Some(r), .. } if r == "BackoffLimitExceeded")
        );
        let running = job(json!({"active": 1, "startTime": "2026-11-23T10:00:00Z"}));
        assert_eq!(job_state(&running), JobState::Running);
        assert_eq!(job_state(&job(json!({}))), JobState::Running);
    }

    // ≥1.31: the forerunner conditions come first, the terminal ones once pods are gone.
    #[test]
    fn v1_31_success_criteria_and_failure_target() {
        let early = job(
            json!({"startTime":"2026-11-23T10:00:00Z","succeeded":1,"ready":0,"terminating":1,"uncountedTerminatedPods":{},
            "conditions":[{"type":"SuccessCriteriaMet","status":"True","reason":"CompletionsReached","message":"Reached expected number of succeeded pods","lastProbeTime":"2026-11-23T10:00:02Z","lastTransitionTime":"2026-11-23T10:00:02Z"}]}),
        );
        assert_eq!(job_state(&early), JobState::Succeeded);
        let target = job(
            json!({"startTime":"2026-11-23T10:00:00Z","failed":1,"terminating":1,
            "conditions":[{"type":"FailureTarget","status":"True","reason":"PodFailurePolicy","message":"Container main for pod default/x failed with exit code 42 matching FailJob rule at index 0","lastProbeTime":"2026-11-23T10:00:02Z","lastTransitionTime":"2026-11-23T10:00:02Z"}]}),
        );
        assert!(
            matches!(job_state(&target), JobState::Failed { reason: Some(r), .. } if r == "PodFailurePolicy")
        );
        let not_yet = job(
            json!({"conditions":[{"type":"SuccessCriteriaMet","status":"False","lastProbeTime":null,"lastTransitionTime":null}]}),
        );
        assert_eq!(job_state(&not_yet), JobState::Running);
    }

    #[test]
    fn deadline_exceeded_is_explained() {
        let j = job(
            json!({"conditions":[{"type":"Failed","status":"True","reason":"DeadlineExceeded","message":"Job was active longer than specified deadline","lastProbeTime":"2026-11-23T10:00:02Z","lastTransitionTime":"2026-11-23T10:00:02Z"}],"failed":1,"startTime":"2026-11-23T10:00:00Z"}),
        );
        let m = failure_message("dagster-step-x", "ns", &j, &[], "dagster");
        assert!(
            m.starts_with("Encountered failed job pods for job dagster-step-x with status: {"),
            "{m}"
        );
        assert!(m.contains("in namespace ns"), "{m}");
        assert!(m.contains("DeadlineExceeded"), "{m}");
    }

    #[test]
    fn oom_killed_and_exit_codes_are_reported() {
        let oom = pod(json!({"phase":"Failed","containerStatuses":[
            {"name":"dagster","image":"i","imageID":"","ready":false,"restartCount":0,"state":{"terminated":{"exitCode":137,"reason":"OOMKilled","startedAt":"2026-11-23T10:00:00Z","finishedAt":"2026-11-23T10:00:01Z"}}},
            {"name":"sidecar","image":"s","imageID":"","ready":false,"restartCount":0,"state":{"terminated":{"exitCode":0,"reason":"Completed","startedAt":"2026-11-23T10:00:00Z","finishedAt":"2026-11-23T10:00:01Z"}}}]}));
        let lines = container_report(&[&oom], "dagster");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("OOMKilled") && lines[0].contains("137"),
            "{lines:?}"
        );
        let err = pod(
            json!({"phase":"Failed","containerStatuses":[{"name":"dagster","image":"i","imageID":"","ready":false,"restartCount":0,"state":{"terminated":{"exitCode":3,"reason":"Error","startedAt":"2026-11-23T10:00:00Z","finishedAt":"2026-11-23T10:00:01Z"}}}]}),
        );
        assert_eq!(
            container_report(&[&err], "dagster"),
            ["container dagster of pod dagster-step-x-abcde exited with code 3 (Error)"]
        );
    }

    #[test]
    fn stuck_pods() {
        let pull = pod(
            json!({"phase":"Pending","containerStatuses":[{"name":"dagster","image":"registry.invalid/x:1","imageID":"","ready":false,"restartCount":0,
            "state":{"waiting":{"reason":"ImagePullBackOff","message":"Back-off pulling image \"registry.invalid/x:1\""}}}]}),
        );
        let s = stuck(&pull).expect("stuck");
        assert!(
            s.describe().contains("ImagePullBackOff")
                && s.describe().contains("registry.invalid/x:1"),
            "{}",
            s.describe()
        );
        let unsched = pod(
            json!({"phase":"Pending","conditions":[{"type":"PodScheduled","status":"False","reason":"Unschedulable",
            "message":"0/1 nodes are available: 1 node(s) didn't match node selector.","lastProbeTime":null,"lastTransitionTime":"2026-11-23T10:00:00Z"}]}),
        );
        assert!(
            matches!(stuck(&unsched), Some(Stuck::Unschedulable { message, .. }) if message.contains("node selector"))
        );
        let cfg = pod(
            json!({"phase":"Pending","containerStatuses":[{"name":"dagster","image":"i","imageID":"","ready":false,"restartCount":0,
            "state":{"waiting":{"reason":"CreateContainerConfigError","message":"secret \"pg\" not found"}}}]}),
        );
        assert!(matches!(stuck(&cfg), Some(Stuck::ContainerConfig { .. })));
        let creating = pod(
            json!({"phase":"Pending","containerStatuses":[{"name":"dagster","image":"i","imageID":"","ready":false,"restartCount":0,"state":{"waiting":{"reason":"ContainerCreating"}}}]}),
        );
        assert_eq!(stuck(&creating), None);
        let running = pod(json!({"phase":"Running"}));
        assert_eq!(stuck(&running), None);
    }
}
