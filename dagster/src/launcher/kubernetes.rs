//! The Kubernetes launcher: each step runs as the Job Dagster's Python worker would create
//! (`construct_dagster_k8s_job`, [`crate::kubernetes::job`], built by the step task), tracked through
//! the namespace's shared watches ([`crate::kubernetes::tracker`]), with its events read from the step
//! container's log.
//!
//! Better than the Python worker, and tested for it:
//! * no polling: a step costs a create, one log read per pod and a delete, whatever its length;
//! * idempotent: a 409 `AlreadyExists` adopts the existing Job after checking it is this run's and
//!   step's, so a redelivered task (worker crash, Redis restore) never runs a step twice;
//! * logs are read from the step container by name, so sidecars do not lose the step's events;
//! * finished Jobs are deleted with background propagation (or left to their TTL), cancelled ones at
//!   once, and stuck pods (image pull, scheduling, missing Secret) fail the step with the reason;
//! * API calls retry transient failures, and the shared watches re-list after an API server restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Api;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    FailureClass, JobBody, LaunchError, LogError, StepJob, StepLauncher, StepRun, StepSpec,
    Workload, WorkloadKind,
};
use crate::config::{JobRetention, KubernetesConfig};
use crate::kubernetes::access;
use crate::kubernetes::api::{call, KubeMetrics};
use crate::kubernetes::job::sanitize_label;
use crate::kubernetes::outcome::{failure_message, job_state, stuck, JobState, Stuck};
use crate::kubernetes::tracker::{StepView, StepWatch, Tracker, STEP_SELECTOR};

/// A Kubernetes client with its shared watches.
struct Cluster {
    client: kube::Client,
    tracker: Tracker,
    /// Namespaces whose permissions were checked and found complete.
    allowed: Mutex<BTreeSet<String>>,
    /// Who the client is, for error messages.
    identity: String,
}

/// Runs steps as Kubernetes Jobs.
pub struct KubernetesLauncher {
    settings: KubernetesConfig,
    clusters: Mutex<HashMap<String, Arc<Cluster>>>,
    /// Bounds the launcher's concurrent API requests that start steps (creates, and the reads of an
    /// adopted Job): each request in flight holds a pooled HTTP/1.1 connection (TLS state and
    /// buffers), so without a bound a burst of a thousand steps opens hundreds of connections and
    /// keeps them. The shared watches are not counted: they hold their own two connections per
    /// namespace.
    requests: Arc<Semaphore>,
    /// The same for requests that finish steps (log reads, deletes), in a lane of their own: a
    /// finished step's result must not wait behind a burst of creates.
    finishing: Arc<Semaphore>,
}

/// Concurrent API requests starting steps (see [`KubernetesLauncher::requests`]): at ~10 ms per
/// create on a loaded API server this still allows thousands of creates per second.
pub const MAX_CONCURRENT_REQUESTS: usize = 16;
/// Concurrent API requests finishing steps (see [`KubernetesLauncher::finishing`]).
pub const MAX_CONCURRENT_FINISHING_REQUESTS: usize = 8;

/// Which bound an API request counts against.
#[derive(Debug, Clone, Copy)]
enum Lane {
    Starting,
    Finishing,
}

impl KubernetesLauncher {
    pub fn new(settings: KubernetesConfig) -> Self {
        // kube's rustls connector needs a process-wide crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            settings,
            clusters: Mutex::new(HashMap::new()),
            requests: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
            finishing: Arc::new(Semaphore::new(MAX_CONCURRENT_FINISHING_REQUESTS)),
        }
    }

    /// Runs one API request (with its retries) once its lane has room.
    /// Boxed: a kube request future is kilobytes, and a step's future lives as long as its Job runs,
    /// so requests are allocated while they run instead of being laid out inline in every step.
    fn limited<'a, T: 'a>(
        &'a self,
        lane: Lane,
        request: impl std::future::Future<Output = T> + Send + 'a,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
        let bound = match lane {
            Lane::Starting => &self.requests,
            Lane::Finishing => &self.finishing,
        };
        Box::pin(async move {
            // The semaphore is never closed; if it were, run unbounded rather than fail the step.
            let _permit = bound.acquire().await.ok();
            request.await
        })
    }

    /// The client for a step, as Dagster's Python worker picks it: in-cluster when the task says
    /// `load_incluster_config` and the worker runs in a cluster, else the task's `kubeconfig_file`,
    /// else the standard inference (`KUBECONFIG`, `~/.kube/config`, in-cluster).
    async fn cluster(&self, step: &StepJob) -> Result<Arc<Cluster>, String> {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let key = if step.load_incluster_config && in_cluster {
            "in-cluster".to_string()
        } else if let Some(path) = step
            .kubeconfig_file
            .as_ref()
            .filter(|p| !step.load_incluster_config && std::path::Path::new(p).is_file())
        {
            format!("kubeconfig:{path}")
        } else {
            "inferred".to_string()
        };
        let mut clusters = self.clusters.lock().await;
        if let Some(c) = clusters.get(&key) {
            return Ok(c.clone());
        }
        let config = match key.as_str() {
            "in-cluster" => kube::Config::incluster()
                .map_err(|e| format!("in-cluster Kubernetes config: {e}"))?,
            k if k.starts_with("kubeconfig:") => {
                let path = &k["kubeconfig:".len()..];
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| format!("reading kubeconfig {path}: {e}"))?;
                kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| format!("kubeconfig {path}: {e}"))?
            }
            _ => kube::Config::infer()
                .await
                .map_err(|e| format!("no Kubernetes configuration found: {e}"))?,
        };
        let identity = format!("{key} ({})", config.cluster_url);
        let client =
            kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))?;
        info!(source = %key, "Kubernetes client ready");
        let cluster = Arc::new(Cluster {
            tracker: Tracker::new(client.clone()),
            client,
            allowed: Mutex::new(BTreeSet::new()),
            identity,
        });
        clusters.insert(key, cluster.clone());
        Ok(cluster)
    }

    /// Checks once per namespace that the worker may do everything a step needs.
    async fn check_access(&self, cluster: &Cluster, namespace: &str) -> Result<(), String> {
        // Held across the review: concurrent first steps in a namespace wait for one check instead
        // of each sending their own.
        let mut allowed = cluster.allowed.lock().await;
        if allowed.contains(namespace) {
            return Ok(());
        }
        match access::missing(&cluster.client, namespace).await {
            Ok(missing) if missing.is_empty() => {
                allowed.insert(namespace.to_string());
                Ok(())
            }
            Ok(missing) => Err(format!(
                "the worker's Kubernetes identity ({}) lacks permissions in namespace {namespace}: {}. \
                 celeriac needs a Role with jobs.batch: create, get, list, watch, delete; pods: get, list, watch; \
                 pods/log: get (see charts/celeriac)",
                cluster.identity,
                missing.join(", ")
            )),
            Err(e) => {
                // Cannot tell (API down, review API disabled): go ahead; a real denial surfaces as 403.
                warn!(namespace, "cannot check the worker's Kubernetes permissions: {e}");
                Ok(())
            }
        }
    }
}

/// The existing Job belongs to this run and step (labels are sanitised as Dagster does).
fn belongs_to(job: &Job, spec: &StepSpec) -> bool {
    let labels = job.metadata.labels.clone().unwrap_or_default();
    labels.get("dagster/run-id") == Some(&sanitize_label(&spec.run_id))
        && labels.get("dagster/op") == Some(&sanitize_label(&spec.step_key))
}

fn delete_params(uid: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::background()
    }
}

/// How waiting ended.
enum Waited {
    Terminal {
        succeeded: bool,
        message: Option<String>,
    },
    /// Gave up (timeout, stuck pod, Job deleted): no logs worth waiting for beyond what exists.
    GaveUp(String),
    Cancelled,
}

impl KubernetesLauncher {
    /// Creates the step's Job, or adopts the one a previous delivery of this task created (after
    /// checking it is this run's and step's, and seeding the watch with its pods). Returns the Job
    /// and whether it was adopted.
    async fn create_or_adopt(
        &self,
        spec: &StepSpec,
        job: &Job,
        jobs: &Api<Job>,
        pods_api: &Api<Pod>,
        sub: &StepWatch,
    ) -> Result<(Job, bool), LaunchError> {
        let create_err = |reason: String| LaunchError::Create {
            job_name: spec.job_name.clone(),
            reason,
        };
        let window = self.settings.api_retry_window;
        let metrics = KubeMetrics::get();
        let post = PostParams::default();
        let created = match self
            .limited(
                Lane::Starting,
                call("create", window, || jobs.create(&post, job)),
            )
            .await
        {
            Ok(j) => {
                metrics
                    .jobs
                    .with_label_values(&[&spec.namespace, "created"])
                    .inc();
                (j, false)
            }
            Err(kube::Error::Api(s)) if s.is_already_exists() || s.code == 409 => {
                let existing = self
                    .limited(
                        Lane::Starting,
                        call("get", window, || jobs.get(&spec.job_name)),
                    )
                    .await
                    .map_err(|e| {
                        create_err(format!(
                            "job {} already exists but cannot be read: {e}",
                            spec.job_name
                        ))
                    })?;
                if !belongs_to(&existing, spec) {
                    return Err(create_err(format!(
                        "job {} already exists in namespace {} but belongs to another run or step (labels {:?})",
                        spec.job_name,
                        spec.namespace,
                        existing.metadata.labels.unwrap_or_default()
                    )));
                }
                let by_job = ListParams::default().labels(&format!("job-name={}", spec.job_name));
                let listed = self
                    .limited(
                        Lane::Starting,
                        call("list", window, || pods_api.list(&by_job)),
                    )
                    .await
                    .map_err(|e| LaunchError::Pods {
                        job_name: spec.job_name.clone(),
                        reason: e.to_string(),
                    })?;
                sub.seed_pods(listed.items);
                metrics
                    .jobs
                    .with_label_values(&[&spec.namespace, "adopted"])
                    .inc();
                info!(job = %spec.job_name, namespace = %spec.namespace, "step Job already exists: adopting it");
                (existing, true)
            }
            Err(e) => return Err(create_err(e.to_string())),
        };
        Ok(created)
    }

    async fn delete_job(
        &self,
        jobs: &Api<Job>,
        spec: &StepSpec,
        uid: Option<String>,
        action: &str,
    ) {
        let window = self.settings.api_retry_window;
        let params = delete_params(uid);
        match self
            .limited(
                Lane::Finishing,
                call("delete", window, || jobs.delete(&spec.job_name, &params)),
            )
            .await
        {
            Ok(_) => {
                KubeMetrics::get()
                    .jobs
                    .with_label_values(&[&spec.namespace, action])
                    .inc();
                info!(job = %spec.job_name, namespace = %spec.namespace, action, "step Job deleted (background propagation)");
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                warn!(job = %spec.job_name, namespace = %spec.namespace, "cannot delete the step Job: {e}")
            }
        }
    }

    async fn wait(
        &self,
        spec: &StepSpec,
        sub: &StepWatch,
        jobs: &Api<Job>,
        watched: bool,
        cancel: &CancellationToken,
        container: &str,
    ) -> Waited {
        let deadline = spec.wait_timeout.map(|t| tokio::time::Instant::now() + t);
        let mut rx = sub.rx.clone();
        let mut stuck_since: HashMap<String, Instant> = HashMap::new();
        // Fallback for a Job whose labels were overridden out of the shared selector.
        let mut poll = tokio::time::interval(if watched {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_secs(10)
        });
        poll.tick().await;
        let mut recheck = tokio::time::interval(Duration::from_secs(1));
        loop {
            let view: StepView = rx.borrow_and_update().clone();
            if let Some(job) = &view.job() {
                if view.job_deleted {
                    return Waited::GaveUp(format!(
                        "Kubernetes job {} in namespace {} was deleted before it finished",
                        spec.job_name, spec.namespace
                    ));
                }
                match job_state(job) {
                    JobState::Succeeded => {
                        return Waited::Terminal {
                            succeeded: true,
                            message: None,
                        }
                    }
                    JobState::Failed { .. } => {
                        let pods = view.current_pods();
                        let pods: Vec<&Pod> = pods.iter().collect();
                        return Waited::Terminal {
                            succeeded: false,
                            message: Some(failure_message(
                                &spec.job_name,
                                &spec.namespace,
                                job,
                                &pods,
                                container,
                            )),
                        };
                    }
                    JobState::Running => {}
                }
            }
            let mut now_stuck = HashMap::new();
            for pod in view.current_pods() {
                if let Some(s) = stuck(&pod) {
                    now_stuck.insert(s.key(), s);
                }
            }
            stuck_since.retain(|k, _| now_stuck.contains_key(k));
            for (key, s) in &now_stuck {
                let since = *stuck_since.entry(key.clone()).or_insert_with(Instant::now);
                let limit = match s {
                    Stuck::Unschedulable { .. } => self.settings.unschedulable_timeout,
                    _ => Some(self.settings.image_pull_timeout),
                };
                if let Some(limit) = limit {
                    if since.elapsed() >= limit {
                        return Waited::GaveUp(format!(
                            "{} (for {}s)",
                            s.describe(),
                            limit.as_secs()
                        ));
                    }
                }
            }
            // Not held while waiting: the next version of the Job or pod replaces this one.
            drop(view);
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Waited::GaveUp("the step Job's watch ended".into());
                    }
                }
                _ = cancel.cancelled() => return Waited::Cancelled,
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    return Waited::GaveUp(format!("Timed out while waiting for job {} to complete", spec.job_name));
                }
                _ = recheck.tick(), if !now_stuck.is_empty() => {}
                _ = poll.tick() => {
                    match self.limited(Lane::Starting, call("get", self.settings.api_retry_window, || jobs.get_opt(&spec.job_name))).await {
                        Ok(Some(j)) => sub.seed_job(j),
                        Ok(None) => return Waited::GaveUp(format!("job {} could not be found", spec.job_name)),
                        Err(e) => warn!(job = %spec.job_name, "cannot read the step Job: {e}"),
                    }
                }
            }
        }
    }

    async fn read_logs(
        &self,
        spec: &StepSpec,
        view: &StepView,
        pods_api: &Api<Pod>,
        container: &str,
    ) -> (String, Vec<String>, Vec<LogError>) {
        let mut logs = String::new();
        let mut names = Vec::new();
        let mut errors = Vec::new();
        for pod in view.current_pods() {
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            names.push(name.clone());
            let started = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.name == container))
                .and_then(|c| c.state.as_ref())
                .is_some_and(|s| s.running.is_some() || s.terminated.is_some());
            if !started {
                continue;
            }
            let params = LogParams {
                container: Some(container.to_string()),
                ..LogParams::default()
            };
            match self
                .limited(
                    Lane::Finishing,
                    call("logs", self.settings.api_retry_window, || {
                        pods_api.logs(&name, &params)
                    }),
                )
                .await
            {
                Ok(text) => {
                    logs.push_str(&text);
                    if !text.ends_with('\n') {
                        logs.push('\n');
                    }
                }
                Err(e) => {
                    warn!(job = %spec.job_name, pod = %name, "cannot read the step container's log: {e}");
                    errors.push(LogError {
                        pod_name: name,
                        message: e.to_string(),
                    });
                }
            }
        }
        (logs, names, errors)
    }
}

#[async_trait]
impl StepLauncher for KubernetesLauncher {
    async fn launch(
        &self,
        spec: &StepSpec,
        cancel: CancellationToken,
    ) -> Result<StepRun, LaunchError> {
        let started = Instant::now();
        let create_err = |reason: String| LaunchError::Create {
            job_name: spec.job_name.clone(),
            reason,
        };
        let Workload::Job(step) = &spec.workload else {
            return Err(create_err(
                "the kubernetes launcher runs Kubernetes Jobs, not local processes".into(),
            ));
        };
        let cluster = Box::pin(self.cluster(step)).await.map_err(create_err)?;
        Box::pin(self.check_access(&cluster, &spec.namespace))
            .await
            .map_err(create_err)?;
        // Taken, not cloned: the step's Job body is serialized once, for the create, then let go.
        let JobBody { job, container } = step.take_body().map_err(create_err)?;
        let container = container.as_str();
        let watched = job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/component"))
            .is_some_and(|c| STEP_SELECTOR.ends_with(&format!("={c}")));
        let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &spec.namespace);
        let pods_api: Api<Pod> = Api::namespaced(cluster.client.clone(), &spec.namespace);
        let sub = cluster.tracker.subscribe(&spec.namespace, &spec.job_name);
        let metrics = KubeMetrics::get();

        let (created, adopted) =
            Box::pin(self.create_or_adopt(spec, &job, &jobs, &pods_api, &sub)).await?;
        drop(job);
        let uid = created.metadata.uid.clone();
        sub.seed_job(created);
        metrics
            .job_create_seconds
            .with_label_values(&[&spec.namespace])
            .observe(started.elapsed().as_secs_f64());
        info!(job = %spec.job_name, namespace = %spec.namespace, adopted, "step Job running");

        // Boxed (here and below): only the phase a step is in is allocated, not the largest of all.
        let waited = Box::pin(self.wait(spec, &sub, &jobs, watched, &cancel, container)).await;
        let terminal_at = Instant::now();
        let (succeeded, failure_message, gave_up) = match waited {
            Waited::Cancelled => {
                Box::pin(self.delete_job(&jobs, spec, uid, "cancelled")).await;
                // Report back once the pods are gone (the kubelet has stopped the step), bounded.
                let mut rx = sub.rx.clone();
                let gone = rx.wait_for(|v| v.current_pods().is_empty());
                let _ = tokio::time::timeout(Duration::from_secs(30), gone).await;
                return Err(LaunchError::Cancelled(spec.job_name.clone()));
            }
            Waited::Terminal { succeeded, message } => (succeeded, message, false),
            Waited::GaveUp(message) => (false, Some(message), true),
        };
        let view = sub.view();
        let (logs, pod_names, log_errors) =
            Box::pin(self.read_logs(spec, &view, &pods_api, container)).await;
        metrics
            .job_to_result_seconds
            .with_label_values(&[&spec.namespace])
            .observe(terminal_at.elapsed().as_secs_f64());
        // A Job given up on is still running: never leave it behind. A finished one follows the
        // retention setting.
        if gave_up || self.settings.job_retention == JobRetention::Delete {
            Box::pin(self.delete_job(&jobs, spec, uid, "deleted")).await;
        }
        Ok(StepRun {
            succeeded,
            failure_message,
            logs,
            pod_names,
            adopted_existing: adopted,
            log_errors,
        })
    }

    fn runs(&self) -> WorkloadKind {
        WorkloadKind::Job
    }

    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn failure_class(&self) -> FailureClass {
        FailureClass {
            module: "dagster_k8s.client",
            name: "DagsterK8sError",
        }
    }
}
