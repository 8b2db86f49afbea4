//! Scenario `coordinator`: many concurrent runs of a 10-step job driven by one `celeriac coordinator`,
//! and the same job driven by Python's run workers (`dagster api execute_run`) in the same run of the
//! load test, with the same celeriac workers, broker and database.
//!
//! Steps run the load-step program (real serialized events, no Python per step), so the figures are the
//! orchestrator's: memory, launch → first step published, step result → next step published.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::env::{self, Home, Proc};
use crate::procs::{self, Sampler};
use crate::{clock, probe};

/// Knobs of the scenario.
#[derive(Debug, Clone)]
pub struct Params {
    /// Runs handed to the coordinator.
    pub runs: usize,
    /// Hand-offs per second.
    pub rate: f64,
    /// Seconds each step sleeps.
    pub step_seconds: f64,
    /// Worker concurrency (`-c`).
    pub worker_concurrency: usize,
    /// Runs driven by Python run workers for comparison.
    pub python_runs: usize,
    /// The `nice` value of the worker and its step processes (`LOAD_FLEET_NICE`, default 0). In a
    /// cluster the steps run in pods on other nodes and the coordinator has a CPU request of its own;
    /// on this one machine they share its two cores, so a positive value gives the coordinator, the
    /// broker and PostgreSQL the CPU first, as separate nodes would. Reported with the figures.
    pub fleet_nice: i32,
}

/// `LOAD_FLEET_NICE`, when set to a number.
fn fleet_nice() -> Result<i32> {
    match std::env::var("LOAD_FLEET_NICE") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("LOAD_FLEET_NICE={v:?} is not a nice value")),
        Err(_) => Ok(0),
    }
}

impl Params {
    pub fn full() -> Result<Params> {
        Ok(Params {
            runs: 1000,
            rate: 50.0,
            step_seconds: 1.0,
            worker_concurrency: 400,
            python_runs: 4,
            fleet_nice: fleet_nice()?,
        })
    }
    pub fn quick() -> Result<Params> {
        Ok(Params {
            runs: 40,
            rate: 20.0,
            step_seconds: 0.2,
            worker_concurrency: 50,
            python_runs: 1,
            fleet_nice: fleet_nice()?,
        })
    }
}

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";
const TERMINAL: &[&str] = &["SUCCESS", "FAILURE", "CANCELED"];

/// Per-run latencies read back from the event log: hand-off (or process start) → first "Submitting"
/// event, and for the join step: the last leaf's "Retrieving logs" (written just before its result is
/// stored) → "Submitting" of the join.
async fn latencies(
    db: &tokio_postgres::Client,
    runs: &[String],
    started: &HashMap<String, f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let rows = db
        .query(
            "SELECT run_id, step_key, event::json->>'user_message',
                    (event::json->'dagster_event'->>'message'), extract(epoch from timestamp)::float8
             FROM event_logs WHERE run_id = ANY($1) AND dagster_event_type = 'ENGINE_EVENT'",
            &[&runs],
        )
        .await?;
    let mut first_submit: HashMap<String, f64> = HashMap::new();
    let mut join_submit: HashMap<String, f64> = HashMap::new();
    let mut last_leaf_result: HashMap<String, f64> = HashMap::new();
    for r in rows {
        let run: String = r.get(0);
        let step: Option<String> = r.get(1);
        let message: String = r.get::<_, Option<String>>(3).unwrap_or_default();
        let ts: f64 = r.get(4);
        let step = step.unwrap_or_default();
        if message.starts_with("Submitting celery task") {
            let e = first_submit.entry(run.clone()).or_insert(ts);
            *e = e.min(ts);
            if step == "join" {
                join_submit.insert(run.clone(), ts);
            }
        } else if message.contains("Retrieving logs") && step.starts_with("leaf_") {
            let e = last_leaf_result.entry(run.clone()).or_insert(ts);
            *e = e.max(ts);
        }
    }
    let launch: Vec<f64> = runs
        .iter()
        .filter_map(|r| Some(first_submit.get(r)? - started.get(r)?))
        .collect();
    let next: Vec<f64> = runs
        .iter()
        .filter_map(|r| Some(join_submit.get(r)? - last_leaf_result.get(r)?))
        .collect();
    Ok((launch, next))
}

async fn finished(db: &tokio_postgres::Client, runs: &[String]) -> Result<(usize, usize, usize)> {
    let rows = db
        .query(
            "SELECT status, count(*) FROM runs WHERE run_id = ANY($1) GROUP BY status",
            &[&runs],
        )
        .await?;
    let mut done = 0;
    let mut ok = 0;
    let mut started = 0;
    for r in rows {
        let status: String = r.get(0);
        let n = r.get::<_, i64>(1) as usize;
        if TERMINAL.contains(&status.as_str()) {
            done += n;
        }
        if status == "SUCCESS" {
            ok += n;
        }
        if status == "STARTED" {
            started += n;
        }
    }
    Ok((done, ok, started))
}

/// Runs the scenario; returns the figures as JSON.
pub async fn run(p: &Params) -> Result<Value> {
    env::ensure_services()?;
    let load_start = procs::load_average();
    let celeriac = env::celeriac_bin()?;
    let step_dir = env::load_step_path()?;
    let venv = env::venv()?;
    let queue = env::unique("load");
    let home = Home::create(BROKER, "rpc://", &["--heartbeat-timeout", "120"])?;
    let db = home.connect().await?;

    eprintln!(
        "loadtest coordinator: creating {} runs",
        p.runs + p.python_runs
    );
    let (all, handoff) = home.make_runs(
        "ten_steps",
        p.runs + p.python_runs,
        &[("LOAD_QUEUE", &queue)],
        Duration::from_secs(1800),
    )?;
    let (coord_runs, python_runs) = all.split_at(p.runs);

    let worker = start_worker(p, &celeriac, &step_dir, &venv, &queue)?;
    let c = Coordinated::drive(p, &celeriac, &home, &db, coord_runs, &handoff).await?;
    let py = PythonRuns::drive(&venv, &home, &db, python_runs, &handoff, &queue).await?;
    drop(worker);
    Ok(figures(p, load_start, &c, &py))
}

/// The celeriac worker every run's steps go to (process launcher, the load-step program as
/// `dagster`), ready.
fn start_worker(
    p: &Params,
    celeriac: &Path,
    step_dir: &Path,
    venv: &Path,
    queue: &str,
) -> Result<Proc> {
    let path = format!(
        "{}:{}:{}",
        step_dir.display(),
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let worker_port = probe::free_port()?;
    // `nice` is in coreutils; the step processes inherit the worker's priority.
    let mut worker_cmd = Command::new("nice");
    worker_cmd
        .args(["-n", &p.fleet_nice.to_string()])
        .arg(celeriac)
        .args([
            "worker",
            "-b",
            BROKER,
            "--result-backend",
            "rpc://",
            "-Q",
            queue,
        ])
        .args([
            "-c",
            &p.worker_concurrency.to_string(),
            "--launcher",
            "process",
        ])
        .args(["--http-addr", &format!("127.0.0.1:{worker_port}")])
        .env("PATH", &path)
        .env("LOAD_STEP_SECONDS", p.step_seconds.to_string())
        .env("DAGSTER_PG_PASSWORD", "unused")
        .env("RUST_LOG", "warn");
    let worker = Proc::spawn("load_worker", worker_cmd)?;
    probe::wait_ready(worker_port, Duration::from_secs(60)).context("worker /readyz")?;
    Ok(worker)
}

/// The `celeriac coordinator` on `home`'s instance with its metrics on `port`, ready.
fn start_coordinator(celeriac: &Path, home: &Home, port: u16) -> Result<Proc> {
    // LOAD_COORDINATOR_WRAP="valgrind --tool=dhat …" profiles the coordinator's heap.
    let wrap = std::env::var("LOAD_COORDINATOR_WRAP").unwrap_or_default();
    let mut wrap = wrap.split_whitespace();
    let mut coord_cmd = match wrap.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(wrap).arg(celeriac);
            c
        }
        None => Command::new(celeriac),
    };
    coord_cmd
        .arg("coordinator")
        .arg("--instance-config")
        .arg(home.dir.join("dagster.yaml"))
        .args([
            "-b",
            BROKER,
            "--result-backend",
            "rpc://",
            "--max-runs",
            "5000",
        ])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("DAGSTER_PG_PASSWORD", "unused")
        .env(
            "RUST_LOG",
            std::env::var("LOAD_COORDINATOR_LOG").unwrap_or_else(|_| "info".into()),
        );
    let mut coordinator = Proc::spawn("load_coordinator", coord_cmd)?;
    coordinator.wait_for_log("celeriac coordinator ready", Duration::from_secs(60))?;
    Ok(coordinator)
}

/// What was measured of the coordinator driving its runs.
struct Coordinated {
    ok: usize,
    elapsed: f64,
    peak_in_flight: usize,
    idle_rss: u64,
    peak_rss: u64,
    cpu: Duration,
    launch: Vec<f64>,
    next: Vec<f64>,
    /// Its `/metrics` once every run finished.
    metrics: String,
    rss_series: Vec<(f64, u64)>,
}

impl Coordinated {
    /// Starts the coordinator, hands it `runs` and measures it until they all finished.
    async fn drive(
        p: &Params,
        celeriac: &Path,
        home: &Home,
        db: &tokio_postgres::Client,
        runs: &[String],
        handoff: &Value,
    ) -> Result<Coordinated> {
        let port = probe::free_port()?;
        let coordinator = start_coordinator(celeriac, home, port)?;
        let cpid = coordinator.pid();
        std::thread::sleep(Duration::from_secs(1));
        let idle_rss = procs::rss(cpid);
        let cpu_before = procs::cpu_time(cpid);
        let rss_sampler = Sampler::start(Duration::from_millis(200), move || procs::rss(cpid));
        eprintln!(
            "loadtest coordinator: handing {} runs over at {}/s",
            p.runs, p.rate
        );
        let start = Instant::now();
        let launched = hand_over(p, db, runs, handoff, start).await?;
        let peak_in_flight = wait_finished(db, runs).await?;
        let elapsed = start.elapsed().as_secs_f64();
        let rss_series = rss_sampler.stop();
        let cpu = procs::cpu_time(cpid).saturating_sub(cpu_before);
        let metrics = probe::scrape(port);
        let (_, ok, _) = finished(db, runs).await?;
        let (launch, next) = latencies(db, runs, &launched).await?;
        let peak_rss = rss_series.iter().map(|s| s.1).max().unwrap_or(0);
        drop(coordinator);
        Ok(Coordinated {
            ok,
            elapsed,
            peak_in_flight,
            idle_rss,
            peak_rss,
            cpu,
            launch,
            next,
            metrics,
            rss_series,
        })
    }
}

/// Hands the runs over at the chosen rate from `start`, as CeleriacRunLauncher does (row + NOTIFY);
/// returns when each was handed over (the row's `created_at`).
async fn hand_over(
    p: &Params,
    db: &tokio_postgres::Client,
    runs: &[String],
    handoff: &Value,
    start: Instant,
) -> Result<HashMap<String, f64>> {
    let mut launched: HashMap<String, f64> = HashMap::new();
    for (i, run_id) in runs.iter().enumerate() {
        let due = start + Duration::from_secs_f64(i as f64 / p.rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let mut h = handoff.clone();
        h["run_id"] = json!(run_id);
        h["launched_at"] = json!(clock::now());
        let row = db
            .query_one(
                "INSERT INTO celeriac_coordinator_runs (run_id, handoff, created_at)
                 VALUES ($1, $2::text::json, extract(epoch from clock_timestamp())) RETURNING created_at",
                &[run_id, &h.to_string()],
            )
            .await?;
        launched.insert(run_id.clone(), row.get::<_, f64>(0));
        db.execute("SELECT pg_notify('celeriac_coordinator', $1)", &[run_id])
            .await?;
    }
    Ok(launched)
}

/// Waits (an hour at most) until every run finished; returns the most runs seen STARTED at once.
async fn wait_finished(db: &tokio_postgres::Client, runs: &[String]) -> Result<usize> {
    let mut peak_in_flight = 0;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let (done, _, started) = finished(db, runs).await?;
        peak_in_flight = peak_in_flight.max(started);
        if done == runs.len() {
            return Ok(peak_in_flight);
        }
        if Instant::now() > deadline {
            bail!(
                "coordinator runs did not finish within an hour ({done}/{} done)",
                runs.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What was measured of Python's run workers.
struct PythonRuns {
    ok: usize,
    /// Peak PSS and RSS of each run worker (its process tree for PSS).
    pss: Vec<f64>,
    rss: Vec<f64>,
    launch: Vec<f64>,
    next: Vec<f64>,
}

impl PythonRuns {
    /// Python's run workers, one process per run, driving the same job on the same fleet.
    async fn drive(
        venv: &Path,
        home: &Home,
        db: &tokio_postgres::Client,
        runs: &[String],
        handoff: &Value,
        queue: &str,
    ) -> Result<PythonRuns> {
        eprintln!(
            "loadtest coordinator: {} runs through Python's run worker",
            runs.len()
        );
        let mut py = Vec::new();
        let mut py_started: HashMap<String, f64> = HashMap::new();
        for run_id in runs {
            let args = json!({
                "__class__": "ExecuteRunArgs", "instance_ref": handoff["instance_ref"],
                "pipeline_origin": handoff["job_origin"], "pipeline_run_id": run_id,
                "set_exit_code_on_failure": null,
            });
            let mut cmd = Command::new(venv.join("bin/dagster"));
            cmd.args([
                "api",
                "execute_run",
                &celeriac_dagster::serdes::to_string(&args),
            ])
            .env("DAGSTER_HOME", &home.dir)
            .env("DAGSTER_PG_PASSWORD", "unused")
            .env("LOAD_QUEUE", queue);
            py_started.insert(run_id.clone(), clock::now());
            let proc = Proc::spawn("python_run_worker", cmd)?;
            let pid = proc.pid();
            py.push((
                proc,
                Sampler::start(Duration::from_millis(200), move || procs::tree_pss(pid)),
                Sampler::start(Duration::from_millis(200), move || procs::rss(pid)),
            ));
        }
        let py_deadline = Instant::now() + Duration::from_secs(1200);
        loop {
            let (done, _, _) = finished(db, runs).await?;
            if done == runs.len() || Instant::now() > py_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut pss = Vec::new();
        let mut rss = Vec::new();
        for (proc, pss_sampler, rss_sampler) in py {
            pss.push(pss_sampler.stop().iter().map(|s| s.1).max().unwrap_or(0) as f64);
            rss.push(rss_sampler.stop().iter().map(|s| s.1).max().unwrap_or(0) as f64);
            drop(proc);
        }
        let (_, ok, _) = finished(db, runs).await?;
        let (launch, next) = latencies(db, runs, &py_started).await?;
        Ok(PythonRuns {
            ok,
            pss,
            rss,
            launch,
            next,
        })
    }
}

/// The scenario's figures (`loadtest/results/coordinator.json`, rendered by `report`).
fn figures(p: &Params, load_start: f64, c: &Coordinated, py: &PythonRuns) -> Value {
    let per_run = if c.peak_in_flight > 0 {
        c.peak_rss.saturating_sub(c.idle_rss) as f64 / c.peak_in_flight as f64
    } else {
        f64::NAN
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let hist = |name: &str, q: f64| procs::histogram_quantile(&c.metrics, name, q);
    json!({
        "params": {"runs": p.runs, "rate": p.rate, "step_seconds": p.step_seconds,
                   "worker_concurrency": p.worker_concurrency, "python_runs": p.python_runs,
                   "steps_per_run": 10, "fleet_nice": p.fleet_nice,
                   "build": if cfg!(debug_assertions) { "debug" } else { "release" },
                   "load_average_1m": {"start": load_start, "end": procs::load_average()}},
        "celeriac": {
            "runs_succeeded": c.ok, "elapsed_s": c.elapsed, "peak_runs_in_flight": c.peak_in_flight,
            "idle_rss_bytes": c.idle_rss, "peak_rss_bytes": c.peak_rss, "rss_per_run_bytes": per_run,
            "cpu_s": c.cpu.as_secs_f64(), "cpu_ms_per_step": c.cpu.as_secs_f64() * 1000.0 / (p.runs * 10) as f64,
            "launch_to_first_step_p50_s": procs::quantile(&c.launch, 0.5),
            "launch_to_first_step_p99_s": procs::quantile(&c.launch, 0.99),
            "result_to_next_step_p50_s": procs::quantile(&c.next, 0.5),
            "result_to_next_step_p99_s": procs::quantile(&c.next, 0.99),
            "histogram_result_to_submit_p50_s": hist("celeriac_coordinator_result_to_submit_seconds", 0.5),
            "histogram_result_to_submit_p99_s": hist("celeriac_coordinator_result_to_submit_seconds", 0.99),
            "histogram_launch_to_first_submit_p99_s": hist("celeriac_coordinator_launch_to_first_submit_seconds", 0.99),
            "rss_series": c.rss_series.iter().step_by(5).map(|(t, v)| json!([t, v])).collect::<Vec<_>>(),
        },
        "python": {
            "runs_succeeded": py.ok,
            "run_worker_pss_bytes_mean": mean(&py.pss), "run_worker_rss_bytes_mean": mean(&py.rss),
            "launch_to_first_step_p50_s": procs::quantile(&py.launch, 0.5),
            "launch_to_first_step_max_s": procs::quantile(&py.launch, 1.0),
            "result_to_next_step_p50_s": procs::quantile(&py.next, 0.5),
            "result_to_next_step_max_s": procs::quantile(&py.next, 1.0),
        },
    })
}
