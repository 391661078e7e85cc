//! x86-64 plumbing: port I/O, MSRs, TSC, and the descriptor tables (GDT with one TSS
//! per vCPU, IDT) with the interrupt entry path every vector goes through.
//!
//! Every instruction at CPL0 is emulated on PVM hosts (~0.55 µs each), so the entry path
//! is a single common stub and the Rust handler does only what a tick needs.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

use paratick_common::abi::{LAPIC_TIMER_VECTOR, PARATICK_TICK_VECTOR};
use paratick_common::guest::{
    kernel_stack_top, BLOCK_COMPLETION_VECTOR, KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, MAX_VCPUS, SPURIOUS_VECTOR,
    WAKEUP_VECTOR,
};

/// User data segment selector (RPL 3).
pub const USER_DATA_SELECTOR: u16 = 0x18 | 3;
/// User 64-bit code segment selector (RPL 3).
pub const USER_CODE_SELECTOR: u16 = 0x20 | 3;
/// Selector of vCPU 0's TSS; vCPU `i` uses `+ 16 * i`.
const TSS_SELECTOR_BASE: u16 = 0x28;
/// RFLAGS of a fresh user task: interrupts enabled, reserved bit 1.
pub const USER_RFLAGS: u64 = 0x202;

/// Registers saved on entry to the kernel, in the order the entry stub pushes them.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// Whether the trap came from user mode (CPL3).
    pub fn is_from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

// The interrupt entry path. Each stub pushes a dummy error code where the CPU pushes
// none, then its vector, and jumps to the common part, which saves the general
// registers, calls `trap_entry(&mut TrapFrame)` and returns through `trap_return`
// (also used to enter a task from the idle loop).
global_asm!(
    r#"
.macro ISR vector, has_error
    .global isr_\vector
isr_\vector:
    .if \has_error == 0
    push 0
    .endif
    push \vector
    jmp isr_common
.endm

.section .text
isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call trap_entry
    .global trap_return
trap_return:
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .global enter_frame
enter_frame:
    mov rsp, rdi
    jmp trap_return

ISR 0, 0
ISR 1, 0
ISR 2, 0
ISR 3, 0
ISR 4, 0
ISR 5, 0
ISR 6, 0
ISR 7, 0
ISR 8, 1
ISR 9, 0
ISR 10, 1
ISR 11, 1
ISR 12, 1
ISR 13, 1
ISR 14, 1
ISR 15, 0
ISR 16, 0
ISR 17, 1
ISR 18, 0
ISR 19, 0
ISR 20, 0
ISR 21, 1
ISR 22, 0
ISR 23, 0
ISR 24, 0
ISR 25, 0
ISR 26, 0
ISR 27, 0
ISR 28, 0
ISR 29, 1
ISR 30, 1
ISR 31, 0
ISR {block}, 0
ISR {wakeup}, 0
ISR {paratick}, 0
ISR {timer}, 0
ISR {spurious}, 0

.section .rodata
    .global isr_table
    .p2align 3
isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,{block},{wakeup},{paratick},{timer},{spurious}
    .quad \v, isr_\v
    .endr
"#,
    // The device and timer vectors are the ABI's (paratick-common), not literals.
    block = const BLOCK_COMPLETION_VECTOR,
    wakeup = const WAKEUP_VECTOR,
    paratick = const PARATICK_TICK_VECTOR,
    timer = const LAPIC_TIMER_VECTOR,
    spurious = const SPURIOUS_VECTOR,
);

extern "C" {
    /// (vector, handler address) pairs of every stub above.
    static isr_table: [[u64; 2]; ISR_COUNT];
    fn enter_frame(frame: *const TrapFrame) -> !;
}

/// Number of stubs: the 32 exceptions and the five device/timer vectors.
const ISR_COUNT: usize = 37;

/// Leaves the kernel into the context saved in `frame` (a task's user context).
///
/// # Safety
/// Interrupts must be disabled and `frame` must hold a valid user context.
pub unsafe fn enter(frame: *const TrapFrame) -> ! {
    enter_frame(frame)
}

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 5 + 2 * MAX_VCPUS],
    idt: [[u64; 2]; 256],
    tss: [Tss; MAX_VCPUS],
}

struct SharedTables(UnsafeCell<Tables>);
// SAFETY: vCPU 0 writes the tables once (`build_tables`) before any other vCPU reads
// them (they wait for the kernel's init flag); afterwards each vCPU only loads them.
unsafe impl Sync for SharedTables {}

const EMPTY_TSS: Tss = Tss {
    reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: core::mem::size_of::<Tss>() as u16,
};

static TABLES: SharedTables = SharedTables(UnsafeCell::new(Tables {
    gdt: [0; 5 + 2 * MAX_VCPUS],
    idt: [[0; 2]; 256],
    tss: [EMPTY_TSS; MAX_VCPUS],
}));

/// Builds the GDT (kernel and user segments, one TSS per vCPU) and the IDT. vCPU 0 only.
pub fn build_tables() {
    // SAFETY: called once by vCPU 0 before the other vCPUs are released (see SharedTables).
    let tables = unsafe { &mut *TABLES.0.get() };
    tables.gdt[1] = 0x00af_9a00_0000_ffff; // kernel code: 64-bit, DPL0
    tables.gdt[2] = 0x00cf_9200_0000_ffff; // kernel data
    tables.gdt[3] = 0x00cf_f200_0000_ffff; // user data, DPL3
    tables.gdt[4] = 0x00af_fa00_0000_ffff; // user code: 64-bit, DPL3
    for vcpu in 0..MAX_VCPUS {
        tables.tss[vcpu].rsp0 = kernel_stack_top(vcpu);
        let base = &tables.tss[vcpu] as *const Tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, 64-bit available TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        tables.gdt[5 + 2 * vcpu] = low;
        tables.gdt[5 + 2 * vcpu + 1] = base >> 32;
    }
    // SAFETY: isr_table is defined in the assembly above with ISR_COUNT entries.
    for [vector, handler] in unsafe { isr_table } {
        // Interrupt gates (interrupts stay off in the kernel); int3 is the system call
        // and must be reachable from CPL3.
        let dpl: u64 = if vector == 3 { 3 } else { 0 };
        let low = (handler & 0xffff)
            | ((KERNEL_CODE_SELECTOR as u64) << 16)
            | ((0x8e | (dpl << 5)) << 40)
            | (((handler >> 16) & 0xffff) << 48);
        tables.idt[vector as usize] = [low, handler >> 32];
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Loads the GDT, IDT and this vCPU's TSS, and reloads the segment registers.
pub fn load_tables(vcpu: usize) {
    let tables = TABLES.0.get();
    // SAFETY: the tables are built (see SharedTables) and live forever; the selectors
    // name descriptors of that GDT, so reloading the segments keeps the CPU consistent.
    unsafe {
        let gdt = DescriptorPointer {
            limit: (core::mem::size_of::<[u64; 5 + 2 * MAX_VCPUS]>() - 1) as u16,
            base: core::ptr::addr_of!((*tables).gdt) as u64,
        };
        let idt = DescriptorPointer { limit: (256 * 16 - 1) as u16, base: core::ptr::addr_of!((*tables).idt) as u64 };
        asm!("lgdt [{}]", in(reg) &gdt, options(readonly, nostack));
        asm!("lidt [{}]", in(reg) &idt, options(readonly, nostack));
        asm!(
            "mov ds, {data:x}", "mov es, {data:x}", "mov ss, {data:x}",
            data = in(reg) KERNEL_DATA_SELECTOR as u64, options(nostack)
        );
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR_BASE + 16 * vcpu as u16, options(nostack));
    }
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes reach the VMM's devices; they have no memory effects here.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes a 16-bit value to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Writes a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) }
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: only MSRs that exist on every x86-64 KVM guest are read by this kernel.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags)) }
    ((high as u64) << 32) | low as u64
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only the LAPIC's MSRs are written, with values valid for them.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// Reads the time-stamp counter (also allowed at CPL3: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags)) }
    ((high as u64) << 32) | low as u64
}

/// Enables interrupts and halts until one arrives (atomically: `sti` delays interrupts
/// by one instruction, so a wake-up between the caller's check and `hlt` is not lost).
pub fn enable_interrupts_and_halt() {
    // SAFETY: the caller is the idle loop, which expects to be interrupted here.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

/// Loads an empty IDT and raises an exception: #UD cannot be delivered (#GP), nor can
/// that (#DF), nor that: the CPU shuts down. The triple-fault test workload.
pub fn triple_fault() -> ! {
    let empty = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately unrecoverable; this vCPU never runs again.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &empty, options(noreturn)) }
}

/// Stops this vCPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: interrupts off and halt: the vCPU does nothing more.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// This vCPU's index, derived from the kernel stack pointer (no MSR read, no exit).
#[inline(always)]
pub fn current_vcpu() -> usize {
    let rsp: u64;
    // SAFETY: reads the stack pointer.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) }
    ((rsp - paratick_common::guest::KERNEL_STACKS_ADDR) / paratick_common::guest::KERNEL_STACK_SIZE) as usize
}
