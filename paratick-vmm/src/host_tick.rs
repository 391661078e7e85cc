//! The host's own scheduler tick, which every busy host CPU takes anyway: Linux runs it
//! on an hrtimer at multiples of `TICK_NSEC` of CLOCK_MONOTONIC (the tick is aligned to
//! the period since Linux 5.x, and all CPUs tick together unless booted with
//! `skew_tick=1`). A timer of ours that expires at the same instant is handled in the
//! same host timer interrupt, so a vCPU on that CPU exits once for both.

use nix::time::{clock_gettime, ClockId};
use std::time::Duration;

/// Period of the host tick, if known (from the running kernel's `CONFIG_HZ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTick {
    /// Tick period in ns (`TICK_NSEC`).
    pub period_ns: u64,
}

impl HostTick {
    /// The running kernel's tick, from its configuration (`/proc/config.gz`, else
    /// `/boot/config-<release>`); `None` when neither is readable or the kernel was
    /// booted with `skew_tick=1` (no common tick instant).
    pub fn of_running_kernel() -> Option<HostTick> {
        let config = read_proc_config().or_else(|| {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
            std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
        })?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if cmdline.split_whitespace().any(|arg| arg == "skew_tick=1") {
            return None;
        }
        HostTick::from_config(&config)
    }

    /// Parses `CONFIG_HZ=` from a kernel configuration.
    pub fn from_config(config: &str) -> Option<HostTick> {
        let hz: u64 = config.lines().find_map(|line| line.strip_prefix("CONFIG_HZ="))?.trim().parse().ok()?;
        (hz > 0).then(|| HostTick { period_ns: (1_000_000_000 + hz / 2) / hz })
    }

    /// Whether ticks at `period_ns` can all fall on host tick instants.
    pub fn divides(&self, period_ns: u64) -> bool {
        period_ns.is_multiple_of(self.period_ns)
    }

    /// The first host tick instant at or after `monotonic_ns`.
    pub fn next_at_or_after(&self, monotonic_ns: u64) -> u64 {
        monotonic_ns.div_ceil(self.period_ns) * self.period_ns
    }
}

fn read_proc_config() -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open("/proc/config.gz").ok()?;
    let mut config = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut config).ok()?;
    Some(config)
}

/// CLOCK_MONOTONIC now, in ns (the clock of hrtimers, KVM's LAPIC timer and `Instant`).
pub fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC always exists");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// CPU time the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    let now = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("the calling thread's clock exists");
    Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_period_comes_from_config_hz_rounded_as_the_kernel_does() {
        assert_eq!(HostTick::from_config("CONFIG_NO_HZ=y\nCONFIG_HZ=250\n"), Some(HostTick { period_ns: 4_000_000 }));
        assert_eq!(HostTick::from_config("CONFIG_HZ=300").map(|t| t.period_ns), Some(3_333_333));
        assert_eq!(HostTick::from_config("CONFIG_HZ_250=y"), None);
        assert_eq!(HostTick::from_config("CONFIG_HZ=0"), None);
    }

    #[test]
    fn instants_are_multiples_of_the_period() {
        let tick = HostTick { period_ns: 4_000_000 };
        assert_eq!(tick.next_at_or_after(265_185_218_811), 265_188_000_000);
        assert_eq!(tick.next_at_or_after(265_188_000_000), 265_188_000_000);
        assert!(tick.divides(4_000_000) && tick.divides(100_000_000) && !tick.divides(1_000_000));
    }
}
