//! PNG plots with plotters' bitmap backend. Text is drawn with the DejaVu Sans font embedded in
//! the binary (plotters' `ab_glyph` feature), so no system font library is needed.

use std::error::Error;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::results::{Report, Second};
use crate::summary::{Group, TargetRuns, order_key};

/// Result of drawing one plot.
pub type PlotResult = Result<(), Box<dyn Error>>;

const FONT: &str = "sans-serif";
const RATE_AXIS: &str = "messages/s (log)";
const FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Makes the embedded font the `sans-serif` family every plot uses. Call once before drawing.
pub fn register_font() -> PlotResult {
    plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
        .map_err(|_| "the embedded font does not parse")?;
    Ok(())
}

/// A fixed colour per known target, so a target looks the same in every plot.
fn colour(target: &str) -> RGBColor {
    match target {
        "confab" => RGBColor(214, 39, 40),
        "floor" => RGBColor(0, 0, 0),
        "floor-batched" => RGBColor(127, 127, 127),
        "axum-broadcast" => RGBColor(31, 119, 180),
        "axum-broadcast-tuned" => RGBColor(23, 190, 207),
        "ws" => RGBColor(44, 160, 44),
        "socketio" => RGBColor(148, 103, 189),
        "gorilla" => RGBColor(255, 127, 14),
        other => {
            let hash = other.bytes().fold(0usize, |h, b| h * 31 + b as usize);
            let (r, g, b) = Palette99::pick(hash).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// One line per target: (x, value) points over the groups, in the groups' order; `x` is the
/// publish rate unless `x_of` says otherwise.
fn series(
    groups: &[&Group],
    figure: impl Fn(&Report) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    series_over(groups, |g| Some(g.rate), figure)
}

/// [`series`] with the x of each group given by `x_of`.
fn series_over(
    groups: &[&Group],
    x_of: impl Fn(&Group) -> Option<f64>,
    figure: impl Fn(&Report) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut targets: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.targets.iter().map(|t| t.target.as_str()))
        .collect();
    targets.sort_by_key(|t| order_key(t));
    targets.dedup();
    targets
        .into_iter()
        .map(|target| {
            let points = groups
                .iter()
                .filter_map(|g| {
                    let value = g.target(target)?.median(&figure)?;
                    let x = x_of(g)?;
                    (value > 0.0 && x > 0.0).then_some((x, value))
                })
                .collect();
            (target.to_string(), points)
        })
        .filter(|(_, points): &(String, Vec<_>)| !points.is_empty())
        .collect()
}

/// Range of the points' x and y values, padded for a log axis.
fn log_bounds(lines: &[(String, Vec<(f64, f64)>)]) -> Option<((f64, f64), (f64, f64))> {
    let points = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    (x0 <= x1).then_some(((x0 / 1.3, x1 * 1.3), (y0 / 1.5, y1 * 1.5)))
}

/// The series' legend, in the upper left corner, as every plot has it.
fn draw_legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
) -> PlotResult {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

/// A log axis's tick label: only 1, 2 and 5 times a power of ten are written. Plotters puts a
/// tick at every multiple within each decade, and over 100-2000 messages/s "900" and "1000"
/// ran into each other.
fn log_tick_label(value: &f64) -> String {
    if *value <= 0.0 {
        return String::new();
    }
    let lead = value / 10f64.powf(value.log10().floor());
    if [1.0, 2.0, 5.0, 10.0]
        .iter()
        .any(|nice| (lead - nice).abs() < 1e-6)
    {
        format!("{value:.0}")
    } else {
        String::new()
    }
}

/// Draws `lines` on `area` with a log-scale x axis and a log or linear y axis.
fn line_chart(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[(String, Vec<(f64, f64)>)],
    log_y: bool,
) -> PlotResult {
    let Some(((x0, x1), (y0, y1))) = log_bounds(lines) else {
        return Ok(());
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65);
    let x_fmt = log_tick_label;
    // The two axis kinds are different types, hence the two branches.
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&x_fmt)
                .y_labels(12)
                .label_style((FONT, 14))
                .draw()?;
            for (target, points) in lines {
                let c = colour(target);
                let width = if target == "confab" { 3 } else { 2 };
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(width)))?
                    .label(target.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
            }
            draw_legend(&mut chart)?;
        }};
    }
    if log_y {
        draw!(builder.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?);
    } else {
        draw!(builder.build_cartesian_2d((x0..x1).log_scale(), 0.0..y1)?);
    }
    Ok(())
}

/// W1: p50, p99 and p99.9 end-to-end latency (ms, log scale) against the publish rate.
pub fn latency_vs_rate(groups: &[&Group], path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, (1800, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    type Pick = fn(&Report) -> f64;
    let picks: [(&str, Pick); 3] = [
        ("p50", |r| r.latency_us.p50),
        ("p99", |r| r.latency_us.p99),
        ("p99.9", |r| r.latency_us.p999),
    ];
    for (panel, (name, pick)) in panels.iter().zip(picks) {
        let lines = series(groups, |r| Some(pick(r) / 1000.0));
        let title = format!("W1 {name} end-to-end latency");
        line_chart(panel, &title, RATE_AXIS, "ms (log)", &lines, true)?;
    }
    root.present()?;
    Ok(())
}

/// W1: server CPU µs per delivered message against the publish rate.
pub fn cpu_vs_rate(groups: &[&Group], path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, (1000, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let lines = series(groups, |r| {
        r.server.as_ref().and_then(|s| s.cpu_us_per_delivery)
    });
    line_chart(
        &root,
        "W1 server CPU per delivery (server on one core)",
        RATE_AXIS,
        "µs per delivery",
        &lines,
        false,
    )?;
    root.present()?;
    Ok(())
}

/// W3: server RSS per idle connection, one bar per target (KiB, log scale, value on top).
pub fn rss_per_connection(group: &Group, path: &Path) -> PlotResult {
    let bars: Vec<(String, f64)> = group
        .targets
        .iter()
        .filter_map(|t| {
            let v = t.median(|r| r.server.as_ref().and_then(|s| s.rss_kib_per_connection))?;
            Some((t.target.clone(), v.max(0.01)))
        })
        .collect();
    if bars.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (1000, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let lo = bars.iter().map(|b| b.1).fold(f64::MAX, f64::min) / 3.0;
    let hi = bars.iter().map(|b| b.1).fold(f64::MIN, f64::max) * 3.0;
    let connections = connections(group).unwrap_or(0.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("W3 server RSS per idle connection ({connections:.0} connections)"),
            (FONT, 22),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        // An integer range is inclusive for plotters' discrete axes: 0..=len-1 is len segments.
        .build_cartesian_2d((0..bars.len() - 1).into_segmented(), (lo..hi).log_scale())?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("KiB per connection (log)")
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style((FONT, 14))
        .draw()?;
    for (i, (target, value)) in bars.iter().enumerate() {
        let c = colour(target);
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), lo),
                (SegmentValue::Exact(i + 1), *value),
            ],
            c.filled(),
        );
        bar.set_margin(0, 0, 15, 15);
        chart.draw_series(std::iter::once(bar))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{value:.2}"),
            (SegmentValue::CenterOf(i), value * 1.15),
            (FONT, 16).into_font().color(&BLACK),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// Connections a group's runs asked for.
fn connections(group: &Group) -> Option<f64> {
    group
        .targets
        .first()
        .and_then(|t| t.median(|r| Some(r.connections_requested as f64)))
}

/// W3 run at several sizes: server RSS per idle connection against the number of
/// connections, one line per target (what a connection costs as the server fills up).
pub fn rss_vs_connections(groups: &[&Group], path: &Path) -> PlotResult {
    let root = BitMapBackend::new(path, (1000, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let lines = series_over(groups, connections, |r| {
        r.server.as_ref().and_then(|s| s.rss_kib_per_connection)
    });
    line_chart(
        &root,
        "W3 server RSS per idle connection against connections",
        "connections (log)",
        "KiB per connection (log)",
        &lines,
        true,
    )?;
    root.present()?;
    Ok(())
}

/// Each second of a group's windows (every run), as a point: how late the generator's own
/// runtime was against the p99 of what arrived, both in ms on log axes, one colour per target;
/// a hollow circle at the same lateness is the second's p99 at arrival (to the kernel's receive
/// timestamp, without the generator's delay in reading), where the run had it.
/// Points near the diagonal are seconds whose p99 the generator's lateness explains; those
/// above the 10 ms line and well left of the diagonal are the server's. Nothing is drawn for
/// runs without a timeline.
pub fn seconds_vs_generator(group: &Group, path: &Path) -> PlotResult {
    let points_of = |t: &TargetRuns, p99: fn(&Second) -> Option<f64>| {
        t.runs
            .iter()
            .flat_map(|r| r.timeline.iter())
            .filter(|s| s.in_window)
            .filter_map(|s| Some((s.generator_late_ms?.max(0.1), p99(s)?.max(0.1))))
            .collect::<Vec<_>>()
    };
    let series = |p99: fn(&Second) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
        group
            .targets
            .iter()
            .map(|t| (t.target.clone(), points_of(t, p99)))
            .filter(|(_, points)| !points.is_empty())
            .collect()
    };
    let lines = series(|s| s.p99_ms);
    let at_arrival = series(|s| s.arrival_p99_ms);
    let both: Vec<_> = lines.iter().chain(&at_arrival).cloned().collect();
    let Some(((x0, x1), (y0, y1))) = log_bounds(&both) else {
        return Ok(());
    };
    let (low, high) = (x0.min(y0), x1.max(y1).max(20.0));
    let root = BitMapBackend::new(path, (900, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} {}: each second's p99 against the generator's lateness",
                group.workload.to_uppercase(),
                group.params
            ),
            (FONT, 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((low..high).log_scale(), (low..high).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("generator late at worst in the second, ms (log)")
        .y_desc("p99 of the second, ms (log)")
        .label_style((FONT, 14))
        .draw()?;
    let grey = RGBColor(160, 160, 160);
    chart
        .draw_series(LineSeries::new(
            vec![(low, low), (high, high)],
            grey.stroke_width(1),
        ))?
        .label("p99 = generator's lateness")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1)));
    chart
        .draw_series(LineSeries::new(
            vec![(low, 10.0), (high, 10.0)],
            BLACK.stroke_width(1),
        ))?
        .label("10 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    for (target, points) in &lines {
        let c = colour(target);
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 4, c.mix(0.7).filled())),
            )?
            .label(format!("{target} ({} seconds)", points.len()))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
    }
    for (target, points) in &at_arrival {
        let c = colour(target);
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 5, c.stroke_width(1))))?
            .label(format!("{target}, p99 at arrival"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.stroke_width(1)));
    }
    draw_legend(&mut chart)?;
    Ok(())
}

/// Draws every plot the groups allow into `dir` and returns the files written.
pub fn all(groups: &[Group], dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let w1: Vec<&Group> = groups.iter().filter(|g| g.workload == "w1").collect();
    if !w1.is_empty() {
        let path = dir.join("w1-latency.png");
        latency_vs_rate(&w1, &path)?;
        written.push(path);
        let path = dir.join("w1-cpu-per-delivery.png");
        cpu_vs_rate(&w1, &path)?;
        written.push(path);
    }
    let mut w3: Vec<&Group> = groups.iter().filter(|g| g.workload == "w3").collect();
    if w3.len() > 1 {
        w3.sort_by_key(|g| connections(g).map_or(0, |n| n as u64));
        let path = dir.join("w3-rss-vs-connections.png");
        rss_vs_connections(&w3, &path)?;
        written.push(path);
    }
    for group in groups.iter().filter(|g| g.workload == "w2") {
        let path = dir.join(format!("w2-seconds-{}.png", group.params));
        seconds_vs_generator(group, &path)?;
        if path.exists() {
            written.push(path);
        }
    }
    for group in groups.iter().filter(|g| g.workload == "w3") {
        let path = dir.join(format!("w3-rss-per-connection-{}.png", group.params));
        rss_per_connection(group, &path)?;
        if path.exists() {
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(p99_ms: f64, late_ms: Option<f64>) -> Second {
        Second {
            in_window: true,
            p99_ms: Some(p99_ms),
            arrival_p99_ms: Some(p99_ms / 2.0),
            generator_late_ms: late_ms,
        }
    }

    fn w2(timeline: Vec<Second>) -> Group {
        Group {
            workload: "w2".into(),
            params: "n10000".into(),
            rate: 10_000.0,
            targets: vec![TargetRuns {
                target: "confab".into(),
                runs: vec![Report {
                    timeline,
                    ..Report::default()
                }],
            }],
        }
    }

    #[test]
    fn log_ticks_are_labelled_at_one_two_and_five_only() {
        let labels: Vec<String> = [100.0, 200.0, 300.0, 500.0, 900.0, 1000.0, 2000.0, 19000.0]
            .iter()
            .map(log_tick_label)
            .collect();
        assert_eq!(labels, ["100", "200", "", "500", "", "1000", "2000", ""]);
        assert_eq!(log_tick_label(&0.0), "");
    }

    #[test]
    fn seconds_are_plotted_only_when_the_timeline_has_the_generators_lateness() {
        register_font().unwrap();
        let dir = std::env::temp_dir().join(format!("confab-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("with.png");
        seconds_vs_generator(
            &w2(vec![second(3.0, Some(2.0)), second(40.0, Some(35.0))]),
            &path,
        )
        .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        // Reports from before the generator measured itself: nothing to plot.
        let path = dir.join("without.png");
        seconds_vs_generator(&w2(vec![second(3.0, None)]), &path).unwrap();
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
