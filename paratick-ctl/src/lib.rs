//! Paratick controller library: the eBPF KVM observer and what the CLI and daemon build on.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod bench;
pub mod client;
pub mod daemon;
pub mod model;
pub mod observer;
pub mod procfs;
pub mod protocol;
