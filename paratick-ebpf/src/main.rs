//! eBPF programs on KVM tracepoints: count events per (VM process, vCPU, kind, detail),
//! time exits from `kvm_exit` to `kvm_entry`, remember each VM's LAPIC timer vector, and
//! follow a watched command's forks; and a BPF iterator that samples KVM's own per-vCPU
//! counters. No program runs on a tracepoint that fires at instruction-emulation or
//! page-fault rate (`kvm_emulate_insn`, `kvm_page_fault`): what runs per event runs at
//! the rate of what it counts.
//!
//! # Per-CPU writes
//! The counts in per-CPU maps are plain (non-atomic) read-modify-writes. A slot is only
//! written from its own CPU and a program runs with migration disabled, so each pointer
//! stays valid and no other CPU races on it. Tracepoint and raw tracepoint programs also
//! run with preemption disabled and do not nest (the kernel's recursion guards); the
//! iterator runs preemptibly, so should two readers run it on one CPU at once an
//! increment of its count can be lost: a miscount, never memory unsafety.
//!
//! The programs are deliberately thin: a raw tracepoint program reads its fields from the
//! call's arguments at the positions of paratick-common's table (userspace checked them
//! against the kernel's BTF), a tracepoint program from its record at offsets userspace
//! read from the running kernel's format files; what the fields mean is decided by
//! `paratick_common::event::summarize`, which is unit-tested on the host.
// Built for bpfel-unknown-none by paratick-ctl's build script; a host build (`cargo build
// --workspace`) gets a plain binary that says so, as aya-template does.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use paratick_common::event::{
    summarize, DropReason, EventKey, EventKind, EventStats, ExitStart, FieldSlot, ObserverConfig, ProgramSlot, RawArg,
    RawTracepoint, VcpuThread, DROP_REASON_COUNT, EVENT_MAP_CAPACITY, MAX_FIELDS, PROCESS_MAP_CAPACITY, PROGRAM_COUNT,
    PROGRAM_FORK, PROGRAM_THREAD_EXIT, PROGRAM_VCPU_FILES, THREAD_OWNER_CAPACITY, VCPU_THREAD_CAPACITY,
};
use paratick_common::kvm_counters::{
    KvmCounterLayout, KvmVcpuCounters, KvmVcpuKey, KVM_COUNTERS, KVM_VCPU_CAPACITY, VCPU_ARRAY_SEARCH_LIMIT,
    VCPU_FILE_NAME_PREFIX, VM_FD_SEARCH_LIMIT, VM_FILE_NAME,
};

/// Event counts, per CPU so that the hot path takes no lock.
#[map]
static EVENTS: PerCpuHashMap<EventKey, EventStats> = PerCpuHashMap::with_max_entries(EVENT_MAP_CAPACITY, 0);

/// Each program's slot, per CPU: its event count, the filter settings and its
/// tracepoint's field layout, so that an event costs one array lookup here and one
/// hash lookup for its count. Userspace writes the settings and layouts before it
/// attaches anything and never again (the programs own `events` from then on).
#[map]
static PROGRAMS: PerCpuArray<ProgramSlot> = PerCpuArray::with_max_entries(PROGRAM_COUNT, 0);

/// Threads whose events belong to a VM other than their process (thread id → owner
/// id), consulted only where the settings say so: `paratick-ctl bench` runs its VMs in
/// its own process, one after another, and registers each VM's threads.
#[map]
static THREAD_OWNERS: HashMap<u32, u32> = HashMap::with_max_entries(THREAD_OWNER_CAPACITY, 0);

/// Processes to record when filtering (tgid → 1).
#[map]
static TRACKED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(PROCESS_MAP_CAPACITY, 0);

/// LVT timer vector each VM process last programmed (tgid → vector).
#[map]
static TIMER_VECTORS: HashMap<u32, u32> = HashMap::with_max_entries(PROCESS_MAP_CAPACITY, 0);

/// Exits waiting for their entry (host thread id → exit). LRU: a thread that dies
/// between exit and entry must not leak an entry.
#[map]
static EXIT_STARTS: LruHashMap<u32, ExitStart> = LruHashMap::with_max_entries(VCPU_THREAD_CAPACITY, 0);

/// Threads that ran a vCPU, so that the vCPU count of a VM outlives the VM process, and
/// so that such a thread's exit copies its vCPU's counters.
#[map]
static VCPU_THREADS: HashMap<VcpuThread, u8> = HashMap::with_max_entries(VCPU_THREAD_CAPACITY, 0);

/// What could not be recorded, by `DropReason`.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASON_COUNT, 0);

/// What every program returns. For tracepoint programs the kernel reads 0 as "drop this
/// event for all perf listeners of the tracepoint": we must not blind `perf stat`,
/// `perf trace` or any other tool watching the same tracepoints, so we return 1.
///
/// aya-ebpf's `#[tracepoint]` macro always returns 0, so the entry points below are
/// written out by hand, in the same `tracepoint` ELF section the macro would use.
const PASS_EVENT_ON: u32 = 1;

/// Defines a tracepoint entry point `name` that counts the event in its slot of
/// [`PROGRAMS`] (at `index`), runs `handler(ctx, slot)` and returns [`PASS_EVENT_ON`].
macro_rules! tracepoint_program {
    ($program:ident, $index:expr => $handler:expr) => {
        #[doc = concat!("The program on the `", stringify!($program), "` tracepoint.")]
        #[no_mangle]
        #[link_section = "tracepoint"]
        pub fn $program(ctx: *mut core::ffi::c_void) -> u32 {
            if let Some(slot) = count_program_event($index) {
                $handler(&TracePointContext::new(ctx), slot);
            }
            PASS_EVENT_ON
        }
    };
}

/// Counts an event of program `index` and returns its slot's settings and layout.
#[inline(always)]
fn count_program_event(index: u32) -> Option<&'static ProgramSlot> {
    let slot = PROGRAMS.get_ptr_mut(index)?;
    // SAFETY: a valid pointer to this CPU's slot (the lookup succeeded); only this
    // program writes its `events`. See "Per-CPU writes" in the crate docs.
    unsafe {
        (*slot).events += 1;
        Some(&*slot)
    }
}

/// One program per row of paratick-common's KVM event table, named after its
/// tracepoint, each recording its [`EventKind`].
macro_rules! kvm_event_programs {
    ($($(#[$doc:meta])* $variant:ident = $value:literal, $tracepoint:ident, [$($field:tt)*], $raw:expr;)+) => {
        $(tracepoint_program!($tracepoint, EventKind::$variant as u32 => |ctx, slot| observe(ctx, slot, EventKind::$variant));)+

        /// The raw tracepoint programs, one per row of the table (named `raw_` and the
        /// tracepoint): userspace attaches the raw one wherever this kernel's arguments
        /// are what the table says, else the tracepoint program.
        mod raw_programs {
            use super::*;
            $(
                #[doc = concat!("The raw tracepoint program on `", stringify!($tracepoint), "`.")]
                #[export_name = concat!("raw_", stringify!($tracepoint))]
                #[link_section = "raw_tracepoint"]
                pub fn $tracepoint(ctx: *mut core::ffi::c_void) -> i32 {
                    const KIND: EventKind = EventKind::$variant;
                    if let (Some(slot), Some(raw)) = (count_program_event(KIND as u32), const { KIND.raw() }) {
                        observe_raw(&RawTracePointContext::new(ctx), slot, KIND, &raw);
                    }
                    0
                }
            )+
        }
    };
}

paratick_common::for_each_kvm_event!(kvm_event_programs);

// A tracked process's children are tracked too, so that `observe -- COMMAND` sees VMs
// started anywhere in the command's process tree.
tracepoint_program!(sched_process_fork, PROGRAM_FORK => follow_fork);

fn follow_fork(ctx: &TracePointContext, slot: &ProgramSlot) {
    if slot.config.follow_forks == 0 || !is_tracked(&slot.config, current_tgid()) {
        return;
    }
    match read_slot(ctx, slot.layout.fields[0]) {
        Ok(child) => {
            if TRACKED_PIDS.insert(child as u32, 1, 0).is_err() {
                count_drop(ctx, DropReason::TrackedPidsFull);
            }
        }
        Err(_) => count_drop(ctx, DropReason::FieldReadFailed),
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn is_tracked(config: &ObserverConfig, tgid: u32) -> bool {
    config.filter_by_pid == 0 || TRACKED_PIDS.get_ptr(tgid).is_some()
}

/// The VM process the current thread's events count under, if it is recorded at all.
#[inline(always)]
fn current_owner(slot: &ProgramSlot) -> Option<(u32, u32)> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let process = (pid_tgid >> 32) as u32;
    if !is_tracked(&slot.config, process) {
        return None;
    }
    let tgid = match slot.config.thread_owners != 0 {
        // SAFETY: the pointer came from a successful lookup of a plain u32 value.
        true => THREAD_OWNERS.get_ptr(tid).map_or(process, |owner| unsafe { *owner }),
        false => process,
    };
    Some((tgid, tid))
}

/// A raw tracepoint's event: its fields from the call's arguments (positions that are
/// constants, so each is one load from the context), then [`record`].
#[inline(always)]
fn observe_raw(ctx: &RawTracePointContext, slot: &ProgramSlot, kind: EventKind, raw: &RawTracepoint) {
    let Some((tgid, tid)) = current_owner(slot) else { return };
    let mut values = [0u64; MAX_FIELDS];
    let mut present = [false; MAX_FIELDS];
    for i in 0..MAX_FIELDS {
        let value = match raw.slots[i] {
            RawArg::Absent => continue,
            RawArg::Value(n) => Some(ctx.arg::<u64>(n as usize)),
            RawArg::VcpuIdOf(n) => kvm_layout()
                .and_then(|layout| read_kernel::<u32>(ctx.arg::<u64>(n as usize), layout.vcpu_id_offset))
                .map(u64::from),
            RawArg::LapicVcpuIdOf(n) => kvm_layout().and_then(|layout| {
                let vcpu: u64 = read_kernel(ctx.arg::<u64>(n as usize), layout.lapic_vcpu_offset)?;
                read_kernel::<u32>(vcpu, layout.vcpu_id_offset).map(u64::from)
            }),
        };
        match value {
            Some(value) => {
                values[i] = value;
                present[i] = true;
            }
            None => {
                count_drop(ctx, DropReason::FieldReadFailed);
                return;
            }
        }
    }
    record(ctx, kind, tgid, tid, &values, &present);
}

/// A tracepoint's event: its fields from the trace record, at the offsets of this
/// kernel's format file, then [`record`].
#[inline(always)]
fn observe(ctx: &TracePointContext, slot: &ProgramSlot, kind: EventKind) {
    let Some((tgid, tid)) = current_owner(slot) else { return };
    let layout = &slot.layout;
    let mut values = [0u64; MAX_FIELDS];
    let mut present = [false; MAX_FIELDS];
    for i in 0..MAX_FIELDS {
        let slot = layout.fields[i];
        if slot.size == 0 {
            continue;
        }
        match read_slot(ctx, slot) {
            Ok(value) => {
                values[i] = value;
                present[i] = true;
            }
            Err(_) => {
                count_drop(ctx, DropReason::FieldReadFailed);
                return;
            }
        }
    }
    record(ctx, kind, tgid, tid, &values, &present);
}

/// Counts one event of `kind` with these field values for VM process `tgid` (thread
/// `tid`), whichever program read them.
#[inline(always)]
fn record<C: EbpfContext>(
    ctx: &C,
    kind: EventKind,
    tgid: u32,
    tid: u32,
    values: &[u64; MAX_FIELDS],
    present: &[bool; MAX_FIELDS],
) {
    let summary = summarize(kind, values, present);
    let key = EventKey { tgid, vcpu: summary.vcpu, kind: kind as u16, aux: summary.aux, detail: summary.detail };
    add(ctx, &key, 1, summary.add_ns);

    // A vCPU thread, learnt where the rate is that of what is counted: its returns to
    // userspace and its wake-ups (every vCPU thread returns at least once).
    if matches!(kind, EventKind::KvmUserspaceExit | EventKind::KvmVcpuWakeup) {
        let thread = VcpuThread { tgid, tid };
        if VCPU_THREADS.get_ptr(thread).is_none() && VCPU_THREADS.insert(thread, 1, 0).is_err() {
            count_drop(ctx, DropReason::VcpuThreadsFull);
        }
    }
    if let Some(vector) = summary.lvt_timer_vector {
        if TIMER_VECTORS.insert(tgid, vector, 0).is_err() {
            count_drop(ctx, DropReason::TimerVectorsFull);
        }
    }
    match kind {
        EventKind::KvmExit => {
            let start = ExitStart { timestamp_ns: now_ns(), key };
            // An LRU map makes room by evicting; an error here cannot be "full".
            let _ = EXIT_STARTS.insert(tid, start, 0);
        }
        EventKind::KvmEntry => {
            if let Some(start) = EXIT_STARTS.get_ptr(tid) {
                // SAFETY: the pointer came from a successful lookup and only this
                // thread's own programs (which do not run concurrently) write its entry.
                let start = unsafe { *start };
                let _ = EXIT_STARTS.remove(tid);
                add(ctx, &start.key, 0, now_ns().saturating_sub(start.timestamp_ns));
            }
        }
        _ => {}
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Adds to a key's per-CPU stats, creating the entry on first use.
#[inline(always)]
fn add<C: EbpfContext>(ctx: &C, key: &EventKey, count: u64, ns: u64) {
    if let Some(stats) = EVENTS.get_ptr_mut(key) {
        // SAFETY: a valid pointer to this CPU's value (the lookup succeeded); only
        // tracepoint programs write it. See "Per-CPU writes" in the crate docs.
        unsafe {
            (*stats).count += count;
            (*stats).sum_ns += ns;
        }
        return;
    }
    let stats = EventStats { count, sum_ns: ns };
    if EVENTS.insert(key, stats, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU may have created the entry between our lookup and insert.
    match EVENTS.get_ptr_mut(key) {
        // SAFETY: as above.
        Some(stats) => unsafe {
            (*stats).count += count;
            (*stats).sum_ns += ns;
        },
        None => count_drop(ctx, DropReason::EventMapFull),
    }
}

#[inline(always)]
fn read_slot(ctx: &TracePointContext, slot: FieldSlot) -> Result<u64, i64> {
    let offset = slot.offset as usize;
    // SAFETY: read_at copies with bpf_probe_read from the record; userspace took the
    // offset and size from this kernel's format file for this tracepoint, so the read
    // stays inside the record (and a bad read fails rather than faulting).
    unsafe {
        match slot.size {
            1 => ctx.read_at::<u8>(offset).map(u64::from),
            2 => ctx.read_at::<u16>(offset).map(u64::from),
            4 => ctx.read_at::<u32>(offset).map(u64::from),
            8 => ctx.read_at::<u64>(offset),
            _ => return Err(-1),
        }
        .map_err(i64::from)
    }
}

/// Where the fields the KVM-counter programs read are; written by userspace.
#[map]
static KVM_LAYOUT: Array<KvmCounterLayout> = Array::with_max_entries(1, 0);

/// KVM's own counters of every vCPU, as last copied.
#[map]
static KVM_VCPU_COUNTERS: HashMap<KvmVcpuKey, KvmVcpuCounters> = HashMap::with_max_entries(KVM_VCPU_CAPACITY, 0);

/// The context of an `iter/task_file` program (`struct bpf_iter__task_file`): every
/// open file of every process, one call each.
#[repr(C)]
struct TaskFileContext {
    meta: u64,
    task: u64,
    fd: u32,
    padding: u32,
    file: u64,
}

/// A BPF iterator program's context, for the log of [`count_drop`].
struct IterContext(*mut core::ffi::c_void);

impl EbpfContext for IterContext {
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.0
    }
}

/// The BPF iterator (BPF_TRACE_ITER over `task_file`) that samples KVM's counters:
/// userspace runs it once per interval by reading an iterator file; it visits every
/// open file of the host and copies the counters of each vCPU file. Nothing runs per KVM
/// event. It prints nothing: what it learns goes to [`KVM_VCPU_COUNTERS`].
#[no_mangle]
#[link_section = "iter/task_file"]
pub fn kvm_vcpu_files(ctx: *mut core::ffi::c_void) -> i32 {
    if let Some(slot) = count_program_event(PROGRAM_VCPU_FILES) {
        let _ = sample_vcpu_file(&IterContext(ctx), slot, ctx as *const TaskFileContext);
    }
    0
}

/// Where KVM's structures' fields are, once userspace has written it.
#[inline(always)]
fn kvm_layout() -> Option<&'static KvmCounterLayout> {
    KVM_LAYOUT.get(0).filter(|layout| layout.ready != 0)
}

/// Reads a kernel value at `base + offset`; `None` if the read fails.
#[inline(always)]
fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies from kernel memory and fails rather than
    // faulting; a wrong address yields an error, never a fault.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

#[inline(always)]
fn sample_vcpu_file(ctx: &IterContext, slot: &ProgramSlot, files: *const TaskFileContext) -> Option<()> {
    let layout = kvm_layout()?;
    // The kernel passes the task and the file (NULL at the end of the iteration).
    let task: u64 = read_kernel(files as u64, core::mem::offset_of!(TaskFileContext, task) as u32)?;
    let file: u64 = read_kernel(files as u64, core::mem::offset_of!(TaskFileContext, file) as u32)?;
    if task == 0 || file == 0 {
        return None;
    }
    if file_name::<9>(layout, file)? != VCPU_FILE_NAME_PREFIX {
        return None;
    }
    let tgid: u32 = read_kernel(task, layout.task_tgid_offset)?;
    if !is_tracked(&slot.config, tgid) {
        return None;
    }
    let vcpu: u64 = read_kernel(file, layout.file_private_data_offset)?;
    let Some(vcpu_id) = read_kernel::<u32>(vcpu, layout.vcpu_id_offset) else {
        count_drop(ctx, DropReason::KvmCounterReadFailed);
        return None;
    };
    copy_kvm_counters(ctx, layout, vcpu, KvmVcpuKey { tgid, vcpu_id });
    Some(())
}

/// The first `N` bytes of `file`'s name.
#[inline(always)]
fn file_name<const N: usize>(layout: &KvmCounterLayout, file: u64) -> Option<[u8; N]> {
    let dentry: u64 = read_kernel(file, layout.file_dentry_offset)?;
    let name: u64 = read_kernel(dentry, layout.dentry_name_offset)?;
    read_kernel(name, 0)
}

/// The id of the thread that last ran `vcpu` (`vcpu->pid`), if any.
#[inline(always)]
fn vcpu_thread(layout: &KvmCounterLayout, vcpu: u64) -> Option<u32> {
    let pid: u64 = read_kernel(vcpu, layout.vcpu_pid_offset)?;
    if pid == 0 {
        return None;
    }
    read_kernel(pid, layout.pid_nr_offset)
}

/// Copies a vCPU's counters into [`KVM_VCPU_COUNTERS`].
#[inline(always)]
fn copy_kvm_counters<C: EbpfContext>(ctx: &C, layout: &KvmCounterLayout, vcpu: u64, key: KvmVcpuKey) {
    let mut counters = KvmVcpuCounters { copied_ns: now_ns(), values: [0; KVM_COUNTERS] };
    for i in 0..KVM_COUNTERS {
        match read_kernel(vcpu, layout.offsets[i]) {
            Some(value) => counters.values[i] = value,
            None => {
                count_drop(ctx, DropReason::KvmCounterReadFailed);
                return;
            }
        }
    }
    if KVM_VCPU_COUNTERS.insert(key, counters, 0).is_err() {
        count_drop(ctx, DropReason::KvmCountersFull);
    }
}

/// On `sched_process_exit` (a raw tracepoint: a thread ends, a rare event): a thread
/// that ran a vCPU ([`VCPU_THREADS`]) has done its last exit, so its vCPU's counters are
/// copied one last time and a VM's final counts are exact however short its life. Its
/// vCPU is the one of the VM file in its file table whose `pid` is this thread; the file
/// table is still there (the kernel closes it after this tracepoint), and so is the VM
/// while its file is open.
#[no_mangle]
#[link_section = "raw_tracepoint"]
pub fn kvm_vcpu_thread_exit(ctx: *mut core::ffi::c_void) -> i32 {
    if count_program_event(PROGRAM_THREAD_EXIT).is_none() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let thread = VcpuThread { tgid: (pid_tgid >> 32) as u32, tid: pid_tgid as u32 };
    if VCPU_THREADS.get_ptr(thread).is_some() {
        let _ = copy_exiting_vcpu(&RawTracePointContext::new(ctx), thread);
    }
    0
}

#[inline(always)]
fn copy_exiting_vcpu(ctx: &RawTracePointContext, thread: VcpuThread) -> Option<()> {
    let layout = kvm_layout()?;
    // SAFETY: bpf_get_current_task has no preconditions; the pointer is only read
    // through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task, layout.task_files_offset)?;
    let fdt: u64 = read_kernel(files, layout.files_fdt_offset)?;
    let max_fds: u32 = read_kernel(fdt, layout.fdtable_max_fds_offset)?;
    let fds: u64 = read_kernel(fdt, layout.fdtable_fd_offset)?;
    for fd in 0..VM_FD_SEARCH_LIMIT.min(max_fds) {
        let file: u64 = read_kernel(fds, fd * 8)?;
        if file == 0 || file_name::<7>(layout, file) != Some(VM_FILE_NAME) {
            continue;
        }
        let kvm: u64 = read_kernel(file, layout.file_private_data_offset)?;
        if let Some(vcpu) = vcpu_of_thread(layout, kvm, thread.tid) {
            let vcpu_id: u32 = read_kernel(vcpu, layout.vcpu_id_offset)?;
            copy_kvm_counters(ctx, layout, vcpu, KvmVcpuKey { tgid: thread.tgid, vcpu_id });
            return Some(());
        }
    }
    None
}

/// The vCPU of VM `kvm` that thread `tid` ran last, from KVM's `vcpu_array`: an xarray
/// whose head is the vCPU itself when it holds only index 0, else (tagged 2) a node
/// of 64 slots.
#[inline(always)]
fn vcpu_of_thread(layout: &KvmCounterLayout, kvm: u64, tid: u32) -> Option<u64> {
    const XA_INTERNAL_TAG: u64 = 2;
    let head: u64 = read_kernel(kvm, layout.kvm_vcpus_head_offset)?;
    if head & 3 == 0 {
        return (head != 0 && vcpu_thread(layout, head) == Some(tid)).then_some(head);
    }
    if head & 3 != XA_INTERNAL_TAG {
        return None;
    }
    let slots = head - XA_INTERNAL_TAG + layout.xa_node_slots_offset as u64;
    for index in 0..VCPU_ARRAY_SEARCH_LIMIT {
        let vcpu: u64 = read_kernel(slots, index * 8)?;
        if vcpu != 0 && vcpu & 3 == 0 && vcpu_thread(layout, vcpu) == Some(tid) {
            return Some(vcpu);
        }
    }
    None
}

#[inline(always)]
fn count_drop<C: EbpfContext>(ctx: &C, reason: DropReason) {
    if let Some(drops) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: a valid pointer to this CPU's slot (the lookup succeeded). See
        // "Per-CPU writes" in the crate docs.
        let previous = unsafe {
            let previous = *drops;
            *drops = previous + 1;
            previous
        };
        // Log only the first drop of each reason per CPU: a full map would otherwise
        // flood the log ring on every event.
        if previous == 0 {
            warn!(ctx, "paratick observer dropping events: {}", reason.name());
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// On the host, the programs are not runnable: they are loaded from the object that
/// paratick-ctl's build script builds for `bpfel-unknown-none`.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("paratick-ebpf holds eBPF programs: paratick-ctl builds them for bpfel-unknown-none and loads them");
    std::process::exit(2);
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
