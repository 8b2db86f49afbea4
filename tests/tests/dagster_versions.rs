//! The Dagster releases people run, each with its own venv (`scripts/dagster-versions.sh`): the
//! instance, the run worker (`dagster job execute` with `celery_k8s_job_executor`, publishing the
//! release's own step tasks) and the step processes are that release's Dagster; the worker is
//! celeriac (process launcher). Per release, the diamond run succeeds with celeriac's engine events in
//! the event log, and a run whose op raises fails with the op's error while the steps after it never
//! run. 1.13.27 is the project venv's release (`tests/tests/dagster_runs.rs` covers it on both brokers).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use celeriac_tests::dagster::{DagsterHome, RunSummary};
use celeriac_tests::{ensure_services, repo_root, unique, WorkerProcess};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const DIAMOND_STEPS: [&str; 6] = ["finish", "join", "left", "middle", "right", "start"];

/// `version → venv` from `scripts/dagster-versions.sh` (built once per machine, cached).
fn venvs() -> &'static Vec<(String, PathBuf)> {
    static V: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    V.get_or_init(|| {
        let out = std::process::Command::new("bash")
            .arg(repo_root().join("scripts/dagster-versions.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running scripts/dagster-versions.sh");
        assert!(out.status.success(), "scripts/dagster-versions.sh failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(v, p)| (v.to_string(), PathBuf::from(p.trim())))
            .collect()
    })
}

fn venv(version: &str) -> PathBuf {
    venvs()
        .iter()
        .find(|(v, _)| v == version)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| panic!("no venv for dagster {version} in scripts/dagster-versions.sh"))
}

/// The diamond run and the failing run of `version` through one celeriac worker.
fn runs_of(version: &str) -> Result<()> {
    ensure_services();
    let venv = venv(version);
    let python = venv.join("bin/python");
    let reported = std::process::Command::new(&python)
        .args(["-c", "import dagster; print(dagster.__version__)"])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&reported.stdout).trim(),
        version,
        "the venv holds dagster {version}"
    );
    let queue = unique("ver");
    let home = DagsterHome::create_in_venv(&python, AMQP, "rpc://")?;
    // The step processes the worker starts (`dagster api execute_step`) come from this venv.
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut worker = WorkerProcess::start(
        &[
            "-b",
            AMQP,
            "--result-backend",
            "rpc://",
            "-Q",
            &queue,
            "-c",
            "3",
        ],
        &[("PATH", path.as_str())],
    )?;
    let started = Instant::now();
    let ok = home
        .run_job(
            "diamond",
            Duration::from_secs(240),
            &[("CELERIAC_QUEUE", &queue)],
        )
        .context("diamond")?;
    let diamond_time = started.elapsed();
    let failing = home
        .run_job(
            "diamond_failing",
            Duration::from_secs(240),
            &[("CELERIAC_QUEUE", &queue)],
        )
        .context("diamond_failing")?;
    let both_time = started.elapsed();
    worker.terminate(Duration::from_secs(60))?;
    let log = worker.log_text();
    println!("dagster {version}: diamond {diamond_time:?}, both runs {both_time:?}");
    assert_success(version, &ok, &log);
    assert_failure(version, &failing, &log);
    Ok(())
}

fn assert_success(version: &str, summary: &RunSummary, log: &str) {
    assert_eq!(
        summary.status, "SUCCESS",
        "dagster {version}: the diamond run did not succeed: {summary:#?}\nworker log:\n{log}"
    );
    assert_eq!(
        summary.steps_with("STEP_SUCCESS"),
        DIAMOND_STEPS,
        "dagster {version}: every step succeeded: {summary:#?}"
    );
    for step in DIAMOND_STEPS {
        assert_eq!(
            summary.count("STEP_START", step),
            1,
            "{version}: {step} ran once"
        );
        let picked = format!("[CeleryK8sJobExecutor] Task for step {step} picked up by Celery");
        assert!(
            summary.engine_messages.iter().any(|m| m == &picked),
            "dagster {version}: celeriac's engine event {picked:?} read back by dagster {version}: {:#?}",
            summary.engine_messages
        );
    }
}

fn assert_failure(version: &str, summary: &RunSummary, log: &str) {
    assert_eq!(
        summary.status, "FAILURE",
        "dagster {version}: the failing run should fail: {summary:#?}\nworker log:\n{log}"
    );
    assert!(
        summary
            .failure_messages
            .iter()
            .any(|m| m.contains("celeriac test failure: middle exploded")),
        "dagster {version}: the op's error is in the run: {:#?}",
        summary.failure_messages
    );
    assert_eq!(summary.steps_with("STEP_FAILURE"), ["middle"], "{version}");
    for step in ["join", "finish"] {
        assert_eq!(
            summary.count("STEP_START", step),
            0,
            "dagster {version}: {step} never ran"
        );
    }
}

#[test]
fn dagster_1_9_runs_through_celeriac() -> Result<()> {
    runs_of("1.9.13")
}

#[test]
fn dagster_1_10_runs_through_celeriac() -> Result<()> {
    runs_of("1.10.21")
}

#[test]
fn dagster_1_11_runs_through_celeriac() -> Result<()> {
    runs_of("1.11.16")
}

#[test]
fn dagster_1_12_runs_through_celeriac() -> Result<()> {
    runs_of("1.12.22")
}
