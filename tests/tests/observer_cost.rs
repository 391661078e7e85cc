//! What the observer costs the host, as a guard that a noisy machine cannot flake: counts,
//! not times. On a guest whose kernel code KVM emulates instruction by instruction (this
//! PVM host emulates guest CPL0 code: over a million `kvm_emulate_insn` a second), the
//! observer's programs must run a small fraction as often as KVM emulates: a program on
//! an instruction-rate or page-fault-rate tracepoint would run about once per instruction
//! and fail here. (Its own test binary: no other test's VM runs beside it.)

use std::path::PathBuf;

use paratick_tests::{kvm_unit_test, perf_stat_status, qemu_args, workspace_binary};
use serde_json::Value;

/// At most this share of the emulated instructions: about 0.3% is measured here (the
/// guest's port writes and timer MSR writes), a program per emulated instruction is 100%.
const MAX_RUNS_PER_EMULATED_INSN: f64 = 0.05;

#[test]
fn the_observers_programs_run_a_small_fraction_as_often_as_kvm_emulates_and_count_their_own_runs_exactly() {
    let report_file = std::env::temp_dir().join(format!("paratick-observer-cost-{}.json", std::process::id()));
    let ctl: PathBuf = workspace_binary("paratick-ctl");
    let qemu = qemu_args(&kvm_unit_test("tscdeadline_latency.flat"), "20000000 200");
    let mut command = vec![ctl.to_str().unwrap(), "observe", "--json", "--program-stats", "--output"];
    command.extend([report_file.to_str().unwrap(), "--"]);
    command.extend(qemu.iter().map(String::as_str));
    let (perf, stdout, status) =
        perf_stat_status(&["kvm:kvm_emulate_insn"], &command).expect("perf stat over observe over QEMU");
    assert_eq!(status.code(), Some(1), "QEMU's test passes (isa-debug-exit 1): {stdout}");
    let emulated = perf["kvm:kvm_emulate_insn"];
    assert!(emulated > 1_000_000, "this guard needs a host that emulates guest kernel code (PVM): {emulated}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    let _ = std::fs::remove_file(&report_file);
    let observer = &report["observer"];
    // This kernel's KVM tracepoints are read from their arguments (raw tracepoint
    // programs, no trace record built), but kvm_exit's reason, which is vendor state.
    let programs = &observer["programs"];
    for tracepoint in ["kvm_msr", "kvm_pio", "kvm_userspace_exit", "kvm_apic_accept_irq", "kvm_eoi", "kvm_vcpu_wakeup"]
    {
        assert_eq!(programs[tracepoint], format!("raw_{tracepoint}"), "{programs}");
    }
    assert_eq!(programs["kvm_exit"], "kvm_exit", "{programs}");
    let events = observer["program_events"].as_object().expect("events per program");
    let runs = observer["program_runs"].as_object().expect("runs per program with --program-stats");
    // Two counts of each program's runs, one by the kernel (bpf_prog_info run_cnt, on
    // from before the programs were loaded), one by the programs themselves.
    for (program, stats) in runs {
        assert_eq!(stats["runs"], events[program], "{program}: the kernel's run count against the program's own");
    }
    for program in ["kvm_msr", "kvm_pio", "kvm_userspace_exit", "kvm_vcpu_files", "kvm_vcpu_thread_exit"] {
        assert!(events[program].as_u64().unwrap() > 0, "{program} ran: {observer}");
    }
    let total_runs: u64 = runs.values().map(|s| s["runs"].as_u64().unwrap()).sum();
    assert!(
        (total_runs as f64) < MAX_RUNS_PER_EMULATED_INSN * emulated as f64,
        "{total_runs} program runs against {emulated} emulated instructions: a program on a hot tracepoint? {observer}"
    );
    let run_ns: u64 = runs.values().map(|s| s["run_ns"].as_u64().unwrap()).sum();
    assert!(run_ns > 0, "the kernel timed the runs: {observer}");
}
