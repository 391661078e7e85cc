//! The counters' bookkeeping: examples, then random sequences of reports, restarts,
//! moves, removals and daemon restarts against an independent model of what each
//! series must show.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const RUN: Instance = Instance { process: 1, run: 0 };

fn temporary_file(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("paratick-counters-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    counters_file(&dir)
}

#[test]
fn a_source_moving_between_series_adds_only_its_increase() {
    let counters = ScrapedCounters::new();
    let family = CounterFamily::ObservedExits;
    let report = |pid: &str, source: &str, count| counters.report(family, &[pid, pid, "io"], source, RUN, count);
    // Process 7 is first in the top group, then falls into "other", then returns.
    report("7", "7/io", 100);
    report("other", "8/io", 50);
    report("other", "7/io", 130);
    report("other", "8/io", 60);
    report("7", "7/io", 135);
    assert_eq!(counters.value(family, &["7", "7", "io"]), Some(100 + 5));
    assert_eq!(counters.value(family, &["other", "other", "io"]), Some(50 + 30 + 10), "increases while in it");
}

#[test]
fn a_new_instance_counts_from_zero_and_a_lower_value_of_the_same_one_adds_nothing() {
    let counters = ScrapedCounters::new();
    let family = CounterFamily::ExitsSaved;
    counters.report_own(family, &["a"], RUN, 100);
    // The same process, its projection re-computed lower: held, then counted past it.
    counters.report_own(family, &["a"], RUN, 80);
    assert_eq!(counters.value(family, &["a"]), Some(100));
    counters.report_own(family, &["a"], RUN, 110);
    assert_eq!(counters.value(family, &["a"]), Some(110));
    // The VM started again: a new process, counting from zero (even past the old value).
    let again = Instance { process: 2, run: 0 };
    counters.report_own(family, &["a"], again, 150);
    assert_eq!(counters.value(family, &["a"]), Some(110 + 150));
}

#[test]
fn removed_series_vanish_and_forgotten_sources_leave_their_counts() {
    let counters = ScrapedCounters::new();
    let family = CounterFamily::ObservedExits;
    counters.report(family, &["7", "qemu", "io"], "7/io", RUN, 100);
    counters.report(family, &["other", "other", "io"], "8/io", RUN, 50);
    // 7 leaves the top N: its series goes; back in "other" it adds its increase.
    counters.retain_series(family, |labels| labels[0] != "7");
    assert_eq!(counters.value(family, &["7", "qemu", "io"]), None);
    counters.report(family, &["other", "other", "io"], "7/io", RUN, 120);
    assert_eq!(counters.value(family, &["other", "other", "io"]), Some(50 + 20));
    // 8 exits: forgotten, but what it counted stays counted.
    counters.retain_sources(family, |source| !source.starts_with("8/"));
    assert_eq!(counters.value(family, &["other", "other", "io"]), Some(70));
    assert_eq!(counters.state().sources.len(), 1);
}

#[test]
fn the_series_continue_in_the_next_daemon_and_an_unreadable_file_is_moved_aside() {
    let path = temporary_file("kept");
    let counters = ScrapedCounters::new();
    counters.report_own(CounterFamily::ExitsSaved, &["a"], RUN, 100);
    counters.report(CounterFamily::ObservedExits, &["other", "other", "io"], "8/io", RUN, 50);
    counters.save(&path).unwrap();
    let next = ScrapedCounters::new();
    next.restore(&path).unwrap();
    assert_eq!(*next.state(), *counters.state());
    // The adopted VM process goes on counting; a new observer counts from zero.
    next.report_own(CounterFamily::ExitsSaved, &["a"], RUN, 130);
    next.report(CounterFamily::ObservedExits, &["other", "other", "io"], "8/io", Instance { process: 1, run: 9 }, 5);
    assert_eq!(next.value(CounterFamily::ExitsSaved, &["a"]), Some(130));
    assert_eq!(next.value(CounterFamily::ObservedExits, &["other", "other", "io"]), Some(55));

    std::fs::write(&path, r#"{"version": 1, "series": [], "sources": [], "extra": 1}"#).unwrap();
    let fresh = ScrapedCounters::new();
    let problem = fresh.restore(&path).unwrap_err().to_string();
    assert!(problem.contains("unknown field `extra`") && problem.contains("counters.json.unreadable"), "{problem}");
    assert!(fresh.values().is_empty());
    assert!(path.with_extension("json.unreadable").exists() && !path.exists(), "nothing is lost");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

/// One step of what the daemon does to its counters.
#[derive(Debug, Clone)]
enum Step {
    /// A source's cumulative value, counted by an instance, in a series.
    Report { source: usize, series: usize, instance: u64, value: u64 },
    /// A series removed (a process out of the top N).
    RemoveSeries(usize),
    /// A source forgotten (its process is gone).
    ForgetSource(usize),
    /// Every series of a VM removed (gone from the configuration).
    RemoveVm(usize),
    /// The daemon stops and another one starts from the file.
    RestartDaemon,
}

/// The series: a VM's label and a reason.
const SERIES: [[&str; 2]; 4] = [["a", "io"], ["a", "hlt"], ["b", "io"], ["other", "io"]];
const SOURCES: usize = 4;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..SOURCES, 0..SERIES.len(), 0..3u64, 0..1000u64)
            .prop_map(|(source, series, instance, value)| Step::Report { source, series, instance, value }),
        1 => (0..SERIES.len()).prop_map(Step::RemoveSeries),
        1 => (0..SOURCES).prop_map(Step::ForgetSource),
        1 => (0..2usize).prop_map(Step::RemoveVm),
        1 => Just(Step::RestartDaemon),
    ]
}

/// What each series must show, worked out step by step: a report adds what its
/// instance counted since that source last reported (all of it from a new instance, or
/// from a source it does not know), and removals take series away.
#[derive(Default)]
struct Model {
    expected: BTreeMap<usize, u64>,
    /// Per source: its series (none once removed), instance and highest value.
    sources: BTreeMap<usize, (Option<usize>, u64, u64)>,
}

impl Model {
    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Report { source, series, instance, value } => {
                let added = match self.sources.get(&source) {
                    Some(&(_, known, highest)) if known == instance => value.saturating_sub(highest),
                    _ => value,
                };
                let highest = match self.sources.get(&source) {
                    Some(&(_, known, highest)) if known == instance => highest.max(value),
                    _ => value,
                };
                *self.expected.entry(series).or_default() += added;
                self.sources.insert(source, (Some(series), instance, highest));
            }
            Step::RemoveSeries(series) => {
                self.expected.remove(&series);
                for (counted_in, _, _) in self.sources.values_mut() {
                    if *counted_in == Some(series) {
                        *counted_in = None;
                    }
                }
            }
            Step::ForgetSource(source) => {
                self.sources.remove(&source);
            }
            Step::RemoveVm(vm) => {
                let of_vm = |series: usize| SERIES[series][0] == ["a", "b"][vm];
                self.expected.retain(|&series, _| !of_vm(series));
                self.sources.retain(|_, (series, _, _)| !series.is_some_and(of_vm));
            }
            Step::RestartDaemon => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the sources do, every series shows what the model says, and never goes
    /// down except when it is removed.
    #[test]
    fn series_show_what_their_sources_counted_and_never_go_down(steps in prop::collection::vec(step(), 1..60)) {
        let family = CounterFamily::Exits;
        let path = temporary_file(&format!("property-{:?}", std::thread::current().id()));
        let mut counters = ScrapedCounters::new();
        let mut model = Model::default();
        let mut before: BTreeMap<usize, u64> = BTreeMap::new();
        for step in &steps {
            match *step {
                Step::Report { source, series, instance, value } => {
                    let instance = Instance { process: instance, run: 0 };
                    counters.report(family, &SERIES[series], &format!("s{source}"), instance, value);
                }
                Step::RemoveSeries(series) => counters.retain_series(family, |labels| labels != SERIES[series]),
                Step::ForgetSource(source) => counters.retain_sources(family, |name| name != format!("s{source}")),
                Step::RemoveVm(vm) => counters.remove_vm(["a", "b"][vm]),
                Step::RestartDaemon => {
                    counters.save(&path).unwrap();
                    counters = ScrapedCounters::new();
                    counters.restore(&path).unwrap();
                }
            }
            model.apply(step);
            let shown: BTreeMap<usize, u64> = (0..SERIES.len())
                .filter_map(|series| counters.value(family, &SERIES[series]).map(|v| (series, v)))
                .collect();
            prop_assert_eq!(&shown, &model.expected, "after {:?}", step);
            prop_assert_eq!(counters.values().len(), shown.len());
            let removal = matches!(step, Step::RemoveSeries(_) | Step::RemoveVm(_));
            for (series, value) in &shown {
                if !removal {
                    prop_assert!(value >= before.get(series).unwrap_or(&0), "{:?} went down after {:?}", SERIES[*series], step);
                }
            }
            before = shown;
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
