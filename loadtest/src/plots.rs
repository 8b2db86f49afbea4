//! PNG plots of a scenario's figures (the `plotters` crate, bitmap backend). Text needs a TrueType
//! font: the first of a few usual system paths is registered; without one the plots carry no text.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for text once; false when none is found.
fn font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        for path in FONTS {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn points(f: &Value, side: &str) -> Vec<(f64, f64)> {
    f.pointer(&format!("/{side}/memory_points"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p["in_flight"].as_f64()?, p["pss_bytes"].as_f64()? / 1e6)))
                .collect()
        })
        .unwrap_or_default()
}

/// `<stem>-memory.png` (PSS of each side against steps in flight, log-log) and `<stem>-latency.png`
/// (p50/p99 of publish → Job created and step exit → result stored, per side) in `dir`; the stem is
/// the results file's (`worker`, `worker-redis`).
pub fn worker(f: &Value, dir: &Path, stem: &str) -> Result<Vec<std::path::PathBuf>> {
    let text = font();
    let memory = dir.join(format!("{stem}-memory.png"));
    memory_plot(f, &memory, text)?;
    let latency = dir.join(format!("{stem}-latency.png"));
    latency_plot(f, &latency, text)?;
    Ok(vec![memory, latency])
}

/// A chart on `root` with a 20-pixel margin and, when there is text, `caption` and room for the
/// axis labels.
fn builder<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    caption: &str,
    text: bool,
) -> ChartBuilder<'a, 'static, DB> {
    let mut b = ChartBuilder::on(root);
    b.margin(20);
    if text {
        b.caption(caption, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    b
}

/// PSS of each side against steps in flight, log-log, to `path`.
fn memory_plot(f: &Value, path: &Path, text: bool) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let c = points(f, "celeriac");
    let p = points(f, "python");
    let all: Vec<(f64, f64)> = c.iter().chain(p.iter()).cloned().collect();
    let xmax = all.iter().map(|p| p.0).fold(10.0, f64::max) * 1.5;
    let ymax = all.iter().map(|p| p.1).fold(10.0, f64::max) * 1.5;
    let mut chart = builder(&root, "Worker-side PSS against steps in flight", text)
        .build_cartesian_2d((1.0..xmax).log_scale(), (1.0..ymax).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    if text {
        chart
            .configure_mesh()
            .x_desc("steps in flight")
            .y_desc("PSS (MB)")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    for (series, color, name) in [
        (&c, RED, "celeriac"),
        (&p, BLUE, "Python dagster-celery-k8s"),
    ] {
        let s = chart
            .draw_series(LineSeries::new(
                series.iter().cloned(),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        if text {
            s.label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .draw_series(
                series
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(|e| anyhow!("{e}"))?;
    }
    if text {
        // Lower right: no worker side is below 10 MB, while the default (middle right) covered the
        // last level's point.
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Bars of the latency percentiles, celeriac red and Python blue side by side, to `path`.
fn latency_plot(f: &Value, path: &Path, text: bool) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let get = |p: &str| f.pointer(p).and_then(Value::as_f64).unwrap_or(0.0) * 1000.0;
    // Bars: [dispatch p50, dispatch p99, result p50, result p99] per side.
    let bars = [
        ("publish→create p50", "publish_to_job_created_p50_s"),
        ("publish→create p99", "publish_to_job_created_p99_s"),
        ("exit→result p50", "step_exit_to_result_p50_s"),
        ("exit→result p99", "step_exit_to_result_p99_s"),
    ];
    let ymax = bars
        .iter()
        .flat_map(|(_, k)| [get(&format!("/celeriac/{k}")), get(&format!("/python/{k}"))])
        .fold(1.0, f64::max)
        * 1.3;
    let mut chart = builder(&root, "Latency (ms): celeriac red, Python blue", text)
        .build_cartesian_2d(0.0..(bars.len() as f64), (0.1..ymax).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh().y_desc("ms");
    let names: Vec<&str> = bars.iter().map(|b| b.0).collect();
    let fmt = move |x: &f64| {
        let i = *x as usize;
        if (*x - i as f64 - 0.5).abs() < 0.01 {
            names.get(i).map(|s| s.to_string()).unwrap_or_default()
        } else {
            String::new()
        }
    };
    if text {
        mesh.x_labels(bars.len() * 2 + 1)
            .x_label_formatter(&fmt)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    } else {
        mesh.x_labels(0)
            .y_labels(0)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    for (i, (_, key)) in bars.iter().enumerate() {
        let x = i as f64;
        for (side, color, off) in [("celeriac", RED, 0.1), ("python", BLUE, 0.5)] {
            let v = get(&format!("/{side}/{key}")).max(0.1);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + off, 0.1), (x + off + 0.4, v)],
                    color.filled(),
                )))
                .map_err(|e| anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
