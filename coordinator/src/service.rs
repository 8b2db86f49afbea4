//! The coordinator service: claims handed-off runs (leases in the instance database), drives each in its
//! own task, renews its leases, takes over the runs of replicas that stopped renewing theirs, and gives
//! its own up on shutdown so another replica continues them at once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use celeriac_wire::broker::redis::RedisTransportOptions;
use celeriac_wire::url::{self, BackendUrl};
use futures::StreamExt;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Database, Settings};
use crate::metrics::Metrics;
use crate::plans::PlanCache;
use crate::results::{Results, RunInput};
use crate::run::{Driver, Ended};
use crate::shared::Shared;
use crate::store::{Claimed, Store, NOTIFY_CHANNEL};

async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let (config, display) = match &settings.database {
        Database::Url(u) => {
            let config: tokio_postgres::Config = u
                .parse()
                .with_context(|| format!("invalid database URL {}", url::redact(u)))?;
            (config, url::redact(u))
        }
        Database::DagsterYaml(path) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("reading the Dagster instance config {}", path.display())
            })?;
            celeriac_dagster::instance::postgres_from_dagster_yaml(&text)
                .with_context(|| format!("the Postgres storage of {}", path.display()))?
        }
    };
    Ok(Store::open(config, display, settings.db_pool).await?)
}

/// A driven run.
struct Driven {
    tx: mpsc::Sender<RunInput>,
    stop: CancellationToken,
}

/// Connects to the instance database, the broker and the result backend: what every driver shares.
async fn connect(settings: &Settings, stop: &CancellationToken) -> anyhow::Result<Arc<Shared>> {
    let store = open_store(settings).await?;
    info!(database = %store.database(), "connected to the Dagster instance database");
    let broker =
        celeriac_wire::connect::broker(&settings.broker, RedisTransportOptions::default()).await?;
    let results = match url::parse_backend(&settings.result_backend)? {
        BackendUrl::Rpc => Results::Rpc {
            broker: broker.clone(),
        },
        BackendUrl::Redis { url, .. } => Results::redis(&url, stop.child_token()).await?,
        BackendUrl::Disabled => anyhow::bail!(
            "result_backend is disabled: the coordinator needs rpc:// or redis:// to receive step results"
        ),
    };
    let shared = Arc::new(Shared {
        store,
        broker,
        results,
        replica: settings.replica.clone(),
        hostname: hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
        metrics: Metrics::new(),
        settings: settings.clone(),
        declared: Mutex::default(),
        plans: PlanCache::default(),
        takeovers: std::sync::Mutex::default(),
        ready: AtomicBool::new(false),
    });
    Ok(shared)
}

/// Runs the coordinator until `stop` fires.
pub async fn run(settings: Settings, stop: CancellationToken) -> anyhow::Result<()> {
    let shared = connect(&settings, &stop).await?;
    let bound = crate::http::serve(settings.http_addr, shared.clone(), stop.clone()).await?;
    info!(%bound, "HTTP listening");
    info!(replica = %settings.replica, http = %bound, broker = %url::redact(&settings.broker),
          backend = %url::redact(&settings.result_backend), "celeriac coordinator ready");

    let (notify_tx, mut notify_rx) = mpsc::channel::<String>(1024);
    tokio::spawn(listen(shared.clone(), notify_tx, stop.child_token()));

    let mut driven: HashMap<String, Driven> = HashMap::new();
    let mut drivers: JoinSet<(String, Ended)> = JoinSet::new();
    // Renewals run beside the loop: with thousands of leases one can take a while under load, and
    // claims (launch → first step) must not wait for it.
    let (renewed_tx, mut renewed_rx) = mpsc::channel::<Renewed>(1);
    let mut renewing = false;
    let mut heartbeat = tokio::time::interval(settings.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = heartbeat.tick() => {
                if !renewing {
                    renewing = true;
                    let runs: Vec<String> = driven.keys().cloned().collect();
                    tokio::spawn(renew(shared.clone(), runs, renewed_tx.clone()));
                }
                claim(&shared, &mut driven, &mut drivers, &stop).await;
            }
            Some(renewed) = renewed_rx.recv() => {
                renewing = false;
                stop_lost(renewed, &driven);
            }
            Some(run_id) = notify_rx.recv() => {
                match driven.get(&run_id) {
                    Some(d) => { let _ = d.tx.try_send(RunInput::Wake); }
                    None => claim(&shared, &mut driven, &mut drivers, &stop).await,
                }
            }
            Some(done) = drivers.join_next() => {
                match done {
                    Ok((run_id, ended)) => {
                        if let Some(d) = driven.remove(&run_id) { d.stop.cancel(); }
                        shared.metrics.forget(&run_id);
                        if let Ended::Finished(status) = &ended {
                            shared.metrics.runs_finished.with_label_values(&[status]).inc();
                        }
                        info!(run_id, ?ended, "driver ended");
                    }
                    Err(e) => error!("a run driver panicked: {e}"),
                }
                shared.metrics.runs_owned.set(driven.len() as i64);
            }
        }
    }
    hand_over(&shared, &driven, drivers).await;
    Ok(())
}

/// Shutdown: stops every driver (briefly waiting for them) and releases the leases, so another replica
/// continues the runs at once.
async fn hand_over(
    shared: &Shared,
    driven: &HashMap<String, Driven>,
    mut drivers: JoinSet<(String, Ended)>,
) {
    info!(runs = driven.len(), "shutting down: handing runs over");
    for d in driven.values() {
        d.stop.cancel();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while drivers.join_next().await.is_some() {}
    })
    .await;
    match shared.store.release(&shared.replica).await {
        Ok(n) => info!(released = n, "leases released"),
        Err(e) => warn!("cannot release leases (they expire after the lease timeout): {e}"),
    }
}

/// The runs a renewal covered and those it kept (`None`: the database could not be reached).
struct Renewed {
    runs: Vec<String>,
    kept: Option<HashSet<String>>,
}

/// Renews the leases of driven runs.
async fn renew(shared: Arc<Shared>, runs: Vec<String>, done: mpsc::Sender<Renewed>) {
    let kept = match shared.store.renew(&shared.replica, &runs).await {
        Ok(kept) => {
            shared.ready.store(true, Ordering::Relaxed);
            shared.metrics.leases_renewed.inc_by(kept.len() as u64);
            Some(kept.into_iter().collect())
        }
        Err(e) => {
            shared.ready.store(false, Ordering::Relaxed);
            warn!("cannot renew leases: {e}");
            None
        }
    };
    let _ = done.send(Renewed { runs, kept }).await;
}

/// Stops the drivers of runs whose lease another replica took.
fn stop_lost(renewed: Renewed, driven: &HashMap<String, Driven>) {
    let Some(kept) = renewed.kept else {
        return;
    };
    for run_id in renewed.runs.iter().filter(|r| !kept.contains(*r)) {
        // A run that ended meanwhile is no longer driven: nothing to stop.
        if let Some(d) = driven.get(run_id) {
            warn!(
                run_id,
                "lease lost (another replica took the run over); stopping its driver"
            );
            d.stop.cancel();
        }
    }
}

/// Claims runs up to capacity and starts their drivers.
async fn claim(
    shared: &Arc<Shared>,
    driven: &mut HashMap<String, Driven>,
    drivers: &mut JoinSet<(String, Ended)>,
    stop: &CancellationToken,
) {
    let room = shared.settings.max_runs.saturating_sub(driven.len());
    if room == 0 {
        return;
    }
    let mine: Vec<String> = driven.keys().cloned().collect();
    let claimed = match shared
        .store
        .claim(
            &shared.replica,
            shared.settings.lease_timeout.as_secs_f64(),
            &mine,
            room as i64,
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            warn!("cannot claim runs: {e}");
            return;
        }
    };
    for c in claimed {
        start_driver(shared, c, driven, drivers, stop);
    }
    shared.metrics.runs_owned.set(driven.len() as i64);
}

fn start_driver(
    shared: &Arc<Shared>,
    claimed: Claimed,
    driven: &mut HashMap<String, Driven>,
    drivers: &mut JoinSet<(String, Ended)>,
    stop: &CancellationToken,
) {
    let run_id = claimed.run_id.clone();
    if let Some(prev) = claimed
        .previous_owner
        .as_deref()
        .filter(|p| *p != shared.replica)
    {
        shared.metrics.takeovers.inc();
        let age = claimed.heartbeat_age.unwrap_or_default();
        info!(
            run_id,
            previous = prev,
            heartbeat_age = age,
            "taking the run over"
        );
        shared
            .takeovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                run_id.clone(),
                format!(" from {prev} (lease {age:.0} s old)"),
            );
    } else {
        info!(run_id, "claimed run");
    }
    let (tx, rx) = mpsc::channel(1024);
    let token = stop.child_token();
    driven.insert(
        run_id.clone(),
        Driven {
            tx: tx.clone(),
            stop: token.clone(),
        },
    );
    let shared = shared.clone();
    drivers.spawn(async move {
        let opened = Box::pin(Driver::open(shared, &claimed, tx)).await;
        // The driver keeps what it needs; the claimed row must not live as long as the run.
        drop(claimed);
        let ended = match opened {
            Ok(driver) => driver.drive(rx, token).await,
            Err(ended) => ended,
        };
        (run_id, ended)
    });
}

/// `LISTEN celeriac_coordinator`: hand-offs and terminations wake the service at once (the heartbeat
/// poll catches anything missed while reconnecting).
async fn listen(shared: Arc<Shared>, tx: mpsc::Sender<String>, stop: CancellationToken) {
    let mut backoff = celeriac_wire::backoff::Backoff::default();
    while !stop.is_cancelled() {
        let (client, mut connection) = match shared.store.dedicated().await {
            Ok(x) => x,
            Err(e) => {
                warn!("cannot open the LISTEN connection: {e}");
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff.next_delay()) => {} }
                continue;
            }
        };
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let sql = format!("LISTEN {NOTIFY_CHANNEL}");
        let listen = client.batch_execute(&sql);
        tokio::pin!(listen);
        // Drive the connection while LISTEN runs.
        let mut listening = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = &mut listen, if !listening => match r {
                    Ok(()) => { listening = true; backoff.reset(); }
                    Err(e) => { warn!("LISTEN failed: {e}"); break; }
                },
                m = messages.next() => match m {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        let _ = tx.send(n.payload().to_string()).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => { warn!("LISTEN connection lost: {e}; reconnecting"); break; }
                    None => { warn!("LISTEN connection closed; reconnecting"); break; }
                }
            }
        }
        tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(backoff.next_delay()) => {} }
    }
}
