//! eBPF programs on KVM tracepoints: count events per (VM process, vCPU, kind, detail),
//! time exits from `kvm_exit` to `kvm_entry`, remember each VM's LAPIC timer vector, and
//! follow a watched command's forks.
//!
//! The programs are deliberately thin: field offsets come from userspace (read from the
//! running kernel's format files), and what a record means is decided by
//! `paratick_common::event::summarize`, which is unit-tested on the host.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use paratick_common::event::{
    summarize, DropReason, EventKey, EventKind, EventStats, ExitStart, FieldSlot, ObserverConfig, TracepointLayout,
    VcpuThread, DROP_REASON_COUNT, EVENT_MAP_CAPACITY, FORK_LAYOUT_INDEX, LAYOUT_COUNT, MAX_FIELDS,
    PROCESS_MAP_CAPACITY, THREAD_OWNER_CAPACITY, VCPU_THREAD_CAPACITY,
};
use paratick_common::kvm_counters::{
    KvmCounterLayout, KvmVcpuCounters, KvmVcpuKey, KVM_COUNTERS, KVM_COUNTERS_MIN_INTERVAL_NS, KVM_VCPU_CAPACITY,
};

/// Event counts, per CPU so that the hot path takes no lock.
#[map]
static EVENTS: PerCpuHashMap<EventKey, EventStats> = PerCpuHashMap::with_max_entries(EVENT_MAP_CAPACITY, 0);

/// Field layouts, indexed by `EventKind` (and `FORK_LAYOUT_INDEX`); written by userspace.
#[map]
static LAYOUTS: Array<TracepointLayout> = Array::with_max_entries(LAYOUT_COUNT, 0);

/// Filtering settings; written by userspace.
#[map]
static CONFIG: Array<ObserverConfig> = Array::with_max_entries(1, 0);

/// Threads whose events belong to a VM other than their process (thread id → owner
/// id): the daemon runs several VMs in one process and registers each VM's threads.
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

/// Threads that ran a vCPU, so that the vCPU count of a VM outlives the VM process.
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

/// Defines a tracepoint entry point `name` that runs `handler(ctx)` and returns
/// [`PASS_EVENT_ON`].
macro_rules! tracepoint_program {
    ($program:ident => $handler:expr) => {
        #[doc = concat!("The program on the `", stringify!($program), "` tracepoint.")]
        #[no_mangle]
        #[link_section = "tracepoint"]
        pub fn $program(ctx: *mut core::ffi::c_void) -> u32 {
            $handler(&TracePointContext::new(ctx));
            PASS_EVENT_ON
        }
    };
}

/// One program per row of paratick-common's KVM event table, named after its
/// tracepoint, each recording its [`EventKind`].
macro_rules! kvm_event_programs {
    ($($(#[$doc:meta])* $variant:ident = $value:literal, $tracepoint:ident, [$($field:tt)*];)+) => {
        $(tracepoint_program!($tracepoint => |ctx| observe(ctx, EventKind::$variant));)+
    };
}

paratick_common::for_each_kvm_event!(kvm_event_programs);

// A tracked process's children are tracked too, so that `observe -- COMMAND` sees VMs
// started anywhere in the command's process tree.
tracepoint_program!(sched_process_fork => follow_fork);

fn follow_fork(ctx: &TracePointContext) {
    let Some(config) = CONFIG.get(0) else { return };
    if config.follow_forks == 0 || !is_tracked(current_tgid()) {
        return;
    }
    let Some(layout) = LAYOUTS.get(FORK_LAYOUT_INDEX) else { return };
    match read_slot(ctx, layout.fields[0]) {
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
fn is_tracked(tgid: u32) -> bool {
    match CONFIG.get(0) {
        Some(config) if config.filter_by_pid != 0 => TRACKED_PIDS.get_ptr(tgid).is_some(),
        _ => true,
    }
}

#[inline(always)]
fn observe(ctx: &TracePointContext, kind: EventKind) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let process = (pid_tgid >> 32) as u32;
    if !is_tracked(process) {
        return;
    }
    let tgid = match THREAD_OWNERS.get_ptr(tid) {
        // SAFETY: the pointer came from a successful lookup of a plain u32 value.
        Some(owner) => unsafe { *owner },
        None => process,
    };
    let Some(layout) = LAYOUTS.get(kind as u32) else { return };
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
    let summary = summarize(kind, &values, &present);
    let key = EventKey { tgid, vcpu: summary.vcpu, kind: kind as u16, aux: summary.aux, detail: summary.detail };
    add(ctx, &key, 1, summary.add_ns);

    if kind.fires_on_vcpu_thread() {
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
fn add(ctx: &TracePointContext, key: &EventKey, count: u64, ns: u64) {
    if let Some(stats) = EVENTS.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; BPF programs are not preempted by another
        // program on the same CPU writing the same tracepoint map slot.
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

/// Where KVM's counters are in `struct kvm_vcpu`; written by userspace.
#[map]
static KVM_LAYOUT: Array<KvmCounterLayout> = Array::with_max_entries(1, 0);

/// KVM's own counters of every vCPU, as last copied.
#[map]
static KVM_VCPU_COUNTERS: HashMap<KvmVcpuKey, KvmVcpuCounters> = HashMap::with_max_entries(KVM_VCPU_CAPACITY, 0);

/// The vCPU each thread last ran (thread id → `struct kvm_vcpu *`), learnt from the
/// raw tracepoints that carry the vCPU; the ones that do not (a KVM_RUN's return, a
/// wake-up) look it up. LRU: threads come and go.
#[map]
static THREAD_VCPUS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(VCPU_THREAD_CAPACITY, 0);

/// Raw tracepoint programs (BPF_PROG_TYPE_RAW_TRACEPOINT: the arguments of the
/// tracepoint call, pointers included) that keep KVM's own counters copied. Where the
/// kernel has kprobes or BPF trampolines, probes on KVM_RUN would do; this works on
/// hosts with neither (such as PVM hosts).
macro_rules! kvm_counter_programs {
    ($($program:ident => $handler:expr),+ $(,)?) => {$(
        #[doc = concat!("The raw tracepoint program `", stringify!($program), "`.")]
        #[no_mangle]
        #[link_section = "raw_tracepoint"]
        pub fn $program(ctx: *mut core::ffi::c_void) -> i32 {
            $handler(&RawTracePointContext::new(ctx));
            0
        }
    )+};
}

kvm_counter_programs! {
    // kvm_emulate_insn(vcpu, failed) and kvm_page_fault(vcpu, address, error): the vCPU.
    kvm_counters_emulate_insn => |ctx: &RawTracePointContext| vcpu_seen(ctx, ctx.arg::<u64>(0)),
    kvm_counters_page_fault => |ctx: &RawTracePointContext| vcpu_seen(ctx, ctx.arg::<u64>(0)),
    // kvm_eoi(apic, vector): the vCPU is the LAPIC's.
    kvm_counters_eoi => |ctx: &RawTracePointContext| {
        if let Some(layout) = KVM_LAYOUT.get(0) {
            let apic: u64 = ctx.arg(0);
            // SAFETY: bpf_probe_read_kernel fails rather than faults; the offset of
            // `vcpu` in `struct kvm_lapic` is from this kernel's BTF.
            if let Ok(vcpu) = unsafe { bpf_probe_read_kernel((apic + layout.lapic_vcpu_offset as u64) as *const u64) } {
                vcpu_seen(ctx, vcpu);
            }
        }
    },
    // kvm_userspace_exit(reason, errno): KVM_RUN returns to the VMM, after the
    // accounting of its last exit.
    kvm_counters_userspace_exit => |ctx: &RawTracePointContext| thread_vcpu_copy(ctx, false),
    // kvm_vcpu_wakeup(ns, waited, valid): a halt ended.
    kvm_counters_vcpu_wakeup => |ctx: &RawTracePointContext| thread_vcpu_copy(ctx, true),
}

#[inline(always)]
fn vcpu_seen(ctx: &RawTracePointContext, vcpu: u64) {
    let _ = THREAD_VCPUS.insert(bpf_get_current_pid_tgid() as u32, vcpu, 0);
    copy_kvm_counters(ctx, vcpu, true);
}

#[inline(always)]
fn thread_vcpu_copy(ctx: &RawTracePointContext, rate_limited: bool) {
    // SAFETY: a plain u64 value of this thread's own entry.
    if let Some(&vcpu) = unsafe { THREAD_VCPUS.get(bpf_get_current_pid_tgid() as u32) } {
        copy_kvm_counters(ctx, vcpu, rate_limited);
    }
}

#[inline(always)]
fn copy_kvm_counters<C: EbpfContext>(ctx: &C, vcpu: u64, rate_limited: bool) {
    let Some(layout) = KVM_LAYOUT.get(0) else { return };
    let tgid = current_tgid();
    if layout.ready == 0 || !is_tracked(tgid) {
        return;
    }
    // SAFETY: bpf_probe_read_kernel copies from kernel memory and fails rather than
    // faulting; the address is the probed function's vcpu argument plus an offset that
    // userspace took from this kernel's BTF.
    let Ok(vcpu_id) = (unsafe { bpf_probe_read_kernel((vcpu + layout.vcpu_id_offset as u64) as *const u32) }) else {
        count_drop(ctx, DropReason::KvmCounterReadFailed);
        return;
    };
    let key = KvmVcpuKey { tgid, vcpu_id };
    let now = now_ns();
    if rate_limited {
        // SAFETY: a plain value of this map.
        if let Some(last) = unsafe { KVM_VCPU_COUNTERS.get(key) } {
            if now.wrapping_sub(last.copied_ns) < KVM_COUNTERS_MIN_INTERVAL_NS {
                return;
            }
        }
    }
    let mut counters = KvmVcpuCounters { copied_ns: now, values: [0; KVM_COUNTERS] };
    for i in 0..KVM_COUNTERS {
        let address = (vcpu + layout.offsets[i] as u64) as *const u64;
        // SAFETY: as above.
        match unsafe { bpf_probe_read_kernel(address) } {
            Ok(value) => counters.values[i] = value,
            Err(_) => {
                count_drop(ctx, DropReason::KvmCounterReadFailed);
                return;
            }
        }
    }
    if KVM_VCPU_COUNTERS.insert(key, counters, 0).is_err() {
        count_drop(ctx, DropReason::KvmCountersFull);
    }
}

#[inline(always)]
fn count_drop<C: EbpfContext>(ctx: &C, reason: DropReason) {
    if let Some(drops) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU array slot of this CPU.
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
