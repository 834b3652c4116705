//! Grouped bar charts (PNG) for the report, with plotters' bitmap backend and a TrueType
//! font read at run time (DejaVu Sans, Debian's `fonts-dejavu-core`), so no system font
//! library is linked.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Where the font is looked for; the first that exists is used.
const FONTS: [&str; 2] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

/// One bar per group and series; `None` draws no bar (a system that did not run).
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) color: RGBColor,
    pub(crate) values: Vec<Option<f64>>,
}

pub(crate) const COLORS: [RGBColor; 3] =
    [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e), RGBColor(0x2c, 0xa0, 0x2c)];

/// Registers the font once; fails (and the report says plots were skipped) without one.
pub(crate) fn init_font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONTS.iter().find(|p| Path::new(p).is_file()).ok_or_else(|| {
            format!("no font for the plots ({}): install Debian's fonts-dejavu-core", FONTS.join(", "))
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{path} is not a usable TrueType font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// A grouped bar chart on a log axis, each bar labelled with its value.
pub(crate) fn bars(path: &Path, title: &str, unit: &str, groups: &[&str], series: &[Series]) -> Result<()> {
    init_font()?;
    let values: Vec<f64> = series.iter().flat_map(|s| s.values.iter().flatten().copied()).collect();
    let max = values.iter().copied().fold(f64::MIN, f64::max).max(1e-3);
    let min = values.iter().copied().filter(|v| *v > 0.0).fold(f64::MAX, f64::min).min(max);
    let (lo, hi) = (min / 3.0, max * 4.0);
    let root = BitMapBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, (lo..hi).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(6)
        .y_desc(format!("{unit} (log scale)"))
        .y_label_formatter(&|v| format_value(*v))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let width = 0.8 / series.len() as f64;
    for (si, s) in series.iter().enumerate() {
        let color = s.color;
        let rects = s.values.iter().enumerate().filter_map(|(gi, v)| {
            let v = (*v)?;
            let x0 = gi as f64 + 0.1 + si as f64 * width;
            Some(Rectangle::new([(x0, lo), (x0 + width * 0.92, v.max(lo))], color.filled()))
        });
        chart
            .draw_series(rects)
            .map_err(|e| anyhow!("{e}"))?
            .label(s.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        let labels = s.values.iter().enumerate().filter_map(|(gi, v)| {
            let v = (*v)?;
            let x = gi as f64 + 0.1 + (si as f64 + 0.46) * width;
            Some(Text::new(
                format_value(v),
                (x, v.max(lo) * 1.12),
                ("sans-serif", 13).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Bottom,
                )),
            ))
        });
        chart.draw_series(labels).map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    // Group names under the axis, centred on each group.
    for (gi, g) in groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(gi as f64 + 0.5, lo));
        root.draw(&Text::new(
            g.to_string(),
            (px, py + 8),
            ("sans-serif", 15).into_font().color(&BLACK).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            )),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}")).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Links plot `file` (in `benchmarks/` beside the report) with `alt` text, or says why it
/// was not drawn.
pub(crate) fn embed(md: &mut String, file: &str, alt: &str, drawn: Result<()>) {
    use std::fmt::Write as _;
    match drawn {
        Ok(()) => {
            let _ = writeln!(md, "![{alt}](benchmarks/{file})\n");
        }
        Err(e) => {
            eprintln!("bench: WARNING: plot {file} not drawn: {e:#}");
            let _ = writeln!(md, "**Plot {file} not drawn: {e:#}.**\n");
        }
    }
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
