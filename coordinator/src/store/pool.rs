//! A small pool of connections to the instance database. Every decision of a run is a transaction on
//! a connection of its own, so a few connections serve many runs; a caller waits (FIFO) for whichever
//! connection frees first.

use tokio::sync::{Mutex, MutexGuard, Semaphore, SemaphorePermit};
use tokio_postgres::{Client, Config, NoTls};
use tracing::{debug, warn};

use super::error::{query, StoreError};
use super::schema::ddl;

/// A small pool of connections to the instance database (transactions need a connection each).
pub struct Store {
    config: Config,
    database: String,
    /// One permit per slot: a caller waits in line (FIFO) for whichever connection frees first,
    /// rather than behind one busy connection while others are idle (a decision of one run queued
    /// behind another run's slow commit was the tail of result → next step).
    free: Semaphore,
    slots: Vec<Mutex<Option<Client>>>,
}

impl Store {
    /// Connects `size` connections lazily; checks connectivity and creates the tables now.
    pub async fn open(config: Config, database: String, size: usize) -> Result<Store, StoreError> {
        let size = size.max(1);
        let store = Store {
            config,
            database,
            free: Semaphore::new(size),
            slots: (0..size).map(|_| Mutex::new(None)).collect(),
        };
        let c = store.conn().await?;
        c.batch_execute(&format!("BEGIN; {} COMMIT;", ddl()))
            .await
            .map_err(query("create the coordinator tables"))?;
        drop(c);
        Ok(store)
    }

    /// The database, for logs (no password).
    pub fn database(&self) -> &str {
        &self.database
    }

    /// A dedicated connection (for `LISTEN`), driven by the caller.
    pub async fn dedicated(
        &self,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        StoreError,
    > {
        self.config
            .connect(NoTls)
            .await
            .map_err(|source| StoreError::Connect {
                database: self.database.clone(),
                source,
            })
    }

    pub(super) async fn conn(&self) -> Result<Conn<'_>, StoreError> {
        let permit = self
            .free
            .acquire()
            .await
            .map_err(|_| StoreError::Closed(self.database.clone()))?;
        // A permit guarantees a slot nobody holds; lowest first keeps a quiet replica on few
        // connections.
        let mut guard = self
            .slots
            .iter()
            .find_map(|s| s.try_lock().ok())
            .ok_or_else(|| StoreError::Closed(self.database.clone()))?;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = self.dedicated().await?;
            let database = self.database.clone();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    warn!(%database, "Dagster database connection ended: {e}");
                }
            });
            debug!(database = %self.database, "connected to the Dagster database");
            *guard = Some(client);
        }
        Ok(Conn(guard, permit))
    }
}

/// A pooled connection, exclusively held (its slot, and the pool's permit for it).
pub(super) struct Conn<'a>(
    MutexGuard<'a, Option<Client>>,
    #[allow(dead_code)] // held for its Drop: the permit returns with the slot
    SemaphorePermit<'a>,
);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        // `conn()` only hands out a slot it filled.
        self.0.as_ref().expect("connected slot")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("connected slot")
    }
}
