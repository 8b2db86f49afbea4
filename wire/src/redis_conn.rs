//! A Redis command connection that notices a dead server. redis-rs's `ConnectionManager` reconnects
//! when the socket is closed, but a server that stops answering (a half-open connection, a black
//! hole, a frozen host) only yields response timeouts, on the same dead socket, forever. This wrapper
//! replaces the manager when a command times out or fails with an I/O error: one log line, one
//! reconnect counted ([`crate::reconnects`]), and the next command goes to a fresh connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::{info, warn};

/// How long a command may wait for its answer before the server is considered gone.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle connection is checked.
pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A self-healing command connection.
pub struct ResilientConnection {
    client: redis::Client,
    /// What this connection serves, for logs (`broker`, `result backend`).
    what: &'static str,
    /// Redacted URL, for logs.
    url: String,
    current: Mutex<(u64, ConnectionManager)>,
    generation: AtomicU64,
    rebuilding: tokio::sync::Mutex<()>,
}

fn config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
}

async fn open(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT * 2,
        ConnectionManager::new_with_config(client.clone(), config()),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {} s", (CONNECT_TIMEOUT * 2).as_secs()),
        ))),
    }
}

/// The server is gone (as opposed to refusing one command).
pub fn is_dead_peer(e: &redis::RedisError) -> bool {
    e.is_timeout() || e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

impl ResilientConnection {
    pub async fn connect(
        client: redis::Client,
        what: &'static str,
        url: String,
    ) -> redis::RedisResult<ResilientConnection> {
        // One plain connection first: the connection manager retries a failed handshake until its
        // timeout, so a server whose TLS certificate is not trusted was reported as "no connection
        // within 10 s"; this one fails at once with the handshake's own error.
        match tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection()).await
        {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(probe)) => drop(probe),
            Err(_) => {}
        }
        let con = open(&client).await?;
        Ok(ResilientConnection {
            client,
            what,
            url,
            current: Mutex::new((0, con)),
            generation: AtomicU64::new(0),
            rebuilding: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, ConnectionManager)> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current connection and its generation (pass both back to [`Self::failed`]).
    pub fn get(&self) -> (u64, ConnectionManager) {
        self.lock().clone()
    }

    /// PINGs the server every `interval` while `self` lives; a PING that fails or goes unanswered
    /// for [`RESPONSE_TIMEOUT`] replaces the connection (the health check redis-py runs with
    /// `health_check_interval`), so a silently dead server is noticed even when nothing else is sent.
    pub fn spawn_health_check(self: &std::sync::Arc<Self>, interval: Duration) {
        let weak = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(me) = weak.upgrade() else { break };
                let (generation, mut con) = me.get();
                let r: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut con).await;
                if let Err(e) = r {
                    me.failed(generation, &e).await;
                }
            }
        });
    }

    /// A command on connection `generation` failed with `e`: if the server looks dead, open a new
    /// connection (once per dead connection, however many commands saw it die).
    pub async fn failed(&self, generation: u64, e: &redis::RedisError) {
        if !is_dead_peer(e) {
            return;
        }
        let _guard = self.rebuilding.lock().await;
        if self.generation.load(Ordering::SeqCst) != generation {
            return; // somebody already replaced it
        }
        warn!(url = %self.url, "Redis {} connection is dead ({e}); reconnecting", self.what);
        match open(&self.client).await {
            Ok(con) => {
                let next = generation + 1;
                self.generation.store(next, Ordering::SeqCst);
                *self.lock() = (next, con);
                crate::reconnects::record("redis");
                info!(url = %self.url, "Redis {} connection re-opened", self.what);
            }
            // Still down: the next failing command tries again.
            Err(e) => {
                warn!(url = %self.url, "cannot reconnect the Redis {} connection yet: {e}", self.what)
            }
        }
    }
}
