//! The tasks of Dagster's Celery app (`dagster_celery_k8s.app`), as a worker [`Registry`].

use std::sync::Arc;

use celeriac_worker::tasks::ping::Ping;
use celeriac_worker::tasks::Registry;

use crate::config::{DagsterConfig, LauncherKind};
use crate::launcher::kubernetes::KubernetesLauncher;
use crate::launcher::process::ProcessLauncher;
use crate::launcher::step_state::StateDir;
use crate::launcher::StepLauncher;
use crate::step::task::ExecuteStepK8sJob;

/// The tasks a celeriac worker serves: Dagster's `execute_step_k8s_job` and `celery.ping`, exactly
/// the set Dagster's `dagster_celery_k8s.app` registers.
/// Steps run with the configured launcher (`auto`: Kubernetes when a cluster is configured).
pub fn registry(config: &DagsterConfig) -> anyhow::Result<Registry> {
    let mut registry = Registry::default();
    registry.register(Arc::new(Ping));
    let launcher: Arc<dyn StepLauncher> = match config.launcher.decide() {
        LauncherKind::Kubernetes => Arc::new(KubernetesLauncher::new(config.kubernetes.clone())),
        _ => {
            let mut launcher = ProcessLauncher::default();
            match &config.process_state_dir {
                Some(dir) => match StateDir::open(dir) {
                    Ok(state) => {
                        tracing::info!(state_dir = %dir.display(), "step processes are recorded for adoption after a worker crash");
                        launcher = launcher.with_state_dir(state);
                    }
                    Err(e) => tracing::warn!(
                        state_dir = %dir.display(),
                        "cannot use the step state directory ({e}); step processes will die with the worker instead of being adopted"
                    ),
                },
                None => {
                    tracing::info!("no step state directory: step processes die with the worker")
                }
            }
            Arc::new(launcher)
        }
    };
    tracing::info!(
        launcher = launcher.kind(),
        configured = ?config.launcher,
        "step launcher selected"
    );
    registry.register(Arc::new(ExecuteStepK8sJob::new(launcher)));
    Ok(registry)
}
