//! Exit-reason names: VMX and SVM `kvm_exit` reasons (told apart by the tracepoint's
//! `isa` field) and the reasons KVM_RUN returns to userspace with (`kvm_userspace_exit`).
//!
//! The names are the kernel's own (`arch/x86/include/uapi/asm/{vmx,svm}.h` and
//! `include/uapi/linux/kvm.h` as printed by the tracepoints), so that our reports read
//! like `perf trace` output. The tables are cross-checked against a real format file in
//! the tests. This is the only place exit reasons are decoded.

/// `isa` value of a `kvm_exit` on an Intel VMX host.
pub const ISA_VMX: u32 = 1;
/// `isa` value of a `kvm_exit` on an AMD SVM host.
pub const ISA_SVM: u32 = 2;

/// Mask of the basic exit reason within a VMX exit reason (the upper bits are flags
/// such as "VM entry failed").
pub const VMX_BASIC_REASON_MASK: u32 = 0xffff;

/// The reason an exit is counted under: the basic reason for VMX, the whole code for SVM.
pub const fn basic_reason(isa: u16, raw: u32) -> u32 {
    if isa as u32 == ISA_VMX {
        raw & VMX_BASIC_REASON_MASK
    } else {
        raw
    }
}

/// Name of an exit reason for the given `isa`, or `None` when the table lacks it
/// (a newer kernel or CPU than we know: callers report the number).
pub fn exit_reason_name(isa: u32, reason: u32) -> Option<&'static str> {
    let table = match isa {
        ISA_VMX => VMX_EXIT_REASONS,
        ISA_SVM => SVM_EXIT_REASONS,
        _ => return None,
    };
    lookup(table, reason)
}

/// Name of a `KVM_EXIT_*` reason returned by KVM_RUN (without the prefix).
pub fn userspace_exit_name(reason: u32) -> Option<&'static str> {
    lookup(KVM_USERSPACE_EXIT_REASONS, reason)
}

fn lookup(table: &'static [(u32, &'static str)], code: u32) -> Option<&'static str> {
    table.binary_search_by_key(&code, |&(c, _)| c).ok().map(|i| table[i].1)
}

/// `KVM_EXIT_*` value of an I/O (port) exit to userspace.
pub const KVM_EXIT_IO: u32 = 2;
/// `KVM_EXIT_*` value of an MMIO exit to userspace.
pub const KVM_EXIT_MMIO: u32 = 6;
/// `KVM_EXIT_*` value of an exit because KVM_RUN was interrupted (signal, kick).
pub const KVM_EXIT_INTR: u32 = 10;

/// VMX basic exit reasons, sorted by code.
pub static VMX_EXIT_REASONS: &[(u32, &str)] = &[
    (0, "EXCEPTION_NMI"),
    (1, "EXTERNAL_INTERRUPT"),
    (2, "TRIPLE_FAULT"),
    (3, "INIT_SIGNAL"),
    (4, "SIPI_SIGNAL"),
    (7, "INTERRUPT_WINDOW"),
    (8, "NMI_WINDOW"),
    (9, "TASK_SWITCH"),
    (10, "CPUID"),
    (12, "HLT"),
    (13, "INVD"),
    (14, "INVLPG"),
    (15, "RDPMC"),
    (16, "RDTSC"),
    (18, "VMCALL"),
    (19, "VMCLEAR"),
    (20, "VMLAUNCH"),
    (21, "VMPTRLD"),
    (22, "VMPTRST"),
    (23, "VMREAD"),
    (24, "VMRESUME"),
    (25, "VMWRITE"),
    (26, "VMOFF"),
    (27, "VMON"),
    (28, "CR_ACCESS"),
    (29, "DR_ACCESS"),
    (30, "IO_INSTRUCTION"),
    (31, "MSR_READ"),
    (32, "MSR_WRITE"),
    (33, "INVALID_STATE"),
    (34, "MSR_LOAD_FAIL"),
    (36, "MWAIT_INSTRUCTION"),
    (37, "MONITOR_TRAP_FLAG"),
    (39, "MONITOR_INSTRUCTION"),
    (40, "PAUSE_INSTRUCTION"),
    (41, "MCE_DURING_VMENTRY"),
    (43, "TPR_BELOW_THRESHOLD"),
    (44, "APIC_ACCESS"),
    (45, "EOI_INDUCED"),
    (46, "GDTR_IDTR"),
    (47, "LDTR_TR"),
    (48, "EPT_VIOLATION"),
    (49, "EPT_MISCONFIG"),
    (50, "INVEPT"),
    (51, "RDTSCP"),
    (52, "PREEMPTION_TIMER"),
    (53, "INVVPID"),
    (54, "WBINVD"),
    (55, "XSETBV"),
    (56, "APIC_WRITE"),
    (57, "RDRAND"),
    (58, "INVPCID"),
    (59, "VMFUNC"),
    (60, "ENCLS"),
    (61, "RDSEED"),
    (62, "PML_FULL"),
    (63, "XSAVES"),
    (64, "XRSTORS"),
    (67, "UMWAIT"),
    (68, "TPAUSE"),
    (74, "BUS_LOCK"),
    (75, "NOTIFY"),
    (77, "TDCALL"),
    (84, "MSR_READ_IMM"),
    (85, "MSR_WRITE_IMM"),
];

/// SVM exit codes, sorted by code (as unsigned 32-bit values).
pub static SVM_EXIT_REASONS: &[(u32, &str)] = &[
    (0x0, "read_cr0"),
    (0x2, "read_cr2"),
    (0x3, "read_cr3"),
    (0x4, "read_cr4"),
    (0x8, "read_cr8"),
    (0x10, "write_cr0"),
    (0x12, "write_cr2"),
    (0x13, "write_cr3"),
    (0x14, "write_cr4"),
    (0x18, "write_cr8"),
    (0x20, "read_dr0"),
    (0x21, "read_dr1"),
    (0x22, "read_dr2"),
    (0x23, "read_dr3"),
    (0x24, "read_dr4"),
    (0x25, "read_dr5"),
    (0x26, "read_dr6"),
    (0x27, "read_dr7"),
    (0x30, "write_dr0"),
    (0x31, "write_dr1"),
    (0x32, "write_dr2"),
    (0x33, "write_dr3"),
    (0x34, "write_dr4"),
    (0x35, "write_dr5"),
    (0x36, "write_dr6"),
    (0x37, "write_dr7"),
    (0x40, "DE excp"),
    (0x41, "DB excp"),
    (0x43, "BP excp"),
    (0x44, "OF excp"),
    (0x45, "BR excp"),
    (0x46, "UD excp"),
    (0x47, "NM excp"),
    (0x48, "DF excp"),
    (0x4a, "TS excp"),
    (0x4b, "NP excp"),
    (0x4c, "SS excp"),
    (0x4d, "GP excp"),
    (0x4e, "PF excp"),
    (0x50, "MF excp"),
    (0x51, "AC excp"),
    (0x52, "MC excp"),
    (0x53, "XF excp"),
    (0x60, "interrupt"),
    (0x61, "nmi"),
    (0x62, "smi"),
    (0x63, "init"),
    (0x64, "vintr"),
    (0x65, "cr0_sel_write"),
    (0x66, "read_idtr"),
    (0x67, "read_gdtr"),
    (0x68, "read_ldtr"),
    (0x69, "read_rt"),
    (0x6a, "write_idtr"),
    (0x6b, "write_gdtr"),
    (0x6c, "write_ldtr"),
    (0x6d, "write_rt"),
    (0x6e, "rdtsc"),
    (0x6f, "rdpmc"),
    (0x70, "pushf"),
    (0x71, "popf"),
    (0x72, "cpuid"),
    (0x73, "rsm"),
    (0x74, "iret"),
    (0x75, "swint"),
    (0x76, "invd"),
    (0x77, "pause"),
    (0x78, "hlt"),
    (0x79, "invlpg"),
    (0x7a, "invlpga"),
    (0x7b, "io"),
    (0x7c, "msr"),
    (0x7d, "task_switch"),
    (0x7e, "ferr_freeze"),
    (0x7f, "shutdown"),
    (0x80, "vmrun"),
    (0x81, "hypercall"),
    (0x82, "vmload"),
    (0x83, "vmsave"),
    (0x84, "stgi"),
    (0x85, "clgi"),
    (0x86, "skinit"),
    (0x87, "rdtscp"),
    (0x88, "icebp"),
    (0x89, "wbinvd"),
    (0x8a, "monitor"),
    (0x8b, "mwait"),
    (0x8d, "xsetbv"),
    (0x8f, "write_efer_trap"),
    (0x90, "write_cr0_trap"),
    (0x94, "write_cr4_trap"),
    (0x98, "write_cr8_trap"),
    (0xa2, "invpcid"),
    (0xa5, "buslock"),
    (0xa6, "idle-halt"),
    (0x400, "npf"),
    (0x401, "avic_incomplete_ipi"),
    (0x402, "avic_unaccelerated_access"),
    (0x403, "vmgexit"),
    (0x80000001, "vmgexit_mmio_read"),
    (0x80000002, "vmgexit_mmio_write"),
    (0x80000003, "vmgexit_nmi_complete"),
    (0x80000004, "vmgexit_ap_hlt_loop"),
    (0x80000005, "vmgexit_ap_jump_table"),
    (0x80000010, "vmgexit_page_state_change"),
    (0x80000011, "vmgexit_guest_request"),
    (0x80000012, "vmgexit_ext_guest_request"),
    (0x80000013, "vmgexit_ap_creation"),
    (0x8000fffd, "vmgexit_hypervisor_feature"),
    (0xffffffff, "invalid_guest_state"),
];

/// `KVM_EXIT_*` reasons returned by KVM_RUN, sorted by code.
pub static KVM_USERSPACE_EXIT_REASONS: &[(u32, &str)] = &[
    (0, "UNKNOWN"),
    (1, "EXCEPTION"),
    (2, "IO"),
    (3, "HYPERCALL"),
    (4, "DEBUG"),
    (5, "HLT"),
    (6, "MMIO"),
    (7, "IRQ_WINDOW_OPEN"),
    (8, "SHUTDOWN"),
    (9, "FAIL_ENTRY"),
    (10, "INTR"),
    (11, "SET_TPR"),
    (12, "TPR_ACCESS"),
    (13, "S390_SIEIC"),
    (14, "S390_RESET"),
    (15, "DCR"),
    (16, "NMI"),
    (17, "INTERNAL_ERROR"),
    (18, "OSI"),
    (19, "PAPR_HCALL"),
    (20, "S390_UCONTROL"),
    (21, "WATCHDOG"),
    (22, "S390_TSCH"),
    (23, "EPR"),
    (24, "SYSTEM_EVENT"),
    (25, "S390_STSI"),
    (26, "IOAPIC_EOI"),
    (27, "HYPERV"),
    (28, "ARM_NISV"),
    (29, "X86_RDMSR"),
    (30, "X86_WRMSR"),
];

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    const KVM_EXIT_FORMAT_6_18: &str = include_str!("../fixtures/linux-6.18/kvm_exit.format");
    const KVM_USERSPACE_EXIT_FORMAT_6_18: &str = include_str!("../fixtures/linux-6.18/kvm_userspace_exit.format");

    /// The `{ code, "NAME" }` pairs of a `__print_symbolic(...)` list, as the kernel prints them.
    fn symbolic_pairs(list: &str) -> Vec<(u32, std::string::String)> {
        let mut pairs = Vec::new();
        for entry in list.split('{').skip(1) {
            let entry = &entry[..entry.find('}').unwrap()];
            let (code, name) = entry.split_once(',').unwrap();
            let code = code.trim();
            let code = match code.split_once('+') {
                Some((base, offset)) => parse_int(base) + parse_int(offset),
                None => parse_int(code),
            };
            // `"KVM_EXIT_" "IO"` is one string to C; our table keeps the bare name.
            let name = name.trim().trim_matches('"').replace("\" \"", "");
            let name = name.strip_prefix("KVM_EXIT_").unwrap_or(&name).to_string();
            pairs.push((code as u32, name));
        }
        pairs
    }

    fn parse_int(text: &str) -> i64 {
        let text = text.trim();
        match text.strip_prefix("0x") {
            Some(hex) => i64::from_str_radix(hex, 16).unwrap(),
            None => text.parse().unwrap(),
        }
    }

    fn assert_table_matches(table: &'static [(u32, &'static str)], kernel: &[(u32, std::string::String)]) {
        assert_eq!(table.len(), kernel.len());
        for (code, name) in kernel {
            let ours = lookup(table, *code);
            assert_eq!(ours, Some(name.as_str()), "code {code:#x}");
        }
    }

    #[test]
    fn tables_are_sorted_for_binary_search() {
        for table in [VMX_EXIT_REASONS, SVM_EXIT_REASONS, KVM_USERSPACE_EXIT_REASONS] {
            assert!(table.windows(2).all(|w| w[0].0 < w[1].0));
        }
    }

    #[test]
    fn vmx_and_svm_tables_match_the_kernel_6_18_print_format() {
        let fmt = KVM_EXIT_FORMAT_6_18;
        let vmx_start = fmt.find("__print_symbolic(REC->exit_reason & 0xffff").unwrap();
        let svm_start = fmt.find(": __print_symbolic(REC->exit_reason,").unwrap();
        let svm_end = fmt[svm_start..].find("})").unwrap() + svm_start + 1;
        assert_table_matches(VMX_EXIT_REASONS, &symbolic_pairs(&fmt[vmx_start..svm_start]));
        assert_table_matches(SVM_EXIT_REASONS, &symbolic_pairs(&fmt[svm_start..svm_end]));
    }

    #[test]
    fn userspace_exit_table_matches_the_kernel_6_18_print_format() {
        let fmt = KVM_USERSPACE_EXIT_FORMAT_6_18;
        let start = fmt.find("__print_symbolic").unwrap();
        assert_table_matches(KVM_USERSPACE_EXIT_REASONS, &symbolic_pairs(&fmt[start..]));
    }

    #[test]
    fn reasons_decode_per_isa() {
        assert_eq!(exit_reason_name(ISA_VMX, 12), Some("HLT"));
        assert_eq!(exit_reason_name(ISA_VMX, 32), Some("MSR_WRITE"));
        assert_eq!(exit_reason_name(ISA_VMX, 52), Some("PREEMPTION_TIMER"));
        assert_eq!(exit_reason_name(ISA_SVM, 0x78), Some("hlt"));
        assert_eq!(exit_reason_name(ISA_SVM, 0x7c), Some("msr"));
        assert_eq!(exit_reason_name(ISA_SVM, 0xffff_ffff), Some("invalid_guest_state"));
        assert_eq!(exit_reason_name(ISA_SVM, 12), None);
        assert_eq!(exit_reason_name(3, 12), None);
        assert_eq!(basic_reason(ISA_VMX as u16, 0x8000_0021), 0x21);
        assert_eq!(basic_reason(ISA_SVM as u16, 0x8000_0001), 0x8000_0001);
        assert_eq!(userspace_exit_name(KVM_EXIT_IO), Some("IO"));
        assert_eq!(userspace_exit_name(KVM_EXIT_INTR), Some("INTR"));
        assert_eq!(userspace_exit_name(KVM_EXIT_MMIO), Some("MMIO"));
    }
}
