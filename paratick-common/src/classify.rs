//! Which recorded events are guest tick requests and which are timer interrupts.
//!
//! A *tick request* is the guest asking for its next tick:
//! - a write of IA32_TSC_DEADLINE (MSR 0x6e0), seen by `kvm_msr`;
//! - a write of the LAPIC timer's initial count or LVT timer register, seen by
//!   `kvm_apic` for both xAPIC (MMIO) and x2APIC (MSR 0x838/0x832) accesses: KVM's x2APIC
//!   MSR path goes through the same register write, which fires `kvm_apic`, so counting
//!   `kvm_msr` for 0x832/0x838 as well would count those writes twice;
//! - a write to the paratick request port of our guest ABI, seen by `kvm_pio`.
//!
//! A *timer interrupt* is the LAPIC accepting (`kvm_apic_accept_irq`) or KVM injecting
//! (`kvm_inj_virq`) the guest's timer vector: the vector it last programmed into its LVT
//! timer register (or [`LAPIC_TIMER_VECTOR`] if the observer never saw it), or, for a
//! guest that has made paratick requests, [`PARATICK_TICK_VECTOR`].

use crate::abi::{apic_reg, msr, LAPIC_TIMER_VECTOR, PARATICK_REQUEST_PORT, PARATICK_TICK_VECTOR};
use crate::event::{EventKind, AUX_WRITE};

/// How a guest asked for a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum TickRequestKind {
    /// A paratick request port write.
    Paratick,
    /// A TSC-deadline MSR write.
    TscDeadline,
    /// A LAPIC timer register write (initial count or LVT timer).
    Lapic,
}

impl TickRequestKind {
    /// Stable name for reports and metric labels.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// The tick request an event of `kind` with this `aux`/`detail` is, if it is one.
pub fn tick_request(kind: EventKind, aux: u16, detail: u32) -> Option<TickRequestKind> {
    if aux != AUX_WRITE {
        return None;
    }
    match kind {
        EventKind::KvmMsr if detail == msr::IA32_TSC_DEADLINE => Some(TickRequestKind::TscDeadline),
        EventKind::KvmApic if detail == apic_reg::TMICT || detail == apic_reg::LVTT => Some(TickRequestKind::Lapic),
        EventKind::KvmPio if detail == PARATICK_REQUEST_PORT as u32 => Some(TickRequestKind::Paratick),
        _ => None,
    }
}

/// Whether an interrupt `vector` delivered to a guest is a timer interrupt, given the
/// LVT timer vector the guest programmed (if seen) and whether it uses paratick.
pub fn is_timer_vector(vector: u32, lvt_timer_vector: Option<u32>, paratick_guest: bool) -> bool {
    vector == lvt_timer_vector.unwrap_or(LAPIC_TIMER_VECTOR as u32)
        || (paratick_guest && vector == PARATICK_TICK_VECTOR as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_requests_are_writes_of_the_timer_registers_and_the_request_port() {
        use TickRequestKind::*;
        assert_eq!(tick_request(EventKind::KvmMsr, 1, 0x6e0), Some(TscDeadline));
        assert_eq!(tick_request(EventKind::KvmMsr, 0, 0x6e0), None, "a read is no request");
        assert_eq!(tick_request(EventKind::KvmApic, 1, 0x380), Some(Lapic));
        assert_eq!(tick_request(EventKind::KvmApic, 1, 0x320), Some(Lapic));
        assert_eq!(tick_request(EventKind::KvmApic, 1, 0xb0), None, "EOI is no request");
        assert_eq!(tick_request(EventKind::KvmPio, 1, 0x0c50), Some(Paratick));
        assert_eq!(tick_request(EventKind::KvmPio, 1, 0x3f8), None);
        // x2APIC timer MSRs are counted through kvm_apic, which fires for them too.
        assert_eq!(tick_request(EventKind::KvmMsr, 1, 0x838), None);
        assert_eq!(tick_request(EventKind::KvmMsr, 1, 0x832), None);
    }

    #[test]
    fn the_timer_vector_is_the_programmed_one_or_linux_default() {
        assert!(is_timer_vector(0xec, None, false));
        assert!(!is_timer_vector(0xec, Some(0xef), false));
        assert!(is_timer_vector(0xef, Some(0xef), false));
        assert!(!is_timer_vector(0xeb, None, false), "0xeb is Linux's posted-MSI vector");
        assert!(is_timer_vector(0xeb, None, true));
    }
}
