//! What the eBPF observer costs the VMs it watches: each case runs with and without it,
//! alternating (off on, on off, off on, …) so that drift on a noisy host weighs on both
//! alike, and each pair gives one ratio of performance with / without. The cases: our three
//! workloads (tickless, throughput), a third-party VMM and CPL0-heavy guest (QEMU running
//! a kvm-unit-tests kernel, by its run time), and the daemon (an I/O VM with a
//! `paratick-ctl daemon` and its observer running beside it, as on a host it watches).
//!
//! Our VMs are measured in slices of one long run: the observer (or the daemon) is
//! started and stopped beside the running guest, and each slice counts the work units
//! the guest's tasks report live ([`paratick_vmm::Counters::work_units`]) after the
//! start has settled. Slices seconds apart share the host's state far more than
//! separate VM runs do (here the spread of a pair fell from about ±10% to a few
//! percent). QEMU's guest reports no progress, so it runs whole, once per arm.
//!
//! "With the observer" means what the daemon and `observe` do: the programs attached to
//! every KVM tracepoint and the host's KVM counters sampled by the iterator every
//! [`SAMPLE_INTERVAL`], its cost counted in the VM's result.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use paratick_common::guest::{TickMode, Workload};
use paratick_vmm::{Vm, VmConfig, WorkAmount, GUEST_KERNEL};
use serde::Serialize;

use super::stats::Spread;
use super::Bench;
use super::{vm_error, BenchError, Result};
use crate::daemon::SAMPLE_INTERVAL;
use crate::io_error::io;
use paratick_observer::{EventSource, Observer, PidFilter};

/// Fewest pairs a case of the full bench runs, whatever `--reps` says: a median of fewer
/// is noise here.
pub const MIN_PAIRS: u32 = 5;

/// The goal: the observer costs at most 1% (median ratio of performance with / without).
pub const OVERHEAD_GOAL: f64 = 0.99;

/// QEMU's command line for a kvm-unit-tests kernel on these hosts, but for `-kernel FILE
/// -append ARGS` (the kernels' README; `-arch-capabilities`: PVM refuses QEMU's write of
/// MSR 0x10a). The observer's tests run the same.
pub const QEMU_KVM_UNIT_TESTS_ARGS: [&str; 13] = [
    "-enable-kvm",
    "-cpu",
    "host,+x2apic,+tsc-deadline,-arch-capabilities",
    "-m",
    "256",
    "-nodefaults",
    "-nographic",
    "-serial",
    "stdio",
    "-display",
    "none",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=0x4",
];

/// The kvm-unit-tests kernel of the third-party case, and its arguments: TSC-deadline
/// expiries one after another, the guest's code all at CPL0 (emulated on PVM hosts).
const THIRD_PARTY_KERNEL: &str = "tscdeadline_latency.flat";

/// The third-party case's kernel in the kvm-unit-tests directory `dir`.
pub fn third_party_kernel(dir: &Path) -> PathBuf {
    dir.join(THIRD_PARTY_KERNEL)
}
const THIRD_PARTY_ARGS: &str = "20000000 200";

/// One case, over its pairs.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadCase {
    /// What ran.
    pub case: String,
    /// What is compared: `throughput_per_s` (higher is better) or `run_time_s` (lower).
    pub measure: &'static str,
    /// The measure of each run without the observer, in order.
    pub without: Vec<f64>,
    /// The measure of each run with it, in order (`with[i]` and `without[i]` are pair
    /// `i`, run one right after the other).
    pub with: Vec<f64>,
    /// Performance with / without, per pair (1.0: no cost; 0.99: 1% slower).
    pub ratio: Spread,
    /// Whether the median ratio meets [`OVERHEAD_GOAL`].
    pub meets_goal: bool,
}

impl OverheadCase {
    fn new(case: String, measure: &'static str, without: Vec<f64>, with: Vec<f64>) -> OverheadCase {
        let ratios: Vec<f64> = without
            .iter()
            .zip(&with)
            .map(|(&off, &on)| if measure == MEASURE_RUN_TIME { off / on } else { on / off })
            .collect();
        let ratio = Spread::of(&ratios);
        OverheadCase { case, measure, without, with, meets_goal: ratio.median >= OVERHEAD_GOAL, ratio }
    }
}

const MEASURE_THROUGHPUT: &str = "throughput_per_s";
const MEASURE_RUN_TIME: &str = "run_time_s";

/// The observer's cost, every case.
#[derive(Debug, Clone, Serialize)]
pub struct ObserverOverhead {
    /// The goal each case's median ratio is held to.
    pub goal: f64,
    /// Pairs per case.
    pub pairs: u32,
    /// The cases that ran.
    pub cases: Vec<OverheadCase>,
    /// Cases that could not run here, and why.
    pub not_run: Vec<String>,
}

impl ObserverOverhead {
    /// One line per case, for the terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .cases
            .iter()
            .map(|c| {
                format!(
                    "observer overhead {:<34} ratio {:.3} (min {:.3}, max {:.3}; goal >= {:.2}: {})",
                    c.case,
                    c.ratio.median,
                    c.ratio.min,
                    c.ratio.max,
                    self.goal,
                    if c.meets_goal { "met" } else { "NOT met" }
                )
            })
            .collect();
        lines.extend(self.not_run.iter().map(|why| format!("observer overhead: not run: {why}")));
        lines
    }

    /// The markdown section of the report.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "\n## Observer overhead\n");
        let _ = writeln!(
            md,
            "Each case ran {} times without and {} times with the observer (its programs attached, KVM's counters \
             sampled every {} s as the daemon does), in pairs alternating A B, B A; a pair's ratio is performance \
             with / without (throughput, or the inverse of run time). Our VMs ran once per case, in slices of \
             `--duration` each: the observer (or the daemon) was started beside the running guest and stopped again, \
             and a slice counts the work units the guest's tasks report live, from {} ms after the start or stop. \
             QEMU's guest reports no progress: it ran whole, once per slice. Goal: median ratio >= {:.2} (at most \
             1% cost).\n",
            self.pairs,
            self.pairs,
            SAMPLE_INTERVAL.as_secs_f64(),
            SETTLE.as_millis(),
            self.goal
        );
        let _ = writeln!(md, "| case | measure | without (median) | with (median) | ratio median | min | max | goal |");
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for c in &self.cases {
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} | {} |",
                c.case,
                c.measure,
                super::stats::median(c.without.iter().copied()),
                super::stats::median(c.with.iter().copied()),
                c.ratio.median,
                c.ratio.min,
                c.ratio.max,
                if c.meets_goal { "met" } else { "**not met**" }
            );
        }
        for why in &self.not_run {
            let _ = writeln!(md, "\nNot run: {why}.");
        }
        md
    }
}

/// What runs beside a slice of a VM's run in the "with" arm.
enum Beside {
    /// The observer in this process, sampled as the daemon samples it.
    Observer(Box<Observer>),
    /// A daemon of its own, with its observer.
    Daemon(BesideDaemon),
}

impl Beside {
    /// Waits `time` (see [`Beside::watch`]).
    fn wait(beside: &mut Option<Beside>, time: Duration) -> Result<()> {
        let end = Instant::now() + time;
        Beside::watch(beside, || Instant::now() >= end)
    }

    /// Waits until `done`, sampling the observer every [`SAMPLE_INTERVAL`] if there is
    /// one, as the daemon does, and failing if the daemon beside ended; both arms wake
    /// every 20 ms alike.
    fn watch(beside: &mut Option<Beside>, mut done: impl FnMut() -> bool) -> Result<()> {
        let mut next_sample = Instant::now();
        while !done() {
            match beside {
                Some(Beside::Observer(observer)) if Instant::now() >= next_sample => {
                    observer.snapshot()?;
                    observer.kvm_counters()?;
                    next_sample += SAMPLE_INTERVAL;
                }
                Some(Beside::Daemon(daemon)) => {
                    if let Some(status) = daemon.child.try_wait().map_err(io("cannot wait for the daemon"))? {
                        return Err(BenchError::Measurement(format!("the daemon beside the VM ended: {status}")));
                    }
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// How long a slice's arm runs before its work is counted: the start of the observer
/// (loading its programs takes about a CPU second here) or its stop falls outside.
const SETTLE: Duration = Duration::from_millis(500);

/// One of our VMs, by its throughput in `pairs` pairs of slices of `slice` each, without
/// and with what `start_beside` starts, alternating A B, B A, … in one run of the VM.
fn vm_slices(
    bench: &mut Bench<'_>,
    case: &str,
    config: &VmConfig,
    pairs: u32,
    slice: Duration,
    mut start_beside: impl FnMut() -> Result<Beside>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut config = config.clone();
    // Long enough for every slice and every start beside; stopped when done.
    let most = pairs as f64 * 2.0 * (slice + SETTLE + Duration::from_secs(30)).as_secs_f64();
    config.amount = WorkAmount::Seconds(most);
    config.deadline = Duration::from_secs_f64(most + 60.0);
    let vm = Vm::start(config.clone(), GUEST_KERNEL).map_err(vm_error("starting", &config.name))?;
    let measured = (|| {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for pair in 0..pairs {
            let arms = if pair % 2 == 0 { [false, true] } else { [true, false] };
            for with in arms {
                let mut beside = if with { Some(start_beside()?) } else { None };
                Beside::wait(&mut beside, SETTLE)?;
                let (units, started) =
                    (vm.counters().map_err(vm_error("reading", &config.name))?.work_units, Instant::now());
                Beside::wait(&mut beside, slice)?;
                let now = vm.counters().map_err(vm_error("reading", &config.name))?.work_units;
                let rate = (now - units) as f64 / started.elapsed().as_secs_f64();
                if let paratick_vmm::Lifecycle::Failed(error) = vm.lifecycle() {
                    return Err(BenchError::Measurement(format!(
                        "{} ended during the measurement: {error}",
                        config.name
                    )));
                }
                if with { &mut on } else { &mut off }.push(rate);
            }
            bench.progress(&format!("observer overhead {case} pair {}", pair + 1));
        }
        Ok((off, on))
    })();
    let stopped = vm.stop().map_err(vm_error("stopping", &config.name));
    let measured = measured?;
    stopped?;
    Ok(measured)
}

/// The third-party guest under QEMU, by its run time, with `beside` (if any) watched
/// from this thread while QEMU runs on another.
fn qemu_run_time(kernel: &Path, mut beside: Option<Beside>) -> Result<f64> {
    let started = Instant::now();
    let status = std::thread::scope(|scope| {
        let qemu = scope.spawn(|| {
            Command::new("qemu-system-x86_64")
                .args(QEMU_KVM_UNIT_TESTS_ARGS)
                .arg("-kernel")
                .arg(kernel)
                .args(["-append", THIRD_PARTY_ARGS])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
        });
        Beside::watch(&mut beside, || qemu.is_finished())?;
        Ok::<_, BenchError>(qemu.join().expect("the measured run does not panic"))
    })?
    .map_err(io("cannot run qemu-system-x86_64 (apt-get install qemu-system-x86)"))?;
    // isa-debug-exit: (0 << 1) | 1 when every test passed.
    if status.status.code() != Some(1) {
        let stderr = String::from_utf8_lossy(&status.stderr);
        return Err(BenchError::Measurement(format!(
            "QEMU with {}: {} {}",
            kernel.display(),
            status.status,
            stderr.trim()
        )));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// A `paratick-ctl daemon` with no VMs of its own, its observer watching the host.
struct BesideDaemon {
    child: Child,
    dir: PathBuf,
}

impl BesideDaemon {
    fn start() -> Result<BesideDaemon> {
        let dir = std::env::temp_dir().join(format!("paratick-bench-daemon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        let socket = dir.join("paratick.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(io("cannot find a free port"))?
            .port();
        let config = dir.join("paratick.toml");
        std::fs::write(
            &config,
            format!(
                "metrics_listen = \"127.0.0.1:{port}\"\nsocket = \"{}\"\nvm_launcher = \"process\"\n",
                socket.display()
            ),
        )
        .map_err(io(format!("cannot write {}", config.display())))?;
        let program = std::env::current_exe().map_err(io("cannot find paratick-ctl"))?;
        let child = Command::new(program)
            .arg("daemon")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("cannot start paratick-ctl daemon"))?;
        let mut daemon = BesideDaemon { child, dir };
        // Ready once its observer is up: loading the programs takes a CPU second or so
        // here, which must not fall into the measured run.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !observer_up(port) {
            if let Some(status) = daemon.child.try_wait().map_err(io("cannot wait for the daemon"))? {
                return Err(BenchError::Measurement(format!("the daemon beside the VM ended at start: {status}")));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Measurement(format!(
                    "the daemon beside the VM had no observer up within 30 s (metrics on port {port})"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(daemon)
    }
}

/// Whether the daemon serving metrics on `port` says its observer is up.
fn observer_up(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut body = String::new();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").is_ok()
        && stream.read_to_string(&mut body).is_ok()
        && body.lines().any(|line| line == "paratick_observer_up 1")
}

impl Drop for BesideDaemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `pairs` pairs of `without` and `with`, in the order A B, B A, A B, … so that a
/// drift of the host over the pairs weighs on both arms alike.
fn alternate(
    bench: &mut Bench<'_>,
    case: &str,
    pairs: u32,
    mut without: impl FnMut() -> Result<f64>,
    mut with: impl FnMut() -> Result<f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        if pair % 2 == 0 {
            off.push(without()?);
            on.push(with()?);
        } else {
            on.push(with()?);
            off.push(without()?);
        }
        bench.progress(&format!("observer overhead {case} pair {}", pair + 1));
    }
    Ok((off, on))
}

/// Runs every case, `pairs` pairs each. `kvm_unit_tests`: the directory of the
/// kvm-unit-tests kernels (the third-party case is not run without it).
pub(super) fn measure(bench: &mut Bench<'_>, pairs: u32, kvm_unit_tests: Option<&Path>) -> Result<ObserverOverhead> {
    let duration = WorkAmount::Seconds(bench.options.duration.as_secs_f64());
    let mut cases = Vec::new();
    let mut not_run = Vec::new();
    let slice = bench.options.duration;
    for workload in Workload::EVALUATED {
        let config = bench.config(workload, TickMode::Tickless, bench.options.hz, duration);
        let observer = || Ok(Beside::Observer(Box::new(Observer::start(&PidFilter::All)?)));
        let (without, with) = vm_slices(bench, workload.name(), &config, pairs, slice, observer)?;
        cases.push(OverheadCase::new(format!("{} (tickless)", workload.name()), MEASURE_THROUGHPUT, without, with));
    }

    match kvm_unit_tests.map(third_party_kernel) {
        Some(kernel) => {
            let observed =
                || qemu_run_time(&kernel, Some(Beside::Observer(Box::new(Observer::start(&PidFilter::All)?))));
            let (without, with) = alternate(bench, "QEMU", pairs, || qemu_run_time(&kernel, None), observed)?;
            let case = format!("QEMU {THIRD_PARTY_KERNEL} {THIRD_PARTY_ARGS}");
            cases.push(OverheadCase::new(case, MEASURE_RUN_TIME, without, with));
        }
        None => {
            bench.done += pairs as usize;
            not_run.push("QEMU: no --kvm-unit-tests DIR given".to_string());
        }
    }

    let config = bench.config(Workload::Io, TickMode::Tickless, bench.options.hz, duration);
    let daemon = || Ok(Beside::Daemon(BesideDaemon::start()?));
    let (without, with) = vm_slices(bench, "daemon", &config, pairs, slice, daemon)?;
    cases.push(OverheadCase::new("io (tickless), daemon beside".to_string(), MEASURE_THROUGHPUT, without, with));
    Ok(ObserverOverhead { goal: OVERHEAD_GOAL, pairs, cases, not_run })
}

/// Runs of [`measure`] (for the progress bar): three workloads, QEMU and the daemon.
pub(super) fn runs(pairs: u32) -> usize {
    (Workload::EVALUATED.len() + 2) * pairs as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_ratio_is_performance_with_over_without() {
        let throughput =
            OverheadCase::new("t".into(), MEASURE_THROUGHPUT, vec![100.0, 200.0, 100.0], vec![99.0, 200.0, 90.0]);
        assert_eq!((throughput.ratio.median, throughput.ratio.min, throughput.ratio.max), (0.99, 0.9, 1.0));
        assert!(throughput.meets_goal);
        // Run time: slower with the observer is a ratio below 1.
        let time = OverheadCase::new("q".into(), MEASURE_RUN_TIME, vec![5.0, 5.0, 5.0], vec![5.5, 5.0, 6.0]);
        assert!((time.ratio.median - 5.0 / 5.5).abs() < 1e-12);
        assert!(!time.meets_goal);
    }
}
