//! Pod volumes for a process kubelet: `configMap`, `secret`, `emptyDir` and `hostPath` volumes are
//! materialised under the pod's directory, and each container's `volumeMounts` are bind-mounted at
//! their `mountPath` (with `subPath`, `readOnly`) in a private mount namespace of the container's
//! process, so a program reads `/opt/dagster/dagster_home/celery-config.yaml` exactly where the
//! manifest put it, while the host only gains the empty mount points.
//!
//! Other volume types (PVCs, projected, CSI…) have no meaning here: mounts of them are skipped with
//! a warning, and the container sees whatever is at the path on the host.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod};

use crate::env::{config_map, secret, EnvError};

/// One bind mount of a container: host `source` onto `target`.
#[derive(Debug, Clone)]
pub struct BindMount {
    source: CString,
    target: CString,
    read_only: bool,
}

/// A ConfigMap's or Secret's data, the `items` selecting from it, and the volume's `defaultMode`.
type VolumeFiles<'a> = (
    BTreeMap<String, String>,
    &'a Option<Vec<KeyToPath>>,
    Option<i32>,
);

/// Writes the pod's volumes under `dir/volumes/<name>`; returns where each volume lives.
/// Missing ConfigMaps/Secrets are errors (the real kubelet's `CreateContainerConfigError`) unless
/// the volume is `optional`.
pub async fn materialize(
    client: &kube::Client,
    pod: &Pod,
    dir: &Path,
) -> Result<HashMap<String, PathBuf>, EnvError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out = HashMap::new();
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(out);
    };
    for v in spec.volumes.iter().flatten() {
        let path = dir.join("volumes").join(&v.name);
        let files: Option<VolumeFiles> = if let Some(cm) = &v.config_map {
            match config_map(client, &ns, &cm.name).await? {
                Some(data) => Some((data, &cm.items, cm.default_mode)),
                None if cm.optional == Some(true) => Some((BTreeMap::new(), &None, None)),
                None => return Err(EnvError::ConfigMapMissing(cm.name.clone())),
            }
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            match secret(client, &ns, &name).await? {
                Some(data) => Some((data, &s.items, s.default_mode)),
                None if s.optional == Some(true) => Some((BTreeMap::new(), &None, None)),
                None => return Err(EnvError::SecretMissing(name)),
            }
        } else {
            None
        };
        if let Some((data, items, mode)) = files {
            write_files(&path, &data, items.as_deref(), mode);
            out.insert(v.name.clone(), path);
        } else if v.empty_dir.is_some() {
            if let Err(e) = std::fs::create_dir_all(&path) {
                tracing::warn!(volume = %v.name, "cannot create {}: {e}", path.display());
            }
            out.insert(v.name.clone(), path);
        } else if let Some(h) = &v.host_path {
            out.insert(v.name.clone(), PathBuf::from(&h.path));
        } else {
            tracing::warn!(volume = %v.name, "volume type not supported by the process kubelet; its mounts are skipped");
        }
    }
    Ok(out)
}

/// Writes `data` as files (all keys, or only `items` at their paths) with the volume's mode.
fn write_files(
    dir: &Path,
    data: &BTreeMap<String, String>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) {
    let _ = std::fs::remove_dir_all(dir);
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::warn!("cannot create {}: {e}", dir.display());
        return;
    }
    let entries: Vec<(String, &String, Option<i32>)> = match items {
        Some(items) => items
            .iter()
            .filter_map(|i| data.get(&i.key).map(|v| (i.path.clone(), v, i.mode)))
            .collect(),
        None => data.iter().map(|(k, v)| (k.clone(), v, None)).collect(),
    };
    for (rel, value, mode) in entries {
        let Some(file) = inside(dir, &rel) else {
            tracing::warn!("volume item path {rel:?} leaves the volume; skipped");
            continue;
        };
        if let Some(parent) = file.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Err(e) = std::fs::write(&file, value) {
            tracing::warn!("cannot write {}: {e}", file.display());
            continue;
        }
        let mode = mode.or(default_mode).unwrap_or(0o644) as u32;
        let _ = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o777));
    }
}

/// `base/rel` if `rel` is relative and stays inside `base` (no `..`), as Kubernetes validates.
fn inside(base: &Path, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel);
    let ok =
        !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| base.join(rel))
}

/// The container's bind mounts, with their mount points created on the host (an empty file for a
/// file source, a directory otherwise).
pub fn container_mounts(c: &Container, volumes: &HashMap<String, PathBuf>) -> Vec<BindMount> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(base) = volumes.get(&m.name) else {
            tracing::warn!(container = %c.name, volume = %m.name, "mount of an unsupported or unknown volume skipped");
            continue;
        };
        let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => match inside(base, sub) {
                Some(p) => p,
                None => {
                    tracing::warn!(container = %c.name, "subPath {sub:?} leaves the volume; mount skipped");
                    continue;
                }
            },
            None => base.clone(),
        };
        let target = PathBuf::from(&m.mount_path);
        if !target.is_absolute() {
            tracing::warn!(container = %c.name, "mountPath {:?} is not absolute; mount skipped", m.mount_path);
            continue;
        }
        let prepared = if source.is_file() {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| {
                    if target.exists() {
                        Ok(())
                    } else {
                        std::fs::write(&target, b"")
                    }
                })
        } else {
            std::fs::create_dir_all(&source).and_then(|_| std::fs::create_dir_all(&target))
        };
        if let Err(e) = prepared {
            tracing::warn!(container = %c.name, "cannot prepare mount point {}: {e}", target.display());
            continue;
        }
        let (Ok(source), Ok(target)) = (
            CString::new(source.as_os_str().as_bytes()),
            CString::new(target.as_os_str().as_bytes()),
        ) else {
            continue;
        };
        out.push(BindMount {
            source,
            target,
            read_only: m.read_only == Some(true),
        });
    }
    out
}

/// Enters a private mount namespace and performs the bind mounts. Runs in the forked child before
/// `exec`, so it only makes system calls on data prepared beforehand.
pub fn enter(mounts: &[BindMount]) -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    let none: Option<&str> = None;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
    for m in mounts {
        mount(
            Some(m.source.as_c_str()),
            m.target.as_c_str(),
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )?;
        if m.read_only {
            mount(
                none,
                m.target.as_c_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::inside;
    use std::path::Path;

    #[test]
    fn item_paths_stay_inside_the_volume() {
        let base = Path::new("/v");
        assert_eq!(
            inside(base, "a/b.yaml"),
            Some(Path::new("/v/a/b.yaml").into())
        );
        assert_eq!(inside(base, "../etc/passwd"), None);
        assert_eq!(inside(base, "/etc/passwd"), None);
        assert_eq!(inside(base, ""), None);
    }
}
