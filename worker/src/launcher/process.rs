//! The embedded launcher: the step runs as a local subprocess (in its own process group) with the
//! environment its Kubernetes Job would get. Used for local development, the demo and CI.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{LaunchError, StepLauncher, StepRun, StepSpec};

/// How long a cancelled step gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone)]
pub struct ProcessLauncher {
    /// Working directory of step processes (the worker's when `None`).
    pub working_dir: Option<std::path::PathBuf>,
}

#[async_trait]
impl StepLauncher for ProcessLauncher {
    async fn launch(
        &self,
        spec: &StepSpec,
        cancel: CancellationToken,
    ) -> Result<StepRun, LaunchError> {
        let (program, args) = spec
            .command
            .split_first()
            .ok_or_else(|| LaunchError::Start {
                job_name: spec.job_name.clone(),
                reason: "empty command".into(),
            })?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(spec.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.process_group(0).kill_on_drop(true);
        if let Some(dir) = &self.working_dir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| LaunchError::Start {
            job_name: spec.job_name.clone(),
            reason: format!("{program}: {e}"),
        })?;
        let pid = child.id();
        info!(job = %spec.job_name, pid, "step process started");
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        // Drain both pipes concurrently so a chatty step never blocks on a full pipe.
        let out_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut buf).await;
            }
            buf
        });
        let err_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut buf).await;
            }
            buf
        });
        let deadline = async {
            match spec.wait_timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let status = tokio::select! {
            s = child.wait() => Some(s),
            _ = cancel.cancelled() => None,
            _ = deadline => {
                warn!(job = %spec.job_name, "step exceeded job_wait_timeout; stopping it");
                stop(&mut child, pid).await;
                let out = collect(out_task, err_task).await;
                return Ok(StepRun {
                    succeeded: false,
                    failure_message: Some(format!("Timed out while waiting for job {} to complete", spec.job_name)),
                    logs: out,
                    pod_names: vec![spec.job_name.clone()],
                });
            }
        };
        let Some(status) = status else {
            stop(&mut child, pid).await;
            let _ = collect(out_task, err_task).await;
            return Err(LaunchError::Cancelled(spec.job_name.clone()));
        };
        let logs = collect(out_task, err_task).await;
        let status = status.map_err(|e| LaunchError::Start {
            job_name: spec.job_name.clone(),
            reason: e.to_string(),
        })?;
        let failure_message = (!status.success()).then(|| match status.code() {
            Some(code) => format!(
                "step process of job {} exited with code {code}",
                spec.job_name
            ),
            None => format!(
                "step process of job {} was killed by a signal ({status})",
                spec.job_name
            ),
        });
        Ok(StepRun {
            succeeded: status.success(),
            failure_message,
            logs,
            pod_names: vec![spec.job_name.clone()],
        })
    }

    fn kind(&self) -> &'static str {
        "process"
    }
}

async fn collect(
    out: tokio::task::JoinHandle<Vec<u8>>,
    err: tokio::task::JoinHandle<Vec<u8>>,
) -> String {
    let out = out.await.unwrap_or_default();
    let err = err.await.unwrap_or_default();
    let mut logs = String::from_utf8_lossy(&out).into_owned();
    if !logs.ends_with('\n') && !logs.is_empty() {
        logs.push('\n');
    }
    logs.push_str(&String::from_utf8_lossy(&err));
    logs
}

/// SIGTERM the step's process group, SIGKILL it after [`KILL_GRACE`].
async fn stop(child: &mut tokio::process::Child, pid: Option<u32>) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &str) -> StepSpec {
        StepSpec {
            job_name: "dagster-step-test".into(),
            namespace: "default".into(),
            command: vec!["sh".into(), "-c".into(), cmd.into()],
            env: vec![("STEP_ENV".into(), "42".into())],
            image: None,
            job_config: serde_json::Value::Null,
            user_defined_k8s_config: serde_json::Value::Null,
            wait_timeout: None,
        }
    }

    #[tokio::test]
    async fn captures_output_env_and_exit_codes() {
        let l = ProcessLauncher::default();
        let run = l
            .launch(
                &spec("echo out $STEP_ENV; echo err >&2"),
                CancellationToken::new(),
            )
            .await
            .expect("runs");
        assert!(run.succeeded);
        assert_eq!(run.logs, "out 42\nerr\n");
        let run = l
            .launch(&spec("exit 3"), CancellationToken::new())
            .await
            .expect("runs");
        assert!(!run.succeeded);
        assert!(run
            .failure_message
            .unwrap_or_default()
            .contains("exited with code 3"));
        let big = l
            .launch(
                &spec("head -c 3000000 /dev/zero | tr '\\0' x"),
                CancellationToken::new(),
            )
            .await
            .expect("runs");
        assert_eq!(big.logs.len(), 3_000_000 + 1);
    }

    #[tokio::test]
    async fn cancel_kills_the_process_group() {
        let l = ProcessLauncher::default();
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c2.cancel();
        });
        let started = std::time::Instant::now();
        let r = l.launch(&spec("sleep 30 & wait"), cancel).await;
        assert!(matches!(r, Err(LaunchError::Cancelled(_))));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn wait_timeout_fails_the_step() {
        let mut s = spec("sleep 30");
        s.wait_timeout = Some(Duration::from_millis(200));
        let run = ProcessLauncher::default()
            .launch(&s, CancellationToken::new())
            .await
            .expect("runs");
        assert!(!run.succeeded);
        assert!(run
            .failure_message
            .unwrap_or_default()
            .contains("Timed out"));
    }
}
