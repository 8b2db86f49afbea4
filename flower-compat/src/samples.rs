//! Queue samples: one measurement of one queue (ready, reserved, running, limit) and the bounded
//! buffer of them in memory. The record type of the queue charts, shared by the sampler and series
//! ([`crate::series`]) and by the history store ([`crate::store`]), which persists them; a module of
//! its own so that neither of those depends on the other for it.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Queue samples kept (memory and store): at one sample per queue every 5 s, 24 h of 5 queues.
pub const MAX_SAMPLES: usize = 100_000;

/// One measurement of one queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueSample {
    /// When it was measured (epoch seconds).
    pub ts: f64,
    pub queue: String,
    /// Ready in the broker.
    pub ready: u64,
    /// Redis only: ready per priority step (`"0"`, `"3"`, `"6"`, `"9"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priorities: Option<BTreeMap<String, u64>>,
    /// Prefetched by a worker, not started.
    pub reserved: u64,
    /// Executing.
    pub running: u64,
    /// Sum over the live workers consuming the queue of their limit for it (celeriac: the queue's
    /// concurrency; Python workers: the pool size, shared by their queues). `None` = unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// The samples in memory, oldest first, bounded by [`MAX_SAMPLES`] and the age bound.
#[derive(Debug, Default)]
pub struct QueueSamples {
    samples: VecDeque<QueueSample>,
}

impl QueueSamples {
    pub fn push(&mut self, s: QueueSample) {
        if self.samples.len() >= MAX_SAMPLES {
            self.samples.pop_front();
        }
        // Restored and measured samples arrive in time order; keep it so even if a clock step puts
        // one slightly out of place.
        let at = self.samples.partition_point(|x| x.ts <= s.ts);
        self.samples.insert(at, s);
    }

    pub fn extend(&mut self, samples: impl IntoIterator<Item = QueueSample>) {
        for s in samples {
            self.push(s);
        }
    }

    pub fn evict_older_than(&mut self, cutoff: f64) {
        while self.samples.front().is_some_and(|s| s.ts < cutoff) {
            self.samples.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Samples at or after `since`.
    pub fn since(&self, since: f64) -> impl Iterator<Item = &QueueSample> {
        let from = self.samples.partition_point(|s| s.ts < since);
        self.samples.range(from..)
    }
}
