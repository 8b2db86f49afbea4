//! The store's one error type: what failed, with the database named without its password, and the
//! one error that is not a failure of the database (a lease another replica holds now).

/// Errors of the store. Messages name the database without its password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the Dagster database {database}: {source}")]
    Connect {
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("Dagster database query failed ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Another replica owns the run now: this one must stop driving it.
    #[error("the lease of run {0} is held by another coordinator")]
    LostLease(String),
    /// The connection pool broke its own invariant (a permit without a free slot); never expected.
    #[error("the connection pool of the Dagster database {0} is closed")]
    Closed(String),
}

pub(super) fn query(what: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}
