//! The load test's environment: the repository, the real services and Python peers (started or built
//! by the project's scripts), release binaries, Dagster homes, Postgres.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where logs and scratch files go (`loadtest/work`, ignored by git).
pub fn work_dir() -> PathBuf {
    let dir = repo_root().join("loadtest").join("work");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..10])
}

fn script_output(script: &str) -> Result<String> {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts").join(script))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running scripts/{script}"))?;
    if !out.status.success() {
        bail!("scripts/{script} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Starts RabbitMQ, Redis and PostgreSQL if they are down.
pub fn ensure_services() -> Result<()> {
    script_output("services.sh").map(|_| ())
}

/// The Python peers' virtualenv (built on first use).
pub fn venv() -> Result<PathBuf> {
    Ok(PathBuf::from(script_output("python-peers.sh")?))
}

/// The release `celeriac` binary next to this one, built if missing (`cargo run -p celeriac-loadtest`
/// builds only this package).
pub fn celeriac_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("binary directory")?.to_path_buf();
    let bin = dir.join("celeriac");
    let profile = if dir.ends_with("release") {
        "--release"
    } else {
        ""
    };
    // CELERIAC_LOADTEST_PREBUILT=1: the binaries next to this one are the ones to measure (copied out
    // of a target directory that other builds share, so that none replaces them mid-run).
    if std::env::var_os("CELERIAC_LOADTEST_PREBUILT").is_some() {
        if !bin.exists() {
            bail!("CELERIAC_LOADTEST_PREBUILT: no {}", bin.display());
        }
        return Ok(bin);
    }
    eprintln!("loadtest: building celeriac and celeriac-load-step {profile}");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // The same package set as `scripts/test.sh`'s `cargo build --workspace --bins`: building a subset
    // resolves other dependency features and rebuilt half the dependency tree, every time.
    cmd.args(["build", "--workspace", "--bins"])
        .current_dir(repo_root());
    if !profile.is_empty() {
        cmd.arg(profile);
    }
    let status = cmd.status().context("cargo build")?;
    if !status.success() || !bin.exists() {
        bail!("cannot build {}", bin.display());
    }
    Ok(bin)
}

/// A directory holding `dagster` → `celeriac-load-step`, to put first on the workers' PATH.
pub fn load_step_path() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let step = exe
        .parent()
        .context("binary directory")?
        .join("celeriac-load-step");
    let dir = work_dir().join("load-step-bin");
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("dagster");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&step, &link)?;
    Ok(dir)
}

/// `PATH` with the venv's `bin` first: its `python`, `celery` and `dagster` are the ones found.
pub fn venv_first_path(venv: &Path) -> String {
    format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs the venv's python with `args` (environment `envs`), returning its stdout; fails with stderr.
pub fn python(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Result<String> {
    let venv = venv()?;
    let mut cmd = Command::new(venv.join("bin").join("python"));
    cmd.args(args)
        .env("PATH", venv_first_path(&venv))
        .env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?
        .wait_with_output_timeout(timeout)?;
    if !out.status.success() {
        bail!(
            "python {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `Child::wait_with_output` with a deadline.
pub trait WaitTimeout {
    fn wait_with_output_timeout(self, timeout: Duration) -> Result<std::process::Output>;
}

impl WaitTimeout for Child {
    fn wait_with_output_timeout(self, timeout: Duration) -> Result<std::process::Output> {
        let pid = self.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(self.wait_with_output());
        });
        match rx.recv_timeout(timeout) {
            Ok(out) => Ok(out?),
            Err(_) => {
                let _ = nix_kill(pid);
                bail!("process {pid} did not finish within {timeout:?}")
            }
        }
    }
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .map(|_| ())
}

/// A Dagster home whose run launcher is `CeleriacRunLauncher`, on its own Postgres database.
pub struct Home {
    pub dir: PathBuf,
    pub db: String,
}

impl Home {
    /// A new home and database; `extra` goes to `make_coordinator_home.py` after the broker and
    /// backend (each scenario's own options: heartbeat timeout, step image).
    pub fn create(broker: &str, backend: &str, extra: &[&str]) -> Result<Home> {
        let db = unique("celeriac_load").to_lowercase();
        let dir = work_dir().join(&db);
        std::fs::create_dir_all(&dir)?;
        let script = repo_root().join("tests/peers/make_coordinator_home.py");
        let mut args = vec![
            script.to_str().unwrap_or_default(),
            dir.to_str().unwrap_or_default(),
            "--db",
            &db,
            "--broker",
            broker,
            "--backend",
            backend,
        ];
        args.extend_from_slice(extra);
        python(&args, &[], Duration::from_secs(120))?;
        Ok(Home { dir, db })
    }

    /// `count` runs of `job` made in this home by `loadtest/peers/make_runs.py` (environment
    /// `envs`): their ids and the hand-off `CeleriacRunLauncher` computed for them.
    pub fn make_runs(
        &self,
        job: &str,
        count: usize,
        envs: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<(Vec<String>, Value)> {
        let made = python(
            &[
                repo_root()
                    .join("loadtest/peers/make_runs.py")
                    .to_str()
                    .unwrap_or_default(),
                "--home",
                self.dir.to_str().unwrap_or_default(),
                "--job",
                job,
                "--count",
                &count.to_string(),
            ],
            envs,
            timeout,
        )?;
        let made: Value = serde_json::from_str(made.lines().last().unwrap_or_default())?;
        let runs: Vec<String> = made["run_ids"]
            .as_array()
            .context("run ids")?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        Ok((runs, made["handoff"].clone()))
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port=5432 user=postgres dbname={}", self.db),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(conn);
        Ok(client)
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-q",
                "-c",
            ])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.db
            ))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A background process with its log in the work directory, killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        let log = work_dir().join(format!("{}.log", unique(name)));
        let file = std::fs::File::create(&log)?;
        cmd.stdout(file.try_clone()?).stderr(file);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        while !self.log_text().contains(needle) {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}):\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
