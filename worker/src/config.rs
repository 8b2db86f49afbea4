//! Worker configuration: Celery setting names where Celery has one, `config`-crate layering.
//!
//! Sources, lowest to highest precedence:
//! 1. built-in defaults (Dagster's: queue `dagster`, JSON only, results kept 1 day);
//! 2. Dagster's celery YAML (`-y celery.yaml`, as mounted by the Dagster Helm chart): `broker`, `backend`
//!    and `config_source` under `execution.celery` or `execution.config`, with `{env: VAR}` indirections;
//! 3. a celeriac config file (`--config`, YAML/TOML/JSON) using the same Celery keys plus celeriac's own;
//! 4. environment: `CELERIAC_<KEY>` (e.g. `CELERIAC_WORKER_CONCURRENCY=4`; nested with `__`:
//!    `CELERIAC_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT=60`), and Dagster's
//!    `DAGSTER_CELERY_BROKER_URL` / `DAGSTER_CELERY_BACKEND_URL`;
//! 5. command-line flags.
//!
//! Sources 2–4 also carry the settings of the tasks the worker serves (the Dagster step task's
//! `step_launcher` and `kubernetes.*`, read by `celeriac_dagster::config`): [`read_file_and_env`] and
//! [`read_dagster_celery_config_source`] read any settings type from them, and the binary layers each
//! side the same way.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

pub use celeriac_wire::broker::redis::PriorityOrder;

/// Everything the worker needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub broker_url: String,
    pub result_backend: String,
    /// Celery node name, `name@host`.
    pub hostname: String,
    pub queues: Vec<QueueConfig>,
    pub accept_content: Vec<String>,
    pub max_message_bytes: usize,
    pub track_started: bool,
    /// Send task events (Celery's `worker_send_task_events`, `-E`); worker events are always sent.
    pub task_events: bool,
    pub result_expires: Duration,
    /// How long a warm shutdown waits for running steps before handing them back to the broker.
    pub shutdown_grace: Duration,
    pub redis: RedisConfig,
    /// Celery's `broker_use_ssl` (CA, client certificate) for `amqps://` / `rediss://` brokers.
    pub broker_tls: celeriac_wire::tls::TlsOptions,
    /// Celery's `redis_backend_use_ssl` for a `rediss://` result backend.
    pub backend_tls: celeriac_wire::tls::TlsOptions,
}

/// One consumed queue and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub name: String,
    /// Maximum steps of this queue running at once in this worker.
    pub concurrency: usize,
    pub ack: AckPolicy,
}

/// When a task message is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckPolicy {
    /// After the result is stored (celeriac default): a worker crash never loses a step.
    Late,
    /// When execution starts (Celery's default): a crash mid-step loses the task.
    Early,
}

/// Redis transport options.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub visibility_timeout: Duration,
    pub priority_order: PriorityOrder,
}

/// Errors in configuration: always say which setting and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("environment variable {var} referenced by {key} is not set")]
    MissingEnv { key: String, var: String },
}

/// Raw, layered settings before validation. Keys are Celery's where Celery has them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub broker_url: Option<String>,
    pub result_backend: Option<String>,
    pub hostname: Option<String>,
    /// Queues to consume (Celery's `-Q`); `task_default_queue` when empty.
    pub queues: Vec<String>,
    pub task_default_queue: Option<String>,
    /// Default per-queue concurrency (Celery's `worker_concurrency` / `-c`).
    pub worker_concurrency: Option<usize>,
    /// Per-queue overrides: `{queue: n}`.
    pub queue_concurrency: BTreeMap<String, usize>,
    pub task_acks_late: Option<bool>,
    /// Per-queue ack policy overrides: `{queue: late|early}`.
    pub queue_ack: BTreeMap<String, AckPolicy>,
    pub accept_content: Option<Vec<String>>,
    pub task_track_started: Option<bool>,
    pub worker_send_task_events: Option<bool>,
    pub result_expires: Option<f64>,
    pub max_message_bytes: Option<usize>,
    pub shutdown_grace_seconds: Option<f64>,
    pub broker_transport_options: TransportOptions,
    /// Celery's `broker_use_ssl`: `true` or `{ca_certs, cert_reqs, certfile, keyfile}` (redis-py's
    /// `ssl_*` spellings too).
    pub broker_use_ssl: Option<Value>,
    /// Celery's `redis_backend_use_ssl` (same keys).
    pub redis_backend_use_ssl: Option<Value>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct TransportOptions {
    pub visibility_timeout: Option<f64>,
    /// celeriac extension: `kombu` (default) or `dagster`.
    pub priority_order: Option<PriorityOrder>,
}

impl Settings {
    /// Reads a celeriac config file and `CELERIAC_*` environment variables through the `config` crate.
    pub fn from_file_and_env(path: Option<&Path>) -> Result<Settings, ConfigError> {
        read_file_and_env(path)
    }

    /// Reads Dagster's celery YAML (`dagster-celery worker start -y`), resolving `{env: VAR}` values.
    pub fn from_dagster_celery_yaml(path: &Path) -> Result<Settings, ConfigError> {
        let section = celery_yaml_section(path)?;
        let mut settings: Settings = config_source(&section)?;
        if let Some(b) = section.get("broker") {
            settings.broker_url = resolve_env(b, "broker")?.as_str().map(str::to_owned);
        }
        if let Some(b) = section.get("backend") {
            settings.result_backend = resolve_env(b, "backend")?.as_str().map(str::to_owned);
        }
        Ok(settings)
    }

    /// Settings from Dagster's well-known environment variables.
    pub fn from_dagster_env() -> Settings {
        Settings {
            broker_url: std::env::var("DAGSTER_CELERY_BROKER_URL")
                .ok()
                .filter(|s| !s.is_empty()),
            result_backend: std::env::var("DAGSTER_CELERY_BACKEND_URL")
                .ok()
                .filter(|s| !s.is_empty()),
            ..Default::default()
        }
    }

    /// Overlays `other` on `self`: every value `other` sets wins.
    pub fn merge(mut self, other: Settings) -> Settings {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            broker_url,
            result_backend,
            hostname,
            task_default_queue,
            worker_concurrency,
            task_acks_late,
            accept_content,
            task_track_started,
            worker_send_task_events,
            result_expires,
            max_message_bytes,
            shutdown_grace_seconds,
            broker_use_ssl,
            redis_backend_use_ssl
        );
        if !other.queues.is_empty() {
            self.queues = other.queues;
        }
        self.queue_concurrency.extend(other.queue_concurrency);
        self.queue_ack.extend(other.queue_ack);
        if other.broker_transport_options.visibility_timeout.is_some() {
            self.broker_transport_options.visibility_timeout =
                other.broker_transport_options.visibility_timeout;
        }
        if other.broker_transport_options.priority_order.is_some() {
            self.broker_transport_options.priority_order =
                other.broker_transport_options.priority_order;
        }
        self
    }

    /// The consumed queues (`-Q`, else `task_default_queue`) with their concurrency and ack policy;
    /// per-queue settings must name a consumed queue.
    fn queue_configs(&self) -> Result<Vec<QueueConfig>, ConfigError> {
        let default_concurrency = self.worker_concurrency.unwrap_or(1);
        if default_concurrency == 0 {
            return Err(ConfigError::Invalid {
                key: "worker_concurrency".into(),
                reason: "must be at least 1".into(),
            });
        }
        let default_ack = match self.task_acks_late {
            Some(false) => AckPolicy::Early,
            _ => AckPolicy::Late,
        };
        let mut names: Vec<String> = self
            .queues
            .iter()
            .flat_map(|q| q.split(','))
            .map(|q| q.trim().to_string())
            .filter(|q| !q.is_empty())
            .collect();
        if names.is_empty() {
            names.push(
                self.task_default_queue
                    .clone()
                    .unwrap_or_else(|| "dagster".into()),
            );
        }
        names.dedup();
        for q in self.queue_concurrency.keys().chain(self.queue_ack.keys()) {
            if !names.contains(q) {
                return Err(ConfigError::Invalid {
                    key: format!("queue_concurrency/queue_ack.{q}"),
                    reason: format!("queue {q} is not consumed (queues: {})", names.join(",")),
                });
            }
        }
        let mut queues = Vec::new();
        for name in names {
            let concurrency = self
                .queue_concurrency
                .get(&name)
                .copied()
                .unwrap_or(default_concurrency);
            if concurrency == 0 {
                return Err(ConfigError::Invalid {
                    key: format!("queue_concurrency.{name}"),
                    reason: "must be at least 1".into(),
                });
            }
            let ack = self.queue_ack.get(&name).copied().unwrap_or(default_ack);
            queues.push(QueueConfig {
                name,
                concurrency,
                ack,
            });
        }
        Ok(queues)
    }

    /// Validates and fills defaults.
    pub fn resolve(self) -> Result<WorkerConfig, ConfigError> {
        let broker_url = self.broker_url.clone().unwrap_or_else(|| {
            // dagster_celery.defaults.broker_url
            let host =
                std::env::var("DAGSTER_CELERY_BROKER_HOST").unwrap_or_else(|_| "localhost".into());
            format!("pyamqp://guest@{host}:5672//")
        });
        celeriac_wire::url::parse_broker(&broker_url).map_err(|e| ConfigError::Invalid {
            key: "broker_url".into(),
            reason: e.to_string(),
        })?;
        let result_backend = self
            .result_backend
            .clone()
            .unwrap_or_else(|| "rpc://".into());
        celeriac_wire::url::parse_backend(&result_backend).map_err(|e| ConfigError::Invalid {
            key: "result_backend".into(),
            reason: e.to_string(),
        })?;

        let queues = self.queue_configs()?;

        let tls = |v: &Option<Value>, key: &str| {
            v.as_ref()
                .map(celeriac_wire::tls::TlsOptions::from_setting)
                .transpose()
                .map(Option::unwrap_or_default)
                .map_err(|e| ConfigError::Invalid {
                    key: key.into(),
                    reason: e.to_string(),
                })
        };
        let broker_tls = tls(&self.broker_use_ssl, "broker_use_ssl")?;
        let backend_tls = tls(&self.redis_backend_use_ssl, "redis_backend_use_ssl")?;
        Ok(WorkerConfig {
            broker_tls,
            backend_tls,
            broker_url,
            result_backend,
            hostname: expand_hostname(self.hostname.as_deref()),
            queues,
            accept_content: self.accept_content.unwrap_or_else(|| vec!["json".into()]),
            max_message_bytes: self.max_message_bytes.unwrap_or(16 * 1024 * 1024),
            track_started: self.task_track_started.unwrap_or(false),
            task_events: self.worker_send_task_events.unwrap_or(false),
            result_expires: seconds(self.result_expires, 86400.0, "result_expires")?,
            shutdown_grace: seconds(self.shutdown_grace_seconds, 60.0, "shutdown_grace_seconds")?,
            redis: RedisConfig {
                visibility_timeout: seconds(
                    self.broker_transport_options.visibility_timeout,
                    3600.0,
                    "broker_transport_options.visibility_timeout",
                )?,
                priority_order: self
                    .broker_transport_options
                    .priority_order
                    .unwrap_or(PriorityOrder::Kombu),
            },
        })
    }
}

/// Reads the settings of type `T` from a celeriac config file (YAML, TOML or JSON) and `CELERIAC_*`
/// environment variables through the `config` crate. The worker's [`Settings`] and the settings of
/// the tasks it serves (the Dagster step task's `step_launcher`, `kubernetes.*`) are read from the
/// same sources, each picking its own keys.
pub fn read_file_and_env<T: DeserializeOwned>(path: Option<&Path>) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(p) = path {
        builder = builder.add_source(config::File::from(p).required(true));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("CELERIAC")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("queues")
            .with_list_parse_key("accept_content"),
    );
    let built = builder.build().map_err(|e| ConfigError::File {
        path: path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<environment>".into()),
        reason: e.to_string(),
    })?;
    built.try_deserialize().map_err(|e| ConfigError::Invalid {
        key: path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "CELERIAC_*".into()),
        reason: e.to_string(),
    })
}

/// Reads the settings of type `T` from the `config_source` of Dagster's celery YAML, resolving
/// `{env: VAR}` values (`T::default()` when there is none).
pub fn read_dagster_celery_config_source<T: DeserializeOwned + Default>(
    path: &Path,
) -> Result<T, ConfigError> {
    config_source(&celery_yaml_section(path)?)
}

/// The celery section of Dagster's celery YAML: `execution: {celery: {...}}` (legacy, what the chart
/// writes), `execution: {config: {...}}` or `execution: {celery-k8s: {config: {...}}}`.
fn celery_yaml_section(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let doc: Value = serde_norway::from_str(&text).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let exec = doc.get("execution").cloned().unwrap_or(Value::Null);
    let section = exec
        .get("celery")
        .or_else(|| exec.get("config"))
        .or_else(|| exec.get("celery-k8s").and_then(|c| c.get("config")))
        .cloned()
        .unwrap_or(Value::Null);
    Ok(section.get("config").cloned().unwrap_or(section))
}

fn config_source<T: DeserializeOwned + Default>(section: &Value) -> Result<T, ConfigError> {
    match section.get("config_source") {
        Some(Value::Object(cs)) => {
            let resolved = resolve_env(&Value::Object(cs.clone()), "config_source")?;
            serde_json::from_value(resolved).map_err(|e| ConfigError::Invalid {
                key: "config_source".into(),
                reason: e.to_string(),
            })
        }
        _ => Ok(T::default()),
    }
}

/// A duration setting in seconds (`default` when unset): finite and not negative.
pub fn seconds(value: Option<f64>, default: f64, key: &str) -> Result<Duration, ConfigError> {
    let s = value.unwrap_or(default);
    if !s.is_finite() || s < 0.0 {
        return Err(ConfigError::Invalid {
            key: key.into(),
            reason: format!("{s} is not a duration in seconds"),
        });
    }
    Ok(Duration::from_secs_f64(s))
}

/// Resolves Dagster's `{env: VAR}` indirection anywhere in a value.
fn resolve_env(v: &Value, key: &str) -> Result<Value, ConfigError> {
    match v {
        Value::Object(m) if m.len() == 1 && m.contains_key("env") => {
            let var = m.get("env").and_then(Value::as_str).unwrap_or_default();
            std::env::var(var)
                .map(Value::String)
                .map_err(|_| ConfigError::MissingEnv {
                    key: key.into(),
                    var: var.into(),
                })
        }
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                out.insert(k.clone(), resolve_env(v, &format!("{key}.{k}"))?);
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

/// The machine's host name (the pod name on Kubernetes).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            hostname::get()
                .ok()
                .map(|h| h.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "localhost".into())
}

/// Celery node names: `-n name` with `%h` (host), `%n` (host short name), `%d` (domain); `name@host`
/// when no `@` is given; default `celeriac-<6 hex>@<host>` like Dagster's `dagster-<6>@%h`.
pub fn expand_hostname(name: Option<&str>) -> String {
    let host = host_name();
    let short = host.split('.').next().unwrap_or(&host).to_string();
    let domain = host
        .split_once('.')
        .map(|(_, d)| d.to_string())
        .unwrap_or_default();
    match name {
        Some(n) if !n.is_empty() => {
            let n = n
                .replace("%h", &host)
                .replace("%n", &short)
                .replace("%d", &domain);
            if n.contains('@') {
                n
            } else {
                format!("{n}@{host}")
            }
        }
        _ => {
            let suffix = uuid::Uuid::new_v4().simple().to_string();
            format!("celeriac-{}@{host}", &suffix[..6])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_dagster() {
        let c = Settings::default().resolve().expect("defaults resolve");
        assert_eq!(c.result_backend, "rpc://");
        assert_eq!(
            c.queues,
            vec![QueueConfig {
                name: "dagster".into(),
                concurrency: 1,
                ack: AckPolicy::Late
            }]
        );
        assert_eq!(c.accept_content, vec!["json".to_string()]);
        assert!(c.hostname.starts_with("celeriac-"));
    }

    #[test]
    fn per_queue_limits_and_ack() {
        let s = Settings {
            queues: vec!["a,b".into()],
            worker_concurrency: Some(4),
            queue_concurrency: [("a".to_string(), 2)].into(),
            queue_ack: [("b".to_string(), AckPolicy::Early)].into(),
            ..Default::default()
        };
        let c = s.resolve().expect("resolves");
        assert_eq!(
            c.queues[0],
            QueueConfig {
                name: "a".into(),
                concurrency: 2,
                ack: AckPolicy::Late
            }
        );
        assert_eq!(
            c.queues[1],
            QueueConfig {
                name: "b".into(),
                concurrency: 4,
                ack: AckPolicy::Early
            }
        );
    }

    #[test]
    fn bad_values_are_named() {
        let s = Settings {
            queues: vec!["a".into()],
            queue_concurrency: [("zz".to_string(), 2)].into(),
            ..Default::default()
        };
        let e = s.resolve().unwrap_err().to_string();
        assert!(e.contains("zz"), "{e}");
        let s = Settings {
            broker_url: Some("sqs://x".into()),
            ..Default::default()
        };
        assert!(s.resolve().unwrap_err().to_string().contains("broker_url"));
    }

    #[test]
    fn dagster_celery_yaml_with_env_indirection() {
        let dir = std::env::temp_dir().join(format!("celeriac-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("celery.yaml");
        std::fs::write(
            &path,
            "execution:\n  celery:\n    broker:\n      env: CELERIAC_TEST_BROKER_X\n    backend: rpc://\n    config_source:\n      worker_concurrency: 3\n      task_default_queue: steps\n",
        )
        .expect("write yaml");
        std::env::set_var("CELERIAC_TEST_BROKER_X", "redis://127.0.0.1:6379/4");
        let c = Settings::from_dagster_celery_yaml(&path)
            .expect("parses")
            .resolve()
            .expect("resolves");
        assert_eq!(c.broker_url, "redis://127.0.0.1:6379/4");
        assert_eq!(
            c.queues,
            vec![QueueConfig {
                name: "steps".into(),
                concurrency: 3,
                ack: AckPolicy::Late
            }]
        );
        std::env::remove_var("CELERIAC_TEST_BROKER_X");
        let e = Settings::from_dagster_celery_yaml(&path).unwrap_err();
        assert!(matches!(e, ConfigError::MissingEnv { .. }));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn hostname_templates() {
        let h = host_name();
        assert_eq!(expand_hostname(Some("w1@%h")), format!("w1@{h}"));
        assert_eq!(expand_hostname(Some("w1")), format!("w1@{h}"));
    }
}
