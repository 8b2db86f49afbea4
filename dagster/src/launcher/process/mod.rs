//! The embedded launcher: the step runs as a local subprocess (in its own process group) with the
//! worker's environment plus the environment its Kubernetes Job's container would get (resolved by the
//! step task: [`crate::step::workload`]). Used for local development, the demo and CI.
//!
//! A step process never outlives its worker unnoticed. With a state directory (the default,
//! [`super::step_state`]) the step writes its output to files and is recorded there (pid, start
//! time, output files, task id, attempt), so a worker restarted on the same host that receives the
//! redelivered task adopts the still-running process and reports its real outcome (or, if it ended
//! meanwhile, the outcome its output shows) instead of starting the step again, which Dagster refuses
//! ("Attempted to run … again"). Without a state directory the step gets `PR_SET_PDEATHSIG` (SIGKILL):
//! it dies with its worker.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use group::{stop, GroupGuard, KILL_GRACE};
use output::{collect, drain, read_files, Output};

use super::step_state::{self, Liveness, StateDir, StepEntry};
use super::{FailureClass, LaunchError, StepLauncher, StepRun, StepSpec, Workload, WorkloadKind};
use crate::events::{filter_events, terminal_event};

mod group;
mod output;

/// How often an adopted step process (not our child: no exit notification) is checked.
const ADOPT_POLL: Duration = Duration::from_millis(250);

/// Runs steps as local subprocesses.
#[derive(Debug, Default, Clone)]
pub struct ProcessLauncher {
    /// Working directory of step processes (the worker's when `None`).
    pub working_dir: Option<PathBuf>,
    /// Where running steps are recorded for adoption; `None`: steps die with their worker.
    state: Option<StateDir>,
    /// Per job name: an earlier run found lost by the last launch (see
    /// [`StepLauncher::take_lost_previous`]).
    lost: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

impl ProcessLauncher {
    pub fn new(working_dir: Option<PathBuf>) -> Self {
        Self {
            working_dir,
            ..Self::default()
        }
    }

    /// Records steps in `state` so a restarted worker adopts them (see the module docs).
    pub fn with_state_dir(mut self, state: StateDir) -> Self {
        self.state = Some(state);
        self
    }

    /// The state directory, if adoption is on.
    pub fn state_dir(&self) -> Option<&StateDir> {
        self.state.as_ref()
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
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
        // A step this host already started (the task was redelivered after its worker died).
        let mut lost = None;
        if let Some(state) = &self.state {
            state.collect_garbage();
            if let Some(entry) = state.read(&spec.job_name) {
                match state.liveness(&entry) {
                    Liveness::Running => {
                        info!(job = %spec.job_name, pid = entry.pid, previous_worker = %entry.worker, task_id = %entry.task_id,
                              "step process of this job is still running (its worker died); adopting it");
                        return self.adopt(spec, state, entry, cancel).await;
                    }
                    Liveness::Exited(code) => {
                        info!(job = %spec.job_name, pid = entry.pid, code, previous_worker = %entry.worker,
                              "step process of this job already ended; reporting its recorded outcome");
                        let logs = read_files(&entry.stdout, &entry.stderr).await;
                        let mut run = exited(spec, Some(code), logs);
                        run.adopted_existing = true;
                        return Ok(run);
                    }
                    Liveness::Gone => {
                        let logs = read_files(&entry.stdout, &entry.stderr).await;
                        if let Some(t) = terminal_event(&filter_events(&logs)) {
                            info!(job = %spec.job_name, pid = entry.pid, previous_worker = %entry.worker, outcome = %t,
                                  "step process of this job ended while no worker watched it; reporting the outcome its output shows");
                            return Ok(StepRun {
                                succeeded: true,
                                logs,
                                pod_names,
                                adopted_existing: true,
                                ..StepRun::default()
                            });
                        }
                        let what = format!(
                            "the worker {} running step {} (job {}, task {}, attempt {}) on host {} died mid-step, and its step process (pid {}) is gone without reporting success or failure",
                            entry.worker, entry.step_key, entry.job_name, entry.task_id, entry.attempt, entry.host, entry.pid
                        );
                        warn!(job = %spec.job_name, "{what}; starting the step again (Dagster refuses if it had started)");
                        lost = Some(what);
                    }
                }
            }
        }
        {
            let mut lost_runs = self.lost.lock().unwrap_or_else(|e| e.into_inner());
            match lost {
                Some(what) => lost_runs.insert(spec.job_name.clone(), what),
                None => lost_runs.remove(&spec.job_name),
            };
        }
        self.spawn(spec, process, cancel).await
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

    fn take_lost_previous(&self, job_name: &str) -> Option<String> {
        self.lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(job_name)
    }
}

impl ProcessLauncher {
    /// Starts the step process and waits for it.
    async fn spawn(
        &self,
        spec: &StepSpec,
        process: &super::StepProcess,
        cancel: CancellationToken,
    ) -> Result<StepRun, LaunchError> {
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
            .stdin(Stdio::null());
        let files = match self.output_destination(spec, &mut cmd) {
            Ok(files) => files,
            Err(message) => return Ok(failed(pod_names, message)),
        };
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
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        let guard = GroupGuard(pid);
        info!(job = %spec.job_name, pid, "step process started");
        let output = match files {
            Some((out, err)) => {
                if let (Some(state), Some(pid)) = (&self.state, pid) {
                    record(state, spec, pid, &out, &err);
                }
                Output::Files(out, err)
            }
            None => Output::Pipes(drain(child.stdout.take()), drain(child.stderr.take())),
        };
        let end = wait_child(&mut child, spec, &cancel).await;
        match end {
            ChildEnd::Cancelled => {
                info!(job = %spec.job_name, pid, "stopping the step process");
                stop(&mut child, &guard).await;
                let _ = collect(output, &guard).await;
                self.forget(spec);
                Err(LaunchError::Cancelled(spec.job_name.clone()))
            }
            ChildEnd::TimedOut => {
                warn!(job = %spec.job_name, pid, "step exceeded job_wait_timeout; stopping it");
                stop(&mut child, &guard).await;
                let logs = collect(output, &guard).await;
                self.forget(spec);
                let mut run = failed(pod_names, timed_out(spec));
                run.logs = logs;
                Ok(run)
            }
            ChildEnd::Exited(status) => Ok(self
                .exited_child(spec, status, output, &guard, pod_names, pid)
                .await),
        }
    }

    /// Where the step's stdout and stderr go: files in the state directory (so a worker adopting the
    /// step later can read them), else pipes, with the step bound to die with its worker. `Err`: the
    /// message of a step that cannot start because its output files cannot be created.
    fn output_destination(
        &self,
        spec: &StepSpec,
        cmd: &mut Command,
    ) -> Result<Option<(PathBuf, PathBuf)>, String> {
        match &self.state {
            Some(state) => {
                state.remove(&spec.job_name);
                let out = state.stdout_path(&spec.job_name);
                let err = state.stderr_path(&spec.job_name);
                let open = |p: &PathBuf| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(true)
                        .open(p)
                };
                match (open(&out), open(&err)) {
                    (Ok(o), Ok(e)) => {
                        cmd.stdout(o).stderr(e);
                        Ok(Some((out, err)))
                    }
                    (Err(e), _) | (_, Err(e)) => Err(format!(
                        "Cannot create the output files of job {} in {}: {e}",
                        spec.job_name,
                        state.path().display()
                    )),
                }
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                // No state directory to adopt it from: the step dies with its worker.
                let parent = nix::unistd::getpid();
                // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                            .map_err(std::io::Error::from)?;
                        if nix::unistd::getppid() != parent {
                            return Err(std::io::Error::other("the worker exited"));
                        }
                        Ok(())
                    });
                }
                Ok(None)
            }
        }
    }

    /// The outcome of a step process that exited: its exit recorded in the state directory, its
    /// output collected, success or the reason it failed.
    async fn exited_child(
        &self,
        spec: &StepSpec,
        status: std::io::Result<std::process::ExitStatus>,
        output: Output,
        guard: &GroupGuard,
        pod_names: Vec<String>,
        pid: Option<i32>,
    ) -> StepRun {
        if let (Some(state), Ok(s)) = (&self.state, &status) {
            use std::os::unix::process::ExitStatusExt;
            let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
            if let Err(e) = state.record_exit(&spec.job_name, code) {
                warn!(job = %spec.job_name, "cannot record the step's exit in the state directory: {e}");
            }
        }
        let logs = collect(output, guard).await;
        let failure_message = match status {
            Ok(s) if s.success() => None,
            Ok(s) => Some(match s.code() {
                Some(code) => exit_message(spec, code),
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
        StepRun {
            succeeded: failure_message.is_none(),
            failure_message,
            logs,
            pod_names,
            ..StepRun::default()
        }
    }

    /// Waits for a step process a dead worker started (not our child: polled through `/proc`), then
    /// reports the outcome its output shows.
    async fn adopt(
        &self,
        spec: &StepSpec,
        state: &StateDir,
        entry: StepEntry,
        cancel: CancellationToken,
    ) -> Result<StepRun, LaunchError> {
        let guard = GroupGuard(Some(entry.pid));
        let remaining = spec.wait_timeout.map(|t| {
            let elapsed = Duration::from_secs_f64((now_secs() - entry.started_at).max(0.0));
            t.saturating_sub(elapsed)
        });
        let deadline = async {
            match remaining {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        enum End {
            Ended,
            Cancelled,
            TimedOut,
        }
        let end = loop {
            if !step_state::is_running(&entry) {
                break End::Ended;
            }
            tokio::select! {
                _ = tokio::time::sleep(ADOPT_POLL) => {}
                _ = cancel.cancelled() => break End::Cancelled,
                _ = &mut deadline => break End::TimedOut,
            }
        };
        let logs = |e: &StepEntry| {
            let (o, r) = (e.stdout.clone(), e.stderr.clone());
            async move { read_files(&o, &r).await }
        };
        match end {
            End::Cancelled | End::TimedOut => {
                guard.kill(nix::sys::signal::Signal::SIGTERM);
                let started = std::time::Instant::now();
                while step_state::is_running(&entry) && started.elapsed() < KILL_GRACE {
                    tokio::time::sleep(ADOPT_POLL).await;
                }
                guard.kill(nix::sys::signal::Signal::SIGKILL);
                let out = logs(&entry).await;
                self.forget(spec);
                if matches!(end, End::Cancelled) {
                    return Err(LaunchError::Cancelled(spec.job_name.clone()));
                }
                let mut run = failed(vec![spec.job_name.clone()], timed_out(spec));
                run.logs = out;
                run.adopted_existing = true;
                Ok(run)
            }
            End::Ended => {
                let out = logs(&entry).await;
                // Not our child: the exit code is known only if the process's parent recorded it.
                let code = state.exit_code(&entry.job_name);
                info!(job = %spec.job_name, pid = entry.pid, code, "adopted step process ended");
                let mut run = exited(spec, code, out);
                run.adopted_existing = true;
                Ok(run)
            }
        }
    }

    /// Drops the state entry of a step stopped on purpose (cancelled, timed out).
    fn forget(&self, spec: &StepSpec) {
        if let Some(state) = &self.state {
            state.remove(&spec.job_name);
        }
    }
}

/// How the wait for a child step process ended.
enum ChildEnd {
    Exited(std::io::Result<std::process::ExitStatus>),
    Cancelled,
    TimedOut,
}

/// Waits for the child to exit, the task to be cancelled or `job_wait_timeout` to pass, whichever
/// comes first.
async fn wait_child(child: &mut Child, spec: &StepSpec, cancel: &CancellationToken) -> ChildEnd {
    let deadline = async {
        match spec.wait_timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        s = child.wait() => ChildEnd::Exited(s),
        _ = cancel.cancelled() => ChildEnd::Cancelled,
        _ = deadline => ChildEnd::TimedOut,
    }
}

/// Records a started step in the state directory (a failure is logged: the step still runs, it just
/// cannot be adopted).
fn record(
    state: &StateDir,
    spec: &StepSpec,
    pid: i32,
    out: &std::path::Path,
    err: &std::path::Path,
) {
    let Some((_, start_time)) = step_state::proc_stat(pid) else {
        warn!(job = %spec.job_name, pid, "cannot read the step process's start time; it cannot be adopted after a crash");
        return;
    };
    let entry = StepEntry {
        job_name: spec.job_name.clone(),
        run_id: spec.run_id.clone(),
        step_key: spec.step_key.clone(),
        task_id: spec.task_id.clone(),
        attempt: spec.attempt,
        pid,
        start_time,
        boot_id: step_state::boot_id(),
        stdout: out.to_path_buf(),
        stderr: err.to_path_buf(),
        worker: spec.worker.clone(),
        host: step_state::host_name(),
        started_at: now_secs(),
    };
    if let Err(e) = state.write(&entry) {
        warn!(job = %spec.job_name, dir = %state.path().display(), "cannot record the step in the state directory: {e}");
    }
}

fn timed_out(spec: &StepSpec) -> String {
    format!(
        "Timed out while waiting for job {} to complete",
        spec.job_name
    )
}

fn exit_message(spec: &StepSpec, code: i32) -> String {
    format!(
        "Step process of job {} exited with code {code}",
        spec.job_name
    )
}

/// How a step process that ended looks when all we have is its exit code (if recorded) and output.
fn exited(spec: &StepSpec, code: Option<i32>, logs: String) -> StepRun {
    let failure_message = match code {
        Some(0) => None,
        Some(c) => Some(exit_message(spec, c)),
        // Nobody saw it exit: its output says how it went.
        None if terminal_event(&filter_events(&logs)).is_some() => None,
        None => Some(format!(
            "Step process of job {} ended without reporting success or failure after its worker died (exit code unknown)",
            spec.job_name
        )),
    };
    StepRun {
        succeeded: failure_message.is_none(),
        failure_message,
        logs,
        pod_names: vec![spec.job_name.clone()],
        ..StepRun::default()
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
            task_id: "t".into(),
            attempt: 0,
            worker: "w@h".into(),
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
        s.workload = Workload::Job(Box::new(crate::launcher::StepJob::new(
            Err("not built".into()),
            false,
            None,
        )));
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
