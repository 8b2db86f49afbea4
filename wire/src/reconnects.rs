//! Process-wide counts of connections re-opened after a peer was found dead (closed, reset, or silent
//! past its heartbeat/response timeout), per peer: `rabbitmq`, `redis`, `postgres`. The worker exports
//! them as `celeriac_peer_reconnects_total{peer}`; each reconnect is also one log line where it happens.

use std::collections::BTreeMap;
use std::sync::Mutex;

static COUNTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts one reconnection to `peer`.
pub fn record(peer: &'static str) {
    let mut counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    *counts.entry(peer).or_default() += 1;
}

/// Every peer's count so far.
pub fn snapshot() -> Vec<(&'static str, u64)> {
    let counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    counts.iter().map(|(k, v)| (*k, *v)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_per_peer() {
        let before = super::snapshot();
        let get =
            |s: &[(&str, u64)], p: &str| s.iter().find(|(k, _)| *k == p).map_or(0, |(_, v)| *v);
        super::record("test-peer");
        super::record("test-peer");
        let after = super::snapshot();
        assert_eq!(get(&after, "test-peer"), get(&before, "test-peer") + 2);
    }
}
