//! `paratick-ctl`: the Paratick command line.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{IsTerminal, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use paratick_ctl::protocol::Request;
use paratick_ctl::{client, daemon};
use paratick_observer::model::{ModelBackend, TimerModel};
use paratick_observer::procfs::{self, ProcessInfo};
use paratick_observer::report::{
    render_table, render_timer_reports, CommandReport, ObserveReport, ObserverCost, Row, TimerReport, VmReport,
};
use paratick_observer::{kvm_stats, plot};
use paratick_observer::{per_process, EventSource, Observer, PidFilter, ProcessCounts};
use paratick_vmm::kvm_stats::KvmExitCounts;

/// Paratick: paravirtualized scheduler ticks for KVM guests.
#[derive(Debug, Parser)]
#[command(name = "paratick-ctl", version, about)]
struct Cli {
    /// The daemon's control socket [default: /run/paratick/paratick.sock, or the config's].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print JSON (every command that prints: status, vm, observe; errors stay one line
    /// on stderr).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch what KVM does for every VM on this host (eBPF on KVM tracepoints).
    Observe(ObserveArgs),
    /// Run the daemon: VMs, eBPF observer, Prometheus metrics, control socket.
    Daemon(DaemonArgs),
    /// The daemon's state.
    Status,
    /// The daemon's VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Reproduce the paper's evaluation: paratick vs tickless, tickless-full and periodic on
    /// three workloads, each against a no-timer floor; and each tick delivery method.
    Bench(BenchArgs),
    /// Print a shell completion script (`xtask install` installs them).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff; `xtask install` installs it).
    Manpage,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Where results.json, results.csv, results.md and the plots go.
    #[arg(long, default_value = "bench-out", value_name = "DIR")]
    out: PathBuf,
    /// Repetitions of every run.
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// Length of a throughput run (and target length of an execution-time run).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Guest tick rate, every mode.
    #[arg(long, default_value_t = paratick_common::abi::TICK_RATE_DEFAULT_HZ)]
    hz: u32,
    /// vCPUs of the multithreaded and I/O workloads.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// One repetition of 1 s runs: the whole bench in about a minute (CI).
    #[arg(long)]
    quick: bool,
    /// Where the calibrated exits model goes (what `observe` and the daemon read).
    #[arg(long, value_name = "FILE", default_value = paratick_observer::model::DEFAULT_MODEL_FILE)]
    model_out: PathBuf,
    /// Directory of the kvm-unit-tests kernels: the observer's cost is then also measured
    /// on QEMU running tscdeadline_latency.flat (a third-party VMM and guest).
    #[arg(long, value_name = "DIR")]
    kvm_unit_tests: Option<PathBuf>,
    /// Measure only what the eBPF observer costs the VMs it watches (every workload, QEMU,
    /// and the daemon beside a VM), PAIRS alternating pairs a case; prints one line a case
    /// and writes DIR/observer-overhead.json and .md.
    #[arg(long, value_name = "PAIRS")]
    observer_overhead: Option<u32>,
}

#[derive(Debug, Args)]
struct DaemonArgs {
    /// Configuration file (TOML) [default: the embedded demo configuration].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve metrics on this address instead of the configuration's.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// List the VMs with their state and tick rates.
    List,
    /// Set a VM's tick rate, or give it back to the guest with --auto.
    SetTickRate {
        /// VM name.
        name: String,
        /// Tick rate in Hz (10-4000).
        #[arg(required_unless_present = "auto", conflicts_with = "auto")]
        hz: Option<u32>,
        /// Follow the guest's own requests again.
        #[arg(long)]
        auto: bool,
    },
    /// Start a VM that is not running.
    Start {
        /// VM name.
        name: String,
    },
    /// Stop a running VM.
    Stop {
        /// VM name.
        name: String,
    },
}

#[derive(Debug, Args)]
struct ObserveArgs {
    /// Refresh interval of the live table (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Only watch this KVM process (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Stop after this long (e.g. 10s, 2m).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Write the final report to FILE instead of stdout (which the command may use).
    #[arg(short, long, value_name = "FILE")]
    output: Option<std::path::PathBuf>,
    /// Print the timer-overhead report of every VM when stopping.
    #[arg(long)]
    report: bool,
    /// Write an SVG per VM into DIR: its exits per second by category over time.
    #[arg(long, value_name = "DIR")]
    svg: Option<std::path::PathBuf>,
    /// The exits model (calibrated by `paratick-ctl bench`); its backend's defaults
    /// where the file is missing.
    #[arg(long, value_name = "FILE", default_value = paratick_observer::model::DEFAULT_MODEL_FILE)]
    model: std::path::PathBuf,
    /// Turn the kernel's BPF run statistics on while observing, and report each of the
    /// observer's programs' runs and run time (each run then costs two clock reads more).
    #[arg(long)]
    program_stats: bool,
    /// Run COMMAND (after attaching), watch its process tree, stop when it exits.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 1s, 500ms, 2m)"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its life (to the journal under systemd); the commands only what
    // goes wrong.
    let default_level =
        if matches!(cli.command, Command::Daemon(_)) { log::LevelFilter::Info } else { log::LevelFilter::Warn };
    paratick_vmm::logging::init(default_level);
    let socket = cli.socket.clone().unwrap_or_else(|| PathBuf::from(client::DEFAULT_SOCKET));
    let result = match cli.command {
        Command::Observe(args) => observe(args, cli.json),
        Command::Daemon(args) => {
            let overrides = daemon::Overrides { metrics_listen: args.metrics_listen, socket: cli.socket };
            daemon::run(args.config.as_deref(), overrides).map(|()| ExitCode::SUCCESS)
        }
        Command::Status => status(&socket, cli.json),
        Command::Vm(command) => vm(&socket, command, cli.json),
        Command::Bench(args) => bench(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "paratick-ctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("paratick-ctl: {err:#}");
            // Distinct codes for what a script may act on: refused 1, unreachable 3,
            // permission denied 4.
            err.downcast_ref::<client::ClientError>().map_or(ExitCode::FAILURE, |e| ExitCode::from(e.exit_code()))
        }
    }
}

fn bench(args: BenchArgs) -> Result<ExitCode> {
    let (reps, duration) = if args.quick { (1, Duration::from_secs(1)) } else { (args.reps, args.duration) };
    let options = paratick_ctl::bench::BenchOptions {
        out: args.out,
        reps,
        duration,
        hz: args.hz,
        vcpus: args.vcpus,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        kvm_unit_tests: args.kvm_unit_tests,
        // A median of fewer than five pairs is noise here; --quick only checks the output.
        overhead_pairs: match (args.observer_overhead, args.quick) {
            (Some(pairs), _) => pairs,
            (None, true) => 1,
            (None, false) => reps.max(paratick_ctl::bench::overhead::MIN_PAIRS),
        },
    };
    if args.observer_overhead.is_some() {
        let overhead = paratick_ctl::bench::observer_overhead(&options)?;
        std::fs::create_dir_all(&options.out).with_context(|| format!("cannot create {}", options.out.display()))?;
        let json = options.out.join("observer-overhead.json");
        std::fs::write(&json, serde_json::to_string_pretty(&overhead)? + "\n")
            .with_context(|| format!("cannot write {}", json.display()))?;
        let md = options.out.join("observer-overhead.md");
        std::fs::write(
            &md,
            format!(
                "# paratick-ctl bench --observer-overhead\n\nCommand: `{}`\n{}",
                options.command,
                overhead.markdown()
            ),
        )
        .with_context(|| format!("cannot write {}", md.display()))?;
        for line in overhead.lines() {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let results = paratick_ctl::bench::run(&options)?;
    for w in &results.summary {
        for c in w.comparisons.iter().filter(|c| c.mode == "paratick") {
            let removed = c
                .timer_exits_removed
                .map_or("n/a (the baseline's timer exits are too few to divide by)".to_string(), |r| {
                    format!("{:.2}", r.median)
                });
            println!(
                "{:<14} {}: timer exits removed {removed}, exits {:+.1}% (modelled VMX {:+.1}%), throughput {:+.1}%, execution time {:+.1}%",
                w.workload,
                c.comparison,
                c.exits_pct,
                c.modelled_vmx_exits_pct,
                c.throughput_pct,
                c.execution_time_pct
            );
        }
    }
    match &results.timer_model {
        Some(model) => {
            if let Some(dir) = args.model_out.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(&args.model_out, serde_json::to_string_pretty(model)? + "\n")
                .with_context(|| format!("cannot write {}", args.model_out.display()))?;
            println!(
                "exits model ({}): {:.2} exits per timer interrupt, {:.0} us per tick, {:.0} floor exits/s, {:.2} per injected tick, {:.0}% removed; written to {}",
                model.backend,
                model.exits_per_timer_interrupt,
                model.guest_seconds_per_tick * 1e6,
                model.floor_exits_per_s,
                model.exits_per_injected_tick,
                model.paratick_removed_fraction * 100.0,
                args.model_out.display()
            );
        }
        None => println!("no exits model: the runs did not allow a calibration"),
    }
    for line in results.observer_overhead.lines() {
        println!("{line}");
    }
    println!("results in {}", options.out.display());
    Ok(ExitCode::SUCCESS)
}

fn status(socket: &Path, json: bool) -> Result<ExitCode> {
    let response = client::request(socket, &Request::Status {})?;
    let status = response.status.context("the daemon sent no status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("paratick daemon {} (pid {}), up {:.0} s", status.version, status.pid, status.uptime_s);
        println!("VMs: {} running of {}", status.vms_running, status.vms_total);
        println!("metrics: {}", status.metrics);
        println!("control socket: {}", status.socket);
        println!("backend: {}, observer: {}", status.backend, status.observer);
    }
    Ok(ExitCode::SUCCESS)
}

fn vm(socket: &Path, command: VmCommand, json: bool) -> Result<ExitCode> {
    match command {
        VmCommand::List => {
            let vms = client::request(socket, &Request::List {})?.vms.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<16} {:<9} {:>8} {:<13} {:>5} {:>7} {:>7} {:>7} {:>7} {:>9} {:>10} {:>12}",
                "NAME",
                "STATE",
                "PID",
                "MODE",
                "VCPUS",
                "REQ HZ",
                "SET HZ",
                "EFF HZ",
                "OBS HZ",
                "EXITS/s",
                "EXITS/UNIT",
                "SAVED (PROJ)"
            );
            for vm in vms {
                let set = vm.configured_hz.map_or_else(|| "auto".to_string(), |hz| hz.to_string());
                let per_unit = vm.exits_per_unit.map_or_else(|| "-".to_string(), |e| format!("{e:.2}"));
                println!(
                    "{:<16} {:<9} {:>8} {:<13} {:>5} {:>7} {:>7} {:>7.1} {:>7.1} {:>9.0} {:>10} {:>12}",
                    vm.name,
                    vm.state.name(),
                    vm.pid.map_or_else(|| "-".to_string(), |pid| pid.to_string()),
                    vm.mode,
                    vm.vcpus,
                    vm.requested_hz,
                    set,
                    vm.effective_hz,
                    vm.observed_hz,
                    vm.exits_per_s,
                    per_unit,
                    vm.exits_saved
                );
                if let Some(error) = vm.error {
                    println!("    error: {error}");
                }
                if vm.restarts > 0 {
                    println!("    restarted {} times after failures", vm.restarts);
                }
            }
        }
        VmCommand::SetTickRate { name, hz, auto } => {
            let response =
                client::request(socket, &Request::SetTickRate { vm: name, hz: if auto { None } else { hz } })?;
            print_ok(&response, json)?;
        }
        VmCommand::Start { name } => print_ok(&client::request(socket, &Request::Start { vm: name })?, json)?,
        VmCommand::Stop { name } => print_ok(&client::request(socket, &Request::Stop { vm: name })?, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A command that changes something prints what the daemon says it did (nothing when it
/// says nothing), or the daemon's answer with `--json`.
fn print_ok(response: &paratick_ctl::protocol::Response, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(response)?);
    } else if let Some(done) = &response.done {
        println!("{done}");
    }
    Ok(())
}

/// The counts at the end of the live table's last interval: when, the observer's per
/// process, KVM's per process.
type Interval = (Instant, BTreeMap<u32, ProcessCounts>, BTreeMap<u32, KvmExitCounts>);

/// How often `observe` reads the maps and /proc, so that short-lived VMs are still named.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

fn observe(args: ObserveArgs, json: bool) -> Result<ExitCode> {
    for &pid in &args.pids {
        match procfs::process_info(pid) {
            None => bail!("no process with pid {pid}"),
            Some(info) if !info.is_kvm() => bail!(
                "pid {pid} ({}) is not a KVM process (it has no KVM VM file descriptor); run `paratick-ctl observe` to list KVM processes",
                info.name
            ),
            Some(_) => {}
        }
    }
    if let Some(path) = &args.output {
        std::fs::File::create(path).with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    let own_pid = std::process::id();
    let filter = if args.command.is_empty() && args.pids.is_empty() {
        PidFilter::All
    } else {
        // For `-- COMMAND` we track ourselves and follow forks: the child is then tracked
        // by the fork tracepoint before it runs a single instruction.
        let mut pids = args.pids.clone();
        if !args.command.is_empty() {
            pids.push(own_pid);
        }
        PidFilter::Pids { pids, follow_forks: !args.command.is_empty() }
    };
    // Statistics on before the programs load: their run counts then cover every run.
    let program_stats = match args.program_stats {
        true => Some(paratick_observer::enable_bpf_stats()?),
        false => None,
    };
    let mut observer = Observer::start(&filter).context("cannot start the eBPF observer")?;
    let (model, model_problem) = TimerModel::load(&args.model, ModelBackend::of_host());
    if let Some(problem) = &model_problem {
        log::warn!("{problem}");
    }
    // KVM's own counts: the eBPF copies, else debugfs.
    let ebpf_counters = observer.kvm_counters_state().is_ok();
    let kvm_stats_problem = if ebpf_counters { None } else { kvm_stats::ensure_debugfs().err() };
    if let Some(problem) = &kvm_stats_problem {
        log::warn!("KVM's exit counts are unavailable: {problem}");
    }
    let mut kvm = kvm_stats::KvmStatsTracker::default();
    let own_start = procfs::start_ticks(own_pid).unwrap_or(0);
    let mut lifetimes: HashMap<u32, (Instant, Instant)> = HashMap::new();
    let mut series: BTreeMap<u32, Vec<plot::ExitSample>> = BTreeMap::new();

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("cannot install signal handlers")?;
    }
    let started = Instant::now();
    let mut child = match args.command.split_first() {
        Some((program, rest)) => Some(
            std::process::Command::new(program).args(rest).spawn().with_context(|| format!("cannot run {program}"))?,
        ),
        None => None,
    };

    let mut known: HashMap<u32, ProcessInfo> = HashMap::new();
    let mut previous: Option<Interval> = None;
    let mut next_table = started + args.interval;
    let mut next_kvm_sample = started;
    let live_table = !json;
    let clear_screen = std::io::stdout().is_terminal();
    loop {
        std::thread::sleep(POLL_INTERVAL.min(args.interval));
        observer.flush_logs();
        let child_done = match &child {
            Some(child) => exited_without_reaping(child)?,
            None => false,
        };
        let snapshot = observer.snapshot()?;
        remember(&mut known, snapshot.pids().into_iter().filter(|&p| p != own_pid));
        let now = Instant::now();
        if kvm_stats_problem.is_none() {
            // KVM's counters once an interval (the first poll gives the baseline): each
            // sample visits every open file of the host. A VM's final counts need no
            // sample: its vCPU threads' exits copy them.
            let kvm_due = now >= next_kvm_sample || child_done;
            let counters = if ebpf_counters && kvm_due { Some(observer.kvm_counters()?) } else { None };
            let mut pids: BTreeSet<u32> = known.iter().filter(|(_, i)| i.is_kvm()).map(|(p, _)| *p).collect();
            pids.extend(&args.pids);
            if let Some(counters) = &counters {
                pids.extend(counters.keys().filter(|&&p| p != own_pid));
            }
            let none = BTreeMap::new();
            for pid in pids {
                // One read of /proc/PID/stat says both whether it lives and when it began.
                let start = procfs::start_ticks(pid);
                let new_in_window = start.is_some_and(|start| start >= own_start);
                if kvm_due {
                    kvm.sample(pid, new_in_window, counters.as_ref().map(|c| c.get(&pid).unwrap_or(&none)));
                }
                if start.is_some() {
                    lifetimes.entry(pid).and_modify(|(_, last)| *last = now).or_insert((now, now));
                }
            }
            if kvm_due {
                next_kvm_sample = now + args.interval;
            }
        }
        let sample_interval = live_table || args.svg.is_some();
        if sample_interval && now >= next_table {
            let per_pid = per_process(&snapshot);
            let mut pids: BTreeSet<u32> = per_pid.keys().copied().filter(|&p| p != own_pid).collect();
            if matches!(filter, PidFilter::All) {
                pids.extend(procfs::kvm_processes().into_iter().map(|p| p.pid));
            }
            pids.extend(&args.pids);
            remember(&mut known, pids.iter().copied());
            let (since, before, kvm_before) = match &previous {
                Some((at, counts, kvm_counts)) => (now.duration_since(*at), Some(counts), Some(kvm_counts)),
                None => (now.duration_since(started), None, None),
            };
            let empty = ProcessCounts::default();
            let seconds = since.as_secs_f64().max(1e-3);
            let mut kvm_now = BTreeMap::new();
            let rows: Vec<Row> = pids
                .iter()
                .map(|pid| {
                    let counts = per_pid.get(pid).unwrap_or(&empty);
                    let before_counts = before.and_then(|b| b.get(pid));
                    let row = Row::new(
                        *pid,
                        known.get(pid),
                        counts,
                        before_counts,
                        seconds,
                        observer.backend().traces_every_exit(),
                    );
                    let Some(total) = kvm.report(*pid).map(|r| r.total) else { return row };
                    kvm_now.insert(*pid, total);
                    let exits = total.since(kvm_before.and_then(|k| k.get(pid)).copied().unwrap_or_default());
                    let timer = TimerReport::new(
                        &counts.since(before_counts.unwrap_or(&empty)),
                        Some(exits.exits),
                        0.0,
                        &model,
                    );
                    series.entry(*pid).or_default().push(plot::ExitSample::new(
                        now.duration_since(started).as_secs_f64(),
                        seconds,
                        &exits,
                        timer.timer_exits,
                    ));
                    row.with_kvm_exits(exits.exits, seconds, &timer)
                })
                .collect();
            previous = Some((now, per_pid, kvm_now));
            next_table = now + args.interval;
            if !live_table {
                continue;
            }
            let mut out = std::io::stdout().lock();
            if clear_screen {
                write!(out, "\x1b[H\x1b[2J")?;
            }
            writeln!(
                out,
                "paratick-ctl observe: {} VM process(es), backend {}",
                rows.len(),
                observer.backend().name()
            )?;
            out.write_all(render_table(&rows).as_bytes())?;
            writeln!(out)?;
        }
        let timed_out = args.duration.is_some_and(|d| now.duration_since(started) >= d);
        if child_done || timed_out || stop.load(Ordering::Relaxed) {
            break;
        }
    }

    let duration_s = started.elapsed().as_secs_f64();
    let command = match child.as_mut() {
        Some(child) => {
            let status = child.wait().context("cannot wait for the command")?;
            Some(CommandReport {
                argv: args.command.clone(),
                pid: child.id(),
                exit_code: status.code(),
                signal: status.signal(),
            })
        }
        None => None,
    };
    // A last sample: the final counts of VMs whose process has just exited (copied as
    // their vCPU threads exited).
    if ebpf_counters {
        let counters = observer.kvm_counters()?;
        for (&pid, vcpus) in &counters {
            if pid != own_pid {
                let new_in_window =
                    lifetimes.contains_key(&pid) && procfs::start_ticks(pid).is_none_or(|start| start >= own_start);
                kvm.sample(pid, new_in_window, Some(vcpus));
            }
        }
    }
    // Read after that sample, so that the programs' event counts below cover the same
    // runs as the kernel's run counts read with them.
    let snapshot = observer.snapshot()?;
    let mut per_pid = per_process(&snapshot);
    per_pid.remove(&own_pid);
    for pid in &args.pids {
        per_pid.entry(*pid).or_default();
    }
    let vms: Vec<VmReport> = per_pid
        .into_iter()
        .map(|(pid, counts)| {
            let mut vm = VmReport::new(pid, known.get(&pid), counts);
            vm.kvm_stats = kvm.report(pid);
            let lifetime_s = lifetimes.get(&pid).map_or(duration_s, |(first, last)| {
                (last.duration_since(*first) + POLL_INTERVAL).as_secs_f64().min(duration_s)
            });
            let busy_s = (lifetime_s * f64::from(vm.vcpus.max(1)) - vm.counts.halted_ns as f64 / 1e9).max(0.0);
            let exits = vm.kvm_stats.as_ref().map(|k| k.total.exits);
            vm.timer = Some(TimerReport::new(&vm.counts, exits, busy_s, &model));
            vm
        })
        .collect();
    if let Some(dir) = &args.svg {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (pid, samples) in &series {
            let name = known.get(pid).map_or("?", |i| i.vm.name.as_str());
            let path = dir.join(format!("vm-{pid}.svg"));
            std::fs::write(&path, plot::exits_over_time(&format!("{name} (pid {pid}): exits per second"), samples))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    if args.report {
        let text = render_timer_reports(&vms, &model);
        // Stdout is the JSON document's when it has no file of its own.
        if json && args.output.is_none() {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    }
    if json {
        let report = ObserveReport {
            timer_model: model.clone(),
            timer_model_problem: model_problem.clone(),
            backend: observer.backend().name(),
            tracepoints: observer.tracepoints().iter().map(|(name, state)| (*name, state.describe())).collect(),
            drops: snapshot.drops_by_name(),
            duration_s,
            command: command.clone(),
            vms,
            observer: ObserverCost {
                programs: observer.loaded_programs(),
                program_events: snapshot.program_events.clone(),
                program_runs: (program_stats.is_some() || paratick_observer::bpf_stats_enabled())
                    .then(|| observer.program_run_stats()),
            },
        };
        let document = serde_json::to_string_pretty(&report)? + "\n";
        match &args.output {
            Some(path) => std::fs::write(path, document).with_context(|| format!("cannot write {}", path.display()))?,
            None => std::io::stdout().write_all(document.as_bytes())?,
        }
    } else {
        println!("paratick-ctl observe: stopped after {duration_s:.1}s");
    }
    if snapshot.drops.iter().any(|&d| d > 0) {
        log::warn!("some events were not recorded: {:?}", snapshot.drops_by_name());
    }
    Ok(match command {
        Some(CommandReport { exit_code: Some(code), .. }) => ExitCode::from(code.clamp(0, 255) as u8),
        Some(CommandReport { signal: Some(signal), .. }) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
        _ => ExitCode::SUCCESS,
    })
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
    let status = waitid(Id::Pid(pid), flags).context("waitid on the command")?;
    Ok(status != WaitStatus::StillAlive)
}
