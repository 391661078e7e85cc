//! The boot protocol between the VMM and the Paratick guest kernel: memory map, boot
//! information, results, ports and vectors of the guest's devices. Both sides import
//! this module; nothing here is a convention kept in two places.
//!
//! The VMM identity-maps the first [`GUEST_MEMORY_SIZE`] bytes, loads the kernel ELF at
//! [`KERNEL_LOAD_ADDR`], and starts every vCPU in 64-bit mode at the kernel entry with
//! `rdi` = [`BOOT_INFO_ADDR`], `rsi` = vCPU index and `rsp` = the top of that vCPU's
//! kernel stack. The guest reports through a [`GuestResults`] block at [`RESULTS_ADDR`],
//! which the VMM may read at any time (tick counters are live).

/// Most vCPUs a guest may have.
pub const MAX_VCPUS: usize = 8;
/// Most tasks a guest runs: two per vCPU (the multithreaded workload).
pub const MAX_TASKS: usize = 2 * MAX_VCPUS;

/// Guest memory size (identity-mapped with 2 MiB pages).
pub const GUEST_MEMORY_SIZE: u64 = 64 << 20;
/// VMM-built boot GDT (null, 64-bit code, data), replaced by the guest's own.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// [`BootInfo`] address.
pub const BOOT_INFO_ADDR: u64 = 0x1000;
/// Page tables built by the VMM: PML4, PDPT, then page directories.
pub const PAGE_TABLES_ADDR: u64 = 0x2000;
/// [`GuestResults`] address.
pub const RESULTS_ADDR: u64 = 0x8000;
/// Where the kernel image is linked and loaded.
pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;
/// Kernel stacks: one of [`KERNEL_STACK_SIZE`] per vCPU, from this address up.
pub const KERNEL_STACKS_ADDR: u64 = 0x40_0000;
/// Size of one kernel stack.
pub const KERNEL_STACK_SIZE: u64 = 0x1_0000;
/// User stacks: one of [`USER_STACK_SIZE`] per task.
pub const USER_STACKS_ADDR: u64 = 0x50_0000;
/// Size of one user stack.
pub const USER_STACK_SIZE: u64 = 0x8000;
/// Buffers and request descriptors of the block device.
pub const IO_AREA_ADDR: u64 = 0x80_0000;
/// The vCPUs' tick pages (`abi::TickPage`): vCPU `i`'s at `+ i * TICK_PAGE_SIZE`.
pub const TICK_PAGES_ADDR: u64 = 0x2_0000;

/// Guest-physical address of vCPU `index`'s tick page.
pub const fn tick_page_addr(index: usize) -> u64 {
    TICK_PAGES_ADDR + index as u64 * crate::abi::TICK_PAGE_SIZE
}

/// Top of vCPU `index`'s kernel stack (the stack grows down from here).
pub const fn kernel_stack_top(index: usize) -> u64 {
    KERNEL_STACKS_ADDR + (index as u64 + 1) * KERNEL_STACK_SIZE
}

/// Selector of the boot code segment (in the VMM's boot GDT and the guest's GDT alike).
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// Selector of the boot data segment.
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;

/// Port of the guest's debug console: bytes written are logged by the VMM.
pub const CONSOLE_PORT: u16 = 0x3f8;
/// Port the guest writes a [`GuestStatus`] to when it has finished (or panicked); the
/// results block is complete at that point.
pub const RESULTS_PORT: u16 = 0x0c54;
/// Port the guest writes the guest-physical address of a [`BlockRequest`] to.
pub const BLOCK_REQUEST_PORT: u16 = 0x0c58;

/// Vector of the block device's completion interrupt (an MSI to the submitting vCPU).
pub const BLOCK_COMPLETION_VECTOR: u8 = 0xe0;
/// Vector of the guest's wake-up IPI (a blocked task became runnable on that vCPU).
pub const WAKEUP_VECTOR: u8 = 0xe1;
/// Spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = 0x6b63_6974_6172_6170; // "paratick"

/// How the guest gets its scheduler tick.
#[repr(u32)]
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::VariantArray,
    strum::FromRepr,
)]
#[strum(serialize_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum TickMode {
    /// LAPIC timer in periodic mode at HZ, always on (also while idle).
    Periodic = 0,
    /// One-shot TSC-deadline timer re-armed every tick while busy, stopped while idle.
    Tickless = 1,
    /// Ticks from the host: the guest asks for its rate once, then says through its
    /// tick page when a vCPU is idle (no ticks) and when it needs its scheduler tick (two
    /// or more runnable tasks); otherwise it gets only the housekeeping rate.
    Paratick = 2,
    /// Linux NO_HZ_FULL: like tickless, and the tick also stops while one task is
    /// runnable, but for a residual tick of 1 Hz (and the next sleeper).
    TicklessFull = 3,
    /// No timer at all: no tick, no timer writes (a sleeper's wake-up is the only timer
    /// event, armed on idle). Tasks switch only when they block. The floor against which
    /// the timer's cost is measured.
    NoTimer = 4,
}

/// The residual tick rate of a `TicklessFull` vCPU with one runnable task (Linux keeps
/// one tick a second for timekeeping and accounting on a NO_HZ_FULL CPU).
pub const RESIDUAL_TICK_HZ: u64 = 1;
// `TickMode::TicklessFull`'s text (shown by `--help`, where links do not render) says 1 Hz.
const _: () = assert!(RESIDUAL_TICK_HZ == 1);

impl TickMode {
    /// Decodes [`BootInfo::tick_mode`].
    pub const fn from_u32(value: u32) -> Option<TickMode> {
        TickMode::from_repr(value)
    }

    /// Name used on command lines and in reports.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// What the guest runs.
#[repr(u32)]
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::VariantArray,
    strum::FromRepr,
)]
#[strum(serialize_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Workload {
    /// CPU-bound user code on vCPU 0; the other vCPUs stay idle.
    Sequential = 0,
    /// One task per vCPU, meeting at a blocking barrier after every work unit.
    Multithreaded = 1,
    /// One task per vCPU issuing blocking reads to the virtual block device.
    Io = 2,
    /// Test workload: a user task executes an invalid instruction (the guest panics).
    #[cfg_attr(feature = "clap", value(hide = true))]
    Crash = 3,
    /// Test workload: like `Contended` (two tasks on vCPU 0, so it needs its scheduler
    /// tick), but the guest first sends malformed tick requests and tick page
    /// registrations.
    #[cfg_attr(feature = "clap", value(hide = true))]
    BadRequests = 4,
    /// Test workload: the kernel loads an empty IDT and faults (a triple fault).
    #[cfg_attr(feature = "clap", value(hide = true))]
    TripleFault = 5,
    /// Test workload: a task on vCPU 0 alternates a work unit with a sleep of
    /// [`SLEEP_WORKLOAD_MS`], so the tick's timer expiry and the idle paths' one-shot
    /// timer for the next event are exercised.
    #[cfg_attr(feature = "clap", value(hide = true))]
    Sleep = 6,
    /// Test workload: two CPU-bound tasks on vCPU 0 that never block, so that vCPU always
    /// has two runnable tasks (and needs its scheduler tick); the other vCPUs stay idle.
    #[cfg_attr(feature = "clap", value(hide = true))]
    Contended = 7,
    /// Test workload: on vCPU 0, a task that sleeps like `Sleep`'s (its work units are
    /// the ones reported) beside a CPU-bound task: a sleeper whose timer must fire while
    /// the vCPU is busy with one runnable task.
    #[cfg_attr(feature = "clap", value(hide = true))]
    SleepBeside = 8,
    /// Test workload: vCPU 0's kernel sends the VMM random input, seeded by the work
    /// amount: [`FUZZ_OPERATIONS`] random writes of random widths to the VMM's paratick
    /// and block ports (tick requests, tick page addresses, and block requests: random
    /// requests in the I/O area, or addresses outside guest memory), then one
    /// random port write or read, MMIO write or MSR write, which the VMM has no device
    /// for (or which faults). The VMM must end such a VM with a one-line error.
    #[cfg_attr(feature = "clap", value(hide = true))]
    Fuzz = 9,
}

/// How many random writes to the VMM's own ports the `Fuzz` workload makes.
pub const FUZZ_OPERATIONS: u32 = 2000;

/// How long the `Sleep` workload's task sleeps after each work unit.
pub const SLEEP_WORKLOAD_MS: u64 = 10;

impl Workload {
    /// The workloads of the evaluation.
    pub const EVALUATED: [Workload; 3] = [Workload::Sequential, Workload::Multithreaded, Workload::Io];

    /// Decodes [`BootInfo::workload`].
    pub const fn from_u32(value: u32) -> Option<Workload> {
        Workload::from_repr(value)
    }

    /// Name used on command lines and in reports.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// Raw tick-request values the `BadRequests` workload sends before its work: zero-length
/// nonsense is not possible on a port, so these are the out-of-range rates (too low,
/// too high, absurd) the host must clamp and count.
pub const BAD_TICK_REQUESTS: [u32; 3] = [1, 1_000_000, u32::MAX];

/// Tick page addresses the `BadRequests` workload registers before its real one, each
/// refused by the host: not page-aligned, not guest memory, page 0.
pub const BAD_TICK_PAGES: [u32; 3] = [TICK_PAGES_ADDR as u32 + 4, 0xfff0_0000, 0];

/// What the VMM tells the guest at boot (at [`BOOT_INFO_ADDR`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// TSC frequency in kHz (from KVM).
    pub tsc_khz: u64,
    /// Amount of work: total work units, or 0 to run for `duration_ms`.
    pub work_units: u64,
    /// Run time in milliseconds of guest TSC time, when `work_units` is 0.
    pub duration_ms: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// [`TickMode`].
    pub tick_mode: u32,
    /// [`Workload`].
    pub workload: u32,
    /// Tick rate the guest wants, in Hz.
    pub hz: u32,
    /// Sectors of the block device.
    pub disk_sectors: u64,
    /// Paratick: the tick rate a vCPU asks for while it does not need its scheduler tick
    /// (`abi::TickPage::housekeeping_hz`), in Hz.
    pub housekeeping_hz: u32,
    /// Unused; keeps the structure's size a multiple of 8.
    pub reserved: u32,
}

/// `GuestResults::status` values.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::FromRepr)]
pub enum GuestStatus {
    /// Still running.
    Running = 0,
    /// Finished its work; the results are complete.
    Done = 1,
    /// Panicked; `panic_message` says why.
    Panicked = 2,
}

impl GuestStatus {
    /// Decodes a status value.
    pub const fn from_u32(value: u32) -> Option<GuestStatus> {
        GuestStatus::from_repr(value)
    }
}

/// Per-vCPU counters kept by the guest.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuCounters {
    /// Scheduler ticks handled.
    pub ticks: u64,
    /// Of those, ticks that arrived while the vCPU was idle.
    pub idle_ticks: u64,
    /// TSC cycles spent idle (halted).
    pub idle_tsc: u64,
    /// Timer (re)programming writes the guest made (TSC deadline, LAPIC timer).
    pub timer_writes: u64,
    /// Tick requests sent to the host (paratick).
    pub tick_requests: u64,
    /// Context switches between tasks.
    pub context_switches: u64,
    /// Work units done by tasks on this vCPU.
    pub work_units: u64,
    /// TSC cycles tasks ran on this vCPU (accounted at ticks and task switches).
    pub run_tsc: u64,
    /// Intervals between consecutive ticks that found a task running, in bins of
    /// 1/[`TICK_INTERVAL_BINS_PER_PERIOD`] of the tick period (the last bin holds the
    /// longer ones): the precision of the tick as the guest sees it, however delivered.
    pub tick_intervals: [u32; TICK_INTERVAL_BINS],
}

/// Bins per tick period of [`VcpuCounters::tick_intervals`].
pub const TICK_INTERVAL_BINS_PER_PERIOD: u64 = 8;
/// Number of bins of [`VcpuCounters::tick_intervals`] (four periods).
pub const TICK_INTERVAL_BINS: usize = 32;

/// Length of [`GuestResults::panic_message`].
pub const PANIC_MESSAGE_LEN: usize = 120;

/// What the guest reports (at [`RESULTS_ADDR`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GuestResults {
    /// [`GuestStatus`].
    pub status: u32,
    /// Bytes used in `panic_message`.
    pub panic_len: u32,
    /// TSC when the workload started.
    pub start_tsc: u64,
    /// TSC when the last task finished.
    pub end_tsc: u64,
    /// Guest time in ticks since the start, advanced by every tick from the TSC (so a
    /// vCPU that ticks after an idle stretch catches up, as Linux does after NO_HZ idle).
    pub jiffies: u64,
    /// Counters of each vCPU.
    pub vcpus: [VcpuCounters; MAX_VCPUS],
    /// Work units each task has done so far, stored by the task itself at CPL3 after
    /// every unit (a plain store: no exit), so that the host can read the guest's
    /// progress at any time. Per-vCPU `work_units` are added only when a task ends.
    pub task_work_units: [u64; MAX_TASKS],
    /// Why the guest panicked (UTF-8).
    pub panic_message: [u8; PANIC_MESSAGE_LEN],
}

/// Block device operations.
pub const BLOCK_OP_READ: u32 = 0;
/// Write operation.
pub const BLOCK_OP_WRITE: u32 = 1;
/// Sector size of the block device.
pub const SECTOR_SIZE: u64 = 512;
/// `BlockRequest::status` while the request is in flight.
pub const BLOCK_STATUS_PENDING: u32 = u32::MAX;
/// `BlockRequest::status` of a completed request.
pub const BLOCK_STATUS_OK: u32 = 0;
/// `BlockRequest::status` of a rejected request (bad sector range, bad buffer, bad op).
pub const BLOCK_STATUS_ERROR: u32 = 1;

/// A block I/O request, in guest memory; its address is written to [`BLOCK_REQUEST_PORT`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockRequest {
    /// [`BLOCK_OP_READ`] or [`BLOCK_OP_WRITE`].
    pub op: u32,
    /// Set by the device when done: [`BLOCK_STATUS_OK`] or [`BLOCK_STATUS_ERROR`].
    pub status: u32,
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u32,
    /// vCPU to interrupt on completion.
    pub vcpu: u32,
    /// Guest-physical address of the data buffer.
    pub buffer: u64,
}

/// The structures the VMM reads from and writes to guest memory are plain old data for
/// vm-memory's `Bytes::read_obj` / `write_obj`.
#[cfg(feature = "vm-memory")]
mod byte_valued {
    use super::{BlockRequest, BootInfo, GuestResults, VcpuCounters};
    use crate::abi::TickPage;

    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers (and arrays of
    // them), and laid out without padding (sizes asserted below), so every byte pattern
    // the guest leaves in its memory is a valid value.
    unsafe impl vm_memory::ByteValued for BootInfo {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for GuestResults {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for VcpuCounters {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for BlockRequest {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for TickPage {}

    // No padding: each size is the sum of its fields' sizes.
    const _: () = {
        use core::mem::size_of;
        assert!(size_of::<BootInfo>() == 8 * 4 + 4 * 4 + 8 + 4 * 2);
        assert!(size_of::<TickPage>() == 4 * 8);
        assert!(size_of::<VcpuCounters>() == 8 * 8 + 4 * super::TICK_INTERVAL_BINS);
        assert!(size_of::<BlockRequest>() == 4 + 4 + 8 + 4 + 4 + 8);
        assert!(
            size_of::<GuestResults>()
                == 4 + 4
                    + 8 * 3
                    + size_of::<VcpuCounters>() * super::MAX_VCPUS
                    + 8 * super::MAX_TASKS
                    + super::PANIC_MESSAGE_LEN
        );
    };
}

// The memory map must not overlap: checked when anything using it is compiled.
const _: () = {
    assert!(BOOT_GDT_ADDR + 24 <= BOOT_INFO_ADDR);
    assert!(BOOT_INFO_ADDR + core::mem::size_of::<BootInfo>() as u64 <= PAGE_TABLES_ADDR);
    // PML4, PDPT and one page directory (1 GiB of 2 MiB pages covers the memory).
    assert!(PAGE_TABLES_ADDR + 3 * 0x1000 <= RESULTS_ADDR);
    assert!(RESULTS_ADDR + core::mem::size_of::<GuestResults>() as u64 <= KERNEL_LOAD_ADDR);
    assert!(kernel_stack_top(MAX_VCPUS - 1) <= USER_STACKS_ADDR);
    assert!(USER_STACKS_ADDR + MAX_TASKS as u64 * USER_STACK_SIZE <= IO_AREA_ADDR);
    assert!(IO_AREA_ADDR < GUEST_MEMORY_SIZE && GUEST_MEMORY_SIZE <= 1 << 30);
    assert!(RESULTS_ADDR + core::mem::size_of::<GuestResults>() as u64 <= TICK_PAGES_ADDR);
    assert!(tick_page_addr(MAX_VCPUS) <= KERNEL_LOAD_ADDR);
};

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantArray;

    #[test]
    fn enums_round_trip() {
        for &mode in TickMode::VARIANTS {
            assert_eq!(TickMode::from_u32(mode as u32), Some(mode));
            assert_eq!(mode.name().parse(), Ok(mode));
        }
        assert_eq!(TickMode::TicklessFull.name(), "tickless-full");
        assert_eq!(Workload::BadRequests.name(), "bad-requests");
        for &w in Workload::VARIANTS {
            assert_eq!(Workload::from_u32(w as u32), Some(w));
        }
        assert_eq!(Workload::VARIANTS.len(), 10);
        assert_eq!(TickMode::from_u32(5), None);
        assert_eq!(GuestStatus::from_u32(2), Some(GuestStatus::Panicked));
    }
}
