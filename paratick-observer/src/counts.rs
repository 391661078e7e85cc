//! Turns the raw map contents (counts per process, vCPU, kind, detail) into per-process
//! counts that people read: events by name, exits by reason, tick requests and timer
//! interrupts. Pure functions of a [`Snapshot`], unit-tested without a kernel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use strum::VariantArray;

use paratick_common::classify::{is_timer_vector, tick_request, TickRequestKind};
use paratick_common::event::{
    DropReason, EventKey, EventKind, EventStats, AUX_RUN_FAILED, AUX_WAITED, AUX_WRITE, DROP_REASON_COUNT,
};
use paratick_common::exit_reason::{exit_reason_name, userspace_exit_name};
use serde::Serialize;

/// The observer's maps at one moment, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Event counts by key.
    pub events: BTreeMap<EventKey, EventStats>,
    /// LVT timer vector each process last programmed.
    pub timer_vectors: HashMap<u32, u32>,
    /// Number of threads of each process that ran a vCPU.
    pub vcpu_threads: HashMap<u32, u32>,
    /// Drops by [`DropReason`] index.
    pub drops: [u64; DROP_REASON_COUNT as usize],
    /// Events each of the observer's programs handled, by program name
    /// (`paratick_common::event::program_name`): what the observer costs.
    pub program_events: BTreeMap<&'static str, u64>,
}

impl Snapshot {
    /// Drops by reason name.
    pub fn drops_by_name(&self) -> BTreeMap<&'static str, u64> {
        DropReason::VARIANTS.iter().map(|r| (r.name(), self.drops[*r as usize])).collect()
    }

    /// Process ids that have any event.
    pub fn pids(&self) -> BTreeSet<u32> {
        self.events.keys().map(|k| k.tgid).collect()
    }
}

/// Everything counted for one VM process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProcessCounts {
    /// Events by name: the tracepoint name, with `_read`/`_write` for `kvm_msr` and `kvm_apic`.
    pub events: BTreeMap<&'static str, u64>,
    /// `kvm_exit` counts by reason name (VMX/SVM hosts).
    pub exit_reasons: BTreeMap<String, u64>,
    /// Time from `kvm_exit` to `kvm_entry`, summed (VMX/SVM hosts).
    pub exit_time_ns: u64,
    /// `kvm_userspace_exit` counts by `KVM_EXIT_*` reason; failed KVM_RUNs (kicks,
    /// signals) count as `error`.
    pub userspace_exit_reasons: BTreeMap<String, u64>,
    /// Guest tick requests (see `paratick_common::classify`).
    pub tick_requests: u64,
    /// Tick requests by kind.
    pub tick_requests_by_kind: BTreeMap<&'static str, u64>,
    /// Timer interrupts delivered to the guest.
    pub timer_interrupts: u64,
    /// Halts that ended after really waiting (`kvm_vcpu_wakeup` with `waited`).
    pub halts: u64,
    /// Time spent halted, summed over those halts.
    pub halted_ns: u64,
    /// Threads that ran a vCPU (each vCPU thread of the VMM).
    #[serde(skip)]
    pub vcpu_threads: u32,
    /// The LAPIC timer vector the guest programmed while observed; none if it did so
    /// before (the timer interrupts are then those of Linux's vector, 0xec, and of the
    /// paratick vector for a paratick guest).
    pub timer_vector: Option<u32>,
    /// Whether the guest asked for paratick ticks while observed.
    pub paratick: bool,
}

impl ProcessCounts {
    /// Count of an event name (0 if never seen).
    pub fn event(&self, name: &str) -> u64 {
        self.events.get(name).copied().unwrap_or(0)
    }

    /// Total VM exits seen by `kvm_exit`.
    pub fn exits(&self) -> u64 {
        self.event(EventKind::KvmExit.tracepoint())
    }

    /// What was counted since `earlier` (a snapshot of the same process).
    pub fn since(&self, earlier: &ProcessCounts) -> ProcessCounts {
        fn map_since<K: Ord + Clone>(now: &BTreeMap<K, u64>, earlier: &BTreeMap<K, u64>) -> BTreeMap<K, u64> {
            now.iter().map(|(k, n)| (k.clone(), n.saturating_sub(earlier.get(k).copied().unwrap_or(0)))).collect()
        }
        ProcessCounts {
            events: map_since(&self.events, &earlier.events),
            exit_reasons: map_since(&self.exit_reasons, &earlier.exit_reasons),
            exit_time_ns: self.exit_time_ns.saturating_sub(earlier.exit_time_ns),
            userspace_exit_reasons: map_since(&self.userspace_exit_reasons, &earlier.userspace_exit_reasons),
            tick_requests: self.tick_requests.saturating_sub(earlier.tick_requests),
            tick_requests_by_kind: map_since(&self.tick_requests_by_kind, &earlier.tick_requests_by_kind),
            timer_interrupts: self.timer_interrupts.saturating_sub(earlier.timer_interrupts),
            halts: self.halts.saturating_sub(earlier.halts),
            halted_ns: self.halted_ns.saturating_sub(earlier.halted_ns),
            vcpu_threads: self.vcpu_threads,
            timer_vector: self.timer_vector,
            paratick: self.paratick,
        }
    }
}

/// Name an event is counted under.
pub fn event_name(kind: EventKind, aux: u16) -> &'static str {
    match (kind, aux == AUX_WRITE) {
        (EventKind::KvmMsr, true) => "kvm_msr_write",
        (EventKind::KvmMsr, false) => "kvm_msr_read",
        (EventKind::KvmApic, true) => "kvm_apic_write",
        (EventKind::KvmApic, false) => "kvm_apic_read",
        _ => kind.tracepoint(),
    }
}

/// Aggregates a snapshot per process.
pub fn per_process(snapshot: &Snapshot) -> BTreeMap<u32, ProcessCounts> {
    let mut out: BTreeMap<u32, ProcessCounts> = BTreeMap::new();
    let paratick_guests: BTreeSet<u32> = snapshot
        .events
        .keys()
        .filter(|k| {
            EventKind::from_u16(k.kind)
                .and_then(|kind| tick_request(kind, k.aux, k.detail))
                .is_some_and(|r| r == TickRequestKind::Paratick)
        })
        .map(|k| k.tgid)
        .collect();
    for (key, stats) in &snapshot.events {
        let Some(kind) = EventKind::from_u16(key.kind) else { continue };
        let counts = out.entry(key.tgid).or_default();
        *counts.events.entry(event_name(kind, key.aux)).or_default() += stats.count;
        match kind {
            EventKind::KvmExit => {
                let name = exit_reason_name(key.aux as u32, key.detail)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("isa{}:{:#x}", key.aux, key.detail));
                *counts.exit_reasons.entry(name).or_default() += stats.count;
                counts.exit_time_ns += stats.sum_ns;
            }
            EventKind::KvmUserspaceExit => {
                let name = if key.aux == AUX_RUN_FAILED {
                    "error".to_string()
                } else {
                    userspace_exit_name(key.detail).map(str::to_string).unwrap_or_else(|| key.detail.to_string())
                };
                *counts.userspace_exit_reasons.entry(name).or_default() += stats.count;
            }
            EventKind::KvmVcpuWakeup if key.aux == AUX_WAITED => {
                counts.halts += stats.count;
                counts.halted_ns += stats.sum_ns;
            }
            _ => {}
        }
        if let Some(request) = tick_request(kind, key.aux, key.detail) {
            counts.tick_requests += stats.count;
            *counts.tick_requests_by_kind.entry(request.name()).or_default() += stats.count;
        }
        // Accepted by the LAPIC is the delivery on every backend; kvm_inj_virq (VMX/SVM)
        // is the same interrupt entering the guest, so it is not counted a second time.
        if kind == EventKind::KvmApicAcceptIrq {
            let lvt = snapshot.timer_vectors.get(&key.tgid).copied();
            if is_timer_vector(key.detail, lvt, paratick_guests.contains(&key.tgid)) {
                counts.timer_interrupts += stats.count;
            }
        }
    }
    for (tgid, threads) in &snapshot.vcpu_threads {
        out.entry(*tgid).or_default().vcpu_threads = *threads;
    }
    for (tgid, counts) in out.iter_mut() {
        counts.timer_vector = snapshot.timer_vectors.get(tgid).copied();
        counts.paratick = paratick_guests.contains(tgid);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use paratick_common::abi::{apic_reg, msr, PARATICK_REQUEST_PORT, PARATICK_TICK_VECTOR};
    use paratick_common::event::VCPU_UNKNOWN;
    use paratick_common::exit_reason::{ISA_SVM, ISA_VMX, KVM_EXIT_INTR, KVM_EXIT_IO};

    fn key(tgid: u32, kind: EventKind, aux: u16, detail: u32) -> EventKey {
        EventKey { tgid, vcpu: VCPU_UNKNOWN, kind: kind as u16, aux, detail }
    }

    fn snapshot(entries: &[(EventKey, u64, u64)]) -> Snapshot {
        Snapshot {
            events: entries.iter().map(|(k, count, ns)| (*k, EventStats { count: *count, sum_ns: *ns })).collect(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_tickless_guest_counts_msr_writes_as_tick_requests_and_timer_vector_irqs() {
        let s = snapshot(&[
            (key(7, EventKind::KvmMsr, 1, msr::IA32_TSC_DEADLINE), 250, 0),
            (key(7, EventKind::KvmMsr, 0, msr::IA32_APIC_BASE), 3, 0),
            (key(7, EventKind::KvmApicAcceptIrq, 0, 0xec), 249, 0),
            (key(7, EventKind::KvmApicAcceptIrq, 0, 0x30), 5, 0),
            (key(7, EventKind::KvmPio, 1, 0x3f8), 40, 0),
            (key(7, EventKind::KvmUserspaceExit, 0, KVM_EXIT_IO), 40, 0),
            (key(7, EventKind::KvmUserspaceExit, 1, KVM_EXIT_INTR), 2, 0),
            (key(7, EventKind::KvmVcpuWakeup, 1, 0), 10, 5_000),
            (key(7, EventKind::KvmVcpuWakeup, 0, 0), 4, 99),
        ]);
        let counts = &per_process(&s)[&7];
        assert_eq!(counts.event("kvm_msr_write"), 250);
        assert_eq!(counts.event("kvm_msr_read"), 3);
        assert_eq!(counts.tick_requests, 250);
        assert_eq!(counts.tick_requests_by_kind, BTreeMap::from([("tsc_deadline", 250)]));
        assert_eq!(counts.timer_interrupts, 249);
        assert_eq!(counts.event("kvm_apic_accept_irq"), 254);
        assert_eq!(counts.event("kvm_pio"), 40);
        assert_eq!(counts.userspace_exit_reasons, BTreeMap::from([("IO".into(), 40), ("error".into(), 2)]));
        assert_eq!((counts.halts, counts.halted_ns), (10, 5_000));
        assert_eq!(counts.exits(), 0);
    }

    #[test]
    fn a_programmed_lvt_vector_and_paratick_requests_change_what_a_timer_interrupt_is() {
        let mut s = snapshot(&[
            (key(1, EventKind::KvmApic, 1, apic_reg::TMICT), 8, 0),
            (key(1, EventKind::KvmApicAcceptIrq, 0, 0xef), 8, 0),
            (key(1, EventKind::KvmApicAcceptIrq, 0, 0xec), 1, 0),
            (key(2, EventKind::KvmPio, 1, PARATICK_REQUEST_PORT as u32), 2, 0),
            (key(2, EventKind::KvmApicAcceptIrq, 0, PARATICK_TICK_VECTOR as u32), 500, 0),
            (key(3, EventKind::KvmApicAcceptIrq, 0, PARATICK_TICK_VECTOR as u32), 500, 0),
        ]);
        s.timer_vectors.insert(1, 0xef);
        let counts = per_process(&s);
        assert_eq!((counts[&1].tick_requests, counts[&1].timer_interrupts), (8, 8));
        assert_eq!(counts[&1].tick_requests_by_kind, BTreeMap::from([("lapic", 8)]));
        assert_eq!((counts[&2].tick_requests, counts[&2].timer_interrupts), (2, 500));
        assert_eq!(counts[&3].timer_interrupts, 0, "vector 0xeb is no tick for a non-paratick guest");
    }

    #[test]
    fn exits_are_named_per_isa_and_carry_their_time() {
        let s = snapshot(&[
            (key(9, EventKind::KvmExit, ISA_VMX as u16, 12), 100, 70_000),
            (key(9, EventKind::KvmExit, ISA_SVM as u16, 0x7c), 5, 500),
            (key(9, EventKind::KvmExit, ISA_VMX as u16, 999), 1, 0),
        ]);
        let counts = &per_process(&s)[&9];
        assert_eq!(counts.exits(), 106);
        assert_eq!(
            counts.exit_reasons,
            BTreeMap::from([("HLT".into(), 100), ("msr".into(), 5), ("isa1:0x3e7".into(), 1)])
        );
        assert_eq!(counts.exit_time_ns, 70_500);
    }
}
