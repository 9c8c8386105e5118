//! SVG bar plot of a lab [`Report`]: per case, one bar per timed variant at its fraction of the
//! device's copy bandwidth (1.0 = moving the variant's own minimum bytes at copy speed).

use std::path::Path;

use plotters::prelude::*;

use super::{LabError, Report};

/// One bar: the case (group) index, the variant and its fraction of copy bandwidth.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub group: usize,
    pub variant: String,
    pub frac: f64,
}

/// Groups (case labels), variants in first-seen order, and a bar per timed variant.
pub fn bars(report: &Report) -> (Vec<String>, Vec<String>, Vec<Bar>) {
    let (mut groups, mut variants, mut bars) = (Vec::new(), Vec::<String>::new(), Vec::new());
    for c in &report.cases {
        let group = groups.len();
        groups.push(c.case.short_label());
        for v in &c.variants {
            if !variants.contains(&v.variant) {
                variants.push(v.variant.clone());
            }
            if let Some(frac) = v.derived.frac_copy_bw {
                bars.push(Bar { group, variant: v.variant.clone(), frac });
            }
        }
    }
    (groups, variants, bars)
}

/// Fill colour of the `i`-th variant (Tableau 10).
pub fn variant_color(i: usize) -> RGBColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (0x1f, 0x77, 0xb4),
        (0xff, 0x7f, 0x0e),
        (0x2c, 0xa0, 0x2c),
        (0xd6, 0x27, 0x28),
        (0x94, 0x67, 0xbd),
        (0x8c, 0x56, 0x4b),
        (0xe3, 0x77, 0xc2),
        (0x7f, 0x7f, 0x7f),
        (0xbc, 0xbd, 0x22),
        (0x17, 0xbe, 0xcf),
    ];
    let (r, g, b) = TAB10[i % TAB10.len()];
    RGBColor(r, g, b)
}

/// Writes the bar plot to `path`.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), LabError> {
    let err = |reason: String| LabError::Plot { path: path.display().to_string(), reason };
    let (groups, variants, bars) = bars(report);
    if groups.is_empty() {
        return Err(LabError::Input("no cases to plot".into()));
    }
    let ymax = bars.iter().map(|b| b.frac).fold(1.0f64, f64::max) * 1.35; // headroom for the legend
    let width = (120 * groups.len() as u32).max(900);
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let title = format!(
        "fraction of copy bandwidth ({:.0} GB/s) — {}, mangrove {}",
        report.copy_bw_gbs, report.device.name, report.provenance.git_sha
    );
    let labels = groups.clone();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.5f64..groups.len() as f64 - 0.5, 0f64..ymax)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len())
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 { labels.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
        })
        .y_desc("achieved GB/s ÷ copy GB/s")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(std::iter::once(PathElement::new(vec![(-0.5, 1.0), (groups.len() as f64 - 0.5, 1.0)], BLACK.mix(0.5))))
        .map_err(|e| err(e.to_string()))?;
    let slot = 0.8 / variants.len().max(1) as f64;
    for (vi, name) in variants.iter().enumerate() {
        let color = variant_color(vi);
        let rects = bars.iter().filter(|b| &b.variant == name).map(|b| {
            let x0 = b.group as f64 - 0.4 + vi as f64 * slot;
            Rectangle::new([(x0, 0.0), (x0 + slot * 0.9, b.frac)], color.filled())
        });
        chart
            .draw_series(rects)
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{gemv_case, report};
    use super::*;

    #[test]
    fn svg_has_one_bar_per_timed_variant_and_case() {
        let r = report(vec![gemv_case(1), gemv_case(8)]);
        let (groups, variants, bars) = bars(&r);
        assert_eq!(groups, vec!["o M1", "o M8"]);
        assert_eq!(variants.len(), 5);
        assert_eq!(bars.len(), 2 * 4, "the failed default W2A8 has no bar");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.svg");
        write_svg(&r, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for (vi, name) in variants.iter().enumerate() {
            let c = variant_color(vi);
            let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
            let want = bars.iter().filter(|b| &b.variant == name).count() + 1; // + the legend swatch
            assert_eq!(svg.matches(&fill).count(), want, "{name} ({fill})");
            assert!(svg.contains(name.as_str()), "legend names {name}");
        }
        assert!(svg.contains("o M8"), "group labels are drawn");
    }
}
