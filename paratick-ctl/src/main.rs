//! `paratick-ctl`: the Paratick command line (its options in cli.rs).

mod cli;

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use cli::{BenchArgs, Cli, Command, ObserveArgs, VmCommand};
use paratick_ctl::observe::{self, ObserveOptions};
use paratick_ctl::protocol::{DaemonAnswer, Request, Response};
use paratick_ctl::{client, daemon};
use paratick_observer::model::{ModelBackend, TimerModel};
use paratick_observer::report::{render_timer_reports, ObserveReport, ObserverCost};
use paratick_observer::{EventSource, Observer};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs its life (to the journal under systemd); the commands only what
    // goes wrong.
    let default_level =
        if matches!(cli.command, Command::Daemon(_)) { log::LevelFilter::Info } else { log::LevelFilter::Warn };
    paratick_vmm::logging::init(default_level);
    let result = match cli.command {
        Command::Observe(args) => observe(args),
        Command::Daemon(args) => {
            let overrides = daemon::Overrides { metrics_listen: args.metrics_listen, socket: args.socket.socket };
            daemon::run(args.config.as_deref(), overrides).map(|()| ExitCode::SUCCESS).map_err(anyhow::Error::from)
        }
        Command::Status { socket, json } => status(&socket.path(), json.json),
        Command::Vm { socket, json, command } => vm(&socket.path(), command, json.json),
        Command::Bench(args) => bench(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "paratick-ctl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage { out_dir: Some(dir) } => cli::write_man_pages(&dir).map(|written| {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }),
        Command::Manpage { out_dir: None } => cli::man_pages().and_then(|pages| {
            std::io::stdout().write_all(&pages[0].1)?;
            Ok(ExitCode::SUCCESS)
        }),
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
                    vm.lifecycle.state().name(),
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
                if let Some(error) = vm.lifecycle.error() {
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
            print_ok(response, json)?;
        }
        VmCommand::Start { name } => print_ok(client::request(socket, &Request::Start { vm: name })?, json)?,
        VmCommand::Stop { name } => print_ok(client::request(socket, &Request::Stop { vm: name })?, json)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A command that changes something prints what the daemon says it did (nothing when it
/// says nothing), or the daemon's answer with `--json`.
fn print_ok(answer: DaemonAnswer, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(&Response::Done(answer))?);
    } else if let Some(done) = &answer.done {
        println!("{done}");
    }
    Ok(())
}

fn observe(args: ObserveArgs) -> Result<ExitCode> {
    let json = args.json.json;
    observe::check_pids(&args.pids)?;
    if let Some(path) = &args.output {
        std::fs::File::create(path).with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    let options = ObserveOptions {
        pids: args.pids,
        command: args.command,
        duration: args.duration,
        interval: args.interval,
        live_table: !json,
        clear_screen: std::io::stdout().is_terminal(),
        svg: args.svg.is_some(),
    };
    // Statistics on before the programs load: their run counts then cover every run.
    let program_stats = match args.program_stats {
        true => Some(paratick_observer::enable_bpf_stats()?),
        false => None,
    };
    let filter = observe::pid_filter(&options, std::process::id());
    let mut observer = Observer::start(&filter).context("cannot start the eBPF observer")?;
    let (model, model_problem) = TimerModel::load(&args.model, ModelBackend::of_host());
    if let Some(problem) = &model_problem {
        log::warn!("{problem}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("cannot install signal handlers")?;
    }
    let seen = observe::observe(&mut observer, &model, &options, &stop, &mut std::io::stdout().lock())?;
    if let Some(dir) = &args.svg {
        seen.write_svgs(dir)?;
    }
    if args.report {
        let text = render_timer_reports(&seen.vms, &model);
        // Stdout is the JSON document's when it has no file of its own.
        if json && args.output.is_none() {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    }
    let exit_code = seen.exit_code();
    if json {
        let report = ObserveReport {
            timer_model: model.clone(),
            timer_model_problem: model_problem.clone(),
            backend: observer.backend().name(),
            tracepoints: observer.tracepoints().iter().map(|(name, state)| (*name, state.describe())).collect(),
            drops: seen.snapshot.drops_by_name(),
            duration_s: seen.duration_s,
            command: seen.command.clone(),
            observer: ObserverCost {
                programs: observer.loaded_programs(),
                program_events: seen.snapshot.program_events.clone(),
                program_runs: (program_stats.is_some() || paratick_observer::bpf_stats_enabled())
                    .then(|| observer.program_run_stats()),
            },
            vms: seen.vms,
        };
        let document = serde_json::to_string_pretty(&report)? + "\n";
        match &args.output {
            Some(path) => std::fs::write(path, document).with_context(|| format!("cannot write {}", path.display()))?,
            None => std::io::stdout().write_all(document.as_bytes())?,
        }
    } else {
        println!("paratick-ctl observe: stopped after {:.1}s", seen.duration_s);
    }
    if seen.snapshot.drops.iter().any(|&d| d > 0) {
        log::warn!("some events were not recorded: {:?}", seen.snapshot.drops_by_name());
    }
    Ok(ExitCode::from(exit_code))
}
