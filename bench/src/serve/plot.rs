//! SVG plot of a [`ServeReport`]: output tokens/s (left) and TTFT p50/p95 and TPOT p50 (right)
//! against concurrency, one point per level.

use std::path::Path;

use plotters::prelude::*;

use super::report::{Level, ServeReport};
use super::LoadError;

/// One plotted line: its name, colour and value at each level.
struct Line {
    name: &'static str,
    color: RGBColor,
    value: fn(&Level) -> f64,
}

const THROUGHPUT: [Line; 1] = [Line { name: "output tokens/s", color: RGBColor(0x1f, 0x77, 0xb4), value: |l| l.tokens_per_s }];
const LATENCY: [Line; 3] = [
    Line { name: "TTFT p50 ms", color: RGBColor(0xff, 0x7f, 0x0e), value: |l| l.ttft_ms.p50 },
    Line { name: "TTFT p95 ms", color: RGBColor(0xd6, 0x27, 0x28), value: |l| l.ttft_ms.p95 },
    Line { name: "TPOT p50 ms", color: RGBColor(0x2c, 0xa0, 0x2c), value: |l| l.tpot_ms.p50 },
];

/// Writes the plot to `path`.
pub fn write_svg(report: &ServeReport, path: &Path) -> Result<(), LoadError> {
    if report.levels.is_empty() {
        return Err(LoadError::Plot { path: path.into(), reason: "no levels to plot".into() });
    }
    draw(report, path).map_err(|reason| LoadError::Plot { path: path.into(), reason })
}

fn draw(report: &ServeReport, path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root.titled(&format!("bench serve — {} ({}), mangrove {}", report.model, report.url, report.provenance.git_sha), ("sans-serif", 18)).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(550);
    panel(&left, &report.levels, &THROUGHPUT, "tokens/s")?;
    panel(&right, &report.levels, &LATENCY, "ms")?;
    root.present().map_err(|e| e.to_string())
}

fn panel(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, levels: &[Level], lines: &[Line], y_desc: &str) -> Result<(), String> {
    let n = levels.len();
    let ymax = levels.iter().flat_map(|l| lines.iter().map(move |s| (s.value)(l))).fold(0.0f64, f64::max).max(1e-9) * 1.3;
    let labels: Vec<String> = levels.iter().map(|l| l.concurrency.to_string()).collect();
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 { labels.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
        })
        .x_desc("concurrency")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| e.to_string())?;
    for s in lines {
        let pts: Vec<(f64, f64)> = levels.iter().enumerate().map(|(i, l)| (i as f64, (s.value)(l))).collect();
        let color = s.color;
        chart
            .draw_series(std::iter::once(PathElement::new(pts.clone(), color.stroke_width(2))))
            .map_err(|e| e.to_string())?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}
