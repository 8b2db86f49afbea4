//! The node: the settings every pod task shares ([`Node`]), and the `Node` object's registration and
//! the status heartbeat that keeps it Ready (without it the node-lifecycle controller taints the node
//! `not-ready` and the scheduler stops binding pods).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

use crate::log_files::LogIndex;

/// Shared settings of the node.
pub struct Node {
    pub client: kube::Client,
    pub name: String,
    pub port: u16,
    pub root_dir: PathBuf,
    pub image_paths: Vec<(String, PathBuf)>,
    pub base_path: String,
    /// The API server URL and TLS settings, for the kubeconfigs handed to pods' service accounts.
    pub cluster_url: String,
    pub logs: LogIndex,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Creates the Node (an existing one is reused) and reports it Ready.
pub async fn register(node: &Node) -> anyhow::Result<()> {
    let nodes: Api<NodeObject> = Api::all(node.client.clone());
    let body: NodeObject = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "celeriac.io/process-kubelet": "true",
            },
        },
        "spec": {},
    }))
    .context("building the Node")?;
    match nodes.create(&PostParams::default(), &body).await {
        Ok(_) => tracing::info!(node = %node.name, "node registered"),
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            tracing::info!(node = %node.name, "node already registered")
        }
        Err(e) => return Err(e).context("registering the node"),
    }
    report_status(node).await
}

async fn report_status(node: &Node) -> anyhow::Result<()> {
    let nodes: Api<NodeObject> = Api::all(node.client.clone());
    let t = now();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let status = json!({
        "status": {
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "process kubelet"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "process kubelet"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "process kubelet"),
                condition("Ready", "True", "KubeletReady", "process kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": node.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": node.port}},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "100Gi"},
            "nodeInfo": {
                "machineID": "celeriac", "systemUUID": "celeriac", "bootID": "celeriac",
                "kernelVersion": "", "osImage": "celeriac process kubelet",
                "containerRuntimeVersion": "process://0.1", "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64",
            },
        }
    });
    nodes
        .patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Strategic(status),
        )
        .await
        .context("reporting node status")?;
    Ok(())
}

/// Reports the node Ready every 5 s (the controller's grace period is 40 s).
pub async fn heartbeat(node: std::sync::Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        if let Err(e) = report_status(&node).await {
            tracing::warn!("node heartbeat failed: {e:#}");
        }
    }
}
