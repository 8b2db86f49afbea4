//! The `dagster-celery` drop-in: the Dagster Helm chart runs
//! `dagster-celery worker start -A dagster_celery_k8s.app -y <home>/celery-config.yaml -q <queue> [-- <celery args>]`
//! and probes liveness with `dagster-celery status -A … -y … | grep "${HOSTNAME}:.*OK"`. When the binary is
//! invoked under that name (a symlink in the image), these command lines are translated to celeriac's.

use std::path::PathBuf;

use crate::worker::WorkerArgs;

/// What a `dagster-celery` command line asks for.
#[derive(Debug, PartialEq)]
pub enum DagsterCelery {
    Worker(Box<WorkerArgs>),
    Status {
        config: Option<PathBuf>,
        timeout: f64,
    },
}

/// Parses `dagster-celery` arguments (without the program name).
pub fn parse(args: &[String]) -> Result<DagsterCelery, String> {
    let mut it = args.iter().peekable();
    let sub = it.next().map(String::as_str);
    match sub {
        Some("worker") => {
            match it.next().map(String::as_str) {
                Some("start") => {}
                other => {
                    return Err(format!(
                        "dagster-celery worker: expected `start`, got {other:?}"
                    ))
                }
            }
            let rest: Vec<String> = it.cloned().collect();
            parse_worker_start(&rest).map(|w| DagsterCelery::Worker(Box::new(w)))
        }
        Some("status") => {
            let mut config = None;
            let mut timeout = 1.0;
            while let Some(a) = it.next() {
                match a.as_str() {
                    "-y" | "--config-yaml" => config = it.next().map(PathBuf::from),
                    "-A" | "--app" | "-i" | "--include" => {
                        it.next();
                    }
                    "-t" | "--timeout" => {
                        timeout = it.next().and_then(|t| t.parse().ok()).unwrap_or(1.0)
                    }
                    other => tracing::warn!(
                        "dagster-celery status: ignoring unsupported argument {other:?}"
                    ),
                }
            }
            Ok(DagsterCelery::Status { config, timeout })
        }
        other => Err(format!(
            "dagster-celery: unsupported command {other:?} (supported: `worker start`, `status`)"
        )),
    }
}

fn parse_worker_start(args: &[String]) -> Result<WorkerArgs, String> {
    let mut w = WorkerArgs::default();
    let mut it = args.iter();
    let mut passthrough = false;
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--" => passthrough = true,
            // Celery worker flags, after `--` (the chart's additionalCeleryArgs) or before it.
            "-c" | "--concurrency" => {
                let v = value(a)?;
                w.concurrency = Some(
                    v.parse()
                        .map_err(|_| format!("--concurrency {v:?} is not a number"))?,
                );
            }
            "-Q" | "--queues" => w.queues.extend(value(a)?.split(',').map(str::to_owned)),
            "-n" | "--hostname" | "--name" => w.hostname = Some(value(a)?),
            "-l" | "--loglevel" => {
                value(a)?; // the process log level is set by `-l` before the subcommand or RUST_LOG
            }
            // dagster-celery's own flags.
            "-A" | "--app" | "-i" | "--include" => {
                value(a)?; // the app is always Dagster's celery-k8s app; includes import Python code
            }
            "-y" | "--config-yaml" => w.dagster_celery_config = Some(PathBuf::from(value(a)?)),
            "-q" | "--queue" => w.queues.push(value(a)?),
            "-d" | "--background" => {
                return Err("--background is not supported: run celeriac in the foreground".into())
            }
            "-E" | "--task-events" => w.task_events = true,
            "--without-gossip" | "--without-mingle" | "--without-heartbeat" => {}
            other if other.starts_with("--prefetch-multiplier") || other.starts_with("--pool") => {
                // Prefetch follows each queue's free slots; celeriac has no process pool.
                if !other.contains('=') {
                    it.next();
                }
            }
            other if other.starts_with("--concurrency=") => {
                let v = &other["--concurrency=".len()..];
                w.concurrency = Some(
                    v.parse()
                        .map_err(|_| format!("--concurrency {v:?} is not a number"))?,
                );
            }
            other => tracing::warn!(
                passthrough,
                "dagster-celery worker start: ignoring unsupported argument {other:?}"
            ),
        }
    }
    if w.hostname.is_none() {
        let suffix = uuid_suffix();
        w.hostname = Some(format!("dagster-{suffix}@%h"));
    }
    Ok(w)
}

/// Six hex characters, like dagster-celery's `dagster-<uuid[-6:]>` node names.
fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:06x}",
        (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn helm_chart_command_line() {
        let got = parse(&args(
            "worker start -A dagster_celery_k8s.app -y /opt/dagster/dagster_home/celery-config.yaml -q dagster -- -c 8 --prefetch-multiplier=1 -E",
        ))
        .expect("parses");
        let DagsterCelery::Worker(w) = got else {
            panic!("worker expected")
        };
        assert_eq!(w.queues, vec!["dagster".to_string()]);
        assert_eq!(w.concurrency, Some(8));
        assert_eq!(
            w.dagster_celery_config,
            Some(PathBuf::from(
                "/opt/dagster/dagster_home/celery-config.yaml"
            ))
        );
        assert!(w
            .hostname
            .as_deref()
            .is_some_and(|h| h.starts_with("dagster-") && h.ends_with("@%h")));
    }

    #[test]
    fn liveness_probe_command_line() {
        let got = parse(&args(
            "status -A dagster_celery_k8s.app -y /opt/dagster/dagster_home/celery-config.yaml",
        ))
        .expect("parses");
        assert_eq!(
            got,
            DagsterCelery::Status {
                config: Some(PathBuf::from(
                    "/opt/dagster/dagster_home/celery-config.yaml"
                )),
                timeout: 1.0
            }
        );
        assert!(parse(&args("worker stop")).is_err());
        assert!(parse(&args("worker start -q")).is_err());
    }
}
