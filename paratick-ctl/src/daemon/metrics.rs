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
    /// One series per VM, its configuration in labels (always 1).
    pub vm_info: GaugeVec,
    /// Ticks delivered by the injector.
    pub ticks_injected: IntCounterVec,
    /// Of those, ticks that rode on an exit that happened anyway.
    pub ticks_ridden: IntCounterVec,
    /// Due ticks not delivered because the vCPU was halted.
    pub ticks_skipped_idle: IntCounterVec,
    /// Guest tick requests for a rate out of range (clamped).
    pub tick_requests_clamped: IntCounterVec,
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

/// Remembers the last cumulative value of each source fed to a counter, so that each
/// feed adds only what the source counted since.
#[derive(Default)]
pub struct CounterFeed {
    last: HashMap<(String, String), u64>,
}

impl CounterFeed {
    /// Feeds a cumulative value to a counter series whose only source it is.
    pub fn feed(&mut self, counter: &IntCounterVec, labels: &[&str], value: u64) {
        self.feed_from(counter, labels, &labels.join("\u{1f}"), value);
    }

    /// Feeds the cumulative value of `source` (e.g. one process's exits of one reason)
    /// to the series `labels`. The increase is remembered per source, not per series: a
    /// series that sums several sources, whose members change (`pid="other"`), gains
    /// exactly what its members counted while they were in it.
    pub fn feed_from(&mut self, counter: &IntCounterVec, labels: &[&str], source: &str, value: u64) {
        let name = counter.desc().first().map(|d| d.fq_name.clone()).unwrap_or_default();
        let last = self.last.insert((name, source.to_string()), value).unwrap_or(0);
        // A lower value means the source restarted from zero: continue from there.
        counter.with_label_values(labels).inc_by(if value >= last { value - last } else { value });
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
                "Tick rate: requested by the guest, configured by the operator, effective (injected per ticking vCPU over the last interval), observed (timer interrupts per second of busy vCPU time, any mode).",
                &["vm", "source"],
            ),
            vm_info: gauge(
                &registry,
                "paratick_vm_info",
                "A configured VM (always 1): its tick mode, guest tick rate and vCPUs.",
                &["vm", "mode", "hz", "vcpus"],
            ),
            ticks_injected: counter(&registry, "paratick_vm_ticks_injected_total", "Ticks injected into the VM.", &["vm"]),
            ticks_ridden: counter(
                &registry,
                "paratick_vm_ticks_ridden_total",
                "Injected ticks that rode on a VM exit that happened anyway (no kick).",
                &["vm"],
            ),
            ticks_skipped_idle: counter(
                &registry,
                "paratick_vm_ticks_skipped_idle_total",
                "Due ticks not injected because the vCPU was halted.",
                &["vm"],
            ),
            tick_requests_clamped: counter(
                &registry,
                "paratick_vm_tick_requests_clamped_total",
                "Guest tick requests for a rate out of range, clamped to it.",
                &["vm"],
            ),
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
                "paratick_vm_exits_saved_projected_total",
                "Projection, not a measurement: VM exits a tickless guest doing the same work would have taken beyond this paratick VM's, by the exits model of this host's backend (calibrated by paratick-ctl bench where it ran, else its defaults; see README).",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_moving_between_series_adds_only_its_increase() {
        let counter = IntCounterVec::new(Opts::new("t_total", "test"), &["pid"]).unwrap();
        let mut feed = CounterFeed::default();
        // Process 7 is first in the top group, then falls into "other", then returns.
        feed.feed_from(&counter, &["7"], "7/io", 100);
        feed.feed_from(&counter, &["other"], "8/io", 50);
        feed.feed_from(&counter, &["other"], "7/io", 130);
        feed.feed_from(&counter, &["other"], "8/io", 60);
        feed.feed_from(&counter, &["7"], "7/io", 135);
        let value = |pid: &str| counter.with_label_values(&[pid]).get();
        assert_eq!(value("7"), 100 + 5);
        assert_eq!(value("other"), 50 + 30 + 10, "only the increases while in the group");
        // A restarted source continues from its new value.
        feed.feed_from(&counter, &["7"], "7/io", 4);
        assert_eq!(value("7"), 109);
    }
}
