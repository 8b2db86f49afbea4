//! The bounds and the persistence of the task history, kept by one loop: once a second, tasks past
//! `--max-age` leave memory and changed tasks are written behind to the history store; once a minute
//! (and on the way out) the store is pruned to `--max-tasks` and `--max-age`.
//!
//! Write-behind rather than a write per event: a busy fleet sends thousands of events a second, and a
//! task that changes five times in a second is written once. A failed write leaves the tasks dirty for
//! the next round.

use std::sync::Arc;
use std::time::Duration;

use celeriac_wire::events::now_epoch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::shared::Shared;
use crate::store::HistoryStore;

/// Writes changed tasks to the store; on failure they stay dirty for the next round.
async fn flush(shared: &Shared, store: &dyn HistoryStore) {
    let dirty = shared.write_state().take_dirty();
    if dirty.is_empty() {
        return;
    }
    if let Err(e) = store.save(&dirty).await {
        warn!("saving {} tasks to the history: {e}", dirty.len());
        shared.metrics.history_write_errors.inc();
        shared
            .write_state()
            .mark_dirty(dirty.into_iter().map(|t| t.uuid));
    }
}

/// Once a second: age eviction in memory and the history write-behind; once a minute: store pruning.
pub async fn housekeeping(
    shared: Arc<Shared>,
    store: Option<Arc<dyn HistoryStore>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let cutoff = now_epoch() - shared.config.max_age.as_secs_f64();
        let count = {
            let mut st = shared.write_state();
            st.evict_older_than(cutoff);
            st.task_count()
        };
        shared.metrics.tasks_in_memory.set(count as i64);
        if let Some(store) = &store {
            flush(&shared, store.as_ref()).await;
            if n.is_multiple_of(60) || stopping {
                prune(&shared, store.as_ref(), cutoff).await;
            }
        }
        if stopping {
            return;
        }
        n += 1;
    }
}

/// Prunes the store's tasks (to `--max-tasks`, none first seen before `cutoff`) and queue samples.
async fn prune(shared: &Shared, store: &dyn HistoryStore, cutoff: f64) {
    match store.prune(shared.config.max_tasks, cutoff).await {
        Ok(0) => {}
        Ok(k) => info!("pruned {k} tasks from the history"),
        Err(e) => warn!("pruning the history: {e}"),
    }
    if let Err(e) = store.prune_samples(cutoff).await {
        warn!("pruning the queue samples: {e}");
    }
}
