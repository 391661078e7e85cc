//! Warnings about bad guest input (malformed tick requests, tick pages, block requests).
//! A guest decides how many of those there are, so each VM logs only the first
//! [`GuestWarnings::LOGGED`]: the host's journal cannot be flooded from inside a VM, and
//! the VM's counters still count every one.

use std::sync::atomic::{AtomicU32, Ordering};

/// The bad-input warnings of one VM.
#[derive(Debug)]
pub struct GuestWarnings {
    vm: String,
    seen: AtomicU32,
}

impl GuestWarnings {
    /// How many warnings a VM logs.
    pub const LOGGED: u32 = 20;

    /// The warnings of VM `vm`.
    pub fn new(vm: &str) -> GuestWarnings {
        GuestWarnings { vm: vm.to_string(), seen: AtomicU32::new(0) }
    }

    /// Logs `message` (prefixed with the VM's name) while the budget lasts; says once
    /// when it is spent. Returns whether the message was logged.
    pub fn warn(&self, message: std::fmt::Arguments<'_>) -> bool {
        let seen = self.seen.fetch_add(1, Ordering::Relaxed);
        if seen < Self::LOGGED {
            log::warn!("{}: {message}", self.vm);
        } else if seen == Self::LOGGED {
            log::warn!("{}: further bad guest input is not logged (the VM's counters count it)", self.vm);
        }
        seen < Self::LOGGED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_warnings_are_logged() {
        let warnings = GuestWarnings::new("a");
        let logged = (0..100).filter(|i| warnings.warn(format_args!("bad input {i}"))).count();
        assert_eq!(logged, GuestWarnings::LOGGED as usize);
    }
}
