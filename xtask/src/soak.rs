//! `cargo xtask soak [--vms N] [--minutes M]`: the daemon (release build) with N VMs
//! (16) for M minutes (10). Every 10 s it records the daemon's and the VM processes'
//! resident memory, file descriptors and threads, and times scrapes of /metrics; at the
//! end it checks that every counter only grew, that no VM failed, and that nothing
//! grew without bound, and writes the figures to docs/reliability.md.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const SCRAPES_PER_SAMPLE: usize = 10;

/// One process's resources.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Usage { rss_kib: field("VmRSS:")?, fds, threads: field("Threads:")? })
}

struct Sample {
    at_s: f64,
    daemon: Usage,
    /// Largest of the VM processes.
    vm_max: Usage,
    vm_processes: usize,
    scrape_ms: Vec<f64>,
}

fn scrape(address: &str) -> Result<(f64, String)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).context("connect to /metrics")?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let took = started.elapsed().as_secs_f64() * 1e3;
    let (head, body) = response.split_once("\r\n\r\n").context("not an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("/metrics answered {head}");
    }
    Ok((took, body.to_string()))
}

/// `name{labels}` → value, for every counter (`_total`) sample.
fn counters(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next().is_some_and(|name| name.ends_with("_total")))
        .filter_map(|(series, value)| Some((series.to_string(), value.parse().ok()?)))
        .collect()
}

fn failed_vms(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| l.starts_with("paratick_vm_state{") && l.contains("state=\"failed\"") && l.ends_with(" 1"))
        .map(str::to_string)
        .collect()
}

/// The VM processes of a daemon whose runtime directory is `dir`.
/// The daemon's VM processes: `paratick-vmm serve … --runtime-dir DIR …`, by pgrep
/// (xtask cannot use the VMM library: it builds before the guest toolchain exists). The
/// directory is matched literally: its regex metacharacters are escaped.
fn vm_processes(dir: &Path) -> Vec<u32> {
    let pattern =
        format!("^[^ ]*paratick-vmm serve .*--runtime-dir {}( |$)", regex_literal(&dir.display().to_string()));
    let Ok(output) = Command::new("pgrep").args(["-f", &pattern]).output() else { return Vec::new() };
    String::from_utf8_lossy(&output.stdout).lines().filter_map(|line| line.trim().parse().ok()).collect()
}

/// `text` as an extended regular expression that matches it and nothing else.
fn regex_literal(text: &str) -> String {
    text.chars().flat_map(|c| if r"\^$.|?*+()[]{}".contains(c) { vec!['\\', c] } else { vec![c] }).collect()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon stops its VM processes (process launcher).
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// Runs the soak; see the module doc.
pub fn soak(workspace: &Path, vms: usize, minutes: f64) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("paratick-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let address = format!("127.0.0.1:{port}");
    // Half paratick, half tickless; the sleep workload keeps 16 VMs on two cores
    // meaningful (each vCPU busy a fraction of the time, ticking and idling).
    let mut config = format!("metrics_listen = \"{address}\"\nsocket = \"{}/paratick.sock\"\n", dir.display());
    for index in 0..vms {
        let mode = if index % 2 == 0 { "paratick" } else { "tickless" };
        config.push_str(&format!("\n[[vm]]\nname = \"soak{index:02}\"\nmode = \"{mode}\"\nworkload = \"sleep\"\n"));
    }
    let config_path = dir.join("paratick.toml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let ctl = workspace.join("target/release/paratick-ctl");
    let daemon = Daemon(
        Command::new(&ctl)
            .args(["daemon", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {}", ctl.display()))?,
    );
    let runtime_dir: PathBuf = dir.join("vms");
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm_processes(&runtime_dir).len() < vms {
        if Instant::now() > deadline {
            bail!("{vms} VM processes did not start within 60 s; see {}", dir.join("daemon.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("xtask soak: {vms} VMs running; sampling every {SAMPLE_EVERY:?} for {minutes} min");
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut previous: BTreeMap<String, f64> = BTreeMap::new();
    let mut decreases = Vec::new();
    let mut failed = Vec::new();
    let mut pids_seen = std::collections::BTreeSet::new();
    while started.elapsed().as_secs_f64() < minutes * 60.0 {
        let mut scrape_ms = Vec::new();
        let mut body = String::new();
        for _ in 0..SCRAPES_PER_SAMPLE {
            let (took, text) = scrape(&address)?;
            scrape_ms.push(took);
            body = text;
        }
        let now = counters(&body);
        for (series, value) in &now {
            if previous.get(series).is_some_and(|before| value < before) {
                decreases.push(format!("{series}: {} → {value}", previous[series]));
            }
        }
        previous = now;
        failed.extend(failed_vms(&body));
        let pids = vm_processes(&runtime_dir);
        pids_seen.extend(pids.iter().copied());
        let per_vm: Vec<Usage> = pids.iter().filter_map(|&pid| usage(pid)).collect();
        let vm_max = Usage {
            rss_kib: per_vm.iter().map(|u| u.rss_kib).max().unwrap_or(0),
            fds: per_vm.iter().map(|u| u.fds).max().unwrap_or(0),
            threads: per_vm.iter().map(|u| u.threads).max().unwrap_or(0),
        };
        let sample = Sample {
            at_s: started.elapsed().as_secs_f64(),
            daemon: usage(daemon.0.id()).context("the daemon is gone")?,
            vm_max,
            vm_processes: pids.len(),
            scrape_ms,
        };
        eprintln!(
            "xtask soak: {:>5.0} s daemon {} KiB {} fds {} threads; VMs {} (max {} KiB {} fds {} threads); scrape median {:.2} ms",
            sample.at_s,
            sample.daemon.rss_kib,
            sample.daemon.fds,
            sample.daemon.threads,
            sample.vm_processes,
            sample.vm_max.rss_kib,
            sample.vm_max.fds,
            sample.vm_max.threads,
            median(&mut sample.scrape_ms.clone())
        );
        samples.push(sample);
        std::thread::sleep(SAMPLE_EVERY);
    }
    drop(daemon);
    let mut report = report(vms, minutes, &mut samples, &decreases, &failed, pids_seen.len());
    report += &sandbox(workspace)?;
    std::fs::write(workspace.join("docs/reliability.md"), &report)?;
    eprintln!("xtask soak: wrote docs/reliability.md");
    let _ = std::fs::remove_dir_all(&dir);
    if !decreases.is_empty() || !failed.is_empty() || pids_seen.len() != vms {
        bail!(
            "the soak failed: {} counter decreases, {} failed VMs, {} VM processes seen for {vms} VMs",
            decreases.len(),
            failed.len(),
            pids_seen.len()
        );
    }
    Ok(())
}

/// The units' exposure as `systemd-analyze security --offline=yes` scores it (0 is
/// the best, 10 the worst), and what is left open on purpose.
fn sandbox(workspace: &Path) -> Result<String> {
    let mut text =
        "\n## Sandbox\n\n`systemd-analyze security --offline=yes` on the installed units (0 best, 10 worst):\n\n\
                    | unit | exposure |\n|---|---|\n"
            .to_string();
    for unit in ["paratick.service", "paratick-vm@.service"] {
        let output = Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(workspace.join("packaging").join(unit))
            .output()
            .context("cannot run systemd-analyze")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let overall = stdout
            .lines()
            .find_map(|line| line.split_once("Overall exposure level for ")?.1.split_once(": ").map(|(_, score)| score))
            .with_context(|| format!("systemd-analyze security said no overall exposure for {unit}: {stdout}"))?;
        text += &format!("| `{unit}` | {} |\n", overall.trim());
    }
    text += "\nLeft open on purpose: the daemon runs as root with `CAP_BPF CAP_PERFMON CAP_CHOWN` only (eBPF, \
             the socket's group) and keeps `perf_event_open` and `bpf` in its system call filter; both units \
             keep `/dev/kvm` (no `PrivateDevices=`); the daemon keeps the network (`metrics_listen` may face \
             a Prometheus on another host: add `IPAddressAllow=` in a drop-in to narrow it) and the whole of \
             /proc (it names other users' VMs, such as QEMU run by libvirt's user, and reads \
             `kernel.bpf_stats_enabled`); the VM processes keep /proc for the host's kernel release and \
             command line (the host-tick detection). VM processes have no capabilities, no network \
             (`PrivateNetwork=`, `IPAddressDeny=any`, `AF_UNIX` only), and no privileged or resource \
             system calls.\n";
    Ok(text)
}

fn report(
    vms: usize,
    minutes: f64,
    samples: &mut [Sample],
    decreases: &[String],
    failed: &[String],
    processes_seen: usize,
) -> String {
    let first = &samples[0];
    let last = &samples[samples.len() - 1];
    let mut all_scrapes: Vec<f64> = samples.iter().flat_map(|s| s.scrape_ms.iter().copied()).collect();
    let scrape_median = median(&mut all_scrapes);
    let scrape_max = all_scrapes.last().copied().unwrap_or(f64::NAN);
    let row = |what: &str, a: u64, b: u64, max: u64| format!("| {what} | {a} | {b} | {max} |\n");
    let max_of = |f: &dyn Fn(&Sample) -> u64| samples.iter().map(f).max().unwrap_or(0);
    let mut text = format!(
        "# Reliability: the soak\n\n\
         Written by `cargo xtask soak` (release build): the daemon with {vms} VMs (half paratick,\n\
         half tickless, the `sleep` workload) for {minutes} minutes on this host (2 CPUs, KVM on PVM),\n\
         sampled every {} s. Each VM runs in its own `paratick-vmm serve` process.\n\n\
         ## Resources: first sample, last sample, largest\n\n\
         | | first | last | largest |\n|---|---|---|---|\n",
        SAMPLE_EVERY.as_secs()
    );
    text += &row("daemon RSS (KiB)", first.daemon.rss_kib, last.daemon.rss_kib, max_of(&|s| s.daemon.rss_kib));
    text += &row("daemon fds", first.daemon.fds, last.daemon.fds, max_of(&|s| s.daemon.fds));
    text += &row("daemon threads", first.daemon.threads, last.daemon.threads, max_of(&|s| s.daemon.threads));
    text +=
        &row("VM process RSS (KiB, largest)", first.vm_max.rss_kib, last.vm_max.rss_kib, max_of(&|s| s.vm_max.rss_kib));
    text += &row("VM process fds (largest)", first.vm_max.fds, last.vm_max.fds, max_of(&|s| s.vm_max.fds));
    text +=
        &row("VM process threads (largest)", first.vm_max.threads, last.vm_max.threads, max_of(&|s| s.vm_max.threads));
    text += &row("VM processes", first.vm_processes as u64, last.vm_processes as u64, processes_seen as u64);
    text += &format!(
        "\n## /metrics with {vms} VMs\n\n{} scrapes: median {scrape_median:.2} ms, slowest {scrape_max:.2} ms (goal: median ≤ 10 ms).\n",
        all_scrapes.len()
    );
    text += &format!(
        "\n## Checks\n\n- counters that went down between two samples: {}\n- VMs failed: {}\n- VM processes seen: {processes_seen} for {vms} VMs (a restarted VM would add one)\n",
        if decreases.is_empty() { "none".to_string() } else { decreases.join("; ") },
        if failed.is_empty() { "none".to_string() } else { failed.join("; ") },
    );
    text += "\n## Over time\n\n| s | daemon RSS KiB | daemon fds | daemon threads | VM RSS KiB (max) | VM fds (max) | VM threads (max) | scrape median ms |\n|---|---|---|---|---|---|---|---|\n";
    for sample in samples.iter_mut() {
        text += &format!(
            "| {:.0} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
            sample.at_s,
            sample.daemon.rss_kib,
            sample.daemon.fds,
            sample.daemon.threads,
            sample.vm_max.rss_kib,
            sample.vm_max.fds,
            sample.vm_max.threads,
            median(&mut sample.scrape_ms)
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_matched_literally() {
        assert_eq!(regex_literal("/tmp/paratick-soak-42"), "/tmp/paratick-soak-42");
        assert_eq!(regex_literal("/tmp/a.b+(c)[d]"), r"/tmp/a\.b\+\(c\)\[d\]");
    }
}
