//! The library target exists so that `paratick-ctl` can name this crate as a
//! build-dependency (cargo then rebuilds the eBPF object when it changes); the programs
//! are in the `paratick` binary target, built for `bpfel-unknown-none` by aya-build.
#![no_std]
