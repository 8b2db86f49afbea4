//! The process launcher's per-host state directory: one entry per running step, so that a worker that
//! died mid-step leaves enough behind for the next worker on the same host to adopt the step (as the
//! Kubernetes launcher adopts a Job) instead of starting it again.
//!
//! Per step (named by its job name, `dagster-step-<md5>[-attempt]`, unique per run, step and attempt):
//! * `<job>.json`: pid, the process start time from `/proc/<pid>/stat` (field 22, clock ticks since
//!   boot) and the boot id (so a reused pid or a reboot is never mistaken for the step), the output
//!   files, task id, attempt, worker and host;
//! * `<job>.out` / `<job>.err`: the step's stdout and stderr (files, not pipes: a step outliving its
//!   worker keeps writing, and nothing it prints is lost);
//! * `<job>.exit`: the exit code, once a worker saw the process end.
//!
//! Entries of finished steps are kept for [`RETENTION`] (a redelivered task whose step already ended
//! reports the stored output), then removed by the next launch.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// How long entries of finished steps are kept.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// What the state directory records about one step process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepEntry {
    pub job_name: String,
    pub run_id: String,
    pub step_key: String,
    pub task_id: String,
    pub attempt: u64,
    pub pid: i32,
    /// `/proc/<pid>/stat` field 22: with `boot_id`, tells this process from a later one with its pid.
    pub start_time: u64,
    pub boot_id: String,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Node name of the worker that started it.
    pub worker: String,
    pub host: String,
    /// Unix seconds.
    pub started_at: f64,
}

/// Where a step process stands, as seen from its entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Liveness {
    /// The recorded process is still running.
    Running,
    /// It ended and a worker recorded its exit code.
    Exited(i32),
    /// It is gone and nobody saw it end (killed with its worker, or ended while no worker watched).
    Gone,
}

/// The directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// This machine's boot id (empty when unreadable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `(state, start_time)` of a process from `/proc/<pid>/stat`, `None` when it does not exist.
pub fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`: comm may contain spaces and parentheses; it ends at the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 is `state`, so field 22 (`starttime`) is at index 19.
    let start: u64 = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The host name (for messages).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl StateDir {
    /// Creates the directory (mode 0700: step output holds whatever the step prints).
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<StateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = dir.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(StateDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, job: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{job}.{ext}"))
    }

    pub fn stdout_path(&self, job: &str) -> PathBuf {
        self.file(job, "out")
    }

    pub fn stderr_path(&self, job: &str) -> PathBuf {
        self.file(job, "err")
    }

    /// The entry of `job`, if any (an unreadable one is logged and treated as absent).
    pub fn read(&self, job: &str) -> Option<StepEntry> {
        let path = self.file(job, "json");
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&text) {
            Ok(e) => Some(e),
            Err(e) => {
                warn!(path = %path.display(), "ignoring an unreadable step state entry: {e}");
                None
            }
        }
    }

    /// Writes the entry atomically (temporary file, fsync, rename).
    pub fn write(&self, entry: &StepEntry) -> std::io::Result<()> {
        let body = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        self.write_atomic(&entry.job_name, "json", &body)
    }

    /// Records that the step process ended with `code`.
    pub fn record_exit(&self, job: &str, code: i32) -> std::io::Result<()> {
        self.write_atomic(job, "exit", code.to_string().as_bytes())
    }

    fn write_atomic(&self, job: &str, ext: &str, body: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.file(job, ext);
        let tmp = self.file(job, &format!("{ext}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// The recorded exit code of `job`.
    pub fn exit_code(&self, job: &str) -> Option<i32> {
        std::fs::read_to_string(self.file(job, "exit"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the entry's process is running, exited (code recorded) or gone.
    pub fn liveness(&self, entry: &StepEntry) -> Liveness {
        if let Some(code) = self.exit_code(&entry.job_name) {
            return Liveness::Exited(code);
        }
        if is_running(entry) {
            Liveness::Running
        } else {
            Liveness::Gone
        }
    }

    /// Removes every file of `job` (a fresh start of the step).
    pub fn remove(&self, job: &str) {
        for ext in ["json", "out", "err", "exit"] {
            let _ = std::fs::remove_file(self.file(job, ext));
        }
    }

    /// Removes the files of steps whose entry is older than [`RETENTION`] and whose process is no
    /// longer running.
    pub fn collect_garbage(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for item in dir.flatten() {
            let path = item.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let old = item
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > RETENTION);
            if !old {
                continue;
            }
            let Some(job) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            match self.read(job) {
                Some(entry) if is_running(&entry) => {}
                _ => {
                    debug!(job, "removing an expired step state entry");
                    self.remove(job);
                }
            }
        }
    }
}

/// The entry's process still runs: same boot, the pid exists with the recorded start time, and it is
/// not a zombie waiting for its reaper.
pub fn is_running(entry: &StepEntry) -> bool {
    if entry.boot_id != boot_id() {
        return false;
    }
    matches!(proc_stat(entry.pid), Some((state, start)) if start == entry.start_time && state != 'Z' && state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_start_time_and_detects_pid_reuse() {
        let me = std::process::id() as i32;
        let (state, start) = proc_stat(me).expect("own stat");
        assert!(state == 'R' || state == 'S', "{state}");
        let entry = StepEntry {
            job_name: "dagster-step-x".into(),
            run_id: "r".into(),
            step_key: "s".into(),
            task_id: "t".into(),
            attempt: 0,
            pid: me,
            start_time: start,
            boot_id: boot_id(),
            stdout: PathBuf::new(),
            stderr: PathBuf::new(),
            worker: "w".into(),
            host: "h".into(),
            started_at: 0.0,
        };
        assert!(is_running(&entry));
        assert!(!is_running(&StepEntry {
            start_time: start + 1,
            ..entry.clone()
        }));
        assert!(!is_running(&StepEntry {
            boot_id: "another boot".into(),
            ..entry.clone()
        }));
        let dir = std::env::temp_dir().join(format!("celeriac-state-{me}-{start}"));
        let state = StateDir::open(&dir).expect("state dir");
        state.write(&entry).expect("write");
        assert_eq!(state.read("dagster-step-x"), Some(entry.clone()));
        assert_eq!(state.liveness(&entry), Liveness::Running);
        state.record_exit("dagster-step-x", 3).expect("exit");
        assert_eq!(state.liveness(&entry), Liveness::Exited(3));
        state.remove("dagster-step-x");
        assert_eq!(state.read("dagster-step-x"), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
