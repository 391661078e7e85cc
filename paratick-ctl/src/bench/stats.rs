//! The bench's statistics: medians and spreads over repetitions, percent changes, and
//! each mode's timer-induced exits against the no-timer floor of the same repetition.

use paratick_common::guest::{TickMode, Workload};
use serde::Serialize;

use super::report::{Kind, Record, FLOOR};

/// Median of the values (0 for none).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Median, minimum and maximum.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`, if there are any.
    pub fn of_some(values: &[f64]) -> Option<Spread> {
        (!values.is_empty()).then(|| Spread::of(values))
    }

    /// The spread of `values` (infinite bounds for none).
    pub fn of(values: &[f64]) -> Spread {
        Spread {
            median: median(values.iter().copied()),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

pub(super) fn pct(new: f64, base: f64) -> f64 {
    if base == 0.0 {
        0.0
    } else {
        (new / base - 1.0) * 100.0
    }
}

/// The execution-time runs of one workload, by mode and repetition.
pub(super) struct ExecutionRuns<'a> {
    runs: Vec<&'a Record>,
}

impl<'a> ExecutionRuns<'a> {
    pub(super) fn of(records: &'a [Record], workload: Workload) -> ExecutionRuns<'a> {
        ExecutionRuns {
            runs: records
                .iter()
                .filter(|r| r.workload == workload.name() && r.kind == Kind::Execution.name())
                .collect(),
        }
    }

    fn exits(&self, mode: TickMode, rep: u32) -> Option<f64> {
        self.runs.iter().find(|r| r.mode == mode.name() && r.rep == rep).map(|r| r.exits as f64)
    }

    /// Timer-induced exits of `mode` in each repetition that has it and the floor.
    pub(super) fn timer_exits(&self, mode: TickMode) -> Vec<(u32, f64)> {
        let mut reps: Vec<u32> = self.runs.iter().filter(|r| r.mode == mode.name()).map(|r| r.rep).collect();
        reps.sort_unstable();
        reps.into_iter().filter_map(|rep| Some((rep, self.exits(mode, rep)? - self.exits(FLOOR, rep)?))).collect()
    }

    /// `1 − timer(mode) / timer(baseline)` per repetition where the baseline's timer
    /// exits are large enough to divide by: at least [`MIN_BASELINE_TIMER_SHARE`] of the
    /// baseline's exits. Below that they are within the run-to-run spread of the exits
    /// they are taken from, and the ratio is noise (seen: −14.16, 303.00).
    pub(super) fn timer_exits_removed(&self, mode: TickMode, baseline: TickMode) -> Vec<f64> {
        let base = self.timer_exits(baseline);
        self.timer_exits(mode)
            .into_iter()
            .filter_map(|(rep, timer)| {
                let (_, base) = base.iter().find(|(r, _)| *r == rep)?;
                let large_enough = *base > 0.0 && *base >= MIN_BASELINE_TIMER_SHARE * self.exits(baseline, rep)?;
                large_enough.then(|| 1.0 - timer / base)
            })
            .collect()
    }
}

/// The least share of a baseline's exits its timer must cause for "timer exits removed"
/// to be a ratio and not noise.
pub const MIN_BASELINE_TIMER_SHARE: f64 = 0.05;

#[cfg(test)]
mod tests {
    use super::*;

    fn execution(mode: TickMode, rep: u32, exits: u64) -> Record {
        Record { workload: "io", mode: mode.name(), kind: "execution", rep, exits, ..Record::default() }
    }

    #[test]
    fn timer_exits_are_measured_against_the_floor_of_the_same_repetition() {
        let records = [
            execution(TickMode::NoTimer, 0, 1000),
            execution(TickMode::Tickless, 0, 1500),
            execution(TickMode::Paratick, 0, 1050),
            execution(TickMode::NoTimer, 1, 2000),
            execution(TickMode::Tickless, 1, 2400),
            execution(TickMode::Paratick, 1, 1990),
            // A throughput run is not the same work: never paired.
            Record { kind: "throughput", ..execution(TickMode::Paratick, 0, 9) },
        ];
        let runs = ExecutionRuns::of(&records, Workload::Io);
        assert_eq!(runs.timer_exits(TickMode::Tickless), [(0, 500.0), (1, 400.0)]);
        assert_eq!(runs.timer_exits(TickMode::Paratick), [(0, 50.0), (1, -10.0)]);
        // 1 - 50/500 and 1 - (-10)/400: below the floor counts as all removed and more.
        assert_eq!(runs.timer_exits_removed(TickMode::Paratick, TickMode::Tickless), [0.9, 1.025]);
        assert_eq!(runs.timer_exits_removed(TickMode::Paratick, TickMode::Periodic), Vec::<f64>::new());
        // A baseline whose timer exits are under 5% of its exits gives no ratio: 1 − 50/20
        // would be −1.5, noise.
        let records = [
            execution(TickMode::NoTimer, 0, 1000),
            execution(TickMode::Tickless, 0, 1020),
            execution(TickMode::Paratick, 0, 1050),
        ];
        let runs = ExecutionRuns::of(&records, Workload::Io);
        assert_eq!(runs.timer_exits_removed(TickMode::Paratick, TickMode::Tickless), Vec::<f64>::new());
    }

    #[test]
    fn medians_and_percentages() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
        assert_eq!(pct(50.0, 100.0), -50.0);
        assert_eq!(pct(1.0, 0.0), 0.0);
        let s = Spread::of(&[2.0, 9.0, 4.0]);
        assert_eq!((s.median, s.min, s.max), (4.0, 2.0, 9.0));
    }
}
