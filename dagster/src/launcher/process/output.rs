//! The step's stdout and stderr: read from pipes while the step runs (no state directory), or from
//! the state directory's files (which outlive the worker, so an adopting worker reads them too).
//! Capped so a chatty step cannot exhaust the worker's memory, and never waited on forever: a
//! background grandchild holding the pipes open is killed with the group.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use super::group::GroupGuard;

/// How long the output pipes may stay open after the step process exited (a background child that
/// inherited them) before the rest of its process group is killed.
pub(super) const PIPE_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// At most this much of each stream is kept (the rest is read and dropped, so the step never blocks).
pub(super) const MAX_CAPTURE: usize = 512 * 1024 * 1024;

pub(super) fn drain<R: AsyncRead + Unpin + Send + 'static>(
    stream: Option<R>,
) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut kept = Vec::new();
        let Some(mut s) = stream else { return kept };
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_CAPTURE.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
        kept
    })
}

/// Where the step's output goes.
pub(super) enum Output {
    /// Pipes read by the worker (no state directory).
    Pipes(JoinHandle<Vec<u8>>, JoinHandle<Vec<u8>>),
    /// The state directory's files.
    Files(PathBuf, PathBuf),
}

/// Up to [`MAX_CAPTURE`] of a file.
pub(super) async fn read_capped(path: &std::path::Path) -> Vec<u8> {
    let Ok(f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let _ = f.take(MAX_CAPTURE as u64).read_to_end(&mut kept).await;
    kept
}

pub(super) async fn read_files(out: &std::path::Path, err: &std::path::Path) -> String {
    join_streams(&read_capped(out).await, &read_capped(err).await)
}

pub(super) fn join_streams(out: &[u8], err: &[u8]) -> String {
    let mut logs = String::from_utf8_lossy(out).into_owned();
    if !logs.ends_with('\n') && !logs.is_empty() {
        logs.push('\n');
    }
    logs.push_str(&String::from_utf8_lossy(err));
    logs
}

/// Stdout then stderr. If the pipes stay open after the process exited (a background grandchild holds
/// them), the rest of the process group is killed.
pub(super) async fn collect(output: Output, guard: &GroupGuard) -> String {
    let (mut out, mut err) = match output {
        Output::Files(o, e) => return read_files(&o, &e).await,
        Output::Pipes(o, e) => (o, e),
    };
    let both = async { (Some((&mut out).await), Some((&mut err).await)) };
    let (o, e) = match tokio::time::timeout(PIPE_DRAIN_GRACE, both).await {
        Ok(r) => r,
        Err(_) => {
            guard.kill(nix::sys::signal::Signal::SIGKILL);
            (Some(out.await), Some(err.await))
        }
    };
    let out = o.and_then(Result::ok).unwrap_or_default();
    let err = e.and_then(Result::ok).unwrap_or_default();
    join_streams(&out, &err)
}
