//! `observe --svg DIR`: one SVG per VM, its exits per second by category over time
//! (KVM's counts, with the timer's share by the exits model taken out of the rest).

use std::fmt::Write as _;

use paratick_vmm::kvm_stats::KvmExitCounts;

/// The categories plotted, in order, with their colours.
const CATEGORIES: [(&str, &str); 5] =
    [("timer (model)", "#d62728"), ("halt", "#1f77b4"), ("io", "#2ca02c"), ("mmio", "#9467bd"), ("other", "#7f7f7f")];

/// Exits per second by category in one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitSample {
    /// End of the interval, seconds since the observer started.
    pub at_s: f64,
    /// Per category (the chart's colours), exits per second.
    pub rates: [f64; 5],
}

impl ExitSample {
    /// The sample of an interval of `seconds` in which KVM counted `exits`, of which
    /// the model puts `timer_exits` on the timer.
    pub fn new(at_s: f64, seconds: f64, exits: &KvmExitCounts, timer_exits: u64) -> ExitSample {
        let named = exits.halt_exits + exits.io_exits + exits.mmio_exits;
        let other = exits.exits.saturating_sub(named).saturating_sub(timer_exits);
        let counts = [timer_exits.min(exits.exits), exits.halt_exits, exits.io_exits, exits.mmio_exits, other];
        ExitSample { at_s, rates: counts.map(|n| n as f64 / seconds) }
    }
}

/// The SVG: one line per category.
pub fn exits_over_time(title: &str, samples: &[ExitSample]) -> String {
    let (width, height, left, right, top, bottom) = (720.0, 360.0, 70.0, 150.0, 40.0, 40.0);
    let t_max = samples.iter().map(|s| s.at_s).fold(1.0, f64::max);
    let y_max = samples.iter().flat_map(|s| s.rates).fold(1.0, f64::max) * 1.1;
    let x = |t: f64| left + (width - left - right) * t / t_max;
    let y = |v: f64| height - bottom - (height - top - bottom) * v / y_max;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{0}\" stroke=\"black\"/>",
        height - bottom,
        width - right
    );
    for tick in 0..=4 {
        let value = y_max * f64::from(tick) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{value:.0}</text>",
            left - 6.0,
            y(value) + 4.0
        );
        let seconds = t_max * f64::from(tick) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{seconds:.0} s</text>",
            x(seconds),
            height - 20.0
        );
    }
    let _ =
        writeln!(svg, "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {0:.1})\">exits/s</text>", height / 2.0);
    for (index, (name, colour)) in CATEGORIES.iter().enumerate() {
        let points: Vec<String> =
            samples.iter().map(|s| format!("{:.1},{:.1}", x(s.at_s), y(s.rates[index]))).collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        let legend_y = top + 18.0 * index as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{colour}\"/><text x=\"{}\" y=\"{:.1}\">{name}</text>",
            width - right + 12.0,
            legend_y,
            width - right + 30.0,
            legend_y + 10.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_categories_add_up_to_the_exits_and_the_svg_has_a_line_each() {
        let exits = KvmExitCounts { exits: 100, halt_exits: 10, io_exits: 20, mmio_exits: 5, ..Default::default() };
        let sample = ExitSample::new(1.0, 2.0, &exits, 30);
        assert_eq!(sample.rates, [15.0, 5.0, 10.0, 2.5, 17.5]);
        assert_eq!(sample.rates.iter().sum::<f64>(), 50.0);
        let svg = exits_over_time("a <b>", &[sample.clone(), ExitSample { at_s: 2.0, ..sample }]);
        assert_eq!(svg.matches("<polyline").count(), 5);
        assert!(svg.contains("a &lt;b&gt;") && svg.ends_with("</svg>\n"));
    }
}
