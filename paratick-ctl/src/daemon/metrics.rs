//! The daemon's Prometheus metrics: names follow Prometheus practice (`paratick_`
//! prefix, base units, counters ending in `_total`, bounded labels). The gauges are
//! set at each sample; the counters are [`ScrapedCounters`].

use std::fmt::Write as _;

use prometheus::core::Collector;
use prometheus::{Encoder, GaugeVec, IntGauge, Opts, Registry, TextEncoder};
use serde::{Deserialize, Serialize};
use strum::VariantArray;

pub use super::counters::ScrapedCounters;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Tick rate per VM and source (requested / configured / effective).
    pub tick_rate: GaugeVec,
    /// One series per VM, its configuration in labels (always 1).
    pub vm_info: GaugeVec,
    /// Halted vCPUs now.
    pub vcpus_halted: GaugeVec,
    /// 1 for the VM's current state.
    pub vm_state: GaugeVec,
    /// Whether the eBPF observer is loaded.
    pub observer_up: IntGauge,
    /// Whether the kernel counts BPF programs' runs and run time.
    pub bpf_stats_enabled: IntGauge,
    /// Per tracepoint: 1 when attached.
    pub tracepoint_attached: GaugeVec,
    /// One series per observed VM of another VMM (the top ones), naming it.
    pub observed_vm_info: GaugeVec,
    /// Their tick rate as the host sees it.
    pub observed_tick_rate: GaugeVec,
    /// Every counter ([`CounterFamily`]), read at scrape time.
    pub counters: ScrapedCounters,
}

/// The daemon's counters: one row each of name, help and labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::VariantArray, Serialize, Deserialize)]
pub enum CounterFamily {
    /// Ticks delivered by the injector.
    TicksInjected,
    /// Of those, ticks that rode on an exit that happened anyway.
    TicksRidden,
    /// Due ticks not delivered because the vCPU was halted.
    TicksSkippedIdle,
    /// Guest tick requests for a rate out of range (clamped).
    TickRequestsClamped,
    /// Ticks the guest handled.
    GuestTicks,
    /// Guest tick requests by kind.
    TickRequests,
    /// VM exits by reason.
    Exits,
    /// Projected exits saved.
    ExitsSaved,
    /// Work units the guest did.
    WorkUnits,
    /// Restarts by the restart policy.
    Restarts,
    /// Exits of KVM processes the daemon did not start.
    ObservedExits,
    /// Timer interrupts of other VMMs' VMs.
    ObservedTimerInterrupts,
    /// Timer programming writes of other VMMs' VMs.
    ObservedTimerWrites,
    /// Timer-induced exits of other VMMs' VMs.
    ObservedTimerExits,
    /// Exits paratick would save other VMMs' VMs (projection).
    ObservedExitsSaved,
    /// Events the observer could not record.
    ObserverDrops,
    /// Events each of the observer's programs handled.
    ObserverProgramEvents,
    /// Runs of each program, by the kernel's BPF statistics.
    ObserverProgramRuns,
    /// Time in each program, by the kernel's BPF statistics (reported in nanoseconds).
    ObserverProgramRunSeconds,
}

impl CounterFamily {
    /// Name, help and label names.
    pub(super) const fn spec(self) -> (&'static str, &'static str, &'static [&'static str]) {
        match self {
            CounterFamily::TicksInjected => {
                ("paratick_vm_ticks_injected_total", "Ticks injected into the VM.", &["vm"])
            }
            CounterFamily::TicksRidden => (
                "paratick_vm_ticks_ridden_total",
                "Injected ticks that rode on a VM exit that happened anyway (no kick).",
                &["vm"],
            ),
            CounterFamily::TicksSkippedIdle => (
                "paratick_vm_ticks_skipped_idle_total",
                "Due ticks not injected because the vCPU was halted.",
                &["vm"],
            ),
            CounterFamily::TickRequestsClamped => (
                "paratick_vm_tick_requests_clamped_total",
                "Guest tick requests for a rate out of range, clamped to it.",
                &["vm"],
            ),
            CounterFamily::GuestTicks => {
                ("paratick_vm_guest_ticks_total", "Scheduler ticks the guest handled.", &["vm"])
            }
            CounterFamily::TickRequests => (
                "paratick_vm_tick_requests_total",
                "Guest tick requests: paratick requests, TSC-deadline writes, LAPIC timer writes.",
                &["vm", "kind"],
            ),
            CounterFamily::Exits => (
                "paratick_vm_exits_total",
                "VM exits by reason: kvm_exit reasons where that tracepoint fires, else KVM's per-vCPU exit statistics by name.",
                &["vm", "reason"],
            ),
            CounterFamily::ExitsSaved => (
                "paratick_vm_exits_saved_projected_total",
                "Projection, not a measurement: VM exits a tickless guest doing the same work would have taken beyond this paratick VM's, by the exits model of this host's backend (calibrated by paratick-ctl bench where it ran, else its defaults; see README).",
                &["vm"],
            ),
            CounterFamily::WorkUnits => (
                "paratick_vm_work_units_total",
                "Work units the guest's tasks did (what its throughput is measured in): exits and ticks per unit of work compare VMs doing different amounts of it.",
                &["vm"],
            ),
            CounterFamily::Restarts => (
                "paratick_vm_restarts_total",
                "Times the daemon started the VM again after it failed (restart = \"on-failure\").",
                &["vm"],
            ),
            CounterFamily::ObservedExits => (
                "paratick_observed_vm_exits_total",
                "Exits of KVM VMs the daemon did not start, by VM name (QEMU's -name, else process:pid; see paratick_observed_vm_info): the top 10 by exits, the rest as vm=\"other\".",
                &["pid", "vm", "reason"],
            ),
            CounterFamily::ObservedTimerInterrupts => (
                "paratick_observed_vm_timer_interrupts_total",
                "Timer interrupts delivered to KVM VMs the daemon did not start (the LAPIC timer's vector as the guest programmed it, else Linux's), by VM as in paratick_observed_vm_exits_total.",
                &["pid", "vm"],
            ),
            CounterFamily::ObservedTimerWrites => (
                "paratick_observed_vm_timer_writes_total",
                "TSC-deadline and LAPIC timer writes of KVM VMs the daemon did not start.",
                &["pid", "vm"],
            ),
            CounterFamily::ObservedTimerExits => (
                "paratick_observed_vm_timer_exits_total",
                "Exits of KVM VMs the daemon did not start that their timer caused: counted from kvm_exit's reasons where it fires, else by the exits model of this host from the timer interrupts and writes (as observe --report); never more than their exits.",
                &["pid", "vm"],
            ),
            CounterFamily::ObservedExitsSaved => (
                "paratick_observed_vm_exits_saved_projected_total",
                "Projection, not a measurement: exits paratick would save KVM VMs the daemon did not start, by the exits model of this host (see paratick_vm_exits_saved_projected_total).",
                &["pid", "vm"],
            ),
            CounterFamily::ObserverDrops => (
                "paratick_observer_drops_total",
                "Events the eBPF programs could not record, by reason.",
                &["reason"],
            ),
            CounterFamily::ObserverProgramEvents => (
                "paratick_observer_program_events_total",
                "Events each of the observer's eBPF programs handled (the iterator: files it visited), counted by the programs themselves: what the observer costs the host.",
                &["program"],
            ),
            CounterFamily::ObserverProgramRuns => (
                "paratick_observer_program_runs_total",
                "Runs of each of the observer's eBPF programs, as the kernel counts them (bpf_prog_info run_cnt) while kernel.bpf_stats_enabled is 1; absent while it never was.",
                &["program"],
            ),
            CounterFamily::ObserverProgramRunSeconds => (
                "paratick_observer_program_run_seconds_total",
                "Time spent in each of the observer's eBPF programs, as the kernel counts it (bpf_prog_info run_time_ns) while kernel.bpf_stats_enabled is 1; absent while it never was.",
                &["program"],
            ),
        }
    }

    /// What a reported value is multiplied by for the exposition (nanoseconds reported,
    /// seconds exported).
    pub(super) const fn scale(self) -> f64 {
        match self {
            CounterFamily::ObserverProgramRunSeconds => 1e-9,
            _ => 1.0,
        }
    }
}

/// The `source` label values of `paratick_vm_tick_rate_hertz`.
pub const TICK_RATE_SOURCES: [&str; 4] = ["requested", "configured", "effective", "observed"];

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let build_info = gauge(&registry, "paratick_build_info", "Build information (always 1).", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0);
        let observer_up =
            IntGauge::new("paratick_observer_up", "Whether the eBPF KVM observer is loaded.").expect("valid metric");
        registry.register(Box::new(observer_up.clone())).expect("unique metric");
        let bpf_stats_enabled = IntGauge::new(
            "paratick_observer_bpf_stats_enabled",
            "1 while the kernel counts BPF programs' runs and run time (kernel.bpf_stats_enabled = 1, or a process holding them on with BPF_ENABLE_STATS, seen as the runs growing): the paratick_observer_program_run* counters grow only then.",
        )
        .expect("valid metric");
        registry.register(Box::new(bpf_stats_enabled.clone())).expect("unique metric");
        let counters = ScrapedCounters::new();
        registry.register(Box::new(counters.clone())).expect("unique metrics");
        Metrics {
            tick_rate: gauge(
                &registry,
                "paratick_vm_tick_rate_hertz",
                "Tick rate: requested by the guest, configured by the operator, effective (injected per ticking vCPU over the last interval), observed (timer interrupts per second of busy vCPU time, any mode).",
                &["vm", "source"],
            ),
            vm_info: gauge(
                &registry,
                "paratick_vm_info",
                "A configured VM (always 1): its tick mode, guest tick rate and vCPUs.",
                &["vm", "mode", "hz", "vcpus"],
            ),
            vcpus_halted: gauge(&registry, "paratick_vm_vcpus_halted", "vCPUs halted in KVM right now.", &["vm"]),
            vm_state: gauge(&registry, "paratick_vm_state", "1 for the VM's current state.", &["vm", "state"]),
            observer_up,
            bpf_stats_enabled,
            tracepoint_attached: gauge(
                &registry,
                "paratick_observer_tracepoint_attached",
                "1 when the observer's program is attached to this KVM tracepoint.",
                &["tracepoint"],
            ),
            observed_vm_info: gauge(
                &registry,
                "paratick_observed_vm_info",
                "A KVM VM of another VMM among the top 10 by exits (always 1): its name (QEMU's -name guest=NAME or -name NAME, else process:pid), its VMM's process id, the VMM, and QEMU's -uuid if given.",
                &["vm", "pid", "vmm", "uuid"],
            ),
            observed_tick_rate: gauge(
                &registry,
                "paratick_observed_vm_tick_rate_hertz",
                "Tick rate of a KVM VM of another VMM among the top ones, as the host sees it: timer interrupts per second of vCPU time not halted over the last sample interval (the daemon's observed rate of its own VMs is the same ratio).",
                &["vm", "pid"],
            ),
            registry,
            counters,
        }
    }

    /// Removes the gauges of a VM as `config` describes it (gone from the configuration,
    /// or configured anew: its info series carries its settings).
    pub fn remove_vm_gauges(&self, config: &paratick_vmm::VmConfig) {
        let name = config.name.as_str();
        let _ = self.vm_info.remove_label_values(&[
            name,
            config.mode.name(),
            &config.hz.to_string(),
            &config.vcpus.to_string(),
        ]);
        for &state in paratick_vmm::VmState::VARIANTS {
            let _ = self.vm_state.remove_label_values(&[name, state.name()]);
        }
        for source in TICK_RATE_SOURCES {
            let _ = self.tick_rate.remove_label_values(&[name, source]);
        }
        let _ = self.vcpus_halted.remove_label_values(&[name]);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&families, &mut buffer).expect("text encoding");
        let mut text = String::from_utf8(buffer).expect("UTF-8 metrics");
        // A family with no series yet (no VM of another VMM, no failure) is described all
        // the same, so that dashboards, rules and readers know it exists.
        let present: std::collections::BTreeSet<&str> = families.iter().map(|f| f.name()).collect();
        let gauges = [
            &self.tick_rate,
            &self.vm_info,
            &self.vcpus_halted,
            &self.vm_state,
            &self.tracepoint_attached,
            &self.observed_vm_info,
            &self.observed_tick_rate,
        ];
        let described = gauges
            .iter()
            .flat_map(|gauge| gauge.desc().into_iter().map(|desc| (desc, "gauge")))
            .chain(self.counters.desc().into_iter().map(|desc| (desc, "counter")));
        for (desc, kind) in described {
            if !present.contains(desc.fq_name.as_str()) {
                let help = desc.help.replace('\\', "\\\\").replace('\n', "\\n");
                let _ = write!(text, "# HELP {} {help}\n# TYPE {} {kind}\n", desc.fq_name, desc.fq_name);
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::counters::Instance;

    #[test]
    fn the_collector_renders_counters_with_their_help_and_sorted_labels() {
        let metrics = Metrics::new();
        let instance = Instance::default();
        metrics.counters.report_own(CounterFamily::TicksInjected, &["a"], instance, 42);
        metrics.counters.report(CounterFamily::ObservedExits, &["9", "qemu", "hlt"], "9/hlt", instance, 3);
        let text = metrics.render();
        assert!(text.contains("# TYPE paratick_vm_ticks_injected_total counter\n"), "{text}");
        assert!(text.contains("paratick_vm_ticks_injected_total{vm=\"a\"} 42\n"), "{text}");
        assert!(text.contains("paratick_observed_vm_exits_total{pid=\"9\",reason=\"hlt\",vm=\"qemu\"} 3\n"));
        // No series: the family is described, with no sample.
        assert!(text.contains("# HELP paratick_vm_guest_ticks_total Scheduler ticks the guest handled.\n"), "{text}");
        assert!(text.contains("# TYPE paratick_vm_guest_ticks_total counter\n"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("paratick_vm_guest_ticks_total")), "{text}");
        assert!(text.contains("# TYPE paratick_observed_vm_info gauge\n"), "{text}");
        // Run time is reported in nanoseconds and exported in seconds.
        metrics.counters.report_own(CounterFamily::ObserverProgramRunSeconds, &["kvm_msr"], instance, 1_500_000_000);
        let text = metrics.render();
        assert!(text.contains("paratick_observer_program_run_seconds_total{program=\"kvm_msr\"} 1.5\n"), "{text}");
    }
}
