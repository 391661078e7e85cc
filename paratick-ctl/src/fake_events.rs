//! A fake [`EventSource`] for the tests of what reads the observer: the daemon's manager
//! and `observe`'s session.

use std::collections::BTreeMap;

use paratick_common::event::{EventKey, EventKind, EventStats};
use paratick_observer::backend::Backend;
use paratick_observer::{EventSource, ObserverError, ProgramRunStats, Snapshot, TracepointState};
use paratick_vmm::kvm_stats::KvmExitCounts;

/// KVM events of other processes: `exits` KVM exits for each pid.
#[derive(Default)]
pub struct FakeEvents {
    /// KVM exits so far, by pid (all port I/O).
    pub exits: BTreeMap<u32, u64>,
    /// What `tracepoints()` says.
    pub tracepoints: BTreeMap<&'static str, TracepointState>,
}

impl EventSource for FakeEvents {
    fn kvm_counters_state(&self) -> Result<(), &str> {
        Ok(())
    }

    fn program_run_stats(&self) -> BTreeMap<&'static str, ProgramRunStats> {
        BTreeMap::new()
    }

    fn kvm_counters(&mut self) -> Result<BTreeMap<u32, BTreeMap<u32, KvmExitCounts>>, ObserverError> {
        let counts = |exits| KvmExitCounts { exits, io_exits: exits, ..KvmExitCounts::default() };
        Ok(self.exits.iter().map(|(&pid, &exits)| (pid, BTreeMap::from([(0, counts(exits))]))).collect())
    }

    fn forget_processes(&mut self, gone: impl Fn(u32) -> bool) -> Result<(), ObserverError> {
        self.exits.retain(|&pid, _| !gone(pid));
        Ok(())
    }

    fn tracepoints(&self) -> &BTreeMap<&'static str, TracepointState> {
        &self.tracepoints
    }

    fn backend(&self) -> Backend {
        Backend::Pvm
    }

    fn flush_logs(&mut self) {}

    fn snapshot(&self) -> Result<Snapshot, ObserverError> {
        let key = |tgid| EventKey { tgid, vcpu: 0, kind: EventKind::KvmPio as u16, aux: 0, detail: 0x80 };
        let events = self.exits.keys().map(|&pid| (key(pid), EventStats { count: 1, sum_ns: 0 })).collect();
        Ok(Snapshot { events, ..Snapshot::default() })
    }
}
