//! What /proc says about KVM processes: which processes own a KVM VM, their names, and
//! how many vCPUs they have (file descriptors `anon_inode:kvm-vm` / `anon_inode:kvm-vcpu:N`,
//! which any VMM has: ours, QEMU, Firecracker, cloud-hypervisor).

use std::fs;
use std::path::PathBuf;

/// A process as /proc describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Short name (`comm`).
    pub name: String,
    /// Command line, arguments joined by spaces (empty for zombies and kernel threads).
    pub cmdline: String,
    /// Number of KVM VM file descriptors.
    pub vms: u32,
    /// Number of KVM vCPU file descriptors.
    pub vcpus: u32,
}

impl ProcessInfo {
    /// Whether the process owns a KVM VM.
    pub fn is_kvm(&self) -> bool {
        self.vms > 0
    }
}

fn proc_dir(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

/// Whether a process lives (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(proc_dir(pid).join("stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Reads a process's info; `None` if it does not exist (any more).
pub fn process_info(pid: u32) -> Option<ProcessInfo> {
    let dir = proc_dir(pid);
    let name = fs::read_to_string(dir.join("comm")).ok()?.trim_end().to_string();
    let cmdline = fs::read(dir.join("cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let (mut vms, mut vcpus) = (0, 0);
    if let Ok(fds) = fs::read_dir(dir.join("fd")) {
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            let target = target.to_string_lossy();
            if target == "anon_inode:kvm-vm" {
                vms += 1;
            } else if target.starts_with("anon_inode:kvm-vcpu:") {
                vcpus += 1;
            }
        }
    }
    Some(ProcessInfo { pid, name, cmdline, vms, vcpus })
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc_dir(pid).join("stat")).ok()?;
    // The fields after the command name (which may contain spaces) in parentheses:
    // state is field 3, so starttime (22) is the 20th.
    stat.rsplit_once(") ")?.1.split_whitespace().nth(19)?.parse().ok()
}

/// All processes that own a KVM VM right now.
pub fn kvm_processes() -> Vec<ProcessInfo> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut found: Vec<ProcessInfo> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process_info)
        .filter(ProcessInfo::is_kvm)
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_told_apart_from_zombies() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie, which is not alive.
        while fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
            std::thread::yield_now();
        }
        assert!(!process_alive(pid));
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn our_own_process_is_described_and_is_not_a_vm() {
        let me = process_info(std::process::id()).expect("/proc/self");
        assert_eq!(me.pid, std::process::id());
        assert!(!me.name.is_empty());
        assert!(!me.is_kvm());
        assert_eq!(me.vcpus, 0);
        assert!(process_info(u32::MAX).is_none());
    }
}
