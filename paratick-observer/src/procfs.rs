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
    /// Who the process says its VM is.
    pub vm: VmIdentity,
}

/// A VM's name as its VMM's command line gives it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct VmIdentity {
    /// QEMU's and libvirt's `-name guest=NAME` or `-name NAME`, paratick-vmm's `--name
    /// NAME`; for any other process its name and pid (`firecracker:4242`).
    pub name: String,
    /// The VMM: `qemu`, `paratick-vmm`, or the process name.
    pub vmm: String,
    /// QEMU's `-uuid`, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

impl VmIdentity {
    /// Reads the identity from a process's name (`comm`) and arguments.
    pub fn from_args(pid: u32, comm: &str, args: &[String]) -> VmIdentity {
        let value_of = |flags: &[&str]| args.windows(2).find(|w| flags.contains(&w[0].as_str())).map(|w| w[1].as_str());
        let program = args.first().map(|a| a.rsplit('/').next().unwrap_or(a)).unwrap_or(comm);
        let (vmm, name) = if program.starts_with("qemu") || comm.starts_with("qemu") {
            ("qemu".to_string(), value_of(&["-name", "--name"]).and_then(qemu_guest_name))
        } else if program == "paratick-vmm" {
            ("paratick-vmm".to_string(), value_of(&["--name"]).map(str::to_string))
        } else {
            (comm.to_string(), None)
        };
        let uuid = if vmm == "qemu" { value_of(&["-uuid", "--uuid"]).map(str::to_string) } else { None };
        VmIdentity { name: name.filter(|n| !n.is_empty()).unwrap_or_else(|| format!("{comm}:{pid}")), vmm, uuid }
    }
}

/// The guest name of QEMU's `-name` value: `guest=NAME,debug-threads=on`, `NAME`, or
/// `NAME,process=...` (a comma in a value is written `,,`).
fn qemu_guest_name(value: &str) -> Option<String> {
    // Split on single commas; ",," is a literal comma.
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                parts.last_mut().expect("one part at least").push(',');
            }
            ',' => parts.push(String::new()),
            c => parts.last_mut().expect("one part at least").push(c),
        }
    }
    let explicit = parts.iter().find_map(|p| p.strip_prefix("guest=").map(str::to_string));
    explicit.or_else(|| parts.into_iter().next().filter(|first| !first.contains('=')))
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

/// What one read of `/proc/PID/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// It has exited and waits to be reaped.
    pub zombie: bool,
    /// When it started, in clock ticks since boot (field 22).
    pub start_ticks: u64,
}

/// A process's state and start time; `None` if it does not exist (any more).
pub fn stat(pid: u32) -> Option<ProcStat> {
    let stat = fs::read_to_string(proc_dir(pid).join("stat")).ok()?;
    // The fields after the command name (which may contain spaces) in parentheses:
    // state is field 3, so starttime (22) is the 20th.
    let fields = stat.rsplit_once(") ")?.1;
    let start_ticks = fields.split_whitespace().nth(19)?.parse().ok()?;
    Some(ProcStat { zombie: fields.starts_with('Z'), start_ticks })
}

/// Whether a process lives (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|stat| !stat.zombie)
}

/// Reads a process's info; `None` if it does not exist (any more).
pub fn process_info(pid: u32) -> Option<ProcessInfo> {
    let dir = proc_dir(pid);
    let name = fs::read_to_string(dir.join("comm")).ok()?.trim_end().to_string();
    let args: Vec<String> = fs::read(dir.join("cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let cmdline = args.join(" ");
    let vm = VmIdentity::from_args(pid, &name, &args);
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
    Some(ProcessInfo { pid, name, cmdline, vms, vcpus, vm })
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|stat| stat.start_ticks)
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
    fn vms_are_named_as_their_vmm_names_them() {
        let args = |line: &str| line.split(' ').map(str::to_string).collect::<Vec<_>>();
        let id = |comm: &str, line: &str| VmIdentity::from_args(42, comm, &args(line));
        let libvirt = id(
            "qemu-system-x86",
            "/usr/bin/qemu-system-x86_64 -name guest=alpha,debug-threads=on -uuid 4f1c7e1a-9d1b-4c1e-8a40-6f3c2a1b0c9d -m 256",
        );
        assert_eq!(
            libvirt,
            VmIdentity {
                name: "alpha".into(),
                vmm: "qemu".into(),
                uuid: Some("4f1c7e1a-9d1b-4c1e-8a40-6f3c2a1b0c9d".into())
            }
        );
        assert_eq!(id("qemu-system-x86", "qemu-system-x86_64 -enable-kvm -name beta").name, "beta");
        assert_eq!(id("qemu-system-x86", "qemu-system-x86_64 -name web,,1,process=qemu-web").name, "web,1");
        assert_eq!(id("qemu-system-x86", "qemu-system-x86_64 -name process=qemu-x,guest=gamma").name, "gamma");
        // No name: the process name and pid.
        assert_eq!(
            id("qemu-system-x86", "qemu-system-x86_64 -enable-kvm -m 256"),
            VmIdentity { name: "qemu-system-x86:42".into(), vmm: "qemu".into(), uuid: None }
        );
        assert_eq!(id("qemu-system-x86", "qemu-system-x86_64 -name process=only").name, "qemu-system-x86:42");
        let ours = id("paratick-vmm", "/usr/local/bin/paratick-vmm serve --runtime-dir /run/paratick/vms --name c");
        assert_eq!((ours.name.as_str(), ours.vmm.as_str()), ("c", "paratick-vmm"));
        assert_eq!(id("firecracker", "firecracker --api-sock /tmp/f.sock").name, "firecracker:42");
        assert_eq!(id("cloud-hypervis", "cloud-hypervisor --name x").vmm, "cloud-hypervis");
    }

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
        // A zombie still says when it started: the same as while it ran, after ours.
        let zombie = stat(pid).unwrap();
        assert!(zombie.zombie && zombie.start_ticks >= start_ticks(std::process::id()).unwrap());
        child.wait().unwrap();
        assert!(!process_alive(pid));
        assert_eq!((stat(pid), start_ticks(pid)), (None, None));
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
