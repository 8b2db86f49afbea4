//! Watch-based tracking of step Jobs: ONE shared LIST+WATCH of step Jobs and one of their pods per
//! namespace (label selector `app.kubernetes.io/component=step_worker`, which every Job Dagster's
//! `construct_dagster_k8s_job` builds for a step carries), fanned out to per-step waiters. The cost
//! on the API server is two long-running watches per namespace, whatever the number of steps:
//! no per-Job polling (the Python worker reads each Job's status every 10 s) and no per-Job watch.
//!
//! Only subscribed Jobs are kept in memory (the steps this worker is running), so memory follows
//! the worker's concurrency, not the namespace's history. A subscriber that arrives after its Job's
//! events (adoption after a crash) seeds its view with one GET; events newer than the seed win.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Label selector shared by every step Job (and its pods).
pub const STEP_SELECTOR: &str = "app.kubernetes.io/component=step_worker";

/// What is known about one step's Job.
#[derive(Debug, Clone, Default)]
pub struct StepView {
    pub job: Option<Arc<Kept<JobStatus>>>,
    /// The Job was deleted after being seen.
    pub job_deleted: bool,
    /// Pods of the Job, by name.
    pub pods: BTreeMap<String, Arc<Kept<PodStatus>>>,
}

/// A Job or pod as the tracker keeps it: what the step's decisions read of it, its identity and
/// `status` (see [`crate::kubernetes::outcome`]). Not a `Job`/`Pod`: those carry their pod spec inline
/// (≈ 2.5 KB each even when it is `None`), kept for every running step.
#[derive(Debug, Clone, Default)]
pub struct Kept<S> {
    pub metadata: ObjectMeta,
    pub status: Option<S>,
}

impl Kept<JobStatus> {
    /// The Job as `outcome` reads it (no spec).
    pub fn to_job(&self) -> Job {
        Job {
            metadata: self.metadata.clone(),
            spec: None,
            status: self.status.clone(),
        }
    }
}

impl Kept<PodStatus> {
    /// The pod as `outcome` reads it (no spec).
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: self.metadata.clone(),
            spec: None,
            status: self.status.clone(),
        }
    }
}

impl StepView {
    /// The Job, if seen.
    pub fn job(&self) -> Option<Job> {
        self.job.as_ref().map(|j| j.to_job())
    }

    /// Pods owned by the current Job (a recreated Job of the same name has a new uid), oldest first.
    pub fn current_pods(&self) -> Vec<Pod> {
        let uid = self.job.as_ref().and_then(|j| j.metadata.uid.clone());
        let mut pods: Vec<Pod> = self
            .pods
            .values()
            .filter(|p| match (&uid, p.metadata.owner_references.as_ref()) {
                (Some(uid), Some(owners)) => owners.iter().any(|o| &o.uid == uid),
                _ => true,
            })
            .map(|p| p.to_pod())
            .collect();
        pods.sort_by(|a, b| {
            let key = |p: &Pod| {
                (
                    p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    p.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        pods
    }
}

/// What the step's decisions read of a Job (its identity and `status`, see
/// [`crate::kubernetes::outcome`]): the spec (whose pod template carries the step's ~KB arguments and
/// environment), labels, annotations and `managedFields` are dropped before a Job is kept, so a
/// tracked step costs a few hundred bytes, not a full copy of its Job.
pub fn slim_job(job: Job) -> Kept<JobStatus> {
    let m = job.metadata;
    Kept {
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            ..ObjectMeta::default()
        },
        status: job.status.map(|mut s| {
            shrink(&mut s.conditions);
            s
        }),
    }
}

/// Lists deserialized from JSON have room for at least four elements (`Vec`'s growth from one):
/// for one ~1 KB container status that is 4 KB held for the whole step. Kept lists hold what they have.
fn shrink<T>(list: &mut Option<Vec<T>>) {
    if let Some(l) = list {
        l.shrink_to_fit();
    }
}

/// What the step's decisions read of a pod: name, owner (the Job's uid), creation time and `status`.
pub fn slim_pod(pod: Pod) -> Kept<PodStatus> {
    let m = pod.metadata;
    Kept {
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            owner_references: m.owner_references.map(|mut o| {
                o.shrink_to_fit();
                o
            }),
            ..ObjectMeta::default()
        },
        status: pod.status.map(|mut s| {
            shrink(&mut s.conditions);
            shrink(&mut s.container_statuses);
            shrink(&mut s.init_container_statuses);
            shrink(&mut s.ephemeral_container_statuses);
            shrink(&mut s.pod_ips);
            shrink(&mut s.host_ips);
            s
        }),
    }
}

/// Whether `candidate` is at least as new as what is kept (resource versions compared as numbers).
fn newer(current: Option<&ObjectMeta>, candidate: &ObjectMeta) -> bool {
    let rv = |m: &ObjectMeta| {
        m.resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
    };
    match current {
        None => true,
        Some(c) => match (rv(c), rv(candidate)) {
            (Some(a), Some(b)) => b >= a,
            _ => true,
        },
    }
}

/// The Job a pod belongs to: `job-name` (every version), `batch.kubernetes.io/job-name` (≥1.27), or
/// its controller owner reference.
pub fn pod_job_name(pod: &Pod) -> Option<String> {
    let labels = pod.metadata.labels.as_ref();
    labels
        .and_then(|l| {
            l.get("batch.kubernetes.io/job-name")
                .or_else(|| l.get("job-name"))
        })
        .cloned()
        .or_else(|| {
            pod.metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "Job" && o.controller == Some(true))
                .map(|o| o.name.clone())
        })
}

/// The shared watches of one namespace.
pub struct NamespaceWatch {
    namespace: String,
    steps: Mutex<HashMap<String, watch::Sender<StepView>>>,
    synced: watch::Sender<bool>,
    stop: CancellationToken,
}

impl Drop for NamespaceWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A step's subscription: its view, updated by the shared watches; unsubscribes on drop.
pub struct StepWatch {
    pub name: String,
    pub rx: watch::Receiver<StepView>,
    owner: Arc<NamespaceWatch>,
}

impl Drop for StepWatch {
    fn drop(&mut self) {
        if let Ok(mut steps) = self.owner.steps.lock() {
            let unused = steps
                .get(&self.name)
                .is_some_and(|tx| tx.receiver_count() <= 1);
            if unused {
                steps.remove(&self.name);
            }
        }
    }
}

impl StepWatch {
    /// Puts `job` in the view unless a newer version is already there.
    pub fn seed_job(&self, job: Job) {
        self.owner.update(&self.name, |v| {
            if newer(v.job.as_deref().map(|j| &j.metadata), &job.metadata) {
                v.job = Some(Arc::new(slim_job(job)));
                v.job_deleted = false;
            }
        });
    }

    /// Adds pods listed directly (adoption: they existed before this subscription).
    pub fn seed_pods(&self, pods: Vec<Pod>) {
        self.owner.update(&self.name, |v| {
            for p in pods {
                if let Some(n) = p.metadata.name.clone() {
                    v.pods.entry(n).or_insert_with(|| Arc::new(slim_pod(p)));
                }
            }
        });
    }

    pub fn view(&self) -> StepView {
        self.rx.borrow().clone()
    }

    /// Whether the namespace's watches have completed their first LIST.
    pub async fn synced(&self) {
        let mut rx = self.owner.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// A kind of object the tracker watches, and what its events change in the steps' views.
trait Watched:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + 'static
{
    /// For logs: `step Job`, `step pod`.
    const WHAT: &'static str;
    fn applied(self, tracker: &NamespaceWatch);
    fn deleted(self, tracker: &NamespaceWatch);
    /// The first LIST is complete.
    fn listed(_tracker: &NamespaceWatch) {}
}

impl Watched for Job {
    const WHAT: &'static str = "step Job";
    fn applied(self, tracker: &NamespaceWatch) {
        let Some(name) = self.meta().name.clone() else {
            return;
        };
        tracker.update(&name, |v| {
            if newer(v.job.as_deref().map(|j| &j.metadata), &self.metadata) {
                v.job = Some(Arc::new(slim_job(self)));
                v.job_deleted = false;
            }
        });
    }
    fn deleted(self, tracker: &NamespaceWatch) {
        let Some(name) = self.meta().name.clone() else {
            return;
        };
        tracker.update(&name, |v| {
            v.job_deleted = true;
            v.job = Some(Arc::new(slim_job(self)));
        });
    }
    fn listed(tracker: &NamespaceWatch) {
        tracker.synced.send_replace(true);
    }
}

impl Watched for Pod {
    const WHAT: &'static str = "step pod";
    fn applied(self, tracker: &NamespaceWatch) {
        let (Some(job), Some(name)) = (pod_job_name(&self), self.metadata.name.clone()) else {
            return;
        };
        tracker.update(&job, |v| {
            v.pods.insert(name, Arc::new(slim_pod(self)));
        });
    }
    fn deleted(self, tracker: &NamespaceWatch) {
        let (Some(job), Some(name)) = (pod_job_name(&self), self.metadata.name.clone()) else {
            return;
        };
        tracker.update(&job, |v| {
            v.pods.remove(&name);
        });
    }
}

impl NamespaceWatch {
    fn update(&self, name: &str, f: impl FnOnce(&mut StepView)) {
        if let Ok(steps) = self.steps.lock() {
            if let Some(tx) = steps.get(name) {
                tx.send_modify(f);
            }
        }
    }

    fn subscribe(self: &Arc<Self>, name: &str) -> StepWatch {
        let rx = match self.steps.lock() {
            Ok(mut steps) => steps
                .entry(name.to_string())
                .or_insert_with(|| watch::channel(StepView::default()).0)
                .subscribe(),
            Err(_) => watch::channel(StepView::default()).1,
        };
        StepWatch {
            name: name.to_string(),
            rx,
            owner: self.clone(),
        }
    }

    /// One LIST+WATCH of step `K`s in the namespace (kube's watcher re-lists and backs off on its
    /// own), each event applied to the subscribed steps' views until the tracker stops.
    async fn watch<K: Watched>(self: Arc<Self>, client: kube::Client) {
        let api: Api<K> = Api::namespaced(client, &self.namespace);
        let config = watcher::Config::default().labels(STEP_SELECTOR);
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = self.stop.cancelled() => return,
            };
            let Some(event) = event else { return };
            match event {
                Ok(Event::Apply(object)) | Ok(Event::InitApply(object)) => object.applied(&self),
                Ok(Event::Delete(object)) => object.deleted(&self),
                Ok(Event::InitDone) => K::listed(&self),
                Ok(Event::Init) => {}
                Err(e) => tracing::warn!(namespace = %self.namespace, "{} watch: {e}", K::WHAT),
            }
        }
    }
}

/// Shared watches for every namespace the worker launches steps in.
pub struct Tracker {
    client: kube::Client,
    namespaces: Mutex<HashMap<String, Arc<NamespaceWatch>>>,
}

impl Tracker {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            namespaces: Mutex::new(HashMap::new()),
        }
    }

    /// Subscribes to `job_name` in `namespace`, starting the namespace's watches on first use.
    pub fn subscribe(&self, namespace: &str, job_name: &str) -> StepWatch {
        let ns = {
            let mut map = match self.namespaces.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            map.entry(namespace.to_string())
                .or_insert_with(|| {
                    let ns = Arc::new(NamespaceWatch {
                        namespace: namespace.to_string(),
                        steps: Mutex::new(HashMap::new()),
                        synced: watch::channel(false).0,
                        stop: CancellationToken::new(),
                    });
                    tracing::info!(
                        namespace,
                        selector = STEP_SELECTOR,
                        "starting the shared step Job and pod watches"
                    );
                    tokio::spawn(ns.clone().watch::<Job>(self.client.clone()));
                    tokio::spawn(ns.clone().watch::<Pod>(self.client.clone()));
                    ns
                })
                .clone()
        };
        ns.subscribe(job_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::outcome::{failure_message, job_state, stuck};
    use serde_json::json;

    fn failed_job() -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "dagster-step-x", "namespace": "ns", "uid": "u1", "resourceVersion": "42",
                         "labels": {"dagster/run-id": "r"}, "annotations": {"a": "b"},
                         "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                                            "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "dagster", "image": "i", "args": ["dagster", "api", "execute_step", "x".repeat(4000)]}]}}},
            "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                        "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]},
        }))
        .expect("job")
    }

    fn pod(phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "dagster-step-x-abcde", "uid": "p1", "creationTimestamp": "2026-11-30T10:00:00Z",
                         "labels": {"job-name": "dagster-step-x"},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "dagster-step-x",
                                              "uid": "u1", "controller": true}]},
            "spec": {"containers": [{"name": "dagster", "image": "i", "args": ["x".repeat(4000)]}]},
            "status": {"phase": phase,
                       "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}],
                       "containerStatuses": [{"name": "dagster", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                                              "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
        }))
        .expect("pod")
    }

    fn json_len<T: serde::Serialize>(v: &T) -> usize {
        serde_json::to_string(v).map_or(0, |s| s.len())
    }

    /// Slimming keeps every decision the launcher takes from a tracked Job or pod, and drops the
    /// pod template (the step's arguments) and managedFields.
    #[test]
    fn slim_objects_keep_every_decision() {
        let (job, pod_pending, pod_failed) = (failed_job(), pod("Pending"), pod("Failed"));
        let (kjob, kfailed) = (slim_job(job.clone()), slim_pod(pod_failed.clone()));
        let (sjob, spending, sfailed) = (
            kjob.to_job(),
            slim_pod(pod_pending.clone()).to_pod(),
            kfailed.to_pod(),
        );
        assert_eq!(job_state(&sjob), job_state(&job));
        assert_eq!(stuck(&spending), stuck(&pod_pending));
        assert!(stuck(&spending).is_some());
        assert_eq!(
            failure_message("dagster-step-x", "ns", &sjob, &[&sfailed], "dagster"),
            failure_message("dagster-step-x", "ns", &job, &[&pod_failed], "dagster")
        );
        assert!(
            newer(Some(&sjob.metadata), &job.metadata)
                && newer(Some(&job.metadata), &sjob.metadata)
        );
        let view = StepView {
            job: Some(Arc::new(kjob)),
            job_deleted: false,
            pods: [("p".to_string(), Arc::new(kfailed))].into(),
        };
        assert_eq!(
            view.current_pods().len(),
            1,
            "ownership by uid still resolves"
        );
        assert!(sjob.spec.is_none() && sjob.metadata.managed_fields.is_none());
        assert!(sfailed.spec.is_none());
        assert!(
            json_len(&sjob) < 600 && json_len(&job) > 4000,
            "{} {}",
            json_len(&sjob),
            json_len(&job)
        );
        assert!(json_len(&sfailed) < 1000 && json_len(&pod_failed) > 4000);
    }

    /// What a running step keeps of its Job and pod is far smaller than the API objects themselves.
    #[test]
    fn kept_objects_are_smaller_than_api_objects() {
        use std::mem::size_of;
        let (kept, api) = (size_of::<Kept<JobStatus>>(), size_of::<Job>());
        assert!(kept * 2 < api, "Job: kept {kept} B vs {api} B");
        let (kept, api) = (size_of::<Kept<PodStatus>>(), size_of::<Pod>());
        assert!(kept * 2 < api, "pod: kept {kept} B vs {api} B");
    }

    /// A kept pod's and Job's lists hold what they have, not the room a deserializer grew them to.
    #[test]
    fn slim_objects_keep_no_spare_list_room() {
        // As the watch parses them: from text, where a list's length is not known in advance.
        fn from_text<T: serde::Serialize + serde::de::DeserializeOwned>(v: T) -> T {
            serde_json::from_str(&serde_json::to_string(&v).expect("json")).expect("parse")
        }
        let (job, pod) = (from_text(failed_job()), from_text(pod("Failed")));
        let parsed = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref());
        assert!(
            parsed.is_some_and(|l| l.capacity() > l.len()),
            "the fixture has spare room to drop"
        );
        let (sjob, spod) = (slim_job(job), slim_pod(pod));
        let status = spod.status.expect("pod status");
        for (what, len, cap) in [
            status
                .container_statuses
                .as_ref()
                .map(|l| ("containerStatuses", l.len(), l.capacity())),
            status
                .conditions
                .as_ref()
                .map(|l| ("pod conditions", l.len(), l.capacity())),
            sjob.status
                .and_then(|s| s.conditions)
                .map(|l| ("Job conditions", l.len(), l.capacity())),
            spod.metadata
                .owner_references
                .as_ref()
                .map(|l| ("ownerReferences", l.len(), l.capacity())),
        ]
        .into_iter()
        .map(|x| x.expect("present in the fixture"))
        {
            assert_eq!((len, cap), (1, 1), "{what}");
        }
    }
}
