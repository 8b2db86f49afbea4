//! One batch of steps measured on one side: held until the whole batch is in flight (so that memory
//! is measured with every step of it tracked at once, not while they come and go), the worker side's
//! PSS sampled at that plateau, then released and drained until every result is stored.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::procs;

/// One batch (level) of one side, measured.
#[derive(Debug, Clone, Default)]
pub struct Level {
    /// Steps published.
    pub n: usize,
    /// Steps in flight when memory was measured (all of them, unless some never got a Job).
    pub in_flight: usize,
    pub pss: f64,
    pub rss: f64,
    /// Steps published per second (as fast as RabbitMQ confirms them).
    pub publish_per_s: f64,
    /// Release of the held steps → every result stored.
    pub drain_s: f64,
    pub load_average: f64,
    /// Index range of this batch in the side's `sent`.
    pub sent: std::ops::Range<usize>,
}

/// What a batch is measured with.
pub struct Batch<'a> {
    /// The worker side's root process.
    pub pid: u32,
    pub n: usize,
    /// Created to let the held steps finish.
    pub release: &'a Path,
    /// Steps the worker holds now (from its log).
    pub in_flight: &'a dyn Fn() -> usize,
    /// Steps of the batch with a result stored.
    pub finished: &'a dyn Fn() -> usize,
    pub progress: String,
}

impl Batch<'_> {
    fn show(&self, f: usize, done: usize, phase: &str) {
        eprint!(
            "\r{}: {f:>6} in flight, {done:>6}/{} done, PSS {:>7.1} MB, {phase}      ",
            self.progress,
            self.n,
            procs::tree_pss(self.pid) as f64 / 1e6
        );
    }

    /// Waits until every step of the batch is in flight (or their number stopped growing for a
    /// minute), measures the worker side's PSS there, releases the steps and waits for every result.
    pub fn measure(&self, mut level: Level) -> Result<Level> {
        let mut last_print = Instant::now() - Duration::from_secs(10);
        self.take_up(&mut last_print)?;
        self.sample_plateau(&mut level);
        level.load_average = procs::load_average();
        std::fs::write(self.release, b"")?;
        self.drain(level, &mut last_print)
    }

    /// Until every step is in flight, or their number stopped growing for a minute.
    fn take_up(&self, last_print: &mut Instant) -> Result<()> {
        let start = Instant::now();
        let (mut best, mut grew_at) = (0usize, Instant::now());
        let hold_limit = Duration::from_secs_f64(300.0 + self.n as f64 / 5.0);
        loop {
            let f = (self.in_flight)();
            if f > best {
                (best, grew_at) = (f, Instant::now());
            }
            if last_print.elapsed() > Duration::from_secs(2) {
                self.show(f, (self.finished)(), "taking up");
                *last_print = Instant::now();
            }
            if f >= self.n || grew_at.elapsed() > Duration::from_secs(60) {
                return Ok(());
            }
            if start.elapsed() > hold_limit {
                bail!(
                    "{}: only {best} of {} steps in flight after {hold_limit:?}",
                    self.progress,
                    self.n
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A few samples at the plateau: PSS moves while the batch settles.
    fn sample_plateau(&self, level: &mut Level) {
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(500));
            let f = (self.in_flight)();
            let pss = procs::tree_pss(self.pid) as f64;
            if pss > level.pss {
                level.pss = pss;
                level.rss = procs::tree(self.pid)
                    .into_iter()
                    .map(procs::rss)
                    .sum::<u64>() as f64;
            }
            level.in_flight = level.in_flight.max(f);
        }
    }

    /// From the release until every result of the batch is stored.
    fn drain(&self, mut level: Level, last_print: &mut Instant) -> Result<Level> {
        let released = Instant::now();
        let drain_limit = Duration::from_secs_f64(300.0 + self.n as f64 / 10.0);
        loop {
            let done = (self.finished)();
            if last_print.elapsed() > Duration::from_secs(2) {
                self.show((self.in_flight)(), done, "released");
                *last_print = Instant::now();
            }
            if done >= self.n {
                eprintln!();
                level.drain_s = released.elapsed().as_secs_f64();
                return Ok(level);
            }
            if released.elapsed() > drain_limit {
                bail!(
                    "{}: only {done} of {} steps finished within {drain_limit:?} of their release",
                    self.progress,
                    self.n
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
