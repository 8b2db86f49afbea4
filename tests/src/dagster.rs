//! Real Dagster runs: a Postgres-backed instance whose jobs use `celery_k8s_job_executor`, driven by the
//! fixtures in `tests/peers` (see its README).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::{artifacts_dir, peer, run_python, run_python_in, unique};

/// A Dagster instance home with its own Postgres database.
pub struct DagsterHome {
    pub dir: PathBuf,
    pub db: String,
    pub broker: String,
    pub backend: String,
    /// The python whose Dagster made the instance and runs its jobs (the project venv's, or an
    /// older release's for the version matrix).
    pub python: PathBuf,
}

impl Drop for DagsterHome {
    /// Drops the run's database (best effort), so repeated test runs do not pile up databases.
    fn drop(&mut self) {
        let _ = psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db),
        );
    }
}

/// Runs `sql` in database `db` of the local PostgreSQL with `psql` (unaligned, tuples only); its output.
pub fn psql(db: &str, sql: &str) -> Result<String> {
    let out = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db,
            "-q",
            "-At",
            "-c",
            sql,
        ])
        .output()
        .context("running psql")?;
    anyhow::ensure!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// STEP_START count and "Submitting" engine events per step, from a `run_shape.py` summary.
pub fn per_step_counts(
    summary: &serde_json::Value,
) -> std::collections::BTreeMap<String, (usize, usize)> {
    summary["step_events"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(step, events)| {
                    let events: Vec<&str> = events
                        .as_array()
                        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
                        .unwrap_or_default();
                    let starts = events.iter().filter(|e| **e == "STEP_START").count();
                    let submits = events
                        .iter()
                        .filter(|e| e.starts_with("ENGINE_EVENT:Submitting celery task"))
                        .count();
                    (step.clone(), (starts, submits))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Each of `steps` submitted once and started once in a `run_shape.py` summary, or which was not.
pub fn each_step_once(summary: &serde_json::Value, steps: &[&str]) -> Result<(), String> {
    let counts = per_step_counts(summary);
    for step in steps {
        if counts.get(*step) != Some(&(1, 1)) {
            return Err(format!(
                "step {step} must be submitted once and run once: {counts:?}"
            ));
        }
    }
    Ok(())
}

/// What `run_job.py` reports about a finished (or timed-out) run.
#[derive(Debug, Deserialize)]
pub struct RunSummary {
    pub run_id: String,
    pub status: String,
    pub step_events: Vec<StepEvent>,
    #[serde(default)]
    pub engine_messages: Vec<String>,
    #[serde(default)]
    pub failure_messages: Vec<String>,
    /// Engine events with their metadata labels, in event-log order.
    #[serde(default)]
    pub engine_events: Vec<EngineEvent>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EngineEvent {
    pub message: String,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StepEvent {
    pub step_key: Option<String>,
    pub event_type: String,
    pub timestamp: f64,
}

impl RunSummary {
    /// The run succeeded and `step` started exactly once and succeeded once.
    pub fn assert_succeeded_running_once(&self, step: &str, context: &str) {
        assert_eq!(self.status, "SUCCESS", "{context}: {self:#?}");
        assert_eq!(
            self.count("STEP_START", step),
            1,
            "{context}: {step} ran exactly once: {self:#?}"
        );
        assert_eq!(self.count("STEP_SUCCESS", step), 1, "{context}: {self:#?}");
    }

    /// Step keys that have an event of `event_type`.
    pub fn steps_with(&self, event_type: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .step_events
            .iter()
            .filter(|e| e.event_type == event_type)
            .filter_map(|e| e.step_key.clone())
            .collect();
        keys.sort();
        keys
    }

    pub fn count(&self, event_type: &str, step: &str) -> usize {
        self.step_events
            .iter()
            .filter(|e| e.event_type == event_type && e.step_key.as_deref() == Some(step))
            .count()
    }
}

impl DagsterHome {
    /// Creates an instance (database, dagster.yaml, run config) for `broker`/`backend`.
    pub fn create(broker: &str, backend: &str) -> Result<DagsterHome> {
        Self::create_with(broker, backend, &[])
    }

    /// Every process reads the Postgres port from `$<var>` (`{env: var}` in dagster.yaml), and the
    /// processes of `direct_steps` get `<var>=5432` from the run config's `per_step_k8s_config`
    /// container env: a test can send the worker's database connections (only) through a fault proxy.
    /// (The executor's `env_vars` would not do: dagster-celery-k8s accepts and drops it, so step
    /// processes would inherit the worker's value.)
    pub fn create_with_pg_port_env(
        broker: &str,
        backend: &str,
        var: &str,
        direct_steps: &[&str],
    ) -> Result<DagsterHome> {
        let mut extra = vec!["--pg-port-env", var];
        for step in direct_steps {
            extra.extend(["--pg-direct-step", step]);
        }
        Self::create_with(broker, backend, &extra)
    }

    /// Steps run as Kubernetes Jobs in `namespace`, with `kubeconfig` as the task's kubeconfig_file.
    pub fn create_k8s(
        broker: &str,
        backend: &str,
        namespace: &str,
        kubeconfig: &std::path::Path,
    ) -> Result<DagsterHome> {
        let kc = kubeconfig.display().to_string();
        Self::create_with(
            broker,
            backend,
            &[
                "--namespace",
                namespace,
                "--kubeconfig",
                &kc,
                "--image",
                "celeriac/dagster-step:test",
            ],
        )
    }

    /// Steps run as Kubernetes Jobs in `namespace`, with the executor's default
    /// `load_incluster_config: true`: the worker uses its own (pod's) credentials.
    pub fn create_k8s_incluster(
        broker: &str,
        backend: &str,
        namespace: &str,
    ) -> Result<DagsterHome> {
        Self::create_with(
            broker,
            backend,
            &[
                "--namespace",
                namespace,
                "--incluster",
                "--image",
                "celeriac/dagster-step:test",
            ],
        )
    }

    /// [`Self::create`] with more `make_instance.py` arguments (`--pg-password`, `--env-var K=V`, …).
    pub fn create_with(broker: &str, backend: &str, extra: &[&str]) -> Result<DagsterHome> {
        Self::create_from("make_instance.py", broker, backend, extra)
    }

    /// An instance made, and run, by another venv's Dagster (`python` = its `bin/python`).
    pub fn create_in_venv(
        python: &std::path::Path,
        broker: &str,
        backend: &str,
    ) -> Result<DagsterHome> {
        Self::create_from_in(python, "make_instance.py", broker, backend, &[])
    }

    /// An instance whose run launcher is `dagster_celeriac.CeleriacRunLauncher` (celery-k8s runs are handed
    /// to the celeriac coordinator), with run monitoring on and a workspace of `plan_shapes.py`.
    pub fn create_coordinator(broker: &str, backend: &str, extra: &[&str]) -> Result<DagsterHome> {
        Self::create_from("make_coordinator_home.py", broker, backend, extra)
    }

    /// Launches a `plan_shapes.py` shape through `instance.launch_run` (the configured run
    /// launcher) and returns its run id at once, without waiting for the run.
    pub fn launch_shape(&self, shape: &str, envs: &[(&str, &str)]) -> Result<String> {
        let out = self.run_shape_with(
            shape,
            "launch",
            &["--no-wait"],
            Duration::from_secs(60),
            envs,
        )?;
        Ok(out["run_id"]
            .as_str()
            .context("run id of the launched shape")?
            .to_string())
    }

    /// `run_shape.py`'s summary (status, per-step events, …) of an existing run.
    pub fn shape_summary(&self, run_id: &str) -> Result<serde_json::Value> {
        self.run_shape_with(
            "-",
            "summary",
            &["--run-id", run_id],
            Duration::from_secs(60),
            &[],
        )
    }

    /// The run's status column in the instance database (`""` for an unknown run).
    pub fn run_status(&self, run_id: &str) -> Result<String> {
        anyhow::ensure!(
            run_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
            "not a run id: {run_id}"
        );
        Ok(psql(
            &self.db,
            &format!("SELECT status FROM runs WHERE run_id = '{run_id}'"),
        )?
        .trim()
        .to_string())
    }

    /// Creates a run of a `plan_shapes.py` shape and drives it (`run_shape.py --mode python|launch|create`):
    /// returns the script's JSON summary (status, per-step events, step stats, hand-off…).
    pub fn run_shape(
        &self,
        shape: &str,
        mode: &str,
        timeout: Duration,
        envs: &[(&str, &str)],
    ) -> Result<serde_json::Value> {
        self.run_shape_with(shape, mode, &[], timeout, envs)
    }

    /// [`Self::run_shape`] with extra arguments (`--no-wait`, `--run-id <id>`).
    pub fn run_shape_with(
        &self,
        shape: &str,
        mode: &str,
        extra: &[&str],
        timeout: Duration,
        envs: &[(&str, &str)],
    ) -> Result<serde_json::Value> {
        let mut all: Vec<(&str, &str)> = vec![("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")];
        all.extend_from_slice(envs);
        let timeout_s = timeout.as_secs().to_string();
        let script = peer("run_shape.py").display().to_string();
        let dir = self.dir.display().to_string();
        let mut args = vec![
            script.as_str(),
            "--home",
            &dir,
            "--shape",
            shape,
            "--mode",
            mode,
            "--timeout",
            &timeout_s,
        ];
        args.extend_from_slice(extra);
        let out = run_python(&args, &all, timeout + Duration::from_secs(120))
            .with_context(|| format!("run_shape.py --shape {shape} --mode {mode}"))?;
        let line = out
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("parsing run_shape.py output: {out}"))
    }

    fn create_from(
        script: &str,
        broker: &str,
        backend: &str,
        extra: &[&str],
    ) -> Result<DagsterHome> {
        Self::create_from_in(&crate::python(), script, broker, backend, extra)
    }

    fn create_from_in(
        python: &std::path::Path,
        script: &str,
        broker: &str,
        backend: &str,
        extra: &[&str],
    ) -> Result<DagsterHome> {
        let db = unique("celeriac_t").to_lowercase();
        let dir = artifacts_dir().join(&db);
        std::fs::create_dir_all(&dir)?;
        let dir_s = dir.display().to_string();
        let script = peer(script).display().to_string();
        let mut args: Vec<&str> = vec![
            &script,
            &dir_s,
            "--db",
            &db,
            "--broker",
            broker,
            "--backend",
            backend,
        ];
        args.extend_from_slice(extra);
        run_python_in(
            python,
            &args,
            &[("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")],
            Duration::from_secs(120),
        )
        .with_context(|| script.clone())?;
        Ok(DagsterHome {
            dir,
            db,
            broker: broker.into(),
            backend: backend.into(),
            python: python.to_path_buf(),
        })
    }

    /// The marker lines the ops of the `marked` job wrote for `op` (one per execution of its body,
    /// each the pid of the step process), across runs of this home.
    pub fn markers(&self, op: &str) -> Vec<String> {
        markers_in(&self.dir, op)
    }

    /// Runs `job` with the celery_k8s executor and reports the outcome. `envs` reach the job definitions
    /// (queue names, sleep lengths).
    pub fn run_job(
        &self,
        job: &str,
        timeout: Duration,
        envs: &[(&str, &str)],
    ) -> Result<RunSummary> {
        let mut all: Vec<(&str, &str)> = vec![("DAGSTER_PG_PASSWORD", "unused-with-trust-auth")];
        all.extend_from_slice(envs);
        let timeout_s = timeout.as_secs().to_string();
        let out = run_python_in(
            &self.python,
            &[
                &peer("run_job.py").display().to_string(),
                "--home",
                &self.dir.display().to_string(),
                "--job",
                job,
                "--timeout",
                &timeout_s,
            ],
            &all,
            timeout + Duration::from_secs(120),
        )
        .with_context(|| format!("run_job.py --job {job}"))?;
        let line = out
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("parsing run_job.py output: {out}"))
    }
}

/// [`DagsterHome::markers`] for a home directory (usable while the home is borrowed by a run thread).
pub fn markers_in(home: &std::path::Path, op: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(home.join("markers")) else {
        return vec![];
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(&format!(".{op}")))
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}
