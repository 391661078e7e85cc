//! The `fuzz` test workload (see `Workload::Fuzz`): random input to the VMM, from the
//! kernel of vCPU 0, so that every port, width and value can be tried.

use paratick_common::abi::{PARATICK_PAGE_PORT, PARATICK_REQUEST_PORT};
use paratick_common::guest::{BLOCK_REQUEST_PORT, FUZZ_OPERATIONS, GUEST_MEMORY_SIZE};

use crate::arch::{inb, outb, outl, outw, wrmsr};

/// xorshift64*: deterministic per seed, so a failing seed can be run again.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Sends the VMM [`FUZZ_OPERATIONS`] random writes to its ports, then one access it has
/// no device for; never returns (the VMM ends the VM, or the guest panics).
pub fn run(seed: u64) -> ! {
    let mut random = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let ports = [PARATICK_REQUEST_PORT, PARATICK_PAGE_PORT, BLOCK_REQUEST_PORT];
    for _ in 0..FUZZ_OPERATIONS {
        let choice = random.next();
        let port = ports[(choice % ports.len() as u64) as usize];
        let value = random.next();
        // Mostly 32-bit writes (the ABI's width), with small values as often as large
        // ones; sometimes a byte or a word (malformed).
        let value = if choice & 0x10 != 0 { value % 8192 } else { value };
        match (choice >> 8) % 8 {
            0 => outb(port, value as u8),
            1 => outw(port, value as u16),
            _ => outl(port, value as u32),
        }
    }
    let value = random.next();
    match random.next() % 4 {
        0 => outl(0x1000 + (value % 0xe000) as u16, value as u32),
        1 => {
            inb(0x1000 + (value % 0xe000) as u16);
        }
        2 => {
            // Mapped by the kernel's page tables (1 GiB), but not guest memory: MMIO.
            let address = (GUEST_MEMORY_SIZE + value % ((1 << 30) - GUEST_MEMORY_SIZE)) & !7;
            // SAFETY: the address is not memory of this kernel; the write exits to the VMM.
            unsafe { core::ptr::write_volatile(address as *mut u64, value) };
        }
        _ => wrmsr(0x4000_0000 | (value as u32 & 0xffff), value),
    }
    panic!("the VMM took every fuzz input (seed {seed})")
}
