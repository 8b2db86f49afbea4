//! flower-compat (`celeriac flower`): Flower 2.2's REST API, `/metrics` and a live dashboard for a Celery
//! fleet (Python workers and celeriac workers alike), with task history that survives restarts.
//!
//! Modules, one concept each, in the order the data flows: [`events`] (the `celeryev` consumer) feeds
//! [`state`] (workers and [`task`]s merged as `celery.events.state` does, bounded), which [`store`]
//! persists (Redis or PostgreSQL) through [`housekeeping`]'s write-behind; [`inspector`] asks workers
//! for details over remote control; [`queues`] measures queue lengths; [`results`] sends tasks and reads
//! results; [`dagster`] extracts Dagster context; [`search`] parses `/api/tasks`' search; [`series`]
//! makes the dashboard's chart series (and samples queues into [`samples`] for them); [`timeline`] lays
//! out a Dagster run's steps on the fleet, with [`eventlog`] reading the run's step events from
//! Dagster's database; [`api`] serves Flower's routes, [`dashboard`] the web page, [`metrics`]
//! `/metrics`, [`auth`] basic auth. [`shared`] is what the handlers and loops share; [`server`] puts
//! the process together.
//!
//! This file only names the modules and re-exports what the `celeriac` binary uses.

pub mod api;
pub mod auth;
pub mod config;
pub mod dagster;
pub mod dashboard;
pub mod eventlog;
pub mod events;
pub mod housekeeping;
pub mod inspector;
pub mod metrics;
pub mod queues;
pub mod results;
pub mod samples;
pub mod search;
pub mod series;
pub mod server;
pub mod shared;
pub mod state;
pub mod store;
pub mod task;
pub mod timeline;

pub use config::FlowerArgs;
pub use server::{app, run, serve, FlowerError};
pub use shared::Shared;
