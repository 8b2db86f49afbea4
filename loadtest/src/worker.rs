//! Scenario `worker`: the same `execute_step_k8s_job` load through one celeriac worker (release build,
//! Kubernetes launcher) and through Python's `dagster-celery-k8s` worker, in one run, on the same
//! RabbitMQ, Redis result backend, Postgres instance and Kubernetes 1.20 test cluster.
//!
//! The tasks are built with `celeriac_dagster::submission` from the hand-off `CeleriacRunLauncher`
//! computes (the exact kwargs Dagster's executor publishes), published by this program, and their step
//! Jobs run the load-step program (`celeriac-load-step` as `dagster` first on the container's PATH:
//! sleeps, prints valid serialized events, notes when it exited). Each side has its own namespace
//! and Kubernetes identity, so the API server's audit log tells their requests apart.
//!
//! Figures per side: PSS of the whole worker side (all its processes) against steps in flight, with
//! slope and intercept; publish → Job created (audit log) and step exited → result stored (result
//! `date_done`) p50/p99; API requests per step; start-up (process start → consuming). No step may
//! be lost or run twice.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celeriac_dagster::plan::snapshot::{OutputSnap, StepHandle, StepKind, StepSnap as Step};
use celeriac_dagster::plan::KnownState;
use celeriac_dagster::submission::{self, Handoff};
use celeriac_wire::broker::amqp::AmqpBroker;
use celeriac_wire::broker::{Broker, QueueSpec};
use celeriac_wire::task::TaskMessage;
use serde_json::{json, Value};

use crate::env::{self, Home, Proc};
use crate::procs;

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672//";
/// Results go to Redis on both sides: `date_done` of every result can be read back afterwards.
const BACKEND: &str = "redis://127.0.0.1:6379/11";
const RUN_DIR: &str = "/tmp/celeriac-k8s";
/// Kubernetes identities of the two sides (`celeriac-worker-<n>` of the test cluster).
const CELERIAC_USER: u8 = 8;
const PYTHON_USER: u8 = 9;

/// Knobs of the scenario.
#[derive(Debug, Clone)]
pub struct Params {
    /// Steps in flight at which celeriac's memory is measured (one batch each).
    pub celeriac_levels: Vec<usize>,
    /// Python worker concurrencies (`-c`), each run with that many steps in flight.
    pub python_levels: Vec<usize>,
    /// Longest a step is held (each batch's steps run until the scenario has measured the batch in
    /// flight and releases them; this only bounds a step the scenario forgot).
    pub step_seconds: f64,
    /// celeriac's `-c`.
    pub celeriac_concurrency: usize,
}

impl Params {
    pub fn full() -> Params {
        Params {
            celeriac_levels: vec![10, 100, 1000, 3000],
            python_levels: vec![2, 8, 32],
            step_seconds: 1800.0,
            celeriac_concurrency: 12000,
        }
    }
    pub fn quick() -> Params {
        Params {
            celeriac_levels: vec![10, 100],
            python_levels: vec![1, 2],
            step_seconds: 300.0,
            celeriac_concurrency: 200,
        }
    }
}

/// One published step.
#[derive(Debug, Clone)]
struct Sent {
    task_id: String,
    step_key: String,
    job_name: String,
    published_at: f64,
}

/// The cluster, started as the tests start it (idempotent; shared with whoever else uses it).
fn cluster_up(bin_dir: &Path, venv: &Path) -> Result<()> {
    let root = env::repo_root();
    let status = Command::new("bash")
        .arg(root.join("scripts/k8s-cluster.sh"))
        .arg("up")
        .env("CELERIAC_KUBELET_BIN", bin_dir.join("celeriac-kubelet"))
        .env("CELERIAC_VENV", venv)
        .env("CELERIAC_K8S_RUN", RUN_DIR)
        .env(
            "CELERIAC_IMAGE_PATHS",
            format!(
                "celeriac/dagster-step={} celeriac/celeriac={} celeriac/load-step={}",
                venv.join("bin").display(),
                bin_dir.display(),
                root.join("tests/peers/load-step").display()
            ),
        )
        .status()
        .context("running scripts/k8s-cluster.sh up")?;
    if !status.success() {
        bail!("the Kubernetes test cluster could not start (logs in {RUN_DIR}/logs)");
    }
    Ok(())
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(Path::new(RUN_DIR).join("kubeconfig"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("kubectl")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A namespace for one side: the Postgres Secret its step Jobs reference and a Role for `user`
/// (celeriac: its documented least-privilege Role; Python also reads `jobs/status`). Deleted on drop.
struct Namespace {
    name: String,
    user: String,
    kubeconfig: PathBuf,
}

impl Namespace {
    fn create(side: &str, n: u8) -> Result<Namespace> {
        let name = env::unique(&format!("load-{side}")).replace('_', "-");
        let user = format!("celeriac-worker-{n}");
        let mut role = celeriac_dagster::kubernetes::access::role("load-worker", &name);
        if side == "python" {
            role["rules"] = json!([
                {"apiGroups": ["batch"], "resources": ["jobs", "jobs/status"], "verbs": ["*"]},
                {"apiGroups": [""], "resources": ["pods", "pods/log", "pods/status"], "verbs": ["*"]},
            ]);
        }
        let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dagster-postgresql-secret", "namespace": name},
             "stringData": {"postgresql-password": "unused-with-trust-auth"}},
            role,
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "load-worker", "namespace": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "load-worker"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]},
        ]});
        kubectl(&["create", "-f", "-"], Some(&objects.to_string()))?;
        Ok(Namespace {
            name,
            user,
            kubeconfig: Path::new(RUN_DIR).join(format!("kubeconfig-celeriac-worker-{n}")),
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

/// One audit-log entry (ResponseComplete stage) of a worker identity.
#[derive(Debug, Clone)]
struct Audit {
    verb: String,
    resource: String,
    name: String,
    /// The request URI (with its query: a list naming one Job is per step, not a shared watch).
    uri: String,
    at: f64,
}

impl Audit {
    /// A LIST or WATCH of all step Jobs or pods of the namespace (shared by every step), as opposed
    /// to one that selects a single Job's objects (`job-name=…`, `metadata.name=…`).
    fn shared(&self) -> bool {
        (self.verb == "list" || self.verb == "watch")
            && !self.uri.contains("job-name%3D")
            && !self.uri.contains("job-name=")
            && !self.uri.contains("metadata.name")
    }
}

fn audit_log() -> PathBuf {
    Path::new(RUN_DIR).join("logs/audit.log")
}

fn audit_mark() -> u64 {
    std::fs::metadata(audit_log()).map_or(0, |m| m.len())
}

fn parse_time(s: &str) -> Option<f64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros() as f64 / 1e6);
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_micros() as f64 / 1e6)
}

/// Requests of `user` in `namespace` since `mark` (one entry per request; a watch counts once).
fn audit_since(mark: u64, user: &str, namespace: &str) -> Vec<Audit> {
    use std::io::{BufRead, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(audit_log()) else {
        return Vec::new();
    };
    if f.seek(SeekFrom::Start(mark)).is_err() {
        return Vec::new();
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default();
        if s("/user/username") != user || s("/objectRef/namespace") != namespace {
            continue;
        }
        if !seen.insert(s("/auditID").to_string()) {
            continue;
        }
        let resource = match s("/objectRef/subresource") {
            "" => s("/objectRef/resource").to_string(),
            sub => format!("{}/{sub}", s("/objectRef/resource")),
        };
        out.push(Audit {
            verb: s("/verb").to_string(),
            resource,
            name: s("/objectRef/name").to_string(),
            uri: s("/requestURI").to_string(),
            at: parse_time(s("/stageTimestamp")).unwrap_or(f64::NAN),
        });
    }
    out
}

/// The hand-off of one STARTED run of the load job whose steps run in `ns` as the load-step program.
fn load_handoff(run_id: &str, base: &Value, ns: &Namespace) -> Result<Handoff> {
    let mut h = base.clone();
    h["run_id"] = json!(run_id);
    h["job_namespace"] = json!(ns.name);
    h["kubeconfig_file"] = json!(ns.kubeconfig.display().to_string());
    h["load_incluster_config"] = json!(false);
    h["job_config_dict"]["job_image"] = json!("celeriac/load-step:test");
    Handoff::decode(&h).context("decoding the hand-off")
}

/// A step of the load job as the execution plan holds it: `step_key`, with the op tags Dagster's
/// executor reads (`dagster-celery/queue`, and `dagster-k8s/config` giving the step container its
/// program, its sleep and where it notes that it exited).
fn load_step(step_key: &str, queue: &str, container_env: &Value) -> Step {
    let mut tags = BTreeMap::new();
    tags.insert(submission::QUEUE_TAG.to_string(), queue.to_string());
    tags.insert(
        submission::USER_DEFINED_K8S_CONFIG_TAG.to_string(),
        json!({"container_config": {"env": container_env}}).to_string(),
    );
    Step {
        key: step_key.to_string(),
        kind: StepKind::Compute,
        handle: StepHandle::Plain {
            node: step_key.to_string(),
            key: step_key.to_string(),
        },
        inputs: vec![],
        outputs: vec![OutputSnap {
            name: "result".into(),
            is_required: true,
            is_dynamic: false,
            is_asset_check: false,
        }],
        tags,
        pool: None,
    }
}

/// Publishes `count` steps of `handoff` to `queue`, as fast as the broker takes them. Each task is
/// what Dagster's executor publishes for the step (`submission::step_task`: queue, priority, the
/// eight kwargs), wrapped as the coordinator wraps it.
async fn publish(
    broker: &AmqpBroker,
    queue: &str,
    handoff: &Handoff,
    prefix: &str,
    count: usize,
    container_env: &Value,
) -> Result<Vec<Sent>> {
    broker.declare(&QueueSpec::dagster(queue)).await?;
    let known = KnownState::default();
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        let step_key = format!("{prefix}_{i}");
        let step = load_step(&step_key, queue, container_env);
        let task = submission::step_task(handoff, 0, &step, &known)
            .with_context(|| format!("building the task of step {step_key}"))?;
        anyhow::ensure!(
            task.queue == queue,
            "step {step_key} routed to {}",
            task.queue
        );
        let id = uuid::Uuid::new_v4().to_string();
        let message = TaskMessage {
            id: id.clone(),
            task: celeriac_dagster::step::task::TASK_NAME.into(),
            args: vec![],
            argsrepr: celeriac_wire::saferepr::argsrepr(&[]),
            kwargsrepr: celeriac_wire::saferepr::kwargsrepr(&task.kwargs),
            kwargs: task.kwargs,
            origin: format!("{}@loadtest", std::process::id()),
            reply_to: None,
            priority: Some(task.priority),
            root_id: None,
            parent_id: None,
        };
        let published_at = crate::now();
        broker
            .publish("", &task.queue, message.to_outgoing())
            .await?;
        sent.push(Sent {
            task_id: id,
            job_name: celeriac_dagster::step::command::job_name(&handoff.run_id, &step_key, 0),
            step_key,
            published_at,
        });
    }
    Ok(sent)
}

/// `date_done` and status of each task's stored result (`None`: no result).
fn results(ids: &[String]) -> Result<HashMap<String, (String, f64)>> {
    let client = redis::Client::open(BACKEND)?;
    let mut con = client.get_connection()?;
    let mut out = HashMap::new();
    for chunk in ids.chunks(500) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|id| format!("celery-task-meta-{id}"))
            .collect();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut con)?;
        for (id, v) in chunk.iter().zip(values) {
            let Some(v) = v else { continue };
            let meta: Value = serde_json::from_str(&v).unwrap_or(Value::Null);
            let status = meta["status"].as_str().unwrap_or_default().to_string();
            let done = meta["date_done"]
                .as_str()
                .and_then(parse_time)
                .unwrap_or(f64::NAN);
            out.insert(id.clone(), (status, done));
        }
    }
    Ok(out)
}

/// How many of `sent` have a result stored (success or failure: a failed step is finished too, and
/// reported as such afterwards).
fn stored_counter(sent: &[Sent]) -> impl Fn() -> usize {
    let ids: Vec<String> = sent.iter().map(|s| s.task_id.clone()).collect();
    move || results(&ids).map_or(0, |r| r.len())
}

/// When each step program exited (`LOAD_STEP_DONE_FILE`), by step key; also how often each ran.
fn step_exits(path: &Path) -> (HashMap<String, f64>, HashMap<String, usize>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut at = HashMap::new();
    let mut runs: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(_run), Some(step), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        *runs.entry(step.to_string()).or_default() += 1;
        if let Ok(t) = t.parse::<f64>() {
            at.insert(step.to_string(), t);
        }
    }
    (at, runs)
}

/// One batch (level) of one side, measured.
#[derive(Debug, Clone, Default)]
struct Level {
    /// Steps published.
    n: usize,
    /// Steps in flight when memory was measured (all of them, unless some never got a Job).
    in_flight: usize,
    pss: f64,
    rss: f64,
    /// Steps published per second (as fast as RabbitMQ confirms them).
    publish_per_s: f64,
    /// Release of the held steps → every result stored.
    drain_s: f64,
    load_average: f64,
    /// Index range of this batch in the side's `sent`.
    sent: std::ops::Range<usize>,
}

/// Everything measured of one side.
#[derive(Default)]
struct Side {
    levels: Vec<Level>,
    idle_pss: f64,
    idle_rss: f64,
    after_rss: Vec<f64>,
    sent: Vec<Sent>,
    startup_s: Vec<f64>,
    cpu_s: f64,
    audit: Vec<Audit>,
}

/// Counts lines of a log matching `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Linear fit y = a + b·x (least squares): (intercept, slope).
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if points.len() < 2 {
        return (f64::NAN, f64::NAN);
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let b = sxy / sxx;
    (my - b * mx, b)
}

/// What a batch is measured with.
struct Batch<'a> {
    /// The worker side's root process.
    pid: u32,
    n: usize,
    /// Created to let the held steps finish.
    release: &'a Path,
    /// Steps the worker holds now (from its log).
    in_flight: &'a dyn Fn() -> usize,
    /// Steps of the batch with a result stored.
    finished: &'a dyn Fn() -> usize,
    progress: String,
}

impl Batch<'_> {
    fn show(&self, f: usize, done: usize, phase: &str) {
        eprint!(
            "\r{}: {f:>6} in flight, {done:>6}/{} done, PSS {:>7.1} MB, {phase}      ",
            self.progress,
            self.n,
            procs::tree_pss(self.pid) as f64 / 1e6
        );
    }

    /// Waits until every step of the batch is in flight (or their number stopped growing for a
    /// minute), measures the worker side's PSS there, releases the steps and waits for every result.
    fn measure(&self, mut level: Level) -> Result<Level> {
        let start = Instant::now();
        let (mut best, mut grew_at) = (0usize, Instant::now());
        let mut last_print = Instant::now() - Duration::from_secs(10);
        let hold_limit = Duration::from_secs_f64(300.0 + self.n as f64 / 5.0);
        loop {
            let f = (self.in_flight)();
            if f > best {
                (best, grew_at) = (f, Instant::now());
            }
            if last_print.elapsed() > Duration::from_secs(2) {
                self.show(f, (self.finished)(), "taking up");
                last_print = Instant::now();
            }
            if f >= self.n || grew_at.elapsed() > Duration::from_secs(60) {
                break;
            }
            if start.elapsed() > hold_limit {
                bail!(
                    "{}: only {best} of {} steps in flight after {hold_limit:?}",
                    self.progress,
                    self.n
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // A few samples at the plateau: PSS moves while the batch settles.
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(500));
            let f = (self.in_flight)();
            let pss = procs::tree_pss(self.pid) as f64;
            if pss > level.pss {
                level.pss = pss;
                level.rss = procs::tree(self.pid)
                    .into_iter()
                    .map(procs::rss)
                    .sum::<u64>() as f64;
            }
            level.in_flight = level.in_flight.max(f);
        }
        level.load_average = procs::load_average();
        std::fs::write(self.release, b"")?;
        let released = Instant::now();
        let drain_limit = Duration::from_secs_f64(300.0 + self.n as f64 / 10.0);
        loop {
            let done = (self.finished)();
            if last_print.elapsed() > Duration::from_secs(2) {
                self.show((self.in_flight)(), done, "released");
                last_print = Instant::now();
            }
            if done >= self.n {
                eprintln!();
                level.drain_s = released.elapsed().as_secs_f64();
                return Ok(level);
            }
            if released.elapsed() > drain_limit {
                bail!(
                    "{}: only {done} of {} steps finished within {drain_limit:?} of their release",
                    self.progress,
                    self.n
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn container_env(step_dir: &Path, seconds: f64, done_file: &Path, release: &Path) -> Value {
    json!([
        {"name": "PATH", "value": format!("{}:/usr/local/bin:/usr/bin:/bin", step_dir.display())},
        {"name": "LOAD_STEP_SECONDS", "value": seconds.to_string()},
        {"name": "LOAD_STEP_RELEASE_FILE", "value": release.display().to_string()},
        {"name": "LOAD_STEP_DONE_FILE", "value": done_file.display().to_string()},
    ])
}

/// Runs the scenario; returns the figures as JSON.
pub async fn run(p: &Params) -> Result<Value> {
    env::ensure_services()?;
    let load_start = procs::load_average();
    let celeriac = env::celeriac_bin()?;
    let bin_dir = celeriac.parent().context("binary directory")?.to_path_buf();
    let build = if bin_dir.ends_with("release") {
        "release"
    } else {
        "debug"
    };
    // `celeriac_bin` built every workspace binary, the process kubelet with them.
    anyhow::ensure!(
        bin_dir.join("celeriac-kubelet").exists(),
        "{} has no celeriac-kubelet",
        bin_dir.display()
    );
    let venv = env::venv()?;
    cluster_up(&bin_dir, &venv)?;
    let step_dir = env::load_step_path()?;
    let home = {
        let db = env::unique("celeriac_load").to_lowercase();
        let dir = env::work_dir().join(&db);
        std::fs::create_dir_all(&dir)?;
        env::python(
            &[
                env::repo_root()
                    .join("tests/peers/make_coordinator_home.py")
                    .to_str()
                    .unwrap_or_default(),
                dir.to_str().unwrap_or_default(),
                "--db",
                &db,
                "--broker",
                BROKER,
                "--backend",
                BACKEND,
                "--image",
                "celeriac/load-step:test",
            ],
            &[],
            Duration::from_secs(120),
        )?;
        Home { dir, db }
    };
    let db = home.connect().await?;
    let made = env::python(
        &[
            env::repo_root()
                .join("loadtest/peers/make_runs.py")
                .to_str()
                .unwrap_or_default(),
            "--home",
            home.dir.to_str().unwrap_or_default(),
            "--job",
            "ten_steps",
            "--count",
            "2",
        ],
        &[],
        Duration::from_secs(600),
    )?;
    let made: Value = serde_json::from_str(made.lines().last().unwrap_or_default())?;
    let runs: Vec<String> = made["run_ids"]
        .as_array()
        .context("run ids")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(runs.len() == 2, "make_runs.py made {} runs", runs.len());
    // Both workers check that the run is STARTED before they launch a step (and while it runs).
    db.execute(
        "UPDATE runs SET status = 'STARTED' WHERE run_id = ANY($1)",
        &[&runs],
    )
    .await?;
    let broker = AmqpBroker::connect(BROKER).await?;
    let work = env::work_dir().join(env::unique("worker"));
    std::fs::create_dir_all(&work)?;

    // --- celeriac ---
    let ns = Namespace::create("celeriac", CELERIAC_USER)?;
    let handoff = load_handoff(&runs[0], &made["handoff"], &ns)?;
    let queue = env::unique("load_celeriac");
    let done_file = work.join("celeriac-steps.txt");
    let mark = audit_mark();
    let mut c = Side::default();
    let http_port = crate::coordinator::free_port()?;
    let spawned = Instant::now();
    let mut cmd = Command::new(&celeriac);
    cmd.args([
        "worker",
        "-b",
        BROKER,
        "--result-backend",
        BACKEND,
        "-Q",
        &queue,
        "-c",
        &p.celeriac_concurrency.to_string(),
        "--launcher",
        "kubernetes",
        "--http-addr",
        &format!("127.0.0.1:{http_port}"),
    ])
    .env("KUBECONFIG", &ns.kubeconfig)
    .env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
    .env("RUST_LOG", "info");
    let mut worker = Proc::spawn("load_celeriac_worker", cmd)?;
    worker.wait_for_log("consuming", Duration::from_secs(60))?;
    c.startup_s.push(spawned.elapsed().as_secs_f64());
    let pid = worker.pid();
    std::thread::sleep(Duration::from_secs(2));
    c.idle_pss = procs::tree_pss(pid) as f64;
    c.idle_rss = procs::rss(pid) as f64;
    let cpu_before = procs::cpu_time(pid);
    for (i, &n) in p.celeriac_levels.iter().enumerate() {
        let release = work.join(format!("release-celeriac-{i}"));
        let cenv = container_env(&step_dir, p.step_seconds, &done_file, &release);
        let published = Instant::now();
        let sent = publish(&broker, &queue, &handoff, &format!("c{i}"), n, &cenv).await?;
        let publish_per_s = n as f64 / published.elapsed().as_secs_f64();
        let log = worker.log.clone();
        let in_flight = move || {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            count(&t, "step Job running").saturating_sub(count(&t, "step finished"))
        };
        let finished = stored_counter(&sent);
        let level = Batch {
            pid,
            n,
            release: &release,
            in_flight: &in_flight,
            finished: &finished,
            progress: format!("celeriac {n:>5}"),
        }
        .measure(Level {
            n,
            publish_per_s,
            sent: c.sent.len()..c.sent.len() + n,
            ..Level::default()
        })?;
        c.levels.push(level);
        c.sent.extend(sent);
        std::thread::sleep(Duration::from_secs(15));
        c.after_rss.push(procs::rss(pid) as f64);
    }
    c.cpu_s = procs::cpu_time(pid)
        .saturating_sub(cpu_before)
        .as_secs_f64();
    // The worker's own view of "Job complete → result": its histogram from the Job turning terminal
    // (watch event) to the step's events being ready for the result.
    let scrape =
        crate::coordinator::scrape(http_port).replace(&format!("namespace=\"{}\",", ns.name), "");
    let job_to_result = [0.5, 0.99].map(|q| {
        procs::histogram_quantile(&scrape, "celeriac_step_job_result_latency_seconds", q)
            .unwrap_or(f64::NAN)
    });
    drop(worker);
    c.audit = audit_since(mark, &ns.user, &ns.name);

    // --- Python ---
    let pns = Namespace::create("python", PYTHON_USER)?;
    let phandoff = load_handoff(&runs[1], &made["handoff"], &pns)?;
    let pqueue = env::unique("load_python");
    let pdone_file = work.join("python-steps.txt");
    let pmark = audit_mark();
    let mut py = Side::default();
    for (i, &conc) in p.python_levels.iter().enumerate() {
        let spawned = Instant::now();
        let mut cmd = Command::new(venv.join("bin/celery"));
        // As `dagster-celery worker start` runs it (broker and backend are options of `celery`
        // itself, not of its `worker` command).
        cmd.args(["-A", "dagster_celery_k8s.app", "-b", BROKER])
            .args(["--result-backend", BACKEND, "worker", "-Q", &pqueue])
            .args(["-c", &conc.to_string(), "--prefetch-multiplier=1"])
            .args(["-l", "info", "-n", &format!("{}@load", env::unique("py"))])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")
            .env("KUBECONFIG", &pns.kubeconfig)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    venv.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            );
        let mut w = Proc::spawn("load_python_worker", cmd)?;
        w.wait_for_log(" ready.", Duration::from_secs(180))?;
        py.startup_s.push(spawned.elapsed().as_secs_f64());
        let pid = w.pid();
        std::thread::sleep(Duration::from_secs(2));
        if i == 0 {
            py.idle_pss = procs::tree_pss(pid) as f64;
            py.idle_rss = procs::rss(pid) as f64;
        }
        let cpu_before: Duration = procs::tree(pid).into_iter().map(procs::cpu_time).sum();
        let release = work.join(format!("release-python-{i}"));
        let penv = container_env(&step_dir, p.step_seconds, &pdone_file, &release);
        let published = Instant::now();
        let sent = publish(&broker, &pqueue, &phandoff, &format!("p{i}"), conc, &penv).await?;
        let publish_per_s = conc as f64 / published.elapsed().as_secs_f64();
        let log = w.log.clone();
        // celery logs `Task execute_step_k8s_job[<id>] received`, then `… succeeded in <s>s: …` or
        // `… raised unexpected: …`.
        let in_flight = move || {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            count(&t, "] received")
                .saturating_sub(count(&t, "] succeeded in") + count(&t, "] raised unexpected"))
        };
        let finished = stored_counter(&sent);
        let level = Batch {
            pid,
            n: conc,
            release: &release,
            in_flight: &in_flight,
            finished: &finished,
            progress: format!("python -c {conc:>3}"),
        }
        .measure(Level {
            n: conc,
            publish_per_s,
            sent: py.sent.len()..py.sent.len() + conc,
            ..Level::default()
        })?;
        py.levels.push(level);
        py.cpu_s += procs::tree(pid)
            .into_iter()
            .map(procs::cpu_time)
            .sum::<Duration>()
            .saturating_sub(cpu_before)
            .as_secs_f64();
        py.sent.extend(sent);
        drop(w);
    }
    py.audit = audit_since(pmark, &pns.user, &pns.name);
    // Python leaves its step Jobs in place: when each turned Complete (whole seconds in 1.20).
    let completed: HashMap<String, f64> = serde_json::from_str::<Value>(&kubectl(
        &["get", "jobs", "-n", &pns.name, "-o", "json"],
        None,
    )?)?["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| {
            Some((
                j.pointer("/metadata/name")?.as_str()?.to_string(),
                parse_time(j.pointer("/status/completionTime")?.as_str()?)?,
            ))
        })
        .collect();

    // --- figures ---
    let mut out = json!({
        "params": {"celeriac_levels": p.celeriac_levels, "python_levels": p.python_levels,
                   "step_seconds_max": p.step_seconds, "celeriac_concurrency": p.celeriac_concurrency,
                   "broker": "amqp", "backend": "redis", "build": build,
                   "load_average_1m": {"start": load_start, "end": procs::load_average()}},
    });
    let mut problems = Vec::new();
    for (name, side, done_file) in [("celeriac", &c, &done_file), ("python", &py, &pdone_file)] {
        let ids: Vec<String> = side.sent.iter().map(|s| s.task_id.clone()).collect();
        let stored = results(&ids)?;
        let (exits, runs_of) = step_exits(done_file);
        let ok = stored.values().filter(|(s, _)| s == "SUCCESS").count();
        let lost = side.sent.len() - stored.len();
        let twice = runs_of.values().filter(|&&n| n > 1).count();
        let never = side
            .sent
            .iter()
            .filter(|s| !runs_of.contains_key(&s.step_key))
            .count();
        if lost > 0 || never > 0 {
            problems.push(format!(
                "{name}: {lost} of {} steps have no result, {never} never ran",
                side.sent.len()
            ));
        }
        if twice > 0 {
            problems.push(format!("{name}: {twice} steps ran more than once"));
        }
        let creates: HashMap<&str, f64> = side
            .audit
            .iter()
            .filter(|a| a.verb == "create" && a.resource == "jobs")
            .map(|a| (a.name.as_str(), a.at))
            .collect();
        let dispatch = |sent: &[Sent]| -> Vec<f64> {
            sent.iter()
                .filter_map(|s| Some(creates.get(s.job_name.as_str())? - s.published_at))
                .collect()
        };
        let result = |sent: &[Sent]| -> Vec<f64> {
            sent.iter()
                .filter_map(|s| {
                    let (_, done) = stored.get(&s.task_id)?;
                    Some(done - exits.get(&s.step_key)?)
                })
                .filter(|d| d.is_finite())
                .collect()
        };
        let all_dispatch = dispatch(&side.sent);
        let all_result = result(&side.sent);
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for a in &side.audit {
            *by_kind
                .entry(format!("{} {}", a.verb, a.resource))
                .or_default() += 1;
        }
        let shared = side.audit.iter().filter(|a| a.shared()).count();
        let steps = side.sent.len().max(1) as f64;
        // Step runtime: Job created → step program exited, summed.
        let runtime: f64 = side
            .sent
            .iter()
            .filter_map(|s| Some(exits.get(&s.step_key)? - creates.get(s.job_name.as_str())?))
            .filter(|d| d.is_finite() && *d > 0.0)
            .sum();
        let points: Vec<(f64, f64)> = side
            .levels
            .iter()
            .map(|l| (l.in_flight as f64, l.pss))
            .collect();
        let (intercept, slope) = fit(&points);
        let levels: Vec<Value> = side
            .levels
            .iter()
            .map(|l| {
                let sent = &side.sent[l.sent.clone()];
                let (d, r) = (dispatch(sent), result(sent));
                json!({
                    "steps": l.n, "in_flight": l.in_flight, "pss_bytes": l.pss, "rss_bytes": l.rss,
                    "publish_per_s": l.publish_per_s, "drain_s": l.drain_s,
                    "load_average_1m": l.load_average,
                    "publish_to_job_created_p50_s": procs::quantile(&d, 0.5),
                    "publish_to_job_created_p99_s": procs::quantile(&d, 0.99),
                    "step_exit_to_result_p50_s": procs::quantile(&r, 0.5),
                    "step_exit_to_result_p99_s": procs::quantile(&r, 0.99),
                })
            })
            .collect();
        out[name] = json!({
            "steps": side.sent.len(), "results_success": ok, "lost": lost, "ran_twice": twice,
            "never_ran": never,
            "memory_points": points.iter().map(|(x, y)| json!({"in_flight": x, "pss_bytes": y})).collect::<Vec<_>>(),
            "levels": levels,
            "pss_slope_bytes_per_step": slope, "pss_intercept_bytes": intercept,
            "idle_pss_bytes": side.idle_pss, "idle_rss_bytes": side.idle_rss,
            "rss_after_batches_bytes": side.after_rss,
            "publish_to_job_created_p50_s": procs::quantile(&all_dispatch, 0.5),
            "publish_to_job_created_p99_s": procs::quantile(&all_dispatch, 0.99),
            "dispatch_samples": all_dispatch.len(),
            "step_exit_to_result_p50_s": procs::quantile(&all_result, 0.5),
            "step_exit_to_result_p99_s": procs::quantile(&all_result, 0.99),
            "result_samples": all_result.len(),
            "api_requests_total": side.audit.len(),
            "api_requests_per_step": (side.audit.len() - shared) as f64 / steps,
            "api_requests_shared_watches": shared,
            "step_runtime_total_s": runtime,
            "api_requests_per_step_second": side.audit.len() as f64 / runtime,
            "api_requests_by_kind": by_kind,
            "startup_s": side.startup_s.iter().cloned().fold(f64::NAN, f64::min),
            "cpu_ms_per_step": side.cpu_s * 1000.0 / steps,
        });
    }
    out["celeriac"]["job_complete_to_result_p50_s"] = json!(job_to_result[0]);
    out["celeriac"]["job_complete_to_result_p99_s"] = json!(job_to_result[1]);
    let ids: Vec<String> = py.sent.iter().map(|s| s.task_id.clone()).collect();
    let stored = results(&ids)?;
    let py_job_to_result: Vec<f64> = py
        .sent
        .iter()
        .filter_map(|s| Some(stored.get(&s.task_id)?.1 - completed.get(&s.job_name)?))
        .filter(|d| d.is_finite())
        .collect();
    // Python's steps one by one (few), to read the timelines behind its figures.
    let py_creates: HashMap<&str, f64> = py
        .audit
        .iter()
        .filter(|a| a.verb == "create" && a.resource == "jobs")
        .map(|a| (a.name.as_str(), a.at))
        .collect();
    let (py_exits, _) = step_exits(&pdone_file);
    out["python"]["timelines"] = json!(py
        .sent
        .iter()
        .map(|s| json!({
            "step": s.step_key, "published": s.published_at,
            "job_created": py_creates.get(s.job_name.as_str()),
            "step_exited": py_exits.get(&s.step_key),
            "job_completion_time": completed.get(&s.job_name),
            "result_date_done": stored.get(&s.task_id).map(|r| r.1),
        }))
        .collect::<Vec<_>>());
    out["python"]["job_complete_to_result_p50_s"] = json!(procs::quantile(&py_job_to_result, 0.5));
    out["python"]["job_complete_to_result_p99_s"] = json!(procs::quantile(&py_job_to_result, 0.99));
    out["problems"] = json!(problems);
    drop(db);
    Ok(out)
}
