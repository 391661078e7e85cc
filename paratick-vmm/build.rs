//! Builds the guest kernel (`paratick-guest`) for `x86_64-unknown-none` with Debian's
//! toolchain (the `debian` rustup toolchain linked by `cargo xtask setup`: it has the
//! core sources for `-Z build-std`, see shared/docs/HOST.md), linked by GNU ld at the
//! address of the guest memory map, and hands the ELF to the crate as `OUT_DIR/paratick-guest.elf`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("../paratick-guest").canonicalize().expect("paratick-guest next to paratick-vmm");
    let common = manifest.join("../paratick-common/src");
    for path in [guest.join("src"), guest.join("Cargo.toml"), guest.join("link.ld"), common] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let target_dir = out_dir.join("guest-target");
    let rustflags = [
        "-Clinker=ld".to_string(),
        "-Clinker-flavor=ld".to_string(),
        format!("-Clink-arg=-T{}", guest.join("link.ld").display()),
        "-Crelocation-model=static".to_string(),
    ]
    .join("\x1f");
    let status = Command::new("rustup")
        .args(["run", "debian", "cargo", "build", "--release", "--target", "x86_64-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&guest)
        // -Z build-std needs unstable features for every crate of core's build.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .status()
        .expect("run `rustup run debian cargo` (run `cargo xtask setup` first)");
    assert!(
        status.success(),
        "building the guest kernel failed (see above); `cargo xtask setup` installs its toolchain"
    );
    let elf = target_dir.join("x86_64-unknown-none/release/paratick-guest");
    std::fs::copy(&elf, out_dir.join("paratick-guest.elf")).expect("copy the guest kernel");
}
