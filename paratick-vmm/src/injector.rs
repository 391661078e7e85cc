//! The tick injector: decides, per vCPU, when a paratick tick is due, and delivers it in
//! one of three ways ([`TickDelivery`]).
//!
//! The scheduler rate of a vCPU is what the guest asked for on that vCPU (clamped to the
//! supported range), replaced by the operator's rate for the VM if one is set. A vCPU
//! whose guest asked for no ticks (never, or "stop") gets none, whatever the operator
//! says. A guest that registered a tick page (`paratick_common::abi::TickPage`) is read
//! before every tick, with no exit: no tick while it is idle (even in a halt KVM is still
//! polling), the scheduler rate while it is contended (from one period after the
//! contention began), the guest's housekeeping rate otherwise. A vCPU without a page
//! gets the scheduler rate while KVM does not report it halted (its `blocking` stat).
//!
//! Delivery:
//! - `msi`: this module's thread sends an MSI to the vCPU's x2APIC id through the
//!   in-kernel LAPIC. It polls the pages on the scheduler-period grid, laid on the host
//!   tick's instants when the period is a multiple of the host's, so that its wake-ups
//!   share the timer interrupt the host takes anyway. A vCPU that exits to userspace
//!   takes a due tick on its way back in instead ("ridden").
//! - `lapic-timer`: the vCPU thread programs the vCPU's own LAPIC timer (KVM_SET_LAPIC,
//!   periodic, the paratick vector) at the scheduler rate, its expiries laid on the host
//!   tick's instants; KVM's hrtimer then delivers every tick. The guest never writes the
//!   timer. The rate is reprogrammed when it changes (the vCPU is kicked out of KVM_RUN
//!   for that); idle and contention cannot be followed without exits, so it ticks at the
//!   scheduler rate always (the paper's design).
//! - `ride`: ticks only on userspace exits that happen anyway; no thread, no kick.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use paratick_common::abi::{tick_page, HOUSEKEEPING_RATE_MIN_HZ, PARATICK_TICK_VECTOR};

use crate::host_tick::{monotonic_ns, thread_cpu_time, HostTick};
use crate::memory::GuestMemory;
use crate::stats::VcpuStats;
use crate::VmError;

/// x2APIC/xAPIC MSI address base; the destination APIC id goes in bits 19:12.
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;

/// How often the injector reads the tick pages while none of them shows contention:
/// the longest a contention episode waits to be noticed (its first tick then comes a
/// scheduler period later). Each poll may cost a vCPU an exit (the injector's wake-up
/// preempts it on a 2-CPU host), so this is well below the scheduler rate.
pub const SLOW_POLL_NS: u64 = 50_000_000;

/// How the injector's thread wakes: this long before the host tick instant it aims at,
/// with this much timer slack, so that the wake-up is handled in the host tick's own
/// interrupt however the sleep's start is delayed.
const WAKE_EARLY_NS: u64 = 20_000;
const WAKE_SLACK_NS: u64 = 100_000;

/// Sends a fixed, edge-triggered interrupt `vector` to the vCPU with this APIC id.
pub fn send_msi(vm: &VmFd, apic_id: u32, vector: u8) -> Result<(), kvm_ioctls::Error> {
    let msi = kvm_msi { address_lo: MSI_ADDRESS_BASE | (apic_id << 12), data: vector as u32, ..Default::default() };
    vm.signal_msi(msi).map(|_| ())
}

/// What a guest's tick page says at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageView {
    /// The vCPU is idle.
    pub idle: bool,
    /// The vCPU needs its scheduler tick.
    pub contended: bool,
    /// Counts the contention episodes.
    pub epoch: u32,
    /// The guest's housekeeping rate.
    pub housekeeping_hz: u32,
}

impl PageView {
    /// Reads the page at `gpa` (validated at registration).
    fn read(memory: &GuestMemory, gpa: u64) -> Result<PageView, VmError> {
        let field = |offset| memory.load_u32(gpa + offset);
        Ok(PageView {
            idle: field(tick_page::IDLE)? != 0,
            contended: field(tick_page::CONTENDED)? != 0,
            epoch: field(tick_page::CONTENTION_EPOCH)?,
            housekeeping_hz: field(tick_page::HOUSEKEEPING_HZ)?,
        })
    }
}

/// What the host does about a vCPU's tick at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The guest asked for no ticks.
    NoTicks,
    /// No tick is due.
    NotDue,
    /// A tick is due and claimed: deliver it now.
    Deliver,
    /// A tick would be due, but the vCPU is idle: none is sent.
    SkipIdle,
}

/// How many periods late a tick may be and still be caught up (see `claim_due`).
const CATCH_UP_PERIODS: u64 = 4;

/// No contention episode seen (`VcpuTicks::contention_start_ns`).
const NO_CONTENTION: u64 = u64::MAX;

/// Tick bookkeeping of one vCPU, shared by its vCPU thread and the injector.
#[derive(Debug)]
pub struct VcpuTicks {
    /// Rate the guest asked for on this vCPU (Hz, clamped); 0 = no ticks.
    pub requested_hz: AtomicU32,
    /// Guest-physical address of the vCPU's tick page; 0 = none registered.
    page: AtomicU64,
    /// When the last tick was claimed (ns since the VM started).
    last_tick_ns: AtomicU64,
    /// The contention epoch of the page when last read.
    seen_epoch: AtomicU32,
    /// When the current contention episode was first seen.
    contention_start_ns: AtomicU64,
    /// Consecutive polls that each found a new contention episode: the episodes are
    /// shorter than a poll interval, so they need no tick and no fast polling.
    fresh_episodes: AtomicU32,
    /// The housekeeping period the page asked for when last read (ns; 0 before).
    housekeeping_period_ns: AtomicU64,
    /// Ticks injected by the injector thread.
    pub injected: AtomicU64,
    /// Ticks that rode on a userspace exit's re-entry.
    pub ridden: AtomicU64,
    /// Due ticks not injected because the vCPU was idle.
    pub skipped_idle: AtomicU64,
    /// `lapic-timer` delivery: phase of the expiries against the host tick (ns), if
    /// they are laid on it; `i64::MIN` when not.
    lapic_phase_error_ns: std::sync::atomic::AtomicI64,
}

impl Default for VcpuTicks {
    fn default() -> VcpuTicks {
        VcpuTicks {
            requested_hz: AtomicU32::new(0),
            page: AtomicU64::new(0),
            last_tick_ns: AtomicU64::new(0),
            seen_epoch: AtomicU32::new(0),
            contention_start_ns: AtomicU64::new(NO_CONTENTION),
            fresh_episodes: AtomicU32::new(0),
            housekeeping_period_ns: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            ridden: AtomicU64::new(0),
            skipped_idle: AtomicU64::new(0),
            lapic_phase_error_ns: std::sync::atomic::AtomicI64::new(i64::MIN),
        }
    }
}

impl VcpuTicks {
    /// If a tick is due at `now_ns` for `period_ns`, claims it (so that exactly one of
    /// the injector and the vCPU thread delivers it) and returns true.
    pub fn claim_due(&self, now_ns: u64, period_ns: u64) -> bool {
        let last = self.last_tick_ns.load(Ordering::Acquire);
        if now_ns < last + period_ns {
            return false;
        }
        // Keep the long-run rate: the next period starts at the due time, so ticks missed
        // by a late wake-up of the injector (up to CATCH_UP_PERIODS) are caught up at the
        // next polls; later than that, the period restarts from now.
        let due = last + period_ns;
        let next = if now_ns - due < CATCH_UP_PERIODS * period_ns { due } else { now_ns };
        self.last_tick_ns.compare_exchange(last, next, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The tick page's address, if the guest registered one.
    pub fn page(&self) -> Option<u64> {
        Some(self.page.load(Ordering::Acquire)).filter(|&gpa| gpa != 0)
    }

    /// The rule of the module doc for one vCPU at `now_ns`, given its scheduler period,
    /// what its page says (if it has one) and, for a vCPU without a page, whether KVM
    /// reports it halted. A due tick is claimed up to an eighth of a period early, so
    /// that a poll landing just before the due time does not cost a whole period.
    pub fn decide(
        &self,
        now_ns: u64,
        scheduler_period_ns: u64,
        page: Option<PageView>,
        halted: impl FnOnce() -> bool,
    ) -> Decision {
        let due = |period: u64| self.claim_due(now_ns + period / 8, period);
        match page {
            None if !due(scheduler_period_ns) => Decision::NotDue,
            None if halted() => Decision::SkipIdle,
            None => Decision::Deliver,
            Some(view) if view.idle => {
                self.contention_start_ns.store(NO_CONTENTION, Ordering::Release);
                self.fresh_episodes.store(0, Ordering::Release);
                if due(scheduler_period_ns) {
                    Decision::SkipIdle
                } else {
                    Decision::NotDue
                }
            }
            Some(view) if view.contended => {
                let episode_changed = self.seen_epoch.swap(view.epoch, Ordering::AcqRel) != view.epoch;
                let start = self.contention_start_ns.load(Ordering::Acquire);
                if episode_changed || start == NO_CONTENTION {
                    self.contention_start_ns.store(now_ns, Ordering::Release);
                    self.fresh_episodes.fetch_add(1, Ordering::AcqRel);
                    return Decision::NotDue;
                }
                self.fresh_episodes.store(0, Ordering::Release);
                if now_ns + scheduler_period_ns / 8 >= start + scheduler_period_ns && due(scheduler_period_ns) {
                    Decision::Deliver
                } else {
                    Decision::NotDue
                }
            }
            Some(view) => {
                self.contention_start_ns.store(NO_CONTENTION, Ordering::Release);
                self.fresh_episodes.store(0, Ordering::Release);
                // Never faster than the scheduler rate.
                let housekeeping_period = (1_000_000_000 / view.housekeeping_hz.max(HOUSEKEEPING_RATE_MIN_HZ) as u64)
                    .max(scheduler_period_ns);
                self.housekeeping_period_ns.store(housekeeping_period, Ordering::Release);
                if due(housekeeping_period) {
                    Decision::Deliver
                } else {
                    Decision::NotDue
                }
            }
        }
    }

    /// Whether the injector should poll this vCPU at the scheduler period: the last
    /// decision found it in a contention episode that may last (a first sighting, or one
    /// seen again); not when two polls in a row each found a new, short one.
    fn wants_fast_polls(&self) -> bool {
        self.contention_start_ns.load(Ordering::Acquire) != NO_CONTENTION
            && self.fresh_episodes.load(Ordering::Acquire) <= 1
    }

    /// Records the phase error of the LAPIC timer's programming.
    pub fn set_lapic_phase_error(&self, error_ns: Option<i64>) {
        self.lapic_phase_error_ns.store(error_ns.unwrap_or(i64::MIN), Ordering::Release);
    }

    /// The phase error of the LAPIC timer's expiries against the host tick, if laid on it.
    pub fn lapic_phase_error(&self) -> Option<i64> {
        Some(self.lapic_phase_error_ns.load(Ordering::Acquire)).filter(|&e| e != i64::MIN)
    }

    /// Restarts the period at `now_ns` (the vCPU just asked for ticks).
    pub fn restart(&self, now_ns: u64) {
        self.last_tick_ns.store(now_ns, Ordering::Release);
    }

    /// When the next tick at `period_ns` is due (ns since start).
    fn next_due(&self, period_ns: u64) -> u64 {
        self.last_tick_ns.load(Ordering::Acquire) + period_ns
    }
}

/// State shared by the injector, the vCPU threads and the VM's API.
#[derive(Debug)]
pub struct TickControl {
    /// Per-vCPU tick state.
    pub vcpus: Vec<VcpuTicks>,
    /// Operator's rate for the whole VM (Hz); 0 = follow the guest.
    operator_hz: AtomicU32,
    started: Instant,
    /// CLOCK_MONOTONIC at `started`.
    started_monotonic_ns: u64,
    /// The host's tick, when known: what the injector's wake-ups and the LAPIC timer's
    /// expiries are laid on.
    pub host_tick: Option<HostTick>,
    /// CPU time the injector thread used (ns), recorded when it ends.
    pub injector_cpu_ns: AtomicU64,
    /// Wakes the injector early: a rate changed, or the VM stops.
    wake: (Mutex<bool>, Condvar),
}

impl TickControl {
    /// Tick state for `vcpus` vCPUs, with an optional operator rate.
    pub fn new(vcpus: usize, operator_hz: Option<u32>, host_tick: Option<HostTick>) -> TickControl {
        let started_monotonic_ns = monotonic_ns();
        TickControl {
            vcpus: (0..vcpus).map(|_| VcpuTicks::default()).collect(),
            operator_hz: AtomicU32::new(operator_hz.unwrap_or(0)),
            started: Instant::now(),
            started_monotonic_ns,
            host_tick,
            injector_cpu_ns: AtomicU64::new(0),
            wake: (Mutex::new(false), Condvar::new()),
        }
    }

    /// Nanoseconds since the VM started.
    pub fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// CLOCK_MONOTONIC of an instant given in ns since the VM started.
    pub fn monotonic_of(&self, vm_ns: u64) -> u64 {
        self.started_monotonic_ns + vm_ns
    }

    /// Scheduler rate for a vCPU, in Hz (0 = no ticks).
    pub fn effective_hz(&self, vcpu: usize) -> u32 {
        match (self.vcpus[vcpu].requested_hz.load(Ordering::Acquire), self.operator_hz.load(Ordering::Acquire)) {
            (0, _) => 0,
            (requested, 0) => requested,
            (_, operator) => operator,
        }
    }

    /// The operator's rate, if set.
    pub fn operator_hz(&self) -> Option<u32> {
        Some(self.operator_hz.load(Ordering::Acquire)).filter(|&hz| hz != 0)
    }

    /// Sets (or clears) the operator's rate; the injector applies it at once.
    pub fn set_operator_hz(&self, hz: Option<u32>) {
        self.operator_hz.store(hz.unwrap_or(0), Ordering::Release);
        self.notify();
    }

    /// A guest's request on `vcpu` (already clamped; 0 = stop).
    pub fn set_requested_hz(&self, vcpu: usize, hz: u32) {
        let ticks = &self.vcpus[vcpu];
        if ticks.requested_hz.swap(hz, Ordering::AcqRel) == 0 {
            ticks.restart(self.now_ns());
        }
        self.notify();
    }

    /// Records the tick page `vcpu`'s guest registered (already validated).
    pub fn set_page(&self, vcpu: usize, gpa: u64) {
        self.vcpus[vcpu].page.store(gpa, Ordering::Release);
        self.notify();
    }

    /// Period in ns of the scheduler rate for `vcpu`, if it gets ticks.
    pub fn period_ns(&self, vcpu: usize) -> Option<u64> {
        Some(self.effective_hz(vcpu)).filter(|&hz| hz > 0).map(|hz| 1_000_000_000 / hz as u64)
    }

    /// The decision for `vcpu` now (see [`VcpuTicks::decide`]).
    pub fn decide(
        &self,
        vcpu: usize,
        memory: &GuestMemory,
        halted: impl FnOnce() -> bool,
    ) -> Result<Decision, VmError> {
        let Some(period) = self.period_ns(vcpu) else { return Ok(Decision::NoTicks) };
        let ticks = &self.vcpus[vcpu];
        let page = ticks.page().map(|gpa| PageView::read(memory, gpa)).transpose()?;
        Ok(ticks.decide(self.now_ns(), period, page, halted))
    }

    /// Stops the injector.
    pub fn shut_down(&self) {
        *self.wake.0.lock().expect("injector lock") = true;
        self.wake.1.notify_all();
    }

    fn notify(&self) {
        let _guard = self.wake.0.lock().expect("injector lock");
        self.wake.1.notify_all();
    }

    /// When the injector should look again (ns since start), after a pass at `now`
    /// that found the vCPUs with pages `contended` (per vCPU): the next due tick of a
    /// vCPU without a page; for one with a page, the next scheduler-period poll while it
    /// is contended, else a slow poll (it may become contended at any time) or its next
    /// housekeeping tick, whichever is first. Polls are laid on a host tick instant when
    /// the period allows, so that the wake-up shares the host's timer interrupt.
    fn next_wake(&self, now: u64, contended: &[bool]) -> Option<u64> {
        let mut next = None::<u64>;
        for (index, ticks) in self.vcpus.iter().enumerate() {
            let Some(period) = self.period_ns(index) else { continue };
            let at = match ticks.page() {
                None => ticks.next_due(period).max(now),
                // Behind (a late wake-up): catch up a quarter period from now.
                Some(_) if contended[index] && ticks.next_due(period) <= now => now + period / 4,
                Some(_) if contended[index] => self.next_contended_poll(now, period),
                Some(_) => {
                    let slow_poll = self.on_host_tick(now + SLOW_POLL_NS, period);
                    match ticks.housekeeping_period_ns.load(Ordering::Acquire) {
                        0 => slow_poll,
                        housekeeping => slow_poll.min(ticks.next_due(housekeeping).max(now)),
                    }
                }
            };
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        next
    }

    /// The next poll of a contended vCPU after a pass at `now`: the next host tick
    /// instant (the pass itself ran just after one: the wake-up aims a little early), so
    /// that a pass delayed by most of a period still polls at the very next instant; a
    /// period later where polls cannot be laid on host ticks.
    fn next_contended_poll(&self, now: u64, period: u64) -> u64 {
        match self.host_tick {
            Some(host) if host.divides(period) => self.on_host_tick(now + (period / 8).max(4 * WAKE_EARLY_NS), period),
            _ => now + period / 2,
        }
    }

    /// The first host tick instant at or after `at` (ns since start) if ticks at
    /// `period` can be laid on host ticks, else `at`.
    fn on_host_tick(&self, at: u64, period: u64) -> u64 {
        match self.host_tick {
            Some(host) if host.divides(period) => {
                host.next_at_or_after(self.monotonic_of(at)) - self.started_monotonic_ns
            }
            _ => at,
        }
    }
}

/// Sets the calling thread's timer slack (how late the kernel may fire its timers, so
/// that they can share an interrupt with another timer).
fn set_timer_slack(ns: u64) {
    // Best effort: the default slack (50 us) only makes the ticks a little later.
    let _ = nix::sys::prctl::set_timerslack(ns);
}

/// The injector thread's loop (`msi` delivery): until `shut_down`, sleeps to the next
/// poll or due tick and delivers the due ones. Errors (an MSI the kernel refuses, a page
/// outside guest memory) end the loop with the error.
pub fn run(vm: &VmFd, control: &TickControl, memory: &GuestMemory, stats: &[VcpuStats]) -> Result<(), VmError> {
    /// How long the injector sleeps when no vCPU gets ticks.
    const IDLE_WAIT: Duration = Duration::from_millis(100);
    set_timer_slack(WAKE_SLACK_NS);
    let result = run_loop(vm, control, memory, stats);
    control.injector_cpu_ns.store(thread_cpu_time().as_nanos() as u64, Ordering::Release);
    return result;

    fn run_loop(vm: &VmFd, control: &TickControl, memory: &GuestMemory, stats: &[VcpuStats]) -> Result<(), VmError> {
        let mut stopped = control.wake.0.lock().expect("injector lock");
        let mut contended = vec![false; control.vcpus.len()];
        loop {
            if *stopped {
                return Ok(());
            }
            for (index, ticks) in control.vcpus.iter().enumerate() {
                let decision = control.decide(index, memory, || stats[index].blocking() == Some(true))?;
                contended[index] = ticks.wants_fast_polls();
                match decision {
                    Decision::Deliver => {
                        send_msi(vm, index as u32, PARATICK_TICK_VECTOR).map_err(VmError::kvm("KVM_SIGNAL_MSI"))?;
                        ticks.injected.fetch_add(1, Ordering::Relaxed);
                    }
                    Decision::SkipIdle => {
                        ticks.skipped_idle.fetch_add(1, Ordering::Relaxed);
                    }
                    Decision::NoTicks | Decision::NotDue => {}
                }
            }
            let now = control.now_ns();
            let wait = match control.next_wake(now, &contended) {
                None => IDLE_WAIT,
                Some(at) => Duration::from_nanos(at.saturating_sub(now).saturating_sub(WAKE_EARLY_NS)),
            };
            stopped = control.wake.1.wait_timeout(stopped, wait).expect("injector lock").0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: u64 = 4_000_000;

    #[test]
    fn a_due_tick_is_claimed_once_and_the_rate_is_kept() {
        let ticks = VcpuTicks::default();
        ticks.restart(0);
        assert!(!ticks.claim_due(3_999_999, 4_000_000));
        assert!(ticks.claim_due(4_100_000, 4_000_000), "due");
        assert!(!ticks.claim_due(4_100_000, 4_000_000), "already claimed");
        // The next period starts at the due time (4 ms), not when it was claimed.
        assert!(ticks.claim_due(8_000_000, 4_000_000));
        // Ticks missed by a late poll (due at 12 and 16 ms, polled at 21 ms) are caught up
        // at the next polls.
        assert!(ticks.claim_due(21_000_000, 4_000_000));
        assert!(ticks.claim_due(21_100_000, 4_000_000), "caught up");
        assert!(ticks.claim_due(21_200_000, 4_000_000), "caught up");
        assert!(!ticks.claim_due(21_300_000, 4_000_000));
        // Four periods late or more: restart from now rather than bursting.
        assert!(ticks.claim_due(40_000_000, 4_000_000));
        assert!(!ticks.claim_due(43_000_000, 4_000_000));
        assert!(ticks.claim_due(44_000_000, 4_000_000));
    }

    fn view(idle: bool, contended: bool, epoch: u32) -> Option<PageView> {
        Some(PageView { idle, contended, epoch, housekeeping_hz: 1 })
    }

    /// Decisions at polls every `PERIOD` from `from` for `polls` polls.
    fn deliveries(ticks: &VcpuTicks, from: u64, polls: u64, page: Option<PageView>) -> u64 {
        (1..=polls).filter(|i| ticks.decide(from + i * PERIOD, PERIOD, page, || false) == Decision::Deliver).count()
            as u64
    }

    #[test]
    fn an_idle_vcpu_with_a_page_gets_no_tick_and_its_due_ticks_count_as_skipped() {
        let ticks = VcpuTicks::default();
        ticks.restart(0);
        assert_eq!(ticks.decide(PERIOD, PERIOD, view(true, false, 0), || false), Decision::SkipIdle);
        assert_eq!(ticks.decide(PERIOD + 1, PERIOD, view(true, true, 3), || false), Decision::NotDue);
        assert_eq!(deliveries(&ticks, PERIOD, 250, view(true, true, 3)), 0);
    }

    #[test]
    fn a_contended_vcpu_ticks_at_the_scheduler_rate_from_one_period_after_contention_began() {
        let ticks = VcpuTicks::default();
        ticks.restart(0);
        // First seen contended at 4 ms: nothing yet; the first tick one period later.
        assert_eq!(ticks.decide(PERIOD, PERIOD, view(false, true, 1), || false), Decision::NotDue);
        assert_eq!(ticks.decide(2 * PERIOD, PERIOD, view(false, true, 1), || false), Decision::Deliver);
        // A second of contention: one tick per period.
        assert_eq!(deliveries(&ticks, 2 * PERIOD, 250, view(false, true, 1)), 250);
        // A new episode (the epoch moved on between two polls) starts over.
        assert_eq!(ticks.decide(253 * PERIOD, PERIOD, view(false, true, 2), || false), Decision::NotDue);
    }

    #[test]
    fn short_contention_episodes_cost_no_tick_and_no_fast_polls() {
        let ticks = VcpuTicks::default();
        ticks.restart(0);
        // A first sighting is polled again a period later...
        assert_eq!(ticks.decide(PERIOD, PERIOD, view(false, true, 1), || false), Decision::NotDue);
        assert!(ticks.wants_fast_polls());
        // ...and a new episode then means they are short: back to slow polls.
        assert_eq!(ticks.decide(2 * PERIOD, PERIOD, view(false, true, 2), || false), Decision::NotDue);
        assert!(!ticks.wants_fast_polls());
        // Every poll sees a new episode (the guest's tasks meet at a barrier between).
        let ticked = (3..=250u64)
            .filter(|&i| ticks.decide(i * PERIOD, PERIOD, view(false, true, i as u32), || false) == Decision::Deliver)
            .count();
        assert_eq!(ticked, 0);
        assert!(!ticks.wants_fast_polls());
        // The same episode seen a period later: it lasts, so it ticks and fast polls resume.
        assert_eq!(ticks.decide(251 * PERIOD, PERIOD, view(false, true, 250), || false), Decision::Deliver);
        assert!(ticks.wants_fast_polls());
    }

    #[test]
    fn an_uncontended_vcpu_gets_the_housekeeping_rate() {
        let ticks = VcpuTicks::default();
        ticks.restart(0);
        // 10 s of polls at 250 Hz with a 1 Hz housekeeping rate: 10 ticks.
        assert_eq!(deliveries(&ticks, 0, 2500, view(false, false, 0)), 10);
        let fast = Some(PageView { housekeeping_hz: 10_000, ..PageView::default() });
        assert_eq!(deliveries(&VcpuTicks::default(), 0, 250, fast), 250, "never above the scheduler rate");
    }

    #[test]
    fn without_a_page_a_halted_vcpu_is_skipped_and_a_running_one_ticks() {
        let ticks = VcpuTicks::default();
        ticks.restart(0);
        assert_eq!(ticks.decide(PERIOD, PERIOD, None, || true), Decision::SkipIdle);
        assert_eq!(ticks.decide(2 * PERIOD, PERIOD, None, || false), Decision::Deliver);
        assert_eq!(ticks.decide(2 * PERIOD + 1, PERIOD, None, || false), Decision::NotDue);
    }

    #[test]
    fn page_polls_are_laid_on_host_tick_instants() {
        let control = TickControl::new(1, None, Some(HostTick { period_ns: PERIOD }));
        control.set_requested_hz(0, 250);
        control.set_page(0, 0x2_0000);
        let now = control.now_ns();
        let wake = control.next_wake(now, &[true]).unwrap();
        assert_eq!(control.monotonic_of(wake) % PERIOD, 0, "on a host tick instant");
        assert!(wake > now && wake <= now + PERIOD + PERIOD / 8, "contended: {wake} after {now}");
        // A pass late by most of a period still polls at the very next instant.
        let late =
            control.started_monotonic_ns.div_ceil(PERIOD) * PERIOD + PERIOD * 7 / 10 - control.started_monotonic_ns;
        control.vcpus[0].restart(late);
        let next = control.next_wake(late, &[true]).unwrap();
        assert_eq!(control.monotonic_of(next) - control.monotonic_of(late), PERIOD * 3 / 10, "the next instant");
        // Behind on ticks (a pass far later than the due tick): catch up soon.
        let behind = late + 3 * PERIOD;
        assert_eq!(control.next_wake(behind, &[true]), Some(behind + PERIOD / 4));
        // Not contended, a 1 Hz housekeeping rate: the slow poll comes first.
        control.vcpus[0].housekeeping_period_ns.store(1_000_000_000, Ordering::Release);
        let slow = control.next_wake(now, &[false]).unwrap();
        assert_eq!(control.monotonic_of(slow) % PERIOD, 0, "on a host tick instant");
        assert!(slow >= now + SLOW_POLL_NS && slow <= now + SLOW_POLL_NS + PERIOD, "not contended: {slow} after {now}");
        // A housekeeping rate above the slow poll's is woken for at its own due times.
        control.vcpus[0].restart(now);
        control.vcpus[0].housekeeping_period_ns.store(PERIOD, Ordering::Release);
        assert_eq!(control.next_wake(now, &[false]), Some(now + PERIOD));
    }

    #[test]
    fn the_operator_rate_overrides_the_guest_until_cleared() {
        let control = TickControl::new(2, None, None);
        control.set_requested_hz(0, 250);
        assert_eq!((control.effective_hz(0), control.effective_hz(1)), (250, 0));
        assert_eq!(control.period_ns(0), Some(4_000_000));
        assert_eq!(control.period_ns(1), None);
        control.set_operator_hz(Some(100));
        assert_eq!((control.effective_hz(0), control.effective_hz(1)), (100, 0), "no ticks for a vCPU that asked none");
        assert_eq!(control.operator_hz(), Some(100));
        control.set_operator_hz(None);
        assert_eq!((control.effective_hz(0), control.operator_hz()), (250, None));
    }
}
