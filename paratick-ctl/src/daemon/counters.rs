//! The daemon's counters, kept monotonic whatever their sources do.
//!
//! Counters are not incremented: the manager reports each source's cumulative value
//! (a VM process's counters, a process's exits as the observer counted them) to
//! [`ScrapedCounters`], a `Collector` that works the series out from the latest values
//! when it is scraped. Each value comes with the [`Instance`] that counted it:
//! - a new instance (the VM process started again, a new daemon whose observer counts
//!   from zero) adds to its series everything it counts, from zero;
//! - a value below the instance's last one (a VM process's projection re-computed by a
//!   changed model, the copied counters of an exited vCPU lost) adds nothing until the
//!   instance counts past its last value: a series never goes down;
//! - a source that moves between series (a process entering `pid="other"`) adds to each
//!   only what it counted while in it.
//!
//! What the series counted is kept in the state directory (`counters.json`) after every
//! sample, so the next daemon continues every series from where the last one left it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use serde::{Deserialize, Serialize};
use strum::VariantArray;

use super::metrics::CounterFamily;
use super::state::{read_versioned, write_whole, Durability, StateError};

/// What counted a source's values: the values of one instance only grow; those of a new
/// one start from zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Instance {
    /// The process whose counters these are (its pid and start time,
    /// [`Instance::process_id`]); 0 when no process's.
    pub process: u64,
    /// The daemon run that counted them, for what its observer counts (which starts from
    /// zero with each daemon); 0 when the process counted them itself.
    pub run: u64,
}

impl Instance {
    /// An identity of process `pid` that changes when the pid is reused: the pid and
    /// the time the process started, in clock ticks since boot.
    pub fn process_id(pid: u32, start_ticks: Option<u64>) -> u64 {
        (u64::from(pid) << 40) ^ start_ticks.unwrap_or(0)
    }
}

/// One source of a counter series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    /// Where it counts now (`None` once its series was removed).
    series: Option<Vec<String>>,
    instance: Instance,
    /// Its value when it joined that series.
    joined_at: u64,
    /// Its highest value.
    now: u64,
}

/// What the collector knows between scrapes.
#[derive(Debug, Default, Clone, PartialEq)]
struct CounterState {
    /// Per series: what it counted from sources that have left it or restarted.
    carried: BTreeMap<(CounterFamily, Vec<String>), u64>,
    /// Per source (its family and name).
    sources: HashMap<(CounterFamily, String), Source>,
}

impl CounterState {
    /// Moves what `source` counted in its series into that series' carried count.
    fn settle(carried: &mut BTreeMap<(CounterFamily, Vec<String>), u64>, family: CounterFamily, source: &Source) {
        if let Some(series) = &source.series {
            if let Some(count) = carried.get_mut(&(family, series.clone())) {
                *count += source.now - source.joined_at;
            }
        }
    }
}

/// The version of `counters.json` this daemon writes and reads.
const FORMAT_VERSION: u32 = 1;

/// `counters.json`: the collector's state as a file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountersFile {
    version: u32,
    series: Vec<CarriedRecord>,
    sources: Vec<SourceRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CarriedRecord {
    family: CounterFamily,
    labels: Vec<String>,
    carried: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceRecord {
    family: CounterFamily,
    name: String,
    #[serde(flatten)]
    source: Source,
}

/// The counters of [`CounterFamily`], as a `prometheus` collector that reads the
/// sources' latest cumulative values when scraped. Clones share their state.
#[derive(Clone)]
pub struct ScrapedCounters {
    descs: Arc<Vec<Desc>>,
    state: Arc<Mutex<CounterState>>,
}

impl ScrapedCounters {
    /// No series yet.
    pub fn new() -> ScrapedCounters {
        let descs = CounterFamily::VARIANTS
            .iter()
            .map(|family| {
                let (name, help, labels) = family.spec();
                let labels = labels.iter().map(|l| l.to_string()).collect();
                Desc::new(name.into(), help.into(), labels, HashMap::new()).expect("valid metric")
            })
            .collect();
        ScrapedCounters { descs: Arc::new(descs), state: Arc::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CounterState> {
        // The state stays consistent at every step: a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reports the cumulative `value` that `instance` counted of a series' only source.
    pub fn report_own(&self, family: CounterFamily, labels: &[&str], instance: Instance, value: u64) {
        self.report(family, labels, &labels.join("\u{1f}"), instance, value);
    }

    /// Reports the cumulative `value` that `instance` counted of `source` (e.g. one
    /// process's exits of one reason), which counts in the series `labels`.
    pub fn report(&self, family: CounterFamily, labels: &[&str], source: &str, instance: Instance, value: u64) {
        debug_assert_eq!(labels.len(), family.spec().2.len(), "{family:?}: label values");
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        let mut state = self.state();
        let CounterState { carried, sources } = &mut *state;
        carried.entry((family, labels.clone())).or_insert(0);
        match sources.get_mut(&(family, source.to_string())) {
            None => {
                let source_state = Source { series: Some(labels), instance, joined_at: 0, now: value };
                sources.insert((family, source.to_string()), source_state);
            }
            Some(known) if known.instance != instance => {
                CounterState::settle(carried, family, known);
                *known = Source { series: Some(labels), instance, joined_at: 0, now: value };
            }
            Some(known) => {
                if known.series.as_ref() != Some(&labels) {
                    CounterState::settle(carried, family, known);
                    known.joined_at = known.now;
                    known.series = Some(labels);
                }
                known.now = known.now.max(value);
            }
        }
    }

    /// Removes the series of `family` that `keep` refuses; their sources are
    /// remembered, so that they add only their increase wherever they count next.
    pub fn retain_series(&self, family: CounterFamily, keep: impl Fn(&[String]) -> bool) {
        let mut state = self.state();
        let CounterState { carried, sources } = &mut *state;
        carried.retain(|(f, labels), _| *f != family || keep(labels));
        for ((f, _), source) in sources.iter_mut() {
            if *f == family && source.series.as_ref().is_some_and(|s| !carried.contains_key(&(family, s.clone()))) {
                source.series = None;
            }
        }
    }

    /// Removes every series of the VM `vm` (a VM gone from the configuration), and what
    /// its sources counted.
    pub fn remove_vm(&self, vm: &str) {
        let mut state = self.state();
        let of_vm =
            |family: CounterFamily, labels: &[String]| family.spec().2.first() == Some(&"vm") && labels[0] == vm;
        state.carried.retain(|(family, labels), _| !of_vm(*family, labels));
        state.sources.retain(|(family, _), source| !source.series.as_ref().is_some_and(|s| of_vm(*family, s)));
    }

    /// Forgets the sources of `family` that `keep` refuses (processes that are gone);
    /// what they counted stays in their series.
    pub fn retain_sources(&self, family: CounterFamily, keep: impl Fn(&str) -> bool) {
        let mut state = self.state();
        let CounterState { carried, sources } = &mut *state;
        sources.retain(|(f, name), source| {
            let kept = *f != family || keep(name);
            if !kept {
                CounterState::settle(carried, family, source);
            }
            kept
        });
    }

    /// Every series' value now.
    fn values(&self) -> BTreeMap<(CounterFamily, Vec<String>), u64> {
        let state = self.state();
        let mut values = state.carried.clone();
        for ((family, _), source) in &state.sources {
            if let Some(count) = source.series.as_ref().and_then(|s| values.get_mut(&(*family, s.clone()))) {
                *count += source.now - source.joined_at;
            }
        }
        values
    }

    /// One series' value now, as a scrape shows it (none: no such series).
    pub fn value(&self, family: CounterFamily, labels: &[&str]) -> Option<u64> {
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        let state = self.state();
        let mut count = *state.carried.get(&(family, labels.clone()))?;
        for ((f, _), source) in &state.sources {
            if *f == family && source.series.as_ref() == Some(&labels) {
                count += source.now - source.joined_at;
            }
        }
        Some(count)
    }

    /// Writes what every series counted to `path`, for the next daemon. Left to the
    /// page cache, as it is written every second: it outlives the daemon, and after a
    /// crash of the host every source starts again anyway (its VM processes and observer
    /// are gone), so an old or missing file shows as a counter reset, which Prometheus's
    /// `rate()` and `increase()` expect.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let file = {
            let state = self.state();
            CountersFile {
                version: FORMAT_VERSION,
                series: state
                    .carried
                    .iter()
                    .map(|((family, labels), &carried)| CarriedRecord {
                        family: *family,
                        labels: labels.clone(),
                        carried,
                    })
                    .collect(),
                sources: state
                    .sources
                    .iter()
                    .map(|((family, name), source)| SourceRecord {
                        family: *family,
                        name: name.clone(),
                        source: source.clone(),
                    })
                    .collect(),
            }
        };
        write_whole(path, &file, Durability::Cached)
    }

    /// Continues the series kept in `path` by an earlier daemon (none: no series). A
    /// file that cannot be read is moved aside, reported, and the series start again.
    pub fn restore(&self, path: &Path) -> Result<(), StateError> {
        let Some(file) = read_versioned::<CountersFile>(path, FORMAT_VERSION)? else { return Ok(()) };
        let mut state = self.state();
        for CarriedRecord { family, labels, carried } in file.series {
            if labels.len() == family.spec().2.len() {
                state.carried.insert((family, labels), carried);
            }
        }
        // Each source consistent: joined at most at its value, counting in a series the
        // file has.
        for SourceRecord { family, name, source } in file.sources {
            let series_known = source.series.as_ref().is_none_or(|s| state.carried.contains_key(&(family, s.clone())));
            if source.joined_at <= source.now && series_known {
                state.sources.insert((family, name), source);
            }
        }
        Ok(())
    }
}

/// Where the counters are kept in the state directory `dir`.
pub fn counters_file(dir: &Path) -> PathBuf {
    dir.join("counters.json")
}

impl Collector for ScrapedCounters {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let values = self.values();
        CounterFamily::VARIANTS
            .iter()
            .filter_map(|&family| {
                let (name, help, label_names) = family.spec();
                // Label pairs in name order, as the prometheus crate's own vectors have them.
                let mut order: Vec<usize> = (0..label_names.len()).collect();
                order.sort_by_key(|&i| label_names[i]);
                let metrics: Vec<proto::Metric> = values
                    .range((family, Vec::new())..)
                    .take_while(|((f, _), _)| *f == family)
                    .map(|((_, labels), value)| {
                        let pairs = order
                            .iter()
                            .map(|&i| {
                                let mut pair = LabelPair::default();
                                pair.set_name(label_names[i].to_string());
                                pair.set_value(labels[i].clone());
                                pair
                            })
                            .collect();
                        let mut metric = proto::Metric::default();
                        metric.set_label(pairs);
                        let mut counter = proto::Counter::default();
                        counter.set_value(*value as f64 * family.scale());
                        metric.set_counter(counter);
                        metric
                    })
                    .collect();
                if metrics.is_empty() {
                    return None;
                }
                let mut out = MetricFamily::default();
                out.set_name(name.into());
                out.set_help(help.into());
                out.set_field_type(MetricType::COUNTER);
                out.set_metric(metrics);
                Some(out)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
