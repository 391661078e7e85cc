//! Builds the guest kernel (`paratick-guest`) with Debian's toolchain (the `debian`
//! rustup toolchain linked by `cargo xtask setup`: it has the core sources for
//! `-Z build-std`, see docs/host.md) and hands the ELF to the crate as
//! `OUT_DIR/paratick-guest.elf`. Target, linker and build-std settings live in the guest
//! crate's own `.cargo/config.toml`, so `cargo xtask lint` builds it the same way.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("../paratick-guest").canonicalize().expect("paratick-guest next to paratick-vmm");
    let common = manifest.join("../paratick-common/src");
    for path in [
        guest.join("src"),
        guest.join("Cargo.toml"),
        guest.join("link.ld"),
        guest.join("build.rs"),
        guest.join(".cargo"),
        common,
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let target_dir = out_dir.join("guest-target");
    let status = Command::new("rustup")
        .args(["run", "debian", "cargo", "build", "--release", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&guest)
        // -Z build-std needs unstable features for every crate of core's build.
        .env("RUSTC_BOOTSTRAP", "1")
        // Our own build's settings must not leak into the guest's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run `rustup run debian cargo` (run `cargo xtask setup` first)");
    assert!(
        status.success(),
        "building the guest kernel failed (see above); `cargo xtask setup` installs its toolchain"
    );
    let elf = target_dir.join("x86_64-unknown-none/release/paratick-guest");
    std::fs::copy(&elf, out_dir.join("paratick-guest.elf")).expect("copy the guest kernel");
}
