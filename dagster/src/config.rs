//! The step task's settings: where steps run (`step_launcher`) and how the Kubernetes launcher treats
//! its Jobs (`kubernetes.*`).
//!
//! They live in the same sources as the worker's own settings and are layered the same way (see
//! `celeriac_worker::config`): Dagster's celery YAML `config_source`, a celeriac config file,
//! `CELERIAC_STEP_LAUNCHER` / `CELERIAC_KUBERNETES__<KEY>` (e.g. `CELERIAC_KUBERNETES__JOB_RETENTION=keep`),
//! then the `--launcher` and `--job-retention` flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use celeriac_worker::config::{
    read_dagster_celery_config_source, read_file_and_env, seconds, ConfigError,
};
use serde::Deserialize;

/// The step task's settings, resolved and validated.
#[derive(Debug, Clone)]
pub struct DagsterConfig {
    /// Where steps run.
    pub launcher: LauncherKind,
    pub kubernetes: KubernetesConfig,
    /// The process launcher's state directory (`process.state_dir`), where running steps are
    /// recorded so a restarted worker adopts them; `None` (`state_dir: none`): steps die with their
    /// worker instead.
    pub process_state_dir: Option<PathBuf>,
}

/// Where step processes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    /// A local subprocess with the Job's environment (the embedded default, no cluster needed).
    Process,
    /// A Kubernetes Job per step, exactly as Dagster's Python worker creates it.
    Kubernetes,
    /// `kubernetes` when a cluster is configured (in-cluster service account or `KUBECONFIG`),
    /// else `process`.
    Auto,
}

impl LauncherKind {
    /// `auto` decided from the environment.
    pub fn decide(self) -> LauncherKind {
        match self {
            LauncherKind::Auto => {
                let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
                let kubeconfig = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty());
                if in_cluster || kubeconfig {
                    LauncherKind::Kubernetes
                } else {
                    LauncherKind::Process
                }
            }
            other => other,
        }
    }
}

/// What happens to a finished step Job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobRetention {
    /// Delete it (background propagation) as soon as its logs are read.
    Delete,
    /// Leave it to `ttlSecondsAfterFinished` (Dagster sets one day by default), as Python does.
    Keep,
}

/// Kubernetes launcher settings (`kubernetes:` in a celeriac config file, `CELERIAC_KUBERNETES__*`).
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    pub job_retention: JobRetention,
    /// A pod that cannot pull its image (or misses a Secret/ConfigMap) this long fails the step.
    pub image_pull_timeout: Duration,
    /// A pod the scheduler cannot place this long fails the step (`None`: wait, e.g. for a cluster
    /// autoscaler, until `job_wait_timeout`).
    pub unschedulable_timeout: Option<Duration>,
    /// How long transient API failures (API server restarting, 5xx, 429) are retried.
    pub api_retry_window: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            job_retention: JobRetention::Delete,
            image_pull_timeout: Duration::from_secs(120),
            unschedulable_timeout: Some(Duration::from_secs(900)),
            api_retry_window: Duration::from_secs(180),
        }
    }
}

/// Raw, layered step task settings before validation.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct DagsterSettings {
    /// `process`, `kubernetes` or `auto` (default).
    pub step_launcher: Option<LauncherKind>,
    pub kubernetes: KubernetesSettings,
    pub process: ProcessSettings,
}

/// Raw `process:` settings of the process launcher.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ProcessSettings {
    /// A directory, or `none` to turn adoption off. Default `$XDG_STATE_HOME/celeriac/steps`, else
    /// `.celeriac/steps` under the worker's working directory.
    pub state_dir: Option<String>,
}

/// Raw `kubernetes:` settings (seconds as numbers; 0 disables the unschedulable timeout).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct KubernetesSettings {
    pub job_retention: Option<JobRetention>,
    pub image_pull_timeout: Option<f64>,
    pub unschedulable_timeout: Option<f64>,
    pub api_retry_window: Option<f64>,
}

impl DagsterSettings {
    /// From a celeriac config file and `CELERIAC_*` environment variables.
    pub fn from_file_and_env(path: Option<&Path>) -> Result<DagsterSettings, ConfigError> {
        read_file_and_env(path)
    }

    /// From the `config_source` of Dagster's celery YAML.
    pub fn from_dagster_celery_yaml(path: &Path) -> Result<DagsterSettings, ConfigError> {
        read_dagster_celery_config_source(path)
    }

    /// Overlays `other` on `self`: every value `other` sets wins.
    pub fn merge(mut self, other: DagsterSettings) -> DagsterSettings {
        if other.step_launcher.is_some() {
            self.step_launcher = other.step_launcher;
        }
        if other.process.state_dir.is_some() {
            self.process.state_dir = other.process.state_dir;
        }
        let (mine, theirs) = (&mut self.kubernetes, other.kubernetes);
        macro_rules! take_k {
            ($($f:ident),*) => { $( if theirs.$f.is_some() { mine.$f = theirs.$f; } )* };
        }
        take_k!(
            job_retention,
            image_pull_timeout,
            unschedulable_timeout,
            api_retry_window
        );
        self
    }

    /// Validates and fills defaults.
    pub fn resolve(self) -> Result<DagsterConfig, ConfigError> {
        let k = &self.kubernetes;
        let d = KubernetesConfig::default();
        let unschedulable = seconds(
            k.unschedulable_timeout,
            d.unschedulable_timeout.map_or(0.0, |t| t.as_secs_f64()),
            "kubernetes.unschedulable_timeout",
        )?;
        let process_state_dir = match self.process.state_dir.as_deref().map(str::trim) {
            None => Some(default_process_state_dir()),
            Some("" | "none") => None,
            Some(dir) => Some(PathBuf::from(dir)),
        };
        Ok(DagsterConfig {
            process_state_dir,
            launcher: self.step_launcher.unwrap_or(LauncherKind::Auto),
            kubernetes: KubernetesConfig {
                job_retention: k.job_retention.unwrap_or(d.job_retention),
                image_pull_timeout: seconds(
                    k.image_pull_timeout,
                    d.image_pull_timeout.as_secs_f64(),
                    "kubernetes.image_pull_timeout",
                )?,
                unschedulable_timeout: (!unschedulable.is_zero()).then_some(unschedulable),
                api_retry_window: seconds(
                    k.api_retry_window,
                    d.api_retry_window.as_secs_f64(),
                    "kubernetes.api_retry_window",
                )?,
            },
        })
    }
}

/// The process launcher's default state directory: `$XDG_STATE_HOME/celeriac/steps`, else `.celeriac/steps` under the worker's
/// working directory.
fn default_process_state_dir() -> PathBuf {
    match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("celeriac").join("steps"),
        None => PathBuf::from(".celeriac").join("steps"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = DagsterSettings::default()
            .resolve()
            .expect("defaults resolve");
        assert_eq!(c.launcher, LauncherKind::Auto);
        assert_eq!(c.kubernetes.job_retention, JobRetention::Delete);
        assert_eq!(c.kubernetes.image_pull_timeout, Duration::from_secs(120));
        assert_eq!(
            c.kubernetes.unschedulable_timeout,
            Some(Duration::from_secs(900))
        );
        assert_eq!(c.kubernetes.api_retry_window, Duration::from_secs(180));
        assert!(c
            .process_state_dir
            .is_some_and(|d| d.ends_with("steps") && d.to_string_lossy().contains("celeriac")));
    }

    #[test]
    fn layers_merge_per_key_and_bad_values_are_named() {
        let file = DagsterSettings {
            process: ProcessSettings {
                state_dir: Some("none".into()),
            },
            step_launcher: Some(LauncherKind::Kubernetes),
            kubernetes: KubernetesSettings {
                unschedulable_timeout: Some(0.0),
                image_pull_timeout: Some(3.0),
                ..Default::default()
            },
        };
        let mut flags = DagsterSettings::default();
        flags.kubernetes.job_retention = Some(JobRetention::Keep);
        let c = DagsterSettings::default()
            .merge(file)
            .merge(flags)
            .resolve()
            .expect("resolves");
        assert_eq!(c.launcher, LauncherKind::Kubernetes);
        assert_eq!(c.kubernetes.job_retention, JobRetention::Keep);
        assert_eq!(c.kubernetes.image_pull_timeout, Duration::from_secs(3));
        assert_eq!(c.kubernetes.unschedulable_timeout, None);
        assert_eq!(c.process_state_dir, None);
        let mut bad = DagsterSettings::default();
        bad.kubernetes.api_retry_window = Some(-1.0);
        let e = bad.resolve().unwrap_err().to_string();
        assert!(e.contains("kubernetes.api_retry_window"), "{e}");
    }
}
