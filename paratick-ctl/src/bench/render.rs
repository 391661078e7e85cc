//! results.md: the bench's results as a report for people: the paper-style table,
//! each workload's modes and comparisons, the deliveries, the observer's cost, tick
//! precision and the exits model.

use std::fmt::Write as _;

use super::report::Results;
use super::stats::{Spread, MIN_BASELINE_TIMER_SHARE};

impl Results {
    pub(super) fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Paratick bench results\n");
        let _ = writeln!(
            md,
            "Host: {} backend, kernel {}, {} CPUs. {} Hz, {} repetition(s), {:.1} s runs. Command: `{}`\n",
            self.host.backend, self.host.kernel, self.host.cpus, self.hz, self.reps, self.duration_s, self.command
        );
        if let Some(model) = &self.timer_model {
            let _ = writeln!(
                md,
                "Exits model calibrated from these runs ({} backend): {:.2} exits per timer interrupt, {:.0} us of guest \
                 time per tick, {:.0} floor exits/s, {:.2} exits per injected tick, {:.0}% of timer exits removed by \
                 paratick.\n",
                model.backend,
                model.exits_per_timer_interrupt,
                model.guest_seconds_per_tick * 1e6,
                model.floor_exits_per_s,
                model.exits_per_injected_tick,
                model.paratick_removed_fraction * 100.0
            );
        }
        let _ = writeln!(md, "## Timer-induced exits removed, and the comparisons (medians)\n");
        let _ = writeln!(
            md,
            "Timer-induced exits = exits − exits of the no-timer guest doing the same work in the same repetition \
             (measured, KVM's `exits`). Removed = 1 − timer-induced(mode) / timer-induced(baseline): median \
             [min, max] over the repetitions where the baseline's timer caused at least {:.0}% of its exits; \
             below that its timer exits are within the run-to-run spread of the exits they are taken from, \
             and the ratio is marked, not shown.\n",
            MIN_BASELINE_TIMER_SHARE * 100.0
        );
        let _ = writeln!(
            md,
            "| workload | vCPUs | comparison | timer exits removed | exits, measured | exits, modelled VMX | throughput | execution time | paper: exits / throughput / time |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        for w in &self.summary {
            for c in &w.comparisons {
                let paper = c.paper.map_or(String::new(), |p| {
                    format!("{:+.0}% / {:+.0}% / {:+.0}%", p.exits_pct, p.throughput_pct, p.execution_time_pct)
                });
                let too_small = format!(
                    "n/a (baseline's timer exits under {:.0}% of its exits: too small to divide by)",
                    MIN_BASELINE_TIMER_SHARE * 100.0
                );
                let removed = c
                    .timer_exits_removed
                    .map_or(too_small, |r| format!("{:.2} [{:.2}, {:.2}]", r.median, r.min, r.max));
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {removed} | {:+.1}% | {:+.1}% | {:+.1}% | {:+.1}% | {paper} |",
                    w.workload,
                    w.vcpus,
                    c.comparison,
                    c.exits_pct,
                    c.modelled_vmx_exits_pct,
                    c.throughput_pct,
                    c.execution_time_pct
                );
            }
        }
        let _ = writeln!(md, "\n## Per mode: median [min, max]\n");
        let _ = writeln!(
            md,
            "| workload | mode | throughput (units/s) | execution time (s) | exits, measured | timer-induced exits | exits, modelled VMX |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        let spread =
            |s: &Spread, digits: usize| format!("{:.*} [{:.*}, {:.*}]", digits, s.median, digits, s.min, digits, s.max);
        for w in &self.summary {
            for m in &w.modes {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    w.workload,
                    m.mode,
                    spread(&m.throughput_per_s, 1),
                    spread(&m.execution_s, 3),
                    spread(&m.exits, 0),
                    spread(&m.timer_exits, 0),
                    spread(&m.modelled_vmx_exits, 0)
                );
            }
        }
        let _ = writeln!(md, "\n## Tick delivery (contended workload: every tick is needed)\n");
        let _ = writeln!(
            md,
            "| delivery | exits/s | timer-induced exits per tick | injector CPU (s/s) | effective Hz | p50 (µs) | p99 (µs) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for d in &self.delivery {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.4} | {:.1} | {} | {} |",
                d.delivery,
                spread(&d.exits_per_s, 0),
                d.timer_exits_per_tick.map_or("n/a (no ticks)".to_string(), |s| spread(&s, 2)),
                d.injector_cpu_s_per_s.median,
                d.precision.effective_hz,
                d.precision.interval_p50_us,
                d.precision.interval_p99_us
            );
        }
        md.push_str(&self.observer_overhead.markdown());
        let _ = writeln!(md, "\n## Tick precision (paratick, contended workload, as the guest took its ticks)\n");
        let _ = writeln!(md, "| requested Hz | delivery | effective Hz | intervals | p1 (µs) | p50 (µs) | p99 (µs) |");
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for p in &self.tick_precision {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {} | {} | {} | {} |",
                p.requested_hz,
                p.delivery,
                p.effective_hz,
                p.intervals,
                p.interval_p1_us,
                p.interval_p50_us,
                p.interval_p99_us
            );
        }
        let _ = writeln!(
            md,
            "\nMeasured: KVM's `exits` statistic, throughput, execution time, timer-induced exits and every eBPF \
             count. Modelled: \"exits, modelled VMX\" = MSR writes + port I/O + MMIO + HLT exits + one exit per \
             timer tick (timer expiry, or the kick of an injected tick that did not ride on another exit), the exits \
             a VMX host without APICv would take for the same events. Interval percentiles are the upper edges of \
             eighth-of-a-period bins. Plots: exits_per_second.svg, timer_exits.svg, throughput.svg, \
             tick_intervals.svg."
        );
        md
    }
}
