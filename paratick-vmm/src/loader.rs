//! Loads the guest kernel ELF (64-bit, static, identity-mapped) into guest memory.

use paratick_common::guest::KERNEL_LOAD_ADDR;

use crate::memory::GuestMemory;
use crate::VmError;

/// The guest kernel built by build.rs.
pub static GUEST_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/paratick-guest.elf"));

const PT_LOAD: u32 = 1;

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

/// Copies every PT_LOAD segment to its address and returns the entry point.
pub fn load_elf(memory: &GuestMemory, elf: &[u8]) -> Result<u64, VmError> {
    let bad = |why: &str| VmError::BadKernel(why.to_string());
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) || elf.get(4) != Some(&2) || u16_at(elf, 18) != Some(62) {
        return Err(bad("not a 64-bit x86-64 ELF"));
    }
    let entry = u64_at(elf, 24).ok_or_else(|| bad("truncated header"))?;
    let phoff = u64_at(elf, 32).ok_or_else(|| bad("truncated header"))? as usize;
    let phentsize = u16_at(elf, 54).ok_or_else(|| bad("truncated header"))? as usize;
    let phnum = u16_at(elf, 56).ok_or_else(|| bad("truncated header"))? as usize;
    for index in 0..phnum {
        let header = phoff + index * phentsize;
        if u32_at(elf, header) != Some(PT_LOAD) {
            continue;
        }
        let field = |at| u64_at(elf, header + at).ok_or_else(|| bad("truncated program header"));
        let (offset, address, file_size, memory_size) = (field(8)?, field(16)?, field(32)?, field(40)?);
        let end = address.checked_add(memory_size);
        if address < KERNEL_LOAD_ADDR || file_size > memory_size || end.is_none_or(|end| end > memory.size()) {
            return Err(bad("segment outside the kernel's area of guest memory"));
        }
        let data =
            elf.get(offset as usize..(offset + file_size) as usize).ok_or_else(|| bad("segment past the end"))?;
        // Fresh guest memory is zero, which is what .bss (memory_size past file_size) needs.
        memory.write(address, data)?;
    }
    if entry < KERNEL_LOAD_ADDR || entry >= memory.size() {
        return Err(bad("entry point outside guest memory"));
    }
    Ok(entry)
}
