//! `celeriac flower` options: Flower's names where Flower has one (`--broker`, `--port`, `--address`,
//! `--basic-auth`, `--url-prefix`, `--max-tasks`, `--read-only`, `--inspect-timeout`), with the same
//! environment variables (`CELERY_BROKER_URL`, `FLOWER_PORT`, …), plus celeriac's own.

use std::time::Duration;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct FlowerArgs {
    /// Broker URL (amqp://… or redis://…).
    #[arg(
        short = 'b',
        long,
        env = "CELERY_BROKER_URL",
        default_value = "amqp://guest:guest@localhost:5672//"
    )]
    pub broker: String,
    /// Result backend for /api/task/result and apply (rpc://, redis://…, disabled://).
    #[arg(long, env = "CELERY_RESULT_BACKEND", default_value = "disabled://")]
    pub result_backend: String,
    /// HTTP port.
    #[arg(long, env = "FLOWER_PORT", default_value_t = 5555)]
    pub port: u16,
    /// HTTP address (empty = all interfaces).
    #[arg(long, env = "FLOWER_ADDRESS", default_value = "")]
    pub address: String,
    /// `user:password` pairs allowed in; repeat or separate with commas. Empty = no authentication.
    #[arg(long = "basic-auth", env = "FLOWER_BASIC_AUTH", value_delimiter = ',')]
    pub basic_auth: Vec<String>,
    /// Serve everything under this path prefix (e.g. `flower` → `/flower/api/workers`).
    #[arg(long, env = "FLOWER_URL_PREFIX", default_value = "")]
    pub url_prefix: String,
    /// Refuse every control endpoint (shutdown, pool, queues, revoke, apply…) with 403.
    #[arg(long, env = "FLOWER_READ_ONLY", default_value_t = false)]
    pub read_only: bool,
    /// Tasks kept in memory and in the history store.
    #[arg(long, env = "FLOWER_MAX_TASKS", default_value_t = 100_000)]
    pub max_tasks: usize,
    /// Tasks older than this are forgotten (seconds, or with a unit: 90m, 36h, 7d).
    #[arg(long, env = "FLOWER_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub max_age: Duration,
    /// Where task history is kept across restarts: redis://… or postgresql://…; unset = memory only.
    #[arg(long, env = "FLOWER_HISTORY_BACKEND")]
    pub history_backend: Option<String>,
    /// Key prefix (Redis) or table-name prefix (PostgreSQL) of the history.
    #[arg(long, env = "FLOWER_HISTORY_PREFIX", default_value = "celeriac_flower")]
    pub history_prefix: String,
    /// Dagster UI base URL; task pages then link to `<url>/runs/<run_id>`.
    #[arg(long, env = "FLOWER_DAGSTER_URL")]
    pub dagster_url: Option<String>,
    /// The Dagster instance's PostgreSQL database (`postgresql://…`), read (never written) for the run
    /// timeline's Job and step edges; unset = the timeline shows what Celery events tell only.
    #[arg(long, env = "FLOWER_DAGSTER_DB")]
    pub dagster_db: Option<String>,
    /// Password of `--dagster-db`, when the URL has none (Helm passes the instance's Secret here).
    #[arg(long, env = "FLOWER_DAGSTER_DB_PASSWORD", hide_env_values = true)]
    pub dagster_db_password: Option<String>,
    /// Remote-control reply timeout in milliseconds (Flower's `--inspect_timeout`).
    #[arg(long, env = "FLOWER_INSPECT_TIMEOUT", default_value_t = 1000.0)]
    pub inspect_timeout: f64,
    /// Queue reported by /api/queues/length when no worker reports its queues (Celery's default `celery`).
    #[arg(long, env = "CELERY_TASK_DEFAULT_QUEUE", default_value = "celery")]
    pub default_queue: String,
    /// Do not broadcast `enable_events` every 5 s.
    #[arg(long, env = "FLOWER_DISABLE_ENABLE_EVENTS", default_value_t = false)]
    pub no_enable_events: bool,
}

/// `3600`, `90s`, `15m`, `36h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => return Err(format!("unknown duration unit {other:?} (s, m, h, d)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl FlowerArgs {
    /// The normalized URL prefix: `""` or `/something` without a trailing slash.
    pub fn prefix(&self) -> String {
        let p = self.url_prefix.trim_matches('/');
        if p.is_empty() {
            String::new()
        } else {
            format!("/{p}")
        }
    }

    pub fn inspect_timeout(&self) -> Duration {
        Duration::from_secs_f64((self.inspect_timeout / 1000.0).clamp(0.05, 60.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604800));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5w").is_err());
    }
}
