//! The Python side: `celery -A dagster_celery_k8s.app worker` as `dagster-celery worker start` runs
//! it, restarted for each level with `-c` = that level (prefork holds one step per child process, so
//! its concurrency is its number of steps in flight). Its step Jobs stay in place afterwards; their
//! completion times give its Job complete → result.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::cluster::{audit_since, job_completion_times};
use super::params::{BrokerKind, Params, BACKEND, PYTHON_USER};
use super::setup::Setup;
use super::side::{Lane, Side, Watched};
use crate::env::{self, Proc};
use crate::procs;

/// Python's side measured: its lane, its figures and when each of its Jobs turned Complete.
pub async fn measure(p: &Params, setup: &Setup) -> Result<(Lane, Side, HashMap<String, f64>)> {
    let lane = Lane::open("python", "p", PYTHON_USER, &setup.runs[1], setup)?;
    let mut py = Side::default();
    for (i, &conc) in p.python_levels.iter().enumerate() {
        let spawned = Instant::now();
        let mut w = Proc::spawn(
            "load_python_worker",
            command(&setup.venv, p.broker, &lane, conc),
        )?;
        w.wait_for_log(" ready.", Duration::from_secs(180))?;
        py.startup_s.push(spawned.elapsed().as_secs_f64());
        let pid = w.pid();
        std::thread::sleep(Duration::from_secs(2));
        if i == 0 {
            py.idle_pss = procs::tree_pss(pid) as f64;
            py.idle_rss = procs::rss(pid) as f64;
        }
        let cpu_before: Duration = procs::tree(pid).into_iter().map(procs::cpu_time).sum();
        // celery logs `Task execute_step_k8s_job[<id>] received`, then `… succeeded in <s>s: …` or
        // `… raised unexpected: …`.
        let watched = Watched {
            pid,
            log: &w.log,
            started: &["] received"],
            ended: &["] succeeded in", "] raised unexpected"],
        };
        py.batch(setup, &lane, &watched, conc, format!("python -c {conc:>3}"))
            .await?;
        py.cpu_s += procs::tree(pid)
            .into_iter()
            .map(procs::cpu_time)
            .sum::<Duration>()
            .saturating_sub(cpu_before)
            .as_secs_f64();
        drop(w);
    }
    py.audit = audit_since(lane.mark, &lane.ns.user, &lane.ns.name);
    // Python leaves its step Jobs in place: when each turned Complete (whole seconds in 1.20).
    let completed = job_completion_times(&lane.ns)?;
    Ok((lane, py, completed))
}

/// The worker at concurrency `conc`, consuming the lane's queue in the lane's namespace.
fn command(venv: &Path, broker: BrokerKind, lane: &Lane, conc: usize) -> Command {
    let mut cmd = Command::new(venv.join("bin/celery"));
    // As `dagster-celery worker start` runs it (broker and backend are options of `celery`
    // itself, not of its `worker` command).
    cmd.args(["-A", "dagster_celery_k8s.app", "-b", broker.url()])
        .args(["--result-backend", BACKEND, "worker", "-Q", &lane.queue])
        .args(["-c", &conc.to_string(), "--prefetch-multiplier=1"])
        .args(["-l", "info", "-n", &format!("{}@load", env::unique("py"))])
        .args([
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ])
        .env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
        .env("KUBECONFIG", &lane.ns.kubeconfig)
        .env("PATH", env::venv_first_path(venv));
    cmd
}
