//! Helpers for the end-to-end tests: where the binaries are, running commands under
//! `perf stat` as an independent reference, and reading the observer's JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

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
/// event, plus the command's stdout.
pub fn perf_stat(events: &[&str], command: &[&str]) -> Result<(BTreeMap<String, u64>, String)> {
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
    let report = std::fs::read_to_string(&output_file).context("read perf stat output")?;
    let _ = std::fs::remove_file(&output_file);
    if !output.status.success() {
        bail!("perf stat {command:?} failed: {}\n{report}", String::from_utf8_lossy(&output.stderr));
    }
    Ok((parse_perf_csv(&report)?, String::from_utf8_lossy(&output.stdout).into_owned()))
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

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_csv_counts_are_read_by_event() {
        let report = "# started on Wed\n\n1000,,kvm:kvm_pio,5000,100.00,,\n3,,kvm:kvm_msr,5000,100.00,,\n";
        let counts = parse_perf_csv(report).unwrap();
        assert_eq!(counts["kvm:kvm_pio"], 1000);
        assert_eq!(counts["kvm:kvm_msr"], 3);
        assert!(parse_perf_csv("x,,kvm:kvm_pio\n").is_err());
    }
}
