//! Paratick controller library: what the CLI builds on, the daemon and the bench. The
//! observer, the exits model and VM identity are the `paratick-observer` crate's.

pub mod bench;
pub mod client;
pub mod daemon;
#[cfg(test)]
mod fake_events;
pub mod io_error;
pub mod observe;
pub mod protocol;
