//! The paravirtual ABI between the Paratick guest and the host, and the x86 constants
//! (MSRs, LAPIC registers, vectors) that both sides and the observer name.
//!
//! Requests travel over port I/O: on the hosts we run on, `vmcall` does not reach a
//! hypercall handler (see docs/host.md), while a port write exits on every backend.

/// Port the guest writes a 32-bit tick request to: the requested rate in Hz for the
/// writing vCPU, or [`TICK_REQUEST_STOP`] to ask for no ticks (the vCPU goes idle).
pub const PARATICK_REQUEST_PORT: u16 = 0x0c50;

/// Tick request value meaning "stop injecting ticks into this vCPU".
pub const TICK_REQUEST_STOP: u32 = 0;

/// Lowest tick rate the host injects; requests below it are clamped up to it.
pub const TICK_RATE_MIN_HZ: u32 = 10;

/// Highest tick rate the host injects; requests above it are clamped down to it.
pub const TICK_RATE_MAX_HZ: u32 = 4000;

/// The guest's tick rate when none is given (Linux's CONFIG_HZ=250).
pub const TICK_RATE_DEFAULT_HZ: u32 = 250;

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

/// Port the guest writes the guest-physical address of a vCPU's [`TickPage`] to (32-bit,
/// page-aligned), once per vCPU at boot. From then on the guest tells the host through
/// that page, with no exit, whether the vCPU is idle and whether it needs its scheduler
/// tick; the host reads the page before every tick it would send.
pub const PARATICK_PAGE_PORT: u16 = 0x0c5c;

/// Lowest housekeeping tick rate (see [`TickPage::housekeeping_hz`]).
pub const HOUSEKEEPING_RATE_MIN_HZ: u32 = 1;

/// Housekeeping tick rate of our guest unless configured otherwise: the residual tick
/// Linux keeps on a NO_HZ_FULL CPU.
pub const HOUSEKEEPING_RATE_DEFAULT_HZ: u32 = 1;

/// Size of a tick page: one page per vCPU, so that no two vCPUs share a cache line.
pub const TICK_PAGE_SIZE: u64 = 0x1000;

/// [`TickPage::version`] of this ABI.
pub const TICK_PAGE_VERSION: u32 = 1;

/// [`TickPage::host_flags`]: the host delivers ticks with the vCPU's own LAPIC timer,
/// which it programs itself; the guest must leave the timer registers alone.
pub const HOST_FLAG_LAPIC_TIMER: u32 = 1;

/// The page a vCPU shares with the host (at the address written to
/// [`PARATICK_PAGE_PORT`]). Every field is a naturally aligned integer, written by one
/// side only and read with plain atomic loads by the other, so neither side ever needs
/// a lock or an exit to read it.
///
/// The host's rule for a vCPU that registered a page (see `paratick_vmm`'s injector):
/// no tick while `idle` is set; ticks at the scheduler rate (the guest's request, or the
/// operator's) while `contended` is set, the first one period after the contention
/// began (the `contention_epoch` tells a new episode from an ongoing one); otherwise
/// ticks at `housekeeping_hz`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickPage {
    /// Guest: [`TICK_PAGE_VERSION`]; the host ignores a page of another version.
    pub version: u32,
    /// Guest: 1 while the vCPU is idle (set before it halts, cleared when it has work).
    pub idle: u32,
    /// Guest: runnable tasks on this vCPU, the running one included.
    pub runnable: u32,
    /// Guest: 1 while the vCPU needs its scheduler tick (two or more runnable tasks, or a
    /// sleeper whose wake-up the tick must catch).
    pub contended: u32,
    /// Guest: incremented each time `contended` goes from 0 to 1.
    pub contention_epoch: u32,
    /// Guest: tick rate while not contended (timekeeping and accounting only), in Hz.
    pub housekeeping_hz: u32,
    /// Host: `HOST_FLAG_*` bits, written when the page is registered.
    pub host_flags: u32,
    /// Guest: ticks handled on this vCPU (the host may compare with what it sent).
    pub ticks: u32,
}

/// Byte offsets of the [`TickPage`] fields, for the side that reads them atomically.
pub mod tick_page {
    /// `version`.
    pub const VERSION: u64 = 0;
    /// `idle`.
    pub const IDLE: u64 = 4;
    /// `runnable`.
    pub const RUNNABLE: u64 = 8;
    /// `contended`.
    pub const CONTENDED: u64 = 12;
    /// `contention_epoch`.
    pub const CONTENTION_EPOCH: u64 = 16;
    /// `housekeeping_hz`.
    pub const HOUSEKEEPING_HZ: u64 = 20;
    /// `host_flags`.
    pub const HOST_FLAGS: u64 = 24;
    /// `ticks`.
    pub const TICKS: u64 = 28;
}

const _: () = {
    assert!(core::mem::offset_of!(TickPage, idle) as u64 == tick_page::IDLE);
    assert!(core::mem::offset_of!(TickPage, runnable) as u64 == tick_page::RUNNABLE);
    assert!(core::mem::offset_of!(TickPage, contended) as u64 == tick_page::CONTENDED);
    assert!(core::mem::offset_of!(TickPage, contention_epoch) as u64 == tick_page::CONTENTION_EPOCH);
    assert!(core::mem::offset_of!(TickPage, housekeeping_hz) as u64 == tick_page::HOUSEKEEPING_HZ);
    assert!(core::mem::offset_of!(TickPage, host_flags) as u64 == tick_page::HOST_FLAGS);
    assert!(core::mem::offset_of!(TickPage, ticks) as u64 == tick_page::TICKS);
    assert!(core::mem::size_of::<TickPage>() as u64 <= TICK_PAGE_SIZE);
};

/// Why the host refuses a tick page registration (the guest then keeps fixed-rate ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickPageError {
    /// The address is not page-aligned.
    Unaligned,
    /// The page is not inside guest memory (or is page 0).
    OutsideMemory,
    /// The page holds another ABI version.
    Version(u32),
}

impl core::fmt::Display for TickPageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TickPageError::Unaligned => write!(f, "not page-aligned"),
            TickPageError::OutsideMemory => write!(f, "not a page of guest memory"),
            TickPageError::Version(v) => write!(f, "ABI version {v}, not {TICK_PAGE_VERSION}"),
        }
    }
}

/// Checks the address of a tick page registration (as written to
/// [`PARATICK_PAGE_PORT`]) against the guest's memory size; the host reads the page's
/// `version` only once the address passed.
pub const fn check_tick_page_address(gpa: u64, memory_size: u64) -> Result<u64, TickPageError> {
    if !gpa.is_multiple_of(TICK_PAGE_SIZE) {
        Err(TickPageError::Unaligned)
    } else if gpa == 0 || gpa > memory_size || memory_size - gpa < TICK_PAGE_SIZE {
        Err(TickPageError::OutsideMemory)
    } else {
        Ok(gpa)
    }
}

/// Checks the `version` a registered tick page holds.
pub const fn check_tick_page_version(version: u32) -> Result<(), TickPageError> {
    if version == TICK_PAGE_VERSION {
        Ok(())
    } else {
        Err(TickPageError::Version(version))
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
    /// Timer current count: the time left to the next expiry.
    pub const TMCCT: u32 = 0x390;
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
    fn tick_page_registrations_must_be_an_aligned_page_of_guest_memory_of_this_version() {
        let size = 64 << 20;
        assert_eq!(check_tick_page_address(0x2_0000, size), Ok(0x2_0000));
        assert_eq!(check_tick_page_address(0x2_0004, size), Err(TickPageError::Unaligned));
        assert_eq!(check_tick_page_address(0, size), Err(TickPageError::OutsideMemory));
        assert_eq!(check_tick_page_address(size, size), Err(TickPageError::OutsideMemory));
        assert_eq!(check_tick_page_address(!0xfff, size), Err(TickPageError::OutsideMemory));
        assert_eq!(check_tick_page_address(size - TICK_PAGE_SIZE, size), Ok(size - TICK_PAGE_SIZE));
        assert_eq!(check_tick_page_version(TICK_PAGE_VERSION), Ok(()));
        assert_eq!(check_tick_page_version(7), Err(TickPageError::Version(7)));
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
