//! Network faults between the worker and its broker, through the fault proxy
//! (`celeriac_tests::fault_proxy`): only the worker's connections go through the proxy; Dagster's run
//! worker (the client reading the step results) talks to the broker directly and survives.
//!
//! Job `marked`: a 15 s step whose body appends a marker line, then a downstream step published
//! after it ends (the "queued task consumed afterwards"). Mid-step:
//! * RabbitMQ: the worker's connection is black-holed (bytes accepted, nothing answered). The AMQP
//!   heartbeat (2 s here) finds it dead; a new connection is open within the heartbeat window;
//! * Redis: every worker connection is black-holed; the health check (PING every 2 s, 5 s response
//!   timeout) replaces them within 10 s;
//! * Redis: every worker connection is reset.
//!
//! In each case the run succeeds, every step body ran exactly once (markers, STEP_START), the worker
//! said so in its log and `celeriac_peer_reconnects_total{peer}` counts the reconnect.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use celeriac_tests::dagster::{markers_in, DagsterHome};
use celeriac_tests::fault_proxy::{Fault, FaultProxy};
use celeriac_tests::{artifacts_dir, ensure_services, http_get, unique, wait_until, WorkerProcess};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS_DB: u8 = 15;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    BlackHole,
    Reset,
}

/// The value of `celeriac_peer_reconnects_total{peer=…}` on the worker's /metrics.
fn reconnects(worker: &WorkerProcess, peer: &str) -> f64 {
    let Some(addr) = worker.http_addr() else {
        return 0.0;
    };
    let Ok((_, text)) = http_get(&format!("http://{addr}/metrics")) else {
        return 0.0;
    };
    text.lines()
        .filter(|l| {
            l.starts_with("celeriac_peer_reconnects_total{")
                && l.contains(&format!("peer=\"{peer}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `marked` with the worker behind a proxy to `upstream`, cuts the worker's connections mid-step
/// and checks detection within `window`, the run's success and that each step ran once.
fn cut_mid_step(
    run_broker: &str,
    run_backend: &str,
    upstream: SocketAddr,
    worker_url: impl Fn(&FaultProxy) -> (String, String),
    peer: &str,
    cut: Cut,
    window: Duration,
) -> Result<()> {
    ensure_services();
    let proxy = FaultProxy::start(upstream)?;
    let (worker_broker, worker_backend) = worker_url(&proxy);
    let queue = unique("netfault");
    let home = DagsterHome::create(run_broker, run_backend)?;
    let state = artifacts_dir().join(unique("steps"));
    let state_arg = state.display().to_string();
    let mut args = vec![
        "-b",
        &worker_broker,
        "--result-backend",
        &worker_backend,
        "-Q",
        &queue,
        "-c",
        "1",
        "--step-state-dir",
        &state_arg,
    ];
    if peer == "redis" {
        args.extend_from_slice(&["--visibility-timeout", "60"]);
    }
    let worker = WorkerProcess::start(&args, &[])?;
    let home_dir = home.dir.clone();
    std::thread::scope(|s| -> Result<()> {
        let run = s.spawn(|| {
            home.run_job(
                "marked",
                Duration::from_secs(240),
                &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", "15")],
            )
        });
        wait_until(
            "the slow step's body to start",
            Duration::from_secs(120),
            || Ok(markers_in(&home_dir, "marked_slow").first().cloned()),
        )?;
        let before = proxy.accepted();
        let cut_at = Instant::now();
        match cut {
            Cut::BlackHole => proxy.fault_existing(Fault::BlackHole),
            Cut::Reset => proxy.reset_all(),
        }
        let reconnected_at = wait_until(
            "the worker to open a new connection",
            window + Duration::from_secs(20),
            || Ok((proxy.accepted() > before).then(Instant::now)),
        )?;
        let detected_in = reconnected_at - cut_at;
        eprintln!("{peer} {cut:?}: new connection {detected_in:?} after the cut");
        assert!(
            detected_in <= window,
            "{peer} {cut:?}: the worker reconnected {detected_in:?} after the cut, past the {window:?} window:\n{}",
            worker.log_text()
        );
        let summary = run.join().expect("run thread")?;
        let log = worker.log_text();
        let context = format!("{peer} {cut:?}; worker:\n{log}");
        summary.assert_succeeded_running_once("marked_slow", &context);
        summary.assert_succeeded_running_once("marked_after", &context);
        assert_eq!(markers_in(&home_dir, "marked_slow").len(), 1, "{context}");
        assert_eq!(markers_in(&home_dir, "marked_after").len(), 1, "{context}");
        let said = match peer {
            "rabbitmq" => "AMQP connection lost",
            _ => "connection is dead",
        };
        if cut == Cut::BlackHole || peer == "rabbitmq" {
            assert!(log.contains(said), "one log line says so: {context}");
        }
        let counted = reconnects(&worker, peer);
        if cut == Cut::BlackHole {
            assert!(
                counted >= 1.0,
                "celeriac_peer_reconnects_total{{peer=\"{peer}\"}} = {counted}: {context}"
            );
        }
        Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

#[test]
fn black_holed_rabbitmq_connection_mid_step_is_detected_within_the_heartbeat_window() -> Result<()>
{
    // heartbeat=2: lapin gives up after two intervals without a frame (4 s); the worker's next
    // publish (its 2 s worker-heartbeat event) reconnects.
    cut_mid_step(
        AMQP,
        "rpc://",
        SocketAddr::from(([127, 0, 0, 1], 5672)),
        |p| {
            (
                format!("amqp://guest:guest@{}//?heartbeat=2", p.addr()),
                "rpc://".into(),
            )
        },
        "rabbitmq",
        Cut::BlackHole,
        Duration::from_secs(8),
    )
}

#[test]
fn black_holed_redis_connections_mid_step_are_detected_and_replaced() -> Result<()> {
    let direct = format!("redis://127.0.0.1:6379/{REDIS_DB}");
    cut_mid_step(
        &direct,
        &direct,
        SocketAddr::from(([127, 0, 0, 1], 6379)),
        |p| {
            let url = format!("redis://{}/{REDIS_DB}", p.addr());
            (url.clone(), url)
        },
        "redis",
        Cut::BlackHole,
        Duration::from_secs(10),
    )
}

#[test]
fn reset_redis_connections_mid_step_are_replaced() -> Result<()> {
    let direct = format!("redis://127.0.0.1:6379/{REDIS_DB}");
    cut_mid_step(
        &direct,
        &direct,
        SocketAddr::from(([127, 0, 0, 1], 6379)),
        |p| {
            let url = format!("redis://{}/{REDIS_DB}", p.addr());
            (url.clone(), url)
        },
        "redis",
        Cut::Reset,
        Duration::from_secs(10),
    )
}
