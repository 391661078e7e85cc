//! The bench and the exits model: the model calibrated from the bench's runs (what the
//! daemon and `observe` project with on this host), and the exits a VMX host without
//! APICv would take for each run (a model of another kind of host, named so).

use paratick_common::guest::{TickMode, Workload};
use paratick_observer::model::{calibrate, CalibrationRun, ModelBackend, TimerModel};
use paratick_observer::ProcessCounts;
use paratick_vmm::{RunReport, TickDelivery};

use super::report::{DeliverySummary, Kind, Record, WorkloadSummary, FLOOR};
use super::stats::median;
use super::BenchOptions;

/// The exits model of these runs: floor and tickless execution-time runs of the
/// sequential workload (one busy vCPU) in each repetition, the MSI delivery's exits per
/// tick, and paratick's median removed fraction over the workloads.
pub(super) fn calibrated_model(
    options: &BenchOptions,
    runs: &[Record],
    summary: &[WorkloadSummary],
    delivery: &[DeliverySummary],
    kernel: &str,
) -> Option<TimerModel> {
    let run = |mode: TickMode, rep: u32| {
        runs.iter()
            .find(|r| {
                r.workload == Workload::Sequential.name()
                    && r.kind == Kind::Execution.name()
                    && r.mode == mode.name()
                    && r.rep == rep
            })
            .map(|r| CalibrationRun {
                exits: r.exits,
                elapsed_s: r.elapsed_s,
                timer_interrupts: r.timer_interrupts,
                timer_writes: r.tsc_deadline_writes + r.lapic_timer_writes,
            })
    };
    let pairs: Vec<_> =
        (0..options.reps).filter_map(|rep| Some((run(FLOOR, rep)?, run(TickMode::Tickless, rep)?))).collect();
    let injected = delivery
        .iter()
        .find(|d| d.delivery == TickDelivery::Msi.name())
        .and_then(|d| d.timer_exits_per_tick.map(|s| s.median));
    let removed: Vec<f64> = summary
        .iter()
        .filter_map(|w| w.comparison(TickMode::Paratick, TickMode::Tickless)?.timer_exits_removed.map(|r| r.median))
        .collect();
    let removed = (!removed.is_empty()).then(|| median(removed.iter().copied()));
    let note = format!(
        "calibrated by paratick-ctl bench ({} repetition(s), {:.1} s runs, {} Hz) on kernel {kernel}",
        options.reps,
        options.duration.as_secs_f64(),
        options.hz
    );
    calibrate(ModelBackend::of_host(), &pairs, injected, removed, note)
}

/// Exits a VMX host without APICv would take for what this run did, by the exits
/// model's VMX coefficients: every MSR write (TSC deadline, EOI, IPI), port and MMIO
/// access and HLT exit, plus the timer's exits: each expiry of a guest- or
/// VMM-programmed LAPIC timer, or the kick of an injected tick that did not ride on
/// another exit (the guest's own one-shot timer for sleepers expires on top of those).
/// Interrupts to a halted vCPU cost no extra exit; the tick page is plain memory.
pub fn modelled_vmx_exits(mode: TickMode, report: &RunReport, observed: &ProcessCounts) -> u64 {
    let vmx = TimerModel::default_for(ModelBackend::Vmx);
    let injected = mode == TickMode::Paratick && report.delivery != TickDelivery::LapicTimer.name();
    let timer_exits = if injected {
        let kicks = report.counters.kicks() as f64 * vmx.exits_per_injected_tick;
        let own_timer = observed.timer_interrupts.saturating_sub(report.counters.ticks_injected);
        kicks + own_timer as f64 * vmx.exits_per_timer_interrupt
    } else {
        observed.timer_interrupts as f64 * vmx.exits_per_timer_interrupt
    };
    // Every MSR write traps on VMX without APICv (the TSC-deadline ones included): the
    // model's write coefficient applies to all of them.
    let trapped = observed.event("kvm_msr_write") as f64 * vmx.exits_per_timer_write
        + (observed.event("kvm_pio") + observed.event("kvm_mmio") + report.counters.kvm_stats.halt_exits) as f64;
    (trapped + timer_exits).round() as u64
}
