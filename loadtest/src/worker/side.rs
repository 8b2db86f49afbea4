//! One side of the comparison (celeriac, or Python's worker): its own lane (namespace and identity,
//! hand-off, queue, done file, where its audit log starts), everything measured of it, and the batch
//! step both sides take identically (publish, hold, measure, release, drain), so that the two differ
//! only in how their worker is started and read.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use celeriac_dagster::submission::Handoff;

use super::batch::{Batch, Level};
use super::cluster::{audit_mark, Audit, Namespace};
use super::outcome::stored_counter;
use super::setup::Setup;
use super::steps::{container_env, load_handoff, publish, Sent};
use crate::env;

/// Where one side's steps go: its namespace (deleted on drop), the hand-off of its run, its queue, the
/// file its step programs note their exit in, and where the audit log stood before it started.
pub struct Lane {
    /// `celeriac` or `python`: names the queue, the done file and the release files.
    pub side: &'static str,
    /// Starts the step keys of each batch (`c0_…`, `p1_…`).
    pub prefix: &'static str,
    pub ns: Namespace,
    pub handoff: Handoff,
    pub queue: String,
    pub done_file: PathBuf,
    pub mark: u64,
}

impl Lane {
    /// The lane of `side` for `run_id`, with Kubernetes identity `celeriac-worker-<user>`.
    pub fn open(
        side: &'static str,
        prefix: &'static str,
        user: u8,
        run_id: &str,
        setup: &Setup,
    ) -> Result<Lane> {
        let ns = Namespace::create(side, user)?;
        let handoff = load_handoff(run_id, &setup.handoff, &ns)?;
        let queue = env::unique(&format!("load_{side}"));
        let done_file = setup.work.join(format!("{side}-steps.txt"));
        let mark = audit_mark();
        Ok(Lane {
            side,
            prefix,
            ns,
            handoff,
            queue,
            done_file,
            mark,
        })
    }
}

/// A running worker side as a batch reads it: its root process, and its log, where a step starts
/// with a line holding one of `started` and ends with one holding one of `ended`.
pub struct Watched<'a> {
    pub pid: u32,
    pub log: &'a Path,
    pub started: &'static [&'static str],
    pub ended: &'static [&'static str],
}

impl Watched<'_> {
    /// Steps the worker holds now, by its log.
    fn in_flight(&self) -> usize {
        let t = std::fs::read_to_string(self.log).unwrap_or_default();
        let lines = |needles: &[&str]| needles.iter().map(|n| count(&t, n)).sum::<usize>();
        lines(self.started).saturating_sub(lines(self.ended))
    }
}

/// Counts lines of a log matching `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Everything measured of one side.
#[derive(Default)]
pub struct Side {
    pub levels: Vec<Level>,
    pub idle_pss: f64,
    pub idle_rss: f64,
    pub after_rss: Vec<f64>,
    pub sent: Vec<Sent>,
    pub startup_s: Vec<f64>,
    pub cpu_s: f64,
    pub audit: Vec<Audit>,
}

impl Side {
    /// Publishes the next batch of `n` steps to the lane and measures it on `worker` (see
    /// [`Batch::measure`]); the batch's level and steps are added to this side.
    pub async fn batch(
        &mut self,
        setup: &Setup,
        lane: &Lane,
        worker: &Watched<'_>,
        n: usize,
        progress: String,
    ) -> Result<()> {
        let i = self.levels.len();
        let release = setup.work.join(format!("release-{}-{i}", lane.side));
        let env = container_env(
            &setup.step_dir,
            setup.step_seconds,
            &lane.done_file,
            &release,
        );
        let published = Instant::now();
        let prefix = format!("{}{i}", lane.prefix);
        let sent = publish(
            setup.broker.as_ref(),
            &lane.queue,
            &lane.handoff,
            &prefix,
            n,
            &env,
        )
        .await?;
        let publish_per_s = n as f64 / published.elapsed().as_secs_f64();
        let in_flight = || worker.in_flight();
        let finished = stored_counter(&sent);
        let level = Batch {
            pid: worker.pid,
            n,
            release: &release,
            in_flight: &in_flight,
            finished: &finished,
            progress,
        }
        .measure(Level {
            n,
            publish_per_s,
            sent: self.sent.len()..self.sent.len() + n,
            ..Level::default()
        })?;
        self.levels.push(level);
        self.sent.extend(sent);
        Ok(())
    }
}
