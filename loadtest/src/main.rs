//! `celeriac-loadtest`: drives the same load through celeriac and through the Python peers in one run,
//! on the same broker and database, and writes `loadtest/REPORT.md` with the figures.
//!
//! ```sh
//! cargo run -p celeriac-loadtest --release -- coordinator          # the full scenario
//! cargo run -p celeriac-loadtest --release -- --quick coordinator  # a small version (CI)
//! ```
//! Results: `loadtest/results/<scenario>.json` (full runs) or `loadtest/work/quick/` (`--quick`), and
//! the report rendered from the full runs' results.

mod clock;
mod coordinator;
mod env;
mod plots;
mod probe;
mod procs;
mod report;
mod worker;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "celeriac-loadtest",
    about = "celeriac and the Python peers under the same load"
)]
struct Args {
    /// A small version of each scenario (minutes), checked but not reported.
    #[arg(long)]
    quick: bool,
    /// Scenarios to run: `coordinator`, `worker` (or `all`); `report` only re-renders `REPORT.md`.
    #[arg(required = true)]
    scenarios: Vec<String>,
    /// Runs handed to the coordinator (overrides the scenario's default).
    #[arg(long)]
    runs: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    let results_dir = if args.quick {
        env::work_dir().join("quick")
    } else {
        env::repo_root().join("loadtest").join("results")
    };
    std::fs::create_dir_all(&results_dir)?;
    let mut failures = Vec::new();
    for scenario in &args.scenarios {
        let names: Vec<&str> = match scenario.as_str() {
            "all" => vec!["coordinator", "worker"],
            other => vec![other],
        };
        for name in names {
            // Each scenario's results file: `<stem>.json` (the worker's is named by its broker).
            let mut stem = name.to_string();
            let figures = match name {
                "coordinator" => {
                    let mut p = if args.quick {
                        coordinator::Params::quick()?
                    } else {
                        coordinator::Params::full()?
                    };
                    if let Some(n) = args.runs {
                        p.runs = n;
                    }
                    rt.block_on(coordinator::run(&p))
                        .context("scenario coordinator")?
                }
                "worker" => {
                    let p = if args.quick {
                        worker::Params::quick()?
                    } else {
                        worker::Params::full()?
                    };
                    stem = p.broker.results_stem().to_string();
                    let figures = rt.block_on(worker::run(&p)).context("scenario worker")?;
                    match plots::worker(&figures, &results_dir, &stem) {
                        Ok(files) => eprintln!("loadtest worker: plots {files:?}"),
                        Err(e) => failures.push(format!("worker: plots: {e}")),
                    }
                    figures
                }
                "report" => {
                    // Only re-render REPORT.md and the worker plots from the committed results (and
                    // their notes).
                    for broker in [worker::BrokerKind::Amqp, worker::BrokerKind::Redis] {
                        let stem = broker.results_stem();
                        let path = results_dir.join(format!("{stem}.json"));
                        if let Ok(text) = std::fs::read_to_string(&path) {
                            let figures: serde_json::Value = serde_json::from_str(&text)
                                .with_context(|| format!("reading {}", path.display()))?;
                            plots::worker(&figures, &results_dir, stem)?;
                        }
                    }
                    report::write(&env::repo_root().join("loadtest"))?;
                    continue;
                }
                other => {
                    bail!("unknown scenario {other:?} (known: coordinator, worker, all, report)")
                }
            };
            let problems = report::check(&stem, &figures);
            for p in &problems {
                eprintln!("loadtest {stem}: {p}");
            }
            failures.extend(problems.into_iter().map(|p| format!("{stem}: {p}")));
            let path = results_dir.join(format!("{stem}.json"));
            std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
            eprintln!("loadtest {stem}: figures in {}", path.display());
            println!("{}", report::section(&stem, &figures));
        }
    }
    if !args.quick {
        report::write(&env::repo_root().join("loadtest"))?;
    }
    if !failures.is_empty() {
        bail!("{} problem(s):\n{}", failures.len(), failures.join("\n"));
    }
    Ok(())
}
