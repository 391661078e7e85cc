//! What `paratick-ctl observe` prints: the live table (rates between two snapshots) and
//! the final JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use paratick_common::abi::LAPIC_TIMER_VECTOR as LINUX_TIMER_VECTOR;
use serde::Serialize;

use super::counts::ProcessCounts;
use super::kvm_stats::KvmStatsReport;
use crate::model::TimerModel;
use crate::procfs::{ProcessInfo, VmIdentity};
use paratick_vmm::kvm_stats::KvmExitCounts;

/// How much of a VM's exit load is timekeeping, and what paratick would save of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimerReport {
    /// Timer interrupts delivered (eBPF: `kvm_apic_accept_irq` of the timer vector).
    pub timer_interrupts: u64,
    /// Timer programming: TSC-deadline MSR and LAPIC timer writes (eBPF).
    pub timer_writes: u64,
    /// Halts (eBPF): the idle transitions.
    pub halts: u64,
    /// vCPU seconds not halted in the window.
    pub busy_s: f64,
    /// The guest's tick rate as the host sees it: timer interrupts per busy vCPU second.
    pub observed_tick_hz: f64,
    /// Exits attributable to timekeeping (at most `exits`): where `kvm_exit` fires
    /// (VMX/SVM), the timer writes' MSR exits, the PREEMPTION_TIMER exits and the
    /// external-interrupt exits up to the timer interrupts, as counted; elsewhere by the
    /// exits model from the timer interrupts and writes.
    pub timer_exits: u64,
    /// `counted` (from `kvm_exit`'s reasons) or `modelled`.
    pub timer_exits_source: &'static str,
    /// `timer_exits` over KVM's count of all exits; absent without KVM's counts.
    pub timer_exit_share: Option<f64>,
    /// Exits paratick would save for the same work: a projection by the model.
    pub projected_exits_saved: u64,
    /// Whether the guest's timer vector is known: programmed while observed, or the
    /// paratick vector. Without it the timer interrupts are those of Linux's vector only.
    pub timer_vector_known: bool,
}

impl TimerReport {
    /// The report of a VM that counted `counts` (eBPF) and `exits` (KVM, if known) over
    /// `busy_s` vCPU seconds.
    pub fn new(counts: &ProcessCounts, exits: Option<u64>, busy_s: f64, model: &TimerModel) -> TimerReport {
        let timer_writes = counts.tick_requests_by_kind.get("tsc_deadline").copied().unwrap_or(0)
            + counts.tick_requests_by_kind.get("lapic").copied().unwrap_or(0);
        let (timer_exits, timer_exits_source) = match counted_timer_exits(counts, timer_writes) {
            Some(counted) => (counted, "counted"),
            None => (model.timer_exits(counts.timer_interrupts, timer_writes).round() as u64, "modelled"),
        };
        let timer_exits = exits.map_or(timer_exits, |exits| timer_exits.min(exits));
        TimerReport {
            timer_interrupts: counts.timer_interrupts,
            timer_writes,
            halts: counts.halts,
            busy_s,
            observed_tick_hz: if busy_s > 0.0 { counts.timer_interrupts as f64 / busy_s } else { 0.0 },
            timer_exits,
            timer_exits_source,
            timer_exit_share: exits.filter(|&e| e > 0).map(|e| timer_exits as f64 / e as f64),
            projected_exits_saved: model.projected_exits_saved(timer_exits as f64).round() as u64,
            timer_vector_known: counts.timer_vector.is_some() || counts.paratick,
        }
    }
}

/// Timer exits from `kvm_exit`'s reasons, where it fired: each timer write trapped (an
/// MSR or APIC-access exit), each VMX preemption-timer expiry, and external-interrupt
/// exits (the host's timer interrupt for an expiry) up to the timer interrupts the guest
/// took beyond the preemption-timer ones. `None` where `kvm_exit` counted nothing.
fn counted_timer_exits(counts: &ProcessCounts, timer_writes: u64) -> Option<u64> {
    if counts.exit_reasons.is_empty() {
        return None;
    }
    let reason = |name: &str| counts.exit_reasons.get(name).copied().unwrap_or(0);
    let preemption = reason("PREEMPTION_TIMER");
    let external = reason("EXTERNAL_INTERRUPT") + reason("interrupt");
    let writes = timer_writes.min(reason("MSR_WRITE") + reason("MSR_WRITE_IMM") + reason("msr") + reason("APIC_WRITE"));
    Some(writes + preemption + external.min(counts.timer_interrupts.saturating_sub(preemption)))
}

/// One VM process in the final report.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    /// Host process id of the VMM.
    pub pid: u32,
    /// Process name (`comm`), or `?` if it exited before it could be read.
    pub name: String,
    /// The VM: its name as its VMM's command line gives it, the VMM, its uuid.
    pub vm: VmIdentity,
    /// Command line, when known.
    pub cmdline: String,
    /// vCPUs: vCPU threads seen by the eBPF programs, or vCPU file descriptors in /proc.
    pub vcpus: u32,
    /// The counts.
    #[serde(flatten)]
    pub counts: ProcessCounts,
    /// KVM's own exit counts over the window (debugfs, stats files).
    pub kvm_stats: Option<KvmStatsReport>,
    /// The timer-overhead report.
    pub timer: Option<TimerReport>,
}

impl VmReport {
    /// Combines counts with what /proc said about the process (if anything).
    pub fn new(pid: u32, info: Option<&ProcessInfo>, counts: ProcessCounts) -> VmReport {
        let vcpus = info.map_or(0, |i| i.vcpus).max(counts.vcpu_threads);
        VmReport {
            pid,
            name: info.map_or_else(|| "?".to_string(), |i| i.name.clone()),
            vm: info
                .map_or_else(|| VmIdentity { name: format!("?:{pid}"), vmm: "?".into(), uuid: None }, |i| i.vm.clone()),
            cmdline: info.map(|i| i.cmdline.clone()).unwrap_or_default(),
            vcpus,
            counts,
            kvm_stats: None,
            timer: None,
        }
    }
}

/// How a watched command ended.
#[derive(Debug, Clone, Serialize)]
pub struct CommandReport {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// Its process id.
    pub pid: u32,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
}

/// The document `observe --json` prints when it stops.
#[derive(Debug, Clone, Serialize)]
pub struct ObserveReport {
    /// Host KVM backend: `vmx`, `svm`, `pvm` or `unknown`.
    pub backend: &'static str,
    /// Every KVM tracepoint: `attached`, `missing` or `failed: …`.
    pub tracepoints: BTreeMap<&'static str, String>,
    /// Events the eBPF programs could not record, by reason.
    pub drops: BTreeMap<&'static str, u64>,
    /// How long the observer watched.
    pub duration_s: f64,
    /// The watched command, with `-- COMMAND`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandReport>,
    /// The exits model the timer reports use.
    pub timer_model: TimerModel,
    /// Why a calibrated model could not be used, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer_model_problem: Option<String>,
    /// One entry per VM process, by pid.
    pub vms: Vec<VmReport>,
    /// What the observer itself cost the host while it watched.
    pub observer: ObserverCost,
}

/// What the observer's eBPF programs did while it watched: the events each handled
/// (counted by the programs themselves, every event of the host's KVM tracepoints,
/// whatever the pid filter), and where the kernel counted them, each program's runs and
/// run time.
#[derive(Debug, Clone, Serialize)]
pub struct ObserverCost {
    /// The program that ran for each: a KVM tracepoint's raw tracepoint program
    /// (`raw_NAME`, where this kernel's arguments are as expected) or its tracepoint
    /// program (`NAME`, reading the trace record).
    pub programs: BTreeMap<&'static str, &'static str>,
    /// Events per program (the iterator: files it visited).
    pub program_events: BTreeMap<&'static str, u64>,
    /// Runs and run time per program, while the kernel's BPF statistics were on
    /// (`observe --program-stats`, or `kernel.bpf_stats_enabled = 1`); else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program_runs: Option<BTreeMap<&'static str, super::ProgramRunStats>>,
}

/// One row of the live table: rates over the last interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Process id.
    pub pid: u32,
    /// The VM's name (see [`VmIdentity`]).
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// `kvm_exit`s per second, `None` where `kvm_exit` does not fire.
    pub exits_per_s: Option<f64>,
    /// Top exit reasons with their rates.
    pub top_reasons: Vec<(String, f64)>,
    /// Tick requests per second.
    pub tick_requests_per_s: f64,
    /// Timer interrupts per second.
    pub timer_interrupts_per_s: f64,
    /// Userspace exits per second.
    pub userspace_exits_per_s: f64,
    /// KVM's count of exits per second (debugfs), where known.
    pub kvm_exits_per_s: Option<f64>,
    /// Timer exits (by the model) over KVM's exits in the interval, where known.
    pub timer_exit_share: Option<f64>,
}

/// How many exit reasons a row lists.
const TOP_REASONS: usize = 3;

impl Row {
    /// Rates of `now` relative to `before` (the previous interval) over `seconds`.
    pub fn new(
        pid: u32,
        info: Option<&ProcessInfo>,
        now: &ProcessCounts,
        before: Option<&ProcessCounts>,
        seconds: f64,
        exits_traced: bool,
    ) -> Row {
        let empty = ProcessCounts::default();
        let before = before.unwrap_or(&empty);
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
        let mut reasons: Vec<(String, f64)> = now
            .exit_reasons
            .iter()
            .map(|(name, n)| (name.clone(), rate(*n, before.exit_reasons.get(name).copied().unwrap_or(0))))
            .filter(|(_, r)| *r > 0.0)
            .collect();
        reasons.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        reasons.truncate(TOP_REASONS);
        let userspace = "kvm_userspace_exit";
        let report = VmReport::new(pid, info, now.clone());
        Row {
            pid,
            name: report.vm.name,
            vcpus: report.vcpus,
            exits_per_s: exits_traced.then(|| rate(now.exits(), before.exits())),
            top_reasons: reasons,
            tick_requests_per_s: rate(now.tick_requests, before.tick_requests),
            timer_interrupts_per_s: rate(now.timer_interrupts, before.timer_interrupts),
            userspace_exits_per_s: rate(now.event(userspace), before.event(userspace)),
            kvm_exits_per_s: None,
            timer_exit_share: None,
        }
    }

    /// Adds KVM's exits of the interval, and the share of them the model puts on the
    /// timer.
    /// Where `kvm_exit` does not fire, the top reasons are KVM's own exit counters by
    /// category.
    pub fn with_kvm_exits(mut self, counts: &KvmExitCounts, seconds: f64, timer: &TimerReport) -> Row {
        // (the timer report is of the same interval)
        let exits = counts.exits;
        self.kvm_exits_per_s = Some(exits as f64 / seconds);
        self.timer_exit_share = (exits > 0).then(|| timer.timer_exits.min(exits) as f64 / exits as f64);
        if self.exits_per_s.is_none() {
            let mut categories: Vec<(String, f64)> = counts
                .by_category()
                .iter()
                .filter(|(_, count)| *count > 0)
                .map(|(name, count)| (name.to_string(), *count as f64 / seconds))
                .collect();
            categories.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            categories.truncate(TOP_REASONS);
            self.top_reasons = categories;
        }
        self
    }
}

/// The timer-overhead report of every VM, as text (`observe --report`).
pub fn render_timer_reports(vms: &[VmReport], model: &TimerModel) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "timer overhead (exits model: {} {}, {:.2} exits per timer interrupt, {:.2} per timer write; {:.0}% of timer exits removed by paratick)",
        model.backend,
        model.source,
        model.exits_per_timer_interrupt,
        model.exits_per_timer_write,
        model.paratick_removed_fraction * 100.0
    );
    for vm in vms {
        let Some(timer) = &vm.timer else { continue };
        let exits = vm.kvm_stats.as_ref().map_or_else(|| "n/a".to_string(), |k| k.total.exits.to_string());
        let share = timer.timer_exit_share.map_or_else(|| "n/a".to_string(), |s| format!("{:.1}%", s * 100.0));
        let _ = writeln!(
            out,
            "  VM {} ({}, pid {}, {} vCPU): {exits} exits; timer {} exits ({share}): {} interrupts, {} writes, {} halts; \
             tick rate {:.0} Hz while busy ({:.1} vCPU s); paratick would save about {} exits (projection)",
            vm.vm.name,
            vm.vm.vmm,
            vm.pid,
            vm.vcpus,
            timer.timer_exits,
            timer.timer_interrupts,
            timer.timer_writes,
            timer.halts,
            timer.observed_tick_hz,
            timer.busy_s,
            timer.projected_exits_saved
        );
        if !timer.timer_vector_known {
            let _ = writeln!(
                out,
                "    (its timer vector was not seen: the guest programmed its LAPIC timer before this window, so only \
                 interrupts on Linux's vector {LINUX_TIMER_VECTOR:#x} count as timer interrupts; a guest using another \
                 vector shows none. Observe from its start, `observe -- COMMAND`, or over a window with a timer set-up)"
            );
        }
    }
    let _ = writeln!(
        out,
        "  (tick rate while busy: timer interrupts per vCPU second not halted, a halt counted whole when it ends in \
         the window, so a short window of a mostly idle guest overstates it; the daemon's observed rate is the same \
         ratio over its 1 s samples)"
    );
    out
}

/// Renders the live table.
pub fn render_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8} {:<16} {:>5} {:>10} {:>7} {:>11} {:>11} {:>11}  TOP EXIT REASONS (/s)",
        "PID", "VM", "VCPUS", "EXITS/s", "TIMER%", "TICKREQ/s", "TIMERIRQ/s", "USEREXIT/s"
    );
    for row in rows {
        // KVM's count where known (every VMM, on every backend), else kvm_exit's.
        let exits = row.kvm_exits_per_s.or(row.exits_per_s).map_or_else(|| "n/a".to_string(), |r| format!("{r:.0}"));
        let share = row.timer_exit_share.map_or_else(|| "n/a".to_string(), |s| format!("{:.1}", s * 100.0));
        let reasons = if row.exits_per_s.is_none() && row.kvm_exits_per_s.is_none() {
            "(no exit reasons here: kvm_exit does not fire and KVM's counters are unavailable)".to_string()
        } else {
            row.top_reasons.iter().map(|(n, r)| format!("{n}={r:.0}")).collect::<Vec<_>>().join(" ")
        };
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:>5} {:>10} {:>7} {:>11.0} {:>11.0} {:>11.0}  {}",
            row.pid,
            row.name,
            row.vcpus,
            exits,
            share,
            row.tick_requests_per_s,
            row.timer_interrupts_per_s,
            row.userspace_exits_per_s,
            reasons
        );
    }
    if rows.is_empty() {
        out.push_str("(no KVM processes)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_exits_are_counted_where_kvm_exit_fires_and_modelled_elsewhere() {
        let model = TimerModel::default_for(crate::model::ModelBackend::Pvm);
        let mut c = ProcessCounts { timer_interrupts: 100, ..Default::default() };
        c.tick_requests_by_kind.insert("tsc_deadline", 100);
        let modelled = TimerReport::new(&c, Some(10_000), 1.0, &model);
        assert_eq!(
            (modelled.timer_exits_source, modelled.timer_exits),
            ("modelled", model.timer_exits(100, 100).round() as u64)
        );
        assert_eq!(modelled.observed_tick_hz, 100.0);
        // VMX: 100 MSR writes (all TSC deadline), 30 preemption-timer expiries and 500
        // external interrupts of which 70 are the remaining expiries.
        for (name, n) in [("MSR_WRITE", 120), ("PREEMPTION_TIMER", 30), ("EXTERNAL_INTERRUPT", 500), ("HLT", 50)] {
            c.exit_reasons.insert(name.into(), n);
        }
        let counted = TimerReport::new(&c, Some(1000), 1.0, &model);
        assert_eq!((counted.timer_exits_source, counted.timer_exits), ("counted", 100 + 30 + 70));
        assert_eq!(counted.timer_exit_share, Some(0.2));
        // Never more than all exits.
        assert_eq!(TimerReport::new(&c, Some(150), 1.0, &model).timer_exits, 150);
    }

    #[test]
    fn a_report_says_when_the_timer_vector_was_not_seen() {
        let model = TimerModel::default_for(crate::model::ModelBackend::Pvm);
        let report = |counts: ProcessCounts| {
            let mut vm = VmReport::new(7, None, counts.clone());
            vm.timer = Some(TimerReport::new(&counts, None, 1.0, &model));
            render_timer_reports(&[vm], &model)
        };
        let unseen = report(ProcessCounts::default());
        assert!(unseen.contains("its timer vector was not seen"), "{unseen}");
        assert!(unseen.contains("Linux's vector 0xec"), "{unseen}");
        for known in [
            ProcessCounts { timer_vector: Some(0x20), ..Default::default() },
            ProcessCounts { paratick: true, ..Default::default() },
        ] {
            let text = report(known);
            assert!(!text.contains("not seen"), "{text}");
        }
        assert!(unseen.contains("tick rate while busy: timer interrupts per vCPU second not halted"), "{unseen}");
    }

    fn counts(exits: &[(&str, u64)], ticks: u64, uexits: u64) -> ProcessCounts {
        let mut c = ProcessCounts::default();
        for (name, n) in exits {
            c.exit_reasons.insert(name.to_string(), *n);
            *c.events.entry("kvm_exit").or_default() += n;
        }
        c.tick_requests = ticks;
        c.events.insert("kvm_userspace_exit", uexits);
        c
    }

    #[test]
    fn rows_are_rates_over_the_interval_with_the_busiest_reasons_first() {
        let before = counts(&[("HLT", 100), ("MSR_WRITE", 10)], 10, 4);
        let now = counts(&[("HLT", 300), ("MSR_WRITE", 410), ("IO_INSTRUCTION", 50), ("CPUID", 2)], 410, 54);
        let row = Row::new(42, None, &now, Some(&before), 2.0, true);
        assert_eq!(row.exits_per_s, Some(326.0));
        assert_eq!(
            row.top_reasons,
            vec![("MSR_WRITE".into(), 200.0), ("HLT".into(), 100.0), ("IO_INSTRUCTION".into(), 25.0)]
        );
        assert_eq!((row.tick_requests_per_s, row.userspace_exits_per_s), (200.0, 25.0));
        assert_eq!(row.name, "?:42", "a process gone before it was read: its pid");
        let table = render_table(&[row]);
        assert!(table.contains("MSR_WRITE=200 HLT=100 IO_INSTRUCTION=25"), "{table}");
    }

    #[test]
    fn hosts_without_kvm_exit_show_kvms_own_counters_by_category() {
        let row = Row::new(1, None, &counts(&[], 5, 5), None, 2.0, false);
        assert_eq!(row.exits_per_s, None);
        assert!(render_table(std::slice::from_ref(&row)).contains("(no exit reasons here: kvm_exit does not fire"));
        // KVM's counters of the interval: the busiest categories, as rates.
        let kvm = KvmExitCounts { exits: 1000, halt_exits: 100, io_exits: 600, mmio_exits: 20, ..Default::default() };
        let timer = TimerReport::new(
            &ProcessCounts::default(),
            Some(1000),
            0.0,
            &TimerModel::default_for(crate::model::ModelBackend::Pvm),
        );
        let row = row.with_kvm_exits(&kvm, 2.0, &timer);
        assert_eq!(row.kvm_exits_per_s, Some(500.0));
        let table = render_table(&[row]);
        assert!(table.contains("io_exits=300 other_exits=140 halt_exits=50"), "{table}");
        assert!(render_table(&[]).contains("(no KVM processes)"));
    }
}
