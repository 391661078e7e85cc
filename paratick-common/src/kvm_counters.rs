//! KVM's own per-vCPU exit counters of any VMM's VMs, read in the kernel from
//! `struct kvm_vcpu`: KVM refuses the stats file of a vCPU to any process but the VM's,
//! and a locked-down kernel refuses reads of KVM's debugfs.
//!
//! They are sampled, never copied per event: a BPF iterator over every open file of the
//! host (`iter/task_file`), run by userspace once per interval, copies the counters of
//! each vCPU file (`kvm-vcpu:N`, whose `private_data` is its `struct kvm_vcpu`). When a
//! thread that ran a vCPU exits (`sched_process_exit`, a rare event), the program there
//! finds its vCPU through the VM file in the thread's file table (`kvm-vm`, whose
//! `private_data` is the `struct kvm`, whose `vcpu_array` holds the vCPUs: the one
//! whose `pid` is that thread) and copies its counters one last time, so that a VM's
//! final counts are exact however short its life, even where the VMM closed the vCPU's
//! own file first. Userspace finds the field offsets (BTF for `file`, `dentry`,
//! `task_struct`, `files_struct`, `fdtable`, `kvm`, `xa_node`, `pid` and `kvm_vcpu`,
//! KVM's stats descriptors for `kvm_vcpu_stat`) and writes them to the layout map.

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

/// The name KVM gives a VM's file (`anon_inode:kvm-vm`), with its terminating NUL.
pub const VM_FILE_NAME: [u8; 7] = *b"kvm-vm\0";

/// How many vCPUs of a VM an exiting thread's vCPU is looked for among: one node of
/// KVM's `vcpu_array` (an xarray) holds 64.
pub const VCPU_ARRAY_SEARCH_LIMIT: u32 = 64;

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
    /// Offset of `files` in `struct task_struct`.
    pub task_files_offset: u32,
    /// Offset of `fdt` in `struct files_struct`.
    pub files_fdt_offset: u32,
    /// Offset of `max_fds` in `struct fdtable`.
    pub fdtable_max_fds_offset: u32,
    /// Offset of `fd` (the array of `struct file *`) in `struct fdtable`.
    pub fdtable_fd_offset: u32,
    /// Offset of `vcpu_array.xa_head` in `struct kvm`.
    pub kvm_vcpus_head_offset: u32,
    /// Offset of `slots` in `struct xa_node`.
    pub xa_node_slots_offset: u32,
    /// Offset of `vcpu` in `struct kvm_lapic` (the vCPU id of a `kvm_eoi`).
    pub lapic_vcpu_offset: u32,
    /// Unused (keeps the layout free of padding).
    pub reserved: u32,
    /// Offset of each counter in `struct kvm_vcpu` (`stat` plus its offset there).
    pub offsets: [u32; KVM_COUNTERS],
}

/// How many descriptors of an exiting vCPU thread's file table are searched for its VM
/// file: VMMs open it early (QEMU's is below 20, ours below 5).
pub const VM_FD_SEARCH_LIMIT: u32 = 128;

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
    use super::{KvmCounterLayout, KvmVcpuCounters, KvmVcpuKey};

    // SAFETY: `#[repr(C)]`, `Copy`, integers only, no padding (sizes asserted below):
    // every byte pattern is a valid value.
    unsafe impl aya::Pod for KvmCounterLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KvmVcpuKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KvmVcpuCounters {}

    const _: () = {
        assert!(core::mem::size_of::<KvmCounterLayout>() == 104);
        assert!(core::mem::size_of::<KvmVcpuKey>() == 8);
        assert!(core::mem::size_of::<KvmVcpuCounters>() == 88);
    };
}
