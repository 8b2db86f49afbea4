//! One pod's run, phase by phase as a kubelet goes through it: images pulled (or `ErrImagePull`),
//! volumes and environments resolved (retried while a Secret or ConfigMap is missing), a service
//! account identity, init containers one after the other, then the containers with their probes until
//! every one has ended, and the final status. Deletion (`stop`) can end any phase.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, PodSpec, ServiceAccount};
use kube::api::PostParams;
use kube::Api;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::api::{finalize, name, namespace, report, report_waiting, ContainerReport};
use super::container::{start, Proc};
use crate::env::resolve;
use crate::node::{now, Node};
use crate::probes::{self, ProbeEvent};
use crate::volumes;

/// An image on the reserved `.invalid` TLD (RFC 2606) cannot be pulled.
fn unpullable(image: &str) -> bool {
    image
        .split('/')
        .next()
        .map(|host| host.split(':').next().unwrap_or(host).ends_with(".invalid"))
        .unwrap_or(false)
        && image.contains('/')
}

fn grace(pod: &Pod) -> Duration {
    let secs = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
        .clamp(0, 600);
    Duration::from_secs(secs as u64)
}

/// Runs a pod bound to this node until its containers have ended or it is deleted (`stop`).
pub(super) async fn run_pod(node: Arc<Node>, pod: Pod, stop: CancellationToken) {
    let (ns, pod_name) = (namespace(&pod), name(&pod));
    let api: Api<Pod> = Api::namespaced(node.client.clone(), &ns);
    let spec = pod.spec.clone().unwrap_or_default();
    tracing::info!(namespace = %ns, pod = %pod_name, "starting pod");
    let run = PodRun {
        node,
        pod,
        api,
        spec,
        ns,
        pod_name,
        stop,
    };
    if !run.pull_images().await {
        return;
    }
    let dir = run.pod_dir();
    let Some((volumes, envs)) = run.volumes_and_envs(&dir).await else {
        return;
    };
    let kubeconfig = service_account_kubeconfig(&run.node, &run.pod, &dir).await;
    let started = now();
    let n_init = run.spec.init_containers.as_ref().map_or(0, Vec::len);
    let (init_envs, main_envs) = envs.split_at(n_init);
    let kubeconfig = kubeconfig.as_deref();
    if !run
        .init_containers(init_envs, &volumes, &dir, kubeconfig, &started)
        .await
    {
        return;
    }
    run.containers(main_envs, &volumes, &dir, kubeconfig, &started)
        .await;
}

/// The pod's volumes (name → directory on the host) and each container's environment, init
/// containers first.
type Prepared = (HashMap<String, PathBuf>, Vec<Vec<(String, String)>>);

/// One pod's run: what every phase needs.
struct PodRun {
    node: Arc<Node>,
    pod: Pod,
    api: Api<Pod>,
    spec: PodSpec,
    ns: String,
    pod_name: String,
    stop: CancellationToken,
}

impl PodRun {
    /// Images: one on the `.invalid` TLD fails the pod's start (`ErrImagePull`, then
    /// `ImagePullBackOff`) until it is deleted. Returns whether the pod goes on.
    async fn pull_images(&self) -> bool {
        if let Some(bad) = self
            .spec
            .containers
            .iter()
            .find(|c| unpullable(c.image.as_deref().unwrap_or("")))
        {
            let image = bad.image.clone().unwrap_or_default();
            let msg = format!(
                "rpc error: code = Unknown desc = failed to resolve image \"{image}\": no such host"
            );
            self.report_waiting("ErrImagePull", &msg).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.stop.cancelled() => { self.finalize().await; return false; }
            }
            let msg = format!("Back-off pulling image \"{image}\"");
            self.report_waiting("ImagePullBackOff", &msg).await;
            self.stop.cancelled().await;
            self.finalize().await;
            return false;
        }
        true
    }

    /// The pod's directory on the node (its logs, volumes and working files).
    fn pod_dir(&self) -> PathBuf {
        let (ns, pod_name) = (&self.ns, &self.pod_name);
        let dir = self.node.root_dir.join("pods").join(format!(
            "{ns}_{pod_name}_{}",
            self.pod.metadata.uid.clone().unwrap_or_default()
        ));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(pod = %pod_name, "cannot create {}: {e}", dir.display());
        }
        dir
    }

    /// Volumes and environments (retried like the kubelet does while a Secret/ConfigMap is missing);
    /// `None` when the pod was deleted meanwhile.
    async fn volumes_and_envs(&self, dir: &Path) -> Option<Prepared> {
        let (client, pod, spec) = (&self.node.client, &self.pod, &self.spec);
        let (volumes, envs) = loop {
            let mut all = Vec::new();
            let mut failed = None;
            let volumes = match volumes::materialize(client, pod, dir).await {
                Ok(v) => v,
                Err(e) => {
                    failed = Some(e.to_string());
                    HashMap::new()
                }
            };
            for c in spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .take_while(|_| failed.is_none())
            {
                match resolve(client, pod, c).await {
                    Ok(e) => all.push(e),
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            match failed {
                None => break (volumes, all),
                Some(msg) => {
                    self.report_waiting("CreateContainerConfigError", &msg)
                        .await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = self.stop.cancelled() => { self.finalize().await; return None; }
                    }
                }
            }
        };
        Some((volumes, envs))
    }

    /// Init containers run one after the other; a failure fails the pod (restartPolicy Never).
    /// Returns whether the pod goes on.
    async fn init_containers(
        &self,
        init_envs: &[Vec<(String, String)>],
        volumes: &HashMap<String, PathBuf>,
        dir: &Path,
        kubeconfig: Option<&Path>,
        started: &str,
    ) -> bool {
        let (node, pod, spec, stop) = (&self.node, &self.pod, &self.spec, &self.stop);
        for (c, env) in spec.init_containers.iter().flatten().zip(init_envs) {
            let mut proc = start(node, pod, c, env, volumes, dir, kubeconfig);
            let waiting = self.initializing();
            self.report("Pending", &waiting, json!({"startTime": started}))
                .await;
            let end = proc.wait(stop, grace(pod)).await;
            if stop.is_cancelled() {
                self.finalize().await;
                return false;
            }
            if end.exit_code != 0 {
                let waiting = self.initializing();
                self.report(
                    "Failed",
                    &waiting,
                    json!({"startTime": started, "reason": "InitContainerFailed"}),
                )
                .await;
                return false;
            }
        }
        true
    }

    /// The containers, with their probes, until every one has ended; then the pod's final phase.
    async fn containers(
        &self,
        main_envs: &[Vec<(String, String)>],
        volumes: &HashMap<String, PathBuf>,
        dir: &Path,
        kubeconfig: Option<&Path>,
        started: &str,
    ) {
        let (node, pod, spec, stop) = (&self.node, &self.pod, &self.spec, &self.stop);
        let procs: Vec<Proc> = spec
            .containers
            .iter()
            .zip(main_envs)
            .map(|(c, env)| start(node, pod, c, env, volumes, dir, kubeconfig))
            .collect();
        let mut reports: Vec<ContainerReport> = procs.iter().map(Proc::report_running).collect();
        // Probes: a container with a readiness probe starts not ready.
        let probe_stop = stop.child_token();
        let (probe_tx, probe_rx) = tokio::sync::mpsc::channel(16);
        let pids: Vec<i32> = procs.iter().map(|p| p.pid).collect();
        for (i, c) in spec.containers.iter().enumerate() {
            if procs[i].child.is_some() && probes::start(i, c, probe_tx.clone(), probe_stop.clone())
            {
                reports[i].ready = false;
            }
        }
        drop(probe_tx);
        self.report("Running", &reports, json!({"startTime": started}))
            .await;
        let failed = self
            .wait_containers(procs, &mut reports, probe_rx, &pids)
            .await;
        probe_stop.cancel();
        let final_phase = if failed { "Failed" } else { "Succeeded" };
        tracing::info!(namespace = %self.ns, pod = %self.pod_name, phase = final_phase, "pod finished");
        self.report(final_phase, &reports, json!({})).await;
        if stop.is_cancelled() {
            self.finalize().await;
        }
    }

    /// Waits for every container, following the probes (readiness reported, a liveness failure kills
    /// the container); returns whether one failed.
    async fn wait_containers(
        &self,
        procs: Vec<Proc>,
        reports: &mut [ContainerReport],
        mut probe_rx: mpsc::Receiver<ProbeEvent>,
        pids: &[i32],
    ) -> bool {
        let (ns, pod_name, stop) = (&self.ns, &self.pod_name, &self.stop);
        let g = grace(&self.pod);
        let mut waits = tokio::task::JoinSet::new();
        for (i, mut p) in procs.into_iter().enumerate() {
            let stop = stop.clone();
            waits.spawn(async move { (i, p.wait(&stop, g).await) });
        }
        let mut failed = false;
        loop {
            let joined = tokio::select! {
                joined = waits.join_next() => match joined {
                    Some(j) => j,
                    None => break,
                },
                Some(event) = probe_rx.recv() => {
                    match event {
                        ProbeEvent::Ready(i, ready) => {
                            if reports[i].state.get("running").is_some() && reports[i].ready != ready {
                                tracing::info!(namespace = %ns, pod = %pod_name, container = i, ready, "readiness changed");
                                reports[i].ready = ready;
                                self.report("Running", reports, json!({})).await;
                            }
                        }
                        ProbeEvent::Unhealthy(i) => {
                            tracing::warn!(namespace = %ns, pod = %pod_name, container = i, "liveness probe failed; killing the container");
                            if pids[i] > 0 {
                                let _ = killpg(Pid::from_raw(pids[i]), Signal::SIGKILL);
                            }
                        }
                    }
                    continue;
                }
            };
            let Ok((i, end)) = joined else {
                failed = true;
                continue;
            };
            failed |= end.exit_code != 0;
            reports[i].state = end.state();
            reports[i].ready = false;
            if !stop.is_cancelled() {
                let still_running = reports.iter().any(|r| r.state.get("running").is_some());
                if still_running {
                    self.report("Running", reports, json!({})).await;
                }
            }
        }
        failed
    }

    /// Every container waiting while the init containers run.
    fn initializing(&self) -> Vec<ContainerReport> {
        self.spec
            .containers
            .iter()
            .map(|c| ContainerReport::waiting(c, "PodInitializing", ""))
            .collect()
    }

    /// Reports the pod's status ([`report`]).
    async fn report(&self, phase: &str, containers: &[ContainerReport], extra: serde_json::Value) {
        report(&self.api, &self.pod_name, phase, containers, extra).await;
    }

    /// Reports the pod Pending with every container waiting for `reason` ([`report_waiting`]).
    async fn report_waiting(&self, reason: &str, message: &str) {
        report_waiting(&self.api, &self.pod_name, &self.spec, reason, message).await;
    }

    /// The final `DELETE` of the deleted pod ([`finalize`]).
    async fn finalize(&self) {
        finalize(&self.node, &self.pod).await;
    }
}

/// Gives the pod's service account an identity: a bound token from the TokenRequest API (as the
/// projected service-account volume would), delivered as a kubeconfig in `KUBECONFIG` since a process
/// has no `/var/run/secrets/kubernetes.io/serviceaccount`.
async fn service_account_kubeconfig(node: &Node, pod: &Pod, dir: &Path) -> Option<PathBuf> {
    let spec = pod.spec.as_ref()?;
    if spec.automount_service_account_token == Some(false) {
        return None;
    }
    let sa = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(node.client.clone(), &namespace(pod));
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [],
            "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": name(pod), "uid": pod.metadata.uid},
        }
    }))
    .ok()?;
    let token = match api
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
    {
        Ok(t) => t.status?.token,
        Err(e) => {
            tracing::warn!(pod = %name(pod), service_account = %sa, "no token for the service account: {e}");
            return None;
        }
    };
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "cluster", "cluster": {"server": node.cluster_url.trim_end_matches('/'), "insecure-skip-tls-verify": true}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "cluster", "user": "sa", "namespace": namespace(pod)}}],
    });
    let path = dir.join("serviceaccount.kubeconfig");
    std::fs::write(&path, kubeconfig.to_string()).ok()?;
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_tld_images_cannot_be_pulled() {
        assert!(unpullable("registry.invalid/nope:1"));
        assert!(unpullable("registry.invalid:5000/nope"));
        assert!(!unpullable("celeriac/dagster-step:dev"));
        assert!(!unpullable("busybox"));
    }
}
