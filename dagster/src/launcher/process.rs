//! The embedded launcher: the step runs as a local subprocess (in its own process group) with the
//! worker's environment plus the environment its Kubernetes Job's container would get. Used for local
//! development, the demo and CI.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{FailureClass, LaunchError, StepLauncher, StepRun, StepSpec};
use crate::k8s_config::literal_container_env;

/// How long a cancelled step gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// How long the output pipes may stay open after the step process exited (a background child that
/// inherited them) before the rest of its process group is killed.
const PIPE_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// At most this much of each stream is kept (the rest is read and dropped, so the step never blocks).
const MAX_CAPTURE: usize = 512 * 1024 * 1024;

/// Runs steps as local subprocesses.
#[derive(Debug, Default, Clone)]
pub struct ProcessLauncher {
    /// Working directory of step processes (the worker's when `None`).
    pub working_dir: Option<PathBuf>,
}

impl ProcessLauncher {
    pub fn new(working_dir: Option<PathBuf>) -> Self {
        Self { working_dir }
    }
}

/// The environment added to the worker's for a step, in the order the Job's container lists it (later
/// entries win): the spec's `env` (`DAGSTER_RUN_JOB_NAME`, `DAGSTER_RUN_STEP_KEY`), `DAGSTER_HOME` (only
/// if that directory exists here; otherwise the worker's own stays), `job_config.env_vars` (`K=V`, or
/// `K` copied from the worker's environment) and the literal `env` values of the merged container config.
/// Secret-backed entries (`postgres_password_secret`, `value_from`) have no local value: the worker's
/// environment (e.g. `DAGSTER_PG_PASSWORD`) is inherited instead.
pub fn local_env(spec: &StepSpec) -> Vec<(String, String)> {
    let mut env = spec.env.clone();
    if let Some(home) = spec.job_config.get("dagster_home").and_then(Value::as_str) {
        if Path::new(home).is_dir() {
            info!(job = %spec.job_name, dagster_home = home, "step uses the job config's DAGSTER_HOME");
            env.push(("DAGSTER_HOME".into(), home.to_string()));
        } else {
            info!(
                job = %spec.job_name,
                dagster_home = home,
                worker_dagster_home = std::env::var("DAGSTER_HOME").unwrap_or_default(),
                "the job config's DAGSTER_HOME does not exist here; the step keeps the worker's"
            );
        }
    }
    if let Some(Value::Array(vars)) = spec.job_config.get("env_vars") {
        for v in vars.iter().filter_map(Value::as_str) {
            match v.split_once('=') {
                Some((k, val)) => env.push((k.to_string(), val.to_string())),
                None => match std::env::var(v) {
                    Ok(val) => env.push((v.to_string(), val)),
                    Err(_) => {
                        debug!(job = %spec.job_name, var = v, "env_vars entry is not set in the worker; skipped")
                    }
                },
            }
        }
    }
    env.extend(literal_container_env(&spec.merged_user_config));
    env
}

/// Kills the step's whole process group if the launch is abandoned (the task future dropped).
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&self, signal: nix::sys::signal::Signal) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill(nix::sys::signal::Signal::SIGKILL);
    }
}

fn drain<R: AsyncRead + Unpin + Send + 'static>(stream: Option<R>) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut kept = Vec::new();
        let Some(mut s) = stream else { return kept };
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_CAPTURE.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
        kept
    })
}

#[async_trait]
impl StepLauncher for ProcessLauncher {
    async fn launch(
        &self,
        spec: &StepSpec,
        cancel: CancellationToken,
    ) -> Result<StepRun, LaunchError> {
        let pod_names = vec![spec.job_name.clone()];
        let Some((program, args)) = spec.command.split_first() else {
            return Ok(failed(
                pod_names,
                format!(
                    "Cannot start the step process for job {}: empty command",
                    spec.job_name
                ),
            ));
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(local_env(spec))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.process_group(0).kill_on_drop(true);
        if let Some(dir) = &self.working_dir {
            cmd.current_dir(dir);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            // Like a pod whose entry point is missing from the image: the step fails.
            Err(e) => {
                warn!(job = %spec.job_name, program = %program, "cannot start the step process: {e}");
                return Ok(failed(
                    pod_names,
                    format!(
                        "Cannot start the step process for job {} ({program}): {e}",
                        spec.job_name
                    ),
                ));
            }
        };
        let pid = child.id();
        let guard = GroupGuard(pid.and_then(|p| i32::try_from(p).ok()));
        info!(job = %spec.job_name, pid, "step process started");
        let out_task = drain(child.stdout.take());
        let err_task = drain(child.stderr.take());
        let deadline = async {
            match spec.wait_timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };

        enum End {
            Exited(std::io::Result<std::process::ExitStatus>),
            Cancelled,
            TimedOut,
        }
        let end = tokio::select! {
            s = child.wait() => End::Exited(s),
            _ = cancel.cancelled() => End::Cancelled,
            _ = deadline => End::TimedOut,
        };
        match end {
            End::Cancelled => {
                info!(job = %spec.job_name, pid, "stopping the step process");
                stop(&mut child, &guard).await;
                let _ = collect(out_task, err_task, &guard).await;
                Err(LaunchError::Cancelled(spec.job_name.clone()))
            }
            End::TimedOut => {
                warn!(job = %spec.job_name, pid, "step exceeded job_wait_timeout; stopping it");
                stop(&mut child, &guard).await;
                let logs = collect(out_task, err_task, &guard).await;
                let mut run = failed(
                    pod_names,
                    format!(
                        "Timed out while waiting for job {} to complete",
                        spec.job_name
                    ),
                );
                run.logs = logs;
                Ok(run)
            }
            End::Exited(status) => {
                let logs = collect(out_task, err_task, &guard).await;
                let failure_message = match status {
                    Ok(s) if s.success() => None,
                    Ok(s) => Some(match s.code() {
                        Some(code) => format!(
                            "Step process of job {} exited with code {code}",
                            spec.job_name
                        ),
                        None => format!(
                            "Step process of job {} was killed by a signal ({s})",
                            spec.job_name
                        ),
                    }),
                    Err(e) => Some(format!(
                        "Cannot wait for the step process of job {}: {e}",
                        spec.job_name
                    )),
                };
                info!(job = %spec.job_name, pid, succeeded = failure_message.is_none(), "step process ended");
                Ok(StepRun {
                    succeeded: failure_message.is_none(),
                    failure_message,
                    logs,
                    pod_names,
                    ..StepRun::default()
                })
            }
        }
    }

    fn kind(&self) -> &'static str {
        "process"
    }

    fn failure_class(&self) -> FailureClass {
        FailureClass {
            module: "celeriac.launcher",
            name: "StepProcessError",
        }
    }
}

fn failed(pod_names: Vec<String>, message: String) -> StepRun {
    StepRun {
        succeeded: false,
        failure_message: Some(message),
        pod_names,
        ..StepRun::default()
    }
}

/// Stdout then stderr. If the pipes stay open after the process exited (a background grandchild holds
/// them), the rest of the process group is killed.
async fn collect(
    mut out: JoinHandle<Vec<u8>>,
    mut err: JoinHandle<Vec<u8>>,
    guard: &GroupGuard,
) -> String {
    let both = async { (Some((&mut out).await), Some((&mut err).await)) };
    let (o, e) = match tokio::time::timeout(PIPE_DRAIN_GRACE, both).await {
        Ok(r) => r,
        Err(_) => {
            guard.kill(nix::sys::signal::Signal::SIGKILL);
            (Some(out.await), Some(err.await))
        }
    };
    let out = o.and_then(Result::ok).unwrap_or_default();
    let err = e.and_then(Result::ok).unwrap_or_default();
    let mut logs = String::from_utf8_lossy(&out).into_owned();
    if !logs.ends_with('\n') && !logs.is_empty() {
        logs.push('\n');
    }
    logs.push_str(&String::from_utf8_lossy(&err));
    logs
}

/// SIGTERM the step's process group, SIGKILL it after [`KILL_GRACE`].
async fn stop(child: &mut Child, guard: &GroupGuard) {
    guard.kill(nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        guard.kill(nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(cmd: &str) -> StepSpec {
        StepSpec {
            job_name: "dagster-step-test".into(),
            namespace: "default".into(),
            run_id: "r".into(),
            step_key: "s".into(),
            command: vec!["sh".into(), "-c".into(), cmd.into()],
            env: vec![("STEP_ENV".into(), "42".into())],
            image: None,
            labels: vec![],
            job_config: Value::Null,
            user_defined_k8s_config: Value::Null,
            per_step_k8s_config: json!({}),
            merged_user_config: Value::Null,
            load_incluster_config: false,
            kubeconfig_file: None,
            wait_timeout: None,
        }
    }

    #[test]
    fn local_env_follows_the_job_container_order() {
        std::env::set_var("CELERIAC_T_FROM_WORKER", "w");
        let mut s = spec("true");
        s.job_config = json!({"dagster_home": "/nonexistent/celeriac", "env_vars": ["A=1", "CELERIAC_T_FROM_WORKER", "CELERIAC_T_UNSET_X"]});
        s.merged_user_config = json!({"container_config": {"env": [{"name": "B", "value": "2"},
            {"name": "S", "value_from": {"secret_key_ref": {"name": "x", "key": "y"}}}]}});
        let env = local_env(&s);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["STEP_ENV", "A", "CELERIAC_T_FROM_WORKER", "B"]);
        s.job_config = json!({"dagster_home": std::env::temp_dir()});
        assert!(local_env(&s).iter().any(|(k, _)| k == "DAGSTER_HOME"));
    }

    #[tokio::test]
    async fn missing_program_fails_the_step() {
        let mut s = spec("");
        s.command = vec!["/nonexistent/celeriac-dagster".into()];
        let run = ProcessLauncher::default()
            .launch(&s, CancellationToken::new())
            .await
            .expect("a step result");
        assert!(!run.succeeded);
        assert!(run
            .failure_message
            .unwrap_or_default()
            .contains("Cannot start"));
    }

    #[tokio::test]
    async fn background_grandchild_does_not_hang_collection() {
        let started = std::time::Instant::now();
        let run = ProcessLauncher::default()
            .launch(&spec("sleep 60 & echo done"), CancellationToken::new())
            .await
            .expect("runs");
        assert!(run.succeeded);
        assert_eq!(run.logs, "done\n");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn wait_timeout_fails_the_step() {
        let mut s = spec("echo partial; sleep 30");
        s.wait_timeout = Some(Duration::from_millis(300));
        let run = ProcessLauncher::default()
            .launch(&s, CancellationToken::new())
            .await
            .expect("runs");
        assert!(!run.succeeded);
        assert!(run
            .failure_message
            .unwrap_or_default()
            .contains("Timed out"));
        assert_eq!(run.logs, "partial\n");
    }
}
