//! A virtual block device backed by host memory. The guest writes the address of a
//! `BlockRequest` to the request port (an exit); the device thread copies the data,
//! writes the status, and interrupts the submitting vCPU with the completion vector.
//! Malformed requests (bad op, out-of-range sectors or buffer) complete with an error
//! status and are counted; they never stop the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;

use kvm_ioctls::VmFd;
use paratick_common::guest::{
    BlockRequest, BLOCK_COMPLETION_VECTOR, BLOCK_OP_READ, BLOCK_OP_WRITE, BLOCK_STATUS_ERROR, BLOCK_STATUS_OK,
    SECTOR_SIZE,
};

use crate::guest_input::GuestWarnings;
use crate::injector::send_msi;
use crate::memory::GuestMemory;
use crate::VmError;

/// Size of the memory-backed disk.
pub const DISK_BYTES: u64 = 16 << 20;

/// Device counters.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Requests completed successfully.
    pub completed: AtomicU64,
    /// Requests rejected as malformed.
    pub rejected: AtomicU64,
}

/// The disk's contents: a deterministic pattern, so reads return known data.
pub fn new_disk() -> Vec<u8> {
    (0..DISK_BYTES).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
}

/// Serves requests (guest-physical addresses of `BlockRequest`s) until the channel closes.
pub fn serve(
    requests: Receiver<u64>,
    disk: &mut [u8],
    memory: &GuestMemory,
    vm: &VmFd,
    vcpus: u32,
    counters: &BlockCounters,
    warnings: &GuestWarnings,
) -> Result<(), VmError> {
    for address in requests {
        // A request outside guest memory has nowhere to report its status: counted,
        // logged, and the device goes on serving the others.
        let request: BlockRequest = match memory.read_obj(address) {
            Ok(request) => request,
            Err(why) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                warnings.warn(format_args!("block device: ignored a request at {address:#x}: {why}"));
                continue;
            }
        };
        let status = match transfer(&request, disk, memory) {
            Ok(()) => {
                counters.completed.fetch_add(1, Ordering::Relaxed);
                BLOCK_STATUS_OK
            }
            Err(why) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                warnings.warn(format_args!("block device: rejected request at {address:#x}: {why}"));
                BLOCK_STATUS_ERROR
            }
        };
        if let Err(why) = memory.write_obj(address + std::mem::offset_of!(BlockRequest, status) as u64, &status) {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            warnings.warn(format_args!("block device: cannot complete the request at {address:#x}: {why}"));
            continue;
        }
        if request.vcpu < vcpus {
            send_msi(vm, request.vcpu, BLOCK_COMPLETION_VECTOR).map_err(VmError::kvm("KVM_SIGNAL_MSI"))?;
        } else {
            warnings.warn(format_args!(
                "block device: request at {address:#x} names vCPU {}, which does not exist",
                request.vcpu
            ));
        }
    }
    Ok(())
}

/// Which way a request moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Disk to guest memory.
    Read,
    /// Guest memory to disk.
    Write,
}

/// Checks a guest's request against a disk of `disk_len` bytes: its direction and the
/// disk bytes it covers. Every field is the guest's: nothing is trusted.
fn check(request: &BlockRequest, disk_len: u64) -> Result<(Direction, std::ops::Range<usize>), String> {
    let direction = match request.op {
        BLOCK_OP_READ => Direction::Read,
        BLOCK_OP_WRITE => Direction::Write,
        op => return Err(format!("unknown operation {op}")),
    };
    if request.sectors == 0 {
        return Err("zero sectors".into());
    }
    let start = request.sector.checked_mul(SECTOR_SIZE).ok_or("sector out of range")?;
    let len = request.sectors as u64 * SECTOR_SIZE;
    let end = start.checked_add(len).filter(|&end| end <= disk_len).ok_or("sectors past the end of the disk")?;
    Ok((direction, start as usize..end as usize))
}

fn transfer(request: &BlockRequest, disk: &mut [u8], memory: &GuestMemory) -> Result<(), String> {
    // The guest buffer is checked by guest memory's accessors (bounds, overflow).
    match check(request, disk.len() as u64)? {
        (Direction::Read, range) => memory.write(request.buffer, &disk[range]).map_err(|e| e.to_string()),
        (Direction::Write, range) => memory.read(request.buffer, &mut disk[range]).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(op: u32, sector: u64, sectors: u32) -> BlockRequest {
        BlockRequest { op, sector, sectors, buffer: 0x10_0000, ..BlockRequest::default() }
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let disk = DISK_BYTES;
        let last = disk / SECTOR_SIZE - 1;
        assert_eq!(check(&request(BLOCK_OP_READ, 0, 8), disk), Ok((Direction::Read, 0..4096)));
        assert_eq!(
            check(&request(BLOCK_OP_WRITE, last, 1), disk),
            Ok((Direction::Write, (last * SECTOR_SIZE) as usize..disk as usize))
        );
        assert_eq!(check(&request(7, 0, 1), disk), Err("unknown operation 7".into()));
        assert_eq!(check(&request(BLOCK_OP_READ, 0, 0), disk), Err("zero sectors".into()));
        assert_eq!(check(&request(BLOCK_OP_READ, last, 2), disk), Err("sectors past the end of the disk".into()));
        assert_eq!(check(&request(BLOCK_OP_READ, u64::MAX, 1), disk), Err("sector out of range".into()));
        assert_eq!(
            check(&request(BLOCK_OP_READ, u64::MAX / SECTOR_SIZE, u32::MAX), disk),
            Err("sectors past the end of the disk".into())
        );
    }
}
