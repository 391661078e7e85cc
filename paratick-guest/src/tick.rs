//! The three ways this kernel gets its scheduler tick.
//!
//! - periodic: the LAPIC timer in periodic mode, programmed once, ticking while idle too;
//! - tickless: a one-shot TSC deadline re-armed on every tick while busy, disarmed when
//!   the vCPU goes idle and re-armed when it has work again, on the same tick grid
//!   (Linux's NO_HZ_IDLE restarts the tick at the next period boundary, not a full
//!   period after the wake-up: a vCPU that idles often still ticks while busy);
//! - paratick: one request to the host for ticks at HZ; no timer programming at all.

use paratick_common::abi::{LAPIC_TIMER_VECTOR, PARATICK_REQUEST_PORT};
use paratick_common::guest::{TickMode, Workload, BAD_TICK_REQUESTS};

use crate::apic;
use crate::arch::{outl, rdtsc};
use crate::kernel::{boot, counters, BootExt};

/// Per-vCPU tick state (owned by its vCPU).
pub struct TickState {
    /// Next TSC deadline (tickless).
    next_deadline: u64,
    /// Whether the tickless tick is stopped (the timer disarmed, or armed only for the
    /// next timer event).
    stopped: bool,
    /// Whether the paratick idle path has put the LVT timer in TSC-deadline mode.
    deadline_mode: bool,
}

impl TickState {
    /// A vCPU's state before `start`.
    pub const fn new() -> TickState {
        TickState { next_deadline: 0, stopped: true, deadline_mode: false }
    }
}

fn period_tsc() -> u64 {
    boot().tsc_khz * 1000 / boot().hz as u64
}

/// Sets the tick up on this vCPU.
pub fn start(vcpu: usize, state: &mut TickState) {
    let counters = counters(vcpu);
    match boot().mode() {
        TickMode::Periodic => {
            apic::start_periodic(LAPIC_TIMER_VECTOR, apic::TIMER_COUNTS_PER_SECOND / boot().hz as u64);
            counters.timer_writes += 3;
        }
        TickMode::Tickless => {
            apic::use_tsc_deadline(LAPIC_TIMER_VECTOR);
            counters.timer_writes += 1;
            state.next_deadline = rdtsc() + period_tsc();
            state.stopped = true;
        }
        TickMode::Paratick => {
            if vcpu == 0 && boot().work() == Workload::BadRequests {
                for raw in BAD_TICK_REQUESTS {
                    outl(PARATICK_REQUEST_PORT, raw);
                    counters.tick_requests += 1;
                }
            }
            outl(PARATICK_REQUEST_PORT, boot().hz);
            counters.tick_requests += 1;
        }
    }
}

/// A tick arrived; `idle` says whether it interrupted the idle loop.
pub fn on_tick(vcpu: usize, state: &mut TickState, idle: bool) {
    advance_jiffies();
    let counters = counters(vcpu);
    counters.ticks += 1;
    if idle {
        counters.idle_ticks += 1;
    } else if boot().mode() == TickMode::Tickless && !state.stopped {
        state.next_deadline = next_on_grid(state.next_deadline, rdtsc());
        apic::set_tsc_deadline(state.next_deadline);
        counters.timer_writes += 1;
    }
}

/// Advances guest time to the TSC: jiffies are the whole tick periods since the start.
/// Any vCPU's tick moves it; it never goes back.
fn advance_jiffies() {
    let elapsed = rdtsc().saturating_sub(crate::kernel::start_tsc());
    crate::kernel::jiffies().fetch_max(elapsed / period_tsc(), core::sync::atomic::Ordering::AcqRel);
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

/// The vCPU leaves idle to run a task.
pub fn on_busy(vcpu: usize, state: &mut TickState) {
    if boot().mode() == TickMode::Tickless && state.stopped {
        state.next_deadline = next_on_grid(state.next_deadline, rdtsc());
        apic::set_tsc_deadline(state.next_deadline);
        counters(vcpu).timer_writes += 1;
        state.stopped = false;
    }
}

/// The vCPU has nothing to run; `next_event` is when its next sleeping task wakes.
/// Periodic: the tick goes on (and wakes the sleeper). Tickless: the tick stops, and the
/// timer is armed for the next event or disarmed (Linux NO_HZ_IDLE). Paratick: the host
/// sends a halted vCPU no ticks, so the idle path arms a one-shot timer for the next
/// event, as the authors' kernel does; it never programs the timer while busy.
pub fn on_idle(vcpu: usize, state: &mut TickState, next_event: Option<u64>) {
    let counters = counters(vcpu);
    match (boot().mode(), next_event) {
        (TickMode::Periodic, _) => {}
        (TickMode::Tickless, Some(event)) => {
            apic::set_tsc_deadline(event);
            counters.timer_writes += 1;
            state.stopped = true;
        }
        (TickMode::Tickless, None) => {
            if !state.stopped {
                apic::set_tsc_deadline(0);
                counters.timer_writes += 1;
                state.stopped = true;
            }
        }
        (TickMode::Paratick, Some(event)) => {
            if !state.deadline_mode {
                apic::use_tsc_deadline(LAPIC_TIMER_VECTOR);
                counters.timer_writes += 1;
                state.deadline_mode = true;
            }
            apic::set_tsc_deadline(event);
            counters.timer_writes += 1;
        }
        (TickMode::Paratick, None) => {}
    }
}
