//! `lapic-timer` delivery: the VMM programs a vCPU's own LAPIC timer (KVM_SET_LAPIC) in
//! periodic mode with the paratick vector, its expiries laid on the host tick's instants
//! (see `host_tick`), so that on a busy host CPU each expiry is handled in the host
//! tick's own interrupt and costs the vCPU no exit of its own.
//!
//! KVM starts a periodic timer set through KVM_SET_LAPIC with its first expiry after
//! the saved current count (TMCCT, in ns at divide 1) and every `TMICT` ns after that,
//! on CLOCK_MONOTONIC. The ioctl's own latency shifts the phase, so the phase is read
//! back (KVM reports the time to the next expiry as TMCCT) and corrected.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;
use paratick_common::abi::{apic_reg, PARATICK_TICK_VECTOR};

use crate::host_tick::monotonic_ns;
use crate::injector::TickControl;
use crate::VmError;

/// LVT timer mode bits and mask.
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const LVT_MASKED: u32 = 1 << 16;
/// TDCR value for "divide by 1": one count per ns in KVM.
const TIMER_DIVIDE_BY_1: u32 = 0b1011;
/// The first expiry is at least this far from the programming.
const MIN_LEAD_NS: u64 = 500_000;
/// Phase error accepted, and how often the programming is corrected to get there.
const PHASE_TOLERANCE_NS: i64 = 5_000;
const PHASE_ATTEMPTS: u32 = 4;

fn reg(state: &kvm_lapic_state, offset: u32) -> u32 {
    let at = offset as usize;
    u32::from_le_bytes([
        state.regs[at] as u8,
        state.regs[at + 1] as u8,
        state.regs[at + 2] as u8,
        state.regs[at + 3] as u8,
    ])
}

fn set_reg(state: &mut kvm_lapic_state, offset: u32, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset as usize + i] = byte as _;
    }
}

/// Programs `fd`'s LAPIC timer to tick every `period_ns` (or stops it). Returns the
/// phase error against the host tick's instants, in ns, when the expiries could be laid
/// on them (the period is a multiple of the host's).
pub fn program(fd: &VcpuFd, period_ns: Option<u64>, control: &TickControl) -> Result<Option<i64>, VmError> {
    let mut state = fd.get_lapic().map_err(VmError::kvm("KVM_GET_LAPIC"))?;
    let Some(period) = period_ns else {
        set_reg(&mut state, apic_reg::LVTT, LVT_MASKED | PARATICK_TICK_VECTOR as u32);
        set_reg(&mut state, apic_reg::TMICT, 0);
        set_reg(&mut state, apic_reg::TMCCT, 0);
        fd.set_lapic(&state).map_err(VmError::kvm("KVM_SET_LAPIC"))?;
        return Ok(None);
    };
    // Rates are at least 1 Hz, so a period fits the 32-bit count.
    let period_count = u32::try_from(period).unwrap_or(u32::MAX);
    set_reg(&mut state, apic_reg::LVTT, LVT_TIMER_PERIODIC | PARATICK_TICK_VECTOR as u32);
    set_reg(&mut state, apic_reg::TDCR, TIMER_DIVIDE_BY_1);
    set_reg(&mut state, apic_reg::TMICT, period_count);
    let host = control.host_tick.filter(|host| host.divides(period));
    let mut correction = 0i64;
    let mut error = None;
    for _ in 0..PHASE_ATTEMPTS {
        let now = monotonic_ns();
        let first = match host {
            // A host tick instant at least MIN_LEAD_NS away and at most a period (KVM
            // refuses a first expiry further than that).
            Some(host) => {
                let mut first = (host.next_at_or_after(now + MIN_LEAD_NS) - now) as i64 - correction;
                while first > period as i64 {
                    first -= host.period_ns as i64;
                }
                while first < MIN_LEAD_NS as i64 / 2 {
                    first += host.period_ns as i64;
                }
                first
            }
            None => period as i64,
        };
        set_reg(&mut state, apic_reg::TMCCT, first.clamp(1, period as i64) as u32);
        fd.set_lapic(&state).map_err(VmError::kvm("KVM_SET_LAPIC"))?;
        let Some(host) = host else { return Ok(None) };
        // Where the expiries landed: KVM reports the time to the next one as TMCCT.
        let before = monotonic_ns();
        let readback = fd.get_lapic().map_err(VmError::kvm("KVM_GET_LAPIC"))?;
        let read_at = before + (monotonic_ns() - before) / 2;
        let expiry = read_at + reg(&readback, apic_reg::TMCCT) as u64;
        let half = host.period_ns as i64 / 2;
        let offset = (expiry % host.period_ns) as i64;
        let phase = if offset > half { offset - host.period_ns as i64 } else { offset };
        error = Some(phase);
        if phase.abs() <= PHASE_TOLERANCE_NS {
            break;
        }
        correction += phase;
    }
    Ok(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_little_endian_words_at_their_offsets() {
        let mut state = kvm_lapic_state::default();
        set_reg(&mut state, apic_reg::TMICT, 4_000_000);
        assert_eq!(reg(&state, apic_reg::TMICT), 4_000_000);
        assert_eq!(state.regs[apic_reg::TMICT as usize] as u8, 0x00);
        assert_eq!(state.regs[apic_reg::TMICT as usize + 1] as u8, 0x09);
        assert_eq!(reg(&state, apic_reg::TDCR), 0);
    }
}
