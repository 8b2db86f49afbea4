//! How a run's decisions and this replica's lease bookkeeping share the lease rows, against the real
//! PostgreSQL (127.0.0.1:5432, user postgres, trust).

use std::time::Duration;

use celeriac_coordinator::store::{Commit, Store};

/// A fresh database (dropped by [`Scratch::drop`]) and a store on it.
struct Scratch {
    name: String,
    admin: tokio_postgres::Client,
}

/// The local PostgreSQL's database `db`.
fn config(db: &str) -> tokio_postgres::Config {
    format!("host=127.0.0.1 port=5432 user=postgres dbname={db}")
        .parse()
        .expect("config")
}

async fn client(db: &str) -> tokio_postgres::Client {
    let (client, connection) = config(db)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    tokio::spawn(connection);
    client
}

impl Scratch {
    async fn new() -> (Scratch, Store) {
        let name = format!("leases_{}", uuid::Uuid::new_v4().simple());
        let admin = client("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create the scratch database");
        let store = Store::open(config(&name), name.clone(), 2)
            .await
            .expect("store");
        (Scratch { name, admin }, store)
    }

    async fn drop(self, store: Store) {
        drop(store);
        let _ = self
            .admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// The lease renewal updates the heartbeat of every run a replica owns every few seconds. A decision
/// of one of those runs must not wait for it (nor it for the decision): with a stronger row lock in
/// the decision, each renewal and the decisions in progress queued behind each other, which was the
/// tail of result → next step under load. Here a renewal-like update holds the row (uncommitted)
/// while the decision commits; the decision must not wait for it.
#[tokio::test]
async fn a_decision_does_not_wait_for_a_lease_renewal_in_progress() {
    let (scratch, store) = Scratch::new().await;
    let run_id = uuid::Uuid::new_v4().to_string();
    let db = client(&scratch.name).await;
    db.execute(
        "INSERT INTO celeriac_coordinator_runs (run_id, handoff, created_at) VALUES ($1, '{}', 0)",
        &[&run_id],
    )
    .await
    .expect("hand-off row");
    let claimed = store
        .claim("replica-a", 60.0, &[], 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "the run is claimed");

    // Another connection renews the lease and has not committed yet.
    let mut renewer = client(&scratch.name).await;
    let renewal = renewer.transaction().await.expect("begin");
    let renewed = renewal
        .execute(
            "UPDATE celeriac_coordinator_runs SET heartbeat = heartbeat + 1 WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .expect("renewal holds the row");
    assert_eq!(renewed, 1);

    let decided = tokio::time::timeout(
        Duration::from_secs(5),
        store.commit(&run_id, "replica-a", &Commit::default()),
    )
    .await;
    renewal.rollback().await.expect("rollback");
    let written = decided
        .expect("the decision waited for the lease renewal's row lock")
        .expect("the decision commits");
    assert!(written, "the decision was written");

    // The lease check still holds: a replica that no longer owns the run cannot write for it.
    let lost = store.commit(&run_id, "replica-b", &Commit::default()).await;
    assert!(
        lost.is_err(),
        "another replica's decision is refused: {lost:?}"
    );
    scratch.drop(store).await;
}

/// A takeover never interleaves with a decision in progress: while a decision holds the run's lease
/// row, a claim (even of a lease long expired) skips the run rather than taking it.
#[tokio::test]
async fn a_takeover_skips_a_run_whose_decision_is_in_progress() {
    let (scratch, store) = Scratch::new().await;
    let run_id = uuid::Uuid::new_v4().to_string();
    let db = client(&scratch.name).await;
    db.execute(
        "INSERT INTO celeriac_coordinator_runs (run_id, handoff, created_at, owner, heartbeat, state)
         VALUES ($1, '{}', 0, 'replica-a', 0, 'running')",
        &[&run_id],
    )
    .await
    .expect("a run owned by replica-a, its heartbeat long expired");
    // A decision of replica-a in progress, holding the row as Store::commit does.
    let mut decider = client(&scratch.name).await;
    let decision = decider.transaction().await.expect("begin");
    let lock_sql = celeriac_coordinator::store::decision_lock_sql();
    let owner: Option<String> = decision
        .query_one(&lock_sql, &[&run_id])
        .await
        .expect("lock the lease row")
        .get(0);
    assert_eq!(owner.as_deref(), Some("replica-a"));

    let during = store
        .claim("replica-b", 1.0, &[], 10)
        .await
        .expect("claim during the decision");
    assert!(during.is_empty(), "the run was taken mid-decision");
    decision.commit().await.expect("commit");
    let after = store
        .claim("replica-b", 1.0, &[], 10)
        .await
        .expect("claim after the decision");
    assert_eq!(
        after.len(),
        1,
        "the expired lease is taken over once the decision ended"
    );
    scratch.drop(store).await;
}
