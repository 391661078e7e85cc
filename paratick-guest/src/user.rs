//! The workloads, run as tasks at CPL3 (native speed on PVM hosts), and their system
//! calls. A system call is `int3` with the number in `rax` and the argument in `rdi`:
//! `int n` and `syscall`/`sysret` are unusable from CPL3 on PVM (see docs/host.md),
//! and the #BP gate has DPL 3.

use core::arch::asm;
use core::hint::black_box;

use paratick_common::guest::{Workload, SECTOR_SIZE, SLEEP_WORKLOAD_MS};

use crate::arch::rdtsc;

/// System call numbers.
pub const SYS_EXIT: u64 = 0;
/// Wait at the barrier shared by all tasks.
pub const SYS_BARRIER: u64 = 1;
/// Read one block into the task's buffer; returns the request status.
pub const SYS_READ_BLOCK: u64 = 2;
/// Sleep for the given number of milliseconds (woken by a tick after the time passed).
pub const SYS_SLEEP: u64 = 3;

/// Sectors per block read.
pub const BLOCK_SECTORS: u32 = 8;

/// What a task is told (readable at CPL3: the guest maps all memory user-accessible).
#[repr(C)]
pub struct TaskParams {
    /// Task index.
    pub index: u64,
    /// Work units to do, or 0 to work until `deadline_tsc`.
    pub work_units: u64,
    /// TSC at which to stop (duration mode).
    pub deadline_tsc: u64,
    /// Number of blocks of the disk.
    pub disk_blocks: u64,
    /// The task's block buffer.
    pub buffer: *const u8,
    /// Where the task stores its units done so far for the host to read
    /// ([`GuestResults::task_work_units`]), or null when its work is not the workload's.
    ///
    /// [`GuestResults::task_work_units`]: paratick_common::guest::GuestResults::task_work_units
    pub progress: *mut u64,
}

fn syscall(number: u64, argument: u64) -> u64 {
    let result;
    // SAFETY: int3 enters the kernel's system call handler, which returns to the next
    // instruction with every register but rax unchanged.
    unsafe { asm!("int3", inlateout("rax") number => result, in("rdi") argument, options(nostack)) }
    result
}

fn exit(units: u64) -> ! {
    syscall(SYS_EXIT, units);
    unreachable!("a task does not return from exit")
}

/// One unit of CPU work (~30 µs natively): a xorshift chain the compiler cannot elide.
fn work_unit(seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    black_box(x)
}

/// Runs `step` until the work is done or the deadline passed; returns units done.
fn run(params: &TaskParams, mut step: impl FnMut(u64)) -> u64 {
    let mut units = 0;
    loop {
        let done = if params.work_units > 0 { units >= params.work_units } else { rdtsc() >= params.deadline_tsc };
        if done {
            return units;
        }
        step(units);
        units += 1;
        if !params.progress.is_null() {
            // SAFETY: the kernel points `progress` at this task's own slot of the results
            // block (mapped at CPL3 like all memory); the host only reads it.
            unsafe { core::ptr::write_volatile(params.progress, units) };
        }
    }
}

/// Entry point of every task (its first instruction at CPL3).
pub extern "C" fn task_main(params: &'static TaskParams, workload: u64) -> ! {
    let units = match Workload::from_u32(workload as u32) {
        Some(Workload::Sequential | Workload::BadRequests | Workload::Contended | Workload::Fuzz) => run(params, |u| {
            work_unit(u ^ params.index);
        }),
        Some(Workload::Multithreaded) => run(params, |u| {
            work_unit(u ^ params.index);
            syscall(SYS_BARRIER, 0);
        }),
        Some(Workload::Io) => {
            let mut block = params.index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            run(params, |_| {
                block ^= block << 13;
                block ^= block >> 7;
                block ^= block << 17;
                let sector = (block % params.disk_blocks) * BLOCK_SECTORS as u64;
                if syscall(SYS_READ_BLOCK, sector) == 0 {
                    // Touch the data like a consumer would.
                    // SAFETY: the buffer is the task's own block buffer of one block.
                    let data = unsafe {
                        core::slice::from_raw_parts(params.buffer, (BLOCK_SECTORS as u64 * SECTOR_SIZE) as usize)
                    };
                    black_box(data.iter().step_by(64).fold(0u8, |a, b| a ^ b));
                }
            })
        }
        Some(Workload::Sleep) => run(params, |u| {
            work_unit(u ^ params.index);
            syscall(SYS_SLEEP, SLEEP_WORKLOAD_MS);
        }),
        Some(Workload::SleepBeside) if params.index == 0 => run(params, |u| {
            work_unit(u);
            syscall(SYS_SLEEP, SLEEP_WORKLOAD_MS);
        }),
        // The CPU-bound companion: its work is not what the workload reports.
        Some(Workload::SleepBeside) => {
            run(params, |u| {
                work_unit(u ^ params.index);
            });
            0
        }
        Some(Workload::Crash | Workload::TripleFault) | None => {
            // SAFETY: deliberately executes an invalid instruction: the crash test.
            unsafe { asm!("ud2", options(noreturn)) }
        }
    };
    exit(units)
}
