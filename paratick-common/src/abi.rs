//! The paravirtual ABI between the Paratick guest and the host, and the x86 constants
//! (MSRs, LAPIC registers, vectors) that both sides and the observer name.
//!
//! Requests travel over port I/O: on the hosts we run on, `vmcall` does not reach a
//! hypercall handler (see shared/docs/HOST.md), while a port write exits on every backend.

/// Port the guest writes a 32-bit tick request to: the requested rate in Hz for the
/// writing vCPU, or [`TICK_REQUEST_STOP`] to ask for no ticks (the vCPU goes idle).
pub const PARATICK_REQUEST_PORT: u16 = 0x0c50;

/// Tick request value meaning "stop injecting ticks into this vCPU".
pub const TICK_REQUEST_STOP: u32 = 0;

/// Lowest tick rate the host injects; requests below it are clamped up to it.
pub const TICK_RATE_MIN_HZ: u32 = 10;

/// Highest tick rate the host injects; requests above it are clamped down to it.
pub const TICK_RATE_MAX_HZ: u32 = 4000;

/// What the host makes of a guest's tick request value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickRequest {
    /// Stop injecting ticks into the vCPU.
    Stop,
    /// Inject ticks at this rate (already within the supported range).
    Rate {
        /// Rate in force, in Hz.
        hz: u32,
        /// Whether the guest asked for a rate outside the range and was clamped.
        clamped: bool,
    },
}

impl TickRequest {
    /// Decodes a raw request value written to [`PARATICK_REQUEST_PORT`]; out-of-range
    /// rates are clamped to [`TICK_RATE_MIN_HZ`]..=[`TICK_RATE_MAX_HZ`], never rejected,
    /// so a confused guest still gets ticks.
    pub const fn decode(raw: u32) -> TickRequest {
        if raw == TICK_REQUEST_STOP {
            TickRequest::Stop
        } else if raw < TICK_RATE_MIN_HZ {
            TickRequest::Rate { hz: TICK_RATE_MIN_HZ, clamped: true }
        } else if raw > TICK_RATE_MAX_HZ {
            TickRequest::Rate { hz: TICK_RATE_MAX_HZ, clamped: true }
        } else {
            TickRequest::Rate { hz: raw, clamped: false }
        }
    }
}

/// Interrupt vector of the LAPIC timer, the same one Linux uses (`LOCAL_TIMER_VECTOR`),
/// assumed by the observer for guests whose LVT timer programming it has not seen.
pub const LAPIC_TIMER_VECTOR: u8 = 0xec;

/// Interrupt vector of a host-injected paratick tick (235, as in the authors' code).
pub const PARATICK_TICK_VECTOR: u8 = 0xeb;

/// Model-specific registers named by the guest and the observer.
pub mod msr {
    /// IA32_APIC_BASE: LAPIC enable and x2APIC mode bits.
    pub const IA32_APIC_BASE: u32 = 0x1b;
    /// IA32_TSC_DEADLINE: arms the one-shot LAPIC timer in TSC-deadline mode.
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// First x2APIC register MSR; register `r` of the xAPIC page is MSR `0x800 + r / 16`.
    pub const X2APIC_BASE: u32 = 0x800;
    /// x2APIC end-of-interrupt register.
    pub const X2APIC_EOI: u32 = X2APIC_BASE + (super::apic_reg::EOI >> 4);
    /// x2APIC spurious-interrupt vector register.
    pub const X2APIC_SPIV: u32 = X2APIC_BASE + (super::apic_reg::SPIV >> 4);
    /// x2APIC LVT timer register.
    pub const X2APIC_LVTT: u32 = X2APIC_BASE + (super::apic_reg::LVTT >> 4);
    /// x2APIC timer initial-count register.
    pub const X2APIC_TMICT: u32 = X2APIC_BASE + (super::apic_reg::TMICT >> 4);
    /// x2APIC timer divide-configuration register.
    pub const X2APIC_TDCR: u32 = X2APIC_BASE + (super::apic_reg::TDCR >> 4);
    /// x2APIC interrupt-command register (IPIs).
    pub const X2APIC_ICR: u32 = X2APIC_BASE + (super::apic_reg::ICR >> 4);
}

/// LAPIC register offsets, as the `kvm_apic` tracepoint reports them.
pub mod apic_reg {
    /// End of interrupt.
    pub const EOI: u32 = 0xb0;
    /// Spurious-interrupt vector register.
    pub const SPIV: u32 = 0xf0;
    /// Interrupt-command register (low half).
    pub const ICR: u32 = 0x300;
    /// LVT timer register: vector, mask and mode of the LAPIC timer.
    pub const LVTT: u32 = 0x320;
    /// Timer initial count: writing it (re)arms the timer in one-shot/periodic mode.
    pub const TMICT: u32 = 0x380;
    /// Timer divide configuration.
    pub const TDCR: u32 = 0x3e0;
    /// Mask of the vector bits in an LVT register.
    pub const LVT_VECTOR_MASK: u64 = 0xff;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x2apic_msrs_follow_the_xapic_register_layout() {
        assert_eq!(msr::X2APIC_LVTT, 0x832);
        assert_eq!(msr::X2APIC_TMICT, 0x838);
        assert_eq!(msr::X2APIC_EOI, 0x80b);
        assert_eq!(msr::X2APIC_TDCR, 0x83e);
        assert_eq!(msr::X2APIC_ICR, 0x830);
        assert_eq!(msr::X2APIC_SPIV, 0x80f);
    }

    #[test]
    fn tick_requests_are_clamped_into_the_supported_range() {
        assert_eq!(TickRequest::decode(0), TickRequest::Stop);
        assert_eq!(TickRequest::decode(1), TickRequest::Rate { hz: TICK_RATE_MIN_HZ, clamped: true });
        assert_eq!(TickRequest::decode(250), TickRequest::Rate { hz: 250, clamped: false });
        assert_eq!(TickRequest::decode(TICK_RATE_MAX_HZ), TickRequest::Rate { hz: TICK_RATE_MAX_HZ, clamped: false });
        assert_eq!(TickRequest::decode(u32::MAX), TickRequest::Rate { hz: TICK_RATE_MAX_HZ, clamped: true });
    }
}
