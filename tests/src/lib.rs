//! Helpers for the end-to-end tests: where the binaries are, running commands under
//! `perf stat` as an independent reference, and reading the observer's JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, Context, Result};

/// Port the count guest writes to (not one of the paratick ABI ports).
pub const COUNT_GUEST_PORT: u16 = 0x0c60;

/// Path of a binary of this workspace's target directory (`paratick-ctl`,
/// `kvm-count-guest`, …), built in the same profile as the running test.
pub fn workspace_binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop(); // the test binary
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Runs `command` under `perf stat -e <events> -x,` and returns the count of each
/// event, plus the command's stdout; the command must succeed.
pub fn perf_stat(events: &[&str], command: &[&str]) -> Result<(BTreeMap<String, u64>, String)> {
    let (counts, stdout, status) = perf_stat_status(events, command)?;
    if !status.success() {
        bail!("perf stat {command:?} failed: {status}");
    }
    Ok((counts, stdout))
}

/// Like [`perf_stat`], for a command whose exit status is the caller's to judge (QEMU
/// with isa-debug-exit exits 1 when its test passed).
pub fn perf_stat_status(
    events: &[&str],
    command: &[&str],
) -> Result<(BTreeMap<String, u64>, String, std::process::ExitStatus)> {
    let output_file = std::env::temp_dir().join(format!("paratick-perf-{}-{}", std::process::id(), unique()));
    let output = Command::new("perf")
        .args(["stat", "-x", ",", "-o"])
        .arg(&output_file)
        .arg("-e")
        .arg(events.join(","))
        .arg("--")
        .args(command)
        .output()
        .context("run perf stat (is linux-perf installed? run `cargo xtask setup`)")?;
    let report = std::fs::read_to_string(&output_file)
        .with_context(|| format!("read perf stat output: {}", String::from_utf8_lossy(&output.stderr)))?;
    let _ = std::fs::remove_file(&output_file);
    Ok((parse_perf_csv(&report)?, String::from_utf8_lossy(&output.stdout).into_owned(), output.status))
}

/// Parses `perf stat -x,` lines: `count,unit,event,...`.
pub fn parse_perf_csv(report: &str) -> Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for line in report.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(count), Some(event)) = (fields.first(), fields.get(2)) else { continue };
        let count: u64 = count.parse().with_context(|| format!("perf count in {line:?}"))?;
        counts.insert(event.to_string(), count);
    }
    Ok(counts)
}

/// Serialises the tests of one test binary that run VMs: tick counts and rates of busy
/// guests are only meaningful when two of them do not share the host's two cores.
pub fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The one line a command printed on stderr (it must be exactly one: our errors are).
pub fn single_error_line(output: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).trim_end().to_string();
    assert_eq!(stderr.lines().count(), 1, "one line of error, got {stderr:?}");
    stderr
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// One sample of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses the Prometheus text format (the subset exporters emit: no escapes in labels).
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = value.parse().with_context(|| format!("bad value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').with_context(|| format!("unclosed labels in {line:?}"))?;
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once("=\"").with_context(|| format!("bad label in {line:?}"))?;
                    labels.insert(key.to_string(), value.trim_end_matches('"').to_string());
                }
                (name, labels)
            }
        };
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(samples)
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A kvm-unit-tests kernel (prebuilt, unmodified upstream: nobody here wrote it; see
/// tests/fixtures/kvm-unit-tests/README.md).
pub fn kvm_unit_test(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kvm-unit-tests").join(name)
}

/// The command line of Debian's QEMU on KVM running a kvm-unit-tests kernel. (ARCH_CAPABILITIES is off: this
/// PVM host refuses QEMU's write of that MSR.)
pub fn qemu_args(kernel: &Path, append: &str) -> Vec<String> {
    let mut args = vec!["qemu-system-x86_64".to_string()];
    args.extend(paratick_ctl::bench::overhead::QEMU_KVM_UNIT_TESTS_ARGS.iter().map(|s| s.to_string()));
    args.extend(["-kernel".into(), kernel.to_str().unwrap().into(), "-append".into(), append.into()]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_parsed_into_samples() {
        let text = "# HELP x y\nparatick_up 1\nparatick_vm_tick_rate_hertz{source=\"effective\",vm=\"a\"} 99.5\n";
        let samples = parse_metrics(text).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(metric(&samples, "paratick_up", &[]), Some(1.0));
        assert_eq!(
            metric(&samples, "paratick_vm_tick_rate_hertz", &[("vm", "a"), ("source", "effective")]),
            Some(99.5)
        );
        assert_eq!(metric(&samples, "paratick_vm_tick_rate_hertz", &[("vm", "b")]), None);
        assert!(parse_metrics("x{a=\"1\" 2\n").is_err());
    }

    #[test]
    fn perf_csv_counts_are_read_by_event() {
        let report = "# started on Wed\n\n1000,,kvm:kvm_pio,5000,100.00,,\n3,,kvm:kvm_msr,5000,100.00,,\n";
        let counts = parse_perf_csv(report).unwrap();
        assert_eq!(counts["kvm:kvm_pio"], 1000);
        assert_eq!(counts["kvm:kvm_msr"], 3);
        assert!(parse_perf_csv("x,,kvm:kvm_pio\n").is_err());
    }
}

/// What a process holds: resident memory, open file descriptors, threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUsage {
    /// Resident set size, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

/// A live process's usage, from /proc (none once it is gone).
pub fn process_usage(pid: u32) -> Option<ProcessUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|line| line.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(ProcessUsage { rss_kib: field("VmRSS:")?, fds, threads: field("Threads:")? })
}
