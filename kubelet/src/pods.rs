//! Pods bound to this node: one watch (`spec.nodeName=<node>`), one task per pod that runs its
//! containers as process groups, reports status, and honours deletion (SIGTERM, SIGKILL after the
//! grace period, then the final `DELETE` with `gracePeriodSeconds: 0` that real kubelets send).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Container, Pod, ServiceAccount};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::env::resolve;
use crate::logs::LogFile;
use crate::node::now;
use crate::probes::{self, ProbeEvent};
use crate::volumes;
use crate::Node;

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

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn namespace(pod: &Pod) -> String {
    pod.metadata.namespace.clone().unwrap_or_default()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
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

/// The kubelet's final word on a deleted pod: remove it from the API (only the node may).
async fn finalize(node: &Node, pod: &Pod) {
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
struct ContainerReport {
    name: String,
    image: String,
    state: Value,
    ready: bool,
}

impl ContainerReport {
    fn waiting(c: &Container, reason: &str, message: &str) -> Self {
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

async fn report(
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
async fn report_waiting(
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

async fn run_pod(node: Arc<Node>, pod: Pod, stop: CancellationToken) {
    let (ns, pod_name) = (namespace(&pod), name(&pod));
    let api: Api<Pod> = Api::namespaced(node.client.clone(), &ns);
    let spec = pod.spec.clone().unwrap_or_default();
    tracing::info!(namespace = %ns, pod = %pod_name, "starting pod");

    // Images.
    if let Some(bad) = spec
        .containers
        .iter()
        .find(|c| unpullable(c.image.as_deref().unwrap_or("")))
    {
        let image = bad.image.clone().unwrap_or_default();
        let msg = format!(
            "rpc error: code = Unknown desc = failed to resolve image \"{image}\": no such host"
        );
        report_waiting(&api, &pod_name, &spec, "ErrImagePull", &msg).await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => { finalize(&node, &pod).await; return; }
        }
        let msg = format!("Back-off pulling image \"{image}\"");
        report_waiting(&api, &pod_name, &spec, "ImagePullBackOff", &msg).await;
        stop.cancelled().await;
        finalize(&node, &pod).await;
        return;
    }

    let dir = node.root_dir.join("pods").join(format!(
        "{ns}_{pod_name}_{}",
        pod.metadata.uid.clone().unwrap_or_default()
    ));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(pod = %pod_name, "cannot create {}: {e}", dir.display());
    }

    // Volumes and environments (retried like the kubelet does while a Secret/ConfigMap is missing).
    let (volumes, envs) = loop {
        let mut all = Vec::new();
        let mut failed = None;
        let volumes = match volumes::materialize(&node.client, &pod, &dir).await {
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
            match resolve(&node.client, &pod, c).await {
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
                report_waiting(&api, &pod_name, &spec, "CreateContainerConfigError", &msg).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.cancelled() => { finalize(&node, &pod).await; return; }
                }
            }
        }
    };

    let kubeconfig = service_account_kubeconfig(&node, &pod, &dir).await;
    let started = now();
    let n_init = spec.init_containers.as_ref().map_or(0, Vec::len);
    let (init_envs, main_envs) = envs.split_at(n_init);

    // Init containers run one after the other; a failure fails the pod (restartPolicy Never).
    for (c, env) in spec.init_containers.iter().flatten().zip(init_envs) {
        let mut proc = start(&node, &pod, c, env, &volumes, &dir, kubeconfig.as_deref());
        let waiting: Vec<_> = spec
            .containers
            .iter()
            .map(|c| ContainerReport::waiting(c, "PodInitializing", ""))
            .collect();
        report(
            &api,
            &pod_name,
            "Pending",
            &waiting,
            json!({"startTime": started}),
        )
        .await;
        let end = proc.wait(&stop, grace(&pod)).await;
        if stop.is_cancelled() {
            finalize(&node, &pod).await;
            return;
        }
        if end.exit_code != 0 {
            let waiting: Vec<_> = spec
                .containers
                .iter()
                .map(|c| ContainerReport::waiting(c, "PodInitializing", ""))
                .collect();
            report(
                &api,
                &pod_name,
                "Failed",
                &waiting,
                json!({"startTime": started, "reason": "InitContainerFailed"}),
            )
            .await;
            return;
        }
    }

    let procs: Vec<Proc> = spec
        .containers
        .iter()
        .zip(main_envs)
        .map(|(c, env)| start(&node, &pod, c, env, &volumes, &dir, kubeconfig.as_deref()))
        .collect();
    let mut reports: Vec<ContainerReport> = procs.iter().map(Proc::report_running).collect();
    // Probes: a container with a readiness probe starts not ready.
    let probe_stop = stop.child_token();
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel(16);
    let pids: Vec<i32> = procs.iter().map(|p| p.pid).collect();
    for (i, c) in spec.containers.iter().enumerate() {
        if procs[i].child.is_some() && probes::start(i, c, probe_tx.clone(), probe_stop.clone()) {
            reports[i].ready = false;
        }
    }
    drop(probe_tx);
    report(
        &api,
        &pod_name,
        "Running",
        &reports,
        json!({"startTime": started}),
    )
    .await;

    let g = grace(&pod);
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
                            report(&api, &pod_name, "Running", &reports, json!({})).await;
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
                report(&api, &pod_name, "Running", &reports, json!({})).await;
            }
        }
    }
    probe_stop.cancel();
    let final_phase = if failed { "Failed" } else { "Succeeded" };
    tracing::info!(namespace = %ns, pod = %pod_name, phase = final_phase, "pod finished");
    report(&api, &pod_name, final_phase, &reports, json!({})).await;
    if stop.is_cancelled() {
        finalize(&node, &pod).await;
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

/// A running (or failed-to-start) container.
struct Proc {
    name: String,
    image: String,
    child: Option<tokio::process::Child>,
    pid: i32,
    started_at: String,
    memory_limit: Option<u64>,
    start_error: Option<String>,
    exited: watch::Sender<bool>,
}

/// How a container ended.
struct End {
    exit_code: i32,
    reason: &'static str,
    message: Option<String>,
    started_at: String,
    finished_at: String,
    pid: i32,
}

impl End {
    fn state(&self) -> Value {
        let mut t = json!({
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": format!("process://{}", self.pid),
        });
        if let Some(m) = &self.message {
            t["message"] = json!(m);
        }
        json!({ "terminated": t })
    }
}

fn start(
    node: &Node,
    pod: &Pod,
    c: &Container,
    env: &[(String, String)],
    volumes: &HashMap<String, PathBuf>,
    dir: &Path,
    kubeconfig: Option<&Path>,
) -> Proc {
    let image = c.image.clone().unwrap_or_default();
    let (exited, exited_rx) = watch::channel(false);
    let log_path = dir.join(format!("{}.log", c.name));
    node.logs.insert(
        &namespace(pod),
        &name(pod),
        &c.name,
        LogFile {
            path: log_path.clone(),
            exited: exited_rx,
        },
    );
    let mut proc = Proc {
        name: c.name.clone(),
        image: image.clone(),
        child: None,
        pid: 0,
        started_at: now(),
        memory_limit: c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| parse_quantity(&q.0)),
        start_error: None,
        exited,
    };
    let argv: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    let Some((program, rest)) = argv.split_first() else {
        proc.start_error = Some("no command: the process kubelet has no image entrypoints".into());
        return proc;
    };
    let mut path = node.base_path.clone();
    for (prefix, p) in &node.image_paths {
        if image.starts_with(prefix.as_str()) {
            path = format!("{}:{path}", p.display());
        }
    }
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(f) => f,
        Err(e) => {
            proc.start_error = Some(format!("cannot open the log file: {e}"));
            return proc;
        }
    };
    let log_err = match log.try_clone() {
        Ok(f) => f,
        Err(e) => {
            proc.start_error = Some(format!("cannot open the log file: {e}"));
            return proc;
        }
    };
    let workdir = c
        .working_dir
        .as_ref()
        .map(PathBuf::from)
        .filter(|w| std::fs::create_dir_all(w).is_ok())
        .unwrap_or_else(|| dir.to_path_buf());
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .env_clear()
        .env("PATH", &path)
        .env("HOSTNAME", name(pod))
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        );
    if let Ok(lang) = std::env::var("LANG") {
        cmd.env("LANG", lang);
    }
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .kill_on_drop(true);
    let mounts = volumes::container_mounts(c, volumes);
    if !mounts.is_empty() {
        // SAFETY: the closure runs between fork and exec; it only makes system calls (unshare,
        // mount) on CStrings prepared before the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || volumes::enter(&mounts));
        }
    }
    match cmd.spawn() {
        Ok(child) => {
            proc.pid = child.id().map_or(0, |p| p as i32);
            proc.child = Some(child);
        }
        Err(e) => proc.start_error = Some(format!("starting {program:?}: {e}")),
    }
    proc
}

impl Proc {
    fn report_running(&self) -> ContainerReport {
        let state = if self.child.is_some() {
            json!({"running": {"startedAt": self.started_at, "containerID": format!("process://{}", self.pid)}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        ContainerReport {
            name: self.name.clone(),
            image: self.image.clone(),
            state,
            ready: self.child.is_some(),
        }
    }

    /// Waits for the process; on `stop` terminates its group (SIGKILL after `grace`); enforces the
    /// memory limit.
    async fn wait(&mut self, stop: &CancellationToken, grace: Duration) -> End {
        let started_at = self.started_at.clone();
        let end = |code: i32, reason: &'static str, message: Option<String>, pid: i32| End {
            exit_code: code,
            reason,
            message,
            started_at: started_at.clone(),
            finished_at: now(),
            pid,
        };
        let pid = self.pid;
        let Some(child) = self.child.as_mut() else {
            let _ = self.exited.send(true);
            return end(128, "StartError", self.start_error.clone(), 0);
        };
        let mut oom = false;
        let mut terminating = false;
        let mut memory_check = tokio::time::interval(Duration::from_millis(250));
        let deadline = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
        tokio::pin!(deadline);
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                _ = stop.cancelled(), if !terminating => {
                    terminating = true;
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                    deadline.as_mut().reset(tokio::time::Instant::now() + grace);
                }
                _ = &mut deadline => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
                _ = memory_check.tick(), if self.memory_limit.is_some() => {
                    if let Some(limit) = self.memory_limit {
                        if group_rss(pid) > limit {
                            oom = true;
                            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                        }
                    }
                }
            }
        };
        // Whatever the main process left behind in its group goes with it, as with a container.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = self.exited.send(true);
        match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9));
                let reason = if oom {
                    "OOMKilled"
                } else if code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                end(code, reason, None, pid)
            }
            Err(e) => end(128, "Error", Some(e.to_string()), pid),
        }
    }
}

/// Resident memory of every process in the group, in bytes.
fn group_rss(pgid: i32) -> u64 {
    let page = 4096u64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let pgrp: i32 = fields.get(2)?.parse().ok()?;
            let rss: u64 = fields.get(21)?.parse().ok()?;
            (pgrp == pgid).then_some(rss * page)
        })
        .sum()
}

/// A Kubernetes memory quantity (`128Mi`, `1G`, `500000`) in bytes.
fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "m" => 1e-3,
        _ => return None,
    };
    Some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("128Mi"), Some(128 * 1024 * 1024));
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_quantity("500000"), Some(500_000));
        assert_eq!(parse_quantity("1x"), None);
    }

    #[test]
    fn invalid_tld_images_cannot_be_pulled() {
        assert!(unpullable("registry.invalid/nope:1"));
        assert!(unpullable("registry.invalid:5000/nope"));
        assert!(!unpullable("celeriac/dagster-step:dev"));
        assert!(!unpullable("busybox"));
    }
}
