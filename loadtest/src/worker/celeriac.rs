//! The celeriac side: one `celeriac worker` (Kubernetes launcher) started once and given every batch
//! in turn, as it would run in production, so that its memory against steps in flight is one curve
//! of one process; its own histogram of Job complete → result is read from its metrics before it
//! stops.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::cluster::audit_since;
use super::params::{Params, BACKEND, CELERIAC_USER};
use super::setup::Setup;
use super::side::{Lane, Side, Watched};
use crate::env::Proc;
use crate::{probe, procs};

/// celeriac's side measured: its lane, its figures and its histogram's Job complete → result p50
/// and p99.
pub async fn measure(p: &Params, setup: &Setup) -> Result<(Lane, Side, [f64; 2])> {
    let lane = Lane::open("celeriac", "c", CELERIAC_USER, &setup.runs[0], setup)?;
    let mut c = Side::default();
    let http_port = probe::free_port()?;
    let spawned = Instant::now();
    let mut worker = Proc::spawn("load_celeriac_worker", command(p, setup, &lane, http_port))?;
    worker.wait_for_log("consuming", Duration::from_secs(60))?;
    c.startup_s.push(spawned.elapsed().as_secs_f64());
    let pid = worker.pid();
    std::thread::sleep(Duration::from_secs(2));
    c.idle_pss = procs::tree_pss(pid) as f64;
    c.idle_rss = procs::rss(pid) as f64;
    let cpu_before = procs::cpu_time(pid);
    let watched = Watched {
        pid,
        log: &worker.log,
        started: &["step Job running"],
        ended: &["step finished"],
    };
    for &n in &p.celeriac_levels {
        c.batch(setup, &lane, &watched, n, format!("celeriac {n:>5}"))
            .await?;
        std::thread::sleep(Duration::from_secs(15));
        c.after_rss.push(procs::rss(pid) as f64);
    }
    c.cpu_s = procs::cpu_time(pid)
        .saturating_sub(cpu_before)
        .as_secs_f64();
    let job_to_result = job_to_result(http_port, &lane);
    drop(worker);
    c.audit = audit_since(lane.mark, &lane.ns.user, &lane.ns.name);
    Ok((lane, c, job_to_result))
}

/// The worker, consuming the lane's queue with the Kubernetes launcher in the lane's namespace.
fn command(p: &Params, setup: &Setup, lane: &Lane, http_port: u16) -> Command {
    let mut cmd = Command::new(&setup.celeriac);
    cmd.args([
        "worker",
        "-b",
        p.broker.url(),
        "--result-backend",
        BACKEND,
        "-Q",
        &lane.queue,
        "-c",
        &p.celeriac_concurrency.to_string(),
        "--launcher",
        "kubernetes",
        "--http-addr",
        &format!("127.0.0.1:{http_port}"),
    ])
    .env("KUBECONFIG", &lane.ns.kubeconfig)
    .env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
    .env("RUST_LOG", "info");
    cmd
}

/// The worker's own view of "Job complete → result": its histogram from the Job turning terminal
/// (watch event) to the step's events being ready for the result, p50 and p99.
fn job_to_result(http_port: u16, lane: &Lane) -> [f64; 2] {
    let scrape = probe::scrape(http_port).replace(&format!("namespace=\"{}\",", lane.ns.name), "");
    [0.5, 0.99].map(|q| {
        procs::histogram_quantile(&scrape, "celeriac_step_job_result_latency_seconds", q)
            .unwrap_or(f64::NAN)
    })
}
