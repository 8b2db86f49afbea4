//! The process launcher: output capture, exit codes, env, large output, and killing the whole process
//! group on cancel.

use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use celeriac_dagster::launcher::process::ProcessLauncher;
use celeriac_dagster::launcher::step_state::{self, StateDir, StepEntry};
use celeriac_dagster::launcher::{LaunchError, StepLauncher, StepSpec, Workload};
use celeriac_dagster::step::workload::Step;
use celeriac_worker::CancellationToken;
use serde_json::json;

/// A step resolved as the step task resolves it: the Job's explicit env, then `job_config.env_vars`,
/// then the merged container config's literal `env`.
fn spec(cmd: &str) -> StepSpec {
    let job_config = json!({"env_vars": ["FROM_JOB_CONFIG=jc"]})
        .as_object()
        .cloned()
        .unwrap_or_default();
    let step = Step {
        job_name: "dagster-step-test",
        command: vec!["sh".into(), "-c".into(), cmd.into()],
        env: vec![
            ("DAGSTER_RUN_JOB_NAME".into(), "my_job".into()),
            ("DAGSTER_RUN_STEP_KEY".into(), "op".into()),
        ],
        labels: vec![],
        job_config: &job_config,
        user_config: json!({"container_config": {"env": [{"name": "FROM_USER", "value": "u"}]}}),
    };
    StepSpec {
        job_name: "dagster-step-test".into(),
        namespace: "default".into(),
        run_id: "run".into(),
        step_key: "op".into(),
        task_id: "task-1".into(),
        attempt: 0,
        worker: "celeriac-test@host".into(),
        wait_timeout: None,
        workload: Workload::Process(step.process()),
    }
}

#[tokio::test]
async fn captures_output_env_and_exit_codes() {
    let l = ProcessLauncher::default();
    let run = l
        .launch(&spec("echo out $DAGSTER_RUN_JOB_NAME $DAGSTER_RUN_STEP_KEY $FROM_JOB_CONFIG $FROM_USER; echo err >&2"), CancellationToken::new())
        .await
        .expect("runs");
    assert!(run.succeeded);
    assert_eq!(run.failure_message, None);
    assert_eq!(run.logs, "out my_job op jc u\nerr\n");
    assert_eq!(run.pod_names, ["dagster-step-test"]);

    let run = l
        .launch(&spec("echo partial; exit 3"), CancellationToken::new())
        .await
        .expect("runs");
    assert!(!run.succeeded);
    assert_eq!(
        run.failure_message.as_deref(),
        Some("Step process of job dagster-step-test exited with code 3")
    );
    assert_eq!(run.logs, "partial\n");

    let run = l
        .launch(&spec("kill -9 $$"), CancellationToken::new())
        .await
        .expect("runs");
    assert!(!run.succeeded);
    assert!(run
        .failure_message
        .unwrap_or_default()
        .contains("killed by a signal"));
}

#[tokio::test]
async fn large_output_on_both_streams_does_not_deadlock() {
    let run = ProcessLauncher::default()
        .launch(&spec("head -c 3000000 /dev/zero | tr '\\0' x; head -c 2000000 /dev/zero | tr '\\0' y >&2"), CancellationToken::new())
        .await
        .expect("runs");
    assert!(run.succeeded);
    assert_eq!(run.logs.len(), 3_000_000 + 1 + 2_000_000);
}

#[tokio::test]
async fn working_dir_is_used() {
    let dir = std::env::temp_dir();
    let run = ProcessLauncher::new(Some(dir.clone()))
        .launch(&spec("pwd"), CancellationToken::new())
        .await
        .expect("runs");
    let want = dir.canonicalize().unwrap_or(dir);
    assert_eq!(run.logs.trim(), want.display().to_string());
}

/// Running (not gone, not a zombie waiting for a reaper).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn cancel_kills_the_process_group() {
    let pidfile =
        std::env::temp_dir().join(format!("celeriac-t-{}.pid", uuid::Uuid::new_v4().simple()));
    let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c2.cancel();
    });
    let started = Instant::now();
    let r = ProcessLauncher::default().launch(&spec(&cmd), cancel).await;
    assert!(matches!(r, Err(LaunchError::Cancelled(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap_or_default()
        .trim()
        .parse()
        .expect("grandchild pid");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!alive(grandchild), "grandchild {grandchild} survived");
    let _ = std::fs::remove_file(pidfile);
}

#[tokio::test]
async fn sigterm_ignoring_step_is_killed_after_the_grace_period() {
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c2.cancel();
    });
    let started = Instant::now();
    let r = ProcessLauncher::default()
        .launch(
            &spec("trap '' TERM; while true; do sleep 0.1; done"),
            cancel,
        )
        .await;
    assert!(matches!(r, Err(LaunchError::Cancelled(_))));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "{took:?}"
    );
}

#[tokio::test]
async fn dropping_the_launch_kills_the_group() {
    let pidfile =
        std::env::temp_dir().join(format!("celeriac-t-{}.pid", uuid::Uuid::new_v4().simple()));
    let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let s = spec(&cmd);
    let l = ProcessLauncher::default();
    let fut = l.launch(&s, CancellationToken::new());
    let _ = tokio::time::timeout(Duration::from_millis(500), fut).await;
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap_or_default()
        .trim()
        .parse()
        .expect("grandchild pid");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!alive(grandchild), "grandchild {grandchild} survived");
    let _ = std::fs::remove_file(pidfile);
}

/// A state directory of its own.
fn state_dir() -> StateDir {
    let dir =
        std::env::temp_dir().join(format!("celeriac-steps-{}", uuid::Uuid::new_v4().simple()));
    StateDir::open(dir).expect("state dir")
}

const SUCCESS_EVENT: &str =
    r#"{"__class__": "DagsterEvent", "event_type_value": "STEP_SUCCESS", "step_key": "op"}"#;

/// A step process "left behind by a dead worker": started outside the launcher, in its own process
/// group, writing to the state directory's files, and recorded there.
fn orphan(state: &StateDir, script: &str) -> i32 {
    let out = std::fs::File::create(state.stdout_path("dagster-step-test")).expect("out");
    let err = std::fs::File::create(state.stderr_path("dagster-step-test")).expect("err");
    let child = std::process::Command::new("sh")
        .args(["-c", script])
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .expect("orphan");
    let pid = child.id() as i32;
    // Reaped by a thread, as init would reap a real orphan.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let (_, start_time) = step_state::proc_stat(pid).expect("stat");
    state
        .write(&StepEntry {
            job_name: "dagster-step-test".into(),
            run_id: "run".into(),
            step_key: "op".into(),
            task_id: "task-1".into(),
            attempt: 0,
            pid,
            start_time,
            boot_id: step_state::boot_id(),
            stdout: state.stdout_path("dagster-step-test"),
            stderr: state.stderr_path("dagster-step-test"),
            worker: "celeriac-dead@host".into(),
            host: step_state::host_name(),
            started_at: 0.0,
        })
        .expect("entry");
    pid
}

#[tokio::test]
async fn a_running_orphan_is_adopted_not_started_again() {
    let state = state_dir();
    let marker = state.path().join("runs");
    orphan(
        &state,
        &format!(
            "echo x >> {m}; sleep 1.5; echo '{SUCCESS_EVENT}'",
            m = marker.display()
        ),
    );
    let l = ProcessLauncher::default().with_state_dir(state.clone());
    // The same step again (the redelivered task): would append a second line if it ran.
    let cmd = format!("echo x >> {}", marker.display());
    let started = Instant::now();
    let run = l
        .launch(&spec(&cmd), CancellationToken::new())
        .await
        .expect("adopts");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for the orphan"
    );
    assert!(run.adopted_existing);
    assert!(run.succeeded, "{run:?}");
    assert!(run.logs.contains("STEP_SUCCESS"), "{}", run.logs);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default(),
        "x\n",
        "the step body ran once"
    );
    // Redelivered once more after it ended: the recorded output is reported, nothing runs.
    let again = l
        .launch(&spec(&cmd), CancellationToken::new())
        .await
        .expect("reports");
    assert!(
        again.succeeded && again.logs.contains("STEP_SUCCESS"),
        "{again:?}"
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap_or_default(), "x\n");
    let _ = std::fs::remove_dir_all(state.path());
}

#[tokio::test]
async fn a_lost_step_is_started_again_and_says_what_was_lost() {
    let state = state_dir();
    let pid = orphan(&state, "sleep 30");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let l = ProcessLauncher::default().with_state_dir(state.clone());
    let run = l
        .launch(&spec("echo second"), CancellationToken::new())
        .await
        .expect("runs");
    assert!(run.succeeded);
    assert_eq!(run.logs, "second\n");
    let lost = l
        .take_lost_previous("dagster-step-test")
        .unwrap_or_default();
    assert!(
        lost.contains("celeriac-dead@host")
            && lost.contains("died mid-step")
            && lost.contains("attempt 0"),
        "{lost}"
    );
    let _ = std::fs::remove_dir_all(state.path());
}
