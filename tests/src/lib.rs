//! Shared harness for the integration tests: real services, the real `celeriac` binary, the real Python
//! peers (celery, dagster) from the project virtualenv. Nothing here stands in for a peer.
//!
//! Every test isolates itself with unique queue names, Redis database numbers and Postgres databases so
//! tests can run side by side against the same services.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Directory for logs and other artefacts a person may want to read after a failure.
pub fn artifacts_dir() -> PathBuf {
    let dir = repo_root().join("tests").join("artifacts");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Starts RabbitMQ, Redis and PostgreSQL if they are down (once per test binary).
pub fn ensure_services() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let status = Command::new("bash")
            .arg(
                std::env::var("CELERIAC_SERVICES_SCRIPT")
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| repo_root().join("scripts/services.sh")),
            )
            .status()
            .expect("running scripts/services.sh");
        assert!(
            status.success(),
            "scripts/services.sh could not start the services"
        );
    });
}

/// Runs a preparation script (`scripts/<name>`) that prints the directory it prepared last;
/// panics with the script's name when it fails (a missing peer fails the test, never skips it).
pub fn prepared_dir(script: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts").join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running scripts/{script}: {e}"));
    assert!(out.status.success(), "scripts/{script} failed");
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim(),
    )
}

/// The project virtualenv's python, created on first use.
pub fn python() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| prepared_dir("python-peers.sh").join("bin").join("python"))
        .clone()
}

/// The venv's `bin` directory (for `dagster`, `celery` on PATH).
pub fn venv_bin() -> PathBuf {
    python().parent().map(Path::to_path_buf).unwrap_or_default()
}

/// PATH with the venv first, so step processes find `dagster`.
pub fn path_with_venv() -> String {
    format!(
        "{}:{}",
        venv_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The built `celeriac` binary (scripts/test.sh builds it before the tests run).
///
/// `CELERIAC_BIN` names another one (a copy of this checkout's build, while a shared target directory's
/// `celeriac` may be rebuilt from another checkout).
pub fn celeriac_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CELERIAC_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> → target/<profile>/celeriac
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let bin = profile_dir.join("celeriac");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --bin celeriac` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A unique, broker-safe name.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..10])
}

/// A fixture script under tests/peers.
pub fn peer(script: &str) -> PathBuf {
    repo_root().join("tests").join("peers").join(script)
}

/// Runs the venv python with `args`; fails with its stderr when it exits non-zero. Returns stdout.
pub fn run_python(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Result<String> {
    run_python_in(&python(), args, envs, timeout)
}

/// [`run_python`] with another venv's python (its `bin` first on PATH): the Dagster version matrix.
pub fn run_python_in(
    python: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> Result<String> {
    let bin = python.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut cmd = Command::new(python);
    cmd.args(args).env(
        "PATH",
        format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = run_with_timeout(cmd, timeout).with_context(|| format!("python {args:?}"))?;
    Ok(out)
}

/// Runs a command to completion within `timeout`, returning stdout; errors carry stderr.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<String> {
    let dir = artifacts_dir();
    let tag = unique("cmd");
    let out_path = dir.join(format!("{tag}.out"));
    let err_path = dir.join(format!("{tag}.err"));
    let mut child = cmd
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .context("spawning")?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "timed out after {timeout:?}; stderr:\n{}",
                tail(&err_path, 60)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "exited with {status}; stdout:\n{}\nstderr:\n{}",
            stdout,
            tail(&err_path, 80)
        );
    }
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok(stdout)
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running `celeriac worker` process.
pub struct CeleriacProcess {
    child: Option<Child>,
    pub log: PathBuf,
    pub hostname: String,
}

/// The worker is the most common process of the tests.
pub type WorkerProcess = CeleriacProcess;

impl CeleriacProcess {
    /// Starts `celeriac coordinator --instance-config <home>/dagster.yaml -b … --result-backend … <extra>`
    /// as replica `replica` and waits until it is ready.
    pub fn coordinator(
        dagster_yaml: &Path,
        broker: &str,
        backend: &str,
        replica: &str,
        extra: &[&str],
    ) -> Result<CeleriacProcess> {
        let log =
            artifacts_dir().join(format!("{}.log", unique(&format!("coordinator_{replica}"))));
        let mut cmd = Command::new(celeriac_bin());
        cmd.arg("coordinator")
            .arg("--instance-config")
            .arg(dagster_yaml)
            .args([
                "-b",
                broker,
                "--result-backend",
                backend,
                "--replica",
                replica,
            ])
            .args(["--http-addr", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info,celeriac_coordinator=debug")
            .env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth");
        let file = std::fs::File::create(&log)?;
        cmd.stdout(file.try_clone()?).stderr(file);
        let child = cmd.spawn().context("spawning celeriac coordinator")?;
        let mut process = CeleriacProcess {
            child: Some(child),
            log,
            hostname: replica.to_string(),
        };
        process.wait_for_log("celeriac coordinator ready", Duration::from_secs(30))?;
        Ok(process)
    }

    /// Starts `celeriac worker <args>` and waits until it logs that it is ready.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Result<WorkerProcess> {
        Self::start_opts(args, envs, false)
    }

    /// [`Self::start`] in a process group of its own (led by the worker), so a test can kill the
    /// worker's whole group ([`Self::kill_group`]) as a terminal or a service manager would.
    pub fn start_grouped(args: &[&str], envs: &[(&str, &str)]) -> Result<WorkerProcess> {
        Self::start_opts(args, envs, true)
    }

    fn start_opts(args: &[&str], envs: &[(&str, &str)], grouped: bool) -> Result<WorkerProcess> {
        let hostname = format!("{}@localhost", unique("celeriac"));
        let log = artifacts_dir().join(format!("{}.log", hostname.replace('@', "_")));
        let mut cmd = Command::new(celeriac_bin());
        // Port 0: parallel workers must not fight over the metrics port; `http_addr()` reads the real one.
        cmd.arg("worker")
            .args(["-n", &hostname, "--http-addr", "127.0.0.1:0"])
            .args(args);
        // Steps run as local processes unless a test asks for Kubernetes (`auto` would follow a
        // developer's KUBECONFIG).
        if !args.contains(&"--launcher") {
            cmd.args(["--launcher", "process"]);
        }
        cmd.env("PATH", path_with_venv())
            .env("RUST_LOG", "info,celeriac=debug");
        cmd.env("DAGSTER_PG_PASSWORD", "unused-with-trust-auth");
        // The process launcher's default state directory ($XDG_STATE_HOME/celeriac/steps) among the
        // artefacts, not in the developer's home or the repository (tests pass --step-state-dir
        // where they need their own).
        cmd.env("XDG_STATE_HOME", artifacts_dir().join("state"));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        if grouped {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let file = std::fs::File::create(&log)?;
        cmd.stdout(file.try_clone()?).stderr(file);
        let child = cmd.spawn().context("spawning celeriac worker")?;
        let mut worker = CeleriacProcess {
            child: Some(child),
            log,
            hostname,
        };
        worker.wait_for_log("celeriac worker ready", Duration::from_secs(30))?;
        // Consumers subscribe right after "ready"; give them a moment to declare and start.
        worker.wait_for_log("consuming", Duration::from_secs(30))?;
        Ok(worker)
    }

    /// `celeriac worker -b <broker> --result-backend <backend> -Q <queues> <extra…>`.
    pub fn consuming(
        broker: &str,
        backend: &str,
        queues: &str,
        extra: &[&str],
    ) -> Result<WorkerProcess> {
        let mut args = vec!["-b", broker, "--result-backend", backend, "-Q", queues];
        args.extend_from_slice(extra);
        WorkerProcess::start(&args, &[])
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "process exited ({status}) before logging {needle:?}:\n{}",
                        tail(&self.log, 60)
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "process did not log {needle:?} within {timeout:?}:\n{}",
                    tail(&self.log, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The address of the worker's HTTP port (from its `HTTP listening` log line).
    pub fn http_addr(&self) -> Option<String> {
        let log = self.log_text();
        let line = log.lines().find(|l| l.contains("HTTP listening"))?;
        let start = line.find("bound=")? + "bound=".len();
        Some(line[start..].split_whitespace().next()?.to_string())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Sends SIGTERM (warm shutdown) and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait(timeout)
    }

    /// SIGKILL: the worker dies without any clean-up, like an OOM kill or node loss.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGKILL to the worker's whole process group (started with [`Self::start_grouped`]).
    pub fn kill_group(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL)?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        if let Some(pid) = self.pid() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)?;
        }
        Ok(())
    }

    pub fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        let Some(child) = self.child.as_mut() else {
            bail!("worker already reaped")
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!(
                    "worker did not exit within {timeout:?}:\n{}",
                    tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for CeleriacProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads a child's stdout lines as they come (for long-running Python clients).
pub fn lines_of(child: &mut Child) -> impl Iterator<Item = String> + '_ {
    let out = child.stdout.take().expect("child stdout piped");
    BufReader::new(out).lines().map_while(|l| l.ok())
}

pub mod brokers;
pub mod chart;
pub mod dagster;
pub mod fault_proxy;
pub mod k8s;
pub mod prometheus;

/// Messages waiting in `queue` on `broker` (Redis: all priority lists; AMQP: ready messages), and on Redis
/// the number of unacknowledged deliveries in kombu's `unacked` hash.
pub async fn broker_backlog(broker: &str, queue: &str) -> Result<(u64, u64)> {
    if broker.starts_with("redis") {
        let client = redis::Client::open(broker)?;
        let mut con = client.get_multiplexed_async_connection().await?;
        let mut ready = 0u64;
        for suffix in ["", "\x06\x163", "\x06\x166", "\x06\x169"] {
            let n: u64 = redis::cmd("LLEN")
                .arg(format!("{queue}{suffix}"))
                .query_async(&mut con)
                .await?;
            ready += n;
        }
        let unacked: u64 = redis::cmd("HLEN")
            .arg("unacked")
            .query_async(&mut con)
            .await?;
        Ok((ready, unacked))
    } else {
        // The broker's own URL: a test in a vhost of its own has its queue there, not in "/".
        let url = match broker.strip_prefix("pyamqp://") {
            Some(rest) => format!("amqp://{rest}"),
            None => broker.to_string(),
        };
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        let ready = u64::from(q.message_count());
        let _ = conn.close(200, "bye".into()).await;
        Ok((ready, 0))
    }
}

/// The task ids a worker log says it received (`Task <name>[<id>] received`).
pub fn received_ids(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("] received"))
        .filter_map(|l| {
            let start = l.find("execute_step_k8s_job[")? + "execute_step_k8s_job[".len();
            let end = l[start..].find(']')? + start;
            Some(l[start..end].to_string())
        })
        .collect()
}

/// Polls `f` every 200 ms until it yields a value; fails after `timeout` naming `what` and the
/// last error `f` returned.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last_err = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} {last_err}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One HTTP/1.1 request (`http://host:port/path`), optionally with a JSON body and basic-auth
/// credentials (`user:password`): `(status, body)`, chunked bodies decoded.
pub fn http(
    method: &str,
    url: &str,
    body: Option<&str>,
    basic_auth: Option<&str>,
) -> Result<(u16, String)> {
    use base64::Engine;
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream =
        std::net::TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(a) = basic_auth {
        let token = base64::engine::general_purpose::STANDARD.encode(a.as_bytes());
        req.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no HTTP header end from {url}"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status from {url}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload).with_context(|| format!("bad chunked body from {url}"))?;
    }
    Ok((status, String::from_utf8_lossy(&payload).into_owned()))
}

/// A GET: `(status, body)`.
pub fn http_get(url: &str) -> Result<(u16, String)> {
    http("GET", url, None, None)
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16)?;
        if size == 0 {
            break;
        }
        let chunk = rest
            .get(nl + 2..nl + 2 + size)
            .context("chunk shorter than its size")?;
        out.extend_from_slice(chunk);
        rest = rest.get(nl + 2 + size + 2..).unwrap_or_default();
    }
    Ok(out)
}
