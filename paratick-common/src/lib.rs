//! Types and tables shared by the Paratick eBPF programs, the host tools and the guest.
//!
//! Everything here is `no_std` and allocation-free so that the eBPF programs
//! (`bpfel-unknown-none`), the guest kernel (`x86_64-unknown-none`) and userspace
//! import the same definitions: the guest ABI ([`abi`]), the keys and values of the
//! observer's maps ([`event`]), the exit-reason tables ([`exit_reason`]) and the
//! classification of raw events into tick requests and timer interrupts ([`classify`]).
#![no_std]

// `clap::ValueEnum`, derived with the `clap` feature (host command lines), names `std`.
#[cfg(feature = "clap")]
extern crate std;

pub mod abi;
pub mod classify;
pub mod event;
pub mod exit_reason;
pub mod guest;
pub mod kvm_counters;
