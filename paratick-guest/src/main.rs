//! Paratick's test guest kernel: a small x86-64 kernel whose scheduler tick is
//! periodic, tickless or paratick, running CPU, barrier and block-I/O workloads as CPL3
//! tasks, and reporting ticks, idle time and work done to the VMM.
//!
//! The VMM starts every vCPU at `_start` in 64-bit mode (see paratick_common::guest).
#![no_std]
#![no_main]

mod apic;
mod arch;
mod console;
mod fuzz;
mod kernel;
mod shared;
mod tick;
mod user;

use paratick_common::guest::BootInfo;

core::arch::global_asm!(".section .text.entry", ".global _start", "_start:", "call kmain", "2:", "hlt", "jmp 2b");

#[no_mangle]
extern "C" fn kmain(boot_info: *const BootInfo, vcpu: usize) -> ! {
    if vcpu == 0 {
        arch::build_tables();
        kernel::init(boot_info);
    } else {
        kernel::wait_for_init();
    }
    arch::load_tables(vcpu);
    apic::enable();
    kernel::run(vcpu)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    kernel::report_panic(info)
}
