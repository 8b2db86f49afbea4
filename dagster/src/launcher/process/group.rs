//! The step's process group: a step runs in a group of its own so that stopping it (cancel, timeout,
//! an abandoned launch) reaches every process it started, not only the one the worker spawned.

use std::time::Duration;

use tokio::process::Child;

/// How long a cancelled step gets between SIGTERM and SIGKILL.
pub(super) const KILL_GRACE: Duration = Duration::from_secs(10);

/// Kills the step's whole process group if the launch is abandoned (the task future dropped).
pub(super) struct GroupGuard(pub(super) Option<i32>);

impl GroupGuard {
    pub(super) fn kill(&self, signal: nix::sys::signal::Signal) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill(nix::sys::signal::Signal::SIGKILL);
    }
}

/// SIGTERM the step's process group, SIGKILL it after [`KILL_GRACE`].
pub(super) async fn stop(child: &mut Child, guard: &GroupGuard) {
    guard.kill(nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        guard.kill(nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait().await;
    }
}
