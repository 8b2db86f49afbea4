//! The celeriac worker: consumes Dagster step tasks from RabbitMQ or Redis, runs each step, and reports
//! the result to the run coordinator over the Celery result backend.
//!
//! Modules: [`config`] (settings), [`runtime`] (consumers, request handling, shutdown), [`tasks`] (what
//! can run), [`dagster`] (the Dagster side of a step), [`launcher`] (where a step's process runs),
//! [`connect`] (brokers and backends from URLs).

pub mod config;
pub mod connect;
pub mod dagster;
pub mod events;
pub mod http;
pub mod kubernetes;
pub mod launcher;
pub mod metrics;
pub mod runtime;
pub mod tasks;

/// Re-exported so binaries share the exact cancellation type the worker uses.
pub use tokio_util::sync::CancellationToken;
