//! Wall-clock time as seconds since the epoch: the one axis on which this program's own instants
//! (publish, hand-off) and the ones other processes record (API server audit log, Kubernetes status,
//! a result's `date_done`) can be subtracted from each other.

/// Seconds since the epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// An RFC 3339 timestamp, or one without a zone (taken as UTC, as Celery writes `date_done`), as
/// seconds since the epoch.
pub fn parse_time(s: &str) -> Option<f64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros() as f64 / 1e6);
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_micros() as f64 / 1e6)
}
