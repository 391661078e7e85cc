//! The eBPF KVM observer: the userspace side of the programs in `paratick-ebpf`, for any
//! KVM VM on the host whatever its VMM. [`Observer`] loads the programs (built by
//! build.rs), resolves each tracepoint's field layout from the running kernel's format
//! files and BTF, attaches to every KVM tracepoint the kernel has (reporting the ones it
//! lacks), and reads the counts; [`counts`] decodes them per process, [`kvm_stats`] adds
//! KVM's own exit counters, [`procfs`] names the VMs, [`model`] is the exits model of
//! the host's backend ([`backend`]), and [`report`] is what `paratick-ctl observe`, the
//! daemon and the bench show of them.

pub mod backend;
mod btf;
pub mod counts;
pub mod format;
pub mod kvm_stats;
pub mod model;
pub mod plot;
pub mod procfs;
pub mod report;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::{Iter, RawTracePoint, TracePoint};
use aya::Ebpf;
use paratick_common::event::{
    program_name, EventKey, EventKind, EventStats, ObserverConfig, ProgramSlot, RawArg, TracepointLayout, VcpuThread,
    DROP_REASON_COUNT, FORK_CHILD_PID, PROGRAM_COUNT, PROGRAM_FORK, PROGRAM_THREAD_EXIT, PROGRAM_VCPU_FILES,
    SYNTHETIC_OWNER_BASE,
};

use paratick_common::kvm_counters::{KvmCounterLayout, KvmVcpuCounters, KvmVcpuKey, KVM_COUNTERS, KVM_COUNTER_NAMES};
use paratick_vmm::kvm_stats::KvmExitCounts;

use crate::backend::Backend;
pub use counts::{per_process, ProcessCounts, Snapshot};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/paratick"));

/// Where tracefs is usually mounted, newest convention first.
pub const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Why the observer could not start or read its maps.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    /// No tracefs with KVM events was found.
    #[error(
        "tracefs is not mounted (looked in {looked}): mount it with `mount -t tracefs tracefs /sys/kernel/tracing` or run `cargo xtask setup`"
    )]
    NoTracefs {
        /// Paths looked in.
        looked: String,
    },
    /// tracefs is there but has no `kvm` events: the kvm module is not loaded.
    #[error("{0} has no KVM events: load the kvm module (`modprobe kvm_intel`, `kvm_amd` or `kvm_pvm`)")]
    NoKvmEvents(PathBuf),
    /// The process may not load BPF programs.
    #[error("loading eBPF programs needs root (or CAP_BPF and CAP_PERFMON): run paratick-ctl with sudo")]
    NotPrivileged,
    /// The BPF object could not be loaded.
    #[error("could not load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A map the object should have is missing or of the wrong type.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        source: aya::maps::MapError,
    },
    /// The iterator that samples KVM's counters could not be run.
    #[error("sampling KVM's counters: {0}")]
    KvmCounterSample(String),
    /// The kernel's BPF run statistics could not be turned on.
    #[error("cannot turn the kernel's BPF statistics on (BPF_ENABLE_STATS needs kernel 5.8 and CAP_SYS_ADMIN): {0}")]
    BpfStats(String),
    /// A tracepoint every kernel we support has could not be used.
    #[error("tracepoint {name}: {reason}")]
    Tracepoint {
        /// Tracepoint (`group:event`).
        name: String,
        /// What went wrong.
        reason: String,
    },
}

/// What one of the observer's programs cost, as the kernel counts it (`bpf_prog_info`
/// `run_cnt` and `run_time_ns`) while its BPF statistics are on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProgramRunStats {
    /// Runs.
    pub runs: u64,
    /// Nanoseconds spent in the program.
    pub run_ns: u64,
}

/// Where the kernel says whether it counts BPF programs' runs and run time.
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Whether `kernel.bpf_stats_enabled` is 1. (The kernel also counts while any process
/// holds the statistics on, see [`enable_bpf_stats`], which this sysctl does not show.)
pub fn bpf_stats_enabled() -> bool {
    fs::read_to_string(BPF_STATS_SYSCTL).is_ok_and(|value| value.trim() == "1")
}

/// Turns the kernel's BPF run statistics on for as long as the returned descriptor is
/// open (BPF_ENABLE_STATS): each program run then costs two clock reads more.
pub fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd, ObserverError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| ObserverError::BpfStats(e.to_string()))
}

/// State of one tracepoint after start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracepointState {
    /// The program is attached.
    Attached,
    /// The running kernel does not have this tracepoint.
    Missing,
    /// The tracepoint exists but could not be used (layout not understood, attach failed).
    Failed(String),
}

impl TracepointState {
    /// Short form for reports: `attached`, `missing`, or `failed: <why>`.
    pub fn describe(&self) -> String {
        match self {
            TracepointState::Attached => "attached".into(),
            TracepointState::Missing => "missing".into(),
            TracepointState::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// Which processes to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidFilter {
    /// Every KVM process on the host.
    All,
    /// Only these processes and, with `follow_forks`, the processes they start.
    Pids {
        /// Processes to record.
        pids: Vec<u32>,
        /// Whether their children (forked after attach) are recorded too.
        follow_forks: bool,
    },
}

/// What the daemon's manager reads of the host's KVM events: the boundary between its
/// metrics and the eBPF programs (faked in its tests).
pub trait EventSource {
    /// Whether KVM's own counters are available, or why not.
    fn kvm_counters_state(&self) -> Result<(), &str>;

    /// KVM's own counters of every vCPU on the host, by process and vCPU id: sampled now,
    /// or as copied when the vCPU's thread exited.
    fn kvm_counters(&mut self) -> Result<BTreeMap<u32, BTreeMap<u32, KvmExitCounts>>, ObserverError>;

    /// Forgets everything the programs recorded of processes that are gone (`gone`
    /// says which): their event counts, timer vectors, vCPU threads and KVM counters, so
    /// that the maps never fill with the dead on a host with VM churn. Call it after the
    /// last snapshot that should still count them.
    fn forget_processes(&mut self, gone: impl Fn(u32) -> bool) -> Result<(), ObserverError>;

    /// Runs and run time of each of the observer's programs, by name, as the kernel
    /// counts them while its BPF statistics are on (see [`bpf_stats_enabled`]).
    fn program_run_stats(&self) -> BTreeMap<&'static str, ProgramRunStats>;

    /// State of every KVM tracepoint, by name.
    fn tracepoints(&self) -> &BTreeMap<&'static str, TracepointState>;

    /// The host's KVM backend.
    fn backend(&self) -> Backend;

    /// Forwards pending eBPF log records to the `log` crate.
    fn flush_logs(&mut self);

    /// Reads all maps, summing per-CPU values.
    fn snapshot(&self) -> Result<Snapshot, ObserverError>;
}

/// A loaded and attached observer. Dropping it detaches every program.
pub struct Observer {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    tracepoints: BTreeMap<&'static str, TracepointState>,
    /// Whether KVM's own counters are sampled (by the iterator), or why not.
    kvm_counters: Result<(), String>,
    /// The program loaded for each index of the programs map (a KVM tracepoint's raw or
    /// tracepoint program), by that index.
    programs: BTreeMap<u32, &'static str>,
    backend: Backend,
    tracefs: PathBuf,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").field("tracepoints", &self.tracepoints).field("backend", &self.backend).finish()
    }
}

/// Finds, among `candidates`, a mounted tracefs that has KVM events.
pub fn find_tracefs_in(candidates: &[&Path]) -> Result<PathBuf, ObserverError> {
    let mounted: Vec<&Path> = candidates.iter().copied().filter(|p| p.join("events").is_dir()).collect();
    let Some(first) = mounted.first() else {
        let looked = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(ObserverError::NoTracefs { looked });
    };
    mounted
        .iter()
        .find(|p| p.join("events/kvm").is_dir())
        .map(|p| p.to_path_buf())
        .ok_or_else(|| ObserverError::NoKvmEvents(first.to_path_buf()))
}

/// Whether this process may load BPF programs: root, or CAP_BPF (39) and CAP_PERFMON (38)
/// in its effective set.
pub fn may_load_bpf() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_BPF) != 0 && caps & (1 << CAP_PERFMON) != 0)
}

fn read_format(tracefs: &Path, group: &str, event: &str) -> Option<Result<format::EventFormat, String>> {
    let path = tracefs.join("events").join(group).join(event).join("format");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("{}: {e}", path.display()))),
    };
    Some(format::parse(&text).map_err(|e| format!("{}: {e}", path.display())))
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> ObserverError {
    move |source| ObserverError::Map { name, source }
}

impl Observer {
    /// Loads the programs and attaches them to every KVM tracepoint the kernel has.
    pub fn start(filter: &PidFilter) -> Result<Observer, ObserverError> {
        Self::load(filter, false)
    }

    /// As [`Observer::start`], and events of threads registered with
    /// [`Observer::attribute_threads`] count under their owner: how the bench tells apart
    /// the VMs it runs in its own process. (It costs every event a lookup more, so only
    /// an observer started this way does it.)
    pub fn start_attributing_threads(filter: &PidFilter) -> Result<Observer, ObserverError> {
        Self::load(filter, true)
    }

    fn load(filter: &PidFilter, attribute_threads: bool) -> Result<Observer, ObserverError> {
        // Privilege first: tracefs is root-only, so an unprivileged user would otherwise
        // be told that tracefs is missing.
        if !may_load_bpf() {
            return Err(ObserverError::NotPrivileged);
        }
        let tracefs = find_tracefs_in(&TRACEFS_CANDIDATES.map(Path::new))?;
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| match &e {
            aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                ObserverError::NotPrivileged
            }
            _ => ObserverError::Load(e),
        })?;
        // Diagnostics of the programs (map-full warnings) go to our log.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                log::warn!("eBPF program logs unavailable: {e}");
                None
            }
        };
        let mut observer = Observer {
            ebpf,
            logger,
            tracepoints: BTreeMap::new(),
            kvm_counters: Err("not attached".into()),
            programs: BTreeMap::new(),
            backend: Backend::of_host(),
            tracefs,
        };
        let config = observer.configure(filter, attribute_threads)?;
        let btf = btf::KernelBtf::load(Path::new("/sys/kernel/btf"), &["kvm"]);
        let kvm_layout = btf.as_ref().map_err(String::clone).and_then(Self::kvm_counter_layout);
        let kvm_layout = kvm_layout.and_then(|layout| observer.write_kvm_layout(layout));
        observer.attach_all(config, btf.as_ref().ok(), kvm_layout.is_ok())?;
        observer.kvm_counters = kvm_layout.and_then(|()| observer.attach_kvm_counter_programs());
        if let Err(why) = &observer.kvm_counters {
            log::warn!("KVM's own exit counters are unavailable: {why}");
        }
        Ok(observer)
    }

    /// Tracks the filter's processes and returns the programs' settings.
    fn configure(&mut self, filter: &PidFilter, attribute_threads: bool) -> Result<ObserverConfig, ObserverError> {
        let thread_owners = attribute_threads as u32;
        Ok(match filter {
            PidFilter::All => ObserverConfig { thread_owners, ..ObserverConfig::default() },
            PidFilter::Pids { pids, follow_forks } => {
                for pid in pids {
                    self.track(*pid)?;
                }
                ObserverConfig { filter_by_pid: 1, follow_forks: *follow_forks as u32, thread_owners, reserved: 0 }
            }
        })
    }

    /// The program loaded for each of the observer's programs, by the name it is counted
    /// under: a KVM tracepoint's raw tracepoint program (`raw_NAME`) or its tracepoint
    /// program (`NAME`).
    pub fn loaded_programs(&self) -> BTreeMap<&'static str, &'static str> {
        self.programs.iter().map(|(&index, &program)| (named(index), program)).collect()
    }

    /// Records this process (and, if following forks, its future children) from now on.
    pub fn track(&mut self, pid: u32) -> Result<(), ObserverError> {
        let mut map: BpfHashMap<&mut MapData, u32, u8> =
            BpfHashMap::try_from(self.ebpf.map_mut("TRACKED_PIDS").expect("TRACKED_PIDS map"))
                .map_err(map_err("TRACKED_PIDS"))?;
        map.insert(pid, 1, 0).map_err(map_err("TRACKED_PIDS"))
    }

    /// Counts the events of these threads under `owner` instead of their process (an
    /// observer from [`Observer::start_attributing_threads`] only).
    pub fn attribute_threads(&mut self, owner: u32, tids: &[u32]) -> Result<(), ObserverError> {
        let mut map: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("THREAD_OWNERS").expect("THREAD_OWNERS map"))
                .map_err(map_err("THREAD_OWNERS"))?;
        for tid in tids {
            map.insert(tid, owner, 0).map_err(map_err("THREAD_OWNERS"))?;
        }
        Ok(())
    }

    /// Forgets threads registered with [`Observer::attribute_threads`] (they exited).
    pub fn forget_threads(&mut self, tids: &[u32]) -> Result<(), ObserverError> {
        let mut map: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("THREAD_OWNERS").expect("THREAD_OWNERS map"))
                .map_err(map_err("THREAD_OWNERS"))?;
        for tid in tids {
            match map.remove(tid) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(ObserverError::Map { name: "THREAD_OWNERS", source: e }),
            }
        }
        Ok(())
    }

    /// Writes every program's slot (the settings, its layout) on every CPU. Only before
    /// anything is attached: the programs own the slots' event counts from then on.
    fn write_program_slots(
        &mut self,
        config: ObserverConfig,
        layouts: &[TracepointLayout],
    ) -> Result<(), ObserverError> {
        let slots_error = |call: &'static str| {
            move |io_error| ObserverError::Map {
                name: "PROGRAMS",
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
            }
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| slots_error("nr_cpus")(e))?;
        let mut map: PerCpuArray<&mut MapData, ProgramSlot> =
            PerCpuArray::try_from(self.ebpf.map_mut("PROGRAMS").expect("PROGRAMS map")).map_err(map_err("PROGRAMS"))?;
        for index in 0..PROGRAM_COUNT {
            let layout = layouts.get(index as usize).copied().unwrap_or_default();
            let slot = ProgramSlot { events: 0, config, layout };
            let values = PerCpuValues::try_from(vec![slot; cpus]).map_err(slots_error("per-CPU values"))?;
            map.set(index, values, 0).map_err(map_err("PROGRAMS"))?;
        }
        Ok(())
    }

    /// Chooses each KVM tracepoint's program (the raw tracepoint program where this
    /// kernel's arguments are what the table says, else the tracepoint program with the
    /// layout of its format file), writes the programs' slots, then attaches them.
    fn attach_all(
        &mut self,
        config: ObserverConfig,
        btf: Option<&btf::KernelBtf>,
        kvm_layout_written: bool,
    ) -> Result<(), ObserverError> {
        // Fork tracking is needed for `observe -- COMMAND`: without it the command's VMs
        // would be invisible, so failing here is an error, not a missing tracepoint.
        let fork = read_format(&self.tracefs, "sched", "sched_process_fork")
            .unwrap_or_else(|| Err("not in tracefs".into()))
            .and_then(|f| f.layout(&[FORK_CHILD_PID]).map_err(|e| e.to_string()));
        let fork_error = |reason| ObserverError::Tracepoint { name: "sched:sched_process_fork".into(), reason };
        let mut layouts = vec![TracepointLayout::default(); PROGRAM_COUNT as usize];
        layouts[PROGRAM_FORK as usize] = fork.map_err(fork_error)?;
        let mut chosen = Vec::new();
        for kind in EventKind::ALL {
            let name = kind.tracepoint();
            let state = match read_format(&self.tracefs, "kvm", name) {
                None => TracepointState::Missing,
                Some(_) if raw_arguments_match(kind, btf, kvm_layout_written) => {
                    chosen.push((kind, true));
                    TracepointState::Attached
                }
                Some(format) => match format.and_then(|f| f.layout(kind.fields()).map_err(|e| e.to_string())) {
                    Err(why) => TracepointState::Failed(why),
                    Ok(layout) => {
                        layouts[kind as usize] = layout;
                        chosen.push((kind, false));
                        TracepointState::Attached
                    }
                },
            };
            self.tracepoints.insert(name, state);
        }
        self.write_program_slots(config, &layouts)?;

        self.attach("sched", "sched_process_fork").map_err(fork_error)?;
        self.programs.insert(PROGRAM_FORK, named(PROGRAM_FORK));
        for (kind, raw) in chosen {
            let attached = match raw {
                true => self.attach_raw(kind.raw_program(), kind.tracepoint()).map(|()| kind.raw_program()),
                false => self.attach("kvm", kind.tracepoint()).map(|()| kind.tracepoint()),
            };
            match attached {
                Ok(program) => {
                    self.programs.insert(kind as u32, program);
                }
                Err(why) => {
                    self.tracepoints.insert(kind.tracepoint(), TracepointState::Failed(why));
                }
            }
        }
        for (name, state) in &self.tracepoints {
            if *state != TracepointState::Attached {
                log::info!("kvm:{name}: {}", state.describe());
            }
        }
        Ok(())
    }

    fn attach_raw(&mut self, program: &str, tracepoint: &str) -> Result<(), String> {
        let probe: &mut RawTracePoint = program_of(&mut self.ebpf, program)?;
        probe.load().map_err(|e| format!("{program}: load: {e}"))?;
        probe.attach(tracepoint).map_err(|e| format!("{program} on {tracepoint}: {e}"))?;
        Ok(())
    }

    fn attach(&mut self, group: &str, name: &str) -> Result<(), String> {
        let program: &mut TracePoint = program_of(&mut self.ebpf, name)?;
        program.load().map_err(|e| format!("load: {e}"))?;
        program.attach(group, name).map_err(|e| format!("attach: {e}"))?;
        Ok(())
    }

    /// Finds the fields the KVM-counter programs read in this kernel's structures (see
    /// the eBPF crate).
    fn kvm_counter_layout(btf: &btf::KernelBtf) -> Result<KvmCounterLayout, String> {
        let offset = |name: &str, path: &str| btf.member_offset(name, path);
        let stat = offset("kvm_vcpu", "stat")?;
        let descriptors = paratick_vmm::stats::VcpuStats::of_this_kernel()
            .map_err(|e| format!("cannot read KVM's stats descriptors: {e}"))?;
        let mut offsets = [0u32; KVM_COUNTERS];
        for (slot, (name, offset)) in offsets
            .iter_mut()
            .zip(KVM_COUNTER_NAMES.iter().zip(descriptors.offsets_in_kvm_vcpu_stat(&KVM_COUNTER_NAMES)))
        {
            *slot = stat + offset.ok_or_else(|| format!("this kernel's KVM has no {name} statistic"))?;
        }
        let layout = KvmCounterLayout {
            ready: 1,
            vcpu_id_offset: offset("kvm_vcpu", "vcpu_id")?,
            vcpu_pid_offset: offset("kvm_vcpu", "pid")?,
            pid_nr_offset: offset("pid", "numbers")? + offset("upid", "nr")?,
            file_dentry_offset: offset("file", "f_path.dentry")?,
            file_private_data_offset: offset("file", "private_data")?,
            dentry_name_offset: offset("dentry", "d_name.name")?,
            task_tgid_offset: offset("task_struct", "tgid")?,
            task_files_offset: offset("task_struct", "files")?,
            files_fdt_offset: offset("files_struct", "fdt")?,
            fdtable_max_fds_offset: offset("fdtable", "max_fds")?,
            fdtable_fd_offset: offset("fdtable", "fd")?,
            kvm_vcpus_head_offset: offset("kvm", "vcpu_array.xa_head")?,
            xa_node_slots_offset: offset("xa_node", "slots")?,
            lapic_vcpu_offset: offset("kvm_lapic", "vcpu")?,
            reserved: 0,
            offsets,
        };
        Ok(layout)
    }

    /// Writes where the KVM-counter programs (and the raw programs that need a vCPU id)
    /// find their fields.
    fn write_kvm_layout(&mut self, layout: KvmCounterLayout) -> Result<(), String> {
        let mut map: Array<&mut MapData, KvmCounterLayout> =
            Array::try_from(self.ebpf.map_mut("KVM_LAYOUT").expect("KVM_LAYOUT map")).map_err(|e| e.to_string())?;
        map.set(0, layout, 0).map_err(|e| e.to_string())
    }

    /// Loads the iterator that samples KVM's counters and attaches the program that
    /// copies a vCPU's counters when its thread exits.
    fn attach_kvm_counter_programs(&mut self) -> Result<(), String> {
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        let iterator: &mut Iter = program_of(&mut self.ebpf, KVM_ITERATOR)?;
        iterator.load("task_file", &kernel_btf).map_err(|e| format!("{KVM_ITERATOR}: load: {e}"))?;
        self.attach_raw(THREAD_EXIT_PROGRAM, "sched_process_exit")?;
        self.programs.insert(PROGRAM_THREAD_EXIT, THREAD_EXIT_PROGRAM);
        self.programs.insert(PROGRAM_VCPU_FILES, KVM_ITERATOR);
        self.sample_kvm_counters().map_err(|e| e.to_string())
    }

    /// Runs the iterator once: every vCPU file on the host has its counters copied.
    fn sample_kvm_counters(&mut self) -> Result<(), ObserverError> {
        let sample_error = |what: String| ObserverError::KvmCounterSample(what);
        let iterator: &mut Iter = program_of(&mut self.ebpf, KVM_ITERATOR).map_err(sample_error)?;
        let link = iterator.attach().map_err(|e| sample_error(format!("attach: {e}")))?;
        let link = iterator.take_link(link).map_err(|e| sample_error(format!("link: {e}")))?;
        let mut file = link.into_file().map_err(|e| sample_error(format!("create: {e}")))?;
        // The program writes maps, not the file: reading to the end runs it over every
        // file. A read that visited very many files without output ends early with
        // EAGAIN and the next continues where it stopped.
        let mut sink = [0u8; 64];
        loop {
            match file.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                }
                Err(e) => return Err(sample_error(format!("read: {e}"))),
            }
        }
    }
}

/// Whether the raw tracepoint program can read `kind` on this kernel: the table has its
/// arguments, the kernel's BTF shows them as the table expects, and the vCPU ids it
/// reads through KVM's structures have their offsets.
fn raw_arguments_match(kind: EventKind, btf: Option<&btf::KernelBtf>, kvm_layout_written: bool) -> bool {
    let (Some(raw), Some(btf)) = (kind.raw(), btf) else { return false };
    let expected: Vec<u32> = raw.arg_sizes.iter().map(|&size| u32::from(size)).collect();
    let needs_kvm = raw.slots.iter().any(|slot| matches!(slot, RawArg::VcpuIdOf(_) | RawArg::LapicVcpuIdOf(_)));
    match btf.tracepoint_arg_sizes(kind.tracepoint()) {
        Ok(sizes) if sizes == expected => kvm_layout_written || !needs_kvm,
        Ok(sizes) => {
            log::info!(
                "kvm:{}: arguments of {sizes:?} bytes, not {expected:?}: read from its trace record",
                kind.tracepoint()
            );
            false
        }
        Err(why) => {
            log::info!("kvm:{}: {why}: read from its trace record", kind.tracepoint());
            false
        }
    }
}

/// Program `name` of the object, as the program type `P` it must be.
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, String>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| format!("program {name} is not in the eBPF object"))?;
    program.try_into().map_err(|e| format!("{name}: {e}"))
}

/// The BPF iterator that samples KVM's per-vCPU counters.
const KVM_ITERATOR: &str = named(PROGRAM_VCPU_FILES);
/// The program that copies a vCPU's counters when its thread exits.
const THREAD_EXIT_PROGRAM: &str = named(PROGRAM_THREAD_EXIT);

const fn named(index: u32) -> &'static str {
    match program_name(index) {
        Some(name) => name,
        None => panic!("every program index has a name"),
    }
}

impl EventSource for Observer {
    fn kvm_counters_state(&self) -> Result<(), &str> {
        self.kvm_counters.as_ref().map(|_| ()).map_err(String::as_str)
    }

    fn kvm_counters(&mut self) -> Result<BTreeMap<u32, BTreeMap<u32, KvmExitCounts>>, ObserverError> {
        self.sample_kvm_counters()?;
        let map: BpfHashMap<&MapData, KvmVcpuKey, KvmVcpuCounters> =
            BpfHashMap::try_from(self.ebpf.map("KVM_VCPU_COUNTERS").expect("KVM_VCPU_COUNTERS map"))
                .map_err(map_err("KVM_VCPU_COUNTERS"))?;
        let mut out: BTreeMap<u32, BTreeMap<u32, KvmExitCounts>> = BTreeMap::new();
        for entry in map.iter() {
            let (key, counters) = entry.map_err(map_err("KVM_VCPU_COUNTERS"))?;
            let counts = KvmExitCounts::from_named(|name| {
                KVM_COUNTER_NAMES.iter().position(|n| *n == name).map(|i| counters.values[i])
            });
            out.entry(key.tgid).or_default().insert(key.vcpu_id, counts);
        }
        Ok(out)
    }

    fn forget_processes(&mut self, gone: impl Fn(u32) -> bool) -> Result<(), ObserverError> {
        fn remove_where<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
            dead: impl Fn(&K) -> bool,
        ) -> Result<(), ObserverError> {
            let mut map: BpfHashMap<&mut MapData, K, V> =
                BpfHashMap::try_from(ebpf.map_mut(name).expect("map in the object")).map_err(map_err(name))?;
            let keys: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| dead(k)).collect();
            for key in keys {
                match map.remove(&key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(ObserverError::Map { name, source: e }),
                }
            }
            Ok(())
        }
        remove_where::<KvmVcpuKey, KvmVcpuCounters>(&mut self.ebpf, "KVM_VCPU_COUNTERS", |k| gone(k.tgid))?;
        remove_where::<u32, u32>(&mut self.ebpf, "TIMER_VECTORS", |tgid| gone(*tgid))?;
        remove_where::<VcpuThread, u8>(&mut self.ebpf, "VCPU_THREADS", |t| gone(t.tgid))?;
        let mut events: PerCpuHashMap<&mut MapData, EventKey, EventStats> =
            PerCpuHashMap::try_from(self.ebpf.map_mut("EVENTS").expect("EVENTS map")).map_err(map_err("EVENTS"))?;
        let dead: Vec<EventKey> =
            events.keys().filter_map(Result::ok).filter(|k| k.tgid < SYNTHETIC_OWNER_BASE && gone(k.tgid)).collect();
        for key in dead {
            match events.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(ObserverError::Map { name: "EVENTS", source: e }),
            }
        }
        Ok(())
    }

    fn tracepoints(&self) -> &BTreeMap<&'static str, TracepointState> {
        &self.tracepoints
    }

    fn program_run_stats(&self) -> BTreeMap<&'static str, ProgramRunStats> {
        self.programs
            .iter()
            .filter_map(|(&index, program)| {
                let info = self.ebpf.program(program)?.info().ok()?;
                let stats = ProgramRunStats { runs: info.run_count(), run_ns: info.run_time().as_nanos() as u64 };
                Some((named(index), stats))
            })
            .collect()
    }

    fn backend(&self) -> Backend {
        self.backend
    }

    fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    fn snapshot(&self) -> Result<Snapshot, ObserverError> {
        let events: PerCpuHashMap<&MapData, EventKey, EventStats> =
            PerCpuHashMap::try_from(self.ebpf.map("EVENTS").expect("EVENTS map")).map_err(map_err("EVENTS"))?;
        let mut snapshot = Snapshot::default();
        for entry in events.iter() {
            let (key, per_cpu) = entry.map_err(map_err("EVENTS"))?;
            let total = per_cpu.iter().fold(EventStats::default(), |sum, v| EventStats {
                count: sum.count + v.count,
                sum_ns: sum.sum_ns + v.sum_ns,
            });
            snapshot.events.insert(key, total);
        }
        let vectors: BpfHashMap<&MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map("TIMER_VECTORS").expect("TIMER_VECTORS map"))
                .map_err(map_err("TIMER_VECTORS"))?;
        for entry in vectors.iter() {
            let (tgid, vector) = entry.map_err(map_err("TIMER_VECTORS"))?;
            snapshot.timer_vectors.insert(tgid, vector);
        }
        let threads: BpfHashMap<&MapData, VcpuThread, u8> =
            BpfHashMap::try_from(self.ebpf.map("VCPU_THREADS").expect("VCPU_THREADS map"))
                .map_err(map_err("VCPU_THREADS"))?;
        for entry in threads.keys() {
            let thread = entry.map_err(map_err("VCPU_THREADS"))?;
            *snapshot.vcpu_threads.entry(thread.tgid).or_default() += 1;
        }
        let drops: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("DROPS").expect("DROPS map")).map_err(map_err("DROPS"))?;
        for index in 0..DROP_REASON_COUNT {
            let per_cpu = drops.get(&index, 0).map_err(map_err("DROPS"))?;
            snapshot.drops[index as usize] = per_cpu.iter().sum();
        }
        let programs: PerCpuArray<&MapData, ProgramSlot> =
            PerCpuArray::try_from(self.ebpf.map("PROGRAMS").expect("PROGRAMS map")).map_err(map_err("PROGRAMS"))?;
        for index in 0..PROGRAM_COUNT {
            let per_cpu = programs.get(&index, 0).map_err(map_err("PROGRAMS"))?;
            snapshot.program_events.insert(named(index), per_cpu.iter().map(|slot| slot.events).sum());
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracefs_is_found_only_where_mounted_and_with_kvm_events() {
        let root = std::env::temp_dir().join(format!("paratick-tracefs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (unmounted, no_kvm, good) = (root.join("a"), root.join("b"), root.join("c"));
        fs::create_dir_all(&unmounted).unwrap();
        fs::create_dir_all(no_kvm.join("events/sched")).unwrap();
        fs::create_dir_all(good.join("events/kvm")).unwrap();

        let err = find_tracefs_in(&[&unmounted]).unwrap_err();
        assert!(matches!(&err, ObserverError::NoTracefs { looked } if looked == &unmounted.display().to_string()));
        assert!(err.to_string().contains("mount -t tracefs"), "{err}");
        let err = find_tracefs_in(&[&unmounted, &no_kvm]).unwrap_err();
        assert!(matches!(&err, ObserverError::NoKvmEvents(p) if p == &no_kvm), "{err}");
        assert!(err.to_string().contains("load the kvm module"), "{err}");
        assert_eq!(find_tracefs_in(&[&unmounted, &no_kvm, &good]).unwrap(), good);
        fs::remove_dir_all(&root).unwrap();
    }
}
