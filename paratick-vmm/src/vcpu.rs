//! A vCPU thread: KVM_RUN in a loop, with every exit decided in one `match`
//! ([`VcpuThread::handle_exit`]). Kicks are a real-time signal whose handler sets
//! `immediate_exit` (Firecracker's scheme), so a stop request can never be lost between
//! the stop check and KVM_RUN.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use paratick_common::abi::{
    check_tick_page_address, check_tick_page_version, tick_page, TickRequest, HOST_FLAG_LAPIC_TIMER,
    PARATICK_PAGE_PORT, PARATICK_REQUEST_PORT, PARATICK_TICK_VECTOR,
};
use paratick_common::guest::{GuestStatus, BLOCK_REQUEST_PORT, CONSOLE_PORT, RESULTS_PORT};

use crate::block::BlockCounters;
use crate::config::TickDelivery;
use crate::guest_input::GuestWarnings;
use crate::injector::{send_msi, Decision, TickControl};
use crate::memory::GuestMemory;
use crate::{lapic_timer, VmError};

/// Offset from SIGRTMIN of the signal that kicks vCPU threads out of KVM_RUN.
const KICK_SIGNAL_OFFSET: libc::c_int = 0;

thread_local! {
    /// This thread's kvm_run, for the kick handler (null when the thread has no vCPU).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_signal: libc::c_int) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU
        // thread while its VcpuFd (and so the mapping) is alive and cleared before it is
        // dropped; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The kick signal number.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction with a handler that only does an
        // async-signal-safe store; SA_RESTART is not set, so KVM_RUN returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = kick_handler as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            let rc = libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
            assert_eq!(rc, 0, "sigaction for the vCPU kick signal: {}", std::io::Error::last_os_error());
        }
    });
}

/// Counters of guest tick requests, shared by the vCPUs.
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// Well-formed requests.
    pub received: AtomicU64,
    /// Requests for a rate out of range (clamped).
    pub clamped: AtomicU64,
    /// Requests that were not a 32-bit write.
    pub malformed: AtomicU64,
    /// Tick pages registered.
    pub pages: AtomicU64,
    /// Tick page registrations refused (bad address, size or version).
    pub pages_rejected: AtomicU64,
}

/// What ended a vCPU thread, or the VM.
#[derive(Debug)]
pub enum Outcome {
    /// The guest reported its results.
    Finished,
    /// Something failed.
    Failed(VmError),
}

/// State the vCPU threads share with the VM.
#[derive(Debug)]
pub struct Shared {
    /// Bad guest input, logged up to a budget.
    pub warnings: GuestWarnings,
    /// Set to stop every thread.
    pub stop: AtomicBool,
    /// How the VM ended (first report wins).
    pub outcome: std::sync::Mutex<Option<Outcome>>,
    /// Signalled when `outcome` is set.
    pub ended: std::sync::Condvar,
    /// Guest tick requests.
    pub requests: RequestCounters,
    /// Host thread ids of the VM's threads (vCPUs, injector, block device).
    pub thread_ids: std::sync::Mutex<Vec<u32>>,
    /// Opened when the vCPUs may run (see `Vm::resume`); (open, signal).
    pub gate: (std::sync::Mutex<bool>, std::sync::Condvar),
}

impl Shared {
    /// Records the calling thread as one of the VM's (for the observer's attribution).
    pub fn register_current_thread(&self) {
        let tid = nix::unistd::gettid().as_raw() as u32;
        self.thread_ids.lock().expect("thread ids lock").push(tid);
    }

    /// Blocks until the vCPUs may run (or the VM is stopping).
    pub fn wait_for_gate(&self) {
        let mut open = self.gate.0.lock().expect("gate lock");
        while !*open && !self.stop.load(Ordering::Acquire) {
            open = self.gate.1.wait(open).expect("gate lock");
        }
    }

    /// Whether the vCPUs may run.
    pub fn gate_is_open(&self) -> bool {
        *self.gate.0.lock().expect("gate lock")
    }

    /// Lets the vCPUs run.
    pub fn open_gate(&self) {
        *self.gate.0.lock().expect("gate lock") = true;
        self.gate.1.notify_all();
    }

    /// Records how the VM ended (if nothing did before) and stops everything.
    pub fn end(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().expect("outcome lock");
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.stop.store(true, Ordering::Release);
        self.ended.notify_all();
        drop(slot);
        // Threads still waiting at the gate must see the stop.
        let _open = self.gate.0.lock().expect("gate lock");
        self.gate.1.notify_all();
    }
}

/// What a handled exit means for the run loop.
enum Next {
    /// Re-enter the guest.
    Resume,
    /// The VM is over (the guest reported, or something failed).
    Stop,
}

/// What the exit handler of one vCPU needs besides the exit itself.
pub struct ExitContext {
    /// vCPU index (= APIC id).
    pub index: usize,
    /// The VM (for MSIs).
    pub vm: Arc<VmFd>,
    /// Shared with the VM.
    pub shared: Arc<Shared>,
    /// Tick state.
    pub ticks: Arc<TickControl>,
    /// Guest memory (tick pages).
    pub memory: Arc<GuestMemory>,
    /// How ticks are delivered.
    pub delivery: TickDelivery,
    /// Requests to the block device.
    pub block: Sender<u64>,
    /// The block device's counters (malformed requests are refused here).
    pub block_counters: Arc<BlockCounters>,
    /// VM name, for logs.
    pub name: String,
}

/// The longest console line held before it is logged: a guest that never writes a
/// newline has its output logged in pieces of this size, and holds no more host memory.
pub const CONSOLE_LINE_MAX: usize = 256;

/// Console output of one vCPU not yet logged (at most [`CONSOLE_LINE_MAX`] bytes).
#[derive(Debug, Default)]
struct ConsoleLine(Vec<u8>);

impl ConsoleLine {
    /// Takes the guest's bytes; returns the lines they complete, a line held at
    /// [`CONSOLE_LINE_MAX`] bytes counting as complete.
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in data {
            if byte != b'\n' {
                self.0.push(byte);
            }
            if byte == b'\n' || self.0.len() == CONSOLE_LINE_MAX {
                lines.push(String::from_utf8_lossy(&self.0).into_owned());
                self.0.clear();
            }
        }
        lines
    }
}

/// Everything one vCPU thread owns or shares.
pub struct VcpuThread {
    fd: VcpuFd,
    context: ExitContext,
    /// Console output not yet logged.
    console: ConsoleLine,
    /// `lapic-timer` delivery: the period the LAPIC timer is programmed for.
    programmed_period: Option<u64>,
}

impl VcpuThread {
    /// A vCPU thread's state, before it runs.
    pub fn new(fd: VcpuFd, context: ExitContext) -> VcpuThread {
        VcpuThread { fd, context, console: ConsoleLine::default(), programmed_period: None }
    }

    /// The thread body: runs until the VM stops; failures end the VM.
    pub fn run(mut self) {
        if let Err(error) = self.run_loop() {
            self.context.shared.end(Outcome::Failed(error));
        }
    }

    fn run_loop(&mut self) -> Result<(), VmError> {
        self.context.shared.wait_for_gate();
        KVM_RUN.with(|cell| cell.set(self.fd.get_kvm_run()));
        let result = self.run_until_stopped();
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        result
    }

    fn run_until_stopped(&mut self) -> Result<(), VmError> {
        while !self.context.shared.stop.load(Ordering::Acquire) {
            let next = match self.fd.run() {
                Ok(exit) => Self::handle_exit(exit, &self.context, &mut self.console)?,
                Err(e) if e.errno() == libc::EINTR => {
                    // Kicked (a stop, a rate change, or the kick raced with entry).
                    self.fd.set_kvm_immediate_exit(0);
                    self.sync_lapic_timer()?;
                    continue;
                }
                Err(e) => return Err(VmError::Kvm { operation: "KVM_RUN", source: e }),
            };
            match next {
                Next::Stop => break,
                Next::Resume => {
                    self.sync_lapic_timer()?;
                    self.ride_due_tick()?;
                }
            }
        }
        Ok(())
    }

    /// `lapic-timer` delivery: reprograms the LAPIC timer when the scheduler rate in
    /// force changed (a guest request, or the operator's rate, which kicks us).
    fn sync_lapic_timer(&mut self) -> Result<(), VmError> {
        if self.context.delivery != TickDelivery::LapicTimer {
            return Ok(());
        }
        let ticks = &self.context.ticks;
        let wanted = ticks.period_ns(self.context.index);
        if wanted != self.programmed_period {
            let phase = lapic_timer::program(&self.fd, wanted, ticks)?;
            ticks.vcpus[self.context.index].set_lapic_phase_error(phase);
            self.programmed_period = wanted;
        }
        Ok(())
    }

    /// We exited to userspace anyway: a due tick is queued now and delivered on the
    /// re-entry, instead of costing a kick of its own later.
    fn ride_due_tick(&self) -> Result<(), VmError> {
        let context = &self.context;
        if context.delivery == TickDelivery::LapicTimer {
            return Ok(());
        }
        // The vCPU is in userspace, so not halted.
        if context.ticks.decide(context.index, &context.memory, || false)? == Decision::Deliver {
            send_msi(&context.vm, context.index as u32, PARATICK_TICK_VECTOR)
                .map_err(VmError::kvm("KVM_SIGNAL_MSI"))?;
            context.ticks.vcpus[context.index].ridden.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A guest registers its vCPU's tick page: checked, then the host's flags are
    /// written into it and the injector follows it. A bad one is refused (and counted);
    /// the vCPU then keeps ticks at its requested rate.
    fn register_tick_page(context: &ExitContext, gpa: u64) -> Result<(), VmError> {
        let (index, memory) = (context.index, &context.memory);
        let checked = check_tick_page_address(gpa, memory.size()).and_then(|gpa| {
            check_tick_page_version(memory.load_u32(gpa + tick_page::VERSION).unwrap_or(0)).map(|()| gpa)
        });
        match checked {
            Ok(gpa) => {
                let flags = if context.delivery == TickDelivery::LapicTimer { HOST_FLAG_LAPIC_TIMER } else { 0 };
                memory.store_u32(gpa + tick_page::HOST_FLAGS, flags)?;
                context.ticks.set_page(index, gpa);
                context.shared.requests.pages.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                context.shared.requests.pages_rejected.fetch_add(1, Ordering::Relaxed);
                context.shared.warnings.warn(format_args!("vCPU {index}: refused the tick page at {gpa:#x}: {error}"));
            }
        }
        Ok(())
    }

    /// Carries out what an exit asks ([`GuestExit::decode`] decides what it is).
    fn handle_exit(exit: VcpuExit<'_>, context: &ExitContext, console: &mut ConsoleLine) -> Result<Next, VmError> {
        let ExitContext { index, shared, ticks, block, name, .. } = context;
        let index = *index;
        match GuestExit::decode(exit) {
            GuestExit::TickRequest { raw, request } => {
                shared.requests.received.fetch_add(1, Ordering::Relaxed);
                match request {
                    TickRequest::Stop => ticks.set_requested_hz(index, 0),
                    TickRequest::Rate { hz, clamped } => {
                        if clamped {
                            shared.requests.clamped.fetch_add(1, Ordering::Relaxed);
                            shared
                                .warnings
                                .warn(format_args!("vCPU {index}: tick request for {raw} Hz clamped to {hz} Hz"));
                        }
                        ticks.set_requested_hz(index, hz);
                    }
                }
                Ok(Next::Resume)
            }
            GuestExit::TickPage(gpa) => {
                Self::register_tick_page(context, gpa)?;
                Ok(Next::Resume)
            }
            GuestExit::Finished => {
                shared.end(Outcome::Finished);
                Ok(Next::Stop)
            }
            // The VM reads the message from the results block.
            GuestExit::Panicked => {
                shared.end(Outcome::Failed(VmError::GuestPanicked(String::new())));
                Ok(Next::Stop)
            }
            GuestExit::Block(address) => {
                // The device thread is gone only when the VM is stopping.
                let _ = block.send(address);
                Ok(Next::Resume)
            }
            GuestExit::Console(data) => {
                for line in console.push(data) {
                    log::info!("{name}: {line}");
                }
                Ok(Next::Resume)
            }
            GuestExit::Malformed { port, len } => {
                let what = match port {
                    PARATICK_REQUEST_PORT => {
                        shared.requests.malformed.fetch_add(1, Ordering::Relaxed);
                        "tick request"
                    }
                    PARATICK_PAGE_PORT => {
                        shared.requests.pages_rejected.fetch_add(1, Ordering::Relaxed);
                        "tick page address"
                    }
                    _ => {
                        context.block_counters.rejected.fetch_add(1, Ordering::Relaxed);
                        "block request"
                    }
                };
                shared.warnings.warn(format_args!("vCPU {index}: ignored a {len}-byte {what} (must be 32-bit)"));
                Ok(Next::Resume)
            }
            GuestExit::TripleFault => Err(VmError::TripleFault { vcpu: index }),
            GuestExit::Unexpected(what) => Err(VmError::UnexpectedExit { vcpu: index, exit: what }),
        }
    }
}

/// What a vCPU exit asks of the VMM: the one place that decides what each exit means,
/// from the exit alone (every byte of it is the guest's).
#[derive(Debug, PartialEq, Eq)]
enum GuestExit<'a> {
    /// A paratick tick request (`raw`: the guest's value).
    TickRequest { raw: u32, request: TickRequest },
    /// The guest-physical address of a vCPU's tick page.
    TickPage(u64),
    /// The guest reports it finished its work.
    Finished,
    /// The guest reports it panicked (its message is in the results block).
    Panicked,
    /// The guest-physical address of a block request.
    Block(u64),
    /// Console output.
    Console(&'a [u8]),
    /// A write of the wrong width to a port that takes 32 bits: counted and logged, and
    /// the guest goes on.
    Malformed { port: u16, len: usize },
    /// The guest triple-faulted.
    TripleFault,
    /// Anything else: the VM fails, saying what it was.
    Unexpected(String),
}

impl<'a> GuestExit<'a> {
    fn decode(exit: VcpuExit<'a>) -> GuestExit<'a> {
        let word = |data: &[u8]| <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes);
        match exit {
            VcpuExit::IoOut(port @ (PARATICK_REQUEST_PORT | PARATICK_PAGE_PORT | BLOCK_REQUEST_PORT), data) => {
                match (port, word(data)) {
                    (_, None) => GuestExit::Malformed { port, len: data.len() },
                    (PARATICK_REQUEST_PORT, Some(raw)) => {
                        GuestExit::TickRequest { raw, request: TickRequest::decode(raw) }
                    }
                    (PARATICK_PAGE_PORT, Some(gpa)) => GuestExit::TickPage(gpa.into()),
                    (_, Some(address)) => GuestExit::Block(address.into()),
                }
            }
            VcpuExit::IoOut(RESULTS_PORT, data) => match word(data).and_then(GuestStatus::from_u32) {
                Some(GuestStatus::Done) => GuestExit::Finished,
                Some(GuestStatus::Panicked) => GuestExit::Panicked,
                _ => GuestExit::Unexpected(format!("results port write {data:?}")),
            },
            VcpuExit::IoOut(CONSOLE_PORT, data) => GuestExit::Console(data),
            VcpuExit::Shutdown => GuestExit::TripleFault,
            VcpuExit::IoOut(port, data) => GuestExit::Unexpected(format!("write of {data:?} to port {port:#x}")),
            VcpuExit::IoIn(port, _) => GuestExit::Unexpected(format!("read of port {port:#x}")),
            VcpuExit::MmioRead(address, _) => GuestExit::Unexpected(format!("MMIO read at {address:#x}")),
            VcpuExit::MmioWrite(address, _) => GuestExit::Unexpected(format!("MMIO write at {address:#x}")),
            VcpuExit::FailEntry(reason, cpu) => {
                GuestExit::Unexpected(format!("entry failure {reason:#x} on host CPU {cpu}"))
            }
            VcpuExit::InternalError => GuestExit::Unexpected("KVM internal error (emulation failure?)".into()),
            other => GuestExit::Unexpected(format!("{other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exit_is_decoded_from_the_exit_alone_and_bad_widths_are_malformed() {
        use GuestExit::*;
        let word = |value: u32| value.to_le_bytes();
        assert_eq!(
            GuestExit::decode(VcpuExit::IoOut(PARATICK_REQUEST_PORT, &word(250))),
            TickRequest { raw: 250, request: paratick_common::abi::TickRequest::decode(250) }
        );
        assert_eq!(
            GuestExit::decode(VcpuExit::IoOut(PARATICK_REQUEST_PORT, &word(0))),
            TickRequest { raw: 0, request: paratick_common::abi::TickRequest::Stop }
        );
        assert_eq!(GuestExit::decode(VcpuExit::IoOut(PARATICK_PAGE_PORT, &word(0x2_0000))), TickPage(0x2_0000));
        assert_eq!(GuestExit::decode(VcpuExit::IoOut(BLOCK_REQUEST_PORT, &word(0x80_0000))), Block(0x80_0000));
        assert_eq!(GuestExit::decode(VcpuExit::IoOut(RESULTS_PORT, &word(GuestStatus::Done as u32))), Finished);
        assert_eq!(GuestExit::decode(VcpuExit::IoOut(RESULTS_PORT, &word(GuestStatus::Panicked as u32))), Panicked);
        assert_eq!(GuestExit::decode(VcpuExit::IoOut(CONSOLE_PORT, b"hi")), Console(b"hi"));
        for port in [PARATICK_REQUEST_PORT, PARATICK_PAGE_PORT, BLOCK_REQUEST_PORT] {
            for data in [&[1u8][..], &[1, 2], &[1, 2, 3, 4, 5, 6, 7, 8]] {
                assert_eq!(GuestExit::decode(VcpuExit::IoOut(port, data)), Malformed { port, len: data.len() });
            }
        }
        assert_eq!(GuestExit::decode(VcpuExit::Shutdown), TripleFault);
        // What the guest has no business doing ends the VM, saying what it was.
        fn unexpected(exit: VcpuExit<'_>) -> String {
            match GuestExit::decode(exit) {
                GuestExit::Unexpected(what) => what,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(unexpected(VcpuExit::IoOut(RESULTS_PORT, &word(0))), "results port write [0, 0, 0, 0]");
        assert_eq!(unexpected(VcpuExit::IoOut(RESULTS_PORT, &[1])), "results port write [1]");
        assert_eq!(unexpected(VcpuExit::IoOut(0x80, &[7])), "write of [7] to port 0x80");
        assert_eq!(unexpected(VcpuExit::IoIn(0x60, &mut [0])), "read of port 0x60");
        assert_eq!(unexpected(VcpuExit::MmioRead(0xfee0_0000, &mut [0; 4])), "MMIO read at 0xfee00000");
        assert_eq!(unexpected(VcpuExit::MmioWrite(0xfec0_0000, &[0; 4])), "MMIO write at 0xfec00000");
        assert_eq!(unexpected(VcpuExit::InternalError), "KVM internal error (emulation failure?)");
        assert_eq!(unexpected(VcpuExit::FailEntry(7, 1)), "entry failure 0x7 on host CPU 1");
        assert_eq!(unexpected(VcpuExit::Hlt), "Hlt");
    }

    #[test]
    fn console_lines_are_logged_at_each_newline_and_never_held_past_the_bound() {
        let mut console = ConsoleLine::default();
        assert_eq!(console.push(b"boot"), Vec::<String>::new());
        assert_eq!(console.push(b"ed\nsecond\n\nthi"), ["booted", "second", ""]);
        // A guest that never writes a newline: pieces of the bound, nothing more held.
        let flood = vec![b'x'; 10 * CONSOLE_LINE_MAX + 7];
        let lines = console.push(&flood);
        assert_eq!(lines.len(), 10);
        assert_eq!(lines[0], format!("thi{}", "x".repeat(CONSOLE_LINE_MAX - 3)));
        assert!(lines.iter().all(|line| line.len() == CONSOLE_LINE_MAX));
        assert_eq!(console.0.len(), 10);
        assert!(console.0.capacity() <= 2 * CONSOLE_LINE_MAX, "held: {}", console.0.capacity());
        // Bytes that are not UTF-8 are shown, not refused.
        assert_eq!(console.push(b"\n\xff\n"), ["x".repeat(10), "\u{fffd}".to_string()]);
    }
}
