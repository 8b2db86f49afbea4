//! What the kubelet tells the API server about a pod: its status (phase, conditions, one
//! `containerStatuses[]` entry per container), retried while the API server restarts, and the final
//! `DELETE` only the node may send.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use serde_json::{json, Value};

use crate::node::{now, Node};

pub(super) fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

pub(super) fn namespace(pod: &Pod) -> String {
    pod.metadata.namespace.clone().unwrap_or_default()
}

pub(super) fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// The kubelet's final word on a deleted pod: remove it from the API (only the node may).
pub(super) async fn finalize(node: &Node, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(node.client.clone(), &namespace(pod));
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name(pod), &params).await {
        Ok(_) => tracing::info!(pod = %name(pod), "pod deleted"),
        Err(kube::Error::Api(s)) if s.is_not_found() || s.code == 409 => {}
        Err(e) => tracing::warn!(pod = %name(pod), "cannot delete pod: {e}"),
    }
}

/// The state of one container, as `containerStatuses[]` reports it.
#[derive(Clone)]
pub(super) struct ContainerReport {
    pub(super) name: String,
    pub(super) image: String,
    pub(super) state: Value,
    pub(super) ready: bool,
}

impl ContainerReport {
    pub(super) fn waiting(c: &Container, reason: &str, message: &str) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: json!({"waiting": {"reason": reason, "message": message}}),
            ready: false,
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "image": self.image,
            "imageID": format!("process://{}", self.image),
            "ready": self.ready,
            "started": self.state.get("running").is_some(),
            "restartCount": 0,
            "state": self.state,
        });
        if let Some(pid) = self
            .state
            .get("running")
            .or_else(|| self.state.get("terminated"))
            .and_then(|s| s.get("containerID"))
        {
            v["containerID"] = pid.clone();
        }
        v
    }
}

pub(super) async fn report(
    api: &Api<Pod>,
    pod: &str,
    phase: &str,
    containers: &[ContainerReport],
    extra: Value,
) {
    let ready = phase == "Running" && containers.iter().all(|c| c.ready);
    let t = now();
    let cond = |type_: &str, ok: bool| json!({"type": type_, "status": if ok { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": t});
    let mut status = json!({
        "phase": phase,
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [cond("Initialized", true), cond("Ready", ready), cond("ContainersReady", ready), cond("PodScheduled", true)],
        "containerStatuses": containers.iter().map(ContainerReport::json).collect::<Vec<_>>(),
    });
    if let (Some(s), Some(e)) = (status.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    // Retried (the API server may be restarting): a lost final status would leave the Job running
    // forever.
    let patch = Patch::Strategic(json!({ "status": status }));
    for attempt in 0..120 {
        match api.patch_status(pod, &PatchParams::default(), &patch).await {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.is_not_found() => return,
            Err(e) => {
                if attempt % 10 == 0 {
                    tracing::warn!(pod, "cannot report pod status (retrying): {e}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Reports the pod Pending with every container waiting for `reason`.
pub(super) async fn report_waiting(
    api: &Api<Pod>,
    pod: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    reason: &str,
    message: &str,
) {
    let waiting: Vec<_> = spec
        .containers
        .iter()
        .map(|c| ContainerReport::waiting(c, reason, message))
        .collect();
    report(api, pod, "Pending", &waiting, json!({})).await;
}
