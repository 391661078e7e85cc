//! KVM's own per-vCPU exit counters of any VMM's VMs, read in the kernel from
//! `struct kvm_vcpu`: KVM refuses the stats file of a vCPU to any process but the VM's,
//! and a locked-down kernel refuses reads of KVM's debugfs.
//!
//! They are sampled, never copied per event: a BPF iterator over every open file of the
//! host (`iter/task_file`), run by userspace once per interval, copies the counters of
//! each vCPU file (`kvm-vcpu:N`, whose `private_data` is its `struct kvm_vcpu`) and
//! notes which thread last ran that vCPU; when such a thread exits (`sched_process_exit`,
//! a rare event) its vCPU's counters are copied one last time, so that a VM's final
//! counts are exact. Userspace finds the field offsets (BTF for `file`, `dentry`,
//! `task_struct`, `pid` and `kvm_vcpu`, KVM's stats descriptors for `kvm_vcpu_stat`)
//! and writes them to the layout map.

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

/// The name KVM gives a vCPU's file (`anon_inode:kvm-vcpu:N` in `/proc/PID/fd`): the
/// start of its dentry's name.
pub const VCPU_FILE_NAME_PREFIX: [u8; 9] = *b"kvm-vcpu:";

/// Where the fields the iterator reads are in the running kernel's structures.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmCounterLayout {
    /// Non-zero once userspace has filled the layout in.
    pub ready: u32,
    /// Offset of `vcpu_id` in `struct kvm_vcpu`.
    pub vcpu_id_offset: u32,
    /// Offset of `pid` (the `struct pid` of the thread that last ran it) in `struct kvm_vcpu`.
    pub vcpu_pid_offset: u32,
    /// Offset of `numbers[0].nr` (the thread id) in `struct pid`.
    pub pid_nr_offset: u32,
    /// Offset of `f_path.dentry` in `struct file`.
    pub file_dentry_offset: u32,
    /// Offset of `private_data` in `struct file`.
    pub file_private_data_offset: u32,
    /// Offset of `d_name.name` in `struct dentry`.
    pub dentry_name_offset: u32,
    /// Offset of `tgid` in `struct task_struct`.
    pub task_tgid_offset: u32,
    /// Offset of each counter in `struct kvm_vcpu` (`stat` plus its offset there).
    pub offsets: [u32; KVM_COUNTERS],
}

/// A vCPU known to have been run by a thread: what its exit copies the counters of.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadVcpu {
    /// Address of its `struct kvm_vcpu`.
    pub vcpu: u64,
    /// Its VM process and vCPU id (checked against the structure before reading it).
    pub key: KvmVcpuKey,
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

#[cfg(feature = "user")]
mod pod {
    use super::{KvmCounterLayout, KvmVcpuCounters, KvmVcpuKey, ThreadVcpu};

    // SAFETY: `#[repr(C)]`, `Copy`, integers only, no padding (sizes asserted below):
    // every byte pattern is a valid value.
    unsafe impl aya::Pod for KvmCounterLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KvmVcpuKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KvmVcpuCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ThreadVcpu {}

    const _: () = {
        assert!(core::mem::size_of::<KvmCounterLayout>() == 72);
        assert!(core::mem::size_of::<ThreadVcpu>() == 16);
        assert!(core::mem::size_of::<KvmVcpuKey>() == 8);
        assert!(core::mem::size_of::<KvmVcpuCounters>() == 88);
    };
}
