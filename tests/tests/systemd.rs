//! The daemon under a real systemd 252: PID 1 of its own PID, mount, network, UTS and
//! IPC namespaces, on a root of its own (an overlay of the host's / with a tmpfs upper
//! layer), so that its boot units act on the overlay, never on the host's files. /dev
//! and /sys are the host's (KVM, tracefs and cgroups); the units that would act on
//! them (udev, tmpfiles for /dev, sysctl, modules, binfmt) are masked.
//!
//! Install (`xtask install --root`) → enable → start → `vm list` → set-tick-rate →
//! restart (the VMs survive, same pids, the rate kept) → reload (nothing touched) → stop
//! (the VMs stop, within TimeoutStopSec).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use paratick_tests::{one_vm_at_a_time, workspace_binary};
use serde_json::Value;

/// Units masked in the container: they would act on the host's /dev, /sys or kernel.
const MASKED: [&str; 12] = [
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-tmpfiles-setup-dev.service",
    "kmod-static-nodes.service",
    "systemd-modules-load.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-remount-fs.service",
];

/// The target the container boots: nothing but itself (the test starts the rest).
const TARGET: &str = "paratick-test.target";

struct Container {
    /// `unshare`, whose child is the container's PID 1.
    unshare: Child,
    /// The cgroups at the top of each host hierarchy before the container booted: its
    /// systemd creates its own there (no cgroup namespace), and they go with it.
    host_cgroups: Vec<PathBuf>,
    /// PID 1 of the container, as the host sees it.
    init: u32,
    /// The host directory holding the overlay's mount point (empty on the host).
    dir: PathBuf,
}

impl Container {
    fn boot() -> Container {
        let host_cgroups = top_cgroups();
        let dir = std::env::temp_dir().join(format!("paratick-systemd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let masks: String =
            MASKED.iter().map(|unit| format!("ln -sf /dev/null $M/etc/systemd/system/{unit}\n")).collect();
        // Everything is mounted in the new mount namespace (private propagation), so it
        // all goes with the container.
        let script = format!(
            r#"set -e
R={dir}
mount -t tmpfs paratick-test $R
mkdir -p $R/upper $R/work $R/merged
mount -t overlay overlay -o lowerdir=/,upperdir=$R/upper,workdir=$R/work $R/merged
M=$R/merged
mount --rbind /dev $M/dev
mount --rbind /sys $M/sys
mount -t tmpfs tmpfs $M/run
mount -t tmpfs tmpfs $M/tmp
mkdir -p $M/etc/systemd/system
printf '[Unit]\nDescription=Paratick test target\nDefaultDependencies=no\n' > $M/etc/systemd/system/{TARGET}
{masks}mount -t proc proc $M/proc
exec chroot $M /usr/bin/env container=other /lib/systemd/systemd --system --unit={TARGET}
"#,
            dir = dir.display()
        );
        let log =
            std::fs::File::create(std::env::temp_dir().join(format!("paratick-systemd-{}.log", std::process::id())))
                .unwrap();
        let unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--mount", "--net", "--uts", "--ipc", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare (util-linux)");
        // PID 1 of the container is unshare's child.
        let deadline = Instant::now() + Duration::from_secs(30);
        let init = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    break pid;
                }
            }
            assert!(Instant::now() < deadline, "systemd did not start in the container");
            std::thread::sleep(Duration::from_millis(50));
        };
        let container = Container { unshare, host_cgroups, init, dir };
        // The manager answers once it has started the target.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = container.run(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(Instant::now() < deadline, "systemd in the container is {state:?}, not running");
            std::thread::sleep(Duration::from_millis(100));
        }
        container
    }

    /// Runs a command in the container (its namespaces and root).
    fn run(&self, command: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "-r", "-w"])
            .args(command)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// Runs a command that must succeed, and returns its stdout.
    fn check(&self, command: &[&str]) -> String {
        let output = self.run(command);
        assert!(output.status.success(), "{command:?} failed: {output:?}\n{}", self.journal());
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The container's root, from the host.
    fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.init))
    }

    fn journal(&self) -> String {
        let output = self.run(&["journalctl", "--no-pager", "-n", "60", "-u", "paratick", "-u", "paratick-vm@*"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn vms(&self) -> Vec<Value> {
        serde_json::from_str(&self.check(&["/usr/local/bin/paratick-ctl", "vm", "list", "--json"])).unwrap()
    }

    fn main_pid(&self, unit: &str) -> u32 {
        self.check(&["systemctl", "show", unit, "--value", "--property", "MainPID"]).trim().parse().unwrap()
    }

    fn active(&self, unit: &str) -> String {
        String::from_utf8_lossy(&self.run(&["systemctl", "is-active", unit]).stdout).trim().to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGKILL to PID 1 ends every process of the PID namespace, and with them the
        // mount namespace and the overlay.
        let _ = kill(Pid::from_raw(self.init as i32), Signal::SIGKILL);
        let _ = self.unshare.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        // The container's cgroups (and the BPF programs its units attached to them).
        // Their processes are gone, so they can be removed, deepest first.
        for cgroup in top_cgroups().into_iter().filter(|c| !self.host_cgroups.contains(c)) {
            remove_cgroup(&cgroup);
        }
    }
}

/// The directories at the top of every cgroup hierarchy of the host.
fn top_cgroups() -> Vec<PathBuf> {
    let hierarchies = std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten();
    hierarchies
        .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

fn remove_cgroup(cgroup: &Path) {
    for child in std::fs::read_dir(cgroup).into_iter().flatten().flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&child.path());
        }
    }
    let _ = std::fs::remove_dir(cgroup);
}

fn pids(vms: &[Value]) -> Vec<(String, u64)> {
    vms.iter().map(|vm| (vm["name"].as_str().unwrap().to_string(), vm["pid"].as_u64().unwrap_or(0))).collect()
}

#[test]
fn under_systemd_vms_survive_a_restart_and_stop_with_the_service() {
    let _lock = one_vm_at_a_time();
    let container = Container::boot();
    let root = container.root();
    let xtask = workspace_binary("xtask");
    assert!(xtask.exists(), "{} is built by `cargo xtask`", xtask.display());
    let binaries = workspace_binary("paratick-ctl").parent().unwrap().to_path_buf();
    let install =
        Command::new(&xtask).args(["install", "--root"]).arg(&root).arg("--binaries").arg(&binaries).output().unwrap();
    assert!(install.status.success(), "{install:?}");
    assert!(Path::new(&root).join("etc/systemd/system/paratick-vm@.service").exists());
    let man = std::fs::read_to_string(Path::new(&root).join("usr/local/share/man/man1/paratick-ctl.1")).unwrap();
    assert!(man.starts_with(".ie") || man.contains(".TH paratick-ctl"), "a man page: {}", &man[..man.len().min(200)]);
    let vm_list = std::fs::read_to_string(Path::new(&root).join("usr/local/share/man/man1/paratick-ctl-vm-list.1"));
    assert!(vm_list.unwrap().contains("EXIT STATUS"), "a page per command");
    let bash =
        std::fs::read_to_string(Path::new(&root).join("usr/local/share/bash-completion/completions/paratick-ctl"));
    assert!(bash.unwrap().contains("set-tick-rate"), "bash completions know the subcommands");
    container.check(&["systemctl", "daemon-reload"]);
    container.check(&["systemctl", "enable", "paratick.service"]);
    container.check(&["systemctl", "start", "paratick.service"]);

    // The observer loads under the unit's sandbox (capabilities, system call filter).
    let status: Value =
        serde_json::from_str(&container.check(&["/usr/local/bin/paratick-ctl", "status", "--json"])).unwrap();
    assert_eq!(status["observer"], "attached", "{status}");
    assert_eq!(status["vm_launcher"], "systemd", "{status}");

    // The embedded default: a tickless and two paratick VMs, each in its own unit.
    let vms = container.vms();
    let before = pids(&vms);
    assert_eq!(before.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), ["tickless", "paratick", "contended"]);
    for (name, pid) in &before {
        let unit = format!("paratick-vm@{name}.service");
        assert_eq!(container.active(&unit), "active", "{}", container.journal());
        assert_eq!(u64::from(container.main_pid(&unit)), *pid, "vm list shows the unit's process");
    }
    assert!(vms.iter().all(|vm| vm["state"] == "running"), "{vms:?}");
    container.check(&["/usr/local/bin/paratick-ctl", "vm", "set-tick-rate", "paratick", "100"]);

    let daemon = container.main_pid("paratick.service");
    container.check(&["systemctl", "restart", "paratick.service"]);
    assert_ne!(container.main_pid("paratick.service"), daemon, "a new daemon");
    let vms = container.vms();
    assert_eq!(pids(&vms), before, "the same VM processes after the restart:\n{}", container.journal());
    let paratick = vms.iter().find(|vm| vm["name"] == "paratick").unwrap();
    assert_eq!(paratick["configured_hz"], 100, "the operator's rate lives in the VM: {paratick}");
    let kept = container.check(&["cat", "/var/lib/paratick/state.json"]);
    assert!(kept.contains("\"operator_hz\": 100"), "and in the state directory: {kept}");

    // A reload of the unchanged file (ExecReload=, SIGHUP) touches nothing.
    let daemon = container.main_pid("paratick.service");
    container.check(&["systemctl", "reload", "paratick.service"]);
    assert_eq!(container.main_pid("paratick.service"), daemon, "the same daemon after a reload");
    assert_eq!(container.active("paratick.service"), "active");
    assert_eq!(pids(&container.vms()), before, "the same VM processes after a reload");

    let started = Instant::now();
    container.check(&["systemctl", "stop", "paratick.service"]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "stopped within TimeoutStopSec: {took:?}");
    for (name, _) in &before {
        let state = container.active(&format!("paratick-vm@{name}.service"));
        assert_eq!(state, "inactive", "VM {name} stopped with the service:\n{}", container.journal());
    }
    let journal = container.journal();
    assert!(journal.contains("paratick daemon stopped"), "{journal}");
    assert!(!journal.contains("SIGKILL"), "nothing had to be killed: {journal}");

    // The daemon and the VM processes log to the journal itself, with each message's
    // priority and origin (stderr lines would all be priority 6, without TARGET).
    for unit in ["paratick", "paratick-vm@paratick"] {
        let entries = container.check(&["journalctl", "--no-pager", "-o", "json", "-u", unit]);
        let logged: Vec<Value> = entries
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|entry| entry.get("TARGET").is_some())
            .collect();
        assert!(!logged.is_empty(), "{unit}: no entries from the journal logger:\n{entries}");
        // The logger's mapping: error 3, warn 4, info 5 (notice), debug 6, trace 7.
        let priorities = ["3", "4", "5"];
        assert!(logged.iter().all(|e| priorities.contains(&e["PRIORITY"].as_str().unwrap())), "{logged:?}");
        if unit == "paratick" {
            let stopped = logged.iter().find(|e| e["MESSAGE"] == "paratick daemon stopped").expect("stop message");
            assert_eq!(stopped["PRIORITY"], "5", "info: {stopped}");
        }
    }
}
