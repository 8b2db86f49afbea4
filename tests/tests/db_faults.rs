//! Database faults while a step runs: the worker's PostgreSQL connections (only: Dagster's run worker
//! and the step processes connect directly) go through the fault proxy, and are black-holed, or reset
//! again and again, while the step of job `marked` runs and ends, i.e. while the worker checks the
//! run's status (every 2 s) and writes the step's engine events.
//!
//! The step is not failed for it, the worker's events are retried until the database answers and land
//! in order, none lost, none twice; the run succeeds and each step body ran once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use celeriac_tests::dagster::{markers_in, DagsterHome};
use celeriac_tests::fault_proxy::{Fault, FaultProxy};
use celeriac_tests::{artifacts_dir, ensure_services, http_get, unique, wait_until, WorkerProcess};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const PG_PORT_VAR: &str = "CELERIAC_T_PG_PORT";

#[derive(Clone, Copy, Debug)]
enum DbFault {
    /// Every worker connection, open or new, answers nothing for 20 s.
    BlackHole,
    /// Every worker connection is reset once a second for 20 s.
    Resets,
}

fn postgres_reconnects(worker: &WorkerProcess) -> f64 {
    let Some(addr) = worker.http_addr() else {
        return 0.0;
    };
    let Ok((_, text)) = http_get(&format!("http://{addr}/metrics")) else {
        return 0.0;
    };
    text.lines()
        .filter(|l| {
            l.starts_with("celeriac_peer_reconnects_total{") && l.contains("peer=\"postgres\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `var` in the environment of the running `dagster api execute_step` process of the Dagster home
/// `home` (Linux `/proc`).
fn step_process_env(home: &std::path::Path, var: &str) -> Option<String> {
    let home = format!("DAGSTER_HOME={}", home.display());
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains("execute_step") {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let prefix = format!("{var}=");
        if !environ.split(|b| *b == 0).any(|kv| kv == home.as_bytes()) {
            continue;
        }
        if let Some(value) = environ
            .split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .find_map(|kv| kv.strip_prefix(&prefix).map(str::to_owned))
        {
            return Some(value);
        }
    }
    None
}

fn database_fault_mid_step(fault: DbFault) -> Result<()> {
    ensure_services();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], 5432)))?;
    let proxy_port = proxy.port.to_string();
    let queue = unique("dbfault");
    let home = DagsterHome::create_with_pg_port_env(
        AMQP,
        "rpc://",
        PG_PORT_VAR,
        &["marked_slow", "marked_after"],
    )?;
    let state = artifacts_dir().join(unique("steps"));
    let state_arg = state.display().to_string();
    let worker = WorkerProcess::start(
        &[
            "-b",
            AMQP,
            "--result-backend",
            "rpc://",
            "-Q",
            &queue,
            "-c",
            "1",
            "--step-state-dir",
            &state_arg,
        ],
        &[(PG_PORT_VAR, proxy_port.as_str())],
    )?;
    let home_dir = home.dir.clone();
    std::thread::scope(|s| -> Result<()> {
        let run = s.spawn(|| {
            home.run_job(
                "marked",
                Duration::from_secs(300),
                &[
                    ("CELERIAC_QUEUE", &queue),
                    ("SLEEP_SECONDS", "15"),
                    (PG_PORT_VAR, "5432"),
                ],
            )
        });
        wait_until(
            "the slow step's body to start",
            Duration::from_secs(120),
            || Ok(markers_in(&home_dir, "marked_slow").first().cloned()),
        )?;
        assert!(
            proxy.accepted() >= 1,
            "the worker's database connections go through the proxy"
        );
        // ... and the step process's do not: the fault is the worker's alone (a step process
        // whose own event write meets a reset fails its step, which is Dagster's business).
        let step_port = step_process_env(&home_dir, PG_PORT_VAR);
        assert_eq!(
            step_port.as_deref(),
            Some("5432"),
            "the step process connects to PostgreSQL directly"
        );
        // The step has 15 s to go: the fault covers its end, so its last events meet it.
        let until = Instant::now() + Duration::from_secs(20);
        match fault {
            DbFault::BlackHole => {
                proxy.fault_all(Fault::BlackHole);
                std::thread::sleep(until - Instant::now());
                proxy.heal();
                // The black-holed connections are of no use any more.
                proxy.reset_all();
            }
            DbFault::Resets => {
                while Instant::now() < until {
                    proxy.reset_all();
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        let summary = run.join().expect("run thread")?;
        let log = worker.log_text();
        let context = format!("{fault:?}; worker:\n{log}");
        summary.assert_succeeded_running_once("marked_slow", &context);
        summary.assert_succeeded_running_once("marked_after", &context);
        assert_eq!(markers_in(&home_dir, "marked_slow").len(), 1, "{context}");
        // The worker's engine events of the step that met the fault: each once, in order.
        let wanted = [
            "Task for step marked_slow picked up by Celery",
            "Executing step \"marked_slow\" in Kubernetes job",
            "Retrieving logs from Kubernetes Job pods",
        ];
        let mut positions = vec![];
        for w in wanted {
            let at: Vec<usize> = summary
                .engine_messages
                .iter()
                .enumerate()
                .filter(|(_, m)| m.contains(w))
                .map(|(i, _)| i)
                .collect();
            positions.push(at);
        }
        // "Retrieving logs" is written for both steps; the first is marked_slow's.
        assert_eq!(
            positions[0].len(),
            1,
            "{:#?}\n{context}",
            summary.engine_messages
        );
        assert_eq!(positions[1].len(), 1, "{:#?}", summary.engine_messages);
        assert_eq!(positions[2].len(), 2, "{:#?}", summary.engine_messages);
        assert!(
            positions[0][0] < positions[1][0] && positions[1][0] < positions[2][0],
            "in order: {:#?}",
            summary.engine_messages
        );
        assert!(
            log.contains("Dagster database connection") && log.contains("reconnecting"),
            "the worker met the fault and said so: {context}"
        );
        assert!(
            !log.contains("giving up writing a Dagster event"),
            "{context}"
        );
        assert!(
            postgres_reconnects(&worker) >= 1.0,
            "celeriac_peer_reconnects_total{{peer=\"postgres\"}} counts the reconnects: {context}"
        );
        Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

#[test]
fn black_holed_database_mid_step_delays_events_but_loses_none() -> Result<()> {
    database_fault_mid_step(DbFault::BlackHole)
}

#[test]
fn database_connections_reset_mid_step_lose_no_event_and_store_none_twice() -> Result<()> {
    database_fault_mid_step(DbFault::Resets)
}
