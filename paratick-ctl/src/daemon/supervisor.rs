//! VM processes: the daemon runs each VM as a `paratick-vmm serve` process of its own,
//! so that VMs outlive the daemon (a restart, an upgrade, a crash). This module starts
//! them, finds running ones again when the daemon starts, asks them over their sockets
//! (`paratick_vmm::control`) and learns how they ended.
//!
//! Two ways of starting them ([`VmLauncher`]):
//! - `systemd`: each VM is an instance of the template unit `paratick-vm@.service`,
//!   whose `StopPropagatedFrom=paratick.service` stops the VMs with the daemon's
//!   service but not on its restart (which `PartOf=` would). The daemon writes the
//!   instance's arguments to `NAME.env` and runs `systemctl start`.
//! - `process`: the daemon spawns the VM process itself, in a process group of its own
//!   (a terminal's Ctrl-C or a `kill -9` of the daemon does not reach it). Without a
//!   service manager to stop them, the daemon stops its VMs when it is told to stop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use paratick_vmm::control::{self, ControlError, Reply, VmAnswer, VmEnd, VmProcessStatus, VmReply, VmRequest};
use paratick_vmm::{Lifecycle, VmConfig};

use paratick_observer::procfs::process_alive;

/// The template unit of VM processes under systemd.
pub const VM_UNIT_TEMPLATE: &str = "paratick-vm@.service";

/// How long a request to a VM process may take, each way.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a VM process may take to come up, or to go after a stop.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a starting or stopping VM process is looked at.
const POLL: Duration = Duration::from_millis(20);

/// How the daemon starts VM processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "kebab-case")]
pub enum VmLauncher {
    /// As instances of `paratick-vm@.service`.
    Systemd,
    /// As processes of the daemon's own.
    Process,
}

impl VmLauncher {
    /// Name in the configuration and in `status`.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// `auto`: systemd when the daemon runs as a systemd service (systemd sets
    /// `INVOCATION_ID` for the processes of a unit) on a host booted with systemd.
    pub fn detect() -> VmLauncher {
        if std::env::var_os("INVOCATION_ID").is_some() && Path::new("/run/systemd/system").is_dir() {
            VmLauncher::Systemd
        } else {
            VmLauncher::Process
        }
    }
}

/// A VM process the daemon knows of.
#[derive(Debug)]
pub struct VmProcess {
    /// Its process id.
    pub pid: u32,
    /// The process, when this daemon spawned it (then its exit status is known).
    child: Option<Child>,
}

impl VmProcess {
    /// A process this daemon did not spawn (adopted, or a systemd unit's).
    pub fn found(pid: u32) -> VmProcess {
        VmProcess { pid, child: None }
    }
}

/// Where a VM process was asked and what it said.
pub enum Probe {
    /// It answered.
    Status(Box<VmProcessStatus>),
    /// It is alive but did not answer (starting, stopping, or busy): ask again later.
    Silent(String),
    /// It is gone; this is how it ended.
    Ended(Box<VmEnd>),
}

/// What the daemon's manager asks of its VM processes: the boundary between the
/// manager's bookkeeping and real processes, sockets and units (faked in its tests).
pub trait VmProcesses: Sync {
    /// How VMs are started.
    fn launcher(&self) -> VmLauncher;

    /// Sends one request to VM `name`'s process.
    fn request(&self, name: &str, request: &VmRequest) -> Result<VmReply, ControlError>;

    /// Finds VM `name`'s process if one is running (the daemon was restarted, or
    /// killed, while it ran), or the record of how it ended.
    fn adopt(&self, name: &str) -> Option<Result<(VmProcess, Box<VmProcessStatus>), VmEnd>>;

    /// Forgets how VM `name` ended last (so that the next daemon start starts it again).
    fn forget_end(&self, name: &str);

    /// Starts a process for `config` and waits until it answers.
    fn start(&self, config: &VmConfig) -> Result<(VmProcess, Box<VmProcessStatus>), String>;

    /// Asks VM `name`'s process for its status, and learns how it ended if it is gone.
    fn probe(&self, name: &str, process: &mut VmProcess) -> Probe;

    /// Stops VM `name`'s process and returns how it ended.
    fn stop(&self, name: &str, process: &mut VmProcess) -> VmEnd;
}

/// Starts, finds and asks VM processes kept in one runtime directory.
pub struct Supervisor {
    launcher: VmLauncher,
    runtime_dir: PathBuf,
    vmm_binary: PathBuf,
}

impl Supervisor {
    /// A supervisor of the VM processes in `runtime_dir`.
    pub fn new(launcher: VmLauncher, runtime_dir: PathBuf) -> Supervisor {
        // Installed side by side (xtask install), and built side by side.
        let vmm_binary = std::env::current_exe()
            .map(|exe| exe.with_file_name("paratick-vmm"))
            .unwrap_or_else(|_| PathBuf::from("paratick-vmm"));
        Supervisor { launcher, runtime_dir, vmm_binary }
    }

    fn socket(&self, name: &str) -> PathBuf {
        control::socket_path(&self.runtime_dir, name)
    }

    fn spawn(&self, config: &VmConfig) -> Result<VmProcess, String> {
        use std::os::unix::process::CommandExt;
        let child = Command::new(&self.vmm_binary)
            .arg("serve")
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .args(control::serve_args(config))
            .stdin(Stdio::null())
            // The service manager's notification socket and watchdog are the daemon's:
            // a VM process telling them READY=1 would speak for the daemon.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.vmm_binary.display()))?;
        Ok(VmProcess { pid: child.id(), child: Some(child) })
    }

    fn unit(name: &str) -> String {
        VM_UNIT_TEMPLATE.replace('@', &format!("@{name}"))
    }

    fn start_unit(&self, config: &VmConfig) -> Result<VmProcess, String> {
        let env = self.runtime_dir.join(format!("{}.env", config.name));
        // systemd splits an unquoted $VARIABLE on white space: the arguments have none
        // (VM names are letters, digits, '-' and '_').
        let text = format!("PARATICK_VM_ARGS={}\n", control::serve_args(config).join(" "));
        std::fs::write(&env, text).map_err(|e| format!("cannot write {}: {e}", env.display()))?;
        let unit = Supervisor::unit(&config.name);
        // Blocks until the instance is ready (Type=notify) or has failed.
        let output = Command::new("systemctl")
            .args(["start", &unit])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run systemctl: {e}"))?;
        if !output.status.success() {
            let why = String::from_utf8_lossy(&output.stderr).trim().replace('\n', " ");
            return Err(control::read_end(&self.runtime_dir, &config.name)
                .and_then(Result::ok)
                .and_then(|end| end.lifecycle.error().map(str::to_string))
                .unwrap_or(format!("systemctl start {unit} failed: {why}")));
        }
        let pid = unit_property(&unit, "MainPID").and_then(|pid| pid.parse().ok()).unwrap_or(0);
        Ok(VmProcess { pid, child: None })
    }

    /// `None` while the process lives; else how it exited, as far as can be known.
    fn exit_status(&self, name: &str, process: &mut VmProcess) -> Option<String> {
        if let Some(child) = &mut process.child {
            return match child.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some(status.to_string()),
                Err(e) => Some(format!("unknown ({e})")),
            };
        }
        if process.pid != 0 && process_alive(process.pid) {
            return None;
        }
        Some(match self.launcher {
            VmLauncher::Systemd => {
                let unit = Supervisor::unit(name);
                let result = unit_property(&unit, "Result").unwrap_or_else(|| "?".into());
                let code = unit_property(&unit, "ExecMainStatus").unwrap_or_else(|| "?".into());
                format!("{unit} result {result}, exit status {code}")
            }
            VmLauncher::Process => "exit status unknown (it was started by an earlier daemon)".into(),
        })
    }
}

impl VmProcesses for Supervisor {
    fn launcher(&self) -> VmLauncher {
        self.launcher
    }

    fn request(&self, name: &str, request: &VmRequest) -> Result<VmReply, ControlError> {
        control::request(&self.socket(name), request, REQUEST_TIMEOUT)
    }

    fn adopt(&self, name: &str) -> Option<Result<(VmProcess, Box<VmProcessStatus>), VmEnd>> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut said_slow = false;
        loop {
            match self.request(name, &VmRequest::Status {}) {
                Ok(Reply::Done(VmAnswer { status: Some(status) })) => {
                    return Some(Ok((VmProcess::found(status.pid), Box::new(status))))
                }
                // Nothing listens: a socket left by a killed process is stale.
                Err(ControlError::Connect { .. }) => break,
                // Something listens but does not answer in time: a VM process on a busy
                // host. It is asked again and its socket kept (removing it would cut off
                // a live VM, and the daemon would start a second one beside it).
                Err(e) if Instant::now() < deadline => {
                    if !said_slow {
                        log::warn!("VM {name}: its process is slow to answer ({e}); asking again");
                        said_slow = true;
                    }
                    // A reply that fails at once (a reset) is not asked again in a tight loop.
                    std::thread::sleep(POLL);
                }
                answer => {
                    let why = answer.map_or_else(|e| e.to_string(), |_| "a reply without a status".to_string());
                    let error = format!(
                        "its VM process listens but did not answer within {START_TIMEOUT:?} ({why}): not adopted, and \
                         not started again beside it"
                    );
                    return Some(Err(VmEnd {
                        name: name.into(),
                        pid: 0,
                        lifecycle: Lifecycle::Failed(error),
                        counters: None,
                    }));
                }
            }
        }
        let _ = std::fs::remove_file(self.socket(name));
        match control::read_end(&self.runtime_dir, name)? {
            Ok(end) => Some(Err(end)),
            Err(e) => {
                log::warn!("VM {name}: {e}");
                None
            }
        }
    }

    fn forget_end(&self, name: &str) {
        let _ = std::fs::remove_file(control::end_path(&self.runtime_dir, name));
    }

    fn start(&self, config: &VmConfig) -> Result<(VmProcess, Box<VmProcessStatus>), String> {
        std::fs::create_dir_all(&self.runtime_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.runtime_dir.display()))?;
        self.forget_end(&config.name);
        let mut process = match self.launcher {
            VmLauncher::Process => self.spawn(config)?,
            VmLauncher::Systemd => self.start_unit(config)?,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.probe(&config.name, &mut process) {
                Probe::Status(status) => return Ok((process, status)),
                Probe::Ended(end) => {
                    return Err(match end.lifecycle {
                        Lifecycle::Failed(error) => error,
                        ended => format!("the VM process ended at once ({})", ended.state()),
                    })
                }
                Probe::Silent(why) if Instant::now() >= deadline => {
                    return Err(format!("the VM process did not answer within {START_TIMEOUT:?}: {why}"))
                }
                Probe::Silent(_) => std::thread::sleep(POLL),
            }
        }
    }

    fn probe(&self, name: &str, process: &mut VmProcess) -> Probe {
        match self.request(name, &VmRequest::Status {}) {
            Ok(Reply::Done(VmAnswer { status: Some(status) })) => {
                process.pid = status.pid;
                Probe::Status(Box::new(status))
            }
            Ok(reply) => Probe::Silent(reply.refusal().unwrap_or("a reply without a status").to_string()),
            Err(e) => match self.exit_status(name, process) {
                None => Probe::Silent(e.to_string()),
                Some(how) => {
                    let end = match control::read_end(&self.runtime_dir, name) {
                        Some(Ok(end)) if end.pid == process.pid || process.pid == 0 => end,
                        _ => VmEnd {
                            name: name.to_string(),
                            pid: process.pid,
                            lifecycle: Lifecycle::Failed(format!(
                                "the VM process {} ended without saying how: {how}",
                                process.pid
                            )),
                            counters: None,
                        },
                    };
                    Probe::Ended(Box::new(end))
                }
            },
        }
    }

    fn stop(&self, name: &str, process: &mut VmProcess) -> VmEnd {
        if let Err(e) = self.request(name, &VmRequest::Stop {}) {
            log::warn!("VM {name}: stop request: {e}; sending SIGTERM to {}", process.pid);
            if process.pid != 0 {
                let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Probe::Ended(end) = self.probe(name, process) {
                return *end;
            }
            if Instant::now() >= deadline {
                if process.pid == 0 {
                    let lifecycle =
                        Lifecycle::Failed("the VM process did not exit after a stop, and its pid is unknown".into());
                    return VmEnd { name: name.into(), pid: 0, lifecycle, counters: None };
                }
                log::error!("VM {name}: the process {} did not exit after a stop: killing it", process.pid);
                let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(POLL);
        }
    }
}

/// One property of a unit (`systemctl show --value`).
fn unit_property(unit: &str, property: &str) -> Option<String> {
    let output = Command::new("systemctl").args(["show", unit, "--value", "--property", property]).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_named_by_instance() {
        assert_eq!(Supervisor::unit("web-1"), "paratick-vm@web-1.service");
    }

    fn runtime_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("paratick-supervisor-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_vm_process_slow_to_answer_is_adopted_and_keeps_its_socket() {
        use std::io::{BufRead, Write};
        let dir = runtime_dir("slow");
        let supervisor = Supervisor::new(VmLauncher::Process, dir.clone());
        let listener = std::os::unix::net::UnixListener::bind(supervisor.socket("a")).unwrap();
        // A VM process on a busy host: it answers the first request after the request
        // timeout, the next one at once.
        let vm = std::thread::spawn(move || {
            for delay in [REQUEST_TIMEOUT + Duration::from_millis(500), Duration::ZERO] {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&stream).read_line(&mut line).unwrap();
                std::thread::sleep(delay);
                let status = VmProcessStatus {
                    name: "a".into(),
                    pid: 4242,
                    lifecycle: Lifecycle::Running,
                    halted_vcpus: 0,
                    uptime_s: 1.0,
                    counters: paratick_vmm::Counters::default(),
                };
                let reply = VmReply::Done(VmAnswer { status: Some(status) });
                let _ = writeln!(&stream, "{}", serde_json::to_string(&reply).unwrap());
            }
        });
        let (process, status) = supervisor.adopt("a").unwrap().unwrap();
        assert_eq!((process.pid, status.lifecycle), (4242, Lifecycle::Running));
        assert!(supervisor.socket("a").exists(), "a live VM's socket is kept");
        vm.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_socket_is_removed_and_the_end_record_read() {
        let dir = runtime_dir("stale");
        let supervisor = Supervisor::new(VmLauncher::Process, dir.clone());
        drop(std::os::unix::net::UnixListener::bind(supervisor.socket("a")).unwrap());
        assert!(supervisor.adopt("a").is_none(), "no end record: not adopted, free to start");
        assert!(!supervisor.socket("a").exists());
        let end = VmEnd { name: "b".into(), pid: 7, lifecycle: Lifecycle::Failed("gone".into()), counters: None };
        control::write_end(&dir, &end).unwrap();
        assert_eq!(supervisor.adopt("b").unwrap().unwrap_err().lifecycle.error(), Some("gone"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
