//! KVM's own per-vCPU exit counters of any VMM's VMs, read in the kernel by the
//! observer's raw tracepoint programs from `struct kvm_vcpu`: KVM refuses the stats
//! file of a vCPU to any process but the VM's, and a locked-down kernel refuses reads of
//! KVM's debugfs. Userspace finds the field offsets (BTF for `kvm_vcpu` and
//! `kvm_lapic`, KVM's stats descriptors for `kvm_vcpu_stat`) and writes them to the
//! layout map; the programs copy the counters.

/// How many counters are copied: the fields of `paratick_vmm::kvm_stats::KvmExitCounts`,
/// in its order.
pub const KVM_COUNTERS: usize = 10;

/// KVM's names of the copied counters, in order.
pub const KVM_COUNTER_NAMES: [&str; KVM_COUNTERS] = [
    "exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "io_exits",
    "mmio_exits",
    "signal_exits",
    "irq_injections",
    "insn_emulation",
    "halt_wakeup",
];

/// Capacity of the per-vCPU counters map (one entry per vCPU on the host).
pub const KVM_VCPU_CAPACITY: u32 = 8192;

/// Where the counters are in the running kernel's `struct kvm_vcpu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmCounterLayout {
    /// Non-zero once userspace has filled the layout in.
    pub ready: u32,
    /// Offset of `vcpu_id` in `struct kvm_vcpu`.
    pub vcpu_id_offset: u32,
    /// Offset of `vcpu` in `struct kvm_lapic`.
    pub lapic_vcpu_offset: u32,
    /// Unused (keeps the layout free of padding).
    pub reserved: u32,
    /// Offset of each counter in `struct kvm_vcpu` (`stat` plus its offset there).
    pub offsets: [u32; KVM_COUNTERS],
}

/// A vCPU: its VM process and KVM's vCPU id.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KvmVcpuKey {
    /// Process (thread group) id of the VMM.
    pub tgid: u32,
    /// KVM's vCPU id.
    pub vcpu_id: u32,
}

/// The counters of a vCPU as last copied.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmVcpuCounters {
    /// `bpf_ktime_get_ns` of the copy.
    pub copied_ns: u64,
    /// The counters, in [`KVM_COUNTER_NAMES`] order.
    pub values: [u64; KVM_COUNTERS],
}

/// How often, at most, the per-exit probe copies a vCPU's counters (the probes on
/// KVM_RUN's entry and return always do): enough for a live view, cheap on the exit path.
pub const KVM_COUNTERS_MIN_INTERVAL_NS: u64 = 5_000_000;

#[cfg(feature = "user")]
mod pod {
    use super::{KvmCounterLayout, KvmVcpuCounters, KvmVcpuKey};

    // SAFETY: `#[repr(C)]`, `Copy`, integers only, no padding (sizes asserted below):
    // every byte pattern is a valid value.
    unsafe impl aya::Pod for KvmCounterLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KvmVcpuKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KvmVcpuCounters {}

    const _: () = {
        assert!(core::mem::size_of::<KvmCounterLayout>() == 56);
        assert!(core::mem::size_of::<KvmVcpuKey>() == 8);
        assert!(core::mem::size_of::<KvmVcpuCounters>() == 88);
    };
}
