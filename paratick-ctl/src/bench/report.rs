//! The bench's records, summaries and files: results.json (every run, the summaries),
//! results.csv (every run), results.md (the paper-style table and the rest).
//!
//! Measured on this host: KVM's `exits` statistic, throughput, execution time, and every
//! eBPF count. Modelled: `modelled_vmx_exits`, the exits a VMX host without APICv would
//! take for the same events (see [`modelled_vmx_exits`]).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use paratick_common::guest::{TickMode, Workload};
use paratick_vmm::RunReport;
use serde::Serialize;

use super::BenchOptions;
use crate::observer::ProcessCounts;

/// The paper's results against a tickless guest (ICPP 2021, Table/Figures): VM exits,
/// throughput, execution time, in percent, per workload.
pub const PAPER: [(&str, f64, f64, f64); 3] =
    [("sequential", -50.0, 7.0, -2.0), ("multithreaded", -44.0, 14.0, -2.0), ("io", -34.0, 20.0, -18.0)];

/// What a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Fixed time: throughput.
    Throughput,
    /// Fixed work: execution time.
    Execution,
}

impl Kind {
    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Throughput => "throughput",
            Kind::Execution => "execution",
        }
    }
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Workload name.
    pub workload: &'static str,
    /// Tick mode name.
    pub mode: &'static str,
    /// `throughput` (fixed time) or `execution` (fixed work).
    pub kind: &'static str,
    /// Repetition, from 0.
    pub rep: u32,
    /// Guest tick rate.
    pub hz: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Measured: KVM's `exits` statistic, summed over vCPUs.
    pub exits: u64,
    /// Measured exits per second of host time.
    pub exits_per_s: f64,
    /// Modelled: exits on a VMX host without APICv for the same events.
    pub modelled_vmx_exits: u64,
    /// Work units per second of guest time.
    pub throughput_per_s: f64,
    /// Guest time of the run.
    pub elapsed_s: f64,
    /// Work units done.
    pub work_units: u64,
    /// Ticks the guest handled.
    pub guest_ticks: u64,
    /// Of those, ticks while idle.
    pub guest_idle_ticks: u64,
    /// Ticks the host injected.
    pub ticks_injected: u64,
    /// Of those, ticks that rode on another exit.
    pub ticks_ridden: u64,
    /// TSC-deadline MSR writes (eBPF).
    pub tsc_deadline_writes: u64,
    /// LAPIC timer register writes (eBPF).
    pub lapic_timer_writes: u64,
    /// Paratick tick requests (eBPF).
    pub paratick_requests: u64,
    /// Timer interrupts delivered (eBPF).
    pub timer_interrupts: u64,
    /// All MSR writes (eBPF).
    pub msr_writes: u64,
    /// Port I/O accesses (eBPF).
    pub port_io: u64,
    /// MMIO accesses (eBPF).
    pub mmio: u64,
    /// HLT exits (KVM stats).
    pub halt_exits: u64,
    /// Exits to the VMM (eBPF).
    pub userspace_exits: u64,
    /// Instructions KVM emulated (KVM stats; CPL0 guest code on PVM).
    pub insn_emulation: u64,
    /// Estimated exits saved (paratick runs).
    pub exits_saved_estimate: u64,
}

/// Exits a VMX host without APICv would take for what this run did: every MSR write
/// (TSC deadline, EOI, IPI), port and MMIO access and HLT exits; every timer tick costs
/// one exit (the expiry of a tickless/periodic timer, or the kick of an injected tick
/// that did not ride on another exit). Interrupts to a halted vCPU cost no extra exit.
pub fn modelled_vmx_exits(mode: TickMode, report: &RunReport, observed: &ProcessCounts) -> u64 {
    let timer_exits = match mode {
        TickMode::Paratick => report.counters.ticks_injected.saturating_sub(report.counters.ticks_ridden),
        TickMode::Periodic | TickMode::Tickless => observed.timer_interrupts,
    };
    let halts = report.counters.kvm_stats.get("halt_exits").copied().unwrap_or(0);
    observed.event("kvm_msr_write") + observed.event("kvm_pio") + observed.event("kvm_mmio") + halts + timer_exits
}

impl Record {
    /// A record of a finished run.
    pub fn new(
        workload: Workload,
        mode: TickMode,
        kind: Kind,
        rep: u32,
        report: &RunReport,
        observed: &ProcessCounts,
    ) -> Record {
        let stat = |name: &str| report.counters.kvm_stats.get(name).copied().unwrap_or(0);
        let by_kind = |kind: &str| observed.tick_requests_by_kind.get(kind).copied().unwrap_or(0);
        Record {
            workload: workload.name(),
            mode: mode.name(),
            kind: kind.name(),
            rep,
            hz: report.hz,
            vcpus: report.vcpus,
            exits: stat("exits"),
            exits_per_s: stat("exits") as f64 / report.wall_s.max(1e-9),
            modelled_vmx_exits: modelled_vmx_exits(mode, report, observed),
            throughput_per_s: report.throughput_per_s,
            elapsed_s: report.elapsed_s,
            work_units: report.work_units,
            guest_ticks: report.counters.guest_ticks.total,
            guest_idle_ticks: report.counters.guest_idle_ticks.total,
            ticks_injected: report.counters.ticks_injected,
            ticks_ridden: report.counters.ticks_ridden,
            tsc_deadline_writes: by_kind("tsc_deadline"),
            lapic_timer_writes: by_kind("lapic"),
            paratick_requests: by_kind("paratick"),
            timer_interrupts: observed.timer_interrupts,
            msr_writes: observed.event("kvm_msr_write"),
            port_io: observed.event("kvm_pio"),
            mmio: observed.event("kvm_mmio"),
            halt_exits: stat("halt_exits"),
            userspace_exits: observed.event("kvm_userspace_exit"),
            insn_emulation: stat("insn_emulation"),
            exits_saved_estimate: report.exits_saved_estimate,
        }
    }
}

/// Median of the values (0 for none).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Median, minimum and maximum.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        Spread {
            median: median(values.iter().copied()),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// One mode of one workload, over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct ModeSummary {
    /// Tick mode name.
    pub mode: &'static str,
    /// Throughput runs.
    pub throughput_per_s: Spread,
    /// Execution-time runs.
    pub execution_s: Spread,
    /// Measured exits of the execution-time runs.
    pub exits: Spread,
    /// Modelled VMX exits of the execution-time runs.
    pub modelled_vmx_exits: Spread,
}

/// Percent change of medians against the tickless guest.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Relative {
    /// Measured exits, % change.
    pub exits_pct: f64,
    /// Modelled VMX exits, % change.
    pub modelled_vmx_exits_pct: f64,
    /// Throughput, % change.
    pub throughput_pct: f64,
    /// Execution time, % change.
    pub execution_time_pct: f64,
}

/// One workload.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadSummary {
    /// Workload name.
    pub workload: &'static str,
    /// vCPUs.
    pub vcpus: u32,
    /// Each mode.
    pub modes: Vec<ModeSummary>,
    /// Paratick relative to tickless.
    pub paratick_vs_tickless: Relative,
    /// Periodic relative to tickless.
    pub periodic_vs_tickless: Relative,
    /// The paper's figures (exits, throughput, execution time, %).
    pub paper_paratick_vs_tickless: [f64; 3],
}

fn pct(new: f64, base: f64) -> f64 {
    if base == 0.0 {
        0.0
    } else {
        (new / base - 1.0) * 100.0
    }
}

fn relative(mode: &ModeSummary, tickless: &ModeSummary) -> Relative {
    Relative {
        exits_pct: pct(mode.exits.median, tickless.exits.median),
        modelled_vmx_exits_pct: pct(mode.modelled_vmx_exits.median, tickless.modelled_vmx_exits.median),
        throughput_pct: pct(mode.throughput_per_s.median, tickless.throughput_per_s.median),
        execution_time_pct: pct(mode.execution_s.median, tickless.execution_s.median),
    }
}

/// The workload with the most (modelled) exits per second.
pub fn heaviest_workload(records: &[Record]) -> Workload {
    Workload::EVALUATED
        .into_iter()
        .max_by(|a, b| {
            let rate = |w: &Workload| {
                median(
                    records
                        .iter()
                        .filter(|r| r.workload == w.name() && r.kind == "throughput")
                        .map(|r| r.modelled_vmx_exits as f64 / r.elapsed_s.max(1e-9)),
                )
            };
            rate(a).total_cmp(&rate(b))
        })
        .expect("three workloads")
}

/// Throughput with and without the eBPF programs attached.
#[derive(Debug, Clone, Serialize)]
pub struct ObserverOverhead {
    /// Workload name.
    pub workload: &'static str,
    /// Tick mode name.
    pub mode: &'static str,
    /// Throughput with the programs attached.
    pub with_observer_per_s: Spread,
    /// Throughput without.
    pub without_observer_per_s: Spread,
    /// Median throughput with / without (1.0 = no overhead).
    pub ratio: f64,
}

impl ObserverOverhead {
    /// From the throughputs of the two sets of runs.
    pub fn new(workload: Workload, with: &[f64], without: &[f64]) -> ObserverOverhead {
        let (with, without) = (Spread::of(with), Spread::of(without));
        ObserverOverhead {
            workload: workload.name(),
            mode: TickMode::Tickless.name(),
            ratio: if without.median > 0.0 { with.median / without.median } else { 0.0 },
            with_observer_per_s: with,
            without_observer_per_s: without,
        }
    }
}

/// Injected tick rate and intervals at one requested rate.
#[derive(Debug, Clone, Serialize)]
pub struct TickPrecision {
    /// Requested rate.
    pub requested_hz: u32,
    /// Ticks injected per second of guest time.
    pub effective_hz: f64,
    /// Number of intervals measured.
    pub intervals: usize,
    /// 1st percentile interval.
    pub interval_p1_us: u32,
    /// Median interval.
    pub interval_p50_us: u32,
    /// 99th percentile interval.
    pub interval_p99_us: u32,
    /// Longest interval.
    pub interval_max_us: u32,
    /// Intervals in bins of a tenth of the period centred on its multiples (bin 10 is
    /// the period), up to three periods (the last bin holds everything longer).
    pub histogram: Vec<u64>,
}

/// Bins of the interval histogram.
pub const HISTOGRAM_BINS: usize = 30;

impl TickPrecision {
    /// From a paratick run at `hz`.
    pub fn new(hz: u32, report: &RunReport) -> TickPrecision {
        let mut intervals = report.tick_intervals_us.clone();
        intervals.sort_unstable();
        let at = |q: f64| intervals.get(((intervals.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
        let bin = 100_000.0 / hz as f64; // a tenth of the period, in µs
        let mut histogram = vec![0u64; HISTOGRAM_BINS];
        for &interval in &intervals {
            histogram[((interval as f64 / bin).round() as usize).min(HISTOGRAM_BINS - 1)] += 1;
        }
        TickPrecision {
            requested_hz: hz,
            effective_hz: report.counters.ticks_injected as f64 / report.elapsed_s.max(1e-9),
            intervals: intervals.len(),
            interval_p1_us: at(0.01),
            interval_p50_us: at(0.5),
            interval_p99_us: at(0.99),
            interval_max_us: intervals.last().copied().unwrap_or(0),
            histogram,
        }
    }
}

/// Everything the bench found.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The command that produced the results.
    pub command: String,
    /// Where it ran.
    pub host: Host,
    /// Guest tick rate.
    pub hz: u32,
    /// Repetitions.
    pub reps: u32,
    /// Length of a throughput run.
    pub duration_s: f64,
    /// Every run.
    pub runs: Vec<Record>,
    /// Per workload.
    pub summary: Vec<WorkloadSummary>,
    /// The observer's overhead.
    pub observer_overhead: ObserverOverhead,
    /// Tick precision per rate.
    pub tick_precision: Vec<TickPrecision>,
}

/// Where it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    /// KVM backend.
    pub backend: &'static str,
    /// Kernel release.
    pub kernel: String,
    /// Host CPUs.
    pub cpus: usize,
}

impl Results {
    /// Summarises the runs.
    pub fn new(
        options: &BenchOptions,
        runs: Vec<Record>,
        observer_overhead: ObserverOverhead,
        tick_precision: Vec<TickPrecision>,
    ) -> Results {
        let summary = Workload::EVALUATED
            .iter()
            .map(|workload| {
                let modes: Vec<ModeSummary> = TickMode::ALL
                    .iter()
                    .map(|mode| {
                        let of = |kind: &str, f: fn(&Record) -> f64| -> Spread {
                            let values: Vec<f64> = runs
                                .iter()
                                .filter(|r| r.workload == workload.name() && r.mode == mode.name() && r.kind == kind)
                                .map(f)
                                .collect();
                            Spread::of(&values)
                        };
                        ModeSummary {
                            mode: mode.name(),
                            throughput_per_s: of("throughput", |r| r.throughput_per_s),
                            execution_s: of("execution", |r| r.elapsed_s),
                            exits: of("execution", |r| r.exits as f64),
                            modelled_vmx_exits: of("execution", |r| r.modelled_vmx_exits as f64),
                        }
                    })
                    .collect();
                let find = |name: &str| modes.iter().find(|m| m.mode == name).expect("every mode ran");
                let tickless = find("tickless");
                let paper = PAPER.iter().find(|p| p.0 == workload.name()).expect("paper figures per workload");
                WorkloadSummary {
                    workload: workload.name(),
                    vcpus: options.vcpus_for(*workload),
                    paratick_vs_tickless: relative(find("paratick"), tickless),
                    periodic_vs_tickless: relative(find("periodic"), tickless),
                    paper_paratick_vs_tickless: [paper.1, paper.2, paper.3],
                    modes,
                }
            })
            .collect();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        Results {
            command: options.command.clone(),
            host: Host {
                backend: crate::backend::Backend::of_host().name(),
                kernel,
                cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
            hz: options.hz,
            reps: options.reps,
            duration_s: options.duration.as_secs_f64(),
            runs,
            summary,
            observer_overhead,
            tick_precision,
        }
    }

    /// Writes results.json, results.csv and results.md.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).with_context(|| format!("cannot write {}", dir.join(name).display()))
        };
        write("results.json", serde_json::to_string_pretty(self)? + "\n")?;
        write("results.csv", self.csv()?)?;
        write("results.md", self.markdown())
    }

    fn csv(&self) -> Result<String> {
        let mut out = String::new();
        for (index, run) in self.runs.iter().enumerate() {
            let serde_json::Value::Object(fields) = serde_json::to_value(run)? else { unreachable!("a struct") };
            if index == 0 {
                out.push_str(&fields.keys().cloned().collect::<Vec<_>>().join(","));
                out.push('\n');
            }
            let values: Vec<String> = fields
                .values()
                .map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            out.push_str(&values.join(","));
            out.push('\n');
        }
        Ok(out)
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Paratick bench results\n");
        let _ = writeln!(
            md,
            "Host: {} backend, kernel {}, {} CPUs. {} Hz, {} repetition(s), {:.1} s runs. Command: `{}`\n",
            self.host.backend, self.host.kernel, self.host.cpus, self.hz, self.reps, self.duration_s, self.command
        );
        let _ = writeln!(md, "## Paratick and periodic relative to tickless (medians)\n");
        let _ = writeln!(
            md,
            "| workload | vCPUs | comparison | exits, measured | exits, modelled VMX | throughput | execution time | paper: exits / throughput / time |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for w in &self.summary {
            let paper = format!(
                "{:+.0}% / {:+.0}% / {:+.0}%",
                w.paper_paratick_vs_tickless[0], w.paper_paratick_vs_tickless[1], w.paper_paratick_vs_tickless[2]
            );
            for (name, r, paper) in [
                ("paratick vs tickless", &w.paratick_vs_tickless, paper.as_str()),
                ("periodic vs tickless", &w.periodic_vs_tickless, ""),
            ] {
                let _ = writeln!(
                    md,
                    "| {} | {} | {name} | {:+.1}% | {:+.1}% | {:+.1}% | {:+.1}% | {paper} |",
                    w.workload, w.vcpus, r.exits_pct, r.modelled_vmx_exits_pct, r.throughput_pct, r.execution_time_pct
                );
            }
        }
        let _ = writeln!(md, "\n## Per mode: median [min, max]\n");
        let _ = writeln!(
            md,
            "| workload | mode | throughput (units/s) | execution time (s) | exits, measured | exits, modelled VMX |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        let spread =
            |s: &Spread, digits: usize| format!("{:.*} [{:.*}, {:.*}]", digits, s.median, digits, s.min, digits, s.max);
        for w in &self.summary {
            for m in &w.modes {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    w.workload,
                    m.mode,
                    spread(&m.throughput_per_s, 1),
                    spread(&m.execution_s, 3),
                    spread(&m.exits, 0),
                    spread(&m.modelled_vmx_exits, 0)
                );
            }
        }
        let o = &self.observer_overhead;
        let _ = writeln!(md, "\n## Observer overhead\n");
        let _ = writeln!(
            md,
            "{} workload, {} guest: {:.1} units/s with the eBPF programs attached, {:.1} without: ratio {:.3}.",
            o.workload, o.mode, o.with_observer_per_s.median, o.without_observer_per_s.median, o.ratio
        );
        let _ = writeln!(md, "\n## Tick precision (paratick, injected ticks)\n");
        let _ = writeln!(md, "| requested Hz | effective Hz | intervals | p1 (µs) | p50 (µs) | p99 (µs) | max (µs) |");
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for p in &self.tick_precision {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {} | {} | {} | {} | {} |",
                p.requested_hz,
                p.effective_hz,
                p.intervals,
                p.interval_p1_us,
                p.interval_p50_us,
                p.interval_p99_us,
                p.interval_max_us
            );
        }
        let _ = writeln!(
            md,
            "\nMeasured: KVM's `exits` statistic, throughput, execution time and every eBPF count. Modelled: \
             \"exits, modelled VMX\" = MSR writes + port I/O + MMIO + HLT exits + one exit per timer tick \
             (timer expiry, or the kick of an injected tick that did not ride on another exit), the exits a VMX \
             host without APICv would take for the same events. Plots: exits_per_second.svg, throughput.svg, \
             tick_intervals.svg."
        );
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentages() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
        assert_eq!(pct(50.0, 100.0), -50.0);
        assert_eq!(pct(1.0, 0.0), 0.0);
        let s = Spread::of(&[2.0, 9.0, 4.0]);
        assert_eq!((s.median, s.min, s.max), (4.0, 2.0, 9.0));
    }
}
