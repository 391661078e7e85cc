//! `paratick-vmm run`: runs one Paratick guest and prints what happened.
//! `paratick-vmm serve`: runs one VM as a process of its own, with a control socket
//! (the daemon starts one per VM, so that VMs outlive it; see `paratick_vmm::control`).

mod serve;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use paratick_vmm::{RunReport, TickDelivery, Vm, VmConfig, WorkAmount, GUEST_KERNEL};

/// Run Paratick guests on KVM.
#[derive(Debug, Parser)]
#[command(name = "paratick-vmm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one VM until its work is done and print a summary.
    Run(RunArgs),
    /// Run one VM in this process, controlled on a socket of its own, until it ends or
    /// is stopped (SIGTERM or a `stop` request); then record how it ended.
    Serve(serve::ServeArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
}

/// What a VM runs: the same arguments for `run` and `serve`
/// (`paratick_vmm::control::serve_args` writes them).
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("amount").required(true).args(["duration", "work"]))]
struct VmArgs {
    /// Number of vCPUs (1-8).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Tick mode.
    #[arg(long, value_enum)]
    mode: paratick_common::guest::TickMode,
    /// Guest tick rate in Hz (10-4000).
    #[arg(long, default_value_t = paratick_common::abi::TICK_RATE_DEFAULT_HZ)]
    hz: u32,
    /// Workload (the evaluated ones; the test workloads are accepted too).
    #[arg(long, value_enum)]
    workload: paratick_common::guest::Workload,
    /// Work for this long (guest time), e.g. 3s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Do this many work units.
    #[arg(long)]
    work: Option<u64>,
    /// Operator tick rate (Hz), overriding the guest's requests.
    #[arg(long)]
    tick_rate: Option<u32>,
    /// Paratick: the rate a vCPU asks for while it needs no scheduler tick (Hz, 1 to --hz).
    #[arg(long, default_value_t = paratick_common::abi::HOUSEKEEPING_RATE_DEFAULT_HZ)]
    housekeeping_hz: u32,
    /// Paratick: how ticks are delivered.
    #[arg(long, value_enum, default_value_t = TickDelivery::Msi)]
    delivery: TickDelivery,
    /// Stop the VM with an error if it has not finished after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
}

impl VmArgs {
    /// The VM configuration these arguments describe.
    fn config(&self, name: &str) -> VmConfig {
        let amount = match (self.duration, self.work) {
            (Some(duration), None) => WorkAmount::Seconds(duration.as_secs_f64()),
            (None, Some(units)) => WorkAmount::Units(units),
            _ => unreachable!("clap requires exactly one of --duration and --work"),
        };
        let mut config = VmConfig::new(name, self.vcpus, self.mode, self.hz, self.workload, amount);
        config.operator_hz = self.tick_rate;
        config.housekeeping_hz = self.housekeeping_hz;
        config.delivery = self.delivery;
        if let Some(deadline) = self.deadline {
            config.deadline = deadline;
        }
        config
    }
}

fn main() -> ExitCode {
    paratick_vmm::logging::init(log::LevelFilter::Info);
    let result = match Cli::parse().command {
        Command::Run(args) => run(args).map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve::serve(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("paratick-vmm: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let vm = Vm::start(args.vm.config("vm"), GUEST_KERNEL).context("cannot start the VM")?;
    let report = vm.wait().context("the VM failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn print_summary(r: &RunReport) {
    println!(
        "{} {} on {} vCPU(s) at {} Hz: {} work units in {:.3} s ({:.1}/s)",
        r.mode, r.workload, r.vcpus, r.hz, r.work_units, r.elapsed_s, r.throughput_per_s
    );
    println!(
        "guest ticks {} (idle {}), injected {} (ridden {}, skipped idle {}), timer writes {}, KVM exits {}",
        r.counters.guest_ticks.total,
        r.counters.guest_idle_ticks.total,
        r.counters.ticks_injected,
        r.counters.ticks_ridden,
        r.counters.ticks_skipped_idle,
        r.guest_timer_writes,
        r.counters.kvm_stats.exits
    );
}
