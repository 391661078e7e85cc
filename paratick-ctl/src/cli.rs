//! The command line: every command, its options and their help, and the man pages
//! made from them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};

/// Paratick: paravirtualized scheduler ticks for KVM guests.
#[derive(Debug, Parser)]
#[command(name = "paratick-ctl", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// `--socket`, for the commands that talk to the daemon (and the daemon itself).
#[derive(Debug, Args)]
pub(crate) struct SocketArg {
    /// The daemon's control socket [default: /run/paratick/paratick.sock, or the
    /// configuration's].
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) socket: Option<PathBuf>,
}

impl SocketArg {
    /// The socket to ask.
    pub(crate) fn path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| PathBuf::from(paratick_ctl::client::DEFAULT_SOCKET))
    }
}

/// `--json`, for the commands that print.
#[derive(Debug, Args)]
pub(crate) struct JsonArg {
    /// Print JSON instead of text (errors stay one line on stderr).
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Watch what KVM does for every VM on this host (eBPF on KVM tracepoints).
    Observe(ObserveArgs),
    /// Run the daemon: VMs, eBPF observer, Prometheus metrics, control socket.
    Daemon(DaemonArgs),
    /// The daemon's state.
    Status {
        #[command(flatten)]
        socket: SocketArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// The daemon's VMs.
    Vm {
        #[command(flatten)]
        socket: SocketArg,
        #[command(flatten)]
        json: JsonArg,
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Reproduce the paper's evaluation: paratick vs tickless, tickless-full and periodic on
    /// three workloads, each against a no-timer floor; and each tick delivery method.
    Bench(BenchArgs),
    /// Print a shell completion script (`xtask install` installs them).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one per command into a directory (`xtask
    /// install` installs them).
    Manpage {
        /// Write paratick-ctl.1 and a page per command (paratick-ctl-vm-list.1, ...) here.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Where results.json, results.csv, results.md and the plots go.
    #[arg(long, default_value = "bench-out", value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Repetitions of every run.
    #[arg(long, default_value_t = 5)]
    pub(crate) reps: u32,
    /// Length of a throughput run (and target length of an execution-time run).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Guest tick rate, every mode.
    #[arg(long, default_value_t = paratick_common::abi::TICK_RATE_DEFAULT_HZ)]
    pub(crate) hz: u32,
    /// vCPUs of the multithreaded and I/O workloads.
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: u32,
    /// One repetition of 1 s runs: the whole bench in about a minute (CI).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Where the calibrated exits model goes (what `observe` and the daemon read).
    #[arg(long, value_name = "FILE", default_value = paratick_observer::model::DEFAULT_MODEL_FILE)]
    pub(crate) model_out: PathBuf,
    /// Directory of the kvm-unit-tests kernels: the observer's cost is then also measured
    /// on QEMU running tscdeadline_latency.flat (a third-party VMM and guest).
    #[arg(long, value_name = "DIR")]
    pub(crate) kvm_unit_tests: Option<PathBuf>,
    /// Measure only what the eBPF observer costs the VMs it watches (every workload, QEMU,
    /// and the daemon beside a VM), PAIRS alternating pairs a case; prints one line a case
    /// and writes DIR/observer-overhead.json and .md.
    #[arg(long, value_name = "PAIRS")]
    pub(crate) observer_overhead: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct DaemonArgs {
    #[command(flatten)]
    pub(crate) socket: SocketArg,
    /// Configuration file (TOML) [default: the embedded demo configuration].
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Serve metrics on this address instead of the configuration's.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum VmCommand {
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
pub(crate) struct ObserveArgs {
    #[command(flatten)]
    pub(crate) json: JsonArg,
    /// Refresh interval of the live table (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(crate) interval: Duration,
    /// Only watch this KVM process (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub(crate) pids: Vec<u32>,
    /// Stop after this long (e.g. 10s, 2m).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Write the final report to FILE instead of stdout (which the command may use).
    #[arg(short, long, value_name = "FILE")]
    pub(crate) output: Option<std::path::PathBuf>,
    /// Print the timer-overhead report of every VM when stopping.
    #[arg(long)]
    pub(crate) report: bool,
    /// Write an SVG per VM into DIR: its exits per second by category over time.
    #[arg(long, value_name = "DIR")]
    pub(crate) svg: Option<std::path::PathBuf>,
    /// The exits model (calibrated by `paratick-ctl bench`); its backend's defaults
    /// where the file is missing.
    #[arg(long, value_name = "FILE", default_value = paratick_observer::model::DEFAULT_MODEL_FILE)]
    pub(crate) model: std::path::PathBuf,
    /// Turn the kernel's BPF run statistics on while observing, and report each of the
    /// observer's programs' runs and run time (each run then costs two clock reads more).
    #[arg(long)]
    pub(crate) program_stats: bool,
    /// Run COMMAND (after attaching), watch its process tree, stop when it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<String>,
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 1s, 500ms, 2m)"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

/// What each command's exit status means, for its man page: (command path, statuses).
const EXIT_STATUS: &[(&str, &[(&str, &str)])] = &[
    ("paratick-ctl", &[("0", "success"), ("1", "failure (see the command's page)"), ("2", "bad usage")]),
    (
        "paratick-ctl-observe",
        &[
            ("0", "stopped by its duration or a signal"),
            ("N", "with -- COMMAND: the command's exit status, 128 + the signal that ended it"),
            ("1", "the observer could not start (not root, no tracefs, no KVM), or a pid is not a KVM process"),
            ("2", "bad usage"),
        ],
    ),
    (
        "paratick-ctl-daemon",
        &[
            ("0", "stopped by SIGTERM or SIGINT (its VMs stopped, or left to systemd)"),
            ("1", "could not start: a bad configuration, the socket or metrics address taken"),
            ("2", "bad usage"),
        ],
    ),
    (
        "paratick-ctl-bench",
        &[("0", "every run done and the results written"), ("1", "a run failed"), ("2", "bad usage")],
    ),
];

/// What a command that asks the daemon exits with.
const DAEMON_CLIENT_EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "done"),
    ("1", "the daemon refused the request (an unknown VM, a rate out of range, a VM in the wrong state)"),
    ("2", "bad usage"),
    ("3", "the daemon is not reachable (not running, or another --socket)"),
    ("4", "permission denied on the socket (not root, not in socket_group)"),
];

/// The man page of each command, by file name (`paratick-ctl.1`, `paratick-ctl-vm-list.1`,
/// ...): clap's sections and an EXIT STATUS section.
pub(crate) fn man_pages() -> Result<Vec<(String, Vec<u8>)>> {
    let mut pages = Vec::new();
    let mut command = Cli::command();
    // Built, so that each subcommand has the options it inherits (`vm`'s `--socket`).
    command.build();
    add_pages(command, "paratick-ctl", &mut pages)?;
    Ok(pages)
}

/// Adds the page of `command`, invoked as `invocation` (`paratick-ctl vm list`), and
/// those of its subcommands.
fn add_pages(command: clap::Command, invocation: &str, pages: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    let name = invocation.replace(' ', "-");
    let command = command.name(name.clone()).bin_name(invocation.to_string());
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    if command.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if command.has_subcommands() {
        man.render_subcommands_section(&mut page)?;
    }
    let asks_the_daemon = name.starts_with("paratick-ctl-status") || name.starts_with("paratick-ctl-vm");
    let statuses = match EXIT_STATUS.iter().find(|(page, _)| *page == name) {
        Some((_, statuses)) => statuses,
        None if asks_the_daemon => DAEMON_CLIENT_EXIT_STATUS,
        None => EXIT_STATUS[0].1,
    };
    writeln!(page, ".SH \"EXIT STATUS\"")?;
    for (status, meaning) in statuses {
        writeln!(page, ".TP\n{status}\n{}", meaning.replace('-', "\\-"))?;
    }
    if command.get_version().is_some() {
        man.render_version_section(&mut page)?;
    }
    pages.push((format!("{name}.1"), page));
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        add_pages(sub.clone(), &format!("{invocation} {}", sub.get_name()), pages)?;
    }
    Ok(())
}

/// Writes every man page into `dir`; returns their paths.
pub(crate) fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    man_pages()?
        .into_iter()
        .map(|(name, page)| {
            let path = dir.join(name);
            std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(path)
        })
        .collect()
}
