//! The daemon's manager: one thread owns the VM supervision, the observer and the
//! metrics, so no state is shared between tasks. The async side sends it [`Command`]s;
//! every second it asks the VM processes and the observer and updates the metrics.
//!
//! Here: its VMs' lifecycle, requests, reloads and restarts, and their metrics. The rates
//! it shows are worked out in `rates` (pure), other VMMs' VMs are `observed`, the
//! exits model's arithmetic is `paratick_observer::model`, and the counters'
//! bookkeeping is `daemon::counters`.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use strum::VariantArray;

use paratick_common::guest::TickMode;
use paratick_vmm::control::{VmEnd, VmProcessStatus, VmRequest};
use paratick_vmm::kvm_stats::KvmExitCounts;
use paratick_vmm::{Counters, Lifecycle, VmConfig, VmState};
use tokio::sync::oneshot;

use super::config::{DaemonConfig, VmEntry};
use super::counters::{counters_file, Instance};
use super::metrics::{CounterFamily, Metrics, ScrapedCounters};
use super::restart::{AfterFailure, Restarts, WINDOW as RESTART_WINDOW};
use super::state::{OperatorState, VmDecisions};
use super::supervisor::{Probe, Supervisor, VmLauncher, VmProcess, VmProcesses};
use crate::protocol::{DaemonAnswer, DaemonStatus, Request, Response, VmInfo};
use paratick_observer::backend::Backend;
use paratick_observer::model::{ModelBackend, TimerModel};
use paratick_observer::procfs::{self, process_alive};
use paratick_observer::{per_process, EventSource, Observer, PidFilter, ProcessCounts, TracepointState};
use rates::{BusyTickRate, BusyTicks};

/// How often VMs and the observer are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// What the async side asks of the manager.
pub enum Command {
    /// A control request.
    Request(Request, oneshot::Sender<Response>),
    /// The metrics text.
    Render(oneshot::Sender<String>),
    /// The daemon is stopping: stop the VMs if no service manager will, then answer.
    Shutdown(oneshot::Sender<()>),
    /// A new configuration (SIGHUP): answered with what changed.
    Reload(Box<DaemonConfig>, oneshot::Sender<String>),
}

struct ManagedVm {
    /// The VM as the configuration file has it.
    entry: VmEntry,
    /// What it runs with: the file's, with the operator's tick rate.
    config: VmConfig,
    /// Where it is, as its process last said, and why it failed.
    lifecycle: Lifecycle,
    /// The VM's process while it has one.
    process: Option<VmProcess>,
    /// The identity of its latest process (what counted its counters).
    process_id: u64,
    /// The latest sample, and when it was taken.
    sample: Option<(Instant, Counters)>,
    halted_vcpus: u32,
    effective_hz: f64,
    /// Timer interrupts per second of busy vCPU time, as the host sees them.
    observed_hz: f64,
    tick_rate: BusyTickRate,
    exits_per_s: f64,
    /// Restarts by its restart policy.
    restarts: Restarts,
    /// Whether its current failure was seen by the restart policy.
    failure_seen: bool,
}

impl ManagedVm {
    /// A VM of `entry`, not started, with the operator's `decisions` applied.
    fn new(entry: &VmEntry, decisions: &VmDecisions) -> ManagedVm {
        let mut config = entry.config.clone();
        if decisions.operator_hz.is_some() {
            config.operator_hz = decisions.operator_hz;
        }
        ManagedVm {
            entry: entry.clone(),
            config,
            lifecycle: Lifecycle::Stopped,
            process: None,
            process_id: 0,
            sample: None,
            halted_vcpus: 0,
            effective_hz: 0.0,
            observed_hz: 0.0,
            tick_rate: BusyTickRate::default(),
            exits_per_s: 0.0,
            restarts: Restarts::default(),
            failure_seen: false,
        }
    }

    /// Stops the VM's process, if it has one, and records how it ended; whether it had one.
    fn stop(&mut self, supervisor: &impl VmProcesses) -> bool {
        let Some(mut process) = self.process.take() else { return false };
        self.stopping();
        let end = supervisor.stop(&self.config.name, &mut process);
        self.ended(end);
        true
    }

    fn ended(&mut self, end: VmEnd) {
        self.process = None;
        self.move_to(end.lifecycle);
        if let Some(counters) = end.counters {
            self.sample = Some((Instant::now(), counters));
        }
        self.halted_vcpus = 0;
        match &self.lifecycle {
            Lifecycle::Failed(error) => log::error!("VM {} failed: {error}", self.config.name),
            ended => log::info!("VM {} {}", self.config.name, ended.state()),
        }
    }

    fn running(&mut self, process: VmProcess, status: &VmProcessStatus) {
        // The process's own word for its pid where the launcher did not learn it (a
        // unit whose MainPID systemd did not say).
        let pid = if process.pid != 0 { process.pid } else { status.pid };
        self.process_id = Instance::process_id(pid, procfs::start_ticks(pid));
        self.process = Some(process);
        self.move_to(status.lifecycle.clone());
    }

    /// Its process is being stopped: it is stopping, unless it ended already (it keeps
    /// its end while its process goes).
    fn stopping(&mut self) {
        if !self.state().is_final() {
            self.move_to(Lifecycle::Stopping);
        }
    }

    /// Its state.
    fn state(&self) -> VmState {
        self.lifecycle.state()
    }

    /// Moves its life on ([`Lifecycle::transition`]); a move the state machine does not
    /// have is logged and changes nothing.
    fn move_to(&mut self, next: Lifecycle) {
        if let Err(e) = self.lifecycle.transition(next) {
            log::error!("VM {}: {e}", self.config.name);
        }
    }

    fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid).filter(|&pid| pid != 0)
    }
}

/// The manager's state: its VMs' processes behind `P` ([`Supervisor`] in the daemon),
/// the host's KVM events behind `O` ([`Observer`]).
pub struct Manager<P = Supervisor, O = Observer> {
    vms: Vec<ManagedVm>,
    /// The exits model of this host (calibrated by the bench, or its backend's defaults).
    model: TimerModel,
    /// The model the projections use: `model`, with the exits per tickless tick measured
    /// on this daemon's own tickless VMs where it has any.
    projection: TimerModel,
    supervisor: P,
    observer: Result<O, String>,
    metrics: Metrics,
    /// The observer's programs' runs as the kernel last counted them, all summed.
    observer_runs: u64,
    /// Other VMMs' VMs: when the daemon first saw each, and its tick rate.
    observed_ticks: BTreeMap<u32, observed::ObservedVm>,
    /// The operators' decisions, kept on disk.
    state: OperatorState,
    /// Where the counters are kept for the next daemon, and whether the last write failed
    /// (logged once).
    counters_path: std::path::PathBuf,
    counters_unsaved: bool,
    /// This daemon run, which counts what its observer counts (from zero).
    run: u64,
    /// The configuration in force.
    config: DaemonConfig,
    /// VMs to start once the daemon is ready (indices into `vms`).
    to_start: Vec<usize>,
    started: Instant,
    status: DaemonStatus,
}

impl Manager {
    /// Loads the observer (a failure is reported, not fatal), finds the VM processes
    /// that are still running, and starts the autostart VMs that are not.
    pub fn new(config: &DaemonConfig, metrics_url: String) -> Manager {
        let loading = Instant::now();
        let observer = Observer::start(&PidFilter::All).map_err(|e| format!("{e}"));
        match &observer {
            Ok(_) => log::info!("eBPF observer loaded in {:.1} s", loading.elapsed().as_secs_f64()),
            Err(e) => log::error!("the eBPF observer is unavailable, VMs run without it: {e}"),
        }
        let launcher = config.vm_launcher.unwrap_or_else(VmLauncher::detect);
        let supervisor = Supervisor::new(launcher, config.vm_runtime_dir());
        Manager::with(config, metrics_url, supervisor, observer)
    }
}

impl<P: VmProcesses, O: EventSource> Manager<P, O> {
    /// A manager of `config`'s VMs through `supervisor`, reading `observer`.
    fn with(config: &DaemonConfig, metrics_url: String, supervisor: P, observer: Result<O, String>) -> Self {
        let launcher = supervisor.launcher();
        let backend = Backend::of_host();
        let status = DaemonStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: crate::protocol::PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_s: 0.0,
            metrics: metrics_url,
            socket: config.socket.display().to_string(),
            backend: backend.name().into(),
            observer: observer.as_ref().map(|_| "attached".to_string()).unwrap_or_else(|e| e.clone()),
            vm_launcher: launcher.name().into(),
            exits_model: None,
            vms_running: 0,
            vms_total: config.vms.len(),
        };
        let (state, problem) = OperatorState::load(&config.state_dir);
        if let Some(problem) = problem {
            log::error!("{:#}", anyhow::Error::new(problem));
        }
        let vms = config.vms.iter().map(|entry| ManagedVm::new(entry, &state.of(&entry.config.name))).collect();
        let model = Self::load_model(config);
        let metrics = Metrics::new();
        let counters_path = counters_file(&config.state_dir);
        if let Err(problem) = metrics.counters.restore(&counters_path) {
            log::error!("the counters start again from zero: {:#}", anyhow::Error::new(problem));
        }
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut manager = Self {
            vms,
            projection: model.clone(),
            model,
            supervisor,
            observer,
            metrics,
            counters_path,
            counters_unsaved: false,
            run: since_epoch.as_nanos() as u64 | 1,
            observer_runs: 0,
            observed_ticks: BTreeMap::new(),
            state,
            config: config.clone(),
            to_start: Vec::new(),
            started: Instant::now(),
            status,
        };
        for index in 0..manager.vms.len() {
            if !manager.adopt(index) {
                manager.to_start.push(index);
            }
        }
        manager.update();
        manager
    }

    fn load_model(config: &DaemonConfig) -> TimerModel {
        let (model, problem) = TimerModel::load(&config.timer_model, ModelBackend::of_host());
        if let Some(problem) = problem {
            log::warn!("{problem}");
        }
        log::info!("exits model: {} ({}, {})", model.backend, model.source, config.timer_model.display());
        model
    }

    /// Starts the VMs that start with the daemon and were not adopted. Separate from
    /// building the manager, which the daemon's readiness waits for: a VM unit is
    /// ordered after the daemon's (`After=paratick.service`), so its start waits for
    /// that readiness.
    pub fn start_autostart_vms(&mut self) {
        for index in std::mem::take(&mut self.to_start) {
            self.start_vm(index);
        }
        self.update();
    }

    /// Adopts the VM's process if it runs, or shows how it ended; false if it has none
    /// and is to be started (it starts with the daemon and the operator did not stop it).
    fn adopt(&mut self, index: usize) -> bool {
        let name = self.vms[index].config.name.clone();
        let decisions = self.state.of(&name);
        match self.supervisor.adopt(&name) {
            Some(Ok((process, status))) => {
                log::info!("VM {name} is running (pid {}): adopted", process.pid);
                self.vms[index].running(process, &status);
                // The operator's rate as kept on disk is the decision; a VM that lost it
                // (started again by hand) is given it again.
                match decisions.operator_hz {
                    Some(hz) if status.counters.operator_hz != Some(hz) => {
                        if let Err(e) = self.send_tick_rate(index, Some(hz)) {
                            log::error!("VM {name}: cannot restore the operator's tick rate {hz} Hz: {e}");
                        }
                    }
                    Some(_) => {}
                    None => self.vms[index].config.operator_hz = status.counters.operator_hz,
                }
            }
            // It ended while no daemon watched, or was stopped by the operator:
            // shown as it ended, not started again (its restart policy may).
            Some(Err(end)) => self.vms[index].ended(end),
            None if decisions.stopped => {
                log::info!("VM {name} stays stopped: the operator stopped it (`vm start {name}` starts it)")
            }
            None if self.vms[index].entry.autostart => return false,
            None => {}
        }
        true
    }

    /// Writes the operator's decision about `vm`; a failure to keep it is logged, and
    /// the decision applies anyway.
    fn keep_decision(&mut self, vm: &str, change: impl FnOnce(&mut VmDecisions)) -> Option<String> {
        let kept = self.state.update(vm, change);
        kept.err().map(|e| {
            let message = format!("{:#}", anyhow::Error::new(e));
            log::error!("VM {vm}: the operator's decision applies but is not kept: {message}");
            message
        })
    }

    /// Serves commands until `Shutdown` (or until the sender is gone). Under a systemd
    /// watchdog (`WatchdogSec=`), each sample pings it: a manager that stops sampling
    /// gets the daemon restarted, and the VMs, in their own processes, run on.
    pub fn run(mut self, inbox: Receiver<Command>) {
        let mut interval = 0;
        let watchdog_enabled = sd_notify::watchdog_enabled(false, &mut interval);
        let mut next_sample = Instant::now() + SAMPLE_INTERVAL;
        loop {
            match inbox.recv_timeout(next_sample.saturating_duration_since(Instant::now())) {
                Ok(Command::Request(request, reply)) => {
                    let _ = reply.send(self.handle(request));
                }
                Ok(Command::Render(reply)) => {
                    let _ = reply.send(self.metrics.render());
                }
                Ok(Command::Shutdown(reply)) => {
                    self.shut_down();
                    let _ = reply.send(());
                    return;
                }
                Ok(Command::Reload(config, reply)) => {
                    let _ = reply.send(self.reload(*config));
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.update();
                    if watchdog_enabled {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                    next_sample = Instant::now() + SAMPLE_INTERVAL;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.shut_down();
                    return;
                }
            }
        }
    }

    /// The index of a VM, or the error message naming the known ones.
    fn find(&self, name: &str) -> Result<usize, String> {
        self.vms.iter().position(|vm| vm.config.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.vms.iter().map(|vm| vm.config.name.as_str()).collect();
            format!("unknown VM {name:?}; known VMs: {}", known.join(", "))
        })
    }

    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Status {} => {
                self.status.uptime_s = self.started.elapsed().as_secs_f64();
                self.status.vms_running = self.vms.iter().filter(|vm| vm.state() == VmState::Running).count();
                self.status.exits_model = Some(self.projection.clone());
                Response::Done(DaemonAnswer { status: Some(self.status.clone()), ..DaemonAnswer::default() })
            }
            Request::List {} => Response::Done(DaemonAnswer {
                vms: Some(self.vms.iter().map(|vm| vm_info(vm, &self.metrics.counters)).collect()),
                ..DaemonAnswer::default()
            }),
            Request::SetTickRate { vm, hz } => match self.find(&vm) {
                Err(unknown) => Response::error(unknown),
                Ok(index) => self.set_tick_rate(index, hz),
            },
            Request::Start { vm } => match self.find(&vm) {
                Err(unknown) => Response::error(unknown),
                Ok(index) if self.vms[index].process.is_some() && !self.vms[index].state().is_final() => {
                    Response::error(format!("VM {vm} is already {}", self.vms[index].state()))
                }
                Ok(index) => {
                    // A VM that has just ended may still have its process, on its way out.
                    self.stop_vm(index);
                    self.vms[index].restarts.reset();
                    self.keep_decision(&vm, |d| d.stopped = false);
                    self.start_vm(index);
                    match self.vms[index].lifecycle.error() {
                        Some(error) => Response::error(format!("VM {vm} failed to start: {error}")),
                        None => Response::ok(),
                    }
                }
            },
            Request::Stop { vm } => match self.find(&vm) {
                Err(unknown) => Response::error(unknown),
                // A failed VM waiting for its restart is stopped by cancelling the restart.
                Ok(index) if self.vms[index].restarts.pending() && self.vms[index].process.is_none() => {
                    self.vms[index].restarts.reset();
                    self.keep_decision(&vm, |d| d.stopped = true);
                    Response::ok()
                }
                Ok(index) if self.vms[index].process.is_none() || !self.vms[index].state().can_stop() => {
                    Response::error(format!("VM {vm} is not running (it is {})", self.vms[index].state()))
                }
                Ok(index) => {
                    self.stop_vm(index);
                    self.vms[index].restarts.reset();
                    // Kept, so that it stays stopped when the daemon starts again.
                    self.keep_decision(&vm, |d| d.stopped = true);
                    Response::ok()
                }
            },
        }
    }

    fn set_tick_rate(&mut self, index: usize, hz: Option<u32>) -> Response {
        let managed = &mut self.vms[index];
        if managed.config.mode != TickMode::Paratick {
            return Response::error(format!(
                "VM {} runs a {} guest, which asks for no ticks: only paratick VMs take a tick rate",
                managed.config.name,
                managed.config.mode.name()
            ));
        }
        let running = managed.process.is_some();
        let checked = if running {
            self.send_tick_rate(index, hz)
        } else {
            hz.map_or(Ok(()), |hz| {
                VmConfig { operator_hz: Some(hz), ..managed.config.clone() }
                    .validate()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        };
        match checked {
            Err(e) => Response::error(e),
            Ok(()) => {
                // Kept for the next start, and on disk for the next daemon.
                self.vms[index].config.operator_hz = hz;
                let name = self.vms[index].config.name.clone();
                let when = if running { "from now on" } else { "from its next start" };
                let done = match hz {
                    Some(hz) => format!(
                        "VM {name}: scheduler ticks at {hz} Hz {when}, on each vCPU whose guest asks for ticks (a vCPU \
                         that needs no scheduler tick, idle or with one task, asks for none and gets none); kept across \
                         daemon restarts"
                    ),
                    None => format!("VM {name}: ticks at the rate its guest asks for {when}"),
                };
                match self.keep_decision(&name, |d| d.operator_hz = hz) {
                    None => DaemonAnswer::said(done),
                    Some(problem) => Response::error(format!("{done}, but not kept across restarts: {problem}")),
                }
            }
        }
    }

    /// Sends a tick rate to the VM's process.
    fn send_tick_rate(&self, index: usize, hz: Option<u32>) -> Result<(), String> {
        let name = &self.vms[index].config.name;
        match self.supervisor.request(name, &VmRequest::SetTickRate { hz }) {
            Ok(reply) => reply.into_result().map(|_| ()).map_err(|(_, error)| error),
            Err(e) => Err(format!("VM {name} did not take the rate: {e}")),
        }
    }

    fn start_vm(&mut self, index: usize) {
        let managed = &mut self.vms[index];
        managed.sample = None;
        managed.move_to(Lifecycle::Starting);
        managed.failure_seen = false;
        match self.supervisor.start(&managed.config) {
            Ok((process, status)) => {
                log::info!(
                    "VM {} started ({} vCPUs, {}), pid {}",
                    managed.config.name,
                    managed.config.vcpus,
                    managed.config.mode.name(),
                    process.pid
                );
                managed.running(process, &status);
            }
            Err(e) => {
                log::error!("VM {} failed to start: {e}", managed.config.name);
                managed.move_to(Lifecycle::Failed(e));
            }
        }
    }

    /// Stops a VM's process and records how it ended.
    fn stop_vm(&mut self, index: usize) {
        self.vms[index].stop(&self.supervisor);
    }

    fn shut_down(&mut self) {
        if self.supervisor.launcher() == VmLauncher::Systemd {
            // A stop of the service stops the VM units (StopPropagatedFrom=); a restart
            // leaves them running for the next daemon to adopt.
            log::info!("VM units are left to systemd: they stop with this service, and outlive its restart");
            return;
        }
        // All at once: the daemon's stop takes as long as the slowest VM's, not the sum.
        let supervisor = &self.supervisor;
        let ends: Vec<(usize, VmEnd)> = std::thread::scope(|scope| {
            let stops: Vec<_> = self
                .vms
                .iter_mut()
                .enumerate()
                .filter_map(|(index, managed)| {
                    let mut process = managed.process.take()?;
                    managed.stopping();
                    let name = managed.config.name.clone();
                    Some(scope.spawn(move || (index, supervisor.stop(&name, &mut process))))
                })
                .collect();
            stops.into_iter().filter_map(|stop| stop.join().ok()).collect()
        });
        for (index, end) in ends {
            self.vms[index].ended(end);
            // Stopped with the daemon, not by the operator: the next start starts it.
            self.supervisor.forget_end(&self.vms[index].config.name);
        }
    }

    /// Samples every VM and the observer, and updates the metrics.
    fn update(&mut self) {
        let mut statuses: Vec<Option<Box<VmProcessStatus>>> = Vec::with_capacity(self.vms.len());
        for managed in &mut self.vms {
            let Some(process) = &mut managed.process else {
                statuses.push(None);
                continue;
            };
            statuses.push(match self.supervisor.probe(&managed.config.name, process) {
                Probe::Status(status) => {
                    managed.move_to(status.lifecycle.clone());
                    Some(status)
                }
                Probe::Silent(why) => {
                    log::debug!("VM {}: no answer: {why}", managed.config.name);
                    None
                }
                Probe::Ended(end) => {
                    managed.ended(*end);
                    None
                }
            });
        }
        self.apply_restart_policies(Instant::now());
        let snapshot = match &mut self.observer {
            Ok(observer) => {
                observer.flush_logs();
                match observer.snapshot() {
                    Ok(snapshot) => Some(snapshot),
                    Err(e) => {
                        log::warn!("observer: {e}");
                        None
                    }
                }
            }
            Err(_) => None,
        };
        // From this sample's counters, so that the sample's figures and the projection
        // agree from a daemon's first sample on.
        self.projection = self.measured_projection(&statuses);
        let per_pid = snapshot.as_ref().map(per_process).unwrap_or_default();
        let exits_traced = self.kvm_exit_traced();
        for (index, status) in statuses.into_iter().enumerate() {
            let observed = self.vms[index].pid().and_then(|pid| per_pid.get(&pid));
            self.sample_vm(index, status.as_deref(), observed, exits_traced);
        }
        // KVM's own counters of every process (copied by the observer), summed per process.
        let kvm_counters: BTreeMap<u32, KvmExitCounts> = match &mut self.observer {
            Ok(observer) if observer.kvm_counters_state().is_ok() => match observer.kvm_counters() {
                Ok(counters) => counters
                    .into_iter()
                    .map(|(pid, vcpus)| (pid, vcpus.values().fold(KvmExitCounts::default(), |a, b| a.plus(*b))))
                    .collect(),
                Err(e) => {
                    log::warn!("observer: {e}");
                    BTreeMap::new()
                }
            },
            _ => BTreeMap::new(),
        };
        self.update_observer_metrics(snapshot.as_ref(), &per_pid, &kvm_counters, exits_traced);
        // What the observer holds of processes that are gone (their series went above).
        if let Ok(observer) = &mut self.observer {
            if let Err(e) = observer.forget_processes(|pid| !process_alive(pid)) {
                log::warn!("observer: {e}");
            }
        }
        // Kept before any scrape can show the values (scrapes are served by this thread).
        match self.metrics.counters.save(&self.counters_path) {
            Ok(()) => self.counters_unsaved = false,
            Err(e) if !self.counters_unsaved => {
                self.counters_unsaved = true;
                log::error!("the counters are not kept for the next daemon: {:#}", anyhow::Error::new(e));
            }
            Err(_) => {}
        }
    }

    /// Schedules the restart of each VM that failed since the last sample, as its policy
    /// says, and starts those whose restart is due at `now`.
    fn apply_restart_policies(&mut self, now: Instant) {
        for index in 0..self.vms.len() {
            let managed = &mut self.vms[index];
            let name = managed.config.name.clone();
            if managed.state() == VmState::Failed && !managed.failure_seen {
                managed.failure_seen = true;
                match managed.restarts.failed(managed.entry.restart, managed.entry.restart_limit, now) {
                    AfterFailure::Stay => {}
                    AfterFailure::RestartAt(at) => {
                        log::info!("VM {name} failed: restarting it in {:.0?} (restart = \"on-failure\")", at - now)
                    }
                    AfterFailure::GiveUp(count) => log::error!(
                        "VM {name} failed after {count} restarts within {} min: not restarted again (restart_limit); \
                         `vm start {name}` starts it",
                        RESTART_WINDOW.as_secs() / 60
                    ),
                }
            }
            if managed.restarts.take_due(now) {
                log::info!("VM {name}: restart {} after its failure", managed.restarts.total);
                // A failed VM may still have its process (a guest that panicked).
                self.stop_vm(index);
                self.start_vm(index);
            }
        }
    }

    /// Applies a new configuration: VMs added are started (if they start with the
    /// daemon), VMs removed are stopped and their series removed, VMs whose settings
    /// changed are restarted (if they were running), the others are not touched. The
    /// listen addresses, socket and launcher apply at the daemon's next start; the
    /// exits model is read again. Returns what changed.
    fn reload(&mut self, new: DaemonConfig) -> String {
        let old = std::mem::replace(&mut self.config, new.clone());
        let mut deferred = Vec::new();
        for (key, changed) in [
            ("metrics_listen", old.metrics_listen != new.metrics_listen),
            ("socket", old.socket != new.socket),
            ("socket_group", old.socket_group != new.socket_group),
            ("vm_launcher", old.vm_launcher != new.vm_launcher),
            ("state_dir", old.state_dir != new.state_dir),
        ] {
            if changed {
                deferred.push(key);
            }
        }
        if !deferred.is_empty() {
            log::warn!("reload: {} changed: applies when the daemon starts again", deferred.join(", "));
        }
        self.model = Self::load_model(&new);
        let (mut added, mut removed, mut changed, mut unchanged) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for index in (0..self.vms.len()).rev() {
            let name = self.vms[index].config.name.clone();
            if !new.vms.iter().any(|entry| entry.config.name == name) {
                self.stop_vm(index);
                let gone = self.vms.remove(index);
                self.metrics.remove_vm_gauges(&gone.config);
                self.metrics.counters.remove_vm(&name);
                removed.push(name);
            }
        }
        let mut old_vms = std::mem::take(&mut self.vms);
        let mut to_start = Vec::new();
        for entry in &new.vms {
            let name = &entry.config.name;
            let decisions = self.state.of(name);
            match old_vms.iter().position(|vm| vm.config.name == *name) {
                Some(position) if old_vms[position].entry == *entry => {
                    self.vms.push(old_vms.remove(position));
                    unchanged.push(name.clone());
                }
                Some(position) => {
                    let mut vm = old_vms.remove(position);
                    let was_running = vm.stop(&self.supervisor);
                    if was_running {
                        self.supervisor.forget_end(name);
                    }
                    self.metrics.remove_vm_gauges(&vm.config);
                    let fresh = ManagedVm::new(entry, &decisions);
                    vm.entry = fresh.entry;
                    vm.config = fresh.config;
                    vm.restarts.reset();
                    if was_running {
                        to_start.push(self.vms.len());
                    }
                    self.vms.push(vm);
                    changed.push(name.clone());
                }
                None => {
                    if entry.autostart && !decisions.stopped {
                        to_start.push(self.vms.len());
                    }
                    self.vms.push(ManagedVm::new(entry, &decisions));
                    added.push(name.clone());
                }
            }
        }
        for index in to_start {
            self.start_vm(index);
        }
        let names: Vec<String> = self.vms.iter().map(|vm| vm.config.name.clone()).collect();
        if let Err(e) = self.state.retain(|name| names.iter().any(|n| n == name)) {
            log::error!("reload: the decisions about removed VMs are not forgotten: {:#}", anyhow::Error::new(e));
        }
        self.status.vms_total = self.vms.len();
        removed.reverse();
        let list = |what: &str, names: &[String]| {
            format!("{what} {}", if names.is_empty() { "none".to_string() } else { names.join(", ") })
        };
        let mut summary = [
            list("added", &added),
            list("removed", &removed),
            list("changed (restarted if it ran)", &changed),
            list("unchanged", &unchanged),
        ]
        .join("; ");
        if !deferred.is_empty() {
            summary.push_str(&format!("; {} apply at the next start", deferred.join(", ")));
        }
        self.update();
        summary
    }

    /// The model the projections use, from `fresh` counters of each VM (else its last
    /// sample): the exits per timer interrupt measured on the tickless VMs
    /// ([`TimerModel::measured_on`]).
    fn measured_projection(&self, fresh: &[Option<Box<VmProcessStatus>>]) -> TimerModel {
        let latest =
            |modes: &'static [TickMode]| {
                self.vms.iter().zip(fresh).filter(move |(vm, _)| modes.contains(&vm.config.mode)).filter_map(
                    |(vm, status)| status.as_ref().map(|s| &s.counters).or(vm.sample.as_ref().map(|(_, c)| c)),
                )
            };
        self.model.measured_on(latest(&[TickMode::Paratick]), latest(&[TickMode::Tickless, TickMode::TicklessFull]))
    }

    /// Whether `kvm_exit` fires on this host and is attached.
    fn kvm_exit_traced(&self) -> bool {
        match &self.observer {
            Ok(observer) => {
                observer.backend().traces_every_exit()
                    && observer.tracepoints().get("kvm_exit") == Some(&TracepointState::Attached)
            }
            Err(_) => false,
        }
    }

    fn sample_vm(
        &mut self,
        index: usize,
        status: Option<&VmProcessStatus>,
        observed: Option<&ProcessCounts>,
        exits_traced: bool,
    ) {
        let metrics = &mut self.metrics;
        let managed = &mut self.vms[index];
        let name = managed.config.name.clone();
        let (hz, vcpus) = (managed.config.hz.to_string(), managed.config.vcpus.to_string());
        metrics.vm_info.with_label_values(&[&name, managed.config.mode.name(), &hz, &vcpus]).set(1.0);
        for &state in VmState::VARIANTS {
            metrics
                .vm_state
                .with_label_values(&[&name, state.name()])
                .set(f64::from(u8::from(state == managed.state())));
        }
        // What the daemon counts itself, what its observer counts of the VM's process, and
        // what the VM process counts.
        let daemon = Instance { process: 0, run: self.run };
        let observer = Instance { process: managed.process_id, run: self.run };
        let process = Instance { process: managed.process_id, run: 0 };
        metrics.counters.report_own(CounterFamily::Restarts, &[&name], daemon, managed.restarts.total);
        let Some(status) = status else {
            if managed.process.is_none() {
                metrics.vcpus_halted.with_label_values(&[&name]).set(0.0);
                for source in ["requested", "effective", "observed"] {
                    metrics.tick_rate.with_label_values(&[&name, source]).set(0.0);
                }
                managed.effective_hz = 0.0;
                managed.observed_hz = 0.0;
                managed.tick_rate = BusyTickRate::default();
                managed.exits_per_s = 0.0;
            }
            return;
        };
        managed.halted_vcpus = status.halted_vcpus;
        let counters = status.counters.clone();
        let now = Instant::now();
        // Timer interrupts as the host sees them per second of vCPU time not halted (the
        // observer's halts), as `observe` reports them; without the observer, the ticks
        // the guest counted per second its tasks ran.
        let busy = match observed {
            Some(o) => BusyTicks {
                interrupts: o.timer_interrupts,
                busy_s: status.uptime_s * f64::from(managed.config.vcpus) - o.halted_ns as f64 / 1e9,
            },
            None => BusyTicks { interrupts: counters.guest_ticks.total, busy_s: counters.guest_busy_s.iter().sum() },
        };
        managed.observed_hz = managed.tick_rate.sample(busy).unwrap_or(0.0);
        metrics.tick_rate.with_label_values(&[&name, "observed"]).set(managed.observed_hz);
        if let Some((then, previous)) = &managed.sample {
            let seconds = now.duration_since(*then).as_secs_f64();
            (managed.effective_hz, managed.exits_per_s) = rates::interval_rates(previous, &counters, seconds);
        }
        let requested = counters.requested_hz.iter().copied().max().unwrap_or(0);
        metrics.tick_rate.with_label_values(&[&name, "requested"]).set(requested as f64);
        metrics.tick_rate.with_label_values(&[&name, "effective"]).set(managed.effective_hz);
        match counters.operator_hz {
            Some(hz) => metrics.tick_rate.with_label_values(&[&name, "configured"]).set(hz as f64),
            None => {
                let _ = metrics.tick_rate.remove_label_values(&[&name, "configured"]);
            }
        }
        metrics.counters.report_own(CounterFamily::TicksInjected, &[&name], process, counters.ticks_injected);
        metrics.counters.report_own(CounterFamily::TicksRidden, &[&name], process, counters.ticks_ridden);
        metrics.counters.report_own(CounterFamily::TicksSkippedIdle, &[&name], process, counters.ticks_skipped_idle);
        metrics.counters.report_own(
            CounterFamily::TickRequestsClamped,
            &[&name],
            process,
            counters.tick_requests_clamped,
        );
        metrics.counters.report_own(CounterFamily::GuestTicks, &[&name], process, counters.guest_ticks.total);
        metrics.counters.report_own(CounterFamily::WorkUnits, &[&name], process, counters.work_units);
        metrics.counters.report_own(
            CounterFamily::ExitsSaved,
            &[&name],
            process,
            self.projection.exits_saved(&counters),
        );
        metrics.vcpus_halted.with_label_values(&[&name]).set(f64::from(status.halted_vcpus));
        match observed {
            Some(observed) => {
                for (kind, count) in &observed.tick_requests_by_kind {
                    metrics.counters.report_own(CounterFamily::TickRequests, &[&name, kind], observer, *count);
                }
            }
            None => {
                let requests = counters.tick_requests;
                metrics.counters.report_own(CounterFamily::TickRequests, &[&name, "paratick"], process, requests)
            }
        }
        if exits_traced {
            for (reason, count) in observed.map(|o| &o.exit_reasons).into_iter().flatten() {
                metrics.counters.report_own(CounterFamily::Exits, &[&name, reason], observer, *count);
            }
        } else {
            for (stat, count) in counters.kvm_stats.by_category() {
                metrics.counters.report_own(CounterFamily::Exits, &[&name, stat], process, count);
            }
        }
        managed.sample = Some((now, counters));
    }
}

/// What `vm list` shows of a VM: its counters as /metrics has them (`counters`),
/// rates and ratios of its current process.
fn vm_info(managed: &ManagedVm, counters: &ScrapedCounters) -> VmInfo {
    let name = managed.config.name.as_str();
    let series = |family| counters.value(family, &[name]).unwrap_or(0);
    let sample = managed.sample.as_ref().map(|(_, c)| c);
    VmInfo {
        name: managed.config.name.clone(),
        pid: managed.pid(),
        lifecycle: managed.lifecycle.clone(),
        mode: managed.config.mode.name().into(),
        vcpus: managed.config.vcpus,
        hz: managed.config.hz,
        requested_hz: sample.and_then(|c| c.requested_hz.iter().copied().max()).unwrap_or(0),
        configured_hz: managed.config.operator_hz,
        effective_hz: managed.effective_hz,
        observed_hz: managed.observed_hz,
        exits_per_s: managed.exits_per_s,
        exits: sample.map_or(0, |c| c.kvm_stats.exits),
        exits_saved: series(CounterFamily::ExitsSaved),
        work_units: series(CounterFamily::WorkUnits),
        exits_per_unit: sample.filter(|c| c.work_units > 0).map(|c| c.kvm_stats.exits as f64 / c.work_units as f64),
        restarts: managed.restarts.total,
    }
}

mod observed;
mod rates;
#[cfg(test)]
mod tests;
