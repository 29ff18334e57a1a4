//! PNG plots of a bench run, drawn from its JSON reports with plotters' bitmap backend.
//!
//! Text is rendered with ab_glyph from a font compiled into this binary (a DejaVu Sans
//! subset, see `fonts/LICENSE`), so plots need no fontconfig and no system fonts.
//!
//! - `latency-vs-load-SERIES.png`: p50 and p99 publish→deliver latency against offered
//!   deliveries/s, one line per system, for each `SERIES@RATE` fan-out sweep (a series
//!   run at one rate only is in the tables, not plotted);
//! - `deliveries.png`: each system's peak sustained deliveries/s per sweep;
//! - `rss-per-connection.png`: server RSS per idle connection against connections held.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

use crate::summary::{self, Peak};

/// DejaVu Sans, printable ASCII plus a few symbols (see `fonts/LICENSE`).
const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans-subset.ttf");
const FONT_FAMILY: &str = "sans-serif";
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 520;
/// The goal for memory per idle connection, in bytes.
const IDLE_CONNECTION_GOAL_BYTES: f64 = 8_000.0;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct PlotArgs {
    /// Directory holding the *.json reports of one run.
    pub dir: PathBuf,
    /// Where to write the PNGs (default: the reports' directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Draws every plot the reports have data for; returns the files written.
pub(crate) fn run(args: &PlotArgs) -> anyhow::Result<Vec<PathBuf>> {
    // Registering twice (tests) only replaces the same font.
    plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the embedded font does not parse"))?;
    let reports = summary::read_reports(&args.dir)?;
    let out = args.out.clone().unwrap_or_else(|| args.dir.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let fanout = summary::of_kind(&reports, "fanout");
    let mut written = Vec::new();
    let mut series: Vec<&str> = fanout
        .iter()
        .filter_map(|r| r["label"].as_str().and_then(summary::series))
        .collect();
    series.sort_unstable();
    series.dedup();
    series.retain(|name| summary::is_sweep(&fanout, name));
    for name in series {
        let path = out.join(format!("latency-vs-load-{name}.png"));
        latency_vs_load(&path, name, &fanout)?;
        written.push(path);
    }
    let peaks = summary::peaks(&fanout);
    if !peaks.is_empty() {
        let path = out.join("deliveries.png");
        deliveries(&path, &peaks)?;
        written.push(path);
    }
    let connect: Vec<&Value> = summary::of_kind(&reports, "connect")
        .into_iter()
        .filter(|r| r["label"].as_str().is_some_and(|l| l.starts_with("idle-")))
        .collect();
    if !connect.is_empty() {
        let path = out.join("rss-per-connection.png");
        rss_per_connection(&path, &connect)?;
        written.push(path);
    }
    Ok(written)
}

/// One colour per system, the same in every plot.
fn colour(target: &str) -> RGBColor {
    match target {
        "tern" => RGBColor(31, 119, 180),
        "tern-msgpack" => RGBColor(148, 103, 189),
        "nats" => RGBColor(44, 160, 44),
        "sockudo" => RGBColor(255, 127, 14),
        _ => RGBColor(127, 127, 127),
    }
}

fn targets_in(reports: &[&Value]) -> Vec<String> {
    let mut targets: Vec<String> = Vec::new();
    for r in reports {
        if let Some(t) = r["target"].as_str() {
            if !targets.iter().any(|k| k == t) {
                targets.push(t.to_owned());
            }
        }
    }
    targets
}

fn font(size: u32) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().into()
}

type Chart<'a, X, Y> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>;

fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

fn latency_vs_load(path: &Path, series: &str, fanout: &[&Value]) -> anyhow::Result<()> {
    let runs: Vec<&Value> = fanout
        .iter()
        .copied()
        .filter(|r| r["label"].as_str().and_then(summary::series) == Some(series))
        .collect();
    let x_max = runs.iter().map(|r| summary::offered(r)).fold(1.0, f64::max) / 1000.0 * 1.05;
    let y_max = runs
        .iter()
        .filter_map(|r| r["latency"]["p99_us"].as_f64())
        .fold(1.0, f64::max)
        / 1000.0
        * 2.0;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let root = root
        .titled(
            &format!("Fan-out {series}: publish→deliver latency vs load (100 B, open loop)"),
            font(22),
        )
        .map_err(draw_err)?;
    let panels = root.split_evenly((1, 2));
    for (panel, (key, name)) in panels.iter().zip([("p50_us", "p50"), ("p99_us", "p99")]) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name} latency"), font(18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (0.05f64..y_max.max(0.1)).log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("offered deliveries/s (thousands)")
            .y_desc("ms (log)")
            .label_style(font(14))
            .axis_desc_style(font(15))
            .draw()
            .map_err(draw_err)?;
        draw_lines(&mut chart, &runs, |r| {
            let us = r["latency"][key].as_f64()?;
            Some((summary::offered(r) / 1000.0, (us / 1000.0).max(0.05)))
        })?;
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// One line per system in `reports`, through the points `point` reads, left to right.
fn draw_lines<X, Y>(
    chart: &mut Chart<'_, X, Y>,
    reports: &[&Value],
    point: impl Fn(&Value) -> Option<(f64, f64)>,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for target in targets_in(reports) {
        let mut points: Vec<(f64, f64)> = reports
            .iter()
            .filter(|r| r["target"].as_str() == Some(&target))
            .filter_map(|r| point(r))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        draw_line(chart, &target, points)?;
    }
    Ok(())
}

/// The legend box, the same in every plot but for where it stands.
fn draw_legend<X, Y>(
    chart: &mut Chart<'_, X, Y>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(font(14))
        .position(position)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

fn draw_line<X, Y>(
    chart: &mut Chart<'_, X, Y>,
    target: &str,
    points: Vec<(f64, f64)>,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let c = colour(target);
    chart
        .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
        .map_err(draw_err)?
        .label(target.to_owned())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    chart
        .draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))
        .map_err(draw_err)?;
    Ok(())
}

fn deliveries(path: &Path, peaks: &[Peak]) -> anyhow::Result<()> {
    let mut series: Vec<&str> = Vec::new();
    let mut targets: Vec<&str> = Vec::new();
    for p in peaks {
        if !series.contains(&p.series.as_str()) {
            series.push(&p.series);
        }
        if !targets.contains(&p.target.as_str()) {
            targets.push(&p.target);
        }
    }
    let y_max = peaks
        .iter()
        .map(|p| p.deliveries_per_sec)
        .fold(1.0, f64::max)
        / 1000.0
        * 1.2;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Peak sustained fan-out deliveries/s (no loss, p99 < 100 ms; same machine, same run)",
            font(20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..series.len() as f64, 0f64..y_max)
        .map_err(draw_err)?;
    let names: Vec<String> = series.iter().map(|s| s.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(series.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc("deliveries/s (thousands)")
        .label_style(font(14))
        .axis_desc_style(font(15))
        .draw()
        .map_err(draw_err)?;
    let slot = 0.8 / targets.len().max(1) as f64;
    for (t, target) in targets.iter().enumerate() {
        let c = colour(target);
        let bars: Vec<(f64, f64)> = peaks
            .iter()
            .filter(|p| p.target == *target)
            .filter_map(|p| {
                let s = series.iter().position(|s| *s == p.series)?;
                Some((
                    s as f64 + 0.1 + t as f64 * slot,
                    p.deliveries_per_sec / 1000.0,
                ))
            })
            .collect();
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x, y)| Rectangle::new([(x, 0.0), (x + slot * 0.9, y)], c.filled())),
            )
            .map_err(draw_err)?
            .label(target.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        chart
            .draw_series(
                bars.iter()
                    .map(|&(x, y)| Text::new(format!("{y:.0}k"), (x, y + y_max * 0.02), font(14))),
            )
            .map_err(draw_err)?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

fn rss_per_connection(path: &Path, connect: &[&Value]) -> anyhow::Result<()> {
    let point = |r: &Value| -> Option<(f64, f64)> {
        let n = r["successes"].as_f64()?;
        let bytes = r["bytes_per_connection_held"].as_f64()?;
        Some((n / 1000.0, bytes / 1024.0))
    };
    let x_max = connect
        .iter()
        .filter_map(|r| point(r))
        .map(|p| p.0)
        .fold(1.0, f64::max)
        * 1.1;
    let y_max = connect
        .iter()
        .filter_map(|r| point(r))
        .map(|p| p.1)
        .fold(IDLE_CONNECTION_GOAL_BYTES / 1024.0, f64::max)
        * 1.25;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Server RSS per idle connection (fresh process: RSS delta / connections held)",
            font(20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("idle connections held (thousands)")
        .y_desc("KiB per connection")
        .label_style(font(14))
        .axis_desc_style(font(15))
        .draw()
        .map_err(draw_err)?;
    let goal = IDLE_CONNECTION_GOAL_BYTES / 1024.0;
    let grey = RGBColor(160, 160, 160);
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, goal), (x_max, goal)],
            grey.stroke_width(1),
        ))
        .map_err(draw_err)?
        .label("goal: 8 KB")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1)));
    draw_lines(&mut chart, connect, point)?;
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plots are drawn from reports with the embedded font: every PNG is written and
    /// starts with the PNG signature.
    #[test]
    fn draws_pngs_from_reports() {
        let dir = std::env::temp_dir().join(format!("tern-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut n = 0;
        for (target, scale) in [("tern", 1.0), ("nats", 1.5)] {
            for rate in [250u64, 500, 1000] {
                let report = serde_json::json!({
                    "kind": "fanout", "label": format!("1x1000@{rate}"), "target": target,
                    "args": {"rate": rate, "subscribers_per_channel": 1000},
                    "deliveries_per_sec": rate as f64 * 1000.0, "lost_deliveries": 0,
                    "protocol_errors": 0, "socket_errors": 0,
                    "latency": {"p50_us": (300.0 * scale) as u64, "p99_us": (rate as f64 * 3.0 * scale) as u64}
                });
                n += 1;
                std::fs::write(dir.join(format!("r{n}.json")), report.to_string()).unwrap();
            }
            let connect = serde_json::json!({
                "kind": "connect", "label": "idle-1000", "target": target,
                "successes": 1000, "bytes_per_connection_held": 14_000.0 * scale
            });
            n += 1;
            std::fs::write(dir.join(format!("r{n}.json")), connect.to_string()).unwrap();
        }
        let written = run(&PlotArgs {
            dir: dir.clone(),
            out: None,
        })
        .unwrap();
        assert_eq!(written.len(), 3, "{written:?}");
        for path in written {
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
