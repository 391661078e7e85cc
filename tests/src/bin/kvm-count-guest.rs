//! A tiny KVM guest for the observer's end-to-end tests: it makes exactly M writes of the
//! TSC-deadline MSR, then exactly N 32-bit writes to a test port, and stops.
//!
//! Usage: `kvm-count-guest PORT_WRITES TSC_DEADLINE_WRITES`; prints
//! `{"port_writes": N, "tsc_deadline_writes": M}` when the guest has finished.
//!
//! The guest runs in real mode with an in-kernel irqchip, so the MSR writes are handled
//! (and traced) by KVM. Its LVT timer stays masked in one-shot mode, so the deadlines arm
//! nothing: no other MSR, LAPIC or port access happens, and the counts are exact.

use anyhow::{bail, ensure, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use paratick_tests::COUNT_GUEST_PORT;

/// Guest code, assembled from (AT&T, `.code16`):
/// ```text
///   mov $0x6e0, %ecx       ; IA32_TSC_DEADLINE
///   xor %edx, %edx
/// msr_loop:
///   test %ebx, %ebx        ; ebx = writes left
///   jz pio
///   mov %ebx, %eax
///   wrmsr
///   dec %ebx
///   jmp msr_loop
/// pio:
///   mov $0x0c60, %dx       ; COUNT_GUEST_PORT
/// pio_loop:
///   dec %edi               ; edi = writes left; the last write carries 0
///   mov %edi, %eax
///   out %eax, %dx
///   test %edi, %edi
///   jnz pio_loop
/// halt:
///   hlt
///   jmp halt
/// ```
const GUEST_CODE: [u8; 41] = [
    0x66, 0xb9, 0xe0, 0x06, 0x00, 0x00, 0x66, 0x31, 0xd2, 0x66, 0x85, 0xdb, 0x74, 0x09, 0x66, 0x89, 0xd8, 0x0f, 0x30,
    0x66, 0x4b, 0xeb, 0xf2, 0xba, 0x60, 0x0c, 0x66, 0x4f, 0x66, 0x89, 0xf8, 0x66, 0xef, 0x66, 0x85, 0xff, 0x75, 0xf4,
    0xf4, 0xeb, 0xfd,
];
const CODE_ADDRESS: u64 = 0x1000;
const MEMORY_SIZE: usize = 0x10000;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port_writes, tsc_deadline_writes] = args.as_slice() else {
        bail!("usage: kvm-count-guest PORT_WRITES TSC_DEADLINE_WRITES");
    };
    let port_writes: u32 = port_writes.parse().context("PORT_WRITES must be a number")?;
    let tsc_deadline_writes: u32 = tsc_deadline_writes.parse().context("TSC_DEADLINE_WRITES must be a number")?;
    ensure!(port_writes >= 1, "PORT_WRITES must be at least 1: the last write ends the guest");
    assert_eq!(u16::from_le_bytes([GUEST_CODE[24], GUEST_CODE[25]]), COUNT_GUEST_PORT);

    let kvm = Kvm::new().context("open /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;

    // SAFETY: an anonymous private mapping with no address hint; checked for failure below.
    let memory = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEMORY_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    ensure!(memory != libc::MAP_FAILED, "mmap guest memory: {}", std::io::Error::last_os_error());
    // SAFETY: the mapping is MEMORY_SIZE bytes and the code lies inside it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            GUEST_CODE.as_ptr(),
            (memory as *mut u8).add(CODE_ADDRESS as usize),
            GUEST_CODE.len(),
        )
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEMORY_SIZE as u64,
        userspace_addr: memory as u64,
    };
    // SAFETY: the region is backed by our mapping, which lives until the process exits
    // (it is never unmapped), longer than the VM.
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;

    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).context("KVM_GET_SUPPORTED_CPUID")?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rip = CODE_ADDRESS;
    regs.rflags = 0x2;
    regs.rbx = tsc_deadline_writes.into();
    regs.rdi = port_writes.into();
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;

    let mut seen = 0u32;
    loop {
        match vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(COUNT_GUEST_PORT, data) => {
                seen += 1;
                let value = u32::from_le_bytes(data.try_into().context("a 32-bit port write")?);
                if value == 0 {
                    break;
                }
            }
            other => bail!("unexpected exit after {seen} port writes: {other:?}"),
        }
    }
    ensure!(seen == port_writes, "saw {seen} port writes, expected {port_writes}");
    println!("{{\"port_writes\": {seen}, \"tsc_deadline_writes\": {tsc_deadline_writes}}}");
    Ok(())
}
