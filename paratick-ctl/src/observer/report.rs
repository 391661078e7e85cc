//! What `paratick-ctl observe` prints: the live table (rates between two snapshots) and
//! the final JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::counts::ProcessCounts;
use crate::procfs::ProcessInfo;

/// One VM process in the final report.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    /// Host process id of the VMM.
    pub pid: u32,
    /// Process name (`comm`), or `?` if it exited before it could be read.
    pub name: String,
    /// Command line, when known.
    pub cmdline: String,
    /// vCPUs: vCPU threads seen by the eBPF programs, or vCPU file descriptors in /proc.
    pub vcpus: u32,
    /// The counts.
    #[serde(flatten)]
    pub counts: ProcessCounts,
}

impl VmReport {
    /// Combines counts with what /proc said about the process (if anything).
    pub fn new(pid: u32, info: Option<&ProcessInfo>, counts: ProcessCounts) -> VmReport {
        let vcpus = info.map_or(0, |i| i.vcpus).max(counts.vcpu_threads);
        VmReport {
            pid,
            name: info.map_or_else(|| "?".to_string(), |i| i.name.clone()),
            cmdline: info.map(|i| i.cmdline.clone()).unwrap_or_default(),
            vcpus,
            counts,
        }
    }
}

/// How a watched command ended.
#[derive(Debug, Clone, Serialize)]
pub struct CommandReport {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// Its process id.
    pub pid: u32,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
}

/// The document `observe --json` prints when it stops.
#[derive(Debug, Clone, Serialize)]
pub struct ObserveReport {
    /// Host KVM backend: `vmx`, `svm`, `pvm` or `unknown`.
    pub backend: &'static str,
    /// Every KVM tracepoint: `attached`, `missing` or `failed: …`.
    pub tracepoints: BTreeMap<&'static str, String>,
    /// Events the eBPF programs could not record, by reason.
    pub drops: BTreeMap<&'static str, u64>,
    /// How long the observer watched.
    pub duration_s: f64,
    /// The watched command, with `-- COMMAND`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandReport>,
    /// One entry per VM process, by pid.
    pub vms: Vec<VmReport>,
}

/// One row of the live table: rates over the last interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Process id.
    pub pid: u32,
    /// Name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// `kvm_exit`s per second, `None` where `kvm_exit` does not fire.
    pub exits_per_s: Option<f64>,
    /// Top exit reasons with their rates.
    pub top_reasons: Vec<(String, f64)>,
    /// Tick requests per second.
    pub tick_requests_per_s: f64,
    /// Timer interrupts per second.
    pub timer_interrupts_per_s: f64,
    /// Userspace exits per second.
    pub userspace_exits_per_s: f64,
}

/// How many exit reasons a row lists.
const TOP_REASONS: usize = 3;

impl Row {
    /// Rates of `now` relative to `before` (the previous interval) over `seconds`.
    pub fn new(
        pid: u32,
        info: Option<&ProcessInfo>,
        now: &ProcessCounts,
        before: Option<&ProcessCounts>,
        seconds: f64,
        exits_traced: bool,
    ) -> Row {
        let empty = ProcessCounts::default();
        let before = before.unwrap_or(&empty);
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
        let mut reasons: Vec<(String, f64)> = now
            .exit_reasons
            .iter()
            .map(|(name, n)| (name.clone(), rate(*n, before.exit_reasons.get(name).copied().unwrap_or(0))))
            .filter(|(_, r)| *r > 0.0)
            .collect();
        reasons.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        reasons.truncate(TOP_REASONS);
        let userspace = "kvm_userspace_exit";
        let report = VmReport::new(pid, info, now.clone());
        Row {
            pid,
            name: report.name,
            vcpus: report.vcpus,
            exits_per_s: exits_traced.then(|| rate(now.exits(), before.exits())),
            top_reasons: reasons,
            tick_requests_per_s: rate(now.tick_requests, before.tick_requests),
            timer_interrupts_per_s: rate(now.timer_interrupts, before.timer_interrupts),
            userspace_exits_per_s: rate(now.event(userspace), before.event(userspace)),
        }
    }
}

/// Renders the live table.
pub fn render_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8} {:<16} {:>5} {:>10} {:>11} {:>11} {:>11}  TOP EXIT REASONS (/s)",
        "PID", "NAME", "VCPUS", "EXITS/s", "TICKREQ/s", "TIMERIRQ/s", "USEREXIT/s"
    );
    for row in rows {
        let exits = row.exits_per_s.map_or_else(|| "n/a".to_string(), |r| format!("{r:.0}"));
        let reasons = if row.exits_per_s.is_none() {
            "(kvm_exit does not fire on this host)".to_string()
        } else {
            row.top_reasons.iter().map(|(n, r)| format!("{n}={r:.0}")).collect::<Vec<_>>().join(" ")
        };
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:>5} {:>10} {:>11.0} {:>11.0} {:>11.0}  {}",
            row.pid,
            row.name,
            row.vcpus,
            exits,
            row.tick_requests_per_s,
            row.timer_interrupts_per_s,
            row.userspace_exits_per_s,
            reasons
        );
    }
    if rows.is_empty() {
        out.push_str("(no KVM processes)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(exits: &[(&str, u64)], ticks: u64, uexits: u64) -> ProcessCounts {
        let mut c = ProcessCounts::default();
        for (name, n) in exits {
            c.exit_reasons.insert(name.to_string(), *n);
            *c.events.entry("kvm_exit").or_default() += n;
        }
        c.tick_requests = ticks;
        c.events.insert("kvm_userspace_exit", uexits);
        c
    }

    #[test]
    fn rows_are_rates_over_the_interval_with_the_busiest_reasons_first() {
        let before = counts(&[("HLT", 100), ("MSR_WRITE", 10)], 10, 4);
        let now = counts(&[("HLT", 300), ("MSR_WRITE", 410), ("IO_INSTRUCTION", 50), ("CPUID", 2)], 410, 54);
        let row = Row::new(42, None, &now, Some(&before), 2.0, true);
        assert_eq!(row.exits_per_s, Some(326.0));
        assert_eq!(
            row.top_reasons,
            vec![("MSR_WRITE".into(), 200.0), ("HLT".into(), 100.0), ("IO_INSTRUCTION".into(), 25.0)]
        );
        assert_eq!((row.tick_requests_per_s, row.userspace_exits_per_s), (200.0, 25.0));
        assert_eq!(row.name, "?");
        let table = render_table(&[row]);
        assert!(table.contains("MSR_WRITE=200 HLT=100 IO_INSTRUCTION=25"), "{table}");
    }

    #[test]
    fn hosts_without_kvm_exit_show_no_exit_rate() {
        let row = Row::new(1, None, &counts(&[], 5, 5), None, 1.0, false);
        assert_eq!(row.exits_per_s, None);
        assert!(render_table(&[row]).contains("(kvm_exit does not fire on this host)"));
        assert!(render_table(&[]).contains("(no KVM processes)"));
    }
}
