//! End-to-end tests of the VMM and the guest kernel on real /dev/kvm (as root).
//!
//! VMs run one at a time (`one_vm_at_a_time`).

use std::process::Command;
use std::time::{Duration, Instant};

use paratick_common::guest::{TickMode, Workload};
use paratick_tests::{one_vm_at_a_time, workspace_binary};
use paratick_vmm::{RunReport, Vm, VmConfig, VmError, WorkAmount};
use serde_json::Value;

fn config(mode: TickMode, workload: Workload, vcpus: u32, amount: WorkAmount) -> VmConfig {
    let mut config = VmConfig::new("test", vcpus, mode, 250, workload, amount);
    config.deadline = Duration::from_secs(60);
    config
}

fn run(mode: TickMode, workload: Workload, vcpus: u32, seconds: f64) -> RunReport {
    Vm::start(config(mode, workload, vcpus, WorkAmount::Seconds(seconds)))
        .and_then(Vm::wait)
        .unwrap_or_else(|e| panic!("{} {} on {vcpus} vCPUs: {e}", mode.name(), workload.name()))
}

/// Threads of this process whose name starts with `prefix` (the VMM names its threads
/// `<vm>-vcpuN`, `<vm>-ticks`, `<vm>-block`).
fn threads_named(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_string())
        .filter(|comm| comm.starts_with(prefix))
        .collect()
}

#[test]
fn every_mode_runs_every_workload_and_reports_its_results() {
    let _lock = one_vm_at_a_time();
    for workload in Workload::EVALUATED {
        for mode in TickMode::ALL {
            let what = format!("{} {}", mode.name(), workload.name());
            let r = run(mode, workload, 2, 0.5);
            assert!(r.work_units > 0, "{what}: no work done");
            assert!((0.5..0.75).contains(&r.elapsed_s), "{what}: ran {} s of guest time", r.elapsed_s);
            assert_eq!(r.counters.guest_ticks.per_vcpu.len(), 2, "{what}");
            // Guest time follows the TSC whatever the tick does (it catches up after idle).
            let expected_jiffies = (r.elapsed_s * 250.0) as u64;
            assert!(
                (expected_jiffies * 9 / 10..=expected_jiffies + 1).contains(&r.guest_jiffies),
                "{what}: {} jiffies",
                r.guest_jiffies
            );
            // Run time and idle time fit in the vCPUs' time (the rest is kernel time).
            assert!(
                r.guest_run_s > 0.0 && r.guest_run_s + r.guest_idle_s <= 2.0 * r.elapsed_s * 1.05,
                "{what}: run {} s, idle {} s",
                r.guest_run_s,
                r.guest_idle_s
            );
            assert!(r.counters.guest_ticks.per_vcpu[0] > 0, "{what}: vCPU 0 was busy but never ticked");
            match mode {
                TickMode::Paratick => {
                    assert_eq!(r.counters.tick_requests, 2, "{what}: one request per vCPU");
                    assert_eq!(r.guest_timer_writes, 0, "{what}: paratick never programs the timer");
                    assert!(r.counters.ticks_injected > 0, "{what}");
                }
                TickMode::Periodic | TickMode::Tickless => {
                    assert_eq!((r.counters.tick_requests, r.counters.ticks_injected), (0, 0), "{what}");
                    assert!(r.guest_timer_writes > 0, "{what}");
                }
            }
            match workload {
                // Every unit of the I/O workload is one completed block read: an exit to
                // the VMM, on whose re-entry a due paratick tick rides.
                Workload::Io => {
                    assert_eq!(r.block_requests, r.work_units, "{what}");
                    if mode == TickMode::Paratick {
                        assert!(r.counters.ticks_ridden > 0, "{what}: no tick rode on a block request exit");
                    }
                }
                // Two tasks per vCPU meet at a barrier: they switch on every unit.
                Workload::Multithreaded => assert!(r.context_switches >= r.work_units / 2, "{what}"),
                _ => assert_eq!(r.block_requests, 0, "{what}"),
            }
        }
    }
}

#[test]
fn a_busy_vcpu_counts_750_ticks_in_3_seconds_at_250_hz_in_every_mode() {
    let _lock = one_vm_at_a_time();
    for mode in TickMode::ALL {
        let r = run(mode, Workload::Sequential, 1, 3.0);
        let ticks = r.counters.guest_ticks.total;
        assert!((712..=788).contains(&ticks), "{}: {ticks} ticks in {:.3} s", mode.name(), r.elapsed_s);
        assert_eq!(r.counters.guest_idle_ticks.total, 0, "{}: the only vCPU was always busy", mode.name());
        assert!((712..=788).contains(&r.guest_jiffies), "{}: {} jiffies", mode.name(), r.guest_jiffies);
        // The task had the CPU all along, but for the kernel's own time (ticks).
        assert!(r.guest_run_s >= 0.9 * r.elapsed_s, "{}: ran {} s of {} s", mode.name(), r.guest_run_s, r.elapsed_s);
    }
}

/// Runs `paratick-vmm run ... --json` under `paratick-ctl observe` and returns the VMM's
/// report and the observer's view of the VMM process.
fn observed_run(args: &[&str]) -> (Value, Value) {
    let report_file = std::env::temp_dir().join(format!("paratick-vmm-observed-{}.json", std::process::id()));
    let output = Command::new(workspace_binary("paratick-ctl"))
        .args(["observe", "--json", "--output"])
        .arg(&report_file)
        .arg("--")
        .arg(workspace_binary("paratick-vmm"))
        .args(["run", "--json"])
        .args(args)
        .output()
        .expect("run paratick-ctl observe");
    assert!(output.status.success(), "{output:?}");
    let vmm: Value = serde_json::from_slice(&output.stdout).expect("VMM JSON");
    let observed: Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    let _ = std::fs::remove_file(&report_file);
    let vms = observed["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{vms:#?}");
    (vmm, vms[0].clone())
}

#[test]
fn tickless_writes_the_tsc_deadline_once_per_busy_tick_and_paratick_never() {
    let _lock = one_vm_at_a_time();
    let common = ["--vcpus", "1", "--workload", "sequential", "--duration", "2s"];
    let (vmm, observed) = observed_run(&[&common[..], &["--mode", "tickless"]].concat());
    let deadline_writes = observed["tick_requests_by_kind"]["tsc_deadline"].as_u64().unwrap();
    let ticks = vmm["guest_ticks"]["total"].as_u64().unwrap();
    // The guest's own count of its timer writes (the LVT set-up plus every deadline)
    // and the host's count of TSC-deadline MSR writes agree exactly...
    assert_eq!(deadline_writes + 1, vmm["guest_timer_writes"].as_u64().unwrap());
    // ...and a busy vCPU re-arms once per tick (plus the first arm).
    assert!(deadline_writes.abs_diff(ticks) <= 2, "{deadline_writes} deadline writes for {ticks} ticks");
    // The one LAPIC timer register write: LVT timer into TSC-deadline mode.
    assert_eq!(observed["tick_requests_by_kind"]["lapic"], 1);
    assert_eq!(observed["tick_requests_by_kind"].get("paratick"), None);

    let (vmm, observed) = observed_run(&[&common[..], &["--mode", "paratick"]].concat());
    assert_eq!(observed["tick_requests_by_kind"], serde_json::json!({ "paratick": 1 }));
    assert_eq!(vmm["guest_timer_writes"], 0);
    let ticks = vmm["guest_ticks"]["total"].as_u64().unwrap();
    assert!((475..=525).contains(&ticks), "{ticks} paratick ticks in 2 s");
    // Every injected tick reached the guest as a paratick-vector interrupt.
    assert!(observed["timer_interrupts"].as_u64().unwrap() >= ticks);
}

#[test]
fn an_idle_paratick_vcpu_gets_at_most_one_tick_per_second() {
    let _lock = one_vm_at_a_time();
    let r = run(TickMode::Paratick, Workload::Sequential, 2, 3.0);
    let idle_vcpu_ticks = r.counters.guest_ticks.per_vcpu[1];
    assert!(idle_vcpu_ticks <= 3, "the idle vCPU got {idle_vcpu_ticks} ticks in 3 s");
    assert!(r.counters.ticks_skipped_idle > 600, "due ticks of the halted vCPU were skipped");
    assert!((712..=788).contains(&r.counters.guest_ticks.per_vcpu[0]));
}

/// Guest ticks per second over `window`, read live from the guest's counters.
fn measured_rate(vm: &Vm, window: Duration) -> f64 {
    let before = vm.counters().unwrap().guest_ticks.total;
    let start = Instant::now();
    std::thread::sleep(window);
    let after = vm.counters().unwrap().guest_ticks.total;
    (after - before) as f64 / start.elapsed().as_secs_f64()
}

#[test]
fn an_operator_rate_change_shows_in_the_guest_tick_rate_at_once() {
    let _lock = one_vm_at_a_time();
    let mut config = config(TickMode::Paratick, Workload::Sequential, 1, WorkAmount::Seconds(30.0));
    config.name = "rate".into();
    let vm = Vm::start(config).unwrap();
    // A thread names itself once it runs: wait (bounded) until all three have.
    let named = Instant::now() + Duration::from_secs(5);
    while threads_named("rate-").len() < 3 && Instant::now() < named {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut threads = threads_named("rate-");
    threads.sort();
    assert_eq!(threads, ["rate-block", "rate-ticks", "rate-vcpu0"]);
    let window = Duration::from_secs(2);
    let guest_rate = measured_rate(&vm, window);
    assert!((225.0..=275.0).contains(&guest_rate), "guest's own rate: {guest_rate:.1} Hz");
    vm.set_operator_hz(Some(100)).unwrap();
    // Measured from the moment of the change: a change that took longer than an old
    // period would show as extra 250 Hz ticks in this window.
    let operator_rate = measured_rate(&vm, window);
    assert!((90.0..=110.0).contains(&operator_rate), "operator's rate: {operator_rate:.1} Hz");
    assert_eq!(vm.counters().unwrap().effective_hz, vec![100]);
    vm.set_operator_hz(None).unwrap();
    let back = measured_rate(&vm, window);
    assert!((225.0..=275.0).contains(&back), "back to the guest's rate: {back:.1} Hz");
    let out_of_range = vm.set_operator_hz(Some(5)).unwrap_err();
    assert_eq!(out_of_range.to_string(), "the tick rate must be 10 to 4000 Hz, not 5");
    assert_eq!(vm.counters().unwrap().operator_hz, None, "a rejected rate changes nothing");
    vm.stop().unwrap();
    assert_eq!(threads_named("rate-"), Vec::<String>::new(), "stopping joins every thread");
}

#[test]
fn malformed_tick_requests_are_clamped_and_counted_and_the_guest_keeps_ticking() {
    let _lock = one_vm_at_a_time();
    let r = run(TickMode::Paratick, Workload::BadRequests, 1, 1.0);
    assert_eq!(r.counters.tick_requests, 4, "three bad requests, then the real one");
    assert_eq!(r.counters.tick_requests_clamped, 3);
    assert_eq!(r.counters.requested_hz, vec![250]);
    let ticks = r.counters.guest_ticks.total;
    assert!((225..=275).contains(&ticks), "{ticks} ticks in 1 s");
}

/// Runs a VM that must fail; checks that none of its threads outlives it.
fn failure(name: &str, workload: Workload, amount: WorkAmount, deadline: Duration) -> (VmError, Duration) {
    let mut config = config(TickMode::Paratick, workload, 2, amount);
    config.name = name.to_string();
    config.deadline = deadline;
    let started = Instant::now();
    let error = Vm::start(config).and_then(Vm::wait).expect_err("the VM must fail");
    assert_eq!(threads_named(&format!("{name}-")), Vec::<String>::new(), "threads left behind");
    (error, started.elapsed())
}

#[test]
fn a_crashing_guest_ends_with_its_panic_message() {
    let _lock = one_vm_at_a_time();
    let (error, _) = failure("crash", Workload::Crash, WorkAmount::Seconds(1.0), Duration::from_secs(30));
    let message = error.to_string();
    assert!(message.starts_with("guest panicked: task on vCPU 0: exception #UD at rip 0x"), "{message}");
}

#[test]
fn a_triple_fault_ends_the_vm_with_an_error() {
    let _lock = one_vm_at_a_time();
    let (error, _) = failure("triple", Workload::TripleFault, WorkAmount::Seconds(1.0), Duration::from_secs(30));
    assert!(matches!(error, VmError::TripleFault { vcpu: 0 }), "{error}");
}

#[test]
fn a_hung_guest_is_stopped_at_its_deadline() {
    let _lock = one_vm_at_a_time();
    let (error, took) = failure("hang", Workload::Sequential, WorkAmount::Units(u64::MAX / 2), Duration::from_secs(2));
    assert!(matches!(error, VmError::Deadline { .. }), "{error}");
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
}

#[test]
fn kvm_stats_are_reported_by_name_and_count_the_ticks() {
    let _lock = one_vm_at_a_time();
    let r = run(TickMode::Periodic, Workload::Io, 2, 1.0);
    let stats = &r.counters.kvm_stats;
    for name in ["exits", "irq_exits", "halt_exits", "irq_injections", "insn_emulation", "signal_exits"] {
        assert!(stats.contains_key(name), "{name} missing from {stats:?}");
    }
    assert!(stats["exits"] > 0 && stats["halt_exits"] > 0, "{stats:?}");
    // Every tick and every block completion is an injected interrupt.
    assert!(stats["irq_injections"] >= r.counters.guest_ticks.total + r.block_requests, "{stats:?}");
}

fn vmm(args: &[&str]) -> std::process::Output {
    Command::new(workspace_binary("paratick-vmm")).args(args).output().expect("run paratick-vmm")
}

#[test]
fn the_cli_prints_the_documented_json_and_rejects_bad_input() {
    let _lock = one_vm_at_a_time();
    let output = vmm(&["run", "--vcpus", "2", "--mode", "tickless", "--workload", "io", "--duration", "1s", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    for field in [
        "mode",
        "workload",
        "vcpus",
        "hz",
        "elapsed_s",
        "work_units",
        "throughput_per_s",
        "guest_ticks",
        "guest_idle_ticks",
        "ticks_injected",
        "kvm_stats",
    ] {
        assert!(report.get(field).is_some(), "{field} missing from {report:#}");
    }
    assert_eq!(
        (report["mode"].as_str(), report["workload"].as_str(), report["vcpus"].as_u64()),
        (Some("tickless"), Some("io"), Some(2))
    );
    assert_eq!(report["guest_ticks"]["per_vcpu"].as_array().unwrap().len(), 2);

    let bad: [(&[&str], &str); 4] = [
        (
            &["run", "--vcpus", "9", "--mode", "paratick", "--workload", "io", "--duration", "1s"],
            "vcpus must be 1 to 8, not 9",
        ),
        (
            &["run", "--hz", "5000", "--mode", "paratick", "--workload", "io", "--duration", "1s"],
            "hz must be 10 to 4000, not 5000",
        ),
        (
            &["run", "--tick-rate", "1", "--mode", "paratick", "--workload", "io", "--duration", "1s"],
            "the tick rate must be 10 to 4000 Hz, not 1",
        ),
        (&["run", "--mode", "paratick", "--workload", "io", "--work", "0"], "the work must be 1 or more units"),
    ];
    for (args, message) in bad {
        let output = vmm(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let output = vmm(&["run", "--mode", "hertz", "--workload", "io", "--duration", "1s"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("use periodic, tickless or paratick"));
    let output = vmm(&["run", "--mode", "paratick", "--workload", "io"]);
    assert_eq!(output.status.code(), Some(2), "--duration or --work is required");
}

/// Exits a tickless run took for its timer, measured by the observer: every TSC-deadline
/// write and every timer interrupt (each an exit on VMX/SVM hosts).
fn measured_tickless_timer_exits(observed: &Value) -> u64 {
    observed["tick_requests_by_kind"]["tsc_deadline"].as_u64().unwrap() + observed["timer_interrupts"].as_u64().unwrap()
}

#[test]
fn the_exits_saved_estimate_matches_a_measured_tickless_paratick_pair() {
    let _lock = one_vm_at_a_time();
    // The two runs are normalised by what their savings scale with: busy ticks with
    // busy time (sequential: per second of guest time), idle periods with the amount of
    // I/O done (io: per work unit, one block read each).
    for (workload, per, tolerance) in [("sequential", "elapsed_s", 0.05), ("io", "work_units", 0.15)] {
        let common = ["--vcpus", "1", "--workload", workload, "--duration", "2s"];
        let (tickless, tickless_observed) = observed_run(&[&common[..], &["--mode", "tickless"]].concat());
        let (paratick, _) = observed_run(&[&common[..], &["--mode", "paratick"]].concat());
        let amount = |r: &Value| r[per].as_f64().unwrap();
        let kicks = paratick["ticks_injected"].as_f64().unwrap() - paratick["ticks_ridden"].as_f64().unwrap();
        let measured =
            measured_tickless_timer_exits(&tickless_observed) as f64 / amount(&tickless) - kicks / amount(&paratick);
        let estimated = paratick["exits_saved_estimate"].as_f64().unwrap() / amount(&paratick);
        assert!(measured > 0.0, "{workload}: paratick saved nothing?");
        let error = (estimated - measured).abs() / measured;
        assert!(
            error <= tolerance,
            "{workload}: estimated {estimated:.3} vs measured {measured:.3} exits saved per {per}"
        );
    }
}

#[test]
fn sleeping_tasks_are_woken_by_their_timer_in_every_mode() {
    let _lock = one_vm_at_a_time();
    for mode in TickMode::ALL {
        let r = run(mode, Workload::Sleep, 1, 1.0);
        let what = mode.name();
        // Each unit is a short burst of work and a 10 ms sleep: a task woken late by
        // more than a tick period (or never) shows here.
        assert!((70..=100).contains(&r.work_units), "{what}: {} sleeps of 10 ms in 1 s", r.work_units);
        assert!((237..=263).contains(&r.guest_jiffies), "{what}: {} jiffies", r.guest_jiffies);
        match mode {
            // The idle path arms a one-shot timer for each sleeper (and sets the LVT
            // timer up once): nothing else programs the timer.
            TickMode::Paratick => assert_eq!(r.guest_timer_writes, r.work_units + 1, "{what}"),
            // At least one deadline per sleep: the next event, then the tick again.
            TickMode::Tickless => assert!(r.guest_timer_writes > 2 * r.work_units, "{what}: {}", r.guest_timer_writes),
            // The periodic tick wakes the sleepers; it was set up once.
            TickMode::Periodic => assert_eq!(r.guest_timer_writes, 3, "{what}"),
        }
    }
}
