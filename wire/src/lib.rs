//! The Celery wire layer shared by every celeriac component.
//!
//! Layers, bottom up: [`json`] (kombu's JSON dialect) → [`message`] (task messages, protocol v1/v2) and
//! [`result`] (result documents) → [`broker`] (RabbitMQ, Redis) and [`backend`] (rpc://, redis://).
//! [`task`] builds task messages as a Celery client publishes them. [`url`] turns Celery/Dagster URLs into the right implementation.

pub mod backend;
pub mod backoff;
pub mod broker;
pub mod connect;
pub mod events;
pub mod json;
pub mod message;
pub mod pidbox;
pub mod reconnects;
pub mod redis_conn;
pub mod result;
pub mod saferepr;
pub mod task;
pub mod tls;
pub mod url;
