//! SVG plots of the bench: exits per second and throughput per mode per workload, as a
//! percentage of the tickless guest's median (bars at the median, whiskers from min to
//! max), the timer-induced exits of every mode over the no-timer floor, and the
//! distribution of intervals between the guest's ticks. Plain SVG.

use std::fmt::Write as _;
use std::path::Path;

use paratick_common::guest::TICK_INTERVAL_BINS_PER_PERIOD;

use super::report::{Record, Results, HISTOGRAM_BINS};
use super::stats::Spread;
use super::Result;
use crate::io_error::io;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 360.0;
const MARGIN: f64 = 60.0;
const COLOURS: [&str; 5] = ["#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"];

fn svg_start(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n",
        WIDTH / 2.0
    )
}

/// A round step for about four axis ticks up to `highest`: 1, 2, 2.5 or 5 times a power
/// of ten.
fn round_step(highest: f64) -> f64 {
    let rough = highest.max(1e-9) / 4.0;
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].into_iter().map(|m| m * power).find(|&step| step >= rough).unwrap_or(10.0 * power)
}

/// Bars per group (workload) and series (mode), with whiskers.
fn bar_chart(title: &str, y_label: &str, groups: &[(String, Vec<(String, Spread)>)]) -> String {
    let mut svg = svg_start(title);
    let highest = groups.iter().flat_map(|(_, bars)| bars.iter().map(|(_, s)| s.max)).fold(0.0f64, f64::max);
    let step = round_step(highest);
    let ticks = (highest / step).ceil().max(1.0) as u32;
    let top = step * f64::from(ticks);
    let plot_h = HEIGHT - 2.0 * MARGIN;
    let plot_w = WIDTH - 2.0 * MARGIN;
    let y = |v: f64| MARGIN + plot_h * (1.0 - v / top);
    let _ = writeln!(
        svg,
        "<line x1=\"{MARGIN}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        y(0.0),
        WIDTH - MARGIN,
        y(0.0)
    );
    let _ = writeln!(svg, "<line x1=\"{MARGIN}\" y1=\"{MARGIN}\" x2=\"{MARGIN}\" y2=\"{}\" stroke=\"black\"/>", y(0.0));
    // As many decimals as the step has (2.5 → 1, 0.25 → 2).
    let digits = (0..3).find(|&d| (step * 10f64.powi(d)).fract().abs() < 1e-9).unwrap_or(3) as usize;
    for tick in 0..=ticks {
        let value = step * f64::from(tick);
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{value:.digits$}</text>",
            MARGIN - 4.0,
            y(value) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\">bars: median; whiskers: min to max over the repetitions</text>",
        WIDTH - MARGIN,
        HEIGHT - 6.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">{y_label}</text>",
        HEIGHT / 2.0,
        HEIGHT / 2.0
    );
    let group_w = plot_w / groups.len().max(1) as f64;
    for (g, (group, bars)) in groups.iter().enumerate() {
        let bar_w = group_w * 0.8 / bars.len().max(1) as f64;
        let x0 = MARGIN + g as f64 * group_w + group_w * 0.1;
        for (b, (_, spread)) in bars.iter().enumerate() {
            let x = x0 + b as f64 * bar_w;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                y(spread.median),
                bar_w * 0.9,
                y(0.0) - y(spread.median),
                COLOURS[b % COLOURS.len()]
            );
            let cx = x + bar_w * 0.45;
            let _ = writeln!(
                svg,
                "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                y(spread.min),
                y(spread.max)
            );
        }
        // A label may have two lines ("io\nVMX model").
        for (line, text) in group.lines().enumerate() {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{text}</text>",
                x0 + group_w * 0.4,
                y(0.0) + 18.0 + 14.0 * line as f64
            );
        }
    }
    if let Some((_, bars)) = groups.first() {
        for (b, (series, _)) in bars.iter().enumerate() {
            let x = WIDTH - MARGIN - 110.0;
            let yy = MARGIN + 16.0 * b as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/>",
                yy - 9.0,
                COLOURS[b % COLOURS.len()]
            );
            let _ = writeln!(svg, "<text x=\"{}\" y=\"{yy}\">{series}</text>", x + 14.0);
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Per workload and mode: `value` of the runs of `kind` in percent of the tickless median.
fn per_mode(results: &Results, kind: &str, value: fn(&Record) -> f64) -> Vec<(String, Vec<(String, Spread)>)> {
    let values = |workload: &str, mode: &str| -> Vec<f64> {
        results.runs.iter().filter(|r| r.workload == workload && r.mode == mode && r.kind == kind).map(value).collect()
    };
    results
        .summary
        .iter()
        .map(|w| {
            let base = super::stats::median(values(w.workload, "tickless").into_iter()).max(1e-9);
            let bars = w
                .modes
                .iter()
                .map(|m| {
                    let percent: Vec<f64> = values(w.workload, m.mode).iter().map(|v| 100.0 * v / base).collect();
                    let median = super::stats::median(percent.iter().copied());
                    let min = percent.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = percent.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    (m.mode.to_string(), Spread { median, min, max })
                })
                .collect();
            (w.workload.to_string(), bars)
        })
        .collect()
}

fn histograms(results: &Results) -> String {
    let mut svg = svg_start("Intervals between the guest's ticks: 0 to 4 periods, red = one period");
    let panels = results.tick_precision.len().max(1) as f64;
    let panel_w = (WIDTH - MARGIN) / panels;
    for (p, precision) in results.tick_precision.iter().enumerate() {
        let x0 = MARGIN / 2.0 + p as f64 * panel_w;
        let top = precision.histogram.iter().copied().max().unwrap_or(1).max(1) as f64;
        let bin_w = (panel_w - 20.0) / HISTOGRAM_BINS as f64;
        let base = HEIGHT - MARGIN;
        for (b, count) in precision.histogram.iter().enumerate() {
            let h = (HEIGHT - 2.0 * MARGIN) * *count as f64 / top;
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>",
                x0 + b as f64 * bin_w,
                base - h,
                bin_w * 0.9,
                if b as u64 == TICK_INTERVAL_BINS_PER_PERIOD { COLOURS[1] } else { COLOURS[2] }
            );
        }
        let centre = x0 + (panel_w - 20.0) / 2.0;
        let _ = writeln!(
            svg,
            "<text x=\"{centre:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\">{} Hz requested</text>",
            base + 18.0,
            precision.requested_hz
        );
        let _ = writeln!(
            svg,
            "<text x=\"{centre:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">effective {:.1} Hz, p99 {} µs</text>",
            base + 34.0,
            precision.effective_hz,
            precision.interval_p99_us
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Modelled VMX exits per second, per workload, labelled as modelled.
fn modelled_rate(results: &Results) -> Vec<(String, Vec<(String, Spread)>)> {
    per_mode(results, "throughput", |r| r.modelled_vmx_exits as f64 / r.elapsed_s.max(1e-9))
        .into_iter()
        .map(|(workload, bars)| (format!("{workload}\nVMX model"), bars))
        .collect()
}

/// Timer-induced exits (exits − the no-timer floor's, same work and repetition) per
/// workload and mode, the floor included (at 0 by definition).
fn timer_exits(results: &Results) -> Vec<(String, Vec<(String, Spread)>)> {
    results
        .summary
        .iter()
        .map(|w| {
            let removed = w
                .comparison(paratick_common::guest::TickMode::Paratick, paratick_common::guest::TickMode::Tickless)
                .and_then(|c| c.timer_exits_removed)
                .map_or(0.0, |r| r.median);
            let bars = w.modes.iter().map(|m| (m.mode.to_string(), m.timer_exits)).collect();
            (format!("{}\nremoved {:.0}%", w.workload, 100.0 * removed), bars)
        })
        .collect()
}

/// Writes exits_per_second.svg, timer_exits.svg, throughput.svg and tick_intervals.svg.
pub fn write_all(results: &Results, dir: &Path) -> Result<()> {
    let measured = per_mode(results, "throughput", |r| r.exits_per_s)
        .into_iter()
        .map(|(workload, bars)| (format!("{workload}\nmeasured"), bars));
    let exits: Vec<_> = measured.chain(modelled_rate(results)).collect();
    let files = [
        (
            "exits_per_second.svg",
            bar_chart("VM exits per second, measured and modelled VMX (% of tickless)", "% of tickless", &exits),
        ),
        (
            "timer_exits.svg",
            bar_chart(
                "Timer-induced exits: exits − no-timer floor, same work (paratick vs tickless: removed)",
                "exits per run",
                &timer_exits(results),
            ),
        ),
        (
            "throughput.svg",
            bar_chart(
                "Throughput (% of tickless)",
                "% of tickless",
                &per_mode(results, "throughput", |r| r.throughput_per_s),
            ),
        ),
        ("tick_intervals.svg", histograms(results)),
    ];
    for (name, svg) in files {
        std::fs::write(dir.join(name), svg).map_err(io(format!("cannot write {}", dir.join(name).display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(round_step(110.0), 50.0);
        assert_eq!(round_step(100.0), 25.0);
        assert_eq!(round_step(37.0), 10.0);
        assert_eq!(round_step(7.3), 2.0);
        assert_eq!(round_step(0.9), 0.25);
        assert_eq!(round_step(0.0), round_step(1e-9));
    }
}
