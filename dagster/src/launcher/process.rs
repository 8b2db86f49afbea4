//! The embedded launcher: the step runs as a local subprocess (in its own process group) with the
//! worker's environment plus the environment its Kubernetes Job's container would get (resolved by the
//! step task: [`crate::step::workload`]). Used for local development, the demo and CI.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{FailureClass, LaunchError, StepLauncher, StepRun, StepSpec, Workload, WorkloadKind};

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
        let Workload::Process(process) = &spec.workload else {
            return Err(LaunchError::Create {
                job_name: spec.job_name.clone(),
                reason: "the process launcher runs local processes, not Kubernetes Jobs".into(),
            });
        };
        let pod_names = vec![spec.job_name.clone()];
        let Some((program, args)) = process.command.split_first() else {
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
            .envs(process.env.iter().cloned())
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

    fn runs(&self) -> WorkloadKind {
        WorkloadKind::Process
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
    use crate::launcher::StepProcess;

    fn spec(cmd: &str) -> StepSpec {
        StepSpec {
            job_name: "dagster-step-test".into(),
            namespace: "default".into(),
            run_id: "r".into(),
            step_key: "s".into(),
            wait_timeout: None,
            workload: Workload::Process(StepProcess {
                command: vec!["sh".into(), "-c".into(), cmd.into()],
                env: vec![("STEP_ENV".into(), "42".into())],
            }),
        }
    }

    fn command(s: &mut StepSpec) -> &mut Vec<String> {
        match &mut s.workload {
            Workload::Process(p) => &mut p.command,
            Workload::Job(_) => unreachable!("a process spec"),
        }
    }

    #[tokio::test]
    async fn a_job_is_not_run_as_a_process() {
        let mut s = spec("true");
        s.workload = Workload::Job(Box::new(crate::launcher::StepJob {
            body: Err("not built".into()),
            load_incluster_config: false,
            kubeconfig_file: None,
        }));
        let r = ProcessLauncher::default()
            .launch(&s, CancellationToken::new())
            .await;
        assert!(matches!(r, Err(LaunchError::Create { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn missing_program_fails_the_step() {
        let mut s = spec("");
        *command(&mut s) = vec!["/nonexistent/celeriac-dagster".into()];
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
