//! Paratick's embedded KVM VMM: runs the Paratick guest kernel with an in-kernel
//! irqchip, one thread per vCPU, a memory-backed block device, and the tick injector
//! that delivers paratick ticks at the rate the guest asks for (or the operator sets).
//!
//! ```no_run
//! use paratick_vmm::{Vm, VmConfig, WorkAmount, GUEST_KERNEL};
//! use paratick_common::guest::{TickMode, Workload};
//! let config = VmConfig::new("demo", 2, TickMode::Paratick, 250, Workload::Io, WorkAmount::Seconds(3.0));
//! let vm = Vm::start(config, GUEST_KERNEL)?;
//! vm.set_operator_hz(Some(100))?;
//! let report = vm.wait()?;
//! println!("{} work units, {} guest ticks", report.work_units, report.counters.guest_ticks.total);
//! # Ok::<(), paratick_vmm::VmError>(())
//! ```

mod block;
mod config;
pub mod control;
mod guest_input;
mod host_tick;
mod injector;
pub mod kvm_stats;
mod lapic_timer;
mod loader;
#[cfg(feature = "logging")]
pub mod logging;
mod memory;
mod state;
pub mod stats;
mod vcpu;
mod vm;

pub use config::{parse_delivery, parse_tick_mode, parse_workload, ConfigError, TickDelivery, VmConfig, WorkAmount};
pub use loader::GUEST_KERNEL;
pub use state::{InvalidTransition, Lifecycle, VmState};
pub use vm::{Counters, RunReport, TickCounts, Vm};

/// Why a VM could not start, or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A KVM ioctl failed.
    #[error("{operation} failed: {source}")]
    Kvm {
        /// The ioctl.
        operation: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("cannot map guest memory: {source}")]
    Memory {
        /// Why (kept as the error's source).
        source: vm_memory::mmap::FromRangesError,
    },
    /// An access outside guest memory.
    #[error("guest address {address:#x}+{len} is outside guest memory")]
    GuestAddress {
        /// Address.
        address: u64,
        /// Length.
        len: usize,
    },
    /// The KVM stats file could not be read.
    #[error("KVM stats file: {0}")]
    Stats(std::io::Error),
    /// The embedded guest kernel is not loadable.
    #[error("guest kernel: {0}")]
    BadKernel(String),
    /// A VMM thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The guest reported a panic.
    #[error("guest panicked: {0}")]
    GuestPanicked(String),
    /// A vCPU triple-faulted (the guest reset itself).
    #[error("vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)")]
    TripleFault {
        /// vCPU index.
        vcpu: usize,
    },
    /// An exit the VMM has no device for: a guest bug.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: usize,
        /// What it was.
        exit: String,
    },
    /// The guest did not finish in time.
    #[error("the guest did not finish within {seconds:.1} s (hung?); stopped it")]
    Deadline {
        /// The deadline.
        seconds: f64,
    },
    /// A VMM thread panicked.
    #[error("VMM thread {0} panicked")]
    ThreadPanicked(String),
}

impl VmError {
    /// Maps a kvm-ioctls error of `operation`.
    fn kvm(operation: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |source| VmError::Kvm { operation, source }
    }
}
