//! `paratick-vmm serve`: one VM in a process of its own. It answers the requests of
//! `paratick_vmm::control` on `RUNTIME_DIR/NAME.sock`, tells systemd when it is ready
//! (a `Type=notify` unit instance), and when the VM ends (the guest finished or failed,
//! a `stop` request, SIGTERM or SIGINT) writes how it ended to `NAME.end.json` and exits:
//! 0 when it finished or was stopped, 1 when it failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use paratick_common::guest::TickMode;
use paratick_vmm::control::{self, ErrorCode, VmAnswer, VmEnd, VmProcessStatus, VmReply, VmRequest, MAX_LINE_BYTES};
use paratick_vmm::{Lifecycle, Vm, GUEST_KERNEL};

use crate::VmArgs;

/// `serve`'s arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// VM name (letters, digits, '-' and '_'): names its socket and end record.
    #[arg(long, value_parser = check_name)]
    name: String,
    /// Directory of the VM's socket and end record.
    #[arg(long, default_value = control::DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,
    #[command(flatten)]
    vm: VmArgs,
}

fn check_name(name: &str) -> Result<String, String> {
    if !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        Ok(name.to_string())
    } else {
        Err("use 1 to 64 letters, digits, '-' and '_'".into())
    }
}

/// How long a client may take to send its request, or to take the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the VM's state is looked at while no request comes.
const POLL_INTERVAL_MS: u16 = 200;

/// Set by SIGTERM and SIGINT.
static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_signal: libc::c_int) {
    TERMINATE.store(true, Ordering::Relaxed);
}

fn install_terminate_handler() -> Result<()> {
    // No SA_RESTART: poll(2) returns EINTR at once, so a stop is not delayed by the
    // poll interval.
    let action = SigAction::new(SigHandler::Handler(on_terminate), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("cannot install the {signal} handler"))?;
    }
    Ok(())
}

/// Runs the VM until it ends; see the module doc.
pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    let config = args.vm.config(&args.name);
    config.validate().context("invalid VM configuration")?;
    install_terminate_handler()?;
    std::fs::create_dir_all(&args.runtime_dir)
        .with_context(|| format!("cannot create {}", args.runtime_dir.display()))?;
    let listener = bind(&control::socket_path(&args.runtime_dir, &args.name))?;
    // A record of an earlier run of this VM is stale from now on.
    let end = control::end_path(&args.runtime_dir, &args.name);
    if let Err(e) = std::fs::remove_file(&end) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e).with_context(|| format!("cannot remove {}", end.display()));
        }
    }
    let mode = config.mode;
    let vm = match Vm::start(config, GUEST_KERNEL) {
        Ok(vm) => vm,
        Err(e) => {
            let error = format!("cannot start the VM: {e}");
            record_end(&args, Lifecycle::Failed(error.clone()), None);
            bail!(error);
        }
    };
    log::info!("VM {} running ({}), control socket {}", args.name, mode.name(), args.runtime_dir.display());
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let started = Instant::now();
    let stop_reply = loop {
        if TERMINATE.load(Ordering::Relaxed) {
            log::info!("VM {}: stopping on a signal", args.name);
            break None;
        }
        if vm.lifecycle().state().is_final() {
            break None;
        }
        if readable(&listener)? {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Some(client) = answer(stream, &vm, mode, &args.name, started) {
                        break Some(client);
                    }
                }
                Err(e) => log::warn!("VM {}: accept: {e}", args.name),
            }
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let mut lifecycle = vm.lifecycle();
    let move_to = |lifecycle: &mut Lifecycle, next| {
        if let Err(e) = lifecycle.transition(next) {
            log::error!("VM {}: {e}", args.name);
        }
    };
    let counters = vm.counters().ok();
    let counters = if lifecycle.error().is_some() {
        counters
    } else {
        // Finished: the guest is done. Still running: stopped on request or signal.
        let finished = lifecycle == Lifecycle::Finished;
        if !finished {
            move_to(&mut lifecycle, Lifecycle::Stopping);
        }
        match vm.stop() {
            Ok(report) => {
                if !finished {
                    move_to(&mut lifecycle, Lifecycle::Stopped);
                }
                Some(report.counters)
            }
            Err(e) => {
                move_to(&mut lifecycle, Lifecycle::Failed(e.to_string()));
                counters
            }
        }
    };
    let error = lifecycle.error().map(str::to_string);
    let state = lifecycle.state();
    record_end(&args, lifecycle, counters);
    let _ = std::fs::remove_file(control::socket_path(&args.runtime_dir, &args.name));
    if let Some(mut client) = stop_reply {
        let _ = write_reply(&mut client, &VmReply::ok());
    }
    match error {
        Some(error) => {
            log::error!("VM {} failed: {error}", args.name);
            Ok(ExitCode::FAILURE)
        }
        None => {
            log::info!("VM {} {state}", args.name);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn record_end(args: &ServeArgs, lifecycle: Lifecycle, counters: Option<paratick_vmm::Counters>) {
    let end = VmEnd { name: args.name.clone(), pid: std::process::id(), lifecycle, counters };
    if let Err(e) = control::write_end(&args.runtime_dir, &end) {
        log::error!("VM {}: cannot record how it ended: {e}", args.name);
    }
}

/// Binds the VM's socket (mode 0600), replacing a stale one but not a live one.
fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("a VM process is already listening on {}: stop that VM first", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Waits up to the poll interval for a connection; a signal ends the wait early.
fn readable(listener: &UnixListener) -> Result<bool> {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(POLL_INTERVAL_MS)) {
        Ok(ready) => Ok(ready > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e).context("poll"),
    }
}

/// Answers one client; returns it when it asked for a stop (answered after the stop).
fn answer(stream: UnixStream, vm: &Vm, mode: TickMode, name: &str, started: Instant) -> Option<UnixStream> {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let mut line = Vec::new();
    let mut client = stream;
    let read = BufReader::new(&client).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut line);
    let reply = match read {
        Ok(0) => return None,
        Err(e) => VmReply::failure(ErrorCode::BadRequest, format!("bad request: {e}")),
        Ok(_) if line.len() > MAX_LINE_BYTES => {
            VmReply::failure(ErrorCode::BadRequest, format!("bad request: longer than {MAX_LINE_BYTES} bytes"))
        }
        Ok(_) => match serde_json::from_slice::<VmRequest>(&line) {
            Err(e) => VmReply::failure(ErrorCode::BadRequest, format!("bad request: {e}")),
            Ok(VmRequest::Stop {}) => return Some(client),
            Ok(VmRequest::Status {}) => status(vm, name, started),
            Ok(VmRequest::SetTickRate { .. }) if mode != TickMode::Paratick => VmReply::error(format!(
                "VM {name} runs a {} guest, which asks for no ticks: only paratick VMs take a tick rate",
                mode.name()
            )),
            Ok(VmRequest::SetTickRate { hz }) => match vm.set_operator_hz(hz) {
                Ok(()) => {
                    log::info!(
                        "VM {name}: operator tick rate {}",
                        hz.map_or("off".to_string(), |hz| format!("{hz} Hz"))
                    );
                    VmReply::ok()
                }
                Err(e) => VmReply::error(e.to_string()),
            },
        },
    };
    if let Err(e) = write_reply(&mut client, &reply) {
        log::debug!("VM {name}: reply: {e}");
    }
    if line.len() > MAX_LINE_BYTES {
        discard_the_rest(&client);
    }
    None
}

/// Reads and drops what a client still sends (for at most [`CLIENT_TIMEOUT`]): closing
/// a socket with data unread resets the connection, and the client could lose the reply.
fn discard_the_rest(mut client: &UnixStream) {
    let _ = client.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + CLIENT_TIMEOUT;
    let mut sink = [0u8; 8192];
    while Instant::now() < until && client.read(&mut sink).is_ok_and(|n| n > 0) {}
}

fn status(vm: &Vm, name: &str, started: Instant) -> VmReply {
    let lifecycle = vm.lifecycle();
    match vm.counters() {
        Err(e) => VmReply::error(format!("cannot read the VM's counters: {e}")),
        Ok(counters) => VmReply::Done(VmAnswer {
            status: Some(VmProcessStatus {
                name: name.to_string(),
                pid: std::process::id(),
                lifecycle,
                halted_vcpus: vm.halted_vcpus(),
                uptime_s: started.elapsed().as_secs_f64(),
                counters,
            }),
        }),
    }
}

fn write_reply(client: &mut UnixStream, reply: &VmReply) -> std::io::Result<()> {
    let mut line = serde_json::to_string(reply).expect("replies serialize");
    line.push('\n');
    client.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use paratick_common::guest::{TickMode, Workload};
    use paratick_vmm::{TickDelivery, VmConfig, WorkAmount};

    use crate::{Cli, Command};

    /// What the daemon writes (`control::serve_args`) is what `serve` reads.
    #[test]
    fn serve_arguments_round_trip_every_setting() {
        let mut config = VmConfig::new("web-1", 3, TickMode::Paratick, 300, Workload::Io, WorkAmount::Seconds(2.5));
        config.operator_hz = Some(120);
        config.housekeeping_hz = 4;
        config.delivery = TickDelivery::LapicTimer;
        let units = VmConfig::new("b", 1, TickMode::TicklessFull, 250, Workload::Sequential, WorkAmount::Units(9));
        for config in [config, units] {
            let mut argv = vec!["paratick-vmm".to_string(), "serve".into()];
            argv.extend(paratick_vmm::control::serve_args(&config));
            let Command::Serve(args) = Cli::try_parse_from(&argv).unwrap().command else { panic!("not serve") };
            assert_eq!(args.vm.config(&args.name), config);
        }
    }
}
