//! The celeriac worker: a generic Celery worker. It consumes task messages from RabbitMQ or Redis, runs
//! each with the task registered under its name, and reports the result over the Celery result backend.
//!
//! Modules: [`config`] (settings and their layering), [`runtime`] (consumers, request handling, remote
//! control, shutdown), [`tasks`] (the [`tasks::Task`] trait, the [`tasks::Registry`] the consumer
//! dispatches on, `celery.ping`), [`events`] (Celery events), [`metrics`] and [`http`] (`/metrics`,
//! health), [`connect`] (brokers and backends from URLs).
//!
//! The worker knows Dagster only through the registry: the `execute_step_k8s_job` task, its launchers
//! and settings live in the `celeriac-dagster` crate, and the `celeriac` binary wires the two together.

pub mod config;
pub mod connect;
pub mod events;
pub mod http;
pub mod metrics;
pub mod runtime;
pub mod tasks;

/// Re-exported so binaries share the exact cancellation type the worker uses.
pub use tokio_util::sync::CancellationToken;
