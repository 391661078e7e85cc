//! A running VM: creation (memory, irqchip, vCPUs in 64-bit mode), its threads (vCPUs,
//! tick injector, block device), live counters, and an orderly stop that joins every
//! thread, whatever ended the VM.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use paratick_common::guest::{
    kernel_stack_top, BootInfo, GuestResults, GuestStatus, TickMode, Workload, BOOT_GDT_ADDR, BOOT_INFO_ADDR,
    BOOT_MAGIC, KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, MAX_VCPUS, PAGE_TABLES_ADDR, RESULTS_ADDR, SECTOR_SIZE,
    TICK_INTERVAL_BINS,
};
use serde::{Deserialize, Serialize};

use crate::block::{self, BlockCounters, DISK_BYTES};
use crate::config::{check_rate, TickDelivery, VmConfig, WorkAmount};
use crate::guest_input::GuestWarnings;
use crate::host_tick::HostTick;
use crate::injector::{self, TickControl};
use crate::kvm_stats::KvmExitCounts;
use crate::loader::load_elf;
#[cfg(doc)]
use crate::loader::GUEST_KERNEL;
use crate::memory::GuestMemory;
use crate::stats::VcpuStats;
use crate::vcpu::{install_kick_handler, kick_signal, ExitContext, Outcome, Shared, VcpuThread};
use crate::{ConfigError, Lifecycle, VmError};

/// Per-vCPU values and their total.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickCounts {
    /// Sum over vCPUs.
    pub total: u64,
    /// One value per vCPU.
    pub per_vcpu: Vec<u64>,
}

impl TickCounts {
    fn from(values: Vec<u64>) -> TickCounts {
        TickCounts { total: values.iter().sum(), per_vcpu: values }
    }
}

/// Live counters of a VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Work units the guest's tasks have done so far (live: each task stores its count
    /// after every unit).
    pub work_units: u64,
    /// Ticks the guest handled.
    pub guest_ticks: TickCounts,
    /// Of those, ticks that found the vCPU idle.
    pub guest_idle_ticks: TickCounts,
    /// Seconds each vCPU ran tasks (guest TSC; accounted at ticks, system calls and
    /// task switches, so live values trail by at most the time since the last of those).
    pub guest_busy_s: Vec<f64>,
    /// Ticks delivered by the injector or on re-entry.
    pub ticks_injected: u64,
    /// Of those, ticks that rode on a userspace exit's re-entry.
    pub ticks_ridden: u64,
    /// Due ticks not delivered because the vCPU was halted.
    pub ticks_skipped_idle: u64,
    /// Guest tick requests received (paratick).
    pub tick_requests: u64,
    /// Of those, requests for a rate out of range (clamped).
    pub tick_requests_clamped: u64,
    /// Requests that were not 32-bit writes (ignored).
    pub tick_requests_malformed: u64,
    /// vCPUs whose guest registered a tick page.
    pub tick_pages: u64,
    /// Tick page registrations refused.
    pub tick_pages_rejected: u64,
    /// Rate each vCPU asked for (Hz; 0 = none).
    pub requested_hz: Vec<u32>,
    /// The operator's rate, if set.
    pub operator_hz: Option<u32>,
    /// Rate in force per vCPU (Hz).
    pub effective_hz: Vec<u32>,
    /// Intervals between busy ticks as the guest saw them, summed over vCPUs: bin `i`
    /// counts intervals of `i / 8` to `(i + 1) / 8` tick periods (the last, longer ones).
    pub guest_tick_intervals: Vec<u64>,
    /// KVM's exit statistics summed over vCPUs.
    pub kvm_stats: KvmExitCounts,
    /// The same, per vCPU.
    pub kvm_stats_per_vcpu: Vec<KvmExitCounts>,
}

impl Counters {
    /// Ticks injected into a running vCPU that did not ride on another exit: each cost a
    /// kick.
    pub fn kicks(&self) -> u64 {
        self.ticks_injected.saturating_sub(self.ticks_ridden)
    }
}

/// What `paratick-vmm run --json` prints: the run's results.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// VM name.
    pub name: String,
    /// Tick mode.
    pub mode: &'static str,
    /// Workload.
    pub workload: &'static str,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest tick rate.
    pub hz: u32,
    /// Guest time from the start of the work to its end (TSC).
    pub elapsed_s: f64,
    /// Host time from start to stop.
    pub wall_s: f64,
    /// Work units done.
    pub work_units: u64,
    /// Work units per second of guest time.
    pub throughput_per_s: f64,
    /// Time the vCPUs spent halted (guest TSC), summed.
    pub guest_idle_s: f64,
    /// Time tasks ran (guest TSC), summed over vCPUs.
    pub guest_run_s: f64,
    /// Guest time in ticks at the end (jiffies).
    pub guest_jiffies: u64,
    /// Timer programming writes the guest made (TSC deadline, LAPIC timer).
    pub guest_timer_writes: u64,
    /// Context switches in the guest.
    pub context_switches: u64,
    /// Block requests completed.
    pub block_requests: u64,
    /// How paratick ticks were delivered (`none` for guests that ask for no ticks).
    pub delivery: &'static str,
    /// Paratick guests' housekeeping rate.
    pub housekeeping_hz: u32,
    /// CPU time of the injector thread (`msi` delivery; 0 otherwise), in seconds.
    pub injector_cpu_s: f64,
    /// `lapic-timer` delivery: each vCPU's phase error against the host tick, in µs
    /// (absent where the expiries could not be laid on it).
    pub lapic_phase_error_us: Vec<Option<f64>>,
    /// The counters at the end.
    #[serde(flatten)]
    pub counters: Counters,
}

/// A running VM. Dropping it stops it.
pub struct Vm {
    config: VmConfig,
    vm: Arc<VmFd>,
    memory: Arc<GuestMemory>,
    shared: Arc<Shared>,
    ticks: Arc<TickControl>,
    stats: Arc<Vec<VcpuStats>>,
    block_counters: Arc<BlockCounters>,
    vcpu_threads: Vec<JoinHandle<()>>,
    injector: Option<JoinHandle<Result<(), VmError>>>,
    block: Option<JoinHandle<Result<(), VmError>>>,
    tsc_khz: u64,
    started: Instant,
    stopped: AtomicBool,
    wall_s: Mutex<Option<f64>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates the VM and starts the guest `kernel` (an ELF; [`GUEST_KERNEL`] is
    /// Paratick's own, which the workloads and tick modes of `config` are for).
    ///
    /// A real VM (this needs `/dev/kvm`): a fixed amount of work, then its report.
    ///
    /// ```
    /// use paratick_common::guest::{TickMode, Workload};
    /// use paratick_vmm::{Vm, VmConfig, WorkAmount, GUEST_KERNEL};
    ///
    /// let config = VmConfig::new("doc", 1, TickMode::Paratick, 250, Workload::Sequential, WorkAmount::Units(300));
    /// let report = Vm::start(config, GUEST_KERNEL)?.wait()?;
    /// assert_eq!(report.work_units, 300);
    /// assert!(report.counters.tick_requests >= 1, "the guest asked for its rate");
    /// # Ok::<(), paratick_vmm::VmError>(())
    /// ```
    pub fn start(config: VmConfig, kernel: &[u8]) -> Result<Vm, VmError> {
        config.validate()?;
        install_kick_handler();
        let kvm = Kvm::new().map_err(VmError::kvm("open /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?);
        vm.create_irq_chip().map_err(VmError::kvm("KVM_CREATE_IRQCHIP"))?;
        let memory = Arc::new(GuestMemory::new(&vm)?);
        memory.write_boot_structures()?;
        let entry = load_elf(&memory, kernel)?;

        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus as usize {
            vcpus.push(setup_vcpu(&vm, &cpuid, index, entry)?);
        }
        let tsc_khz = vcpus[0].get_tsc_khz().map_err(VmError::kvm("KVM_GET_TSC_KHZ"))? as u64;
        let (work_units, duration_ms) = match config.amount {
            WorkAmount::Units(units) => (units, 0),
            WorkAmount::Seconds(seconds) => (0, (seconds * 1000.0).round() as u64),
        };
        let boot = BootInfo {
            magic: BOOT_MAGIC,
            tsc_khz,
            work_units,
            duration_ms,
            vcpus: config.vcpus,
            tick_mode: config.mode as u32,
            workload: config.workload as u32,
            hz: config.hz,
            disk_sectors: if config.workload == Workload::Io { DISK_BYTES / SECTOR_SIZE } else { 0 },
            housekeeping_hz: config.housekeeping_hz,
            reserved: 0,
        };
        memory.write_obj(BOOT_INFO_ADDR, &boot)?;

        let stats = Arc::new(vcpus.iter().map(VcpuStats::open).collect::<Result<Vec<_>, _>>()?);
        let shared = Arc::new(Shared {
            warnings: GuestWarnings::new(&config.name),
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            ended: std::sync::Condvar::new(),
            requests: Default::default(),
            thread_ids: Mutex::new(Vec::new()),
            gate: (Mutex::new(false), std::sync::Condvar::new()),
        });
        let ticks = Arc::new(TickControl::new(vcpus.len(), config.operator_hz, HostTick::of_running_kernel()));
        let block_counters = Arc::new(BlockCounters::default());
        let mut this = Vm {
            config,
            vm,
            memory,
            shared,
            ticks,
            stats,
            block_counters,
            vcpu_threads: Vec::new(),
            injector: None,
            block: None,
            tsc_khz,
            started: Instant::now(),
            stopped: AtomicBool::new(false),
            wall_s: Mutex::new(None),
        };
        // From here on, a failure stops what was started (Drop).
        let threads = vcpus.len() + 1 + usize::from(this.has_injector());
        this.spawn_threads(vcpus)?;
        // Every thread records its id first thing: once all have, `thread_ids` is complete.
        while this.thread_ids().len() < threads && this.vcpu_threads.iter().all(|t| !t.is_finished()) {
            std::thread::yield_now();
        }
        if !this.config.start_paused {
            this.resume();
        }
        Ok(this)
    }

    /// Lets the vCPUs of a VM started paused run (no effect otherwise).
    pub fn resume(&self) {
        self.shared.open_gate();
    }

    /// Starts one of the VM's threads, named `<vm>-<role>`, which records its thread id
    /// (for the observer's attribution) before it runs `body`.
    fn spawn_vm_thread<T: Send + 'static>(
        &self,
        role: &str,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<T>, VmError> {
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name(format!("{}-{role}", self.config.name))
            .spawn(move || {
                shared.register_current_thread();
                body()
            })
            .map_err(VmError::Thread)
    }

    fn spawn_threads(&mut self, vcpus: Vec<VcpuFd>) -> Result<(), VmError> {
        let (block_tx, block_rx) = mpsc::channel();
        let (memory, vm, counters) = (Arc::clone(&self.memory), Arc::clone(&self.vm), Arc::clone(&self.block_counters));
        let shared = Arc::clone(&self.shared);
        let vcpu_count = self.config.vcpus;
        self.block = Some(self.spawn_vm_thread("block", move || {
            block::serve(block_rx, &mut block::new_disk(), &memory, &vm, vcpu_count, &counters, &shared.warnings)
        })?);
        if self.has_injector() {
            let (vm, ticks, stats, memory) =
                (Arc::clone(&self.vm), Arc::clone(&self.ticks), Arc::clone(&self.stats), Arc::clone(&self.memory));
            self.injector = Some(self.spawn_vm_thread("ticks", move || injector::run(&vm, &ticks, &memory, &stats))?);
        }
        for (index, fd) in vcpus.into_iter().enumerate() {
            let context = ExitContext {
                index,
                vm: Arc::clone(&self.vm),
                shared: Arc::clone(&self.shared),
                ticks: Arc::clone(&self.ticks),
                memory: Arc::clone(&self.memory),
                delivery: self.config.delivery,
                block: block_tx.clone(),
                block_counters: Arc::clone(&self.block_counters),
                name: self.config.name.clone(),
            };
            let thread = VcpuThread::new(fd, context);
            let handle = self.spawn_vm_thread(&format!("vcpu{index}"), move || thread.run())?;
            self.vcpu_threads.push(handle);
        }
        Ok(())
    }

    /// Whether the VM has an injector thread: paratick guests with `msi` delivery (the
    /// others ask for no ticks, or take them from the LAPIC timer or on exits).
    fn has_injector(&self) -> bool {
        self.config.mode == TickMode::Paratick && self.config.delivery == TickDelivery::Msi
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Sets the operator's tick rate for this VM (`None`: back to the guest's request).
    pub fn set_operator_hz(&self, hz: Option<u32>) -> Result<(), ConfigError> {
        if let Some(hz) = hz {
            check_rate(hz)?;
        }
        self.ticks.set_operator_hz(hz);
        if self.config.delivery == TickDelivery::LapicTimer {
            // The vCPU threads reprogram their LAPIC timers between two KVM_RUNs.
            for handle in &self.vcpu_threads {
                kick(handle);
            }
        }
        Ok(())
    }

    /// Host thread ids of the VM's threads (complete once `start` returned).
    pub fn thread_ids(&self) -> Vec<u32> {
        self.shared.thread_ids.lock().expect("thread ids lock").clone()
    }

    /// Number of vCPUs halted in KVM right now (KVM's `blocking` stat).
    pub fn halted_vcpus(&self) -> u32 {
        self.stats.iter().filter(|s| s.blocking() == Some(true)).count() as u32
    }

    /// Where the VM is, and why it failed if it did. A VM past its deadline is failed
    /// from now on. (A stopped VM is consumed by [`Vm::stop`]: no one sees it here.)
    pub fn lifecycle(&self) -> Lifecycle {
        self.end_if_past_deadline();
        match &*self.shared.outcome.lock().expect("outcome lock") {
            None if !self.shared.gate_is_open() => Lifecycle::Paused,
            None => Lifecycle::Running,
            Some(Outcome::Finished) => Lifecycle::Finished,
            Some(Outcome::Failed(e)) => Lifecycle::Failed(self.describe_failure(e)),
        }
    }

    fn guest_results(&self) -> Result<GuestResults, VmError> {
        self.memory.read_obj(RESULTS_ADDR)
    }

    /// Live counters (guest counters are read from guest memory; no exit is caused).
    ///
    /// ```
    /// use paratick_common::guest::{TickMode, Workload};
    /// use paratick_vmm::{Lifecycle, Vm, VmConfig, WorkAmount, GUEST_KERNEL};
    ///
    /// let config = VmConfig::new("live", 1, TickMode::Tickless, 250, Workload::Io, WorkAmount::Seconds(60.0));
    /// let vm = Vm::start(config, GUEST_KERNEL)?;
    /// let before = vm.counters()?.work_units;
    /// while vm.counters()?.work_units < before + 100 {
    ///     assert_eq!(vm.lifecycle(), Lifecycle::Running);
    ///     std::thread::sleep(std::time::Duration::from_millis(10));
    /// }
    /// // The operator's rate is checked before it is taken.
    /// assert!(vm.set_operator_hz(Some(5)).is_err());
    /// let report = vm.stop()?;
    /// assert!(report.counters.work_units >= before + 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn counters(&self) -> Result<Counters, VmError> {
        let results = self.guest_results()?;
        let guest = &results.vcpus[..self.config.vcpus as usize];
        let ticks = &self.ticks.vcpus;
        let sum = |f: fn(&crate::injector::VcpuTicks) -> u64| ticks.iter().map(f).sum::<u64>();
        let injected = sum(|t| t.injected.load(Ordering::Relaxed));
        let ridden = sum(|t| t.ridden.load(Ordering::Relaxed));
        let kvm_stats_per_vcpu = self.stats.iter().map(VcpuStats::exit_counts).collect::<Result<Vec<_>, _>>()?;
        let kvm_stats = kvm_stats_per_vcpu.iter().fold(KvmExitCounts::default(), |sum, vcpu| sum.plus(*vcpu));
        let requests = &self.shared.requests;
        Ok(Counters {
            work_units: results.task_work_units.iter().sum(),
            guest_ticks: TickCounts::from(guest.iter().map(|c| c.ticks).collect()),
            guest_idle_ticks: TickCounts::from(guest.iter().map(|c| c.idle_ticks).collect()),
            guest_busy_s: guest.iter().map(|c| c.run_tsc as f64 / (self.tsc_khz as f64 * 1000.0)).collect(),
            guest_tick_intervals: (0..TICK_INTERVAL_BINS)
                .map(|bin| guest.iter().map(|c| c.tick_intervals[bin] as u64).sum())
                .collect(),
            ticks_injected: injected + ridden,
            ticks_ridden: ridden,
            ticks_skipped_idle: sum(|t| t.skipped_idle.load(Ordering::Relaxed)),
            tick_requests: requests.received.load(Ordering::Relaxed),
            tick_requests_clamped: requests.clamped.load(Ordering::Relaxed),
            tick_requests_malformed: requests.malformed.load(Ordering::Relaxed),
            tick_pages: requests.pages.load(Ordering::Relaxed),
            tick_pages_rejected: requests.pages_rejected.load(Ordering::Relaxed),
            requested_hz: ticks.iter().map(|t| t.requested_hz.load(Ordering::Relaxed)).collect(),
            operator_hz: self.ticks.operator_hz(),
            effective_hz: (0..ticks.len()).map(|i| self.ticks.effective_hz(i)).collect(),
            kvm_stats,
            kvm_stats_per_vcpu,
        })
    }

    /// Waits until the guest finishes (or fails, or misses its deadline), stops the VM
    /// and reports.
    pub fn wait(self) -> Result<RunReport, VmError> {
        let deadline = self.started + self.config.deadline;
        let mut outcome = self.shared.outcome.lock().expect("outcome lock");
        while outcome.is_none() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            outcome = self.shared.ended.wait_timeout(outcome, left).expect("outcome lock").0;
        }
        drop(outcome);
        self.end_if_past_deadline();
        self.finish()
    }

    /// A VM still running past its deadline has failed (ending it stops its threads).
    fn end_if_past_deadline(&self) {
        if self.started.elapsed() >= self.config.deadline {
            self.shared.end(Outcome::Failed(VmError::Deadline { seconds: self.config.deadline.as_secs_f64() }));
        }
    }

    /// Stops the VM now and reports what it did so far.
    pub fn stop(self) -> Result<RunReport, VmError> {
        self.shared.end(Outcome::Finished);
        self.finish()
    }

    fn finish(mut self) -> Result<RunReport, VmError> {
        self.stop_threads()?;
        let outcome = self.shared.outcome.lock().expect("outcome lock").take();
        if let Some(Outcome::Failed(error)) = outcome {
            return Err(match error {
                VmError::GuestPanicked(_) => VmError::GuestPanicked(self.panic_message()),
                other => other,
            });
        }
        self.report()
    }

    fn panic_message(&self) -> String {
        match self.guest_results() {
            Ok(r) if r.status == GuestStatus::Panicked as u32 => {
                let len = (r.panic_len as usize).min(r.panic_message.len());
                String::from_utf8_lossy(&r.panic_message[..len]).into_owned()
            }
            _ => "(no message)".into(),
        }
    }

    fn describe_failure(&self, error: &VmError) -> String {
        match error {
            VmError::GuestPanicked(_) => VmError::GuestPanicked(self.panic_message()).to_string(),
            other => other.to_string(),
        }
    }

    fn report(&self) -> Result<RunReport, VmError> {
        let results = self.guest_results()?;
        let counters = self.counters()?;
        let guest = &results.vcpus[..self.config.vcpus as usize];
        let tsc_hz = self.tsc_khz as f64 * 1000.0;
        let end = if results.end_tsc > results.start_tsc { results.end_tsc } else { results.start_tsc };
        let elapsed_s = (end - results.start_tsc) as f64 / tsc_hz;
        let work_units = guest.iter().map(|c| c.work_units).sum::<u64>();
        Ok(RunReport {
            name: self.config.name.clone(),
            mode: self.config.mode.name(),
            workload: self.config.workload.name(),
            vcpus: self.config.vcpus,
            hz: self.config.hz,
            elapsed_s,
            wall_s: self.wall_s.lock().expect("wall lock").unwrap_or_else(|| self.started.elapsed().as_secs_f64()),
            work_units,
            throughput_per_s: if elapsed_s > 0.0 { work_units as f64 / elapsed_s } else { 0.0 },
            guest_idle_s: guest.iter().map(|c| c.idle_tsc).sum::<u64>() as f64 / tsc_hz,
            guest_run_s: guest.iter().map(|c| c.run_tsc).sum::<u64>() as f64 / tsc_hz,
            guest_jiffies: results.jiffies,
            guest_timer_writes: guest.iter().map(|c| c.timer_writes).sum(),
            context_switches: guest.iter().map(|c| c.context_switches).sum(),
            block_requests: self.block_counters.completed.load(Ordering::Relaxed),
            delivery: if self.config.mode == TickMode::Paratick { self.config.delivery.name() } else { "none" },
            housekeeping_hz: self.config.housekeeping_hz,
            injector_cpu_s: self.ticks.injector_cpu_ns.load(Ordering::Acquire) as f64 / 1e9,
            lapic_phase_error_us: self
                .ticks
                .vcpus
                .iter()
                .map(|t| t.lapic_phase_error().map(|ns| ns as f64 / 1000.0))
                .collect(),
            counters,
        })
    }

    /// Stops every thread and joins it (idempotent).
    fn stop_threads(&mut self) -> Result<(), VmError> {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.stop.store(true, Ordering::Release);
        *self.wall_s.lock().expect("wall lock") = Some(self.started.elapsed().as_secs_f64());
        let mut panicked = None;
        for handle in self.vcpu_threads.drain(..) {
            // Kick until it is out of KVM_RUN: the handler sets immediate_exit, so one
            // signal suffices unless the thread had not yet published its kvm_run.
            while !handle.is_finished() {
                kick(&handle);
                std::thread::sleep(Duration::from_millis(1));
            }
            let name = handle.thread().name().unwrap_or("vcpu").to_string();
            if handle.join().is_err() {
                panicked = Some(name);
            }
        }
        self.ticks.shut_down();
        let injector = self.injector.take().map(JoinHandle::join);
        // The vCPU threads held the block device's senders: it ends now.
        let block = self.block.take().map(JoinHandle::join);
        if let Some(name) = panicked {
            return Err(VmError::ThreadPanicked(name));
        }
        match injector {
            Some(Err(_)) => return Err(VmError::ThreadPanicked("tick injector".into())),
            Some(Ok(Err(e))) => return Err(e),
            _ => {}
        }
        match block {
            Some(Err(_)) => Err(VmError::ThreadPanicked("block device".into())),
            Some(Ok(result)) => result,
            None => Ok(()),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.stop_threads() {
            log::error!("{}: stopping: {e}", self.config.name);
        }
    }
}

/// Kicks a vCPU thread out of KVM_RUN (its signal handler sets `immediate_exit`), if it
/// has not finished.
fn kick(handle: &JoinHandle<()>) {
    if !handle.is_finished() {
        // SAFETY: the handle is not joined (we borrow it), so the thread's pthread_t is
        // still valid even if it has just finished; the kick handler only sets
        // immediate_exit.
        unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
    }
}

/// Creates vCPU `index` in 64-bit mode at the kernel entry.
fn setup_vcpu(vm: &VmFd, cpuid: &kvm_bindings::CpuId, index: usize, entry: u64) -> Result<VcpuFd, VmError> {
    assert!(index < MAX_VCPUS);
    let vcpu = vm.create_vcpu(index as u64).map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
    let mut cpuid = cpuid.clone();
    for leaf in cpuid.as_mut_slice() {
        match leaf.function {
            // Initial APIC id, so the guest's and KVM's view of "vCPU i" agree.
            1 => leaf.ebx = (leaf.ebx & 0x00ff_ffff) | ((index as u32) << 24),
            0xb | 0x1f => leaf.edx = index as u32,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(VmError::kvm("KVM_SET_CPUID2"))?;

    let mut sregs = vcpu.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: KERNEL_CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_bindings::kvm_segment { selector: KERNEL_DATA_SELECTOR, type_: 0x3, l: 0, db: 1, ..code };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = 3 * 8 - 1;
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PAGE_TABLES_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(VmError::kvm("KVM_SET_SREGS"))?;

    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsp: kernel_stack_top(index),
        rdi: BOOT_INFO_ADDR,
        rsi: index as u64,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VmError::kvm("KVM_SET_REGS"))?;
    // With an in-kernel irqchip, vCPUs other than 0 wait for INIT/SIPI; we start them
    // all directly in 64-bit mode instead.
    vcpu.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(VmError::kvm("KVM_SET_MP_STATE"))?;
    Ok(vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_leave_out_ridden_ticks() {
        let counters = Counters {
            guest_busy_s: vec![1.5, 0.5],
            effective_hz: vec![250, 100],
            ticks_injected: 500,
            ticks_ridden: 50,
            ..Counters::default()
        };
        assert_eq!(counters.kicks(), 450);
    }
}
