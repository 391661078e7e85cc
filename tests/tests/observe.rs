//! End-to-end tests of `paratick-ctl observe` on real /dev/kvm with real eBPF (as root).
//!
//! The reference for every count is `perf stat -e kvm:...` over the same run: perf
//! counts the tracepoint for the whole process tree of the command it wraps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use paratick_tests::{kvm_unit_test, perf_stat, perf_stat_status, qemu_args, single_error_line, workspace_binary};
use serde_json::Value;

fn ctl() -> PathBuf {
    let path = workspace_binary("paratick-ctl");
    assert!(path.exists(), "{} is missing: build it first (`cargo xtask test` does)", path.display());
    path
}

fn count_guest() -> &'static str {
    env!("CARGO_BIN_EXE_kvm-count-guest")
}

fn report_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("paratick-observe-{test}-{}.json", std::process::id()))
}

fn read_report(path: &PathBuf) -> Value {
    let text = std::fs::read_to_string(path).expect("observer report");
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report is not JSON ({e}): {text}"))
}

fn vm_named<'a>(report: &'a Value, name: &str) -> &'a Value {
    let vms = report["vms"].as_array().expect("vms array");
    let matching: Vec<&Value> = vms.iter().filter(|vm| vm["name"] == name).collect();
    assert_eq!(matching.len(), 1, "exactly one VM named {name} in {vms:#?}");
    matching[0]
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run paratick-ctl")
}

/// perf wraps the observer, so this also proves the observer does not hide events from
/// other perf users of the same tracepoints (a tracepoint program returning 0 would).
#[test]
fn counts_of_a_known_guest_equal_perf_stat_for_the_same_run() {
    const PORT_WRITES: u64 = 1000;
    const TSC_DEADLINE_WRITES: u64 = 250;
    let report_file = report_path("exact");
    let ctl = ctl();
    let (perf, _) = perf_stat(
        &["kvm:kvm_pio", "kvm:kvm_msr", "kvm:kvm_userspace_exit"],
        &[
            ctl.to_str().unwrap(),
            "observe",
            "--json",
            "--output",
            report_file.to_str().unwrap(),
            "--",
            count_guest(),
            &PORT_WRITES.to_string(),
            &TSC_DEADLINE_WRITES.to_string(),
        ],
    )
    .expect("perf stat over observe");
    let report = read_report(&report_file);

    // The reference agrees with what the guest was written to do...
    assert_eq!(perf["kvm:kvm_pio"], PORT_WRITES);
    assert_eq!(perf["kvm:kvm_msr"], TSC_DEADLINE_WRITES);
    // ...and the observer agrees with the reference, event for event.
    let vm = vm_named(&report, "kvm-count-guest");
    let events = &vm["events"];
    assert_eq!(events["kvm_pio"], perf["kvm:kvm_pio"]);
    assert_eq!(events["kvm_msr_write"], perf["kvm:kvm_msr"]);
    assert_eq!(events.get("kvm_msr_read"), None);
    assert_eq!(events["kvm_userspace_exit"], perf["kvm:kvm_userspace_exit"]);
    assert_eq!(vm["userspace_exit_reasons"]["IO"], PORT_WRITES);
    assert_eq!(vm["tick_requests"], TSC_DEADLINE_WRITES);
    assert_eq!(vm["tick_requests_by_kind"], serde_json::json!({ "tsc_deadline": TSC_DEADLINE_WRITES }));
    assert_eq!(vm["timer_interrupts"], 0, "the guest's LVT timer stays masked");
    assert_eq!(vm["vcpus"], 1);
    assert_eq!(report["vms"].as_array().unwrap().len(), 1, "only the command's tree is reported");
    assert_eq!(report["command"]["exit_code"], 0);
    assert!(report["drops"].as_object().unwrap().values().all(|d| d == 0), "{}", report["drops"]);
}

#[test]
fn the_report_names_the_backend_and_the_state_of_every_tracepoint() {
    let report_file = report_path("tracepoints");
    let output =
        run(Command::new(ctl()).args(["observe", "--json", "--duration", "200ms", "--output"]).arg(&report_file));
    assert!(output.status.success(), "{output:?}");
    let report = read_report(&report_file);
    let expected_backend = if std::path::Path::new("/sys/module/kvm_intel").exists() {
        "vmx"
    } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
        "svm"
    } else if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "pvm"
    } else {
        "unknown"
    };
    assert_eq!(report["backend"], expected_backend);
    let states: BTreeMap<String, String> = serde_json::from_value(report["tracepoints"].clone()).unwrap();
    let names = [
        "kvm_apic",
        "kvm_apic_accept_irq",
        "kvm_entry",
        "kvm_eoi",
        "kvm_exit",
        "kvm_hypercall",
        "kvm_inj_virq",
        "kvm_mmio",
        "kvm_msr",
        "kvm_pio",
        "kvm_userspace_exit",
        "kvm_vcpu_wakeup",
    ];
    assert_eq!(states.keys().map(String::as_str).collect::<Vec<_>>(), names);
    for (name, state) in &states {
        let format = PathBuf::from("/sys/kernel/tracing/events/kvm").join(name).join("format");
        let expected = if format.exists() { "attached" } else { "missing" };
        assert_eq!(state, expected, "kvm:{name}");
    }
}

/// Starts a count guest that runs for a while, and waits until it owns a KVM VM. Its 10
/// million port writes take tens of seconds at the fastest exits seen here (about 5 µs
/// each), far longer than any window a test observes: the caller kills it.
#[expect(clippy::zombie_processes, reason = "the caller kills and waits for the returned child")]
fn start_long_guest() -> Child {
    let mut child = Command::new(count_guest()).args(["10000000", "0"]).stdout(Stdio::null()).spawn().expect("guest");
    let deadline = Instant::now() + Duration::from_secs(10);
    let fd_dir = PathBuf::from(format!("/proc/{}/fd", child.id()));
    loop {
        let has_vm = std::fs::read_dir(&fd_dir)
            .map(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:kvm-vm"))
            })
            .unwrap_or(false);
        if has_vm {
            return child;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("guest {} never created its VM", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pid_filter_reports_only_the_chosen_vm() {
    let mut watched = start_long_guest();
    let mut other = start_long_guest();
    let report_file = report_path("pid");
    let output = run(Command::new(ctl())
        .args(["observe", "--json", "--duration", "500ms", "--pid", &watched.id().to_string(), "--output"])
        .arg(&report_file));
    watched.kill().unwrap();
    other.kill().unwrap();
    let _ = (watched.wait(), other.wait());
    assert!(output.status.success(), "{output:?}");
    let report = read_report(&report_file);
    let vms = report["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{vms:#?}");
    assert_eq!(vms[0]["pid"], watched.id());
    assert!(vms[0]["events"]["kvm_pio"].as_u64().unwrap() > 0, "the watched guest was busy writing ports");
    assert_eq!(vms[0]["vcpus"], 1);
}

#[test]
fn the_live_table_shows_a_row_for_the_running_guest() {
    // 400,000 port writes: about 2 s at this host's 200,000 exits a second, several
    // tables long (20,000 ended before the first table could sample KVM's counters).
    let output = run(Command::new(ctl()).args(["observe", "--interval", "100ms", "--", count_guest(), "400000", "0"]));
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("TICKREQ/s"), "{stdout}");
    let row = stdout
        .lines()
        // Its VMM is neither QEMU nor ours: named by process name and pid.
        .find(|line| line.split_whitespace().nth(1).is_some_and(|vm| vm.starts_with("kvm-count-guest:")))
        .unwrap_or_else(|| panic!("no row for the guest in {stdout}"));
    let column = |n: usize| -> f64 { row.split_whitespace().nth(n).unwrap().parse().unwrap() };
    // EXITS/s is KVM's own count (the eBPF copy of its counters), on every backend.
    assert!(column(3) > 0.0 && column(7) > 0.0, "{row}");
}

#[test]
fn bad_input_gets_one_line_and_a_failing_exit_code() {
    let not_kvm = std::process::id().to_string();
    let output = run(Command::new(ctl()).args(["observe", "--pid", &not_kvm]));
    assert_eq!(output.status.code(), Some(1));
    let line = single_error_line(&output);
    assert!(line.contains(&format!("pid {not_kvm}")) && line.contains("is not a KVM process"), "{line}");

    let output = run(Command::new(ctl()).args(["observe", "--pid", "4194305"]));
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(single_error_line(&output), "paratick-ctl: no process with pid 4194305");

    let output = run(Command::new(ctl()).args(["observe", "--interval", "0s"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("must be longer than zero"));

    let output = run(Command::new(ctl()).args(["observe", "--interval", "soon"]));
    assert_eq!(output.status.code(), Some(2));

    let output = run(Command::new(ctl()).args(["observe", "--no-such-flag"]));
    assert_eq!(output.status.code(), Some(2));

    let output = run(Command::new(ctl()).args(["observe", "--json", "--output", "/nonexistent/dir/report.json"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(single_error_line(&output).contains("cannot write the report to /nonexistent/dir/report.json"));
}

#[test]
fn without_bpf_privilege_the_error_says_to_run_as_root() {
    let output = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(ctl())
        .args(["observe", "--duration", "1s"]));
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        single_error_line(&output),
        "paratick-ctl: cannot start the eBPF observer: loading eBPF programs needs root (or CAP_BPF and CAP_PERFMON): run paratick-ctl with sudo"
    );
}

#[test]
fn a_failing_command_passes_its_exit_code_through() {
    let report_file = report_path("failing");
    let output = run(Command::new(ctl()).args(["observe", "--json", "--output"]).arg(&report_file).args([
        "--",
        count_guest(),
        "0",
        "1",
    ]));
    assert_eq!(output.status.code(), Some(1));
    let report = read_report(&report_file);
    assert_eq!(report["command"]["exit_code"], 1);
}

/// A third-party VMM and guest: the observer's event counts equal perf's for the same
/// run, KVM's own exit counts are there (per vCPU, adding up), and the timer report is
/// consistent with them and with what the test does (200 TSC-deadline expiries).
#[test]
fn a_qemu_guest_is_counted_exactly_and_its_timer_overhead_reported() {
    let report_file = report_path("qemu");
    let svg_dir = std::env::temp_dir().join(format!("paratick-observe-svg-{}", std::process::id()));
    let ctl = ctl();
    let qemu = qemu_args(&kvm_unit_test("tscdeadline_latency.flat"), "20000000 200");
    let mut command = vec![ctl.to_str().unwrap(), "observe", "--json", "--report", "--output"];
    command.extend([report_file.to_str().unwrap(), "--svg", svg_dir.to_str().unwrap(), "--"]);
    command.extend(qemu.iter().map(String::as_str));
    // Named as libvirt names its guests: the report names the VM so.
    command.extend(["-name", "guest=gamma,debug-threads=on"]);
    let events = ["kvm:kvm_msr", "kvm:kvm_apic_accept_irq", "kvm:kvm_vcpu_wakeup", "kvm:kvm_userspace_exit"];
    let (perf, stdout, status) = perf_stat_status(&events, &command).expect("perf stat over observe over QEMU");
    // QEMU exits 1 when the test passed (isa-debug-exit), and observe passes that on.
    assert_eq!(status.code(), Some(1), "{stdout}");
    let report = read_report(&report_file);
    let vm = vm_named(&report, "qemu-system-x86");
    assert_eq!((vm["vm"]["name"].as_str(), vm["vm"]["vmm"].as_str()), (Some("gamma"), Some("qemu")), "{vm}");
    let counted = &vm["events"];
    let msr = counted["kvm_msr_write"].as_u64().unwrap_or(0) + counted["kvm_msr_read"].as_u64().unwrap_or(0);
    assert_eq!(msr, perf["kvm:kvm_msr"]);
    assert_eq!(counted["kvm_apic_accept_irq"], perf["kvm:kvm_apic_accept_irq"]);
    assert_eq!(counted["kvm_vcpu_wakeup"], perf["kvm:kvm_vcpu_wakeup"]);
    assert_eq!(counted["kvm_userspace_exit"], perf["kvm:kvm_userspace_exit"]);
    assert_eq!(report["command"]["exit_code"], 1, "{}", report["command"]);

    let kvm = &vm["kvm_stats"];
    let exits = kvm["exits"].as_u64().expect("KVM's exit count");
    assert!(exits > 0, "{kvm}");
    let vcpus = kvm["vcpus"].as_object().unwrap();
    assert_eq!(vcpus.len(), 1, "{kvm}");
    assert_eq!(vcpus["0"]["exits"], exits, "the vCPUs add up to the VM");
    assert!(kvm["halt_exits"].as_u64().unwrap() >= 200, "200 halts to wait for the expiries: {kvm}");

    let timer = &vm["timer"];
    assert!(timer["timer_interrupts"].as_u64().unwrap() >= 200, "{timer}");
    assert!(timer["timer_writes"].as_u64().unwrap() >= 200, "{timer}");
    let timer_exits = timer["timer_exits"].as_u64().unwrap();
    assert!(timer_exits > 0 && timer_exits <= exits, "{timer}");
    let share = timer["timer_exit_share"].as_f64().unwrap();
    assert!(share > 0.0 && share <= 1.0, "{timer}");
    assert!((share - timer_exits as f64 / exits as f64).abs() < 1e-9);
    assert!(timer["observed_tick_hz"].as_f64().unwrap() > 0.0, "{timer}");
    let saved = timer["projected_exits_saved"].as_u64().unwrap();
    assert!(saved > 0 && saved <= timer_exits, "{timer}");
    assert!(report["timer_model"]["backend"].is_string() && report["timer_model"]["source"].is_string());
    // The text report (after QEMU's output on stdout) names the VM; the SVG has one
    // line per category.
    let named = format!("VM gamma (qemu, pid {}, 1 vCPU)", vm["pid"]);
    let line = stdout.lines().find(|l| l.contains(&named)).unwrap_or_else(|| panic!("{named}: {stdout}"));
    assert!(line.contains(&format!("{exits} exits; timer {timer_exits} exits")), "{line}");
    let svg = std::fs::read_to_string(svg_dir.join(format!("vm-{}.svg", vm["pid"]))).expect("an SVG for the VM");
    assert_eq!(svg.matches("<polyline").count(), 5);
    let _ = std::fs::remove_dir_all(&svg_dir);
}

/// KVM's counts as the observer copies them equal those the VMM reads from its own
/// vCPUs' stats files at the end of the run: two sources, one number.
#[test]
fn kvm_counts_of_our_vmm_equal_its_own_stats_files() {
    let report_file = report_path("kvm-stats");
    let vmm = workspace_binary("paratick-vmm");
    let output = run(Command::new(ctl())
        .args(["observe", "--json", "--output"])
        .arg(&report_file)
        .arg("--")
        .arg(&vmm)
        .args(["run", "--vcpus", "2", "--mode", "tickless", "--workload", "io", "--duration", "1s", "--json"]));
    assert!(output.status.success(), "{output:?}");
    let run_report: Value = serde_json::from_slice(&output.stdout).expect("the VMM's JSON");
    let report = read_report(&report_file);
    let observed = &vm_named(&report, "paratick-vmm")["kvm_stats"];
    for counter in ["exits", "halt_exits", "irq_exits", "io_exits", "irq_injections", "insn_emulation"] {
        assert_eq!(
            observed[counter], run_report["kvm_stats"][counter],
            "{counter}: {observed} vs {}",
            run_report["kvm_stats"]
        );
    }
    for vcpu in 0..2 {
        assert_eq!(observed["vcpus"][vcpu.to_string()]["exits"], run_report["kvm_stats_per_vcpu"][vcpu]["exits"]);
    }
}
