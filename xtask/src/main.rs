//! `cargo xtask <task>`: everything a fresh Debian 12 KVM host needs, as code.
//!
//! - `setup`  installs what the build and tests need (idempotent; a second run only checks)
//! - `test`   setup, lint, build every binary, run every test (the README's test command)
//! - `run`    setup, build, run the main job (the README's run command)
//! - `lint`   rustfmt and clippy, including the eBPF crate and guest for their targets
//! - `install [--root DIR] [--binaries DIR]`  the binaries, systemd units and default config
//! - `soak [--vms N] [--minutes M]`  the daemon with N VMs for M minutes; docs/reliability.md

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

mod soak;

/// Debian packages the project needs, and why.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "Debian's rustc 1.96 (LLVM 22): builds the eBPF programs and the guest kernel"),
    ("cargo-web", "cargo for the Debian toolchain"),
    ("libstd-rust-web-dev-bpf", "precompiled core for bpfel-unknown-none"),
    ("rust-web-src", "core sources for -Z build-std (the guest kernel)"),
    ("rust-web-clippy", "clippy for the Debian toolchain: lints the eBPF crate on its own target"),
    ("llvm-22-dev", "LLVM 22 for building bpf-linker"),
    ("linux-perf", "perf stat: the independent reference in tests"),
    ("bpftool", "inspecting loaded BPF programs"),
    ("prometheus", "promtool and a real Prometheus server for the metrics tests"),
    ("systemd", "systemd-analyze, to verify the service units, and systemd 252 as PID 1 in the tests"),
    ("qemu-system-x86", "a real third-party VMM: the observer's tests run kvm-unit-tests kernels under QEMU"),
];

/// The rustup name under which Debian's toolchain is linked (aya-build runs
/// `rustup run debian cargo build --target bpfel-unknown-none`).
const DEBIAN_TOOLCHAIN: &str = "debian";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-deny, which `lint` runs over deny.toml (licences, duplicates, sources).
const CARGO_DENY_VERSION: &str = "0.20.2";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = args.split_first().map(|(t, r)| (t.as_str(), r)).unwrap_or(("help", &[]));
    match task {
        "setup" => setup(),
        "test" => {
            setup()?;
            // CI runs this: formatting and clippy (every crate, every target) gate it.
            lint()?;
            cargo(&["build", "--bins"])?;
            let mut test = vec!["test"];
            test.extend(rest.iter().map(String::as_str));
            cargo(&test)
        }
        "run" => {
            setup()?;
            // The daemon runs each VM as a paratick-vmm process, found beside it.
            cargo(&["build", "--release", "--package", "paratick-vmm"])?;
            let mut run = vec!["run", "--release", "--package", "paratick-ctl", "--"];
            if rest.is_empty() {
                // The main job: the daemon on its embedded default configuration.
                run.push("daemon");
            }
            run.extend(rest.iter().map(String::as_str));
            cargo(&run)
        }
        "lint" => lint(),
        "soak" => {
            let (mut vms, mut minutes) = (16, 10.0);
            let mut flags = rest.iter();
            while let Some(flag) = flags.next() {
                match (flag.as_str(), flags.next().map(|v| v.parse::<f64>())) {
                    ("--vms", Some(Ok(n))) if (1.0..=64.0).contains(&n) && n.fract() == 0.0 => vms = n as usize,
                    ("--minutes", Some(Ok(m))) if m > 0.0 => minutes = m,
                    _ => bail!("usage: cargo xtask soak [--vms 1-64] [--minutes M]"),
                }
            }
            setup()?;
            cargo(&["build", "--release", "--package", "paratick-ctl", "--package", "paratick-vmm"])?;
            soak::soak(&workspace_root(), vms, minutes)
        }
        "install" => {
            let (mut root, mut binaries) = (PathBuf::from("/"), None);
            let mut flags = rest.iter();
            while let Some(flag) = flags.next() {
                match (flag.as_str(), flags.next()) {
                    ("--root", Some(dir)) => root = dir.into(),
                    ("--binaries", Some(dir)) => binaries = Some(PathBuf::from(dir)),
                    _ => bail!("usage: cargo xtask install {INSTALL_FLAGS}"),
                }
            }
            install(&root, binaries.as_deref())
        }
        "help" | "--help" | "-h" => {
            println!("usage: cargo xtask <setup|test [ARGS]|run [ARGS]|lint|install {INSTALL_FLAGS}|soak [--vms N] [--minutes M]>");
            Ok(())
        }
        other => bail!("unknown task {other:?}: use setup, test, run, lint, install or soak"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root()))
}

/// A build that has nothing to do prints no build-script warnings (cargo replays a
/// build script's stored warnings on every build: they would drown real ones).
fn quiet_build() -> Result<()> {
    cargo(&["build", "--package", "paratick-ctl"])?;
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--package", "paratick-ctl"])
        .current_dir(workspace_root())
        .output()
        .context("cannot run cargo build")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Any build script's: the observer's builds the eBPF object.
    let replayed: Vec<&str> =
        stderr.lines().filter(|line| line.starts_with("warning: paratick-") && line.contains('@')).collect();
    if !out.status.success() || !replayed.is_empty() {
        bail!("a rebuild of paratick-ctl printed build-script warnings:\n{}", replayed.join("\n"));
    }
    Ok(())
}

fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs what is missing; checks only, when everything is there.
fn setup() -> Result<()> {
    let started = Instant::now();
    check_host()?;
    install_apt_packages()?;
    link_debian_toolchain()?;
    install_bpf_linker()?;
    install_cargo_deny()?;
    mount_tracefs()?;
    eprintln!("xtask setup: ready ({:.1}s)", started.elapsed().as_secs_f64());
    Ok(())
}

fn check_host() -> Result<()> {
    if output(Command::new("id").arg("-u")).as_deref().map(str::trim) != Some("0") {
        bail!("run as root: set-up installs packages, and KVM and eBPF need root");
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm)");
    }
    Ok(())
}

fn package_installed(name: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", name]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

fn install_apt_packages() -> Result<()> {
    let missing: Vec<&str> =
        APT_PACKAGES.iter().map(|(name, _)| *name).filter(|name| !package_installed(name)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (name, why) in APT_PACKAGES.iter().filter(|(name, _)| missing.contains(name)) {
        eprintln!("xtask setup: installing {name}: {why}");
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn link_debian_toolchain() -> Result<()> {
    let linked = output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| list.lines().any(|l| l.split_whitespace().next() == Some(DEBIAN_TOOLCHAIN)));
    if !linked {
        eprintln!("xtask setup: linking Debian's toolchain as rustup toolchain {DEBIAN_TOOLCHAIN:?}");
        run(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]))?;
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let installed = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.split_whitespace().any(|word| word == BPF_LINKER_VERSION));
    if installed {
        return Ok(());
    }
    eprintln!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (1-2 minutes)");
    run(Command::new("cargo")
        .args([&format!("+{DEBIAN_TOOLCHAIN}"), "install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--no-default-features", "--features", "llvm-22"])
        // /usr/bin/llvm-config is LLVM 14; bpf-linker must link the LLVM rustc uses.
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .current_dir(std::env::temp_dir()))
}

fn install_cargo_deny() -> Result<()> {
    let installed = output(Command::new("cargo").args(["deny", "--version"]))
        .is_some_and(|v| v.split_whitespace().any(|word| word == CARGO_DENY_VERSION));
    if installed {
        return Ok(());
    }
    eprintln!("xtask setup: building cargo-deny {CARGO_DENY_VERSION} (about 2 minutes)");
    run(Command::new("cargo")
        .args(["install", "cargo-deny", "--version", CARGO_DENY_VERSION, "--locked"])
        .current_dir(std::env::temp_dir()))
}

fn mount_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    eprintln!("xtask setup: mounting tracefs at {TRACEFS}");
    run(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS]))
}

/// `install`'s flags: `--binaries` takes already built binaries (the systemd test
/// installs its debug build into a container's root).
const INSTALL_FLAGS: &str = "[--root DIR] [--binaries DIR]";

/// Installs the daemon under `root` (`/` for the real thing): binaries, units, and the
/// default configuration unless one is there already (an operator's edits are kept).
/// The binaries are built in release mode, unless `binaries` names built ones.
fn install(root: &Path, binaries: Option<&Path>) -> Result<()> {
    let workspace = workspace_root();
    let binaries = match binaries {
        Some(dir) => dir.to_path_buf(),
        None => {
            setup()?;
            cargo(&["build", "--release", "--package", "paratick-ctl", "--package", "paratick-vmm"])?;
            workspace.join("target/release")
        }
    };
    let copy = |from: PathBuf, to: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let to = root.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("absolute target"))
            .with_context(|| format!("create {}", to.display()))?;
        std::fs::copy(&from, &to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        eprintln!("xtask install: {}", to.display());
        Ok(())
    };
    for binary in ["paratick-ctl", "paratick-vmm"] {
        copy(binaries.join(binary), &format!("/usr/local/bin/{binary}"), 0o755)?;
    }
    // Shell completions, from the installed binary itself.
    let ctl = binaries.join("paratick-ctl");
    for (args, to) in [
        (&["completions", "bash"][..], "/usr/local/share/bash-completion/completions/paratick-ctl"),
        (&["completions", "zsh"][..], "/usr/local/share/zsh/site-functions/_paratick-ctl"),
        (&["completions", "fish"][..], "/usr/local/share/fish/vendor_completions.d/paratick-ctl.fish"),
    ] {
        let output = Command::new(&ctl).args(args).output().with_context(|| format!("run {}", ctl.display()))?;
        if !output.status.success() {
            bail!("{} {args:?} failed: {}", ctl.display(), String::from_utf8_lossy(&output.stderr));
        }
        let to = root.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("absolute target"))?;
        std::fs::write(&to, output.stdout).with_context(|| format!("write {}", to.display()))?;
        eprintln!("xtask install: {}", to.display());
    }
    // A man page per command, written by the binary.
    let man_dir = root.join("usr/local/share/man/man1");
    run(Command::new(&ctl).arg("manpage").arg("--out-dir").arg(&man_dir))?;
    for unit in ["paratick.service", "paratick-vm@.service"] {
        copy(workspace.join("packaging").join(unit), &format!("/etc/systemd/system/{unit}"), 0o644)?;
    }
    if root.join("etc/paratick/paratick.toml").exists() {
        eprintln!("xtask install: keeping the existing /etc/paratick/paratick.toml");
    } else {
        copy(workspace.join("packaging/paratick.toml"), "/etc/paratick/paratick.toml", 0o644)?;
    }
    let systemd_runs = std::fs::read_to_string("/proc/1/comm").is_ok_and(|comm| comm.trim() == "systemd");
    if root == Path::new("/") && systemd_runs {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        eprintln!("xtask install: start it with `systemctl enable --now paratick`");
    } else {
        eprintln!("xtask install: systemd is not running here; start the daemon with `paratick-ctl daemon`");
    }
    Ok(())
}

fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    // Every member, the eBPF crate too (for the host it is a binary that says where its
    // programs are built), so that `cargo build --workspace` keeps working.
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    quiet_build()?;
    // Advisories need github.com (the RustSec database), which CI does not reach.
    cargo(&["deny", "check", "licenses", "bans", "sources"])?;
    // The eBPF crate's programs and the guest kernel build for their own targets, with
    // Debian's toolchain.
    let debian_cargo = |dir: PathBuf, rustc_bootstrap: &str, args: &[&str]| {
        run(Command::new("rustup")
            .args(["run", DEBIAN_TOOLCHAIN, "cargo"])
            .args(args)
            .env("RUSTC_BOOTSTRAP", rustc_bootstrap)
            .env_remove("RUSTC")
            .current_dir(dir))
    };
    let deny_warnings = ["--", "-D", "warnings"];
    debian_cargo(
        workspace_root(),
        "aya_ebpf",
        &[&["clippy", "--package", "paratick-ebpf", "--release", "--target", "bpfel-unknown-none"][..], &deny_warnings]
            .concat(),
    )?;
    let guest = workspace_root().join("paratick-guest");
    cargo(&["fmt", "--check", "--manifest-path", guest.join("Cargo.toml").to_str().expect("UTF-8 path")])?;
    debian_cargo(guest, "1", &[&["clippy", "--release"][..], &deny_warnings].concat())
}
