//! What the observer's eBPF programs record: one [`EventKind`] per KVM tracepoint, the
//! field layout each program reads (resolved from the running kernel's tracefs format
//! files at load time, because field offsets differ between kernel versions), and the
//! map key and value types.
//!
//! The per-event logic ([`summarize`]) lives here rather than in the eBPF crate so that
//! it is unit-tested on the host; the eBPF programs only read fields and update maps.

/// The one table of the KVM tracepoints the observer attaches to: for each, its
/// [`EventKind`] variant and discriminant, its tracepoint (and eBPF program) name, the
/// fields its program reads, slot by slot ([`summarize`] interprets the slots), and
/// where a raw tracepoint program finds them among the tracepoint's arguments (`None`:
/// only the tracepoint program can read them; `kvm_exit`'s reason is vendor state).
///
/// `for_each_kvm_event!(callback)` calls `callback!` with every row as
/// `#[doc] Variant = discriminant, tracepoint_name, [field, ...], raw;`. This crate derives
/// [`EventKind`], [`EventKind::ALL`], [`EventKind::tracepoint`] and [`EventKind::fields`]
/// from it, the eBPF crate its entry points: a new tracepoint is one row here.
#[macro_export]
macro_rules! for_each_kvm_event {
    ($callback:ident) => {
        $callback! {
            /// `kvm:kvm_exit`: every VM exit (VMX/SVM hosts only).
            KvmExit = 0, kvm_exit, [required!("exit_reason"), required!("isa"), optional!("vcpu_id")], None;
            /// `kvm:kvm_entry`: every VM entry (VMX/SVM hosts only).
            KvmEntry = 1, kvm_entry, [optional!("vcpu_id")], raw!([VcpuIdOf(0)], [8, 1]);
            /// `kvm:kvm_msr`: an MSR access handled by KVM.
            KvmMsr = 2, kvm_msr, [required!("write"), required!("ecx"), required!("data")],
                raw!([Value(0), Value(1), Value(2)], [4, 4, 8, 1]);
            /// `kvm:kvm_pio`: a port I/O access.
            KvmPio = 3, kvm_pio, [required!("rw"), required!("port")], raw!([Value(0), Value(1)], [4, 4, 4, 4, 8]);
            /// `kvm:kvm_mmio`: an MMIO access.
            KvmMmio = 4, kvm_mmio, [required!("type")], raw!([Value(0)], [4, 4, 8, 8]);
            /// `kvm:kvm_userspace_exit`: KVM_RUN returned to the VMM.
            KvmUserspaceExit = 5, kvm_userspace_exit, [required!("reason"), required!("errno")],
                raw!([Value(0), Value(1)], [4, 4]);
            /// `kvm:kvm_apic_accept_irq`: the LAPIC accepted an interrupt.
            KvmApicAcceptIrq = 6, kvm_apic_accept_irq, [required!("vec"), required!("apicid")],
                raw!([Value(3), Value(0)], [4, 2, 2, 1]);
            /// `kvm:kvm_inj_virq`: an interrupt was injected on VM entry (VMX/SVM hosts only).
            KvmInjVirq = 7, kvm_inj_virq, [required!("vector", "irq"), optional!("soft")],
                raw!([Value(0), Value(1)], [4, 1, 1]);
            /// `kvm:kvm_eoi`: the guest signalled end of interrupt.
            KvmEoi = 8, kvm_eoi, [required!("vector"), required!("apicid")], raw!([Value(1), LapicVcpuIdOf(0)], [8, 4]);
            /// `kvm:kvm_vcpu_wakeup`: a halted vCPU woke up (or polled).
            KvmVcpuWakeup = 9, kvm_vcpu_wakeup, [required!("ns"), required!("waited")],
                raw!([Value(0), Value(1)], [8, 1, 1]);
            /// `kvm:kvm_hypercall`: a hypercall (VMX/SVM hosts only).
            KvmHypercall = 10, kvm_hypercall, [required!("nr")], raw!([Value(0)], [8, 8, 8, 8, 8]);
            /// `kvm:kvm_apic`: a LAPIC register access.
            KvmApic = 11, kvm_apic, [required!("rw"), required!("reg"), required!("val")],
                raw!([Value(0), Value(1), Value(2)], [4, 4, 8]);
        }
    };
}

/// Where a raw tracepoint program finds one field slot among its tracepoint's arguments
/// (`TP_PROTO`, after the hidden `__data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawArg {
    /// The slot is absent.
    Absent,
    /// Argument `n` itself.
    Value(u8),
    /// The vCPU id of the `struct kvm_vcpu *` in argument `n`.
    VcpuIdOf(u8),
    /// The vCPU id of the vCPU of the `struct kvm_lapic *` in argument `n`.
    LapicVcpuIdOf(u8),
}

/// How a raw tracepoint program reads a tracepoint: from the arguments of the call
/// itself, with no trace record built (cheaper per event than a tracepoint program).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawTracepoint {
    /// Where each field slot is, slot by slot as [`EventKind::fields`].
    pub slots: [RawArg; MAX_FIELDS],
    /// The byte size of each argument, as this kernel's BTF must show them
    /// (`btf_trace_NAME`) for the raw program to be used: arguments are read by position.
    pub arg_sizes: &'static [u8],
}

/// A [`RawTracepoint`] row of the table.
macro_rules! raw {
    ([$($slot:expr),+], [$($size:literal),+]) => {{
        #[allow(unused_imports)]
        use RawArg::*;
        let given = [$($slot),+];
        let mut slots = [RawArg::Absent; MAX_FIELDS];
        let mut i = 0;
        while i < given.len() {
            slots[i] = given[i];
            i += 1;
        }
        Some(RawTracepoint { slots, arg_sizes: &[$($size),+] })
    }};
}

/// Most fields any program reads from one tracepoint record.
pub const MAX_FIELDS: usize = 4;

/// `vcpu` of an [`EventKey`] whose tracepoint does not say which vCPU it was.
pub const VCPU_UNKNOWN: u32 = u32::MAX;

/// A field a program reads, by its name in the format file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Accepted names, newest kernel first (fields were renamed over time).
    pub names: &'static [&'static str],
    /// Whether the tracepoint is unusable without it (else the slot reads as absent).
    pub required: bool,
}

/// A required [`FieldSpec`] (a literal, so that field tables are promoted to `'static`).
macro_rules! required {
    ($($name:literal),+) => { FieldSpec { names: &[$($name),+], required: true } };
}

/// An optional [`FieldSpec`].
macro_rules! optional {
    ($($name:literal),+) => { FieldSpec { names: &[$($name),+], required: false } };
}

/// Defines [`EventKind`] and its table-driven methods from [`for_each_kvm_event!`].
macro_rules! define_event_kind {
    ($($(#[$doc:meta])* $variant:ident = $value:literal, $tracepoint:ident, [$($field:expr),* $(,)?], $raw:expr;)+) => {
        /// The KVM tracepoints the observer attaches to (rows of [`for_each_kvm_event!`]).
        #[repr(u16)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind {
            $($(#[$doc])* $variant = $value,)+
        }

        /// Number of [`EventKind`]s.
        pub const EVENT_KIND_COUNT: usize = [$(EventKind::$variant),+].len();

        impl EventKind {
            /// All kinds, in discriminant order.
            pub const ALL: [EventKind; EVENT_KIND_COUNT] = [$(EventKind::$variant),+];

            /// Name of the tracepoint in the `kvm` group, which is also the eBPF
            /// program's name.
            pub const fn tracepoint(self) -> &'static str {
                match self {
                    $(EventKind::$variant => stringify!($tracepoint),)+
                }
            }

            /// The fields the program reads, slot by slot; [`summarize`] interprets
            /// the slots.
            pub const fn fields(self) -> &'static [FieldSpec] {
                match self {
                    $(EventKind::$variant => &[$($field),*],)+
                }
            }

            /// Where the raw tracepoint program finds the fields, if it can.
            pub const fn raw(self) -> Option<RawTracepoint> {
                match self {
                    $(EventKind::$variant => $raw,)+
                }
            }

            /// Name of the raw tracepoint program in the eBPF object.
            pub const fn raw_program(self) -> &'static str {
                match self {
                    $(EventKind::$variant => concat!("raw_", stringify!($tracepoint)),)+
                }
            }
        }
    };
}

for_each_kvm_event!(define_event_kind);

impl EventKind {
    /// The kind with this discriminant, if any.
    pub const fn from_u16(value: u16) -> Option<EventKind> {
        if (value as usize) < EVENT_KIND_COUNT {
            Some(Self::ALL[value as usize])
        } else {
            None
        }
    }
}

/// Where one field sits in a tracepoint record; `size == 0` means absent.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldSlot {
    /// Byte offset from the start of the record.
    pub offset: u16,
    /// Size in bytes: 1, 2, 4 or 8; 0 when this kernel lacks the field.
    pub size: u16,
}

/// The resolved layout of one tracepoint, slot `i` for `EventKind::fields()[i]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    /// Field slots; unused slots are absent.
    pub fields: [FieldSlot; MAX_FIELDS],
}

/// The field `sched:sched_process_fork` is read for (the only slot of its program's
/// layout): a watched command's process tree is followed.
pub const FORK_CHILD_PID: FieldSpec = required!("child_pid");

/// Settings userspace writes before attaching.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObserverConfig {
    /// Non-zero: record only processes in the tracked-pids map (and, with
    /// `follow_forks`, the processes they fork).
    pub filter_by_pid: u32,
    /// Non-zero: children forked by a tracked process are tracked too.
    pub follow_forks: u32,
    /// Non-zero: threads registered in the thread-owners map count under their owner.
    pub thread_owners: u32,
    /// Unused (keeps the layout free of padding).
    pub reserved: u32,
}

/// One program's entry of the programs map (per CPU): what it reads on every event, in
/// one lookup, and how many events it handled there.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramSlot {
    /// Events the program handled on this CPU (the iterator: files it visited).
    pub events: u64,
    /// The filter settings (the same in every slot).
    pub config: ObserverConfig,
    /// The program's tracepoint's field layout (KVM tracepoint programs and the fork
    /// program; empty for the others).
    pub layout: TracepointLayout,
}

/// Key of the event counts map: one entry per (VM process, vCPU, kind, detail).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey {
    /// Host process (thread-group) id of the VMM, or the owner id registered for the
    /// current thread (a VM of the bench, see [`SYNTHETIC_OWNER_BASE`]).
    pub tgid: u32,
    /// vCPU id where the tracepoint reports one, else [`VCPU_UNKNOWN`].
    pub vcpu: u32,
    /// [`EventKind`] discriminant.
    pub kind: u16,
    /// Small qualifier: ISA for exits, read/write for accesses, waited for wakeups.
    pub aux: u16,
    /// Main detail: exit reason, MSR index, port, vector, LAPIC register, …
    pub detail: u32,
}

/// Value of the event counts map (per CPU; userspace sums the CPUs).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Number of events.
    pub count: u64,
    /// Nanoseconds attributed to the events: time from exit to entry for exits,
    /// halted time for wakeups; 0 for the others.
    pub sum_ns: u64,
}

/// Key of the vCPU-threads map: a thread of a VM process that ran a vCPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcpuThread {
    /// Process id.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
}

/// An exit waiting for its entry, keyed by host thread id.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStart {
    /// `bpf_ktime_get_ns()` at the exit.
    pub timestamp_ns: u64,
    /// The exit's key in the counts map, whose `sum_ns` the entry adds to.
    pub key: EventKey,
}

/// Why an eBPF program could not record something; indexes the drops map.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum DropReason {
    /// The event counts map was full.
    EventMapFull = 0,
    /// The tracked-pids map was full, so a forked child is not followed.
    TrackedPidsFull = 1,
    /// The timer-vector map was full.
    TimerVectorsFull = 2,
    /// A tracepoint field could not be read.
    FieldReadFailed = 3,
    /// The vCPU-threads map was full, so a vCPU thread is not counted.
    VcpuThreadsFull = 4,
    /// The KVM-counters map was full, so a vCPU's counters are not copied.
    KvmCountersFull = 5,
    /// A KVM counter could not be read from `struct kvm_vcpu`.
    KvmCounterReadFailed = 6,
}

/// Number of [`DropReason`]s.
pub const DROP_REASON_COUNT: u32 = <DropReason as strum::VariantArray>::VARIANTS.len() as u32;

impl DropReason {
    /// Stable name for reports and metric labels.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// Index in the programs map of the program on `sched:sched_process_fork`; the KVM
/// tracepoint programs come first, at their [`EventKind`] discriminants.
pub const PROGRAM_FORK: u32 = EVENT_KIND_COUNT as u32;
/// Index of the program on `sched_process_exit` that copies an exiting vCPU thread's
/// counters (it counts the threads that exit).
pub const PROGRAM_THREAD_EXIT: u32 = PROGRAM_FORK + 1;
/// Index of the iterator that samples KVM's counters (it counts the files it visits).
pub const PROGRAM_VCPU_FILES: u32 = PROGRAM_FORK + 2;
/// Number of entries of the programs map: every program of the observer.
pub const PROGRAM_COUNT: u32 = PROGRAM_FORK + 3;

/// The name of the observer's program at `index` of the programs map: its
/// function in the eBPF object (a KVM tracepoint program is named after its tracepoint).
pub const fn program_name(index: u32) -> Option<&'static str> {
    match index {
        PROGRAM_FORK => Some("sched_process_fork"),
        PROGRAM_THREAD_EXIT => Some("kvm_vcpu_thread_exit"),
        PROGRAM_VCPU_FILES => Some("kvm_vcpu_files"),
        _ if index < PROGRAM_FORK => Some(EventKind::ALL[index as usize].tracepoint()),
        _ => None,
    }
}

/// Capacity of the event counts map. A busy host has a few hundred keys per VM (kinds ×
/// MSRs × ports × vectors); past this, events are counted as drops, never silently lost.
pub const EVENT_MAP_CAPACITY: u32 = 16384;

/// Capacity of the thread-owners map: threads of the bench's VMs.
pub const THREAD_OWNER_CAPACITY: u32 = 1024;

/// Owner ids the bench gives its VMs' threads start here: above any pid (pid_max is at
/// most 2^22), so an owner never collides with a real process.
pub const SYNTHETIC_OWNER_BASE: u32 = 0x8000_0000;

/// Capacity of the tracked-pids and timer-vector maps (one entry per VM process).
pub const PROCESS_MAP_CAPACITY: u32 = 4096;

/// Capacity of the exit-start and vCPU-threads maps (one entry per vCPU thread).
pub const VCPU_THREAD_CAPACITY: u32 = 8192;

/// What one tracepoint record contributes, decided from the values of its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// vCPU id, or [`VCPU_UNKNOWN`].
    pub vcpu: u32,
    /// See [`EventKey::aux`].
    pub aux: u16,
    /// See [`EventKey::detail`].
    pub detail: u32,
    /// Nanoseconds to add to [`EventStats::sum_ns`].
    pub add_ns: u64,
    /// The LVT timer vector this record programs, for `kvm_apic`/`kvm_msr` LVTT writes.
    pub lvt_timer_vector: Option<u32>,
}

/// Interprets the slot values of one record of `kind` (absent slots read as 0;
/// `present[i]` says whether slot `i` exists on this kernel).
pub fn summarize(kind: EventKind, values: &[u64; MAX_FIELDS], present: &[bool; MAX_FIELDS]) -> Summary {
    use crate::abi::{apic_reg, msr};
    let mut summary = Summary { vcpu: VCPU_UNKNOWN, aux: 0, detail: 0, add_ns: 0, lvt_timer_vector: None };
    match kind {
        EventKind::KvmExit => {
            let isa = values[1] as u16;
            summary.aux = isa;
            summary.detail = crate::exit_reason::basic_reason(isa, values[0] as u32);
            if present[2] {
                summary.vcpu = values[2] as u32;
            }
        }
        EventKind::KvmEntry => {
            if present[0] {
                summary.vcpu = values[0] as u32;
            }
        }
        EventKind::KvmMsr => {
            let write = values[0] != 0;
            summary.aux = write as u16;
            summary.detail = values[1] as u32;
            if write && summary.detail == msr::X2APIC_LVTT {
                summary.lvt_timer_vector = Some((values[2] & apic_reg::LVT_VECTOR_MASK) as u32);
            }
        }
        EventKind::KvmPio => {
            summary.aux = (values[0] != 0) as u16;
            summary.detail = values[1] as u32;
        }
        EventKind::KvmMmio => summary.aux = values[0] as u16,
        EventKind::KvmUserspaceExit => {
            summary.detail = values[0] as u32;
            // errno is a signed int: negative when KVM_RUN failed (-EINTR: a kick).
            summary.aux = ((values[1] as u32 as i32) < 0) as u16;
        }
        EventKind::KvmApicAcceptIrq | EventKind::KvmEoi => {
            summary.detail = values[0] as u32 & 0xff;
            summary.vcpu = values[1] as u32;
        }
        EventKind::KvmInjVirq => {
            summary.detail = values[0] as u32;
            summary.aux = (values[1] != 0) as u16;
        }
        EventKind::KvmVcpuWakeup => {
            summary.aux = (values[1] != 0) as u16;
            summary.add_ns = values[0];
        }
        EventKind::KvmHypercall => summary.detail = values[0] as u32,
        EventKind::KvmApic => {
            let write = values[0] != 0;
            summary.aux = write as u16;
            summary.detail = values[1] as u32;
            if write && summary.detail == apic_reg::LVTT {
                summary.lvt_timer_vector = Some((values[2] & apic_reg::LVT_VECTOR_MASK) as u32);
            }
        }
    }
    summary
}

/// `aux` value of an access that wrote (MSR, port, LAPIC register).
pub const AUX_WRITE: u16 = 1;

/// `aux` value of a `kvm_vcpu_wakeup` after the vCPU really waited (halted), as opposed
/// to one that ended while halt-polling.
pub const AUX_WAITED: u16 = 1;

/// `aux` value of a `kvm_userspace_exit` whose KVM_RUN failed (errno < 0, e.g. a kick).
pub const AUX_RUN_FAILED: u16 = 1;

/// The map types are plain old data for aya's userspace map API.
#[cfg(feature = "user")]
mod pod {
    use super::{EventKey, EventStats, ExitStart, ObserverConfig, ProgramSlot, TracepointLayout, VcpuThread};

    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers, and laid out
    // without padding (their sizes are asserted below), so every byte pattern the
    // kernel hands back is a valid value.
    unsafe impl aya::Pod for EventKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExitStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ObserverConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TracepointLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProgramSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VcpuThread {}

    const _: () = {
        assert!(core::mem::size_of::<EventKey>() == 16);
        assert!(core::mem::size_of::<EventStats>() == 16);
        assert!(core::mem::size_of::<ExitStart>() == 24);
        assert!(core::mem::size_of::<ObserverConfig>() == 16);
        assert!(core::mem::size_of::<ProgramSlot>() == 40);
        assert!(core::mem::size_of::<TracepointLayout>() == 16);
        assert!(core::mem::size_of::<VcpuThread>() == 8);
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{apic_reg, msr};
    use crate::exit_reason::ISA_VMX;

    const ALL_PRESENT: [bool; MAX_FIELDS] = [true; MAX_FIELDS];

    #[test]
    fn kinds_round_trip_through_their_discriminants() {
        for (index, kind) in EventKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, index);
            assert_eq!(EventKind::from_u16(index as u16), Some(*kind));
            assert!(kind.fields().len() <= MAX_FIELDS);
        }
        assert_eq!(EventKind::from_u16(EVENT_KIND_COUNT as u16), None);
    }

    #[test]
    fn every_program_has_one_name() {
        let mut names = [""; PROGRAM_COUNT as usize];
        for (index, name) in names.iter_mut().enumerate() {
            *name = program_name(index as u32).unwrap();
        }
        assert_eq!(names[EventKind::KvmMsr as usize], "kvm_msr");
        assert_eq!(names[PROGRAM_VCPU_FILES as usize], "kvm_vcpu_files");
        names.sort_unstable();
        assert!(names.windows(2).all(|pair| pair[0] != pair[1]), "{names:?}");
        assert_eq!(program_name(PROGRAM_COUNT), None);
    }

    #[test]
    fn a_tsc_deadline_write_is_keyed_by_its_msr() {
        let s = summarize(EventKind::KvmMsr, &[1, msr::IA32_TSC_DEADLINE as u64, 123_456, 0], &ALL_PRESENT);
        assert_eq!((s.aux, s.detail, s.vcpu), (AUX_WRITE, 0x6e0, VCPU_UNKNOWN));
        assert_eq!(s.lvt_timer_vector, None);
    }

    #[test]
    fn lvt_timer_writes_reveal_the_timer_vector_in_both_apic_modes() {
        let xapic = summarize(EventKind::KvmApic, &[1, apic_reg::LVTT as u64, 0x2_00ec, 0], &ALL_PRESENT);
        assert_eq!(xapic.lvt_timer_vector, Some(0xec));
        let x2apic = summarize(EventKind::KvmMsr, &[1, msr::X2APIC_LVTT as u64, 0x4_00ef, 0], &ALL_PRESENT);
        assert_eq!(x2apic.lvt_timer_vector, Some(0xef));
        let read = summarize(EventKind::KvmApic, &[0, apic_reg::LVTT as u64, 0xec, 0], &ALL_PRESENT);
        assert_eq!(read.lvt_timer_vector, None);
    }

    #[test]
    fn an_exit_without_vcpu_id_on_old_kernels_has_an_unknown_vcpu() {
        let present = [true, true, false, false];
        let s = summarize(EventKind::KvmExit, &[12, ISA_VMX as u64, 0, 0], &present);
        assert_eq!((s.vcpu, s.aux, s.detail), (VCPU_UNKNOWN, ISA_VMX as u16, 12));
        let s = summarize(EventKind::KvmExit, &[0x8000_0021, ISA_VMX as u64, 3, 0], &ALL_PRESENT);
        assert_eq!((s.vcpu, s.detail), (3, 0x21), "VMX flags are not part of the reason");
    }

    #[test]
    fn a_kicked_kvm_run_is_marked_failed() {
        let eintr = (-4i32) as u32 as u64;
        let s = summarize(EventKind::KvmUserspaceExit, &[0, eintr, 0, 0], &ALL_PRESENT);
        assert_eq!(s.aux, AUX_RUN_FAILED);
        let io = summarize(EventKind::KvmUserspaceExit, &[2, 0, 0, 0], &ALL_PRESENT);
        assert_eq!((io.aux, io.detail), (0, 2));
    }

    #[test]
    fn wakeups_carry_their_halted_time() {
        let s = summarize(EventKind::KvmVcpuWakeup, &[4_000_000, 1, 0, 0], &ALL_PRESENT);
        assert_eq!((s.aux, s.add_ns), (AUX_WAITED, 4_000_000));
    }
}
