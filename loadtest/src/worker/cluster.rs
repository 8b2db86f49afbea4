//! The Kubernetes test cluster as the worker scenario uses it: started as the tests start it, one
//! namespace and identity per side (so that the API server's audit log tells their requests apart),
//! the audit log read back per side, and the Jobs' completion times Python leaves behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::params::RUN_DIR;
use crate::clock::parse_time;
use crate::env;

/// The cluster, started as the tests start it (idempotent; shared with whoever else uses it).
pub fn cluster_up(bin_dir: &Path, venv: &Path) -> Result<()> {
    let root = env::repo_root();
    let status = Command::new("bash")
        .arg(root.join("scripts/k8s-cluster.sh"))
        .arg("up")
        .env("CELERIAC_KUBELET_BIN", bin_dir.join("celeriac-kubelet"))
        .env("CELERIAC_VENV", venv)
        .env("CELERIAC_K8S_RUN", RUN_DIR)
        .env(
            "CELERIAC_IMAGE_PATHS",
            format!(
                "celeriac/dagster-step={} celeriac/celeriac={} celeriac/load-step={}",
                venv.join("bin").display(),
                bin_dir.display(),
                root.join("tests/peers/load-step").display()
            ),
        )
        .status()
        .context("running scripts/k8s-cluster.sh up")?;
    if !status.success() {
        bail!("the Kubernetes test cluster could not start (logs in {RUN_DIR}/logs)");
    }
    Ok(())
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(Path::new(RUN_DIR).join("kubeconfig"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("kubectl")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A namespace for one side: the Postgres Secret its step Jobs reference and a Role for `user`
/// (celeriac: its documented least-privilege Role; Python also reads `jobs/status`). Deleted on drop.
pub struct Namespace {
    pub name: String,
    pub user: String,
    pub kubeconfig: PathBuf,
}

impl Namespace {
    pub fn create(side: &str, n: u8) -> Result<Namespace> {
        let name = env::unique(&format!("load-{side}")).replace('_', "-");
        let user = format!("celeriac-worker-{n}");
        let mut role = celeriac_dagster::kubernetes::access::role("load-worker", &name);
        if side == "python" {
            role["rules"] = json!([
                {"apiGroups": ["batch"], "resources": ["jobs", "jobs/status"], "verbs": ["*"]},
                {"apiGroups": [""], "resources": ["pods", "pods/log", "pods/status"], "verbs": ["*"]},
            ]);
        }
        let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dagster-postgresql-secret", "namespace": name},
             "stringData": {"postgresql-password": "unused-with-trust-auth"}},
            role,
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "load-worker", "namespace": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "load-worker"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]},
        ]});
        kubectl(&["create", "-f", "-"], Some(&objects.to_string()))?;
        Ok(Namespace {
            name,
            user,
            kubeconfig: Path::new(RUN_DIR).join(format!("kubeconfig-celeriac-worker-{n}")),
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

/// One audit-log entry (ResponseComplete stage) of a worker identity.
#[derive(Debug, Clone)]
pub struct Audit {
    pub verb: String,
    pub resource: String,
    pub name: String,
    /// The request URI (with its query: a list naming one Job is per step, not a shared watch).
    pub uri: String,
    pub at: f64,
}

impl Audit {
    /// A LIST or WATCH of all step Jobs or pods of the namespace (shared by every step), as opposed
    /// to one that selects a single Job's objects (`job-name=…`, `metadata.name=…`).
    pub fn shared(&self) -> bool {
        (self.verb == "list" || self.verb == "watch")
            && !self.uri.contains("job-name%3D")
            && !self.uri.contains("job-name=")
            && !self.uri.contains("metadata.name")
    }
}

fn audit_log() -> PathBuf {
    Path::new(RUN_DIR).join("logs/audit.log")
}

/// Where the audit log ends now: the requests after it are those of what runs next.
pub fn audit_mark() -> u64 {
    std::fs::metadata(audit_log()).map_or(0, |m| m.len())
}

/// Requests of `user` in `namespace` since `mark` (one entry per request; a watch counts once).
pub fn audit_since(mark: u64, user: &str, namespace: &str) -> Vec<Audit> {
    use std::io::{BufRead, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(audit_log()) else {
        return Vec::new();
    };
    if f.seek(SeekFrom::Start(mark)).is_err() {
        return Vec::new();
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default();
        if s("/user/username") != user || s("/objectRef/namespace") != namespace {
            continue;
        }
        if !seen.insert(s("/auditID").to_string()) {
            continue;
        }
        let resource = match s("/objectRef/subresource") {
            "" => s("/objectRef/resource").to_string(),
            sub => format!("{}/{sub}", s("/objectRef/resource")),
        };
        out.push(Audit {
            verb: s("/verb").to_string(),
            resource,
            name: s("/objectRef/name").to_string(),
            uri: s("/requestURI").to_string(),
            at: parse_time(s("/stageTimestamp")).unwrap_or(f64::NAN),
        });
    }
    out
}

/// When each Job of `ns` turned Complete, by Job name (whole seconds in 1.20): Python leaves its step
/// Jobs in place.
pub fn job_completion_times(ns: &Namespace) -> Result<HashMap<String, f64>> {
    Ok(serde_json::from_str::<Value>(&kubectl(
        &["get", "jobs", "-n", &ns.name, "-o", "json"],
        None,
    )?)?["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| {
            Some((
                j.pointer("/metadata/name")?.as_str()?.to_string(),
                parse_time(j.pointer("/status/completionTime")?.as_str()?)?,
            ))
        })
        .collect())
}
