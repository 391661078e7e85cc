//! `paratick-ctl observe`: every KVM VM on the host (or the chosen ones, or those a
//! command starts), live and as a final report. This module is the session: it polls
//! an [`EventSource`] (the eBPF observer, or a fake in the tests) and /proc, keeps
//! what it learnt of each VM process, draws the live table and builds the per-VM
//! reports; the binary parses the options, loads the observer and prints.

use crate::io_error::io;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use paratick_observer::kvm_stats::KvmStatsTracker;
use paratick_observer::model::TimerModel;
use paratick_observer::procfs::{self, ProcessInfo};
use paratick_observer::report::{render_table, CommandReport, Row, TimerReport, VmReport};
use paratick_observer::{per_process, plot, EventSource, PidFilter, ProcessCounts, Snapshot};
use paratick_vmm::kvm_stats::KvmExitCounts;

/// Why watching failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// A pid to watch names no process.
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    /// A pid to watch is not a KVM process.
    #[error(
        "pid {pid} ({name}) is not a KVM process (it has no KVM VM file descriptor); run `paratick-ctl observe` to list KVM processes"
    )]
    NotKvm {
        /// The pid.
        pid: u32,
        /// Its process name.
        name: String,
    },
    /// The observer failed to read its maps.
    #[error(transparent)]
    Observer(#[from] paratick_observer::ObserverError),
    /// A file, a socket, a thread or another process (what was being done, and why).
    #[error(transparent)]
    Io(#[from] crate::io_error::IoError),
}

/// The result of what observes.
pub type Result<T, E = ObserveError> = std::result::Result<T, E>;

/// How often the session reads the maps and /proc, so that short-lived VMs are still
/// named.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What to watch, and how.
#[derive(Debug, Clone)]
pub struct ObserveOptions {
    /// Only these KVM processes (none: every one).
    pub pids: Vec<u32>,
    /// A command to run and watch, with its process tree (empty: none).
    pub command: Vec<String>,
    /// Stop after this long (none: at a signal, or when the command exits).
    pub duration: Option<Duration>,
    /// How often the live table is drawn (and the SVG series sampled).
    pub interval: Duration,
    /// Draw the live table.
    pub live_table: bool,
    /// Clear the screen before each table (a terminal).
    pub clear_screen: bool,
    /// Sample each VM's exits over time for an SVG per VM.
    pub svg: bool,
}

/// What a session saw.
pub struct Observation {
    /// How long it watched.
    pub duration_s: f64,
    /// The command it ran, and how that ended.
    pub command: Option<CommandReport>,
    /// Every VM process it saw, with its counts over the whole session.
    pub vms: Vec<VmReport>,
    /// The observer's last snapshot (drops, the programs' event counts).
    pub snapshot: Snapshot,
    /// Each VM's exits over time, when asked for.
    series: BTreeMap<u32, Vec<plot::ExitSample>>,
    known: HashMap<u32, ProcessInfo>,
}

impl Observation {
    /// Writes an SVG per VM into `dir`: its exits per second by category over time.
    pub fn write_svgs(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
        let mut written = Vec::new();
        for (pid, samples) in &self.series {
            let name = self.known.get(pid).map_or("?", |i| i.vm.name.as_str());
            let path = dir.join(format!("vm-{pid}.svg"));
            std::fs::write(&path, plot::exits_over_time(&format!("{name} (pid {pid}): exits per second"), samples))
                .map_err(io(format!("cannot write {}", path.display())))?;
            written.push(path);
        }
        Ok(written)
    }

    /// The exit status `observe` ends with: the command's (128 + its signal if a
    /// signal ended it), else success.
    pub fn exit_code(&self) -> u8 {
        match &self.command {
            Some(CommandReport { exit_code: Some(code), .. }) => (*code).clamp(0, 255) as u8,
            Some(CommandReport { signal: Some(signal), .. }) => (128 + signal).clamp(0, 255) as u8,
            _ => 0,
        }
    }
}

/// Checks that each pid to watch is a KVM process, with a message saying what it is
/// otherwise.
pub fn check_pids(pids: &[u32]) -> Result<()> {
    for &pid in pids {
        match procfs::process_info(pid) {
            None => return Err(ObserveError::NoSuchProcess(pid)),
            Some(info) if !info.is_kvm() => return Err(ObserveError::NotKvm { pid, name: info.name }),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Which processes the observer's programs count for `options`, this process being
/// `own_pid`.
pub fn pid_filter(options: &ObserveOptions, own_pid: u32) -> PidFilter {
    if options.command.is_empty() && options.pids.is_empty() {
        return PidFilter::All;
    }
    // For a command we track ourselves and follow forks: the child is then tracked by
    // the fork tracepoint before it runs a single instruction.
    let mut pids = options.pids.clone();
    if !options.command.is_empty() {
        pids.push(own_pid);
    }
    PidFilter::Pids { pids, follow_forks: !options.command.is_empty() }
}

/// The counts at the end of the live table's last interval: when, the observer's per
/// process, KVM's per process.
type Interval = (Instant, BTreeMap<u32, ProcessCounts>, BTreeMap<u32, KvmExitCounts>);

/// A session: what it learnt so far.
struct Session<'a, O> {
    observer: &'a mut O,
    model: &'a TimerModel,
    options: &'a ObserveOptions,
    filter: PidFilter,
    own_pid: u32,
    own_start: u64,
    started: Instant,
    /// KVM's own counts: the eBPF copies (else debugfs, where the kernel allows).
    ebpf_counters: bool,
    kvm_stats_available: bool,
    kvm: KvmStatsTracker,
    /// Every process seen, as last read from /proc.
    known: HashMap<u32, ProcessInfo>,
    /// When each process was first and last seen alive.
    lifetimes: HashMap<u32, (Instant, Instant)>,
    series: BTreeMap<u32, Vec<plot::ExitSample>>,
    previous: Option<Interval>,
    next_table: Instant,
    next_kvm_sample: Instant,
}

/// Watches until `stop` is set, the duration is over or the command exits, drawing the
/// live table on `out`; returns what it saw.
pub fn observe<O: EventSource>(
    observer: &mut O,
    model: &TimerModel,
    options: &ObserveOptions,
    stop: &AtomicBool,
    out: &mut dyn Write,
) -> Result<Observation> {
    let own_pid = std::process::id();
    let ebpf_counters = observer.kvm_counters_state().is_ok();
    let kvm_stats_problem = if ebpf_counters { None } else { paratick_observer::kvm_stats::ensure_debugfs().err() };
    if let Some(problem) = &kvm_stats_problem {
        log::warn!("KVM's exit counts are unavailable: {problem}");
    }
    let started = Instant::now();
    let mut session = Session {
        observer,
        model,
        options,
        filter: pid_filter(options, own_pid),
        own_pid,
        own_start: procfs::start_ticks(own_pid).unwrap_or(0),
        started,
        ebpf_counters,
        kvm_stats_available: kvm_stats_problem.is_none(),
        kvm: KvmStatsTracker::default(),
        known: HashMap::new(),
        lifetimes: HashMap::new(),
        series: BTreeMap::new(),
        previous: None,
        next_table: started + options.interval,
        next_kvm_sample: started,
    };
    let mut child = match options.command.split_first() {
        Some((program, rest)) => {
            Some(std::process::Command::new(program).args(rest).spawn().map_err(io(format!("cannot run {program}")))?)
        }
        None => None,
    };
    loop {
        std::thread::sleep(POLL_INTERVAL.min(options.interval));
        let child_done = match &child {
            Some(child) => exited_without_reaping(child)?,
            None => false,
        };
        let now = session.poll(child_done)?;
        session.table(now, out)?;
        let timed_out = options.duration.is_some_and(|d| now.duration_since(started) >= d);
        if child_done || timed_out || stop.load(Ordering::Relaxed) {
            break;
        }
    }
    let duration_s = started.elapsed().as_secs_f64();
    let command = match child.as_mut() {
        Some(child) => {
            let status = child.wait().map_err(io("cannot wait for the command"))?;
            Some(CommandReport {
                argv: options.command.clone(),
                pid: child.id(),
                exit_code: status.code(),
                signal: status.signal(),
            })
        }
        None => None,
    };
    session.finish(duration_s, command)
}

impl<O: EventSource> Session<'_, O> {
    /// Reads the maps and /proc; KVM's counters once an interval. Returns when.
    fn poll(&mut self, child_done: bool) -> Result<Instant> {
        self.observer.flush_logs();
        let snapshot = self.observer.snapshot()?;
        let own_pid = self.own_pid;
        remember(&mut self.known, snapshot.pids().into_iter().filter(|&p| p != own_pid));
        let now = Instant::now();
        if !self.kvm_stats_available {
            return Ok(now);
        }
        // The first poll gives the baseline. Each sample visits every open file of the
        // host; a VM's final counts need no sample: its vCPU threads' exits copy them.
        let kvm_due = now >= self.next_kvm_sample || child_done;
        let counters = if self.ebpf_counters && kvm_due { Some(self.observer.kvm_counters()?) } else { None };
        let mut pids: BTreeSet<u32> = self.known.iter().filter(|(_, i)| i.is_kvm()).map(|(p, _)| *p).collect();
        pids.extend(&self.options.pids);
        if let Some(counters) = &counters {
            pids.extend(counters.keys().filter(|&&p| p != own_pid));
        }
        let none = BTreeMap::new();
        for pid in pids {
            // One read of /proc/PID/stat says both whether it lives and when it began.
            let start = procfs::start_ticks(pid);
            let new_in_window = start.is_some_and(|start| start >= self.own_start);
            if kvm_due {
                self.kvm.sample(pid, new_in_window, counters.as_ref().map(|c| c.get(&pid).unwrap_or(&none)));
            }
            if start.is_some() {
                self.lifetimes.entry(pid).and_modify(|(_, last)| *last = now).or_insert((now, now));
            }
        }
        if kvm_due {
            self.next_kvm_sample = now + self.options.interval;
        }
        Ok(now)
    }

    /// Draws the live table (and samples the SVG series) when an interval is over.
    fn table(&mut self, now: Instant, out: &mut dyn Write) -> Result<()> {
        if let Some(text) = self.sample_table(now)? {
            out.write_all(text.as_bytes()).map_err(io("cannot print the table"))?;
        }
        Ok(())
    }

    /// The live table's text when an interval is over (the SVG series sampled too).
    fn sample_table(&mut self, now: Instant) -> Result<Option<String>> {
        if !(self.options.live_table || self.options.svg) || now < self.next_table {
            return Ok(None);
        }
        let snapshot = self.observer.snapshot()?;
        let per_pid = per_process(&snapshot);
        let mut pids: BTreeSet<u32> = per_pid.keys().copied().filter(|&p| p != self.own_pid).collect();
        if matches!(self.filter, PidFilter::All) {
            pids.extend(procfs::kvm_processes().into_iter().map(|p| p.pid));
        }
        pids.extend(&self.options.pids);
        // The live table is of the VMs that run: one that ended is in the final report.
        pids.retain(|&pid| procfs::process_alive(pid));
        remember(&mut self.known, pids.iter().copied());
        let (since, before, kvm_before) = match &self.previous {
            Some((at, counts, kvm_counts)) => (now.duration_since(*at), Some(counts), Some(kvm_counts)),
            None => (now.duration_since(self.started), None, None),
        };
        let empty = ProcessCounts::default();
        let seconds = since.as_secs_f64().max(1e-3);
        let mut kvm_now = BTreeMap::new();
        let exits_traced = self.observer.backend().traces_every_exit();
        let mut rows = Vec::with_capacity(pids.len());
        for &pid in &pids {
            let counts = per_pid.get(&pid).unwrap_or(&empty);
            let before_counts = before.and_then(|b| b.get(&pid));
            let row = Row::new(pid, self.known.get(&pid), counts, before_counts, seconds, exits_traced);
            let Some(total) = self.kvm.report(pid).map(|r| r.total) else {
                rows.push(row);
                continue;
            };
            kvm_now.insert(pid, total);
            let exits = total.since(kvm_before.and_then(|k| k.get(&pid)).copied().unwrap_or_default());
            let timer =
                TimerReport::new(&counts.since(before_counts.unwrap_or(&empty)), Some(exits.exits), 0.0, self.model);
            if self.options.svg {
                let at = now.duration_since(self.started).as_secs_f64();
                let sample = plot::ExitSample::new(at, seconds, &exits, timer.timer_exits);
                self.series.entry(pid).or_default().push(sample);
            }
            rows.push(row.with_kvm_exits(&exits, seconds, &timer));
        }
        self.previous = Some((now, per_pid, kvm_now));
        self.next_table = now + self.options.interval;
        if !self.options.live_table {
            return Ok(None);
        }
        let clear = if self.options.clear_screen { "\x1b[H\x1b[2J" } else { "" };
        let backend = self.observer.backend().name();
        Ok(Some(format!(
            "{clear}paratick-ctl observe: {} VM process(es), backend {backend}\n{}\n",
            rows.len(),
            render_table(&rows)
        )))
    }

    /// The last sample, and every VM's report over the session.
    fn finish(mut self, duration_s: f64, command: Option<CommandReport>) -> Result<Observation> {
        // The final counts of VMs whose process has just exited (copied as their vCPU
        // threads exited).
        if self.ebpf_counters {
            let counters = self.observer.kvm_counters()?;
            for (&pid, vcpus) in &counters {
                if pid != self.own_pid {
                    let new_in_window = self.lifetimes.contains_key(&pid)
                        && procfs::start_ticks(pid).is_none_or(|start| start >= self.own_start);
                    self.kvm.sample(pid, new_in_window, Some(vcpus));
                }
            }
        }
        // Read after that sample, so that the programs' event counts cover the same runs
        // as the kernel's run counts read with them.
        let snapshot = self.observer.snapshot()?;
        let mut per_pid = per_process(&snapshot);
        per_pid.remove(&self.own_pid);
        for pid in &self.options.pids {
            per_pid.entry(*pid).or_default();
        }
        let vms = per_pid
            .into_iter()
            .map(|(pid, counts)| {
                let mut vm = VmReport::new(pid, self.known.get(&pid), counts);
                vm.kvm_stats = self.kvm.report(pid);
                let lifetime_s = self.lifetimes.get(&pid).map_or(duration_s, |(first, last)| {
                    (last.duration_since(*first) + POLL_INTERVAL).as_secs_f64().min(duration_s)
                });
                let busy_s = (lifetime_s * f64::from(vm.vcpus.max(1)) - vm.counts.halted_ns as f64 / 1e9).max(0.0);
                let exits = vm.kvm_stats.as_ref().map(|k| k.total.exits);
                vm.timer = Some(TimerReport::new(&vm.counts, exits, busy_s, self.model));
                vm
            })
            .collect();
        Ok(Observation { duration_s, command, vms, snapshot, series: self.series, known: self.known })
    }
}

/// Updates what we know of these processes; a process that is gone keeps its last info,
/// and the vCPU count keeps its maximum (vCPU fds close before the process exits).
fn remember(known: &mut HashMap<u32, ProcessInfo>, pids: impl IntoIterator<Item = u32>) {
    for pid in pids {
        let Some(mut info) = procfs::process_info(pid) else { continue };
        if let Some(old) = known.get(&pid) {
            info.vcpus = info.vcpus.max(old.vcpus);
            // An exiting process's command line reads empty: what it said stays.
            if info.cmdline.is_empty() {
                info.cmdline = old.cmdline.clone();
                info.vm = old.vm.clone();
            }
        }
        known.insert(pid, info);
    }
}

/// Whether the child has exited, leaving it a zombie so that /proc still names it.
fn exited_without_reaping(child: &Child) -> Result<bool> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let status = waitid(Id::Pid(pid), flags).map_err(|e| io("waitid on the command")(e.into()))?;
    Ok(status != WaitStatus::StillAlive)
}

#[cfg(test)]
mod tests;
