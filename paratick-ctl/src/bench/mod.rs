//! `paratick-ctl bench`: the paper's evaluation on our VMM and guest. Every workload runs
//! in every tick mode at the same HZ, the no-timer floor included, interleaved (rep 1:
//! all workloads × modes, rep 2: again, …) so that drift on a noisy host hits every mode
//! alike; throughput runs work for a fixed time, execution-time runs do a fixed amount of
//! work (calibrated from the tickless throughput runs), and their exits, less the
//! floor's of the same repetition, are each mode's timer-induced exits. The eBPF
//! observer is on for every run and attributes each run's threads to that run. Then:
//! each way of delivering ticks where every tick is needed (the contended workload), the
//! observer's overhead, and tick precision.

mod calibration;
pub mod overhead;
mod plot;
mod render;
pub mod report;
pub mod stats;

use crate::io_error::io;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;
use strum::VariantArray;

use paratick_common::event::SYNTHETIC_OWNER_BASE;
use paratick_common::guest::{TickMode, Workload};
use paratick_vmm::{RunReport, TickDelivery, Vm, VmConfig, WorkAmount, GUEST_KERNEL};

use paratick_observer::model::{ModelBackend, TimerModel};
use paratick_observer::{per_process, EventSource, Observer, PidFilter, ProcessCounts};
use report::{DeliverySummary, Kind, Record};
use stats::Spread;

/// Why the bench stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An option out of its range.
    #[error("{0}")]
    Option(String),
    /// One of the bench's VMs failed.
    #[error("{what} {vm}")]
    Vm {
        /// What it was doing.
        what: &'static str,
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: paratick_vmm::VmError,
    },
    /// The eBPF observer failed (to load, or to read its maps).
    #[error("the bench needs the eBPF observer")]
    Observer(#[from] paratick_observer::ObserverError),
    /// A file, a socket, a thread or another process (what was being done, and why).
    #[error(transparent)]
    Io(#[from] crate::io_error::IoError),
    /// A measurement could not be made (it says why).
    #[error("{0}")]
    Measurement(String),
}

/// The result of what the bench does.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// Adds what the VM was doing to its error.
fn vm_error(what: &'static str, vm: &str) -> impl FnOnce(paratick_vmm::VmError) -> BenchError {
    let vm = vm.to_string();
    move |source| BenchError::Vm { what, vm, source }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Output directory.
    pub out: PathBuf,
    /// Repetitions of every (workload, mode, kind).
    pub reps: u32,
    /// Length of a throughput run (and target length of an execution-time run).
    pub duration: Duration,
    /// Guest tick rate.
    pub hz: u32,
    /// vCPUs of the multithreaded and I/O workloads (sequential uses 1).
    pub vcpus: u32,
    /// The command line, for the report.
    pub command: String,
    /// Where the kvm-unit-tests kernels are (the observer's third-party case).
    pub kvm_unit_tests: Option<PathBuf>,
    /// Pairs of each case of the observer's overhead.
    pub overhead_pairs: u32,
}

impl BenchOptions {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if !(1..=100).contains(&self.reps) {
            return Err(BenchError::Option(format!("--reps must be 1 to 100, not {}", self.reps)));
        }
        if !(Duration::from_millis(500)..=Duration::from_secs(600)).contains(&self.duration) {
            return Err(BenchError::Option("--duration must be 500ms to 10m".into()));
        }
        if !(1..=100).contains(&self.overhead_pairs) {
            return Err(BenchError::Option(format!(
                "--observer-overhead must be 1 to 100 pairs, not {}",
                self.overhead_pairs
            )));
        }
        if let Some(kernel) = self.kvm_unit_tests.as_deref().map(overhead::third_party_kernel) {
            if !kernel.is_file() {
                return Err(BenchError::Option(format!(
                    "--kvm-unit-tests: {} does not exist (the directory of the kvm-unit-tests kernels)",
                    kernel.display()
                )));
            }
        }
        if !(2..=8).contains(&self.vcpus) {
            return Err(BenchError::Option(format!(
                "--vcpus must be 2 to 8 (the multithreaded and I/O workloads need two or more), not {}",
                self.vcpus
            )));
        }
        VmConfig::new("check", 1, TickMode::Paratick, self.hz, Workload::Sequential, WorkAmount::Seconds(1.0))
            .validate()
            .map_err(|e| BenchError::Option(format!("--hz: {e}")))
    }

    fn vcpus_for(&self, workload: Workload) -> u32 {
        if workload == Workload::Sequential {
            1
        } else {
            self.vcpus
        }
    }
}

/// Tick rates of the precision runs.
const PRECISION_HZ: [u32; 3] = [100, 250, 1000];

struct Bench<'a> {
    options: &'a BenchOptions,
    /// The exits model the records' exits-saved figures use: the default of this
    /// host's backend (the bench calibrates its own at the end).
    model: TimerModel,
    observer: Option<Observer>,
    next_owner: u32,
    done: usize,
    total: usize,
}

impl Bench<'_> {
    fn progress(&mut self, what: &str) {
        self.done += 1;
        let width = 30;
        let filled = width * self.done / self.total.max(1);
        let bar =
            format!("[{}{}] {:>3}/{} {what}", "#".repeat(filled), ".".repeat(width - filled), self.done, self.total);
        let mut err = std::io::stderr().lock();
        if std::io::stderr().is_terminal() {
            let _ = write!(err, "\r\x1b[2K{bar}");
            if self.done == self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{bar}");
        }
    }

    /// Runs one VM with its threads attributed to a fresh owner; returns its report and
    /// what the observer saw of it (if attached).
    fn run_vm(&mut self, mut config: VmConfig) -> Result<(RunReport, Option<ProcessCounts>)> {
        config.start_paused = true;
        let owner = SYNTHETIC_OWNER_BASE + self.next_owner;
        self.next_owner += 1;
        let vm = Vm::start(config.clone(), GUEST_KERNEL).map_err(vm_error("starting", &config.name))?;
        let threads = vm.thread_ids();
        if let Some(observer) = &mut self.observer {
            observer.attribute_threads(owner, &threads)?;
        }
        vm.resume();
        let report = vm.wait().map_err(vm_error("running", &config.name))?;
        let observed = match &mut self.observer {
            Some(observer) => {
                let counts = per_process(&observer.snapshot()?).remove(&owner).unwrap_or_default();
                observer.forget_threads(&threads)?;
                Some(counts)
            }
            None => None,
        };
        Ok((report, observed))
    }

    fn config(&self, workload: Workload, mode: TickMode, hz: u32, amount: WorkAmount) -> VmConfig {
        let name = format!("bench-{}-{}", workload.name(), mode.name());
        VmConfig::new(&name, self.options.vcpus_for(workload), mode, hz, workload, amount)
    }

    /// A contended-workload run on one vCPU for `duration` (the delivery and precision
    /// runs: the guest needs every tick).
    fn contended(&mut self, mode: TickMode, delivery: TickDelivery, hz: u32) -> Result<RunReport> {
        let mut config = VmConfig::new(
            &format!("bench-contended-{}-{}", mode.name(), delivery.name()),
            1,
            mode,
            hz,
            Workload::Contended,
            WorkAmount::Seconds(self.options.duration.as_secs_f64()),
        );
        config.delivery = delivery;
        Ok(self.run_vm(config)?.0)
    }

    fn record(
        &mut self,
        workload: Workload,
        mode: TickMode,
        kind: Kind,
        rep: u32,
        amount: WorkAmount,
    ) -> Result<Record> {
        let config = self.config(workload, mode, self.options.hz, amount);
        let (report, observed) = self.run_vm(config)?;
        let observed = observed.ok_or_else(|| BenchError::Measurement("the observer is not attached".into()))?;
        let record = Record::new(workload, mode, kind, rep, &report, &observed, &self.model);
        self.progress(&format!(
            "{} {} {} rep {}: {:.0} units/s",
            kind.name(),
            workload.name(),
            mode.name(),
            rep + 1,
            record.throughput_per_s
        ));
        Ok(record)
    }
}

/// Measures only the observer's cost (`bench --observer-overhead`), `overhead_pairs`
/// pairs a case.
pub fn observer_overhead(options: &BenchOptions) -> Result<overhead::ObserverOverhead> {
    options.validate()?;
    let pairs = options.overhead_pairs;
    let model = TimerModel::default_for(ModelBackend::of_host());
    let total = overhead::runs(pairs);
    let mut bench = Bench { options, model, observer: None, next_owner: 0, done: 0, total };
    overhead::measure(&mut bench, pairs, options.kvm_unit_tests.as_deref())
}

/// Runs the whole evaluation and writes results.json, results.csv, results.md and the
/// plots to `options.out`.
pub fn run(options: &BenchOptions) -> Result<report::Results> {
    options.validate()?;
    std::fs::create_dir_all(&options.out).map_err(io(format!("cannot create {}", options.out.display())))?;
    let observer = Observer::start_attributing_threads(&PidFilter::All)?;
    let workloads = Workload::EVALUATED;
    let modes = TickMode::VARIANTS;
    let main_runs = workloads.len() * modes.len() * options.reps as usize * 2;
    let delivery_runs = (TickDelivery::VARIANTS.len() + 2) * options.reps as usize;
    let overhead_runs = overhead::runs(options.overhead_pairs);
    let total = main_runs + delivery_runs + overhead_runs + PRECISION_HZ.len();
    let model = TimerModel::default_for(ModelBackend::of_host());
    let mut bench = Bench { options, model, observer: Some(observer), next_owner: 0, done: 0, total };

    let mut records = Vec::new();
    for rep in 0..options.reps {
        for workload in workloads {
            for &mode in modes {
                let amount = WorkAmount::Seconds(options.duration.as_secs_f64());
                records.push(bench.record(workload, mode, Kind::Throughput, rep, amount)?);
            }
        }
    }
    // Execution-time runs do what the tickless guest did in `duration`, in each mode.
    let work: Vec<(Workload, u64)> = workloads
        .iter()
        .map(|w| {
            let rate = stats::median(
                records.iter().filter(|r| r.workload == w.name() && r.mode == "tickless").map(|r| r.throughput_per_s),
            );
            (*w, ((rate * options.duration.as_secs_f64()).round() as u64).max(1))
        })
        .collect();
    for rep in 0..options.reps {
        for (workload, units) in &work {
            for &mode in modes {
                records.push(bench.record(*workload, mode, Kind::Execution, rep, WorkAmount::Units(*units))?);
            }
        }
    }

    let delivery = deliveries(&mut bench)?;

    // The observer's cost: every workload, QEMU and the daemon, with and without it.
    bench.observer = None;
    let overhead = overhead::measure(&mut bench, options.overhead_pairs, options.kvm_unit_tests.as_deref())?;
    bench.observer = Some(Observer::start_attributing_threads(&PidFilter::All)?);

    // Tick precision: the guest's rate and intervals at several rates.
    let mut precision = Vec::new();
    for hz in PRECISION_HZ {
        let report = bench.contended(TickMode::Paratick, TickDelivery::Msi, hz)?;
        precision.push(report::TickPrecision::new(hz, &report));
        bench.progress(&format!("tick precision at {hz} Hz"));
    }

    let results = report::Results::new(options, records, overhead, precision, delivery);
    results.write(&options.out)?;
    plot::write_all(&results, &options.out)?;
    Ok(results)
}

/// Every delivery method (and the guest's own tickless timer for reference) on the
/// contended workload, each repetition against a no-timer floor of its own.
fn deliveries(bench: &mut Bench<'_>) -> Result<Vec<DeliverySummary>> {
    let hz = bench.options.hz;
    let candidates: Vec<(&'static str, TickMode, TickDelivery)> =
        std::iter::once(("tickless", TickMode::Tickless, TickDelivery::Msi))
            .chain(TickDelivery::VARIANTS.iter().map(|&d| (d.name(), TickMode::Paratick, d)))
            .collect();
    let mut runs: Vec<Vec<RunReport>> = vec![Vec::new(); candidates.len()];
    let mut floors = Vec::new();
    for rep in 0..bench.options.reps {
        floors.push(bench.contended(TickMode::NoTimer, TickDelivery::Msi, hz)?);
        bench.progress(&format!("delivery floor rep {}", rep + 1));
        for (index, (name, mode, delivery)) in candidates.iter().enumerate() {
            runs[index].push(bench.contended(*mode, *delivery, hz)?);
            bench.progress(&format!("delivery {name} rep {}", rep + 1));
        }
    }
    let exits = |r: &RunReport| r.counters.kvm_stats.exits as f64;
    let per_s = |r: &RunReport| exits(r) / r.wall_s.max(1e-9);
    Ok(candidates
        .iter()
        .zip(runs)
        .map(|((name, _, _), reports)| {
            let timer_per_tick: Vec<f64> = reports
                .iter()
                .zip(&floors)
                .filter(|(r, _)| r.counters.guest_ticks.total > 0)
                .map(|(r, floor)| (per_s(r) - per_s(floor)) * r.wall_s / r.counters.guest_ticks.total as f64)
                .collect();
            let cpu: Vec<f64> = reports.iter().map(|r| r.injector_cpu_s / r.wall_s.max(1e-9)).collect();
            let all: Vec<f64> = reports.iter().map(per_s).collect();
            let last = reports.last().expect("at least one repetition");
            DeliverySummary {
                delivery: name,
                exits_per_s: Spread::of(&all),
                timer_exits_per_tick: Spread::of_some(&timer_per_tick),
                injector_cpu_s_per_s: Spread::of(&cpu),
                precision: report::TickPrecision::new(hz, last),
            }
        })
        .collect())
}
