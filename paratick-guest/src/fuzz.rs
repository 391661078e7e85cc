//! The `fuzz` test workload (see `Workload::Fuzz`): random input to the VMM, from the
//! kernel of vCPU 0, so that every port, width and value can be tried.

use paratick_common::abi::{PARATICK_PAGE_PORT, PARATICK_REQUEST_PORT};
use paratick_common::guest::{BlockRequest, BLOCK_REQUEST_PORT, FUZZ_OPERATIONS, GUEST_MEMORY_SIZE, IO_AREA_ADDR};

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

/// Slots for the random block requests, in the I/O area (no task runs in this
/// workload). A request read from anywhere else in guest memory would have the device
/// write its status, or a read's data, over the kernel, as a real disk would: the guest
/// would destroy itself (its page tables, its descriptor tables) before its last access,
/// which tests nothing of the VMM.
const REQUEST_SLOTS: u64 = 16;
/// Where the requests' buffers point: above the slots, so that any transfer (at most the
/// 16 MiB disk) stays in memory nothing else uses.
const BUFFERS_ADDR: u64 = IO_AREA_ADDR + 0x1_0000;

/// A block request of random fields (any operation, sector, length and vCPU) whose
/// buffer is in the I/O area, written to a slot; returns its address.
fn random_block_request(random: &mut Random) -> u32 {
    let slot = IO_AREA_ADDR + random.next() % REQUEST_SLOTS * core::mem::size_of::<BlockRequest>() as u64;
    let small = |value: u64| if value & 1 == 0 { value % 64 } else { value };
    let request = BlockRequest {
        op: (random.next() % 4) as u32,
        status: random.next() as u32,
        sector: small(random.next()),
        sectors: small(random.next()) as u32,
        vcpu: (random.next() % 4) as u32,
        buffer: BUFFERS_ADDR + random.next() % 0x10_0000,
    };
    // SAFETY: the slot is in the I/O area, guest memory this workload gives the device.
    unsafe { core::ptr::write_volatile(slot as *mut BlockRequest, request) };
    slot as u32
}

/// Sends the VMM [`FUZZ_OPERATIONS`] random writes to its ports, then one access it has
/// no device for; never returns (the VMM ends the VM, or the guest panics). Block
/// requests are random requests in the I/O area, or random addresses outside guest
/// memory.
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
        let value = match port {
            BLOCK_REQUEST_PORT if choice & 0x20 != 0 => u64::from(random_block_request(&mut random)),
            BLOCK_REQUEST_PORT => GUEST_MEMORY_SIZE + value % ((1 << 32) - GUEST_MEMORY_SIZE),
            _ => value,
        };
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
