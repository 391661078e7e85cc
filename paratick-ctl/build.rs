//! Builds the eBPF programs (`paratick-ebpf`) for `bpfel-unknown-none` with Debian's
//! toolchain, linked as the `debian` rustup toolchain by `cargo xtask setup` (the rustup
//! toolchains here have no BPF core library; see docs/host.md).

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../paratick-ebpf");
    let package = aya_build::Package { name: "paratick-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("debian"))
}
