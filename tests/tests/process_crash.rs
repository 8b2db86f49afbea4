//! Crash semantics of the local process launcher, with real Dagster runs (job `marked`: a 15 s step
//! whose body appends a line to a marker file, then a downstream step that does the same):
//! * the worker is SIGKILLed mid-step (alone, or with its whole process group): the step process
//!   survives, the worker restarted on the host adopts it from the state directory when the task
//!   comes back (RabbitMQ: at once; Redis: after `visibility_timeout`), the run succeeds and each
//!   step body ran exactly once;
//! * the worker and its step process are both killed (a container or cgroup kill): the restarted
//!   worker cannot finish the step (Dagster refuses to run a started step again) and fails it with a
//!   STEP_FAILURE naming the dead worker, the host and the attempt; the run fails, never hangs;
//! * without a state directory (`--step-state-dir none`) the step process dies with its worker
//!   (PR_SET_PDEATHSIG) and the next worker's STEP_FAILURE says why the step cannot finish.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use celeriac_tests::dagster::{markers_in as markers, DagsterHome, RunSummary};
use celeriac_tests::{artifacts_dir, ensure_services, unique, wait_until, WorkerProcess};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS: &str = "redis://127.0.0.1:6379/8";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kill {
    /// SIGKILL the worker process.
    Worker,
    /// SIGKILL the worker's process group.
    WorkerGroup,
    /// SIGKILL the worker's group and the step's (everything dies, as in a container kill).
    Everything,
    /// No state directory: SIGKILL the worker; its step must die with it.
    WorkerWithoutStateDir,
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z'))
}

fn crash(broker: &str, backend: &str, kill: Kill) -> Result<()> {
    ensure_services();
    let queue = unique("pcrash");
    let home = DagsterHome::create(broker, backend)?;
    let state: PathBuf = artifacts_dir().join(unique("steps"));
    let state_arg = if kill == Kill::WorkerWithoutStateDir {
        "none".to_string()
    } else {
        state.display().to_string()
    };
    let mut args = vec![
        "-b",
        broker,
        "--result-backend",
        backend,
        "-Q",
        &queue,
        "-c",
        "1",
        "--step-state-dir",
        &state_arg,
    ];
    if broker.starts_with("redis") {
        args.extend_from_slice(&["--visibility-timeout", "5"]);
    }
    let mut first = WorkerProcess::start_grouped(&args, &[])?;
    let home_dir = home.dir.clone();
    let started = std::time::Instant::now();
    let summary: RunSummary = std::thread::scope(|s| -> Result<RunSummary> {
        let run = s.spawn(|| {
            home.run_job(
                "marked",
                Duration::from_secs(180),
                &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", "15")],
            )
        });
        let step_pid: i32 = wait_until(
            "the slow step's body to start",
            Duration::from_secs(120),
            || Ok(markers(&home_dir, "marked_slow").first().cloned()),
        )?
        .parse()
        .context("marker pid")?;
        match kill {
            Kill::Worker | Kill::WorkerWithoutStateDir => first.kill()?,
            Kill::WorkerGroup => first.kill_group()?,
            Kill::Everything => {
                first.kill_group()?;
                // The step process leads its own process group.
                nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(step_pid),
                    nix::sys::signal::Signal::SIGKILL,
                )?;
            }
        }
        if kill == Kill::WorkerWithoutStateDir {
            wait_until(
                "the step process to die with its worker",
                Duration::from_secs(5),
                || Ok((!alive(step_pid)).then_some(())),
            )?;
        } else if kill != Kill::Everything {
            assert!(alive(step_pid), "the step process outlives its worker");
        }
        let mut second = WorkerProcess::start(&args, &[])?;
        let summary = run.join().expect("run thread")?;
        second.terminate(Duration::from_secs(60))?;
        let log = second.log_text();
        let context = format!("{kill:?} on {broker}; second worker:\n{log}");
        let slow_runs = markers(&home_dir, "marked_slow");
        assert_eq!(
            slow_runs.len(),
            1,
            "the slow step's body ran once: {context}"
        );
        match kill {
            Kill::Worker | Kill::WorkerGroup => {
                summary.assert_succeeded_running_once("marked_slow", &context);
                summary.assert_succeeded_running_once("marked_after", &context);
                assert_eq!(markers(&home_dir, "marked_after").len(), 1, "{context}");
                assert!(log.contains("adopting it"), "{context}");
            }
            Kill::Everything | Kill::WorkerWithoutStateDir => {
                assert_eq!(summary.status, "FAILURE", "{context}\n{summary:#?}");
                assert_eq!(
                    summary.count("STEP_FAILURE", "marked_slow"),
                    1,
                    "{summary:#?}"
                );
                assert!(markers(&home_dir, "marked_after").is_empty(), "{context}");
                let failure = summary.failure_messages.join("\n");
                assert!(
                    failure.contains("Step marked_slow cannot be finished"),
                    "{failure}"
                );
                if kill == Kill::Everything {
                    // Which worker died, on which host, and which attempt.
                    assert!(failure.contains(&first.hostname), "{failure}");
                    assert!(failure.contains("died mid-step"), "{failure}");
                    assert!(failure.contains("attempt 0"), "{failure}");
                    assert!(failure.contains("on host "), "{failure}");
                } else {
                    assert!(
                        failure.contains("a worker running it died mid-step"),
                        "{failure}"
                    );
                }
            }
        }
        Ok(summary)
    })?;
    eprintln!(
        "{kill:?} on {broker}: run {} {} in {:.1} s",
        summary.run_id,
        summary.status,
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

#[test]
fn sigkilled_worker_on_rabbitmq_its_step_is_adopted() -> Result<()> {
    crash(AMQP, "rpc://", Kill::Worker)
}

#[test]
fn sigkilled_worker_on_redis_its_step_is_adopted() -> Result<()> {
    crash(REDIS, REDIS, Kill::Worker)
}

#[test]
fn sigkilled_worker_group_on_rabbitmq_its_step_is_adopted() -> Result<()> {
    crash(AMQP, "rpc://", Kill::WorkerGroup)
}

#[test]
fn sigkilled_worker_group_on_redis_its_step_is_adopted() -> Result<()> {
    crash(REDIS, REDIS, Kill::WorkerGroup)
}

#[test]
fn worker_and_step_killed_on_rabbitmq_fail_the_step_naming_the_cause() -> Result<()> {
    crash(AMQP, "rpc://", Kill::Everything)
}

#[test]
fn worker_and_step_killed_on_redis_fail_the_step_naming_the_cause() -> Result<()> {
    crash(REDIS, REDIS, Kill::Everything)
}

#[test]
fn without_a_state_dir_the_step_dies_with_its_worker() -> Result<()> {
    crash(AMQP, "rpc://", Kill::WorkerWithoutStateDir)
}
