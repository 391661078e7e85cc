//! Guest memory: one anonymous mapping (vm-memory's `GuestMemoryMmap`) registered with
//! KVM, with bounds-checked access from every VMM thread, and the boot-time structures
//! the VMM writes into it.

use std::sync::atomic::Ordering;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use paratick_common::guest::{BOOT_GDT_ADDR, GUEST_MEMORY_SIZE, PAGE_TABLES_ADDR};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::VmError;

/// The guest's physical memory, identity-mapped into this process.
#[derive(Debug)]
pub struct GuestMemory {
    mmap: GuestMemoryMmap<()>,
}

impl GuestMemory {
    /// Maps [`GUEST_MEMORY_SIZE`] bytes and registers them as slot 0 at guest address 0.
    pub fn new(vm: &VmFd) -> Result<GuestMemory, VmError> {
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEMORY_SIZE as usize)])
            .map_err(|source| VmError::Memory { source })?;
        let region = mmap.iter().next().expect("one region");
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is the mapping `mmap` owns; the VmFd is dropped before it
        // (Vm keeps the memory in an Arc that outlives the VM's threads and fd).
        unsafe { vm.set_user_memory_region(region) }.map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(GuestMemory { mmap })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        GUEST_MEMORY_SIZE
    }

    fn outside(address: u64, len: usize) -> VmError {
        VmError::GuestAddress { address, len }
    }

    /// Copies `data` to guest address `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> Result<(), VmError> {
        self.mmap.write_slice(data, GuestAddress(address)).map_err(|_| Self::outside(address, data.len()))
    }

    /// Copies guest memory at `address` into `data`.
    pub fn read(&self, address: u64, data: &mut [u8]) -> Result<(), VmError> {
        let len = data.len();
        self.mmap.read_slice(data, GuestAddress(address)).map_err(|_| Self::outside(address, len))
    }

    /// Atomically loads the aligned u32 at `address` (a field the guest writes
    /// concurrently, such as its tick page's).
    pub fn load_u32(&self, address: u64) -> Result<u32, VmError> {
        self.mmap.load(GuestAddress(address), Ordering::Acquire).map_err(|_| Self::outside(address, 4))
    }

    /// Atomically stores `value` to the aligned u32 at `address` (a field the host
    /// owns in a page the guest reads, such as its tick page's `host_flags`).
    pub fn store_u32(&self, address: u64, value: u32) -> Result<(), VmError> {
        self.mmap.store(value, GuestAddress(address), Ordering::Release).map_err(|_| Self::outside(address, 4))
    }

    /// Writes a plain-data value at `address`.
    pub fn write_obj<T: ByteValued>(&self, address: u64, value: &T) -> Result<(), VmError> {
        self.mmap.write_obj(*value, GuestAddress(address)).map_err(|_| Self::outside(address, size_of::<T>()))
    }

    /// Reads a plain-data value at `address`.
    pub fn read_obj<T: ByteValued>(&self, address: u64) -> Result<T, VmError> {
        self.mmap.read_obj(GuestAddress(address)).map_err(|_| Self::outside(address, size_of::<T>()))
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
        for index in 0..self.size() / (2 << 20) {
            self.write_obj(pd + index * 8, &((index * (2 << 20)) | PRESENT_WRITABLE_USER | HUGE_PAGE))?;
        }
        Ok(())
    }
}
