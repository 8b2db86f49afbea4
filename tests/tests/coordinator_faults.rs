//! The run coordinator under real-world conditions: Dagster's own launch path with run monitoring on,
//! termination mid-run, a replica killed mid-run (takeover), a broker restart mid-run, and bad input
//! (a plan with an unknown class, a malformed step result). Each against the real peers.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celeriac_tests::brokers::PrivateRabbit;
use celeriac_tests::dagster::{each_step_once, per_step_counts, DagsterHome};
use celeriac_tests::{ensure_services, peer, unique, CeleriacProcess, WorkerProcess};
use serde_json::{json, Value};
use tokio_postgres::Client;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
const REDIS: &str = "redis://127.0.0.1:6379/10";

/// A coordinator home with a worker consuming its queues.
struct Fleet {
    home: DagsterHome,
    worker: WorkerProcess,
    queue: String,
    db: Client,
    rt: tokio::runtime::Runtime,
}

impl Fleet {
    fn start(broker: &str, backend: &str, sleep: &str, home_args: &[&str]) -> Result<Fleet> {
        ensure_services();
        let home = DagsterHome::create_coordinator(broker, backend, home_args)?;
        let queue = unique("fq");
        let worker = WorkerProcess::start(
            &[
                "-b",
                broker,
                "--result-backend",
                backend,
                "-Q",
                &queue,
                "-c",
                "6",
            ],
            &[("CELERIAC_QUEUE", &queue), ("SLEEP_SECONDS", sleep)],
        )?;
        let rt = tokio::runtime::Runtime::new()?;
        let db = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(
                &format!("host=127.0.0.1 port=5432 user=postgres dbname={}", home.db),
                tokio_postgres::NoTls,
            )
            .await?;
            tokio::spawn(conn);
            anyhow::Ok(client)
        })?;
        Ok(Fleet {
            home,
            worker,
            queue,
            db,
            rt,
        })
    }

    fn envs<'a>(&'a self, sleep: &'a str) -> [(&'a str, &'a str); 2] {
        [
            ("CELERIAC_QUEUE", self.queue.as_str()),
            ("SLEEP_SECONDS", sleep),
        ]
    }

    fn coordinator(&self, broker: &str, backend: &str, extra: &[&str]) -> Result<CeleriacProcess> {
        CeleriacProcess::coordinator(
            &self.home.dir.join("dagster.yaml"),
            broker,
            backend,
            &unique("replica"),
            extra,
        )
    }

    /// Launches a shape through `instance.launch_run` and returns its run id at once.
    fn launch(&self, shape: &str, envs: &[(&str, &str)]) -> Result<String> {
        self.home.launch_shape(shape, envs)
    }

    fn summary(&self, run_id: &str) -> Result<Value> {
        self.home.shape_summary(run_id)
    }

    fn query<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        f: impl Fn(&tokio_postgres::Row) -> T,
    ) -> Result<Vec<T>> {
        let rows = self.rt.block_on(self.db.query(sql, params))?;
        Ok(rows.iter().map(f).collect())
    }

    fn status(&self, run_id: &str) -> Result<String> {
        Ok(self
            .query(
                "SELECT status FROM runs WHERE run_id = $1",
                &[&run_id],
                |r| r.get::<_, String>(0),
            )?
            .pop()
            .unwrap_or_default())
    }

    fn count_events(&self, run_id: &str, event_type: &str) -> Result<i64> {
        Ok(self
            .query(
                "SELECT count(*) FROM event_logs WHERE run_id = $1 AND dagster_event_type = $2",
                &[&run_id, &event_type],
                |r| r.get::<_, i64>(0),
            )?
            .pop()
            .unwrap_or(0))
    }

    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut ok: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        while !ok()? {
            if start.elapsed() > timeout {
                bail!("{what} did not happen within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn wait_finished(&self, run_id: &str, timeout: Duration) -> Result<String> {
        self.wait_for(&format!("run {run_id} finishing"), timeout, || {
            Ok(matches!(
                self.status(run_id)?.as_str(),
                "SUCCESS" | "FAILURE" | "CANCELED"
            ))
        })?;
        self.status(run_id)
    }

    fn owner(&self, run_id: &str) -> Result<Option<String>> {
        Ok(self
            .query(
                "SELECT owner FROM celeriac_coordinator_runs WHERE run_id = $1",
                &[&run_id],
                |r| r.get::<_, Option<String>>(0),
            )?
            .pop()
            .flatten())
    }
}

fn assert_each_step_once(summary: &Value, steps: &[&str]) {
    if let Err(e) = each_step_once(summary, steps) {
        panic!("{e}\n{summary:#}");
    }
}

const SLOW_STEPS: [&str; 3] = ["sl_a", "sl_b", "sl_join"];

#[test]
fn dagster_launch_path_with_run_monitoring_needs_no_run_worker() -> Result<()> {
    let fleet = Fleet::start(AMQP, "rpc://", "3", &[])?;
    let coordinator = fleet.coordinator(AMQP, "rpc://", &[])?;
    let envs = fleet.envs("3");
    // dagster-daemon with run monitoring (poll every 5 s, make_coordinator_home's dagster.yaml).
    let daemon_log =
        celeriac_tests::artifacts_dir().join(format!("{}.log", unique("dagster_daemon")));
    let mut daemon = std::process::Command::new(celeriac_tests::venv_bin().join("dagster-daemon"))
        .args(["run", "-w"])
        .arg(fleet.home.dir.join("workspace.yaml"))
        .env("DAGSTER_HOME", &fleet.home.dir)
        .env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
        .envs(envs)
        .stdout(std::fs::File::create(&daemon_log)?)
        .stderr(std::fs::File::create(daemon_log.with_extension("err"))?)
        .spawn()
        .context("starting dagster-daemon")?;
    // Dagster's own launch path: workspace, `_create_run`, `submit_run` → CeleriacRunLauncher.launch_run.
    let out = celeriac_tests::run_python(
        &[
            peer("launch_run.py").to_str().unwrap_or_default(),
            "--home",
            fleet.home.dir.to_str().unwrap_or_default(),
            "--workspace",
            fleet
                .home
                .dir
                .join("workspace.yaml")
                .to_str()
                .unwrap_or_default(),
            "--job",
            "slow",
            "--location",
            "plan_shapes",
            "--run-config",
            fleet
                .home
                .dir
                .join("run_config.yaml")
                .to_str()
                .unwrap_or_default(),
        ],
        &[
            ("DAGSTER_PG_PASSWORD", "unused-with-trust-auth"),
            envs[0],
            envs[1],
        ],
        Duration::from_secs(180),
    )?;
    let launched: Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
    let run_id = launched["run_id"]
        .as_str()
        .context("launched run id")?
        .to_string();
    let status = fleet.wait_finished(&run_id, Duration::from_secs(180))?;
    let _ = daemon.kill();
    let _ = daemon.wait();
    let summary = fleet.summary(&run_id)?;
    assert_eq!(
        status,
        "SUCCESS",
        "{summary:#}\ncoordinator:\n{}",
        coordinator.log_text()
    );
    assert_each_step_once(&summary, &SLOW_STEPS);
    let run_messages: Vec<&str> = summary["run_events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["message"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        !run_messages
            .iter()
            .any(|m| m.starts_with("Started process for run")),
        "no Python run-worker process: {run_messages:?}"
    );
    assert!(run_messages
        .iter()
        .any(|m| m.contains("Handed run to the celeriac coordinator")));
    // Run monitoring ran during the run and touched nothing.
    let daemon_text = std::fs::read_to_string(daemon_log.with_extension("err")).unwrap_or_default()
        + &std::fs::read_to_string(&daemon_log).unwrap_or_default();
    assert!(
        daemon_text.contains("MonitoringDaemon"),
        "run monitoring was running:\n{daemon_text}"
    );
    assert!(
        !run_messages
            .iter()
            .any(|m| m.contains("run worker") || m.contains("Detected run worker")),
        "run monitoring did not intervene: {run_messages:?}"
    );
    drop(coordinator);
    Ok(())
}

#[test]
fn termination_revokes_the_steps_and_cancels_within_5s() -> Result<()> {
    let fleet = Fleet::start(REDIS, REDIS, "30", &[])?;
    let coordinator = fleet.coordinator(REDIS, REDIS, &[])?;
    let run_id = fleet.launch("slow", &fleet.envs("30"))?;
    fleet.wait_for("the first steps starting", Duration::from_secs(120), || {
        Ok(fleet.count_events(&run_id, "STEP_START")? >= 2)
    })?;
    // Dagster's termination: CeleriacRunLauncher.terminate (RUN_CANCELING).
    fleet.home.run_shape_with(
        "-",
        "terminate",
        &["--run-id", &run_id],
        Duration::from_secs(60),
        &[],
    )?;
    let status = fleet.wait_finished(&run_id, Duration::from_secs(60))?;
    let times = fleet.query(
        "SELECT dagster_event_type, extract(epoch from timestamp)::float8 FROM event_logs
         WHERE run_id = $1 AND dagster_event_type IN ('PIPELINE_CANCELING', 'PIPELINE_CANCELED') ORDER BY id",
        &[&run_id],
        |r| (r.get::<_, String>(0), r.get::<_, f64>(1)),
    )?;
    let summary = fleet.summary(&run_id)?;
    assert_eq!(
        status,
        "CANCELED",
        "{summary:#}\ncoordinator:\n{}",
        coordinator.log_text()
    );
    let canceling = times
        .iter()
        .find(|(t, _)| t == "PIPELINE_CANCELING")
        .map(|x| x.1);
    let canceled = times
        .iter()
        .find(|(t, _)| t == "PIPELINE_CANCELED")
        .map(|x| x.1);
    let (Some(a), Some(b)) = (canceling, canceled) else {
        bail!("missing cancel events: {times:?}");
    };
    println!("RUN_CANCELING → RUN_CANCELED in {:.2} s", b - a);
    assert!(b - a <= 5.0, "canceled {:.2} s after CANCELING", b - a);
    // The running steps were stopped (revoke with terminate), nothing downstream was submitted.
    let counts = per_step_counts(&summary);
    assert!(counts.get("sl_join").is_none_or(|c| c.1 == 0), "{counts:?}");
    assert_eq!(
        fleet.count_events(&run_id, "STEP_SUCCESS")?,
        0,
        "{summary:#}"
    );
    drop(coordinator);
    Ok(())
}

#[test]
fn a_killed_replica_s_runs_are_taken_over_and_each_step_runs_once() -> Result<()> {
    let fleet = Fleet::start(AMQP, "rpc://", "8", &["--heartbeat-timeout", "60"])?;
    let lease = ["--lease-timeout", "6", "--heartbeat-interval", "1"];
    let mut a = fleet.coordinator(AMQP, "rpc://", &lease)?;
    let mut b = fleet.coordinator(AMQP, "rpc://", &lease)?;
    let runs = [
        fleet.launch("slow", &fleet.envs("8"))?,
        fleet.launch("slow", &fleet.envs("8"))?,
    ];
    for run in &runs {
        fleet.wait_for("the first wave running", Duration::from_secs(120), || {
            Ok(fleet.count_events(run, "STEP_START")? >= 2)
        })?;
    }
    let owner = fleet.owner(&runs[0])?.context("owner of the first run")?;
    let (victim, survivor) = if owner == a.hostname {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    victim.kill()?; // SIGKILL mid-step: no lease release, no clean-up
    let killed_at = Instant::now();
    for run in &runs {
        let status = fleet.wait_finished(run, Duration::from_secs(180))?;
        let summary = fleet.summary(run)?;
        assert_eq!(
            status,
            "SUCCESS",
            "{summary:#}\nsurvivor:\n{}",
            survivor.log_text()
        );
        assert_each_step_once(&summary, &SLOW_STEPS);
    }
    println!(
        "both runs succeeded {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(
        survivor.log_text().contains("taking the run over"),
        "the survivor took the run over:\n{}",
        survivor.log_text()
    );
    let resumed = fleet.query(
        "SELECT count(*) FROM event_logs WHERE run_id = $1 AND event LIKE '%resumed the run from%'",
        &[&runs[0]],
        |r| r.get::<_, i64>(0),
    )?;
    assert_eq!(resumed, vec![1], "one resume event on the taken-over run");
    Ok(())
}

#[test]
fn a_broker_restart_mid_run_does_not_fail_the_run() -> Result<()> {
    let rabbit = PrivateRabbit::start()?;
    let broker = rabbit.url();
    let fleet = Fleet::start(&broker, "rpc://", "6", &[])?;
    let coordinator = fleet.coordinator(&broker, "rpc://", &[])?;
    let run_id = fleet.launch("slow", &fleet.envs("6"))?;
    fleet.wait_for("the first steps starting", Duration::from_secs(120), || {
        Ok(fleet.count_events(&run_id, "STEP_START")? >= 2)
    })?;
    let consuming = |log: String| {
        log.lines()
            .filter(|l| l.contains("consuming") && !l.contains("stopped consuming"))
            .count()
    };
    let consuming_before = consuming(fleet.worker.log_text());
    rabbit.restart(Duration::from_secs(5))?;
    // The worker is consuming again within 10 s of the broker's return (reconnect backoff ≤ 5 s).
    let back = Instant::now();
    fleet.wait_for(
        "the worker consuming again",
        Duration::from_secs(10),
        || Ok(consuming(fleet.worker.log_text()) > consuming_before),
    )?;
    eprintln!(
        "worker consuming again {:?} after RabbitMQ's return",
        back.elapsed()
    );
    let status = fleet.wait_finished(&run_id, Duration::from_secs(180))?;
    let summary = fleet.summary(&run_id)?;
    assert_eq!(
        status,
        "SUCCESS",
        "{summary:#}\ncoordinator:\n{}\nworker:\n{}",
        coordinator.log_text(),
        fleet.worker.log_text()
    );
    assert_each_step_once(&summary, &SLOW_STEPS);
    Ok(())
}

#[test]
fn bad_input_fails_the_run_with_a_clear_message_and_others_go_on() -> Result<()> {
    let fleet = Fleet::start(AMQP, "rpc://", "0", &[])?;
    let coordinator = fleet.coordinator(AMQP, "rpc://", &[])?;
    let envs = fleet.envs("0");

    // (a) A plan with a class no Dagster has, handed over directly (Dagster itself could not load it;
    //     plans are stored by content, so this shape's plan is not used again below).
    let created =
        fleet
            .home
            .run_shape("fan_in_optional", "create", Duration::from_secs(60), &envs)?;
    let run_a = created["run_id"].as_str().context("run id")?.to_string();
    let snapshot_id = fleet
        .query(
            "SELECT run_body::json->>'execution_plan_snapshot_id' FROM runs WHERE run_id = $1",
            &[&run_a],
            |r| r.get::<_, String>(0),
        )?
        .pop()
        .context("snapshot id")?;
    let body: Vec<u8> = fleet
        .query(
            "SELECT snapshot_body FROM snapshots WHERE snapshot_id = $1",
            &[&snapshot_id],
            |r| r.get::<_, Vec<u8>>(0),
        )?
        .pop()
        .context("snapshot body")?;
    let text = celeriac_dagster::serdes::parse_zlib(&body)?.to_string();
    let renamed = text.replacen("\"FromStepOutput\"", "\"FromTheFuture\"", 1);
    assert_ne!(renamed, text);
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, renamed.as_bytes())?;
    let corrupted = enc.finish()?;
    fleet.rt.block_on(fleet.db.execute(
        "UPDATE snapshots SET snapshot_body = $2 WHERE snapshot_id = $1",
        &[&snapshot_id, &corrupted],
    ))?;
    fleet.rt.block_on(fleet.db.batch_execute(&format!(
        "INSERT INTO celeriac_coordinator_runs (run_id, handoff, created_at)
         VALUES ('{run_a}', '{}'::json, extract(epoch from clock_timestamp()));
         SELECT pg_notify('celeriac_coordinator', '{run_a}');",
        created["handoff"].to_string().replace('\'', "''")
    )))?;
    assert_eq!(
        fleet.wait_finished(&run_a, Duration::from_secs(60))?,
        "FAILURE"
    );
    let messages = fleet.query(
        "SELECT event FROM event_logs WHERE run_id = $1 AND event LIKE '%FromTheFuture%'",
        &[&run_a],
        |r| r.get::<_, String>(0),
    )?;
    assert!(
        messages
            .iter()
            .any(|m| m.contains(&run_a) && m.contains("steps[")),
        "the failure names the run, the class and where it sits: {messages:?}"
    );

    // (b) A malformed result for a step whose queue no worker consumes.
    let idle = unique("idle");
    let run_b = fleet.launch(
        "optional_skip",
        &[("CELERIAC_QUEUE", &idle), ("SLEEP_SECONDS", "0")],
    )?;
    fleet.wait_for("the first task recorded", Duration::from_secs(60), || {
        Ok(!fleet
            .query(
                "SELECT task_id FROM celeriac_coordinator_tasks WHERE run_id = $1",
                &[&run_b],
                |r| r.get::<_, String>(0),
            )?
            .is_empty())
    })?;
    let task_id = fleet
        .query(
            "SELECT task_id FROM celeriac_coordinator_tasks WHERE run_id = $1",
            &[&run_b],
            |r| r.get::<_, String>(0),
        )?
        .pop()
        .context("task id")?;
    let bad = json!({"status": "SUCCESS", "result": ["{\"__class__\": \"DagsterEvent\", \"event_type_value\": 5"],
                     "traceback": null, "children": [], "date_done": null, "task_id": task_id});
    fleet.rt.block_on(async {
        let conn = lapin::Connection::connect(AMQP, Default::default()).await?;
        let ch = conn.create_channel().await?;
        ch.basic_publish(
            "".into(),
            format!("celeriac.coordinator.{run_b}").as_str().into(),
            Default::default(),
            bad.to_string().as_bytes(),
            lapin::BasicProperties::default()
                .with_correlation_id(task_id.as_str().into())
                .with_content_type("application/json".into()),
        )
        .await?
        .await?;
        anyhow::Ok(())
    })?;
    assert_eq!(
        fleet.wait_finished(&run_b, Duration::from_secs(60))?,
        "FAILURE"
    );
    let failure = fleet.query(
        "SELECT event FROM event_logs WHERE run_id = $1 AND dagster_event_type = 'PIPELINE_FAILURE'",
        &[&run_b],
        |r| r.get::<_, String>(0),
    )?;
    assert!(
        failure
            .iter()
            .any(|m| m.contains("unreadable event") && m.contains("os_start")),
        "the failure explains the malformed result: {failure:?}"
    );

    // (c) The coordinator is alive and drives a healthy run to success.
    let run_c = fleet.launch("dynamic_collect", &envs)?;
    let status = fleet.wait_finished(&run_c, Duration::from_secs(180))?;
    assert_eq!(
        status,
        "SUCCESS",
        "coordinator:\n{}",
        coordinator.log_text()
    );
    Ok(())
}
