//! Loads a guest kernel ELF (64-bit x86-64, static, identity-mapped) into guest memory,
//! parsed by the `object` crate.

use object::elf::FileHeader64;
use object::elf::{EM_X86_64, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};
use object::LittleEndian;
use paratick_common::guest::KERNEL_LOAD_ADDR;

use crate::memory::GuestMemory;
use crate::VmError;

/// Paratick's own guest kernel (paratick-guest, built by build.rs): what
/// [`Vm::start`](crate::Vm::start) runs unless it is given another.
pub static GUEST_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/paratick-guest.elf"));

/// Copies every PT_LOAD segment to its (physical) address and returns the entry point.
/// The segments and the entry must lie in the kernel's area of guest memory
/// (from [`KERNEL_LOAD_ADDR`]).
pub fn load_elf(memory: &GuestMemory, elf: &[u8]) -> Result<u64, VmError> {
    let bad = |why: String| VmError::BadKernel(why);
    // The file header and program headers only: loading needs no sections.
    let header = FileHeader64::<LittleEndian>::parse(elf).map_err(|e| bad(format!("not a 64-bit ELF: {e}")))?;
    let endian = header.endian().map_err(|e| bad(format!("not a little-endian ELF: {e}")))?;
    if header.e_machine(endian) != EM_X86_64 {
        return Err(bad(format!("an ELF for machine {}, not x86-64", header.e_machine(endian))));
    }
    let segments = header.program_headers(endian, elf).map_err(|e| bad(format!("program headers: {e}")))?;
    for segment in segments {
        if segment.p_type(endian) != PT_LOAD {
            continue;
        }
        let (address, memory_size) = (segment.p_paddr(endian), segment.p_memsz(endian));
        let end = address.checked_add(memory_size);
        if address < KERNEL_LOAD_ADDR
            || segment.p_filesz(endian) > memory_size
            || end.is_none_or(|end| end > memory.size())
        {
            return Err(bad(format!("segment at {address:#x}+{memory_size:#x} is outside the kernel's area")));
        }
        let data = segment.data(endian, elf).map_err(|()| bad("a segment runs past the end of the file".into()))?;
        // Fresh guest memory is zero, which is what .bss (memory_size past file_size) needs.
        memory.write(address, data)?;
    }
    let entry = header.e_entry(endian);
    if entry < KERNEL_LOAD_ADDR || entry >= memory.size() {
        return Err(bad(format!("entry point {entry:#x} is outside guest memory")));
    }
    Ok(entry)
}
