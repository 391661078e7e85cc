//! The manager's bookkeeping against fake VM processes and a fake event source:
//! what it asks of them, what it answers, and the metrics it renders.

use std::collections::BTreeSet;
use std::sync::Mutex;

use paratick_vmm::control::{ControlError, VmAnswer, VmReply};

use super::*;
use crate::fake_events::FakeEvents;

/// VM processes as a map: each "process" is a status the fake answers with.
struct FakeProcesses {
    launcher: VmLauncher,
    running: Mutex<BTreeMap<String, VmProcessStatus>>,
    ends: Mutex<BTreeMap<String, VmEnd>>,
    /// VMs whose start fails.
    broken: BTreeSet<String>,
    /// What the manager asked, in order.
    asked: Mutex<Vec<String>>,
}

impl FakeProcesses {
    fn new(launcher: VmLauncher) -> FakeProcesses {
        FakeProcesses {
            launcher,
            running: Mutex::default(),
            ends: Mutex::default(),
            broken: BTreeSet::new(),
            asked: Mutex::default(),
        }
    }

    fn status(name: &str, pid: u32) -> VmProcessStatus {
        VmProcessStatus {
            name: name.into(),
            pid,
            lifecycle: Lifecycle::Running,
            halted_vcpus: 0,
            uptime_s: 1.0,
            counters: Counters::default(),
        }
    }

    fn ask(&self, what: String) {
        self.asked.lock().unwrap().push(what);
    }

    fn asked(&self) -> Vec<String> {
        std::mem::take(&mut *self.asked.lock().unwrap())
    }

    /// The VM process of `name` ends by itself (the guest failed).
    fn fail(&self, name: &str, error: &str) {
        let status = self.running.lock().unwrap().remove(name).unwrap();
        let end =
            VmEnd { name: name.into(), pid: status.pid, lifecycle: Lifecycle::Failed(error.into()), counters: None };
        self.ends.lock().unwrap().insert(name.into(), end);
    }
}

impl VmProcesses for FakeProcesses {
    fn launcher(&self) -> VmLauncher {
        self.launcher
    }

    fn request(&self, name: &str, request: &VmRequest) -> Result<VmReply, ControlError> {
        self.ask(format!("{name}: {}", serde_json::to_string(request).unwrap()));
        let mut running = self.running.lock().unwrap();
        let Some(status) = running.get_mut(name) else {
            let source = std::io::Error::from(std::io::ErrorKind::NotFound);
            return Err(ControlError::Connect { path: format!("/fake/{name}.sock").into(), source });
        };
        Ok(match request {
            VmRequest::Status {} => VmReply::Done(VmAnswer { status: Some(status.clone()) }),
            VmRequest::SetTickRate { hz: Some(hz) } if !(10..=4000).contains(hz) => {
                VmReply::error(format!("the tick rate must be 10 to 4000 Hz, not {hz}"))
            }
            VmRequest::SetTickRate { hz } => {
                status.counters.operator_hz = *hz;
                VmReply::ok()
            }
            VmRequest::Stop {} => unreachable!("the manager stops VMs by stop()"),
        })
    }

    fn adopt(&self, name: &str) -> Option<Result<(VmProcess, Box<VmProcessStatus>), VmEnd>> {
        if let Some(status) = self.running.lock().unwrap().get(name) {
            return Some(Ok((VmProcess::found(status.pid), Box::new(status.clone()))));
        }
        self.ends.lock().unwrap().get(name).cloned().map(Err)
    }

    fn forget_end(&self, name: &str) {
        self.ask(format!("{name}: forget end"));
        self.ends.lock().unwrap().remove(name);
    }

    fn start(&self, config: &VmConfig) -> Result<(VmProcess, Box<VmProcessStatus>), String> {
        self.ask(format!("{}: start", config.name));
        if self.broken.contains(&config.name) {
            return Err("paratick-vmm exited with status 1".into());
        }
        // A new pid for every process, as the kernel gives (none of the host's: above
        // its usual pid_max of 4194304).
        static NEXT_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(5_000_000);
        let pid = NEXT_PID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut status = FakeProcesses::status(&config.name, pid);
        status.counters.operator_hz = config.operator_hz;
        self.running.lock().unwrap().insert(config.name.clone(), status.clone());
        Ok((VmProcess::found(pid), Box::new(status)))
    }

    fn probe(&self, name: &str, _process: &mut VmProcess) -> Probe {
        if let Some(status) = self.running.lock().unwrap().get(name) {
            return Probe::Status(Box::new(status.clone()));
        }
        match self.ends.lock().unwrap().get(name) {
            Some(end) => Probe::Ended(Box::new(end.clone())),
            None => Probe::Silent("starting".into()),
        }
    }

    fn stop(&self, name: &str, process: &mut VmProcess) -> VmEnd {
        self.ask(format!("{name}: stop"));
        self.running.lock().unwrap().remove(name);
        let end = VmEnd { name: name.into(), pid: process.pid, lifecycle: Lifecycle::Stopped, counters: None };
        self.ends.lock().unwrap().insert(name.into(), end.clone());
        end
    }
}

/// A paratick VM `p` and a tickless VM `t` (the last table: keys may follow).
macro_rules! p_and_t {
    () => {
        r#"
    [[vm]]
    name = "p"
    mode = "paratick"
    workload = "io"
    [[vm]]
    name = "t"
    mode = "tickless"
    workload = "io"
"#
    };
}

/// `p`, `t`, and `manual`, which does not start with the daemon.
const VMS: &str = concat!(
    p_and_t!(),
    r#"
    [[vm]]
    name = "manual"
    mode = "paratick"
    workload = "io"
    autostart = false
"#
);

/// A new state directory for each manager (removed when the test process's temporary
/// files are; each holds one small file at most).
fn state_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("paratick-manager-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(state_dir: &std::path::Path, vms: &str) -> DaemonConfig {
    let text =
        format!("timer_model = \"/nonexistent/timer-model.json\"\nstate_dir = \"{}\"\n{vms}", state_dir.display());
    DaemonConfig::parse(&text).unwrap()
}

fn manager_of(
    config: &DaemonConfig,
    processes: FakeProcesses,
    events: Result<FakeEvents, String>,
) -> Manager<FakeProcesses, FakeEvents> {
    let mut manager = Manager::with(config, "http://test/metrics".into(), processes, events);
    manager.start_autostart_vms();
    manager
}

fn manager(processes: FakeProcesses, events: Result<FakeEvents, String>) -> Manager<FakeProcesses, FakeEvents> {
    manager_of(&config(&state_dir(), VMS), processes, events)
}

fn ask(manager: &mut Manager<FakeProcesses, FakeEvents>, request: &str) -> Response {
    manager.handle(serde_json::from_str(request).unwrap())
}

fn vm<'a>(manager: &'a Manager<FakeProcesses, FakeEvents>, name: &str) -> &'a ManagedVm {
    &manager.vms[manager.find(name).unwrap()]
}

#[test]
fn it_adopts_running_vms_starts_the_other_autostart_ones_and_shows_an_ended_one_as_it_ended() {
    let processes = FakeProcesses::new(VmLauncher::Process);
    let mut adopted = FakeProcesses::status("p", 777);
    adopted.counters.operator_hz = Some(125);
    processes.running.lock().unwrap().insert("p".into(), adopted);
    let failed = VmEnd { name: "t".into(), pid: 9, lifecycle: Lifecycle::Failed("gone".into()), counters: None };
    processes.ends.lock().unwrap().insert("t".into(), failed);
    let mut manager = manager(processes, Err("none".into()));

    assert_eq!(manager.supervisor.asked(), Vec::<String>::new(), "nothing started, nothing asked twice");
    assert_eq!((vm(&manager, "p").state(), vm(&manager, "p").pid()), (VmState::Running, Some(777)));
    assert_eq!(vm(&manager, "p").config.operator_hz, Some(125), "the running VM's operator rate is kept");
    assert_eq!((vm(&manager, "t").state(), vm(&manager, "t").lifecycle.error()), (VmState::Failed, Some("gone")));
    assert_eq!((vm(&manager, "manual").state(), vm(&manager, "manual").pid()), (VmState::Stopped, None));

    let list = ask(&mut manager, r#"{"cmd":"list"}"#).into_result().unwrap().vms.unwrap();
    assert_eq!(
        list.iter().map(|v| (v.name.as_str(), v.lifecycle.state())).collect::<Vec<_>>(),
        [("p", VmState::Running), ("t", VmState::Failed), ("manual", VmState::Stopped)]
    );
    let status = ask(&mut manager, r#"{"cmd":"status"}"#).into_result().unwrap().status.unwrap();
    assert_eq!((status.vms_running, status.vms_total, status.vm_launcher.as_str()), (1, 3, "process"));
    assert!(status.observer.contains("none"), "the observer's problem is shown: {}", status.observer);
    assert!(manager.metrics.render().contains("paratick_observer_up 0"));
}

#[test]
fn tick_rates_go_to_paratick_vm_processes_only_and_a_refused_rate_changes_nothing() {
    let mut manager = manager(FakeProcesses::new(VmLauncher::Process), Err("none".into()));
    assert_eq!(manager.supervisor.asked(), ["p: start", "t: start"]);

    let refused = ask(&mut manager, r#"{"cmd":"set_tick_rate","vm":"t","hz":100}"#);
    assert!(refused.refusal().unwrap().contains("runs a tickless guest"));
    let unknown = ask(&mut manager, r#"{"cmd":"set_tick_rate","vm":"x","hz":100}"#);
    assert_eq!(unknown.refusal().unwrap(), "unknown VM \"x\"; known VMs: p, t, manual");
    assert_eq!(manager.supervisor.asked(), Vec::<String>::new(), "neither reached a VM process");

    let out_of_range = ask(&mut manager, r#"{"cmd":"set_tick_rate","vm":"p","hz":5}"#);
    assert_eq!(out_of_range.refusal().unwrap(), "the tick rate must be 10 to 4000 Hz, not 5");
    assert_eq!(vm(&manager, "p").config.operator_hz, None, "a refused rate is not kept");
    assert!(ask(&mut manager, r#"{"cmd":"set_tick_rate","vm":"p","hz":100}"#).is_done());
    assert_eq!(
        manager.supervisor.asked(),
        [r#"p: {"cmd":"set_tick_rate","hz":5}"#, r#"p: {"cmd":"set_tick_rate","hz":100}"#]
    );
    assert_eq!(vm(&manager, "p").config.operator_hz, Some(100));

    // A VM without a process: checked here, kept for its start, which passes it on.
    let stopped = ask(&mut manager, r#"{"cmd":"set_tick_rate","vm":"manual","hz":5000}"#);
    assert_eq!(stopped.refusal().unwrap(), "the tick rate must be 10 to 4000 Hz, not 5000");
    assert!(ask(&mut manager, r#"{"cmd":"set_tick_rate","vm":"manual","hz":200}"#).is_done());
    assert!(ask(&mut manager, r#"{"cmd":"start","vm":"manual"}"#).is_done());
    assert_eq!(manager.supervisor.running.lock().unwrap()["manual"].counters.operator_hz, Some(200));
}

#[test]
fn starts_and_stops_are_checked_against_the_state_and_failures_are_shown() {
    let mut processes = FakeProcesses::new(VmLauncher::Process);
    processes.broken.insert("manual".into());
    let mut manager = manager(processes, Err("none".into()));
    manager.supervisor.asked();

    let again = ask(&mut manager, r#"{"cmd":"start","vm":"p"}"#);
    assert_eq!(again.refusal().unwrap(), "VM p is already running");
    let not_running = ask(&mut manager, r#"{"cmd":"stop","vm":"manual"}"#);
    assert_eq!(not_running.refusal().unwrap(), "VM manual is not running (it is stopped)");
    let broken = ask(&mut manager, r#"{"cmd":"start","vm":"manual"}"#);
    assert_eq!(broken.refusal().unwrap(), "VM manual failed to start: paratick-vmm exited with status 1");
    assert_eq!(vm(&manager, "manual").state(), VmState::Failed);
    assert_eq!(manager.supervisor.asked(), ["manual: start"]);

    assert!(ask(&mut manager, r#"{"cmd":"stop","vm":"p"}"#).is_done());
    assert_eq!(manager.supervisor.asked(), ["p: stop"]);
    assert_eq!((vm(&manager, "p").state(), vm(&manager, "p").pid()), (VmState::Stopped, None));

    // A VM process that ends by itself is seen at the next sample.
    manager.supervisor.fail("t", "guest panicked: oops");
    manager.update();
    assert_eq!(
        (vm(&manager, "t").state(), vm(&manager, "t").lifecycle.error()),
        (VmState::Failed, Some("guest panicked: oops"))
    );
    let metrics = manager.metrics.render();
    assert!(metrics.contains("paratick_vm_state{state=\"failed\",vm=\"t\"} 1"), "{metrics}");
    assert!(metrics.contains("paratick_vm_state{state=\"running\",vm=\"t\"} 0"), "{metrics}");
}

#[test]
fn the_daemon_stops_its_own_vm_processes_but_leaves_systemd_units_to_systemd() {
    let mut own = manager(FakeProcesses::new(VmLauncher::Process), Err("none".into()));
    own.supervisor.asked();
    own.shut_down();
    let mut asked = own.supervisor.asked();
    asked.sort();
    assert_eq!(asked, ["p: forget end", "p: stop", "t: forget end", "t: stop"]);
    assert!(own.vms.iter().all(|vm| vm.process.is_none() && vm.state() == VmState::Stopped));

    let mut units = manager(FakeProcesses::new(VmLauncher::Systemd), Err("none".into()));
    units.supervisor.asked();
    units.shut_down();
    assert_eq!(units.supervisor.asked(), Vec::<String>::new());
    assert_eq!(vm(&units, "p").state(), VmState::Running);
}

#[test]
fn another_kvm_process_gets_exit_series_until_it_exits() {
    let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let pid = other.id();
    let events = FakeEvents { exits: BTreeMap::from([(pid, 500)]), ..FakeEvents::default() };
    let mut manager = manager(FakeProcesses::new(VmLauncher::Process), Ok(events));
    let series =
        format!("paratick_observed_vm_exits_total{{pid=\"{pid}\",reason=\"io_exits\",vm=\"sleep:{pid}\"}} 500");
    let metrics = manager.metrics.render();
    assert!(metrics.contains(&series), "{metrics}");
    assert!(metrics.contains("paratick_observer_up 1"));

    other.kill().unwrap();
    other.wait().unwrap();
    manager.update();
    let metrics = manager.metrics.render();
    assert!(!metrics.contains(&format!("pid=\"{pid}\"")), "the exited process's series went: {metrics}");
    let forgotten = manager.observer.as_ref().unwrap().exits.is_empty();
    assert!(forgotten, "the event source was told to forget it");
}

#[test]
fn a_reload_starts_added_vms_stops_removed_ones_restarts_changed_ones_and_leaves_the_rest() {
    let dir = state_dir();
    let mut manager = manager_of(&config(&dir, VMS), FakeProcesses::new(VmLauncher::Process), Err("none".into()));
    assert!(ask(&mut manager, r#"{"cmd":"set_tick_rate","vm":"p","hz":100}"#).is_done());
    let p_pid = vm(&manager, "p").pid();
    manager.supervisor.asked();
    let metrics = manager.metrics.render();
    assert!(metrics.contains("vm=\"manual\""), "{metrics}");

    // p as it was, t with another rate, manual gone, n new.
    let new = concat!(p_and_t!(), "hz = 100\n[[vm]]\nname = \"n\"\nmode = \"tickless\"\nworkload = \"sequential\"\n");
    let summary = manager.reload(config(&dir, new));
    assert_eq!(summary, "added n; removed manual; changed (restarted if it ran) t; unchanged p");
    let mut asked = manager.supervisor.asked();
    asked.retain(|a| !a.ends_with(r#"{"cmd":"status"}"#));
    assert_eq!(asked, ["t: stop", "t: forget end", "t: start", "n: start"]);
    let names: Vec<&str> = manager.vms.iter().map(|vm| vm.config.name.as_str()).collect();
    assert_eq!(names, ["p", "t", "n"]);
    assert_eq!(vm(&manager, "p").pid(), p_pid, "p was not touched");
    assert_eq!(vm(&manager, "p").config.operator_hz, Some(100), "nor its operator's rate");
    assert_eq!((vm(&manager, "t").config.hz, vm(&manager, "t").state()), (100, VmState::Running));
    let metrics = manager.metrics.render();
    assert!(!metrics.contains("vm=\"manual\""), "the removed VM's series went: {metrics}");
    assert!(metrics.contains("paratick_vm_info{hz=\"100\",mode=\"tickless\",vcpus=\"1\",vm=\"t\"} 1"), "{metrics}");
    assert!(!metrics.contains("paratick_vm_info{hz=\"250\",mode=\"tickless\",vcpus=\"1\",vm=\"t\"}"), "{metrics}");
    assert_eq!(manager.status.vms_total, 3);
    // The same file again changes nothing.
    assert_eq!(
        manager.reload(config(&dir, new)),
        "added none; removed none; changed (restarted if it ran) none; unchanged p, t, n"
    );
    assert!(manager.supervisor.asked().iter().all(|a| a.ends_with(r#"{"cmd":"status"}"#)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn operator_rates_and_stops_outlive_the_daemon() {
    let dir = state_dir();
    let mut first = manager_of(&config(&dir, VMS), FakeProcesses::new(VmLauncher::Process), Err("none".into()));
    let set = ask(&mut first, r#"{"cmd":"set_tick_rate","vm":"p","hz":100}"#);
    assert!(set.into_result().unwrap().done.unwrap().starts_with("VM p: scheduler ticks at 100 Hz from now on"));
    assert!(ask(&mut first, r#"{"cmd":"stop","vm":"t"}"#).is_done());
    assert!(ask(&mut first, r#"{"cmd":"set_tick_rate","vm":"manual","hz":300}"#).is_done());
    drop(first);

    // A new daemon; the VM processes are gone (a reboot): p starts with the rate, t stays
    // stopped, manual keeps its rate for its start.
    let mut second = manager_of(&config(&dir, VMS), FakeProcesses::new(VmLauncher::Process), Err("none".into()));
    assert_eq!(second.supervisor.asked(), ["p: start"]);
    assert_eq!(second.supervisor.running.lock().unwrap()["p"].counters.operator_hz, Some(100));
    assert_eq!(vm(&second, "t").state(), VmState::Stopped);
    assert_eq!(vm(&second, "manual").config.operator_hz, Some(300));
    // The operator's start of t ends its stop; the rate back to auto ends p's decision.
    assert!(ask(&mut second, r#"{"cmd":"start","vm":"t"}"#).is_done());
    assert!(ask(&mut second, r#"{"cmd":"set_tick_rate","vm":"p","hz":null}"#).is_done());
    drop(second);

    // A VM process that runs on without the rate (started again by hand) is given it.
    let processes = FakeProcesses::new(VmLauncher::Process);
    processes.running.lock().unwrap().insert("manual".into(), FakeProcesses::status("manual", 55));
    let third = manager_of(&config(&dir, VMS), processes, Err("none".into()));
    let asked = third.supervisor.asked();
    assert!(asked.contains(&r#"manual: {"cmd":"set_tick_rate","hz":300}"#.to_string()), "{asked:?}");
    assert_eq!(asked.iter().filter(|a| a.ends_with(": start")).count(), 2, "p and t start: {asked:?}");
    assert_eq!(vm(&third, "p").config.operator_hz, None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_vm_restarts_after_its_delay_up_to_its_limit_when_its_policy_says_so() {
    let vms = VMS.replace("name = \"p\"", "name = \"p\"\nrestart = \"on-failure\"\nrestart_limit = 2");
    let mut manager =
        manager_of(&config(&state_dir(), &vms), FakeProcesses::new(VmLauncher::Process), Err("none".into()));
    // t's policy is the default: no.
    manager.supervisor.fail("t", "guest panicked: oops");
    manager.supervisor.asked();
    let now = Instant::now();
    for restart in 1..=2u64 {
        manager.supervisor.fail("p", "guest panicked: oops");
        manager.update();
        assert_eq!(vm(&manager, "p").state(), VmState::Failed);
        assert!(manager.supervisor.asked().iter().all(|a| !a.ends_with("start")), "not before its delay");
        manager.apply_restart_policies(now + Duration::from_secs(60 * restart));
        assert_eq!(manager.supervisor.asked(), ["p: start"], "restart {restart}");
        manager.update();
        assert_eq!(vm(&manager, "p").state(), VmState::Running);
        let metrics = manager.metrics.render();
        assert!(metrics.contains(&format!("paratick_vm_restarts_total{{vm=\"p\"}} {restart}")), "{metrics}");
        assert!(metrics.contains("paratick_vm_restarts_total{vm=\"t\"} 0"), "{metrics}");
        assert_eq!(vm(&manager, "t").state(), VmState::Failed);
    }
    // The third failure within the window: it gives up.
    manager.supervisor.fail("p", "guest panicked: oops");
    manager.update();
    manager.apply_restart_policies(now + Duration::from_secs(590));
    assert!(manager.supervisor.asked().iter().all(|a| !a.ends_with("start")));
    assert_eq!(vm(&manager, "p").state(), VmState::Failed);
    // The operator's start begins a new count.
    assert!(ask(&mut manager, r#"{"cmd":"start","vm":"p"}"#).is_done());
    assert!(!vm(&manager, "p").restarts.pending());
    assert_eq!(vm(&manager, "p").restarts.total, 2);
}

#[test]
fn other_vms_beyond_the_configured_cap_are_summed_as_other() {
    let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let pid = other.id();
    let events = FakeEvents { exits: BTreeMap::from([(pid, 500)]), ..FakeEvents::default() };
    let config = config(&state_dir(), &format!("observed_vms_max = 0\n{VMS}"));
    let manager = manager_of(&config, FakeProcesses::new(VmLauncher::Process), Ok(events));
    let metrics = manager.metrics.render();
    let summed = "paratick_observed_vm_exits_total{pid=\"other\",reason=\"io_exits\",vm=\"other\"} 500";
    assert!(metrics.contains(summed), "{metrics}");
    assert!(!metrics.contains(&format!("pid=\"{pid}\"")), "no series of its own: {metrics}");
    assert!(!metrics.lines().any(|l| l.starts_with("paratick_observed_vm_info")), "{metrics}");
    other.kill().unwrap();
    other.wait().unwrap();
}

/// One thing that happens to the daemon's VMs.
#[derive(Debug, Clone)]
enum Life {
    /// A second passes: each running guest does `work` units, ticking at `hz`; then the
    /// daemon samples.
    Second {
        work: u64,
        hz: u32,
    },
    /// A VM's guest fails (its process ends).
    Fail(usize),
    /// The operator stops a VM, or starts it.
    Stop(usize),
    Start(usize),
    /// The daemon restarts; the VM processes run on and are adopted.
    RestartDaemon,
    /// The host restarts: a new daemon, and every VM process started anew.
    RestartHost,
}

const LIVES: [&str; 2] = ["p", "t"];

fn life() -> impl proptest::strategy::Strategy<Value = Life> {
    use proptest::prelude::*;
    prop_oneof![
        10 => (0..200u64, 10..1000u32).prop_map(|(work, hz)| Life::Second { work, hz }),
        1 => (0..2usize).prop_map(Life::Fail),
        1 => (0..2usize).prop_map(Life::Stop),
        2 => (0..2usize).prop_map(Life::Start),
        1 => Just(Life::RestartDaemon),
        1 => Just(Life::RestartHost),
    ]
}

/// Every counter series of a rendering, by its name and labels.
fn counter_series(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next().is_some_and(|name| name.ends_with("_total")))
        .map(|(series, value)| (series.to_string(), value.parse().unwrap()))
        .collect()
}

impl FakeProcesses {
    /// A second of work in every running VM: busy vCPU time, ticks at `hz` (injected
    /// into the paratick guest, half of them riding on other exits), idle periods and
    /// exits.
    fn second(&self, work: u64, hz: u32) {
        for status in self.running.lock().unwrap().values_mut() {
            let c = &mut status.counters;
            let paratick = status.name == "p";
            c.work_units += work;
            c.guest_busy_s = vec![c.guest_busy_s.first().copied().unwrap_or(0.0) + work as f64 / 200.0];
            c.effective_hz = vec![if paratick { hz } else { 0 }];
            c.guest_ticks.total += u64::from(hz);
            if paratick {
                c.tick_requests += 1;
                c.ticks_injected += u64::from(hz);
                c.ticks_ridden += u64::from(hz / 2);
            }
            c.kvm_stats.halt_exits += 1;
            c.kvm_stats.exits += 3 * work + u64::from(hz);
            status.uptime_s += 1.0;
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Whatever happens to the VMs and the daemon: every counter series only grows;
    /// `vm list` shows the exits saved and work done that /metrics shows; and the
    /// exits saved never exceed the tickless timer exits they are taken from, summed
    /// over the VM's processes.
    #[test]
    fn counters_grow_through_restarts_stops_and_adoptions_and_agree_with_vm_list(
        lives in proptest::collection::vec(life(), 1..40)
    ) {
        use proptest::prelude::*;
        let dir = state_dir();
        let config = config(&dir, p_and_t!());
        let mut manager = manager_of(&config, FakeProcesses::new(VmLauncher::Process), Err("none".into()));
        let mut before = counter_series(&manager.metrics.render());
        // Per VM: the most tickless exits any of its ended processes was modelled at,
        // summed, and the current process's most.
        let mut modelled = [(0.0f64, 0.0f64); 2];
        let mut pids = [None; 2];
        for life in &lives {
            match *life {
                Life::Second { work, hz } => {
                    manager.supervisor.second(work, hz);
                    manager.update();
                }
                Life::Fail(vm) => {
                    if manager.supervisor.running.lock().unwrap().contains_key(LIVES[vm]) {
                        manager.supervisor.fail(LIVES[vm], "guest panicked");
                        manager.update();
                    }
                }
                Life::Stop(vm) => {
                    let _ = ask(&mut manager, &format!(r#"{{"cmd":"stop","vm":"{}"}}"#, LIVES[vm]));
                }
                Life::Start(vm) => {
                    let _ = ask(&mut manager, &format!(r#"{{"cmd":"start","vm":"{}"}}"#, LIVES[vm]));
                }
                Life::RestartDaemon => {
                    let Manager { supervisor, .. } = manager;
                    manager = manager_of(&config, supervisor, Err("none".into()));
                }
                Life::RestartHost => {
                    manager = manager_of(&config, FakeProcesses::new(VmLauncher::Process), Err("none".into()));
                }
            }
            for (index, name) in LIVES.iter().enumerate() {
                let managed = vm(&manager, name);
                let sampled = managed.sample.as_ref().map(|(_, c)| c);
                let tickless = sampled.map_or(0.0, |c| manager.projection.tickless_timer_exits_of(c));
                if managed.pid().is_some() && managed.pid() != pids[index] {
                    // A new process: what the last one was modelled at is kept.
                    modelled[index].0 += std::mem::take(&mut modelled[index].1);
                    pids[index] = managed.pid();
                }
                modelled[index].1 = modelled[index].1.max(tickless);
                if let Some(c) = sampled {
                    let saved = manager.projection.exits_saved(c) as f64;
                    prop_assert!(saved <= tickless, "{name}: {saved} saved of {tickless} modelled");
                }
            }
            let now = counter_series(&manager.metrics.render());
            for (series, value) in &before {
                let after = now.get(series).copied();
                prop_assert!(after.is_some_and(|a| a >= *value), "{series}: {value} then {after:?} after {life:?}");
            }
            let list = ask(&mut manager, r#"{"cmd":"list"}"#).into_result().unwrap().vms.unwrap();
            for (index, info) in list.iter().enumerate() {
                let series = |name: &str| now.get(&format!("{name}{{vm=\"{}\"}}", info.name)).copied().unwrap_or(0.0);
                prop_assert_eq!(info.exits_saved as f64, series("paratick_vm_exits_saved_projected_total"));
                prop_assert_eq!(info.work_units as f64, series("paratick_vm_work_units_total"));
                let bound = modelled[index].0 + modelled[index].1;
                prop_assert!(info.exits_saved as f64 <= bound + 1.0, "{}: {} saved of {bound}", info.name, info.exits_saved);
            }
            before = now;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
