//! Pods bound to this node: one watch (`spec.nodeName=<node>`), one task per pod that runs its
//! containers as process groups, reports status, and honours deletion (SIGTERM, SIGKILL after the
//! grace period, then the final `DELETE` with `gracePeriodSeconds: 0` that real kubelets send).
//!
//! This module is the watch and the bookkeeping of which pod has a task; [`lifecycle`] is one pod's
//! run from image pull to final status, [`container`] one container's process, and [`api`] what the
//! kubelet writes to the API server about a pod.

mod api;
mod container;
mod lifecycle;

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use api::{finalize, name, namespace, phase};
use lifecycle::run_pod;

struct Tracked {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    deleting: bool,
}

/// Watches this node's pods until the process ends.
pub async fn run(node: Arc<Node>) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::all(node.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut pods: HashMap<String, Tracked> = HashMap::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(pod)) | Ok(Event::InitApply(pod)) => reconcile(&node, &mut pods, pod),
            Ok(Event::Delete(pod)) => {
                if let Some(t) = pod.metadata.uid.as_ref().and_then(|u| pods.remove(u)) {
                    t.stop.cancel();
                }
                node.logs.remove_pod(&namespace(&pod), &name(&pod));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("pod watch: {e}"),
        }
    }
    anyhow::bail!("the pod watch ended")
}

fn reconcile(node: &Arc<Node>, pods: &mut HashMap<String, Tracked>, pod: Pod) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if pod.metadata.deletion_timestamp.is_some() {
        match pods.get_mut(&uid) {
            Some(t) if !t.task.is_finished() => t.stop.cancel(),
            Some(t) if t.deleting => {}
            other => {
                if let Some(t) = other {
                    t.deleting = true;
                } else {
                    pods.insert(
                        uid.clone(),
                        Tracked {
                            stop: CancellationToken::new(),
                            task: tokio::spawn(async {}),
                            deleting: true,
                        },
                    );
                }
                let node = node.clone();
                tokio::spawn(async move { finalize(&node, &pod).await });
            }
        }
        return;
    }
    if pods.contains_key(&uid) || phase(&pod) != "Pending" {
        return;
    }
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_pod(node.clone(), pod, stop.clone()));
    pods.insert(
        uid,
        Tracked {
            stop,
            task,
            deleting: false,
        },
    );
}
