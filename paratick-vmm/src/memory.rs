//! Guest memory: one anonymous mapping registered with KVM, with bounds-checked access
//! from every VMM thread, and the boot-time structures the VMM writes into it.

use std::sync::atomic::{fence, Ordering};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use paratick_common::guest::{BOOT_GDT_ADDR, GUEST_MEMORY_SIZE, PAGE_TABLES_ADDR};

use crate::VmError;

/// The guest's physical memory, identity-mapped into this process.
#[derive(Debug)]
pub struct GuestMemory {
    base: *mut u8,
    size: usize,
}

// SAFETY: the mapping is owned by this struct and valid until drop; every access goes
// through bounds-checked volatile copies, so sharing it between threads (the vCPUs, the
// injector, the block device) cannot create references to guest-written memory.
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps [`GUEST_MEMORY_SIZE`] bytes and registers them as slot 0 at guest address 0.
    pub fn new(vm: &VmFd) -> Result<GuestMemory, VmError> {
        let size = GUEST_MEMORY_SIZE as usize;
        // SAFETY: an anonymous private mapping at no particular address; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(VmError::Memory(std::io::Error::last_os_error()));
        }
        let memory = GuestMemory { base: base.cast(), size };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: base as u64,
        };
        // SAFETY: the region is our mapping; the VmFd is dropped before the mapping
        // (Vm keeps the memory in an Arc that outlives the VM's threads and fd).
        unsafe { vm.set_user_memory_region(region) }.map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(memory)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    fn check(&self, address: u64, len: usize) -> Result<usize, VmError> {
        let end = address.checked_add(len as u64).filter(|&end| end <= self.size as u64);
        match end {
            Some(_) => Ok(address as usize),
            None => Err(VmError::GuestAddress { address, len }),
        }
    }

    /// Copies `data` to guest address `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> Result<(), VmError> {
        let offset = self.check(address, data.len())?;
        // SAFETY: in bounds (checked); guest memory is plain bytes with no Rust
        // references into it, so a copy cannot alias anything.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(offset), data.len()) };
        fence(Ordering::Release);
        Ok(())
    }

    /// Copies guest memory at `address` into `data`.
    pub fn read(&self, address: u64, data: &mut [u8]) -> Result<(), VmError> {
        let offset = self.check(address, data.len())?;
        fence(Ordering::Acquire);
        // SAFETY: as `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(offset), data.as_mut_ptr(), data.len()) };
        Ok(())
    }

    /// Atomically loads the aligned u32 at `address` (a field the guest writes
    /// concurrently, such as its tick page's).
    pub fn load_u32(&self, address: u64) -> Result<u32, VmError> {
        let offset = self.check(address, 4)?;
        if !address.is_multiple_of(4) {
            return Err(VmError::GuestAddress { address, len: 4 });
        }
        // SAFETY: in bounds and 4-byte aligned (checked); the mapping lives as long as
        // self, and an atomic load of plain guest bytes cannot observe an invalid u32.
        Ok(unsafe { std::sync::atomic::AtomicU32::from_ptr(self.base.add(offset).cast::<u32>()) }
            .load(Ordering::Acquire))
    }

    /// Atomically stores `value` to the aligned u32 at `address` (a field the host
    /// owns in a page the guest reads, such as its tick page's `host_flags`).
    pub fn store_u32(&self, address: u64, value: u32) -> Result<(), VmError> {
        let offset = self.check(address, 4)?;
        if !address.is_multiple_of(4) {
            return Err(VmError::GuestAddress { address, len: 4 });
        }
        // SAFETY: as `load_u32`.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.base.add(offset).cast::<u32>()) }
            .store(value, Ordering::Release);
        Ok(())
    }

    /// Writes a plain-data value (a `#[repr(C)]` struct of integers) at `address`.
    pub fn write_obj<T: Copy>(&self, address: u64, value: &T) -> Result<(), VmError> {
        // SAFETY: T is Copy plain data; viewing it as bytes for the copy is sound.
        let bytes = unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) };
        self.write(address, bytes)
    }

    /// Reads a plain-data value (a `#[repr(C)]` struct of integers, valid for any bytes).
    pub fn read_obj<T: Copy + Default>(&self, address: u64) -> Result<T, VmError> {
        let mut value = T::default();
        // SAFETY: as `write_obj`; callers only use types for which every byte pattern
        // is a valid value (integers and arrays of them).
        let bytes =
            unsafe { std::slice::from_raw_parts_mut((&mut value as *mut T).cast::<u8>(), std::mem::size_of::<T>()) };
        self.read(address, bytes)?;
        Ok(value)
    }

    /// Writes the boot GDT and page tables identity-mapping all of memory with 2 MiB
    /// pages (user-accessible: the guest's tasks live in the same image).
    pub fn write_boot_structures(&self) -> Result<(), VmError> {
        let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
        self.write_obj(BOOT_GDT_ADDR, &gdt)?;
        const PRESENT_WRITABLE_USER: u64 = 0x7;
        const HUGE_PAGE: u64 = 0x80;
        let pml4 = PAGE_TABLES_ADDR;
        let pdpt = pml4 + 0x1000;
        let pd = pdpt + 0x1000;
        self.write_obj(pml4, &(pdpt | PRESENT_WRITABLE_USER))?;
        self.write_obj(pdpt, &(pd | PRESENT_WRITABLE_USER))?;
        for index in 0..self.size as u64 / (2 << 20) {
            self.write_obj(pd + index * 8, &((index * (2 << 20)) | PRESENT_WRITABLE_USER | HUGE_PAGE))?;
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; no access can follow (we own it).
        unsafe { libc::munmap(self.base.cast(), self.size) };
    }
}
