//! The local APIC in x2APIC mode (all registers are MSRs): enable, timer modes, EOI, IPIs.

use paratick_common::abi::msr;
use paratick_common::guest::SPURIOUS_VECTOR;

use crate::arch::wrmsr;

const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const SPIV_APIC_ENABLED: u64 = 1 << 8;
const LVT_TIMER_PERIODIC: u64 = 1 << 17;
const LVT_TIMER_TSC_DEADLINE: u64 = 2 << 17;
/// TDCR value for "divide by 1".
const TIMER_DIVIDE_BY_1: u64 = 0b1011;
/// KVM's LAPIC timer counts at 1 GHz (one count per APIC bus cycle of 1 ns) with divide 1.
pub const TIMER_COUNTS_PER_SECOND: u64 = 1_000_000_000;

/// Enables the LAPIC in x2APIC mode. The timer stays as reset left it, masked: a
/// paratick guest never writes a timer register.
pub fn enable() {
    let base = crate::arch::rdmsr(msr::IA32_APIC_BASE);
    wrmsr(msr::IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
    wrmsr(msr::X2APIC_SPIV, SPIV_APIC_ENABLED | SPURIOUS_VECTOR as u64);
}

/// Starts the timer in periodic mode: `vector` every `counts` ns. Two register writes.
pub fn start_periodic(vector: u8, counts: u64) {
    wrmsr(msr::X2APIC_TDCR, TIMER_DIVIDE_BY_1);
    wrmsr(msr::X2APIC_LVTT, LVT_TIMER_PERIODIC | vector as u64);
    wrmsr(msr::X2APIC_TMICT, counts);
}

/// Puts the timer in TSC-deadline mode (armed later by [`set_tsc_deadline`]).
pub fn use_tsc_deadline(vector: u8) {
    wrmsr(msr::X2APIC_LVTT, LVT_TIMER_TSC_DEADLINE | vector as u64);
}

/// Arms the one-shot timer for TSC value `deadline`; 0 disarms it.
pub fn set_tsc_deadline(deadline: u64) {
    wrmsr(msr::IA32_TSC_DEADLINE, deadline);
}

/// Signals end of interrupt.
pub fn eoi() {
    wrmsr(msr::X2APIC_EOI, 0);
}

/// Sends a fixed interrupt `vector` to the vCPU with this x2APIC id.
pub fn send_ipi(apic_id: u32, vector: u8) {
    wrmsr(msr::X2APIC_ICR, ((apic_id as u64) << 32) | vector as u64);
}
