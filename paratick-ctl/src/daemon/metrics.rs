//! The daemon's Prometheus metrics: names follow Prometheus practice (`paratick_`
//! prefix, base units, counters ending in `_total`, bounded labels). Counters are fed
//! with the sources' cumulative values; a source that restarts (a VM started again)
//! continues the counter rather than making it go down.

use std::collections::HashMap;

use prometheus::core::Collector;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Tick rate per VM and source (requested / configured / effective).
    pub tick_rate: GaugeVec,
    /// Ticks delivered by the injector.
    pub ticks_injected: IntCounterVec,
    /// Ticks the guest handled.
    pub guest_ticks: IntCounterVec,
    /// Guest tick requests by kind.
    pub tick_requests: IntCounterVec,
    /// VM exits by reason.
    pub exits: IntCounterVec,
    /// Estimated exits saved.
    pub exits_saved: IntCounterVec,
    /// Halted vCPUs now.
    pub vcpus_halted: GaugeVec,
    /// 1 for the VM's current state.
    pub vm_state: GaugeVec,
    /// Exits of KVM processes the daemon did not start.
    pub observed_exits: IntCounterVec,
    /// Whether the eBPF observer is loaded.
    pub observer_up: IntGauge,
    /// Per tracepoint: 1 when attached.
    pub tracepoint_attached: GaugeVec,
    /// Events the observer could not record.
    pub observer_drops: IntCounterVec,
    /// Feeds cumulative values to the counters.
    pub feed: CounterFeed,
}

/// Remembers the last cumulative value fed to each counter series.
#[derive(Default)]
pub struct CounterFeed {
    last: HashMap<(String, Vec<String>), u64>,
}

impl CounterFeed {
    /// Feeds a cumulative source value to a counter series.
    pub fn feed(&mut self, counter: &IntCounterVec, labels: &[&str], value: u64) {
        let series = counter.with_label_values(labels);
        let name = counter.desc().first().map(|d| d.fq_name.clone()).unwrap_or_default();
        let last = self.last.insert((name, labels.iter().map(|l| l.to_string()).collect()), value).unwrap_or(0);
        // A lower value means the source restarted from zero: continue from there.
        series.inc_by(if value >= last { value - last } else { value });
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

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
        Metrics {
            tick_rate: gauge(
                &registry,
                "paratick_vm_tick_rate_hertz",
                "Tick rate: requested by the guest, configured by the operator, effective (injected per ticking vCPU over the last interval).",
                &["vm", "source"],
            ),
            ticks_injected: counter(&registry, "paratick_vm_ticks_injected_total", "Ticks injected into the VM.", &["vm"]),
            guest_ticks: counter(&registry, "paratick_vm_guest_ticks_total", "Scheduler ticks the guest handled.", &["vm"]),
            tick_requests: counter(
                &registry,
                "paratick_vm_tick_requests_total",
                "Guest tick requests: paratick requests, TSC-deadline writes, LAPIC timer writes.",
                &["vm", "kind"],
            ),
            exits: counter(
                &registry,
                "paratick_vm_exits_total",
                "VM exits by reason: kvm_exit reasons where that tracepoint fires, else KVM's per-vCPU exit statistics by name.",
                &["vm", "reason"],
            ),
            exits_saved: counter(
                &registry,
                "paratick_vm_exits_saved_total",
                "Estimated VM exits avoided versus a tickless guest doing the same work (see README).",
                &["vm"],
            ),
            vcpus_halted: gauge(&registry, "paratick_vm_vcpus_halted", "vCPUs halted in KVM right now.", &["vm"]),
            vm_state: gauge(&registry, "paratick_vm_state", "1 for the VM's current state.", &["vm", "state"]),
            observed_exits: counter(
                &registry,
                "paratick_observed_vm_exits_total",
                "Exits of KVM processes the daemon did not start (top 10 by exits, the rest as pid=\"other\").",
                &["pid", "name", "reason"],
            ),
            observer_up,
            tracepoint_attached: gauge(
                &registry,
                "paratick_observer_tracepoint_attached",
                "1 when the observer's program is attached to this KVM tracepoint.",
                &["tracepoint"],
            ),
            observer_drops: counter(
                &registry,
                "paratick_observer_drops_total",
                "Events the eBPF programs could not record, by reason.",
                &["reason"],
            ),
            registry,
            feed: CounterFeed::default(),
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding");
        String::from_utf8(buffer).expect("UTF-8 metrics")
    }
}
