//! API load: 200 concurrent step tasks, published exactly as celery_k8s_job_executor publishes them,
//! complete through one worker; the API server's audit log shows what celeriac cost it: one shared
//! LIST+WATCH of Jobs and of pods, and a bounded number of requests per step (create, log, delete).
//! The report (tests/artifacts/k8s_api_load.md) puts the Python worker's polling cost beside it.
//! (Own test binary: nothing else talks to the cluster meanwhile.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use celeriac_tests::dagster::DagsterHome;
use celeriac_tests::k8s::{audit_mark, audit_requests_since, cluster, TestNamespace};
use celeriac_tests::{artifacts_dir, ensure_services, peer, run_python, unique, WorkerProcess};

const STEPS: usize = 200;
const STEP_SECONDS: u64 = 5;

#[test]
fn two_hundred_concurrent_steps_cost_one_watch_and_three_requests_each() -> Result<()> {
    ensure_services();
    let broker = "amqp://guest:guest@127.0.0.1:5672//";
    // Results in Redis, so the real Celery client can read all 200 back after the publisher is gone.
    let backend = "redis://127.0.0.1:6379/7";
    let ns = TestNamespace::create()?;
    let queue = unique("load");
    let home = DagsterHome::create_k8s(broker, backend, &ns.name, &ns.kubeconfig)?;
    let kubeconfig = ns.kubeconfig.display().to_string();
    let steps = STEPS.to_string();
    let mark = audit_mark(cluster());
    let mut worker = WorkerProcess::start(
        &[
            "-b",
            broker,
            "--result-backend",
            "rpc://",
            "-Q",
            &queue,
            "-c",
            &steps,
            "--launcher",
            "kubernetes",
        ],
        &[("KUBECONFIG", kubeconfig.as_str()), ("RUST_LOG", "info")],
    )?;
    let started = Instant::now();
    let published = run_python(
        &[
            &peer("publish_steps.py").display().to_string(),
            "--home",
            &home.dir.display().to_string(),
            "--queue",
            &queue,
            "--count",
            &steps,
            "--namespace",
            &ns.name,
            "--kubeconfig",
            &kubeconfig,
        ],
        &[
            ("DAGSTER_PG_PASSWORD", "unused-with-trust-auth"),
            ("LOAD_STEP_SECONDS", &STEP_SECONDS.to_string()),
        ],
        Duration::from_secs(300),
    )?;
    let line = published
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("publish output")?;
    let ids: Vec<String> = serde_json::from_value(
        serde_json::from_str::<serde_json::Value>(line)?["task_ids"].clone(),
    )?;
    assert_eq!(ids.len(), STEPS);

    // Peak of Jobs alive at once, sampled as the admin (not counted: the audit log is per user).
    let mut peak = 0;
    let done_by = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = ns.jobs();
        peak = peak.max(jobs.len());
        let finished = worker.log_text().matches("step finished").count();
        if finished >= STEPS {
            break;
        }
        anyhow::ensure!(
            Instant::now() < done_by,
            "only {finished} of {STEPS} steps finished:\n{}",
            worker
                .log_text()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = started.elapsed();
    worker.terminate(Duration::from_secs(60))?;
    let log = worker.log_text();
    assert_eq!(
        log.matches("step Job running").count(),
        STEPS,
        "every step ran as a Job"
    );
    assert_eq!(
        log.matches("succeeded=true").count(),
        STEPS,
        "every step Job succeeded"
    );

    let requests: Vec<_> = audit_requests_since(cluster(), &ns.user, mark)
        .into_iter()
        .filter(|(_, resource, namespace, _)| {
            namespace == &ns.name || resource == "selfsubjectaccessreviews"
        })
        .collect();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for (verb, resource, _, _) in &requests {
        *by_kind.entry(format!("{verb} {resource}")).or_default() += 1;
    }
    let n = |k: &str| by_kind.get(k).copied().unwrap_or(0);
    let total = requests.len();
    let per_step = (total
        - n("list jobs")
        - n("watch jobs")
        - n("list pods")
        - n("watch pods")
        - n("create selfsubjectaccessreviews")) as f64
        / STEPS as f64;
    // Python: POST; LIST by name; GET status right away, then every 10 s; LIST pods; GET log
    // (dagster-celery-k8s.md §3.4, captures/k8s/R1-k8s-api-requests.jsonl).
    let python_per_step = 5 + STEP_SECONDS.div_ceil(10);
    let report = format!(
        "# Kubernetes API load: {STEPS} concurrent steps ({STEP_SECONDS} s each) through one celeriac worker\n\n\
         wall time {elapsed:.1?}, peak Jobs alive at once {peak}\n\n\
         | requests by celeriac (audit log, user {user}) | count |\n|---|---|\n{rows}\n\
         | **total** | **{total}** |\n\n\
         celeriac: {per_step:.2} requests per step + one shared LIST+WATCH of Jobs and of pods.\n\
         Python worker (polling every 10 s): ≥ {python_per_step} requests per step ({python_total} for {STEPS} steps), \
         +1 GET per step per further 10 s of runtime, and one ~60 MB process per step.\n\n\
         Every step's Job succeeded (worker log).\n",
        user = ns.user,
        rows = by_kind.iter().map(|(k, v)| format!("| {k} | {v} |")).collect::<Vec<_>>().join("\n"),
        python_total = python_per_step as usize * STEPS,
    );
    std::fs::write(artifacts_dir().join("k8s_api_load.md"), &report)?;
    println!("{report}");

    assert!(
        peak >= STEPS / 2,
        "steps ran concurrently (peak {peak} Jobs)"
    );
    assert!(
        n("list jobs") <= 2 && n("watch jobs") <= 3,
        "one shared Job watch: {by_kind:?}"
    );
    assert!(
        n("list pods") <= 2 && n("watch pods") <= 3,
        "one shared pod watch: {by_kind:?}"
    );
    assert_eq!(n("create jobs"), STEPS, "one create per step: {by_kind:?}");
    assert_eq!(
        n("get pods/log"),
        STEPS,
        "one log read per step: {by_kind:?}"
    );
    assert!(n("get jobs") == 0, "no per-Job polling: {by_kind:?}");
    assert_eq!(
        n("create selfsubjectaccessreviews"),
        celeriac_dagster::kubernetes::access::REQUIRED.len(),
        "one permission check for the namespace, however many steps start at once: {by_kind:?}"
    );
    assert!(
        per_step <= 3.0,
        "bounded requests per step: {per_step:.2} ({by_kind:?})"
    );
    Ok(())
}
