//! The kernel proper: boot state, tasks pinned to vCPUs with round-robin time slices,
//! the trap handler (ticks, system calls, device interrupts, exceptions), the idle loop,
//! the barrier and block I/O that tasks block on, and the results the VMM reads.

use core::cell::UnsafeCell;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use paratick_common::abi::{LAPIC_TIMER_VECTOR, PARATICK_TICK_VECTOR};
use paratick_common::guest::{
    BlockRequest, BootInfo, GuestStatus, TickMode, Workload, BLOCK_COMPLETION_VECTOR, BLOCK_OP_READ,
    BLOCK_REQUEST_PORT, BLOCK_STATUS_PENDING, BOOT_INFO_ADDR, BOOT_MAGIC, IO_AREA_ADDR, MAX_TASKS, MAX_VCPUS,
    PANIC_MESSAGE_LEN, RESULTS_PORT, SECTOR_SIZE, SPURIOUS_VECTOR, USER_STACKS_ADDR, USER_STACK_SIZE, WAKEUP_VECTOR,
};

use crate::arch::{self, TrapFrame, USER_CODE_SELECTOR, USER_DATA_SELECTOR, USER_RFLAGS};
use crate::shared::{self, boot, count, results, BootExt, InitOnce};
use crate::tick::{self, Load, TickState};
use crate::user::{self, TaskParams, BLOCK_SECTORS, SYS_BARRIER, SYS_EXIT, SYS_READ_BLOCK, SYS_SLEEP};
use crate::{apic, console};

/// Ticks a task runs before another runnable task of its vCPU gets the CPU.
const SLICE_TICKS: u32 = 2;
/// Task states.
const UNUSED: u32 = 0;
const RUNNABLE: u32 = 1;
const RUNNING: u32 = 2;
const BLOCKED_BARRIER: u32 = 3;
const BLOCKED_IO: u32 = 4;
const DONE: u32 = 5;
const SLEEPING: u32 = 6;
/// No task.
const NONE: usize = usize::MAX;
/// Where block buffers start in the I/O area (requests come first).
const IO_BUFFERS_OFFSET: u64 = 0x1_0000;

/// A value only its own vCPU touches, with interrupts off (in the kernel), copied in
/// and out whole or written field by field: no reference to it is kept.
struct PerVcpu<T>(UnsafeCell<T>);
// SAFETY: element `i` of a `[PerVcpu<_>; MAX_VCPUS]` is only accessed by vCPU `i`, and
// the kernel runs with interrupts disabled, so accesses never overlap.
unsafe impl<T> Sync for PerVcpu<T> {}

/// A task: its state is shared (other vCPUs wake it), the rest belongs to its vCPU.
struct Task {
    state: AtomicU32,
    vcpu: AtomicU32,
    /// TSC at which a sleeping task wakes (read by its own vCPU's ticks).
    wake_tsc: AtomicU64,
    frame: PerVcpu<TrapFrame>,
    params: InitOnce<TaskParams>,
}

struct Cpu {
    current: usize,
    slice_left: u32,
    tick: TickState,
    /// TSC up to which the current task's run time is accounted.
    accounted_tsc: u64,
}

static INIT_DONE: AtomicBool = AtomicBool::new(false);
static TASK_COUNT: AtomicU32 = AtomicU32::new(0);
static LIVE_TASKS: AtomicU32 = AtomicU32::new(0);
static PANICKED: AtomicBool = AtomicBool::new(false);
/// Runnable (or running) tasks per vCPU, kept at every state change so that the tick
/// learns the vCPU's load without scanning the tasks (every CPL0 instruction is
/// emulated on PVM hosts).
static RUNNABLE_ON: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];
/// Sleeping tasks per vCPU.
static SLEEPERS_ON: [AtomicU32; MAX_VCPUS] = [const { AtomicU32::new(0) }; MAX_VCPUS];
/// Barrier: participants (live tasks) in the high half, arrivals in the low half, so
/// that one atomic update decides who is last.
static BARRIER: AtomicU64 = AtomicU64::new(0);

// A const is the only way to initialise an array of non-Copy statics; each use is a
// fresh value, which is the point.
#[allow(clippy::declare_interior_mutable_const)]
const NEW_TASK: Task = Task {
    state: AtomicU32::new(UNUSED),
    vcpu: AtomicU32::new(0),
    wake_tsc: AtomicU64::new(0),
    frame: PerVcpu(UnsafeCell::new(TrapFrame {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rbp: 0,
        rdi: 0,
        rsi: 0,
        rdx: 0,
        rcx: 0,
        rbx: 0,
        rax: 0,
        vector: 0,
        error: 0,
        rip: 0,
        cs: 0,
        rflags: 0,
        rsp: 0,
        ss: 0,
    })),
    params: InitOnce(UnsafeCell::new(TaskParams {
        index: 0,
        work_units: 0,
        deadline_tsc: 0,
        disk_blocks: 0,
        buffer: core::ptr::null(),
        progress: core::ptr::null_mut(),
    })),
};
static TASKS: [Task; MAX_TASKS] = [NEW_TASK; MAX_TASKS];

// As NEW_TASK.
#[allow(clippy::declare_interior_mutable_const)]
const NEW_CPU: PerVcpu<Cpu> =
    PerVcpu(UnsafeCell::new(Cpu { current: NONE, slice_left: SLICE_TICKS, tick: TickState::new(), accounted_tsc: 0 }));
static CPUS: [PerVcpu<Cpu>; MAX_VCPUS] = [NEW_CPU; MAX_VCPUS];

/// Runs `f` on vCPU `vcpu`'s scheduler state, from that vCPU. Kernel paths re-enter one
/// another (an interrupt during the idle loop's halt; the idle loop entered from a trap
/// that has nothing to run), so the state is borrowed for a few field updates at a time,
/// never across a call that may halt or switch tasks. Every `f` in this file is field
/// updates or a function of tick.rs, which cannot reach this module (it does not import
/// it): no `f` borrows the state again. (A `RefCell` would check that at run time, at
/// about 150 more emulated instructions per block request on PVM hosts.)
#[inline(always)]
fn with_cpu<R>(vcpu: usize, f: impl FnOnce(&mut Cpu) -> R) -> R {
    // SAFETY: element `vcpu` is only touched by vCPU `vcpu`, with interrupts off (see
    // PerVcpu), and `f` does not borrow it again (above): this is the only reference to
    // it while `f` runs.
    f(unsafe { &mut *CPUS[vcpu].0.get() })
}

/// Marks `task` runnable (from blocked or sleeping); any vCPU may do this.
fn make_runnable(task: &Task) {
    task.state.store(RUNNABLE, Ordering::Release);
    RUNNABLE_ON[task.vcpu.load(Ordering::Relaxed) as usize].fetch_add(1, Ordering::AcqRel);
}

/// This vCPU's load, as the tick needs it.
fn load(vcpu: usize) -> Load {
    let next_sleeper = match SLEEPERS_ON[vcpu].load(Ordering::Acquire) {
        0 => None,
        _ => next_timer_event(vcpu),
    };
    Load { runnable: RUNNABLE_ON[vcpu].load(Ordering::Acquire), next_sleeper }
}

/// Adds the current task's run time up to now to this vCPU's account.
fn account_run_time(vcpu: usize) {
    let now = arch::rdtsc();
    let ran = with_cpu(vcpu, |cpu| {
        let running = cpu.current != NONE && TASKS[cpu.current].state.load(Ordering::Relaxed) == RUNNING;
        let ran = running.then(|| now.saturating_sub(cpu.accounted_tsc));
        cpu.accounted_tsc = now;
        ran
    });
    if let Some(ran) = ran {
        count(vcpu, |c| c.run_tsc += ran);
    }
}

/// The task running on this vCPU (`NONE`: none).
#[inline(always)]
fn current(vcpu: usize) -> usize {
    with_cpu(vcpu, |cpu| cpu.current)
}

/// Copies a task's saved user context into `frame` (one copy: each instruction of it is
/// emulated on PVM hosts).
#[inline(always)]
fn load_frame(task: usize, frame: &mut TrapFrame) {
    // SAFETY: a task's frame is only touched by the vCPU it is pinned to (see PerVcpu);
    // `frame` is another object, so the two do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(TASKS[task].frame.0.get(), frame, 1) }
}

/// Saves a task's user context.
#[inline(always)]
fn save_frame(task: usize, frame: &TrapFrame) {
    // SAFETY: as load_frame.
    unsafe { TASKS[task].frame.0.get().write(*frame) }
}

fn request_of(task: usize) -> *mut BlockRequest {
    (IO_AREA_ADDR + task as u64 * core::mem::size_of::<BlockRequest>() as u64) as *mut BlockRequest
}

fn buffer_of(task: usize) -> u64 {
    IO_AREA_ADDR + IO_BUFFERS_OFFSET + task as u64 * BLOCK_SECTORS as u64 * SECTOR_SIZE
}

/// vCPU 0: validates the boot information and creates the tasks; then releases the others.
pub fn init(boot_info: *const BootInfo) {
    // SAFETY: the VMM wrote the boot info at its address before starting the vCPUs.
    let info = unsafe { core::ptr::read_volatile(boot_info) };
    if info.magic != BOOT_MAGIC || boot_info as u64 != BOOT_INFO_ADDR {
        panic!("bad boot information (magic {:#x})", info.magic);
    }
    if info.vcpus == 0 || info.vcpus as usize > MAX_VCPUS || info.hz == 0 || info.tsc_khz == 0 {
        panic!("bad boot information: {} vCPUs, {} Hz, {} kHz TSC", info.vcpus, info.hz, info.tsc_khz);
    }
    let (Some(mode), Some(workload)) = (TickMode::from_u32(info.tick_mode), Workload::from_u32(info.workload)) else {
        panic!("unknown tick mode {} or workload {}", info.tick_mode, info.workload);
    };
    if workload == Workload::Io && info.disk_sectors < BLOCK_SECTORS as u64 {
        panic!("the I/O workload needs a disk");
    }
    if mode == TickMode::Paratick && !(1..=info.hz).contains(&info.housekeeping_hz) {
        panic!("bad boot information: housekeeping rate {} Hz (1 to {} Hz)", info.housekeeping_hz, info.hz);
    }
    // SAFETY: vCPU 0, at init: the other vCPUs wait for INIT_DONE.
    unsafe { shared::set_boot(info) };
    let _ = writeln!(
        console::Console,
        "paratick-guest: {} vCPUs, {} at {} Hz, workload {}",
        info.vcpus,
        mode.name(),
        info.hz,
        workload.name()
    );

    let vcpus = info.vcpus as usize;
    let tasks = match workload {
        Workload::Sequential | Workload::Crash | Workload::TripleFault | Workload::Sleep | Workload::Fuzz => 1,
        Workload::Multithreaded => 2 * vcpus,
        Workload::Io => vcpus,
        Workload::Contended | Workload::BadRequests | Workload::SleepBeside => 2,
    };
    // These share vCPU 0.
    let shared = matches!(workload, Workload::Contended | Workload::BadRequests | Workload::SleepBeside);
    let home_vcpus = if shared { 1 } else { vcpus };
    let start = arch::rdtsc();
    // SAFETY: the results block is ours; the VMM zeroed it.
    unsafe { (*results()).start_tsc = start };
    for (index, task) in TASKS.iter().enumerate().take(tasks) {
        let share = info.work_units / tasks as u64 + u64::from((index as u64) < info.work_units % tasks as u64);
        let params = TaskParams {
            index: index as u64,
            // A task with a zero share of a fixed amount of work still must not run
            // until the deadline: give it one unit instead.
            work_units: if info.work_units == 0 { 0 } else { share.max(1) },
            deadline_tsc: start + info.duration_ms * info.tsc_khz,
            disk_blocks: info.disk_sectors / BLOCK_SECTORS as u64,
            buffer: buffer_of(index) as *const u8,
            // The CPU-bound companion of the sleeper does work the workload does not report.
            progress: if workload == Workload::SleepBeside && index > 0 {
                core::ptr::null_mut()
            } else {
                // SAFETY: only the address is taken; the slot belongs to this task.
                unsafe { core::ptr::addr_of_mut!((*results()).task_work_units[index]) }
            },
        };
        // SAFETY: see InitOnce.
        unsafe { *task.params.0.get() = params };
        let frame = TrapFrame {
            rip: user::task_main as *const () as u64,
            cs: USER_CODE_SELECTOR as u64,
            ss: USER_DATA_SELECTOR as u64,
            rflags: USER_RFLAGS,
            // As if called: the return-address slot keeps the ABI's stack alignment.
            rsp: USER_STACKS_ADDR + (index as u64 + 1) * USER_STACK_SIZE - 8,
            rdi: task.params.0.get() as u64,
            rsi: workload as u64,
            ..TrapFrame::default()
        };
        save_frame(index, &frame);
        task.vcpu.store((index % home_vcpus) as u32, Ordering::Relaxed);
        make_runnable(task);
    }
    TASK_COUNT.store(tasks as u32, Ordering::Relaxed);
    LIVE_TASKS.store(tasks as u32, Ordering::Relaxed);
    BARRIER.store((tasks as u64) << 32, Ordering::Relaxed);
    INIT_DONE.store(true, Ordering::Release);
}

/// Other vCPUs: waits until vCPU 0 has initialised the kernel.
pub fn wait_for_init() {
    while !INIT_DONE.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
}

/// Starts this vCPU's tick and scheduling; never returns.
pub fn run(vcpu: usize) -> ! {
    if vcpu >= boot().vcpus as usize {
        panic!("vCPU {vcpu} started but the VM has {} vCPUs", boot().vcpus);
    }
    // One vCPU faults, so the failure is deterministic; the others idle.
    if vcpu == 0 && boot().work() == Workload::TripleFault {
        arch::triple_fault();
    }
    with_cpu(vcpu, |cpu| tick::start(vcpu, &mut cpu.tick));
    if vcpu == 0 && boot().work() == Workload::Fuzz {
        crate::fuzz::run(boot().work_units);
    }
    idle(vcpu)
}

/// The next runnable task of `vcpu`, round robin after the current one.
fn pick_next(vcpu: usize) -> Option<usize> {
    let count = TASK_COUNT.load(Ordering::Relaxed) as usize;
    let after = match current(vcpu) {
        NONE => 0,
        current => current + 1,
    };
    (0..count).map(|i| (after + i) % count).find(|&t| {
        TASKS[t].vcpu.load(Ordering::Relaxed) as usize == vcpu && TASKS[t].state.load(Ordering::Acquire) == RUNNABLE
    })
}

/// Runs `task` on return from this trap: its context goes into the trap's `frame`.
fn dispatch(vcpu: usize, task: usize, frame: &mut TrapFrame) {
    make_current(vcpu, task);
    load_frame(task, frame);
}

/// Makes `task` the one running on this vCPU (its run time from now on, a new slice).
fn make_current(vcpu: usize, task: usize) {
    account_run_time(vcpu);
    let switched = with_cpu(vcpu, |cpu| {
        let switched = cpu.current != task;
        cpu.current = task;
        cpu.slice_left = SLICE_TICKS;
        switched
    });
    if switched {
        count(vcpu, |c| c.context_switches += 1);
    }
    TASKS[task].state.store(RUNNING, Ordering::Relaxed);
}

/// The current task stops running (`new_state`); another runnable task of this vCPU
/// takes over in `frame`, or the vCPU goes idle.
fn switch_away(vcpu: usize, frame: &mut TrapFrame, new_state: u32) {
    account_run_time(vcpu);
    let current = current(vcpu);
    save_frame(current, frame);
    TASKS[current].state.store(new_state, Ordering::Release);
    if new_state != RUNNABLE {
        RUNNABLE_ON[vcpu].fetch_sub(1, Ordering::AcqRel);
    }
    match pick_next(vcpu) {
        Some(next) => dispatch(vcpu, next, frame),
        None => idle(vcpu),
    }
}

/// The idle loop: halts until a task of this vCPU is runnable, then enters it.
fn idle(vcpu: usize) -> ! {
    let next_sleeper = load(vcpu).next_sleeper;
    with_cpu(vcpu, |cpu| tick::on_idle(vcpu, &mut cpu.tick, next_sleeper));
    loop {
        if let Some(task) = pick_next(vcpu) {
            let load = load(vcpu);
            with_cpu(vcpu, |cpu| tick::on_busy(vcpu, &mut cpu.tick, load));
            make_current(vcpu, task);
            // SAFETY: interrupts are off, and the frame is the task's saved user context,
            // read in place through a pointer (no reference to it is made): its next
            // write is the trap that leaves the task again.
            unsafe { arch::enter(TASKS[task].frame.0.get()) }
        }
        // Nothing of this vCPU's is borrowed here: the interrupt that ends the halt runs
        // the trap handler, which borrows it.
        let halted_at = arch::rdtsc();
        arch::enable_interrupts_and_halt();
        let halted = arch::rdtsc() - halted_at;
        count(vcpu, |c| c.idle_tsc += halted);
    }
}

/// Every interrupt, exception and system call lands here (from the entry stub).
#[no_mangle]
extern "C" fn trap_entry(frame: &mut TrapFrame) {
    let vcpu = arch::current_vcpu();
    let from_user = frame.is_from_user();
    match frame.vector {
        3 if from_user => system_call(vcpu, frame),
        v if v == LAPIC_TIMER_VECTOR as u64 || v == PARATICK_TICK_VECTOR as u64 => {
            apic::eoi();
            let woke = expire_sleepers(vcpu);
            let load = load(vcpu);
            with_cpu(vcpu, |cpu| tick::on_tick(vcpu, &mut cpu.tick, !from_user, load));
            if from_user {
                account_run_time(vcpu);
                let slice_over = with_cpu(vcpu, |cpu| {
                    cpu.slice_left = cpu.slice_left.saturating_sub(1);
                    cpu.slice_left == 0
                });
                // A sleeper that just woke runs at once (wake-up preemption), so a
                // timer on time means a wake-up on time.
                if (slice_over || woke) && pick_next(vcpu).is_some() {
                    switch_away(vcpu, frame, RUNNABLE);
                } else if slice_over {
                    with_cpu(vcpu, |cpu| cpu.slice_left = SLICE_TICKS);
                }
            }
        }
        v if v == BLOCK_COMPLETION_VECTOR as u64 => {
            apic::eoi();
            complete_io(vcpu);
        }
        v if v == WAKEUP_VECTOR as u64 => apic::eoi(),
        v if v == SPURIOUS_VECTOR as u64 => {}
        vector => {
            let who = if from_user { "task" } else { "kernel" };
            panic!(
                "{who} on vCPU {vcpu}: exception {} at rip {:#x} (error {:#x})",
                exception_name(vector),
                frame.rip,
                frame.error
            );
        }
    }
    // Back to a task (an interrupted idle loop looks for work itself).
    if frame.is_from_user() {
        let load = load(vcpu);
        with_cpu(vcpu, |cpu| tick::after_trap(vcpu, &mut cpu.tick, load));
    }
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        3 => "#BP",
        6 => "#UD",
        8 => "#DF",
        13 => "#GP",
        14 => "#PF",
        _ => "vector",
    }
}

fn system_call(vcpu: usize, frame: &mut TrapFrame) {
    // While the task is still running: the calls below may block or end it.
    account_run_time(vcpu);
    let task = current(vcpu);
    match frame.rax {
        SYS_EXIT => {
            let units = frame.rdi;
            count(vcpu, |c| c.work_units += units);
            leave_barrier();
            if LIVE_TASKS.fetch_sub(1, Ordering::AcqRel) == 1 {
                finish();
            }
            switch_away(vcpu, frame, DONE);
        }
        SYS_BARRIER => arrive_at_barrier(vcpu, frame),
        SYS_SLEEP => {
            let wake = arch::rdtsc() + frame.rdi.saturating_mul(boot().tsc_khz);
            TASKS[task].wake_tsc.store(wake, Ordering::Relaxed);
            SLEEPERS_ON[vcpu].fetch_add(1, Ordering::AcqRel);
            frame.rax = 0;
            switch_away(vcpu, frame, SLEEPING);
        }
        SYS_READ_BLOCK => {
            let request = request_of(task);
            let block = BlockRequest {
                op: BLOCK_OP_READ,
                status: BLOCK_STATUS_PENDING,
                sector: frame.rdi,
                sectors: BLOCK_SECTORS,
                vcpu: vcpu as u32,
                buffer: buffer_of(task),
            };
            // SAFETY: the task's request slot in the I/O area, owned by this task.
            unsafe { core::ptr::write_volatile(request, block) };
            // Blocked before the request is issued, so the completion always finds it.
            TASKS[task].state.store(BLOCKED_IO, Ordering::Release);
            RUNNABLE_ON[vcpu].fetch_sub(1, Ordering::AcqRel);
            arch::outl(BLOCK_REQUEST_PORT, request as u64 as u32);
            save_frame(task, frame);
            match pick_next(vcpu) {
                Some(next) => dispatch(vcpu, next, frame),
                None => idle(vcpu),
            }
        }
        other => panic!("task {task} on vCPU {vcpu}: unknown system call {other}"),
    }
}

/// Wakes this vCPU's sleeping tasks whose time has come (every tick does this);
/// returns whether it woke any.
pub fn expire_sleepers(vcpu: usize) -> bool {
    if SLEEPERS_ON[vcpu].load(Ordering::Acquire) == 0 {
        return false;
    }
    let mut woke = false;
    let now = arch::rdtsc();
    let count = TASK_COUNT.load(Ordering::Relaxed) as usize;
    for task in TASKS.iter().take(count) {
        if task.vcpu.load(Ordering::Relaxed) as usize == vcpu
            && task.state.load(Ordering::Acquire) == SLEEPING
            && task.wake_tsc.load(Ordering::Relaxed) <= now
        {
            SLEEPERS_ON[vcpu].fetch_sub(1, Ordering::AcqRel);
            make_runnable(task);
            woke = true;
        }
    }
    woke
}

/// When this vCPU's next sleeping task wakes, if any: the idle path's next timer event.
fn next_timer_event(vcpu: usize) -> Option<u64> {
    let count = TASK_COUNT.load(Ordering::Relaxed) as usize;
    TASKS
        .iter()
        .take(count)
        .filter(|t| t.vcpu.load(Ordering::Relaxed) as usize == vcpu && t.state.load(Ordering::Acquire) == SLEEPING)
        .map(|t| t.wake_tsc.load(Ordering::Relaxed))
        .min()
}

/// Completes the finished block requests of this vCPU's tasks.
fn complete_io(vcpu: usize) {
    let count = TASK_COUNT.load(Ordering::Relaxed) as usize;
    for (index, task) in TASKS.iter().enumerate().take(count) {
        if task.vcpu.load(Ordering::Relaxed) as usize != vcpu || task.state.load(Ordering::Acquire) != BLOCKED_IO {
            continue;
        }
        // SAFETY: the task's own request slot; the device wrote `status` before raising
        // the completion interrupt.
        let status = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*request_of(index)).status)) };
        if status != BLOCK_STATUS_PENDING {
            // SAFETY: the task's frame, on its own vCPU (see PerVcpu); a field write, no
            // reference.
            unsafe { (*task.frame.0.get()).rax = status as u64 };
            make_runnable(task);
        }
    }
}

const ARRIVED_MASK: u64 = 0xffff_ffff;

fn arrive_at_barrier(vcpu: usize, frame: &mut TrapFrame) {
    let task = current(vcpu);
    // Blocked first: a release racing with us must find the task waiting.
    TASKS[task].state.store(BLOCKED_BARRIER, Ordering::Release);
    RUNNABLE_ON[vcpu].fetch_sub(1, Ordering::AcqRel);
    save_frame(task, frame);
    let now = BARRIER.fetch_add(1, Ordering::AcqRel) + 1;
    if now & ARRIVED_MASK == now >> 32 {
        release_barrier(vcpu, now);
    }
    match pick_next(vcpu) {
        Some(next) => dispatch(vcpu, next, frame),
        None => idle(vcpu),
    }
}

fn leave_barrier() {
    let now = BARRIER.fetch_sub(1 << 32, Ordering::AcqRel) - (1 << 32);
    let arrived = now & ARRIVED_MASK;
    if arrived > 0 && arrived == now >> 32 {
        release_barrier(arch::current_vcpu(), now);
    }
}

/// The last participant arrived: reset the count and wake every waiting task.
fn release_barrier(vcpu: usize, observed: u64) {
    if BARRIER.compare_exchange(observed, observed & !ARRIVED_MASK, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return; // someone else released it
    }
    let mut woken = [false; MAX_VCPUS];
    let count = TASK_COUNT.load(Ordering::Relaxed) as usize;
    for task in TASKS.iter().take(count) {
        if task.state.compare_exchange(BLOCKED_BARRIER, RUNNABLE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let home = task.vcpu.load(Ordering::Relaxed) as usize;
            RUNNABLE_ON[home].fetch_add(1, Ordering::AcqRel);
            woken[home] = true;
        }
    }
    for (target, woken) in woken.iter().enumerate() {
        if *woken && target != vcpu {
            apic::send_ipi(target as u32, WAKEUP_VECTOR);
        }
    }
}

/// The last task exited: the results are complete.
fn finish() {
    // Guest time is right at the end whatever the tick did (no-timer never ticks): from
    // the same TSC reading as the end of the work, which may be many emulated
    // instructions away from a later one.
    let end = arch::rdtsc();
    tick::advance_jiffies(end);
    // SAFETY: results block; every task has exited, so no counter changes any more
    // except ticks, which the VMM reads live anyway.
    unsafe {
        (*results()).end_tsc = end;
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*results()).status), GuestStatus::Done as u32);
    }
    arch::outl(RESULTS_PORT, GuestStatus::Done as u32);
}

/// Records a panic in the results block and tells the VMM; the first panic wins.
pub fn report_panic(info: &core::panic::PanicInfo<'_>) -> ! {
    if !PANICKED.swap(true, Ordering::AcqRel) {
        let mut message = MessageBuffer { bytes: [0; PANIC_MESSAGE_LEN], len: 0 };
        let _ = write!(message, "{}", info.message());
        // SAFETY: results block (see `finish`).
        unsafe {
            (*results()).panic_message = message.bytes;
            (*results()).panic_len = message.len as u32;
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*results()).status), GuestStatus::Panicked as u32);
        }
        arch::outl(RESULTS_PORT, GuestStatus::Panicked as u32);
    }
    arch::halt_forever()
}

struct MessageBuffer {
    bytes: [u8; PANIC_MESSAGE_LEN],
    len: usize,
}

impl core::fmt::Write for MessageBuffer {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let room = PANIC_MESSAGE_LEN - self.len;
        let take = text.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&text.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
