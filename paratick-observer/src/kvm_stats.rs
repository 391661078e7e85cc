//! KVM's own exit counts for any KVM process on the host, whatever its VMM:
//! - per vCPU, copied out of `struct kvm_vcpu` by the observer's raw tracepoint programs (see
//!   `paratick_common::kvm_counters`): exact, on every backend. The stats files KVM
//!   offers cannot be opened for another process's vCPUs (KVM refuses vCPU ioctls from
//!   outside the VM's process);
//! - else per VM, from KVM's debugfs (`/sys/kernel/debug/kvm/PID-FD/exits`, …: what
//!   `kvm_stat -d` reads), mounted here when it is not. A locked-down kernel refuses
//!   those reads (`Lockdown: debugfs access is restricted`), as this PVM host does.

use std::collections::BTreeMap;
use std::path::Path;

use paratick_vmm::kvm_stats::KvmExitCounts;
use serde::Serialize;

const DEBUGFS: &str = "/sys/kernel/debug";
const DEBUGFS_KVM: &str = "/sys/kernel/debug/kvm";

/// Mounts debugfs where it is not mounted (KVM's per-VM directories live there).
pub fn ensure_debugfs() -> Result<(), String> {
    if Path::new(DEBUGFS_KVM).is_dir() {
        return Ok(());
    }
    let flags = nix::mount::MsFlags::empty();
    nix::mount::mount(Some("debugfs"), DEBUGFS, Some("debugfs"), flags, None::<&str>)
        .map_err(|e| format!("cannot mount debugfs on {DEBUGFS}: {e}"))?;
    if Path::new(DEBUGFS_KVM).is_dir() {
        Ok(())
    } else {
        Err(format!("{DEBUGFS_KVM} does not exist (KVM not loaded?)"))
    }
}

/// The VM-level counts of every VM of process `pid`, summed (a process may hold
/// several VMs), from debugfs; `None` if it has none there.
pub fn debugfs_counts(pid: u32) -> Option<KvmExitCounts> {
    let prefix = format!("{pid}-");
    let mut total: Option<KvmExitCounts> = None;
    for entry in std::fs::read_dir(DEBUGFS_KVM).ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|n| n.starts_with(&prefix)) {
            continue;
        }
        let dir = entry.path();
        let counts = KvmExitCounts::from_named(|stat| {
            std::fs::read_to_string(dir.join(stat)).ok().and_then(|text| text.trim().parse().ok())
        });
        total = Some(total.unwrap_or_default().plus(counts));
    }
    total
}

/// KVM's counts of one process over the observed window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KvmStatsReport {
    /// Summed over its vCPUs.
    #[serde(flatten)]
    pub total: KvmExitCounts,
    /// Per vCPU, by KVM's vCPU id; empty where only per-VM counts (debugfs) exist.
    pub vcpus: BTreeMap<u32, KvmExitCounts>,
    /// `ebpf` (KVM's per-vCPU counters, copied by the observer) or `debugfs` (per VM).
    pub source: &'static str,
}

#[derive(Default)]
struct Tracked {
    /// Counts at the start of the window (zero for a process started within it).
    baseline_vcpus: BTreeMap<u32, KvmExitCounts>,
    latest_vcpus: BTreeMap<u32, KvmExitCounts>,
    baseline: KvmExitCounts,
    latest: KvmExitCounts,
    source: &'static str,
}

/// Follows KVM's counts of the processes it is shown, from when it first saw them.
#[derive(Default)]
pub struct KvmStatsTracker {
    processes: BTreeMap<u32, Tracked>,
}

impl KvmStatsTracker {
    /// Takes a sample of process `pid`: its vCPUs' counters from the eBPF copies where they
    /// are (`vcpus`), else debugfs. `new_in_window`: it started after the window began,
    /// so everything it counted is in the window; else the first sample is the baseline.
    pub fn sample(&mut self, pid: u32, new_in_window: bool, vcpus: Option<&BTreeMap<u32, KvmExitCounts>>) {
        let tracked = self.processes.entry(pid).or_default();
        match vcpus {
            Some(vcpus) => {
                for (&vcpu, &counts) in vcpus {
                    if !new_in_window && !tracked.latest_vcpus.contains_key(&vcpu) {
                        tracked.baseline_vcpus.insert(vcpu, counts);
                    }
                    tracked.latest_vcpus.insert(vcpu, counts);
                }
                tracked.source = "ebpf";
            }
            None => {
                if let Some(counts) = debugfs_counts(pid) {
                    if !new_in_window && tracked.source.is_empty() {
                        tracked.baseline = counts;
                    }
                    tracked.latest = counts;
                    tracked.source = "debugfs";
                }
            }
        }
    }

    /// What process `pid` counted in the window (`None` if nothing was ever read).
    pub fn report(&self, pid: u32) -> Option<KvmStatsReport> {
        let tracked = self.processes.get(&pid).filter(|t| !t.source.is_empty())?;
        if tracked.source == "debugfs" {
            let total = tracked.latest.since(tracked.baseline);
            return Some(KvmStatsReport { total, vcpus: BTreeMap::new(), source: tracked.source });
        }
        let vcpus: BTreeMap<u32, KvmExitCounts> = tracked
            .latest_vcpus
            .iter()
            .map(|(vcpu, counts)| (*vcpu, counts.since(tracked.baseline_vcpus.get(vcpu).copied().unwrap_or_default())))
            .collect();
        let total = vcpus.values().fold(KvmExitCounts::default(), |sum, vcpu| sum.plus(*vcpu));
        Some(KvmStatsReport { total, vcpus, source: tracked.source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(exits: u64) -> KvmExitCounts {
        KvmExitCounts { exits, halt_exits: exits / 10, ..Default::default() }
    }

    #[test]
    fn a_process_seen_running_counts_from_its_first_sample_and_a_new_one_from_zero() {
        let mut tracker = KvmStatsTracker::default();
        tracker.sample(1, false, Some(&BTreeMap::from([(0, counts(100))])));
        tracker.sample(1, false, Some(&BTreeMap::from([(0, counts(150)), (1, counts(40))])));
        tracker.sample(2, true, Some(&BTreeMap::from([(0, counts(30))])));
        let old = tracker.report(1).unwrap();
        assert_eq!(old.vcpus, BTreeMap::from([(0, counts(50)), (1, counts(0))]));
        assert_eq!(old.total.exits, 50);
        assert_eq!(tracker.report(2).unwrap().total, counts(30));
        assert_eq!(tracker.report(3), None);
    }
}
