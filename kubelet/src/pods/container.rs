//! One container as a process group: started with the container's argv, environment, working
//! directory and mounts, its output in the log file `/containerLogs` serves; waited for, terminated on
//! deletion (SIGKILL after the grace period) and killed when its group outgrows the memory limit, as a
//! runtime would.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::api::{name, namespace, ContainerReport};
use crate::log_files::LogFile;
use crate::node::{now, Node};
use crate::volumes;

/// A running (or failed-to-start) container.
pub(super) struct Proc {
    name: String,
    image: String,
    pub(super) child: Option<tokio::process::Child>,
    pub(super) pid: i32,
    started_at: String,
    memory_limit: Option<u64>,
    start_error: Option<String>,
    exited: watch::Sender<bool>,
}

/// How a container ended.
pub(super) struct End {
    pub(super) exit_code: i32,
    reason: &'static str,
    message: Option<String>,
    started_at: String,
    finished_at: String,
    pid: i32,
}

impl End {
    pub(super) fn state(&self) -> Value {
        let mut t = json!({
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": format!("process://{}", self.pid),
        });
        if let Some(m) = &self.message {
            t["message"] = json!(m);
        }
        json!({ "terminated": t })
    }
}

/// Starts a container's process (a container that cannot start is returned with its `start_error`).
pub(super) fn start(
    node: &Node,
    pod: &Pod,
    c: &Container,
    env: &[(String, String)],
    volumes: &HashMap<String, PathBuf>,
    dir: &Path,
    kubeconfig: Option<&Path>,
) -> Proc {
    let image = c.image.clone().unwrap_or_default();
    let log_path = dir.join(format!("{}.log", c.name));
    let mut proc = Proc::new(node, pod, c, &image, &log_path);
    let argv: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    let Some((program, rest)) = argv.split_first() else {
        proc.start_error = Some("no command: the process kubelet has no image entrypoints".into());
        return proc;
    };
    let mut path = node.base_path.clone();
    for (prefix, p) in &node.image_paths {
        if image.starts_with(prefix.as_str()) {
            path = format!("{}:{path}", p.display());
        }
    }
    let (log, log_err) = match open_log(&log_path) {
        Ok(f) => f,
        Err(e) => {
            proc.start_error = Some(format!("cannot open the log file: {e}"));
            return proc;
        }
    };
    let workdir = c
        .working_dir
        .as_ref()
        .map(PathBuf::from)
        .filter(|w| std::fs::create_dir_all(w).is_ok())
        .unwrap_or_else(|| dir.to_path_buf());
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .env_clear()
        .env("PATH", &path)
        .env("HOSTNAME", name(pod))
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        );
    if let Ok(lang) = std::env::var("LANG") {
        cmd.env("LANG", lang);
    }
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .kill_on_drop(true);
    let mounts = volumes::container_mounts(c, volumes);
    if !mounts.is_empty() {
        // SAFETY: the closure runs between fork and exec; it only makes system calls (unshare,
        // mount) on CStrings prepared before the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || volumes::enter(&mounts));
        }
    }
    match cmd.spawn() {
        Ok(child) => {
            proc.pid = child.id().map_or(0, |p| p as i32);
            proc.child = Some(child);
        }
        Err(e) => proc.start_error = Some(format!("starting {program:?}: {e}")),
    }
    proc
}

/// The container's log file, opened for appending, once for stdout and once for stderr.
fn open_log(path: &Path) -> std::io::Result<(File, File)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let log_err = log.try_clone()?;
    Ok((log, log_err))
}

impl Proc {
    /// A container not started yet, its log file registered for `/containerLogs`.
    fn new(node: &Node, pod: &Pod, c: &Container, image: &str, log_path: &Path) -> Proc {
        let (exited, exited_rx) = watch::channel(false);
        node.logs.insert(
            &namespace(pod),
            &name(pod),
            &c.name,
            LogFile {
                path: log_path.to_path_buf(),
                exited: exited_rx,
            },
        );
        Proc {
            name: c.name.clone(),
            image: image.to_string(),
            child: None,
            pid: 0,
            started_at: now(),
            memory_limit: c
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("memory"))
                .and_then(|q| parse_quantity(&q.0)),
            start_error: None,
            exited,
        }
    }

    pub(super) fn report_running(&self) -> ContainerReport {
        let state = if self.child.is_some() {
            json!({"running": {"startedAt": self.started_at, "containerID": format!("process://{}", self.pid)}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        ContainerReport {
            name: self.name.clone(),
            image: self.image.clone(),
            state,
            ready: self.child.is_some(),
        }
    }

    /// Waits for the process; on `stop` terminates its group (SIGKILL after `grace`); enforces the
    /// memory limit.
    pub(super) async fn wait(&mut self, stop: &CancellationToken, grace: Duration) -> End {
        let started_at = self.started_at.clone();
        let end = |code: i32, reason: &'static str, message: Option<String>, pid: i32| End {
            exit_code: code,
            reason,
            message,
            started_at: started_at.clone(),
            finished_at: now(),
            pid,
        };
        let pid = self.pid;
        let Some(child) = self.child.as_mut() else {
            let _ = self.exited.send(true);
            return end(128, "StartError", self.start_error.clone(), 0);
        };
        let mut oom = false;
        let mut terminating = false;
        let mut memory_check = tokio::time::interval(Duration::from_millis(250));
        let deadline = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
        tokio::pin!(deadline);
        let status = loop {
            tokio::select! {
                s = child.wait() => break s,
                _ = stop.cancelled(), if !terminating => {
                    terminating = true;
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                    deadline.as_mut().reset(tokio::time::Instant::now() + grace);
                }
                _ = &mut deadline => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
                _ = memory_check.tick(), if self.memory_limit.is_some() => {
                    if let Some(limit) = self.memory_limit {
                        if group_rss(pid) > limit {
                            oom = true;
                            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                        }
                    }
                }
            }
        };
        // Whatever the main process left behind in its group goes with it, as with a container.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = self.exited.send(true);
        match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9));
                let reason = if oom {
                    "OOMKilled"
                } else if code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                end(code, reason, None, pid)
            }
            Err(e) => end(128, "Error", Some(e.to_string()), pid),
        }
    }
}

/// Resident memory of every process in the group, in bytes.
fn group_rss(pgid: i32) -> u64 {
    let page = 4096u64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let pgrp: i32 = fields.get(2)?.parse().ok()?;
            let rss: u64 = fields.get(21)?.parse().ok()?;
            (pgrp == pgid).then_some(rss * page)
        })
        .sum()
}

/// A Kubernetes memory quantity (`128Mi`, `1G`, `500000`) in bytes.
fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "m" => 1e-3,
        _ => return None,
    };
    Some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("128Mi"), Some(128 * 1024 * 1024));
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_quantity("500000"), Some(500_000));
        assert_eq!(parse_quantity("1x"), None);
    }
}
