//! The five ways this kernel gets its scheduler tick.
//!
//! - periodic: the LAPIC timer in periodic mode, programmed once, ticking while idle too;
//! - tickless: a one-shot TSC deadline re-armed on every tick while busy, disarmed when
//!   the vCPU goes idle and re-armed when it has work again, on the same tick grid
//!   (Linux's NO_HZ_IDLE restarts the tick at the next period boundary, not a full
//!   period after the wake-up: a vCPU that idles often still ticks while busy);
//! - tickless-full: tickless, and while one task is runnable the tick is stopped too,
//!   but for a residual tick a second (and the next sleeper's wake-up), as Linux's
//!   NO_HZ_FULL does; a second runnable task restarts it on the grid;
//! - paratick: one request to the host for ticks at HZ and one registration of the
//!   vCPU's tick page; from then on the guest only writes that page (plain stores, no
//!   exit): idle or not, and whether it needs the scheduler tick (two or more runnable
//!   tasks); the host sends the housekeeping rate otherwise. The guest never programs
//!   its scheduler tick;
//! - no-timer: nothing at all (the floor the bench measures the others against).
//!
//! Paratick and no-timer guests arm a one-shot timer for the next sleeper's wake-up
//! only (on idle, as the authors' idle path does, and while busy, as NO_HZ_FULL does),
//! unless the host owns the LAPIC timer; that is their only timer programming.

use core::sync::atomic::{AtomicU32, Ordering};

use paratick_common::abi::{
    tick_page, HOST_FLAG_LAPIC_TIMER, LAPIC_TIMER_VECTOR, PARATICK_PAGE_PORT, PARATICK_REQUEST_PORT, TICK_PAGE_VERSION,
};
use paratick_common::guest::{
    tick_page_addr, TickMode, Workload, BAD_TICK_PAGES, BAD_TICK_REQUESTS, RESIDUAL_TICK_HZ, TICK_INTERVAL_BINS,
    TICK_INTERVAL_BINS_PER_PERIOD,
};

use crate::apic;
use crate::arch::{outl, rdtsc};
use crate::shared::{boot, count, jiffies, start_tsc, BootExt};

/// Per-vCPU tick state (owned by its vCPU).
pub struct TickState {
    /// Next TSC deadline (tickless, tickless-full).
    next_deadline: u64,
    /// Whether the tickless tick is stopped (the timer disarmed, or armed only for the
    /// next timer event).
    stopped: bool,
    /// Tickless-full: the tick runs at the residual rate (one runnable task).
    residual: bool,
    /// Whether the LVT timer is in TSC-deadline mode (for sleepers).
    deadline_mode: bool,
    /// The sleeper wake-up the one-shot timer is armed for (0: none).
    armed_for: u64,
    /// Paratick: what the page says now.
    contended: bool,
    /// Paratick: the host programs this vCPU's LAPIC timer (hands off).
    host_timer: bool,
    /// TSC of the last tick that found a task running (0: none yet, or idle since).
    last_busy_tick: u64,
}

impl TickState {
    /// A vCPU's state before `start`.
    pub const fn new() -> TickState {
        TickState {
            next_deadline: 0,
            stopped: true,
            residual: false,
            deadline_mode: false,
            armed_for: 0,
            contended: false,
            host_timer: false,
            last_busy_tick: 0,
        }
    }
}

/// What the scheduler tells the tick about a vCPU after each trap.
#[derive(Clone, Copy)]
pub struct Load {
    /// Runnable tasks on the vCPU, the running one included.
    pub runnable: u32,
    /// When its next sleeping task wakes, if any.
    pub next_sleeper: Option<u64>,
}

impl Load {
    /// Whether the vCPU needs its scheduler tick: to share the CPU between tasks.
    fn needs_tick(self) -> bool {
        self.runnable > 1
    }
}

fn period_tsc() -> u64 {
    boot().tsc_khz * 1000 / boot().hz as u64
}

/// One field of this vCPU's tick page (see `paratick_common::abi::TickPage`).
fn page_field(vcpu: usize, offset: u64) -> &'static AtomicU32 {
    // SAFETY: the tick pages are guest memory reserved by the memory map for this; each
    // field is an aligned u32 accessed only atomically, by the guest and the host alike.
    unsafe { AtomicU32::from_ptr((tick_page_addr(vcpu) + offset) as *mut u32) }
}

/// Sets the tick up on this vCPU.
pub fn start(vcpu: usize, state: &mut TickState) {
    match boot().mode() {
        TickMode::Periodic => {
            apic::start_periodic(LAPIC_TIMER_VECTOR, apic::TIMER_COUNTS_PER_SECOND / boot().hz as u64);
            count(vcpu, |c| c.timer_writes += 3);
        }
        TickMode::Tickless | TickMode::TicklessFull => {
            apic::use_tsc_deadline(LAPIC_TIMER_VECTOR);
            count(vcpu, |c| c.timer_writes += 1);
            state.next_deadline = rdtsc() + period_tsc();
            state.stopped = true;
        }
        TickMode::Paratick => {
            page_field(vcpu, tick_page::IDLE).store(1, Ordering::Relaxed);
            page_field(vcpu, tick_page::HOUSEKEEPING_HZ).store(boot().housekeeping_hz, Ordering::Relaxed);
            page_field(vcpu, tick_page::VERSION).store(TICK_PAGE_VERSION, Ordering::Release);
            if vcpu == 0 && boot().work() == Workload::BadRequests {
                for address in BAD_TICK_PAGES {
                    outl(PARATICK_PAGE_PORT, address);
                }
            }
            outl(PARATICK_PAGE_PORT, tick_page_addr(vcpu) as u32);
            state.host_timer =
                page_field(vcpu, tick_page::HOST_FLAGS).load(Ordering::Acquire) & HOST_FLAG_LAPIC_TIMER != 0;
            if vcpu == 0 && boot().work() == Workload::BadRequests {
                for raw in BAD_TICK_REQUESTS {
                    outl(PARATICK_REQUEST_PORT, raw);
                    count(vcpu, |c| c.tick_requests += 1);
                }
            }
            outl(PARATICK_REQUEST_PORT, boot().hz);
            count(vcpu, |c| c.tick_requests += 1);
        }
        TickMode::NoTimer => {}
    }
}

/// A tick arrived; `idle` says whether it interrupted the idle loop.
pub fn on_tick(vcpu: usize, state: &mut TickState, idle: bool, load: Load) {
    let now = rdtsc();
    advance_jiffies(now);
    count(vcpu, |c| c.ticks += 1);
    if idle {
        count(vcpu, |c| c.idle_ticks += 1);
        state.last_busy_tick = 0;
        return;
    }
    if state.last_busy_tick != 0 {
        let bin = (now - state.last_busy_tick) * TICK_INTERVAL_BINS_PER_PERIOD / period_tsc();
        count(vcpu, |c| c.tick_intervals[(bin as usize).min(TICK_INTERVAL_BINS - 1)] += 1);
    }
    state.last_busy_tick = now;
    match boot().mode() {
        TickMode::Tickless if !state.stopped => arm_next_tick(vcpu, state, now, false, None),
        TickMode::TicklessFull if !state.stopped => {
            arm_next_tick(vcpu, state, now, load.runnable <= 1, load.next_sleeper)
        }
        TickMode::Paratick => {
            let ticks = page_field(vcpu, tick_page::TICKS);
            ticks.store(ticks.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Tickless and tickless-full: arms the next tick after `now`, on the tick grid, or
/// the residual tick (or the next sleeper's wake-up, if sooner) when `residual`.
fn arm_next_tick(vcpu: usize, state: &mut TickState, now: u64, residual: bool, next_sleeper: Option<u64>) {
    state.residual = residual;
    state.next_deadline = next_tick_deadline(state, now, residual, next_sleeper);
    apic::set_tsc_deadline(state.next_deadline);
    count(vcpu, |c| c.timer_writes += 1);
}

/// The deadline `arm_next_tick` would arm.
fn next_tick_deadline(state: &TickState, now: u64, residual: bool, next_sleeper: Option<u64>) -> u64 {
    if residual {
        residual_deadline(state.next_deadline, now, next_sleeper)
    } else {
        next_on_grid(state.next_deadline, now)
    }
}

/// Tickless-full's next deadline with one runnable task: the residual tick (a grid
/// point about a second away) or the next sleeper's wake-up, whichever comes first.
fn residual_deadline(previous: u64, now: u64, next_sleeper: Option<u64>) -> u64 {
    let residual = next_on_grid(previous, now + boot().tsc_khz * 1000 / RESIDUAL_TICK_HZ - period_tsc());
    next_sleeper.map_or(residual, |wake| residual.min(wake))
}

/// Advances guest time to the TSC: jiffies are the whole tick periods since the start.
/// Any vCPU's tick moves it; it never goes back.
pub fn advance_jiffies(now: u64) {
    let elapsed = now.saturating_sub(start_tsc());
    jiffies().fetch_max(elapsed / period_tsc(), core::sync::atomic::Ordering::AcqRel);
}

/// The first tick-grid point after `now`, the grid running through `previous` (ticks
/// missed while idle or during a long exit are skipped, not replayed).
fn next_on_grid(previous: u64, now: u64) -> u64 {
    let period = period_tsc();
    match now.checked_sub(previous) {
        None => previous,
        Some(behind) => previous + (behind / period + 1) * period,
    }
}

/// After every trap that returns to a task: the scheduler's view of the vCPU changed
/// (a task woke, blocked or slept). Paratick publishes it; tickless-full restarts its
/// tick when a second task became runnable, or pulls its deadline in for a sleeper.
pub fn after_trap(vcpu: usize, state: &mut TickState, load: Load) {
    match boot().mode() {
        TickMode::Paratick => {
            publish(vcpu, state, load);
            arm_for_sleeper(vcpu, state, load.next_sleeper);
        }
        TickMode::NoTimer => arm_for_sleeper(vcpu, state, load.next_sleeper),
        TickMode::TicklessFull if state.residual && !state.stopped => {
            let (now, residual) = (rdtsc(), load.runnable <= 1);
            if next_tick_deadline(state, now, residual, load.next_sleeper) < state.next_deadline {
                arm_next_tick(vcpu, state, now, residual, load.next_sleeper);
            }
        }
        _ => {}
    }
}

/// Writes whether the vCPU needs its scheduler tick to the tick page (only when it
/// changed: the page is in the host's cache too).
fn publish(vcpu: usize, state: &mut TickState, load: Load) {
    page_field(vcpu, tick_page::RUNNABLE).store(load.runnable, Ordering::Relaxed);
    let contended = load.needs_tick();
    if contended != state.contended {
        if contended {
            let epoch = page_field(vcpu, tick_page::CONTENTION_EPOCH);
            epoch.store(epoch.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
        page_field(vcpu, tick_page::CONTENDED).store(contended as u32, Ordering::Release);
        state.contended = contended;
    }
}

/// The vCPU leaves idle to run a task. (Inlined into the idle loop, its one caller: a
/// call costs some twenty emulated instructions on PVM hosts.)
#[inline(always)]
pub fn on_busy(vcpu: usize, state: &mut TickState, load: Load) {
    match boot().mode() {
        TickMode::Tickless | TickMode::TicklessFull if state.stopped => {
            // Tickless-full with one task restarts straight into its residual tick.
            let residual = boot().mode() == TickMode::TicklessFull && load.runnable <= 1;
            arm_next_tick(vcpu, state, rdtsc(), residual, load.next_sleeper);
            state.stopped = false;
        }
        TickMode::Paratick => {
            publish(vcpu, state, load);
            page_field(vcpu, tick_page::IDLE).store(0, Ordering::Release);
        }
        _ => {}
    }
}

/// The vCPU has nothing to run; `next_event` is when its next sleeping task wakes.
/// Periodic: the tick goes on (and wakes the sleeper). Tickless: the tick stops, and the
/// timer is armed for the next event or disarmed (Linux NO_HZ_IDLE). Paratick: the page
/// says idle, so the host sends no ticks, and the idle path arms a one-shot timer for
/// the next event (unless the host owns the timer); no-timer arms only that.
pub fn on_idle(vcpu: usize, state: &mut TickState, next_event: Option<u64>) {
    state.last_busy_tick = 0;
    let mode = boot().mode();
    if mode == TickMode::Paratick {
        page_field(vcpu, tick_page::IDLE).store(1, Ordering::Release);
        page_field(vcpu, tick_page::RUNNABLE).store(0, Ordering::Relaxed);
    }
    match (mode, next_event) {
        (TickMode::Periodic, _) => {}
        (TickMode::Tickless | TickMode::TicklessFull, Some(event)) => {
            apic::set_tsc_deadline(event);
            count(vcpu, |c| c.timer_writes += 1);
            state.stopped = true;
        }
        (TickMode::Tickless | TickMode::TicklessFull, None) => {
            if !state.stopped {
                apic::set_tsc_deadline(0);
                count(vcpu, |c| c.timer_writes += 1);
                state.stopped = true;
            }
        }
        (TickMode::Paratick | TickMode::NoTimer, next_event) => arm_for_sleeper(vcpu, state, next_event),
    }
}

/// Paratick and no-timer: arms the one-shot timer for the next sleeper's wake-up, if it
/// is not armed for it already (and the host does not own the timer).
fn arm_for_sleeper(vcpu: usize, state: &mut TickState, next_sleeper: Option<u64>) {
    let Some(wake) = next_sleeper else { return };
    if state.host_timer || state.armed_for == wake {
        return;
    }
    if !state.deadline_mode {
        apic::use_tsc_deadline(LAPIC_TIMER_VECTOR);
        count(vcpu, |c| c.timer_writes += 1);
        state.deadline_mode = true;
    }
    apic::set_tsc_deadline(wake);
    count(vcpu, |c| c.timer_writes += 1);
    state.armed_for = wake;
}
