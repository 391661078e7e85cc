//! Other VMMs' VMs on /metrics: their exits by reason, timer overhead, projected savings
//! and tick rate, under their names: the top `observed_vms_max` by exits with series of
//! their own, the rest summed as `vm="other"`. And the observer's own figures.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use paratick_common::event::SYNTHETIC_OWNER_BASE;
use paratick_observer::procfs;
use paratick_observer::report::TimerReport;
use paratick_observer::{EventSource, ProcessCounts, Snapshot, TracepointState};
use paratick_vmm::kvm_stats::KvmExitCounts;

use super::rates::{BusyTickRate, BusyTicks};
use super::{CounterFamily, Instance, ManagedVm, Manager, VmProcesses};

/// The families of other VMMs' VMs: by `pid` and `vm`, the top N and the rest as `other`.
const OBSERVED_FAMILIES: [CounterFamily; 5] = [
    CounterFamily::ObservedExits,
    CounterFamily::ObservedTimerInterrupts,
    CounterFamily::ObservedTimerWrites,
    CounterFamily::ObservedTimerExits,
    CounterFamily::ObservedExitsSaved,
];

/// Another VMM's VM as the daemon follows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ObservedVm {
    /// When the daemon first saw it (its busy time counts from there).
    first_seen: Instant,
    tick_rate: BusyTickRate,
}

impl ObservedVm {
    fn new() -> ObservedVm {
        ObservedVm { first_seen: Instant::now(), tick_rate: BusyTickRate::default() }
    }
}

impl<P: VmProcesses, O: EventSource> Manager<P, O> {
    pub(super) fn update_observer_metrics(
        &mut self,
        snapshot: Option<&Snapshot>,
        per_process: &BTreeMap<u32, ProcessCounts>,
        kvm_counters: &BTreeMap<u32, KvmExitCounts>,
        exits_traced: bool,
    ) {
        let metrics = &mut self.metrics;
        let Ok(observer) = &self.observer else {
            metrics.observer_up.set(0);
            return;
        };
        metrics.observer_up.set(1);
        // The programs, and what they count, are this daemon run's.
        let daemon = Instance { process: 0, run: self.run };
        for (tracepoint, state) in observer.tracepoints() {
            let attached = f64::from(u8::from(*state == TracepointState::Attached));
            metrics.tracepoint_attached.with_label_values(&[tracepoint]).set(attached);
        }
        // The kernel counts runs while kernel.bpf_stats_enabled is 1 or while any process
        // holds the statistics on (BPF_ENABLE_STATS, which the sysctl does not show):
        // either way the runs grow. Nothing is reported of programs that never ran so.
        let run_stats = observer.program_run_stats();
        let runs: u64 = run_stats.values().map(|s| s.runs).sum();
        let counting = paratick_observer::bpf_stats_enabled() || runs > self.observer_runs;
        self.observer_runs = runs;
        metrics.bpf_stats_enabled.set(i64::from(counting));
        for (program, stats) in run_stats.into_iter().filter(|(_, s)| s.runs > 0) {
            metrics.counters.report_own(CounterFamily::ObserverProgramRuns, &[program], daemon, stats.runs);
            metrics.counters.report_own(CounterFamily::ObserverProgramRunSeconds, &[program], daemon, stats.run_ns);
        }
        let Some(snapshot) = snapshot else { return };
        for (reason, count) in snapshot.drops_by_name() {
            metrics.counters.report_own(CounterFamily::ObserverDrops, &[reason], daemon, count);
        }
        for (program, &count) in &snapshot.program_events {
            metrics.counters.report_own(CounterFamily::ObserverProgramEvents, &[program], daemon, count);
        }
        // Other KVM processes: their exits by reason where kvm_exit fires; else KVM's own
        // counters by category (the observer's copies); else what fires for every exit
        // that reaches userspace.
        let own = std::process::id();
        let ours: Vec<u32> = self.vms.iter().filter_map(ManagedVm::pid).collect();
        // With the run that counted them: KVM's counters are the process's own; what the
        // observer counts starts from zero with this daemon.
        let run = self.run;
        let exits_of = |pid: u32, counts: &ProcessCounts| -> (BTreeMap<String, u64>, u64) {
            if exits_traced {
                return (counts.exit_reasons.clone(), run);
            }
            if let Some(kvm) = kvm_counters.get(&pid) {
                return (kvm.by_category().iter().map(|(name, n)| (name.to_string(), *n)).collect(), 0);
            }
            let userspace = counts.userspace_exit_reasons.iter();
            (userspace.map(|(r, n)| (format!("userspace_{}", r.to_lowercase()), *n)).collect(), run)
        };
        // Their timer overhead as `observe --report` computes it (one computation): timer
        // interrupts and writes counted, timer exits counted where kvm_exit fires and
        // modelled elsewhere, and what paratick would save of them.
        let timer_of = |pid: u32, counts: &ProcessCounts| {
            let exits = kvm_counters.get(&pid).map(|kvm| kvm.exits);
            TimerReport::new(counts, exits, 0.0, &self.projection)
        };
        // The live ones, each with its identity (one read of /proc/PID/stat says both).
        type Other = (u32, u64, (BTreeMap<String, u64>, u64), TimerReport);
        let mut others: Vec<Other> = per_process
            .iter()
            .filter(|(pid, _)| **pid != own && !ours.contains(pid) && **pid < SYNTHETIC_OWNER_BASE)
            .filter_map(|(&pid, counts)| {
                let stat = procfs::stat(pid).filter(|stat| !stat.zombie)?;
                let process_id = Instance::process_id(pid, Some(stat.start_ticks));
                Some((pid, process_id, exits_of(pid, counts), timer_of(pid, counts)))
            })
            .collect();

        others.sort_by_key(|(pid, _, (exits, _), _)| (std::cmp::Reverse(exits.values().sum::<u64>()), *pid));
        // The series of processes that are gone, or fell out of the top N, go; so do
        // the sources of processes that are gone (what they counted stays counted).
        let named: BTreeSet<String> =
            others.iter().take(self.config.observed_vms_max).map(|(pid, ..)| pid.to_string()).collect();
        let alive: BTreeSet<String> = others.iter().map(|(pid, ..)| pid.to_string()).collect();
        let counters = &metrics.counters;
        for family in OBSERVED_FAMILIES {
            counters.retain_series(family, |labels| labels[0] == "other" || named.contains(&labels[0]));
            counters
                .retain_sources(family, |source| source.split_once('/').is_some_and(|(pid, _)| alive.contains(pid)));
        }
        metrics.observed_vm_info.reset();
        metrics.observed_tick_rate.reset();
        self.observed_ticks.retain(|pid, _| alive.contains(&pid.to_string()));
        for (rank, (pid, process_id, (exits, exits_run), timer)) in others.into_iter().enumerate() {
            // Each process's own count is the source, so a process moving in or out of
            // the "other" group adds to it only what it counted while in it.
            let (pid_label, name) = if rank < self.config.observed_vms_max {
                let info = procfs::process_info(pid);
                let vcpus = info.as_ref().map_or(1, |p| p.vcpus.max(1));
                let vm = info.map(|p| p.vm);
                let name = vm.as_ref().map_or_else(|| format!("?:{pid}"), |vm| vm.name.clone());
                let (vmm, uuid) =
                    vm.map_or_else(|| ("?".to_string(), String::new()), |vm| (vm.vmm, vm.uuid.unwrap_or_default()));
                metrics.observed_vm_info.with_label_values(&[&name, &pid.to_string(), &vmm, &uuid]).set(1.0);
                let halted_s = per_process.get(&pid).map_or(0, |c| c.halted_ns) as f64 / 1e9;
                let seen = self.observed_ticks.entry(pid).or_insert_with(ObservedVm::new);
                let busy_s = seen.first_seen.elapsed().as_secs_f64() * f64::from(vcpus) - halted_s;
                if let Some(hz) = seen.tick_rate.sample(BusyTicks { interrupts: timer.timer_interrupts, busy_s }) {
                    metrics.observed_tick_rate.with_label_values(&[&name, &pid.to_string()]).set(hz);
                }
                (pid.to_string(), name)
            } else {
                ("other".to_string(), "other".to_string())
            };
            for (reason, count) in exits {
                let source = format!("{pid}/{reason}");
                let instance = Instance { process: process_id, run: exits_run };
                counters.report(CounterFamily::ObservedExits, &[&pid_label, &name, &reason], &source, instance, count);
            }
            for (family, count) in [
                (CounterFamily::ObservedTimerInterrupts, timer.timer_interrupts),
                (CounterFamily::ObservedTimerWrites, timer.timer_writes),
                (CounterFamily::ObservedTimerExits, timer.timer_exits),
                (CounterFamily::ObservedExitsSaved, timer.projected_exits_saved),
            ] {
                let instance = Instance { process: process_id, run };
                counters.report(family, &[&pid_label, &name], &format!("{pid}/timer"), instance, count);
            }
        }
    }
}
