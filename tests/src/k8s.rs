//! The real Kubernetes 1.20.2 test cluster (`scripts/k8s-cluster.sh`: etcd, kube-apiserver with RBAC,
//! controller-manager, scheduler, and celeriac's process kubelet) and per-test namespaces with the
//! worker's least-privilege Role bound to one of the cluster's worker identities.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace as NamespaceObject, Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Api;
use serde_json::json;

use crate::{celeriac_bin, repo_root, venv_bin};

/// The running cluster.
pub struct Cluster {
    pub run_dir: PathBuf,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Runs a future on the harness's runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// Starts the cluster unless it is already up (once per test binary; the script is idempotent and
/// serialises concurrent callers). Fails the test, never skips it, when it cannot start.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bin_dir = celeriac_bin().parent().map(PathBuf::from).unwrap_or_default();
        let venv = venv_bin().parent().map(PathBuf::from).unwrap_or_default();
        let run_dir = PathBuf::from(
            std::env::var("CELERIAC_K8S_RUN").unwrap_or_else(|_| "/tmp/celeriac-k8s".into()),
        );
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/k8s-cluster.sh"))
            .arg("up")
            .env("CELERIAC_KUBELET_BIN", bin_dir.join("celeriac-kubelet"))
            .env("CELERIAC_VENV", &venv)
            .env("CELERIAC_K8S_RUN", &run_dir)
            .env(
                "CELERIAC_IMAGE_PATHS",
                format!(
                    "celeriac/dagster-step={} celeriac/celeriac={} celeriac/load-step={}",
                    venv.join("bin").display(),
                    bin_dir.display(),
                    repo_root().join("tests/peers/load-step").display()
                ),
            )
            .status()
            .expect("running scripts/k8s-cluster.sh");
        assert!(
            status.success(),
            "scripts/k8s-cluster.sh up failed: the Kubernetes test cluster could not start (logs in {}/logs)",
            run_dir.display()
        );
        Cluster { run_dir }
    })
}

impl Cluster {
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.run_dir.join("kubeconfig")
    }

    /// kubeconfig of `celeriac-worker-<n>` (n in 1..=9; no rights until a Role is bound).
    pub fn worker_kubeconfig(&self, n: u8) -> PathBuf {
        self.run_dir.join(format!("kubeconfig-celeriac-worker-{n}"))
    }

    pub fn audit_log(&self) -> PathBuf {
        self.run_dir.join("logs").join("audit.log")
    }

    /// Stops and restarts kube-apiserver (etcd keeps the state).
    pub fn restart_apiserver(&self) -> Result<()> {
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/k8s-cluster.sh"))
            .arg("restart-apiserver")
            .env("CELERIAC_K8S_RUN", &self.run_dir)
            .status()?;
        if !status.success() {
            bail!("restarting kube-apiserver failed");
        }
        Ok(())
    }

    /// An admin client.
    pub fn client(&self) -> kube::Client {
        let path = self.admin_kubeconfig();
        block_on(async {
            let kc = Kubeconfig::read_from(&path).expect("admin kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .expect("admin config");
            kube::Client::try_from(config).expect("admin client")
        })
    }
}

/// Where the audit log ends now: entries written later are [`audit_requests_since`] this mark.
pub fn audit_mark(cluster: &Cluster) -> usize {
    std::fs::metadata(cluster.audit_log()).map_or(0, |m| m.len() as usize)
}

/// Audit-log entries of one user: `(verb, resource, namespace, code)`, one per request
/// (deduplicated by audit id; a watch counts once).
pub fn audit_requests(cluster: &Cluster, user: &str) -> Vec<(String, String, String, u16)> {
    audit_requests_since(cluster, user, 0)
}

/// [`audit_requests`] written after `mark` (identities are shared by the test binaries of one run,
/// and cluster-scoped requests such as access reviews carry no namespace to tell them apart).
pub fn audit_requests_since(
    cluster: &Cluster,
    user: &str,
    mark: usize,
) -> Vec<(String, String, String, u16)> {
    let all = std::fs::read(cluster.audit_log()).unwrap_or_default();
    let text = String::from_utf8_lossy(all.get(mark..).unwrap_or_default());
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v.pointer("/user/username").and_then(|u| u.as_str()) != Some(user) {
            continue;
        }
        let id = v
            .get("auditID")
            .and_then(|i| i.as_str())
            .unwrap_or_default()
            .to_string();
        if !seen.insert(id) {
            continue;
        }
        let s = |p: &str| {
            v.pointer(p)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let code = v
            .pointer("/responseStatus/code")
            .and_then(|c| c.as_u64())
            .unwrap_or(0) as u16;
        let resource = match s("/objectRef/subresource") {
            sub if !sub.is_empty() => format!("{}/{sub}", s("/objectRef/resource")),
            _ => s("/objectRef/resource"),
        };
        out.push((s("/verb"), resource, s("/objectRef/namespace"), code));
    }
    out
}

/// A namespace for one test: the Dagster Postgres Secret, the worker's least-privilege Role bound
/// (or not) to a worker identity. Deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    /// `celeriac-worker-<n>`.
    pub user: String,
    pub kubeconfig: PathBuf,
    client: kube::Client,
}

static NEXT_USER: AtomicU8 = AtomicU8::new(0);

impl TestNamespace {
    /// A namespace where the next worker identity holds the documented Role.
    pub fn create() -> Result<TestNamespace> {
        let n = NEXT_USER.fetch_add(1, Ordering::SeqCst) % 8 + 1;
        Self::create_for(n, true)
    }

    /// An empty namespace: no Secret, no Role (what a Helm release brings is all there is).
    pub fn bare() -> Result<TestNamespace> {
        let cluster = cluster();
        let client = cluster.client();
        let name = crate::unique("ct").replace('_', "-");
        block_on(Api::<NamespaceObject>::all(client.clone()).create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        ))
        .context("creating the namespace")?;
        Ok(TestNamespace {
            kubeconfig: cluster.admin_kubeconfig(),
            name,
            user: String::new(),
            client,
        })
    }

    /// A namespace for worker identity `n`, with or without the Role binding.
    pub fn create_for(n: u8, grant: bool) -> Result<TestNamespace> {
        let mut ns = Self::bare()?;
        ns.user = format!("celeriac-worker-{n}");
        ns.kubeconfig = cluster().worker_kubeconfig(n);
        let (client, name, user) = (&ns.client, &ns.name, &ns.user);
        block_on(async {
            let pp = PostParams::default();
            Api::<Secret>::namespaced(client.clone(), name)
                .create(
                    &pp,
                    &serde_json::from_value(json!({
                        "metadata": {"name": "dagster-postgresql-secret"},
                        "stringData": {"postgresql-password": "unused-with-trust-auth"},
                    }))?,
                )
                .await
                .context("creating the Postgres secret")?;
            if grant {
                let role = celeriac_dagster::kubernetes::access::role("celeriac-worker", name);
                Api::<Role>::namespaced(client.clone(), name)
                    .create(&pp, &serde_json::from_value(role)?)
                    .await
                    .context("creating the Role")?;
                Api::<RoleBinding>::namespaced(client.clone(), name)
                    .create(
                        &pp,
                        &serde_json::from_value(json!({
                            "metadata": {"name": "celeriac-worker"},
                            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "celeriac-worker"},
                            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
                        }))?,
                    )
                    .await
                    .context("creating the RoleBinding")?;
            }
            anyhow::Ok(())
        })?;
        Ok(ns)
    }

    /// An admin client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn jobs(&self) -> Vec<Job> {
        block_on(
            Api::<Job>::namespaced(self.client.clone(), &self.name).list(&ListParams::default()),
        )
        .map(|l| l.items)
        .unwrap_or_default()
    }

    pub fn pods(&self) -> Vec<Pod> {
        block_on(
            Api::<Pod>::namespaced(self.client.clone(), &self.name).list(&ListParams::default()),
        )
        .map(|l| l.items)
        .unwrap_or_default()
    }

    /// Waits until `pred` holds for the namespace's (jobs, pods).
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Job], &[Pod]) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let (jobs, pods) = (self.jobs(), self.pods());
            if pred(&jobs, &pods) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{what}: not reached within {timeout:?}; jobs {:?}, pods {:?}",
                    jobs.iter()
                        .map(|j| j.metadata.name.clone())
                        .collect::<Vec<_>>(),
                    pods.iter()
                        .map(|p| (
                            p.metadata.name.clone(),
                            p.status.as_ref().and_then(|s| s.phase.clone())
                        ))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api = Api::<NamespaceObject>::all(self.client.clone());
        let _ = block_on(api.delete(&self.name, &DeleteParams::background()));
    }
}

/// Whether a pod is running (its step container started).
pub fn pod_running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}
