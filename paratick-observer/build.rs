//! Builds the eBPF programs (`paratick-ebpf`) for `bpfel-unknown-none` with Debian's
//! toolchain, linked as the `debian` rustup toolchain by `cargo xtask setup` (the rustup
//! toolchains here have no BPF core library; see docs/host.md).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    // aya-build relays everything the inner cargo prints on stderr as `cargo:warning`,
    // which cargo then replays on every build: a quiet inner cargo prints no progress
    // lines there. Compiler warnings and errors still come through (as JSON on stdout).
    std::env::set_var("CARGO_TERM_QUIET", "true");
    // The object is linked by bpf-linker: a new one (`cargo xtask setup`) rebuilds it.
    if let Some(linker) = find_in_path("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../paratick-ebpf");
    let package = aya_build::Package { name: "paratick-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("debian"))
}

/// The first `program` on `PATH`.
fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|path| path.is_file())
}
