//! What the kernel shares: the boot information (written by vCPU 0 at init, then only
//! read), and the results block in guest memory that the VMM reads live (each vCPU's
//! counters, guest time, the outcome).

use core::cell::UnsafeCell;
use core::sync::atomic::AtomicU64;

use paratick_common::guest::{BootInfo, GuestResults, TickMode, VcpuCounters, Workload, RESULTS_ADDR};

/// A value written by vCPU 0 during init, then only read (after the kernel's
/// `INIT_DONE`).
pub struct InitOnce<T>(pub UnsafeCell<T>);
// SAFETY: written only by vCPU 0 before INIT_DONE is released, read-only afterwards.
unsafe impl<T> Sync for InitOnce<T> {}

static BOOT: InitOnce<BootInfo> = InitOnce(UnsafeCell::new(BootInfo {
    magic: 0,
    tsc_khz: 0,
    work_units: 0,
    duration_ms: 0,
    vcpus: 0,
    tick_mode: 0,
    workload: 0,
    hz: 0,
    disk_sectors: 0,
    housekeeping_hz: 0,
    reserved: 0,
}));

/// Keeps the validated boot information.
///
/// # Safety
/// Only vCPU 0, during init, before any other vCPU runs the kernel (see [`InitOnce`]).
pub unsafe fn set_boot(info: BootInfo) {
    // SAFETY: the caller is the only one touching BOOT now.
    unsafe { *BOOT.0.get() = info };
}

/// The boot information (valid once init is done).
pub fn boot() -> &'static BootInfo {
    // SAFETY: see InitOnce: read-only once init is done.
    unsafe { &*BOOT.0.get() }
}

/// Decoded views of the boot information (validated at init).
pub trait BootExt {
    /// The tick mode.
    fn mode(&self) -> TickMode;
    /// The workload.
    fn work(&self) -> Workload;
}

impl BootExt for BootInfo {
    fn mode(&self) -> TickMode {
        TickMode::from_u32(self.tick_mode).unwrap_or(TickMode::Periodic)
    }
    fn work(&self) -> Workload {
        Workload::from_u32(self.workload).unwrap_or(Workload::Sequential)
    }
}

/// The results block: guest memory reserved by the memory map, zeroed by the VMM.
pub fn results() -> *mut GuestResults {
    RESULTS_ADDR as *mut GuestResults
}

/// TSC when the workload started.
pub fn start_tsc() -> u64 {
    // SAFETY: written once by vCPU 0 during init, before any tick (see InitOnce).
    unsafe { (*results()).start_tsc }
}

/// Guest time in ticks, shared by all vCPUs (read live by the VMM).
pub fn jiffies() -> &'static AtomicU64 {
    // SAFETY: `jiffies` is an aligned u64 in the results block, only ever accessed
    // atomically once the kernel runs; AtomicU64 has the layout of u64.
    unsafe { AtomicU64::from_ptr(core::ptr::addr_of_mut!((*results()).jiffies)) }
}

/// Updates this vCPU's counters in the results block. The reference lives only for
/// `update`, which must not count again itself (every caller's is a few additions), so
/// no two references to a vCPU's counters ever exist at once.
#[inline(always)]
pub fn count(vcpu: usize, update: impl FnOnce(&mut VcpuCounters)) {
    // SAFETY: entry `vcpu` of the results block is only written by vCPU `vcpu`, with
    // interrupts off (in the kernel), and no other reference to it outlives its `count`.
    update(unsafe { &mut (*results()).vcpus[vcpu] })
}
