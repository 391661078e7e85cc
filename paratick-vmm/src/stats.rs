//! Per-vCPU KVM statistics from the binary stats file (`KVM_GET_STATS_FD`, ioctl 0xce on
//! a vCPU fd; kvm-ioctls has no wrapper). Readable from any thread while the vCPU runs:
//! the injector reads `blocking` (is the vCPU halted?) without a single exit.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header, KVM_STATS_TYPE_MASK};
use kvm_ioctls::VcpuFd;

use crate::kvm_stats::KvmExitCounts;
use crate::VmError;

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;

/// One statistic: where its value lives in the stats file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    name: String,
    /// File offset of its first u64.
    offset: u64,
    /// Number of u64 values (1, or the buckets of a histogram).
    values: u16,
    /// Whether it counts (cumulative) rather than reports a state or a peak.
    cumulative: bool,
}

/// A vCPU's stats file and the layout of its statistics.
#[derive(Debug)]
pub struct VcpuStats {
    file: File,
    stats: Vec<Stat>,
    blocking: Option<usize>,
    /// Where the values start in the file (descriptor offsets are from here, and are
    /// offsets in the kernel's `struct kvm_vcpu_stat`).
    data_offset: u64,
}

impl VcpuStats {
    /// Opens the stats file of a vCPU and reads its descriptors.
    pub fn open(vcpu: &VcpuFd) -> Result<VcpuStats, VmError> {
        // SAFETY: the vCPU fd is open for as long as `vcpu` is borrowed.
        VcpuStats::open_fd(unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) })
    }

    /// Opens the stats file of any KVM vCPU file descriptor (another VMM's, obtained
    /// with `pidfd_getfd`, say).
    pub fn open_fd(vcpu: BorrowedFd<'_>) -> Result<VcpuStats, VmError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd (or -1) that we
        // own; on a descriptor that is not a vCPU it fails with ENOTTY.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD, 0) };
        if fd < 0 {
            return Err(VmError::Stats(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor returned to us above; File takes ownership.
        let file = unsafe { File::from_raw_fd(fd) };
        let (stats, data_offset) = parse(&file)?;
        let blocking = stats.iter().position(|s| s.name == "blocking");
        Ok(VcpuStats { file, stats, blocking, data_offset })
    }

    /// The stats file of a vCPU of a throwaway VM of this process: the descriptors (names,
    /// and offsets in `struct kvm_vcpu_stat`) are the same for every vCPU of the kernel.
    pub fn of_this_kernel() -> Result<VcpuStats, VmError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(VmError::kvm("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
        VcpuStats::open(&vcpu)
    }

    /// Offsets in the kernel's `struct kvm_vcpu_stat` of the named single-valued
    /// statistics (`None` for a name this kernel lacks).
    pub fn offsets_in_kvm_vcpu_stat(&self, names: &[&str]) -> Vec<Option<u32>> {
        names
            .iter()
            .map(|name| {
                let stat = self.stats.iter().find(|s| s.name == *name && s.values == 1)?;
                u32::try_from(stat.offset - self.data_offset).ok()
            })
            .collect()
    }

    /// Every single-valued statistic by name (histograms are summed over buckets).
    pub fn read_all(&self) -> Result<BTreeMap<String, u64>, VmError> {
        let mut out = BTreeMap::new();
        for stat in &self.stats {
            let mut sum = 0u64;
            for i in 0..stat.values as u64 {
                sum = sum.wrapping_add(self.read_u64(stat.offset + 8 * i)?);
            }
            out.insert(stat.name.clone(), sum);
        }
        Ok(out)
    }

    /// The exit statistics.
    pub fn exit_counts(&self) -> Result<KvmExitCounts, VmError> {
        let values = self.read_all()?;
        Ok(KvmExitCounts::from_named(|name| {
            self.stats.iter().any(|s| s.name == name && s.cumulative).then(|| values[name])
        }))
    }

    /// Whether the vCPU is halted in KVM right now; `None` if this kernel lacks the stat.
    pub fn blocking(&self) -> Option<bool> {
        let stat = &self.stats[self.blocking?];
        self.read_u64(stat.offset).ok().map(|v| v != 0)
    }

    fn read_u64(&self, offset: u64) -> Result<u64, VmError> {
        let mut bytes = [0u8; 8];
        self.file.read_exact_at(&mut bytes, offset).map_err(VmError::Stats)?;
        Ok(u64::from_ne_bytes(bytes))
    }
}

fn parse(file: &File) -> Result<(Vec<Stat>, u64), VmError> {
    let mut raw = [0u8; std::mem::size_of::<kvm_stats_header>()];
    file.read_exact_at(&mut raw, 0).map_err(VmError::Stats)?;
    // SAFETY: kvm_stats_header is plain integers; any bytes are a valid value.
    let header: kvm_stats_header = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    let desc_size = std::mem::size_of::<kvm_stats_desc>() + header.name_size as usize;
    let mut descriptors = vec![0u8; desc_size * header.num_desc as usize];
    file.read_exact_at(&mut descriptors, header.desc_offset as u64).map_err(VmError::Stats)?;
    let mut stats = Vec::with_capacity(header.num_desc as usize);
    for chunk in descriptors.chunks_exact(desc_size) {
        let field = |at: usize, len: usize| &chunk[at..at + len];
        let flags = u32::from_ne_bytes(field(0, 4).try_into().expect("4 bytes"));
        let values = u16::from_ne_bytes(field(6, 2).try_into().expect("2 bytes"));
        let offset = u32::from_ne_bytes(field(8, 4).try_into().expect("4 bytes"));
        let name_bytes = &chunk[std::mem::size_of::<kvm_stats_desc>()..];
        let name_len = name_bytes.iter().position(|&b| b == 0).unwrap_or(name_bytes.len());
        stats.push(Stat {
            name: String::from_utf8_lossy(&name_bytes[..name_len]).into_owned(),
            offset: header.data_offset as u64 + offset as u64,
            values,
            cumulative: flags & KVM_STATS_TYPE_MASK == kvm_bindings::KVM_STATS_TYPE_CUMULATIVE,
        });
    }
    Ok((stats, header.data_offset as u64))
}
