//! The PNG summary: grouped bars kata vs runc for start and exec latency, and host PSS per idle pod, with
//! pods cloned from a VM template beside them when the run measured those.
//! Text is drawn with `ab_glyph` from a TrueType file (DejaVu Sans, Debian package fonts-dejavu-core).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::element::PathElement;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{Results, TARGET_PSS_MIB};

/// Where the font is looked for, first found wins.
pub const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

const KATA: RGBColor = RGBColor(0xd9, 0x48, 0x1e);
const RUNC: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
const FLOOR: RGBColor = RGBColor(0x88, 0x88, 0x88);
const CLONE: RGBColor = RGBColor(0xe8, 0xa2, 0x3a);

fn register_font() -> Result<()> {
    let path = FONT_FILES.iter().find(|p| Path::new(p).is_file()).ok_or_else(|| {
        anyhow!("no font file found ({}); install the Debian package fonts-dejavu-core", FONT_FILES.join(", "))
    })?;
    let bytes: &'static [u8] =
        Box::leak(std::fs::read(path).with_context(|| format!("read {path}"))?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// A bar group: a label under it and `(series name, colour, value)` bars.
struct Group {
    label: String,
    bars: Vec<(&'static str, RGBColor, Option<f64>)>,
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    groups: &[Group],
    line: Option<(f64, &str)>,
) -> Result<()> {
    let max = groups
        .iter()
        .flat_map(|g| g.bars.iter().filter_map(|b| b.2))
        .chain(line.map(|l| l.0))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.2;
    let n = groups.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..n, 0.0..max)
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(unit)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("mesh: {e}"))?;
    for (gi, g) in groups.iter().enumerate() {
        let width = 0.8 / g.bars.len().max(1) as f64;
        for (bi, (name, colour, value)) in g.bars.iter().enumerate() {
            let x0 = gi as f64 + 0.1 + bi as f64 * width;
            let label_pos = (x0 + width * 0.1, max * 0.02);
            match value {
                Some(v) => {
                    chart
                        .draw_series(std::iter::once(Rectangle::new(
                            [(x0, 0.0), (x0 + width * 0.9, *v)],
                            colour.filled(),
                        )))
                        .map_err(|e| anyhow!("bar: {e}"))?;
                    let text = if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") };
                    chart
                        .draw_series(std::iter::once(Text::new(
                            text,
                            (x0 + width * 0.1, *v + max * 0.05),
                            ("sans-serif", 14),
                        )))
                        .map_err(|e| anyhow!("value: {e}"))?;
                }
                None => {
                    chart
                        .draw_series(std::iter::once(Text::new("n/a", label_pos, ("sans-serif", 14))))
                        .map_err(|e| anyhow!("n/a: {e}"))?;
                }
            }
            let _ = name;
        }
        chart
            .draw_series(std::iter::once(Text::new(
                g.label.clone(),
                (gi as f64 + 0.1, -max * 0.04),
                ("sans-serif", 15),
            )))
            .map_err(|e| anyhow!("label: {e}"))?;
    }
    if let Some((y, text)) = line {
        chart
            .draw_series(std::iter::once(PathElement::new(vec![(0.0, y), (n, y)], BLACK.stroke_width(2))))
            .map_err(|e| anyhow!("line: {e}"))?;
        chart
            .draw_series(std::iter::once(Text::new(text.to_owned(), (0.05, y + max * 0.06), ("sans-serif", 14))))
            .map_err(|e| anyhow!("line label: {e}"))?;
    }
    // Legend from the first group's series.
    let legend: Vec<(&str, RGBColor)> =
        groups.first().map(|g| g.bars.iter().map(|b| (b.0, b.1)).collect()).unwrap_or_default();
    for (i, (name, colour)) in legend.iter().enumerate() {
        let y = max * (0.97 - 0.07 * i as f64);
        let x = n * 0.6;
        chart
            .draw_series(std::iter::once(Rectangle::new([(x, y), (x + n * 0.05, y - max * 0.04)], colour.filled())))
            .map_err(|e| anyhow!("legend: {e}"))?;
        chart
            .draw_series(std::iter::once(Text::new((*name).to_owned(), (x + n * 0.07, y), ("sans-serif", 15))))
            .map_err(|e| anyhow!("legend: {e}"))?;
    }
    Ok(())
}

/// Draws the three panels into `path` (1500x500 PNG).
pub fn draw(results: &Results, path: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1500, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("fill: {e}"))?;
    let panels = root.split_evenly((1, 3));
    let (kata, runc) = results.cold_stats();
    let floor = results.floor_stat();
    let template = results.template.as_ref();
    let mut bars = vec![("kata", KATA, kata.map(|s| s.median)), ("runc", RUNC, runc.map(|s| s.median))];
    if let Some(t) = template {
        bars.push(("kata, template clone", CLONE, t.cold.as_ref().and_then(|c| c.stats().0).map(|s| s.median)));
    }
    bars.push(("bare QEMU boot floor", FLOOR, floor.map(|s| s.median)));
    let start = [Group { label: "ctr run --rm echo hi".to_owned(), bars }];
    panel(&panels[0], "Start latency (median)", "seconds", &start, None)?;
    let (ek, er) = results.exec_stats();
    let exec = [Group {
        label: "ctr task exec true".to_owned(),
        bars: vec![("kata", KATA, ek.map(|s| s.median)), ("runc", RUNC, er.map(|s| s.median))],
    }];
    panel(&panels[1], "Exec latency (median)", "seconds", &exec, None)?;
    let (mk, mr) = (results.pss_steps("kata"), results.pss_steps("runc"));
    let clones = template.map(|t| t.memory_steps()).unwrap_or_default();
    let memory: Vec<Group> = mk
        .iter()
        .enumerate()
        .map(|(i, (target, running, pss))| {
            let mut bars = vec![
                ("kata", KATA, (*running > 0).then_some(*pss)),
                ("runc", RUNC, mr.get(i).and_then(|(_, r, p)| (*r > 0).then_some(*p))),
            ];
            if template.is_some() {
                let clone = clones.get(i).and_then(|(_, r, p, share)| (*r > 0).then_some(p + share));
                bars.push(("clone, with share", CLONE, clone));
            }
            Group { label: format!("{target} pods ({running} up)"), bars }
        })
        .collect();
    panel(&panels[2], "Host PSS per idle pod", "MiB", &memory, Some((TARGET_PSS_MIB / 1.048_576, "target 60 MB")))?;
    root.present().map_err(|e| anyhow!("write {}: {e}", path.display()))?;
    Ok(())
}
