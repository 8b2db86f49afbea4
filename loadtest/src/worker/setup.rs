//! What both sides of the worker scenario stand on, prepared once before either runs: the services,
//! the binaries under test, the Kubernetes test cluster, a Dagster home with one STARTED run per side
//! (both workers check the run's status before they launch a step), the broker connection the steps
//! are published on and a scratch directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use celeriac_wire::broker::Broker;
use serde_json::Value;

use super::cluster::cluster_up;
use super::params::{Params, BACKEND};
use crate::env::{self, Home};
use crate::procs;

/// Prepared for both sides. Fields drop in this order: the database client first, the home (and
/// with it the database) last.
pub struct Setup {
    pub db: tokio_postgres::Client,
    pub broker: Arc<dyn Broker>,
    /// Machine load (1-minute average) before anything started.
    pub load_start: f64,
    /// The `celeriac` binary measured and its build profile (`release` or `debug`).
    pub celeriac: PathBuf,
    pub build: &'static str,
    pub venv: PathBuf,
    /// Holds `dagster` → the load-step program (first on the step container's PATH).
    pub step_dir: PathBuf,
    pub step_seconds: f64,
    /// The STARTED runs: celeriac's steps belong to the first, Python's to the second.
    pub runs: Vec<String>,
    /// The hand-off of the runs as `make_runs.py` computed it.
    pub handoff: Value,
    /// Scratch files of this run (done files, release files).
    pub work: PathBuf,
    /// Held for its drop: the home's directory and database go with it.
    pub _home: Home,
}

impl Setup {
    pub async fn prepare(p: &Params) -> Result<Setup> {
        env::ensure_services()?;
        let load_start = procs::load_average();
        let (celeriac, build) = binaries()?;
        let venv = env::venv()?;
        cluster_up(celeriac.parent().context("binary directory")?, &venv)?;
        let step_dir = env::load_step_path()?;
        let home = Home::create(
            p.broker.url(),
            BACKEND,
            &["--image", "celeriac/load-step:test"],
        )?;
        let db = home.connect().await?;
        let (runs, handoff) = home.make_runs("ten_steps", 2, &[], Duration::from_secs(600))?;
        anyhow::ensure!(runs.len() == 2, "make_runs.py made {} runs", runs.len());
        // Both workers check that the run is STARTED before they launch a step (and while it runs).
        db.execute(
            "UPDATE runs SET status = 'STARTED' WHERE run_id = ANY($1)",
            &[&runs],
        )
        .await?;
        let broker = celeriac_wire::connect::connect(p.broker.url(), Default::default())
            .await
            .context("connecting to the load test's broker")?;
        let work = env::work_dir().join(env::unique("worker"));
        std::fs::create_dir_all(&work)?;
        Ok(Setup {
            db,
            broker,
            load_start,
            celeriac,
            build,
            venv,
            step_dir,
            step_seconds: p.step_seconds,
            runs,
            handoff,
            work,
            _home: home,
        })
    }
}

/// The `celeriac` binary and its build profile; the process kubelet must stand next to it.
fn binaries() -> Result<(PathBuf, &'static str)> {
    let celeriac = env::celeriac_bin()?;
    let bin_dir = celeriac.parent().context("binary directory")?.to_path_buf();
    // The binaries are built together (or copied out together, CELERIAC_LOADTEST_PREBUILT): this one's
    // profile is theirs; a copied-out directory's name does not tell it.
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    // `celeriac_bin` built every workspace binary, the process kubelet with them.
    anyhow::ensure!(
        bin_dir.join("celeriac-kubelet").exists(),
        "{} has no celeriac-kubelet",
        bin_dir.display()
    );
    Ok((celeriac, build))
}
