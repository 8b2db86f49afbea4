//! What the worker scenario is run with: the knobs a run may change (`Params`, full and `--quick`)
//! and the fixed places both sides share (broker, result backend, the test cluster's directory and
//! the two Kubernetes identities), in one place so that every phase reads the same ones.

/// The broker both sides consume from: RabbitMQ (the default, the headline results) or Redis
/// (`LOAD_BROKER=redis`, kombu's layout), results in `worker.json` / `worker-redis.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Amqp,
    Redis,
}

impl BrokerKind {
    /// `LOAD_BROKER` (`amqp` or `redis`; unset: `amqp`).
    pub fn from_env() -> anyhow::Result<BrokerKind> {
        match std::env::var("LOAD_BROKER").as_deref() {
            Err(_) | Ok("amqp") => Ok(BrokerKind::Amqp),
            Ok("redis") => Ok(BrokerKind::Redis),
            Ok(other) => anyhow::bail!("LOAD_BROKER={other:?}: want amqp or redis"),
        }
    }

    /// The broker URL both sides are given. Redis uses a database of its own (the results are in 11).
    pub fn url(self) -> &'static str {
        match self {
            BrokerKind::Amqp => "amqp://guest:guest@127.0.0.1:5672//",
            BrokerKind::Redis => "redis://127.0.0.1:6379/10",
        }
    }

    /// The broker a run's figures name (`params.broker`; runs from before the choice were RabbitMQ's).
    pub fn of_figures(f: &serde_json::Value) -> BrokerKind {
        let named = f
            .pointer("/params/broker")
            .and_then(serde_json::Value::as_str);
        if named == Some(BrokerKind::Redis.name()) {
            BrokerKind::Redis
        } else {
            BrokerKind::Amqp
        }
    }

    /// As the figures name it (`params.broker`).
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Amqp => "amqp",
            BrokerKind::Redis => "redis",
        }
    }

    /// The stem of the results' files (`<stem>.json`, `<stem>-memory.png`, …).
    pub fn results_stem(self) -> &'static str {
        match self {
            BrokerKind::Amqp => "worker",
            BrokerKind::Redis => "worker-redis",
        }
    }
}
/// Results go to Redis on both sides: `date_done` of every result can be read back afterwards.
pub const BACKEND: &str = "redis://127.0.0.1:6379/11";
/// The Kubernetes test cluster's directory (kubeconfigs, logs, the audit log).
pub const RUN_DIR: &str = "/tmp/celeriac-k8s";
/// Kubernetes identities of the two sides (`celeriac-worker-<n>` of the test cluster).
pub const CELERIAC_USER: u8 = 8;
pub const PYTHON_USER: u8 = 9;

/// Knobs of the scenario.
#[derive(Debug, Clone)]
pub struct Params {
    /// Steps in flight at which celeriac's memory is measured (one batch each).
    pub celeriac_levels: Vec<usize>,
    /// Python worker concurrencies (`-c`), each run with that many steps in flight.
    pub python_levels: Vec<usize>,
    /// Longest a step is held (each batch's steps run until the scenario has measured the batch in
    /// flight and releases them; this only bounds a step the scenario forgot).
    pub step_seconds: f64,
    /// celeriac's `-c`.
    pub celeriac_concurrency: usize,
    /// Where the tasks are published and consumed.
    pub broker: BrokerKind,
}

impl Params {
    /// The full run; `LOAD_CELERIAC_LEVELS` / `LOAD_PYTHON_LEVELS` (comma-separated) replace the levels,
    /// e.g. for a shorter memory-only run of one side.
    pub fn full() -> anyhow::Result<Params> {
        Ok(Params {
            celeriac_levels: levels("LOAD_CELERIAC_LEVELS").unwrap_or(vec![10, 100, 1000, 3000]),
            python_levels: levels("LOAD_PYTHON_LEVELS").unwrap_or(vec![2, 8, 32]),
            step_seconds: 1800.0,
            celeriac_concurrency: 12000,
            broker: BrokerKind::from_env()?,
        })
    }
    pub fn quick() -> anyhow::Result<Params> {
        Ok(Params {
            celeriac_levels: vec![10, 100],
            python_levels: vec![1, 2],
            step_seconds: 300.0,
            celeriac_concurrency: 200,
            broker: BrokerKind::from_env()?,
        })
    }
}

/// Levels from a comma-separated environment variable; `None` when unset or unreadable.
fn levels(var: &str) -> Option<Vec<usize>> {
    let text = std::env::var(var).ok()?;
    let levels: Result<Vec<usize>, _> = text.split(',').map(|l| l.trim().parse()).collect();
    match levels {
        Ok(l) if !l.is_empty() => Some(l),
        _ => {
            eprintln!("loadtest: ignoring {var}={text:?} (want e.g. 10,100,1000)");
            None
        }
    }
}
