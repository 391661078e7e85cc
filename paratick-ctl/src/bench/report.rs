//! The bench's records, summaries and files: results.json (every run, the summaries),
//! results.csv (every run), results.md (the paper-style table and the rest).
//!
//! Measured on this host: KVM's `exits` statistic, throughput, execution time, every
//! eBPF count, and the timer's share of the exits: `timer-induced exits(mode) =
//! exits(mode) − exits(no-timer)` of the execution-time runs (the same work) of one
//! repetition, and `timer_exits_removed = 1 − timer-induced(mode) /
//! timer-induced(baseline)`. Modelled: `modelled_vmx_exits`, the exits a VMX host without
//! APICv would take for the same events (see [`super::calibration::modelled_vmx_exits`]).

use std::path::Path;
use strum::VariantArray;

use paratick_common::guest::{TickMode, Workload, TICK_INTERVAL_BINS, TICK_INTERVAL_BINS_PER_PERIOD};
use paratick_vmm::RunReport;
use serde::Serialize;

use super::calibration::calibrated_model;
use super::overhead::ObserverOverhead;
use super::stats::{pct, ExecutionRuns, Spread};
use super::BenchOptions;
use super::Result;
use crate::io_error::io;
use paratick_observer::model::TimerModel;
use paratick_observer::ProcessCounts;

/// The paper's results against a tickless guest (ICPP 2021, Table/Figures): VM exits,
/// throughput, execution time, in percent, per workload.
pub const PAPER: [(&str, f64, f64, f64); 3] =
    [("sequential", -50.0, 7.0, -2.0), ("multithreaded", -44.0, 14.0, -2.0), ("io", -34.0, 20.0, -18.0)];

/// The comparisons every workload's summary carries: (mode, baseline). The first is the
/// paper's; tickless-full is Linux's NO_HZ_FULL, the fairer baseline for adaptive ticks.
pub const COMPARISONS: [(TickMode, TickMode); 4] = [
    (TickMode::Paratick, TickMode::Tickless),
    (TickMode::Paratick, TickMode::TicklessFull),
    (TickMode::TicklessFull, TickMode::Tickless),
    (TickMode::Periodic, TickMode::Tickless),
];

/// The mode whose exits are the floor: no timer at all.
pub const FLOOR: TickMode = TickMode::NoTimer;

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
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// Workload name.
    pub workload: &'static str,
    /// Tick mode name.
    pub mode: &'static str,
    /// How paratick ticks were delivered (the VM's setting; meaningful for paratick).
    pub delivery: &'static str,
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
    /// Exits saved against a tickless guest, by the exits model (paratick runs).
    pub exits_saved_estimate: u64,
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
        model: &TimerModel,
    ) -> Record {
        let stats = &report.counters.kvm_stats;
        let by_kind = |kind: &str| observed.tick_requests_by_kind.get(kind).copied().unwrap_or(0);
        Record {
            workload: workload.name(),
            mode: mode.name(),
            delivery: report.delivery,
            kind: kind.name(),
            rep,
            hz: report.hz,
            vcpus: report.vcpus,
            exits: stats.exits,
            exits_per_s: stats.exits as f64 / report.wall_s.max(1e-9),
            modelled_vmx_exits: super::calibration::modelled_vmx_exits(mode, report, observed),
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
            halt_exits: stats.halt_exits,
            userspace_exits: observed.event("kvm_userspace_exit"),
            insn_emulation: stats.insn_emulation,
            exits_saved_estimate: model.exits_saved(&report.counters),
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
    /// Timer-induced exits of the execution-time runs: exits − exits of the no-timer
    /// floor in the same repetition (0 for the floor itself).
    pub timer_exits: Spread,
    /// Modelled VMX exits of the execution-time runs.
    pub modelled_vmx_exits: Spread,
}

/// The paper's figures for a comparison, in percent.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PaperFigures {
    /// VM exits.
    pub exits_pct: f64,
    /// Throughput.
    pub throughput_pct: f64,
    /// Execution time.
    pub execution_time_pct: f64,
}

/// One mode against a baseline, for one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// "paratick vs tickless", …
    pub comparison: String,
    /// The mode compared.
    pub mode: &'static str,
    /// The baseline.
    pub baseline: &'static str,
    /// Measured exits, % change of medians.
    pub exits_pct: f64,
    /// Modelled VMX exits, % change of medians.
    pub modelled_vmx_exits_pct: f64,
    /// Throughput, % change of medians.
    pub throughput_pct: f64,
    /// Execution time, % change of medians.
    pub execution_time_pct: f64,
    /// `1 − timer-induced(mode) / timer-induced(baseline)`, a fraction, per repetition
    /// (measured: both from the same repetition's execution-time runs and floor); absent
    /// when the baseline's timer cost no measurable exits in any repetition.
    pub timer_exits_removed: Option<Spread>,
    /// The paper's figures, for the comparison it made.
    pub paper: Option<PaperFigures>,
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
    /// Each of [`COMPARISONS`].
    pub comparisons: Vec<Comparison>,
}

impl WorkloadSummary {
    /// The comparison of `mode` against `baseline`.
    pub fn comparison(&self, mode: TickMode, baseline: TickMode) -> Option<&Comparison> {
        self.comparisons.iter().find(|c| c.mode == mode.name() && c.baseline == baseline.name())
    }
}

/// The guest's tick rate and the intervals between its busy ticks, at one requested
/// rate (from the guest's own interval histogram, so the same for every delivery).
#[derive(Debug, Clone, Serialize)]
pub struct TickPrecision {
    /// Requested rate.
    pub requested_hz: u32,
    /// How the ticks were delivered.
    pub delivery: &'static str,
    /// Ticks the guest took per second of guest time (its vCPU was busy throughout).
    pub effective_hz: f64,
    /// Number of intervals measured.
    pub intervals: u64,
    /// 1st percentile interval (upper edge of its bin).
    pub interval_p1_us: u32,
    /// Median interval (upper edge of its bin).
    pub interval_p50_us: u32,
    /// 99th percentile interval (upper edge of its bin).
    pub interval_p99_us: u32,
    /// Intervals in bins of an eighth of the period (bin 8 starts at one period), up to
    /// four periods (the last bin holds everything longer).
    pub histogram: Vec<u64>,
}

impl TickPrecision {
    /// From a paratick run of the contended workload at `hz`.
    pub fn new(hz: u32, report: &RunReport) -> TickPrecision {
        let histogram = report.counters.guest_tick_intervals.clone();
        let intervals: u64 = histogram.iter().sum();
        let bin_us = 1e6 / hz as f64 / TICK_INTERVAL_BINS_PER_PERIOD as f64;
        let at = |q: f64| {
            let rank = ((intervals as f64 - 1.0) * q).round().max(0.0) as u64;
            let mut seen = 0;
            let bin = histogram.iter().position(|&count| {
                seen += count;
                seen > rank
            });
            bin.map_or(0, |b| ((b + 1) as f64 * bin_us).round() as u32)
        };
        TickPrecision {
            requested_hz: hz,
            delivery: report.delivery,
            effective_hz: report.counters.guest_ticks.per_vcpu.first().copied().unwrap_or(0) as f64
                / report.elapsed_s.max(1e-9),
            intervals,
            interval_p1_us: at(0.01),
            interval_p50_us: at(0.5),
            interval_p99_us: at(0.99),
            histogram,
        }
    }
}

/// Bins of the interval histogram.
pub const HISTOGRAM_BINS: usize = TICK_INTERVAL_BINS;

/// One way of delivering paratick ticks, measured where the guest needs every tick: the
/// contended workload (two CPU-bound tasks on one vCPU) at the bench's rate, against
/// the no-timer floor of the same repetition.
#[derive(Debug, Clone, Serialize)]
pub struct DeliverySummary {
    /// `msi`, `lapic-timer`, `ride`, or `tickless` (the guest's own timer, for reference).
    pub delivery: &'static str,
    /// Measured exits per second.
    pub exits_per_s: Spread,
    /// Timer-induced exits (exits − floor's, same repetition) per tick the guest took;
    /// absent when it took none.
    pub timer_exits_per_tick: Option<Spread>,
    /// CPU time the injector thread used, per second of the run (0 without one).
    pub injector_cpu_s_per_s: Spread,
    /// Ticks per second as the guest took them, and their intervals.
    pub precision: TickPrecision,
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
    /// Tick precision per rate (the default delivery).
    pub tick_precision: Vec<TickPrecision>,
    /// Each way of delivering ticks, where the guest needs them all.
    pub delivery: Vec<DeliverySummary>,
    /// The exits model calibrated from these runs (see `paratick_observer::model::calibrate`).
    pub timer_model: Option<TimerModel>,
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

/// One workload's summary: every mode, and every comparison of [`COMPARISONS`].
fn summarise(options: &BenchOptions, runs: &[Record], workload: Workload) -> WorkloadSummary {
    let execution = ExecutionRuns::of(runs, workload);
    let modes: Vec<ModeSummary> = TickMode::VARIANTS
        .iter()
        .map(|mode| {
            let of = |kind: Kind, f: fn(&Record) -> f64| -> Spread {
                let values: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.workload == workload.name() && r.mode == mode.name() && r.kind == kind.name())
                    .map(f)
                    .collect();
                Spread::of(&values)
            };
            let timer: Vec<f64> = execution.timer_exits(*mode).into_iter().map(|(_, t)| t).collect();
            ModeSummary {
                mode: mode.name(),
                throughput_per_s: of(Kind::Throughput, |r| r.throughput_per_s),
                execution_s: of(Kind::Execution, |r| r.elapsed_s),
                exits: of(Kind::Execution, |r| r.exits as f64),
                timer_exits: Spread::of(&timer),
                modelled_vmx_exits: of(Kind::Execution, |r| r.modelled_vmx_exits as f64),
            }
        })
        .collect();
    let find = |mode: TickMode| modes.iter().find(|m| m.mode == mode.name()).expect("every mode ran");
    let comparisons = COMPARISONS
        .iter()
        .map(|&(mode, baseline)| {
            let (m, b) = (find(mode), find(baseline));
            let paper = (mode, baseline) == COMPARISONS[0];
            Comparison {
                comparison: format!("{} vs {}", mode.name(), baseline.name()),
                mode: mode.name(),
                baseline: baseline.name(),
                exits_pct: pct(m.exits.median, b.exits.median),
                modelled_vmx_exits_pct: pct(m.modelled_vmx_exits.median, b.modelled_vmx_exits.median),
                throughput_pct: pct(m.throughput_per_s.median, b.throughput_per_s.median),
                execution_time_pct: pct(m.execution_s.median, b.execution_s.median),
                timer_exits_removed: Spread::of_some(&execution.timer_exits_removed(mode, baseline)),
                paper: PAPER.iter().find(|p| paper && p.0 == workload.name()).map(|p| PaperFigures {
                    exits_pct: p.1,
                    throughput_pct: p.2,
                    execution_time_pct: p.3,
                }),
            }
        })
        .collect();
    WorkloadSummary { workload: workload.name(), vcpus: options.vcpus_for(workload), modes, comparisons }
}

impl Results {
    /// Summarises the runs.
    pub fn new(
        options: &BenchOptions,
        runs: Vec<Record>,
        observer_overhead: ObserverOverhead,
        tick_precision: Vec<TickPrecision>,
        delivery: Vec<DeliverySummary>,
    ) -> Results {
        let summary: Vec<WorkloadSummary> =
            Workload::EVALUATED.iter().map(|workload| summarise(options, &runs, *workload)).collect();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let timer_model = calibrated_model(options, &runs, &summary, &delivery, &kernel);
        Results {
            command: options.command.clone(),
            host: Host {
                backend: paratick_observer::backend::Backend::of_host().name(),
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
            delivery,
            timer_model,
        }
    }

    /// Writes results.json, results.csv and results.md.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).map_err(io(format!("cannot write {}", dir.join(name).display())))
        };
        write("results.json", serde_json::to_string_pretty(self).expect("the results serialize") + "\n")?;
        write("results.csv", self.csv())?;
        Ok(write("results.md", self.markdown())?)
    }

    /// One row per run; the columns are [`Record`]'s fields, in their declared order.
    fn csv(&self) -> String {
        let mut out = csv::Writer::from_writer(Vec::new());
        for run in &self.runs {
            out.serialize(run).expect("a record serializes to a row");
        }
        String::from_utf8(out.into_inner().expect("writing to memory")).expect("UTF-8 rows")
    }
}
