//! The rates the daemon shows, worked out from its samples alone (no metrics, no
//! processes): each VM's tick rate as the host sees it, and our VMs' injected tick rate
//! and exit rate over the last interval.

use paratick_vmm::Counters;

/// The least vCPU time a rate is taken over: below it, a mostly idle VM's few interrupts
/// would make a rate out of noise.
const MIN_BUSY_S: f64 = 0.05;

/// A VM at one sample: its timer interrupts so far, and the seconds its vCPUs were busy
/// (not halted) so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BusyTicks {
    /// Timer interrupts delivered to it.
    pub interrupts: u64,
    /// vCPU seconds not halted.
    pub busy_s: f64,
}

/// A VM's tick rate as the host sees it: timer interrupts per second of vCPU time not
/// halted, over the samples since its vCPUs last ran [`MIN_BUSY_S`] or more. Our VMs'
/// `observed` rate and other VMMs' VMs' rate are this one computation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BusyTickRate {
    since: Option<BusyTicks>,
    hz: Option<f64>,
}

impl BusyTickRate {
    /// Takes a sample; returns the rate (none until the vCPUs ran long enough once).
    pub fn sample(&mut self, now: BusyTicks) -> Option<f64> {
        match self.since {
            Some(before) if now.busy_s - before.busy_s > MIN_BUSY_S => {
                let busy = now.busy_s - before.busy_s;
                self.hz = Some(now.interrupts.saturating_sub(before.interrupts) as f64 / busy);
                self.since = Some(now);
            }
            Some(_) => {}
            None => self.since = Some(now),
        }
        self.hz
    }
}

/// One of our VMs between two samples of its counters `seconds` apart: ticks injected per
/// second per ticking vCPU, and exits per second.
pub fn interval_rates(before: &Counters, now: &Counters, seconds: f64) -> (f64, f64) {
    let seconds = seconds.max(1e-3);
    let ticking = now.effective_hz.iter().filter(|&&hz| hz > 0).count().max(1) as f64;
    let injected = now.ticks_injected.saturating_sub(before.ticks_injected) as f64 / seconds / ticking;
    let exits = now.kvm_stats.exits.saturating_sub(before.kvm_stats.exits) as f64 / seconds;
    (injected, exits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_rate_is_timer_interrupts_per_busy_vcpu_second_once_the_vcpus_ran_long_enough() {
        let mut rate = BusyTickRate::default();
        assert_eq!(rate.sample(BusyTicks { interrupts: 1000, busy_s: 3.5 }), None, "one sample: no rate");
        // 2 vCPUs for 1 s, 1.5 s of it halted: 0.5 busy vCPU seconds, 125 interrupts.
        assert_eq!(rate.sample(BusyTicks { interrupts: 1125, busy_s: 4.0 }), Some(250.0));
        // Halted all along: the rate stands rather than a division by almost nothing,
        // and the interval runs on until the vCPUs ran long enough.
        assert_eq!(rate.sample(BusyTicks { interrupts: 1126, busy_s: 4.01 }), Some(250.0));
        assert_eq!(rate.sample(BusyTicks { interrupts: 1375, busy_s: 4.5 }), Some(500.0));
    }

    #[test]
    fn injected_ticks_are_per_ticking_vcpu_and_exits_per_second() {
        let before = Counters { ticks_injected: 100, ..Counters::default() };
        let mut now = Counters { ticks_injected: 600, effective_hz: vec![250, 250, 0], ..Counters::default() };
        now.kvm_stats.exits = 3000;
        assert_eq!(interval_rates(&before, &now, 1.0), (250.0, 3000.0));
        // A counter that went back (a new VM process) gives no negative rate.
        assert_eq!(interval_rates(&now, &before, 2.0), (0.0, 0.0));
    }
}
