//! The restart policy of a VM, as systemd's `Restart=` and `StartLimitBurst=` do it for
//! services: `restart = "on-failure"` starts a failed VM again after a delay that
//! doubles with each restart in the window (1 s, 2 s, 4 s … at most [`MAX_DELAY`]), and
//! gives up after `restart_limit` restarts within [`WINDOW`]. A start by the operator
//! begins a new count.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Whether a failed VM is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, strum::EnumString, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never (the default, as systemd's).
    #[default]
    No,
    /// When the guest or the VM process failed (not when it finished or was stopped).
    OnFailure,
}

/// Restarts allowed within [`WINDOW`] unless the configuration says otherwise.
pub const DEFAULT_RESTART_LIMIT: u32 = 5;
/// The window of the restart limit.
pub const WINDOW: Duration = Duration::from_secs(600);
/// The delay before the first restart in the window.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Not restarted: the policy is `no`.
    Stay,
    /// Start it again at this time.
    RestartAt(Instant),
    /// Not restarted: this many restarts within the window already.
    GiveUp(u32),
}

/// One VM's restarts.
#[derive(Debug, Default)]
pub struct Restarts {
    /// When each restart within the window happened.
    recent: VecDeque<Instant>,
    /// The restart due, if one is.
    due: Option<Instant>,
    /// Restarts since the daemon started (the metric).
    pub total: u64,
}

impl Restarts {
    /// The VM failed at `now`: decides, and remembers a restart that is due.
    pub fn failed(&mut self, policy: RestartPolicy, limit: u32, now: Instant) -> AfterFailure {
        if policy == RestartPolicy::No {
            return AfterFailure::Stay;
        }
        while self.recent.front().is_some_and(|&at| now.duration_since(at) >= WINDOW) {
            self.recent.pop_front();
        }
        let count = self.recent.len() as u32;
        if count >= limit {
            self.due = None;
            return AfterFailure::GiveUp(count);
        }
        let delay = FIRST_DELAY.saturating_mul(1 << count.min(16)).min(MAX_DELAY);
        let at = now + delay;
        self.due = Some(at);
        AfterFailure::RestartAt(at)
    }

    /// Whether a restart is due at `now`; if so it is taken (counted, and no longer due).
    pub fn take_due(&mut self, now: Instant) -> bool {
        if self.due.is_some_and(|at| at <= now) {
            self.due = None;
            self.recent.push_back(now);
            self.total += 1;
            return true;
        }
        false
    }

    /// Whether a restart is waiting.
    pub fn pending(&self) -> bool {
        self.due.is_some()
    }

    /// The operator started or stopped the VM: nothing is due, and the count begins anew.
    pub fn reset(&mut self) {
        self.due = None;
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_limit_within_the_window_and_then_it_gives_up() {
        let mut restarts = Restarts::default();
        let start = Instant::now();
        let mut now = start;
        let mut delays = Vec::new();
        loop {
            match restarts.failed(RestartPolicy::OnFailure, 3, now) {
                AfterFailure::RestartAt(at) => {
                    delays.push(at.duration_since(now).as_secs());
                    assert!(!restarts.take_due(at - Duration::from_millis(1)), "not before its time");
                    now = at;
                    assert!(restarts.take_due(now));
                    assert!(!restarts.pending());
                }
                AfterFailure::GiveUp(count) => {
                    assert_eq!(count, 3);
                    break;
                }
                AfterFailure::Stay => unreachable!(),
            }
        }
        assert_eq!(delays, [1, 2, 4]);
        assert_eq!(restarts.total, 3);
        // Once the first restarts leave the window, it restarts again.
        let later = start + WINDOW + Duration::from_secs(2);
        assert!(matches!(restarts.failed(RestartPolicy::OnFailure, 3, later), AfterFailure::RestartAt(_)));
        // The operator's start begins a new count.
        restarts.reset();
        assert!(!restarts.pending());
        assert_eq!(restarts.failed(RestartPolicy::OnFailure, 3, later), AfterFailure::RestartAt(later + FIRST_DELAY));
    }

    #[test]
    fn the_delay_stops_growing_at_its_maximum_and_no_means_no() {
        let mut restarts = Restarts::default();
        let mut now = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            let AfterFailure::RestartAt(at) = restarts.failed(RestartPolicy::OnFailure, 100, now) else { panic!() };
            last = at.duration_since(now);
            now = at;
            assert!(restarts.take_due(now));
        }
        assert_eq!(last, MAX_DELAY);
        assert_eq!(Restarts::default().failed(RestartPolicy::No, 5, now), AfterFailure::Stay);
        assert_eq!("on-failure".parse::<RestartPolicy>().unwrap(), RestartPolicy::OnFailure);
        assert!("always".parse::<RestartPolicy>().is_err());
    }
}
