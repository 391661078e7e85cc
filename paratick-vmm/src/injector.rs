//! The tick injector: delivers the paratick tick vector to each vCPU at the rate in force.
//!
//! The rate in force for a vCPU is what the guest asked for on that vCPU (clamped to the
//! supported range), replaced by the operator's rate for the VM if one is set. A vCPU
//! whose guest asked for no ticks (never, or "stop") gets none, whatever the operator says.
//! A vCPU that is halted in KVM gets no tick (KVM's `blocking` stat, read without an
//! exit): ticks are for busy vCPUs. A vCPU that exits to userspace anyway takes a due
//! tick on its way back in (see `VcpuTicks::claim_due`), with no kick of its own.
//! Ticks are MSIs to the vCPU's x2APIC id, through the in-kernel LAPIC.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use paratick_common::abi::PARATICK_TICK_VECTOR;

use crate::stats::VcpuStats;

/// x2APIC/xAPIC MSI address base; the destination APIC id goes in bits 19:12.
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;

/// Sends a fixed, edge-triggered interrupt `vector` to the vCPU with this APIC id.
pub fn send_msi(vm: &VmFd, apic_id: u32, vector: u8) -> Result<(), kvm_ioctls::Error> {
    let msi = kvm_msi { address_lo: MSI_ADDRESS_BASE | (apic_id << 12), data: vector as u32, ..Default::default() };
    vm.signal_msi(msi).map(|_| ())
}

/// Tick bookkeeping of one vCPU, shared by its vCPU thread and the injector.
#[derive(Debug, Default)]
pub struct VcpuTicks {
    /// Rate the guest asked for on this vCPU (Hz, clamped); 0 = no ticks.
    pub requested_hz: AtomicU32,
    /// When the last tick was injected (ns since the VM started).
    last_tick_ns: AtomicU64,
    /// Ticks injected by the injector thread.
    pub injected: AtomicU64,
    /// Ticks that rode on a userspace exit's re-entry.
    pub ridden: AtomicU64,
    /// Due ticks not injected because the vCPU was halted.
    pub skipped_idle: AtomicU64,
    /// When the last tick was delivered (ns since start; 0 before the first).
    last_delivery_ns: AtomicU64,
    /// Intervals between delivered ticks, in µs (the first `MAX_INTERVALS`).
    intervals_us: std::sync::Mutex<Vec<u32>>,
}

/// How many tick intervals a vCPU keeps (enough for minutes at 1000 Hz).
const MAX_INTERVALS: usize = 1 << 18;

impl VcpuTicks {
    /// If a tick is due at `now_ns` for `period_ns`, claims it (so that exactly one of
    /// the injector and the vCPU thread delivers it) and returns true.
    pub fn claim_due(&self, now_ns: u64, period_ns: u64) -> bool {
        let last = self.last_tick_ns.load(Ordering::Acquire);
        if now_ns < last + period_ns {
            return false;
        }
        // Keep the long-run rate: the next period starts at the due time, unless we are
        // more than a period late (then from now).
        let due = last + period_ns;
        let next = if now_ns - due < period_ns { due } else { now_ns };
        self.last_tick_ns.compare_exchange(last, next, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Records a delivered tick (for the intervals between ticks).
    pub fn delivered(&self, now_ns: u64) {
        let last = self.last_delivery_ns.swap(now_ns, Ordering::AcqRel);
        if last != 0 {
            let mut intervals = self.intervals_us.lock().expect("intervals lock");
            if intervals.len() < MAX_INTERVALS {
                intervals.push(((now_ns.saturating_sub(last)) / 1000).min(u32::MAX as u64) as u32);
            }
        }
    }

    /// Intervals between delivered ticks so far, in µs.
    pub fn intervals_us(&self) -> Vec<u32> {
        self.intervals_us.lock().expect("intervals lock").clone()
    }

    /// Restarts the period at `now_ns` (the vCPU was idle or just asked for ticks).
    pub fn restart(&self, now_ns: u64) {
        self.last_tick_ns.store(now_ns, Ordering::Release);
    }

    /// When the next tick is due (ns since start).
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
    /// Wakes the injector early: a rate changed, or the VM stops.
    wake: (Mutex<bool>, Condvar),
}

impl TickControl {
    /// Tick state for `vcpus` vCPUs, with an optional operator rate.
    pub fn new(vcpus: usize, operator_hz: Option<u32>) -> TickControl {
        TickControl {
            vcpus: (0..vcpus).map(|_| VcpuTicks::default()).collect(),
            operator_hz: AtomicU32::new(operator_hz.unwrap_or(0)),
            started: Instant::now(),
            wake: (Mutex::new(false), Condvar::new()),
        }
    }

    /// Nanoseconds since the VM started.
    pub fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Rate in force for a vCPU, in Hz (0 = no ticks).
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

    /// Period in ns of the rate in force for `vcpu`, if it gets ticks.
    pub fn period_ns(&self, vcpu: usize) -> Option<u64> {
        Some(self.effective_hz(vcpu)).filter(|&hz| hz > 0).map(|hz| 1_000_000_000 / hz as u64)
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
}

/// The injector thread's loop: until `shut_down`, sleeps to the earliest due tick and
/// delivers the due ones. Errors (an MSI the kernel refuses) end the loop with the error.
pub fn run(vm: &VmFd, control: &TickControl, stats: &[VcpuStats]) -> Result<(), kvm_ioctls::Error> {
    /// How long the injector sleeps when no vCPU gets ticks.
    const IDLE_WAIT: Duration = Duration::from_millis(100);
    let mut stopped = control.wake.0.lock().expect("injector lock");
    loop {
        if *stopped {
            return Ok(());
        }
        let now = control.now_ns();
        let mut next_due = u64::MAX;
        for (index, ticks) in control.vcpus.iter().enumerate() {
            let Some(period) = control.period_ns(index) else { continue };
            if ticks.claim_due(now, period) {
                if stats[index].blocking() == Some(true) {
                    ticks.skipped_idle.fetch_add(1, Ordering::Relaxed);
                } else {
                    send_msi(vm, index as u32, PARATICK_TICK_VECTOR)?;
                    ticks.injected.fetch_add(1, Ordering::Relaxed);
                    ticks.delivered(control.now_ns());
                }
            }
            next_due = next_due.min(ticks.next_due(period));
        }
        let wait = match next_due {
            u64::MAX => IDLE_WAIT,
            due => Duration::from_nanos(due.saturating_sub(control.now_ns())),
        };
        stopped = control.wake.1.wait_timeout(stopped, wait).expect("injector lock").0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_tick_is_claimed_once_and_the_rate_is_kept() {
        let ticks = VcpuTicks::default();
        ticks.restart(0);
        assert!(!ticks.claim_due(3_999_999, 4_000_000));
        assert!(ticks.claim_due(4_100_000, 4_000_000), "due");
        assert!(!ticks.claim_due(4_100_000, 4_000_000), "already claimed");
        // The next period starts at the due time (4 ms), not when it was claimed.
        assert!(ticks.claim_due(8_000_000, 4_000_000));
        // More than a period late: restart from now rather than bursting.
        assert!(ticks.claim_due(30_000_000, 4_000_000));
        assert!(!ticks.claim_due(33_000_000, 4_000_000));
        assert!(ticks.claim_due(34_000_000, 4_000_000));
    }

    #[test]
    fn the_operator_rate_overrides_the_guest_until_cleared() {
        let control = TickControl::new(2, None);
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
