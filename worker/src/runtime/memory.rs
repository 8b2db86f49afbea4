//! Handing freed memory back to the operating system.
//!
//! glibc's allocator keeps what a thread frees in that thread's arena for reuse: after a burst of
//! thousands of steps (their start-up, their results) the heap is mostly free but the process's
//! resident memory stays at the burst's peak, batch after batch (issue 13: RSS 15 s after each batch
//! equalled the batch's peak). `malloc_trim(0)` returns every whole free page of every arena. It is
//! called every [`TRIM_EVERY`] while the worker's load changes and for a minute after, never while
//! nothing happens, so an idle worker costs nothing and a busy one a few milliseconds per call.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::shared::Shared;

/// How often memory is handed back while the load changes.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);
/// Quiet ticks after the last change that still trim (what the last steps freed).
const QUIET_TICKS: u32 = 6;

/// Trims the heap while steps come and go (see the module docs) until `stop`.
pub(crate) async fn hand_back(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    let mut last = None;
    let mut quiet = QUIET_TICKS;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = Some((shared.state.processed(), shared.state.active_count()));
        if now != last {
            last = now;
            quiet = 0;
        } else if quiet >= QUIET_TICKS {
            continue;
        } else {
            quiet += 1;
        }
        trim();
    }
}

/// Returns free heap pages to the OS; a no-op where the allocator is not glibc's.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds as free; any thread may call it
    // at any time (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}
