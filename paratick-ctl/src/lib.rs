//! Paratick controller library: the eBPF KVM observer and what the CLI and daemon build on.

pub mod backend;
pub mod bench;
pub mod client;
pub mod daemon;
pub mod model;
pub mod observer;
pub mod procfs;
pub mod protocol;
