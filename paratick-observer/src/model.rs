//! The one exits model: what a VM's timekeeping costs in KVM exits on this host's
//! backend, and what paratick saves. `observe` uses it for any VM's timer report, the
//! daemon for its VMs' exits saved, the bench calibrates it.
//!
//! A guest's timekeeping costs exits through its timer interrupts (the expiry makes the
//! vCPU leave guest mode; on PVM the injection costs a second exit) and through its
//! timer programming (a TSC-deadline MSR or LAPIC register write: an MSR_WRITE or APIC
//! exit on VMX/SVM; on PVM the write costs no exit of its own). A tick paratick injects
//! into a running vCPU costs the kick (none with posted interrupts, VMX with APICv),
//! unless it rode on an exit that happened anyway.
//!
//! The coefficients are per backend. On the host where `paratick-ctl bench` ran they are
//! calibrated from its measurements (no-timer floor, tickless and paratick runs of the
//! same work) and stored in [`DEFAULT_MODEL_FILE`]; elsewhere they are the built-in
//! defaults, named as such in every report.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where `bench` stores the calibrated model, and `observe` and the daemon read it.
pub const DEFAULT_MODEL_FILE: &str = "/var/lib/paratick/timer-model.json";

/// The backend the model is for: [`crate::backend::Backend`], with VMX split by
/// whether APICv (posted interrupts) is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum ModelBackend {
    /// PVM: guest CPL0 code emulated, no hardware virtualization.
    Pvm,
    /// VMX without APICv.
    Vmx,
    /// VMX with APICv.
    VmxApicv,
    /// SVM.
    Svm,
    /// Unknown: the VMX figures, as the most common.
    Unknown,
}

impl ModelBackend {
    /// Name in reports and model files.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// This host's.
    pub fn of_host() -> ModelBackend {
        use crate::backend::Backend;
        match Backend::of_host() {
            Backend::Pvm => ModelBackend::Pvm,
            Backend::Svm => ModelBackend::Svm,
            Backend::Vmx => {
                let apicv = std::fs::read_to_string("/sys/module/kvm_intel/parameters/enable_apicv")
                    .is_ok_and(|v| v.trim() == "Y" || v.trim() == "1");
                if apicv {
                    ModelBackend::VmxApicv
                } else {
                    ModelBackend::Vmx
                }
            }
            Backend::Unknown => ModelBackend::Unknown,
        }
    }
}

/// The exits model's coefficients, for one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerModel {
    /// `pvm`, `vmx`, `vmx-apicv`, `svm` or `unknown`.
    pub backend: String,
    /// KVM exits per guest timer interrupt.
    pub exits_per_timer_interrupt: f64,
    /// KVM exits per guest timer programming (TSC-deadline or LAPIC timer write).
    pub exits_per_timer_write: f64,
    /// KVM exits per tick paratick injects into a running vCPU (not ridden).
    pub exits_per_injected_tick: f64,
    /// Guest time a tick costs a vCPU (its handler and exits; long on PVM, where the
    /// guest's CPL0 code is emulated): a tickless guest needs that much longer for the
    /// same work, and takes the host's own exits meanwhile.
    pub guest_seconds_per_tick: f64,
    /// Exits a busy vCPU takes per second without any guest timer (the host's tick and
    /// other housekeeping: the no-timer floor).
    pub floor_exits_per_s: f64,
    /// Fraction of a tickless guest's timer exits that paratick removes for the same
    /// work (the projection for VMs that do not run paratick).
    pub paratick_removed_fraction: f64,
    /// Where the figures come from: `default` (built in), `calibrated` (by `paratick-ctl
    /// bench` on this host) or `measured` (by the daemon on its own VMs,
    /// [`TimerModel::measured_on`]).
    pub source: String,
    /// How they were obtained.
    pub note: String,
}

impl TimerModel {
    /// The built-in coefficients of a backend: measured on PVM; on VMX and SVM, which
    /// trap the same timer events, one exit per event.
    pub fn default_for(backend: ModelBackend) -> TimerModel {
        let trapping = |note: &str| TimerModel {
            backend: backend.name().into(),
            exits_per_timer_interrupt: 1.0,
            exits_per_timer_write: 1.0,
            exits_per_injected_tick: 1.0,
            guest_seconds_per_tick: 5e-6,
            floor_exits_per_s: 250.0,
            paratick_removed_fraction: 0.9,
            source: "default".into(),
            note: format!("not measured here: {note}"),
        };
        match backend {
            ModelBackend::Pvm => TimerModel {
                exits_per_timer_interrupt: 2.0,
                exits_per_timer_write: 0.0,
                exits_per_injected_tick: 2.0,
                guest_seconds_per_tick: 275e-6,
                floor_exits_per_s: 330.0,
                paratick_removed_fraction: 0.97,
                note: "measured on PVM hosts (HZ=250) with the paratick guest, same work with and without a timer \
                       (docs/evaluation.md): 2 exits per tick (expiry, injection), 275 us of guest time per tick, \
                       330 floor exits/s per busy vCPU, 94-100% of a tickless guest's timer exits removed"
                    .into(),
                ..trapping("")
            },
            ModelBackend::Vmx | ModelBackend::Unknown => trapping(
                "one exit per expiry (EXTERNAL_INTERRUPT or PREEMPTION_TIMER), one per TSC-deadline write \
                 (MSR_WRITE), one per kick",
            ),
            ModelBackend::VmxApicv => TimerModel {
                exits_per_injected_tick: 0.0,
                paratick_removed_fraction: 0.95,
                ..trapping("as VMX, but an injected tick is a posted interrupt, with no exit")
            },
            ModelBackend::Svm => trapping("one exit per expiry (INTR), one per TSC-deadline write (MSR), one per kick"),
        }
    }

    /// The model of `backend`: the calibrated one in `file` if there is one for this
    /// backend, else the default. A file that cannot be used is reported, not fatal.
    pub fn load(file: &Path, backend: ModelBackend) -> (TimerModel, Option<String>) {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (TimerModel::default_for(backend), None),
            Err(e) => {
                let why = format!("cannot read {}: {e}; using the default model", file.display());
                return (TimerModel::default_for(backend), Some(why));
            }
        };
        match serde_json::from_str::<TimerModel>(&text).map_err(|e| e.to_string()).and_then(TimerModel::checked) {
            Ok(model) if model.backend == backend.name() => (model, None),
            Ok(model) => {
                let why = format!(
                    "{} was calibrated on a {} host, this one is {}; using the default model",
                    file.display(),
                    model.backend,
                    backend.name()
                );
                (TimerModel::default_for(backend), Some(why))
            }
            Err(e) => {
                let why = format!("{} is not a timer model ({e}); using the default model", file.display());
                (TimerModel::default_for(backend), Some(why))
            }
        }
    }

    /// The model if its coefficients make sense.
    pub fn checked(self) -> Result<TimerModel, String> {
        let coefficients = [self.exits_per_timer_interrupt, self.exits_per_timer_write, self.exits_per_injected_tick];
        if coefficients.iter().any(|c| !c.is_finite() || !(0.0..=10.0).contains(c)) {
            return Err("exits per event must be 0 to 10".into());
        }
        if !(0.0..=0.01).contains(&self.guest_seconds_per_tick) || !(0.0..=100_000.0).contains(&self.floor_exits_per_s)
        {
            return Err("guest_seconds_per_tick must be 0 to 0.01, floor_exits_per_s 0 to 100000".into());
        }
        if !(0.0..=1.0).contains(&self.paratick_removed_fraction) {
            return Err("paratick_removed_fraction must be 0 to 1".into());
        }
        Ok(self)
    }

    /// Exits one timer interrupt costs all told: its own, and the host's floor exits
    /// during the guest time it takes.
    fn exits_per_tick(&self) -> f64 {
        self.exits_per_timer_interrupt + self.floor_exits_per_s * self.guest_seconds_per_tick
    }

    /// Exits a guest's timekeeping cost: its timer interrupts and timer programming.
    pub fn timer_exits(&self, timer_interrupts: u64, timer_writes: u64) -> f64 {
        timer_interrupts as f64 * self.exits_per_tick() + timer_writes as f64 * self.exits_per_timer_write
    }

    /// Exits paratick would save a guest whose timekeeping cost `timer_exits`, for the
    /// same work (a projection).
    pub fn projected_exits_saved(&self, timer_exits: f64) -> f64 {
        timer_exits * self.paratick_removed_fraction
    }

    /// Exits a paratick guest saved against a tickless guest doing the same work. Each
    /// vCPU was busy `busy_s` seconds with a scheduler rate of `hz`: a tickless guest
    /// would have taken a tick per period, over that time and the time its ticks take
    /// (`busy_s / (1 − hz × seconds per tick)`), each an interrupt and a re-arm, and
    /// re-programmed its timer twice per idle period (stop on idle, re-arm on wake-up);
    /// paratick paid `kicks` injected ticks instead.
    pub fn paratick_exits_saved(&self, busy: &[(f64, u32)], idle_periods: u64, kicks: u64) -> f64 {
        self.tickless_timer_exits(busy, idle_periods) - kicks as f64 * self.exits_per_injected_tick
    }

    /// The timer exits a tickless guest would have taken for the same work (see
    /// [`TimerModel::paratick_exits_saved`]): what the projected savings are taken from.
    pub fn tickless_timer_exits(&self, busy: &[(f64, u32)], idle_periods: u64) -> f64 {
        let tickless_ticks: f64 = busy
            .iter()
            .map(|&(busy_s, hz)| {
                let hz = f64::from(hz);
                busy_s * hz / (1.0 - hz * self.guest_seconds_per_tick).max(0.2)
            })
            .sum();
        tickless_ticks * (self.exits_per_tick() + self.exits_per_timer_write)
            + 2.0 * idle_periods as f64 * self.exits_per_timer_write
    }
}

impl TimerModel {
    /// Exits one of our paratick VMs saved so far, from its counters (0 for a guest
    /// that never asked the host for ticks: periodic and tickless guests).
    pub fn exits_saved(&self, counters: &paratick_vmm::Counters) -> u64 {
        if counters.tick_requests == 0 {
            return 0;
        }
        let busy = Self::busy(counters);
        self.paratick_exits_saved(&busy, counters.kvm_stats.halt_exits, counters.kicks()).max(0.0) as u64
    }

    /// This model with its exits per timer interrupt measured on tickless VMs of ours
    /// (`tickless`: their counters), where they took enough ticks: what a tick costs
    /// here, now, for this guest kernel. (On an emulating host it varies with the guest
    /// tick's phase against the host's own tick, from about 1 exit to 2, so a live
    /// figure beats a stored one.) The floor comes from paratick VMs (`paratick`) where
    /// they ran long enough: what a busy vCPU takes beyond its kicks, per second.
    pub fn measured_on<'a>(
        &self,
        paratick: impl Iterator<Item = &'a paratick_vmm::Counters>,
        tickless: impl Iterator<Item = &'a paratick_vmm::Counters>,
    ) -> TimerModel {
        const ENOUGH_TICKS: u64 = 200;
        const ENOUGH_BUSY_S: f64 = 1.0;
        let (mut floor_exits, mut floor_busy) = (0.0, 0.0);
        for counters in paratick {
            floor_exits += counters.kvm_stats.exits as f64
                - counters.kicks() as f64 * self.exits_per_injected_tick
                - counters.tick_requests as f64;
            floor_busy += counters.guest_busy_s.iter().sum::<f64>();
        }
        let floor = if floor_busy >= ENOUGH_BUSY_S && floor_exits > 0.0 {
            floor_exits / floor_busy
        } else {
            self.floor_exits_per_s
        };
        let (mut exits, mut ticks) = (0.0, 0u64);
        for counters in tickless {
            let busy_s: f64 = counters.guest_busy_s.iter().sum();
            exits += counters.kvm_stats.exits as f64 - floor * busy_s;
            ticks += counters.guest_ticks.total - counters.guest_idle_ticks.total;
        }
        if ticks < ENOUGH_TICKS || exits <= 0.0 {
            return self.clone();
        }
        TimerModel {
            exits_per_timer_interrupt: (exits / ticks as f64).clamp(0.0, 10.0),
            floor_exits_per_s: floor,
            source: "measured".into(),
            note: format!(
                "exits per timer interrupt measured on this daemon's tickless VMs ({ticks} busy ticks), the floor on its \
                 paratick VMs where they ran long enough; the rest: {} ({})",
                self.source, self.note
            ),
            ..self.clone()
        }
    }

    /// What [`TimerModel::exits_saved`] is taken from: the timer exits a tickless guest
    /// would have taken for what one of our VMs did so far.
    pub fn tickless_timer_exits_of(&self, counters: &paratick_vmm::Counters) -> f64 {
        self.tickless_timer_exits(&Self::busy(counters), counters.kvm_stats.halt_exits)
    }

    /// Each vCPU's busy time and the rate it ticked at.
    fn busy(counters: &paratick_vmm::Counters) -> Vec<(f64, u32)> {
        counters.guest_busy_s.iter().copied().zip(counters.effective_hz.iter().copied()).collect()
    }
}

/// One run of the same work, as the calibration needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationRun {
    /// KVM exits.
    pub exits: u64,
    /// Guest time the work took, in seconds.
    pub elapsed_s: f64,
    /// Timer interrupts the guest took.
    pub timer_interrupts: u64,
    /// Timer programming writes.
    pub timer_writes: u64,
}

/// A model of `backend` calibrated from pairs of runs of the same work on one busy
/// vCPU, without a timer (`floor`) and tickless, plus the measured exits per injected
/// tick and paratick's removed fraction where the bench has them. The write
/// coefficient stays the backend's (writes and expiries come in pairs: they cannot be
/// told apart). `None` without a usable pair.
pub fn calibrate(
    backend: ModelBackend,
    pairs: &[(CalibrationRun, CalibrationRun)],
    exits_per_injected_tick: Option<f64>,
    removed_fraction: Option<f64>,
    note: String,
) -> Option<TimerModel> {
    let default = TimerModel::default_for(backend);
    let median = |mut values: Vec<f64>| -> Option<f64> {
        values.retain(|v| v.is_finite());
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    };
    let usable: Vec<&(CalibrationRun, CalibrationRun)> =
        pairs.iter().filter(|(floor, tickless)| floor.elapsed_s > 0.0 && tickless.timer_interrupts > 0).collect();
    let floor_exits_per_s = median(usable.iter().map(|(floor, _)| floor.exits as f64 / floor.elapsed_s).collect())?;
    let seconds_per_tick = median(
        usable
            .iter()
            .map(|(floor, tickless)| (tickless.elapsed_s - floor.elapsed_s).max(0.0) / tickless.timer_interrupts as f64)
            .collect(),
    )?;
    let per_interrupt = median(
        usable
            .iter()
            .map(|(_, t)| {
                (t.exits as f64
                    - floor_exits_per_s * t.elapsed_s
                    - default.exits_per_timer_write * t.timer_writes as f64)
                    / t.timer_interrupts as f64
            })
            .collect(),
    )?;
    TimerModel {
        backend: backend.name().into(),
        exits_per_timer_interrupt: per_interrupt.max(0.0),
        exits_per_timer_write: default.exits_per_timer_write,
        exits_per_injected_tick: exits_per_injected_tick.unwrap_or(default.exits_per_injected_tick),
        guest_seconds_per_tick: seconds_per_tick,
        floor_exits_per_s,
        paratick_removed_fraction: removed_fraction.map_or(default.paratick_removed_fraction, |f| f.clamp(0.0, 1.0)),
        source: "calibrated".into(),
        note,
    }
    .checked()
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_counts_what_each_backend_charges() {
        let bare = |backend| TimerModel {
            guest_seconds_per_tick: 0.0,
            floor_exits_per_s: 0.0,
            ..TimerModel::default_for(backend)
        };
        let pvm = bare(ModelBackend::Pvm);
        assert_eq!(pvm.timer_exits(100, 100), 200.0, "PVM: the write costs no exit of its own");
        let vmx = bare(ModelBackend::Vmx);
        assert_eq!(vmx.timer_exits(100, 100), 200.0, "VMX: an expiry and a write per tick");
        // 4 s busy at 250 Hz: 1000 ticks.
        assert_eq!(vmx.paratick_exits_saved(&[(4.0, 250)], 10, 100), 2000.0 + 20.0 - 100.0);
        assert_eq!(pvm.paratick_exits_saved(&[(2.0, 250), (2.0, 250)], 10, 100), 2000.0 - 200.0);
        let apicv = bare(ModelBackend::VmxApicv);
        assert_eq!(apicv.paratick_exits_saved(&[(4.0, 250)], 0, 100), 2000.0, "posted interrupts: kicks are free");
        assert_eq!(pvm.projected_exits_saved(1000.0), 970.0);
        // The time ticks take: 1 ms each at 250 Hz is a quarter of the time, so a tickless
        // guest needs 4/3 as long (and as many ticks), each with 0.1 floor exits besides.
        let slow = TimerModel { guest_seconds_per_tick: 1e-3, floor_exits_per_s: 100.0, ..pvm };
        let saved = slow.paratick_exits_saved(&[(3.0, 250)], 0, 0);
        assert!((saved - 1000.0 * 2.1).abs() < 1e-6, "{saved}");
        assert!((slow.timer_exits(10, 0) - 21.0).abs() < 1e-9);
    }

    #[test]
    fn calibration_recovers_the_coefficients_of_runs_that_follow_them() {
        // A host where a tick costs 2 exits and 300 us, with 330 floor exits/s.
        let floor = CalibrationRun { exits: 330, elapsed_s: 1.0, timer_interrupts: 0, timer_writes: 0 };
        let ticks: f64 = 250.0 / (1.0 - 250.0 * 300e-6);
        let elapsed = ticks / 250.0;
        let tickless = CalibrationRun {
            exits: (330.0 * elapsed + 2.0 * ticks).round() as u64,
            elapsed_s: elapsed,
            timer_interrupts: ticks.round() as u64,
            timer_writes: ticks.round() as u64,
        };
        let model = calibrate(ModelBackend::Pvm, &[(floor, tickless)], Some(1.5), Some(0.93), "test".into()).unwrap();
        assert!((model.floor_exits_per_s - 330.0).abs() < 1e-9);
        assert!((model.guest_seconds_per_tick - 300e-6).abs() < 2e-6, "{model:?}");
        assert!((model.exits_per_timer_interrupt - 2.0).abs() < 0.01, "{model:?}");
        assert_eq!((model.exits_per_injected_tick, model.paratick_removed_fraction), (1.5, 0.93));
        assert_eq!(model.source, "calibrated");
        assert_eq!(calibrate(ModelBackend::Pvm, &[], None, None, String::new()), None);
    }

    #[test]
    fn a_calibrated_file_is_used_only_for_its_backend_and_only_when_sane() {
        let dir = std::env::temp_dir().join(format!("paratick-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("model.json");
        assert_eq!(TimerModel::load(&file, ModelBackend::Pvm), (TimerModel::default_for(ModelBackend::Pvm), None));
        let calibrated = TimerModel {
            exits_per_timer_interrupt: 1.9,
            source: "calibrated".into(),
            ..TimerModel::default_for(ModelBackend::Pvm)
        };
        std::fs::write(&file, serde_json::to_string(&calibrated).unwrap()).unwrap();
        assert_eq!(TimerModel::load(&file, ModelBackend::Pvm), (calibrated.clone(), None));
        let (model, why) = TimerModel::load(&file, ModelBackend::Svm);
        assert_eq!(model.source, "default");
        assert!(why.unwrap().contains("calibrated on a pvm host, this one is svm"));
        let insane = TimerModel { paratick_removed_fraction: 3.0, ..calibrated };
        std::fs::write(&file, serde_json::to_string(&insane).unwrap()).unwrap();
        assert!(TimerModel::load(&file, ModelBackend::Pvm).1.unwrap().contains("must be 0 to 1"));
        std::fs::write(&file, "{").unwrap();
        assert!(TimerModel::load(&file, ModelBackend::Pvm).1.unwrap().contains("is not a timer model"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
