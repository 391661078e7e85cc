//! The debug console: bytes to the console port (each one an exit; used for one line at boot).

use paratick_common::guest::CONSOLE_PORT;

/// Writes text to the VMM's console log.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        for byte in text.bytes() {
            crate::arch::outb(CONSOLE_PORT, byte);
        }
        Ok(())
    }
}
