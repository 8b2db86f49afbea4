//! Soak (issue 14): Dagster runs, one after the other and several at once, for a long time, through
//! the production shape of the fleet (Dagster's launch path → `celeriac coordinator` → RabbitMQ →
//! `celeriac worker` with the Kubernetes launcher → step Jobs on the real v1.20 API server), while
//! faults are injected at random: the worker killed with SIGKILL (and started again), RabbitMQ
//! restarted, the API server restarted.
//!
//! Every run must succeed with each step submitted and run once, and neither the worker's nor the
//! coordinator's memory may grow over the soak. Not part of `.ci/run` (it is long by design):
//!
//! ```sh
//! CELERIAC_SOAK_MINUTES=30 cargo test -p celeriac-tests --test soak -- --ignored --nocapture
//! ```
//!
//! It writes `tests/artifacts/soak.json` (every run, fault and memory sample); the committed result of
//! a full run is `loadtest/results/soak.json` with its notes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celeriac_tests::brokers::PrivateRabbit;
use celeriac_tests::dagster::{each_step_once, DagsterHome};
use celeriac_tests::k8s::{cluster, TestNamespace};
use celeriac_tests::{artifacts_dir, ensure_services, unique, CeleriacProcess, WorkerProcess};
use serde_json::{json, Value};

const STEPS: [&str; 3] = ["sl_a", "sl_b", "sl_join"];
/// Runs in flight at once.
const IN_FLIGHT: usize = 3;
const STEP_SLEEP: &str = "3";

/// A small xorshift generator: the soak's faults are random, and reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Clone, Copy, Debug)]
enum FaultKind {
    KillWorker,
    RestartBroker,
    RestartApiServer,
}

/// Resident set size of a process, in KiB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Whether memory stayed flat over a series of samples: the mean of the last quarter is within
/// 25 % (+ 4 MiB of allocator slack) of the mean of the second quarter (the first is warm-up).
fn flat(samples: &[u64]) -> Option<(u64, u64, bool)> {
    if samples.len() < 8 {
        return None;
    }
    let q = samples.len() / 4;
    let mean = |s: &[u64]| s.iter().sum::<u64>() / s.len() as u64;
    let early = mean(&samples[q..2 * q]);
    let late = mean(&samples[samples.len() - q..]);
    Some((early, late, late <= early + early / 4 + 4096))
}

struct Fleet {
    home: DagsterHome,
    worker_args: Vec<String>,
    worker_envs: Vec<(String, String)>,
}

impl Fleet {
    fn start_worker(&self) -> Result<WorkerProcess> {
        let args: Vec<&str> = self.worker_args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = self
            .worker_envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        WorkerProcess::start(&args, &envs)
    }

    fn envs(&self) -> Vec<(&str, &str)> {
        self.worker_envs
            .iter()
            .filter(|(k, _)| k != "KUBECONFIG")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn launch(&self) -> Result<String> {
        self.home.launch_shape("slow", &self.envs())
    }

    /// Moves the runs of `pending` that ended into `finished`, with their status.
    fn settle(
        &self,
        pending: &mut Vec<String>,
        finished: &mut BTreeMap<String, String>,
    ) -> Result<()> {
        let mut still = Vec::new();
        for run in pending.drain(..) {
            let status = self.home.run_status(&run)?;
            if matches!(status.as_str(), "SUCCESS" | "FAILURE" | "CANCELED") {
                finished.insert(run, status);
            } else {
                still.push(run);
            }
        }
        *pending = still;
        Ok(())
    }
}

#[test]
#[ignore = "a long soak, run by hand (see the module doc); not part of .ci/run"]
fn soak_runs_succeed_through_random_faults() -> Result<()> {
    let minutes: f64 = std::env::var("CELERIAC_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(30.0);
    let seed: u64 = std::env::var("CELERIAC_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(0x9e37_79b9)
        });
    eprintln!("soak: {minutes} min, seed {seed} (CELERIAC_SOAK_SEED reproduces the fault order)");
    let mut rng = Rng(seed.max(1));

    ensure_services();
    let rabbit = PrivateRabbit::start()?;
    let broker = rabbit.url();
    let ns = TestNamespace::create()?;
    let kubeconfig = ns.kubeconfig.display().to_string();
    let home = DagsterHome::create_coordinator(
        &broker,
        "rpc://",
        &[
            "--namespace",
            &ns.name,
            "--kubeconfig",
            &kubeconfig,
            "--image",
            "celeriac/dagster-step:test",
        ],
    )?;
    let queue = unique("soak");
    let fleet = Fleet {
        home,
        worker_args: [
            "-b",
            &broker,
            "--result-backend",
            "rpc://",
            "-Q",
            &queue,
            "-c",
            "8",
            "--launcher",
            "kubernetes",
        ]
        .map(String::from)
        .to_vec(),
        worker_envs: vec![
            ("KUBECONFIG".into(), kubeconfig.clone()),
            ("CELERIAC_QUEUE".into(), queue.clone()),
            ("SLEEP_SECONDS".into(), STEP_SLEEP.into()),
        ],
    };
    let mut worker = fleet.start_worker()?;
    let coordinator = CeleriacProcess::coordinator(
        &fleet.home.dir.join("dagster.yaml"),
        &broker,
        "rpc://",
        &unique("soak_replica"),
        &[],
    )?;
    let coordinator_pid = coordinator.pid().context("coordinator pid")?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(minutes * 60.0);
    let mut next_fault = started + Duration::from_secs(rng.between(45, 90));
    let mut next_sample = started;
    let mut runs: Vec<String> = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    let mut finished: BTreeMap<String, String> = BTreeMap::new();
    let mut faults: Vec<Value> = Vec::new();
    // Per worker process (it is restarted after each kill), and the coordinator's.
    let mut worker_rss: Vec<(i32, Vec<u64>)> = Vec::new();
    let mut coordinator_rss: Vec<u64> = Vec::new();
    let mut samples: Vec<Value> = Vec::new();

    while Instant::now() < deadline {
        let now = Instant::now();
        // Keep IN_FLIGHT runs going.
        fleet.settle(&mut pending, &mut finished)?;
        while pending.len() < IN_FLIGHT {
            let run = fleet.launch()?;
            runs.push(run.clone());
            pending.push(run);
        }
        if now >= next_sample {
            next_sample = now + Duration::from_secs(10);
            let t = started.elapsed().as_secs_f64();
            if let Some(pid) = worker.pid() {
                if let Some(kib) = rss_kib(pid) {
                    match worker_rss.last_mut() {
                        Some((p, s)) if *p == pid => s.push(kib),
                        _ => worker_rss.push((pid, vec![kib])),
                    }
                    samples.push(json!({"t": t, "process": "worker", "pid": pid, "rss_kib": kib}));
                }
            }
            if let Some(kib) = rss_kib(coordinator_pid) {
                coordinator_rss.push(kib);
                samples.push(json!({"t": t, "process": "coordinator", "rss_kib": kib}));
            }
        }
        if now >= next_fault {
            next_fault = now + Duration::from_secs(rng.between(45, 90));
            let kind = match rng.between(0, 2) {
                0 => FaultKind::KillWorker,
                1 => FaultKind::RestartBroker,
                _ => FaultKind::RestartApiServer,
            };
            let t = started.elapsed().as_secs_f64();
            eprintln!(
                "soak: {t:.0} s: {kind:?} ({} runs launched, {} finished)",
                runs.len(),
                finished.len()
            );
            match kind {
                FaultKind::KillWorker => {
                    worker.kill()?;
                    std::thread::sleep(Duration::from_secs(2));
                    worker = fleet.start_worker()?;
                }
                FaultKind::RestartBroker => rabbit.restart(Duration::from_secs(5))?,
                FaultKind::RestartApiServer => cluster().restart_apiserver()?,
            }
            faults.push(
                json!({"t": t, "fault": format!("{kind:?}"), "runs_in_flight": pending.len()}),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // Let the last runs end.
    let drain = Instant::now() + Duration::from_secs(300);
    while !pending.is_empty() {
        if Instant::now() > drain {
            bail!(
                "runs still not finished 5 min after the soak: {pending:?}\nworker:\n{}\ncoordinator:\n{}",
                worker.log_text(),
                coordinator.log_text()
            );
        }
        fleet.settle(&mut pending, &mut finished)?;
        std::thread::sleep(Duration::from_secs(1));
    }

    // Every run succeeded, each step submitted and run once.
    let mut problems = Vec::new();
    for run in &runs {
        let status = finished.get(run).map(String::as_str).unwrap_or("?");
        if status != "SUCCESS" {
            problems.push(format!("run {run}: {status}"));
            continue;
        }
        let summary = fleet.home.shape_summary(run)?;
        if let Err(e) = each_step_once(&summary, &STEPS) {
            problems.push(format!("run {run}: {e}"));
        }
    }
    let memory: Vec<Value> = worker_rss
        .iter()
        .filter_map(|(pid, s)| {
            flat(s).map(|(early, late, ok)| {
                json!({"process": "worker", "pid": pid, "samples": s.len(),
                       "early_kib": early, "late_kib": late, "flat": ok})
            })
        })
        .chain(flat(&coordinator_rss).map(|(early, late, ok)| {
            json!({"process": "coordinator", "samples": coordinator_rss.len(),
                   "early_kib": early, "late_kib": late, "flat": ok})
        }))
        .collect();
    for m in &memory {
        if m["flat"] != json!(true) {
            problems.push(format!("memory grew: {m}"));
        }
    }
    let report = json!({
        "minutes": minutes,
        "seed": seed,
        "runs": runs.len(),
        "succeeded": finished.values().filter(|s| *s == "SUCCESS").count(),
        "faults": faults,
        "memory": memory,
        "samples": samples,
        "problems": problems,
    });
    let out = artifacts_dir().join("soak.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "soak: {} runs, {} faults, memory {memory:?}; report {}",
        runs.len(),
        faults.len(),
        out.display()
    );
    assert!(
        !runs.is_empty() && !faults.is_empty(),
        "the soak ran runs through faults"
    );
    assert!(
        problems.is_empty(),
        "{}\nworker:\n{}",
        problems.join("\n"),
        worker.log_text()
    );
    Ok(())
}
