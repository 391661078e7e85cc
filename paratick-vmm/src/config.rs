//! What a VM runs, validated before anything is created.

use std::time::Duration;

use strum::VariantArray;

use paratick_common::abi::{
    HOUSEKEEPING_RATE_DEFAULT_HZ, HOUSEKEEPING_RATE_MIN_HZ, TICK_RATE_MAX_HZ, TICK_RATE_MIN_HZ,
};
use paratick_common::guest::{TickMode, Workload, MAX_VCPUS};

/// How much work the guest does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WorkAmount {
    /// Work for this many seconds of guest time (throughput runs).
    Seconds(f64),
    /// Do this many work units (execution-time runs).
    Units(u64),
}

/// How paratick ticks reach the guest (see the injector module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "kebab-case")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum TickDelivery {
    /// An MSI from the injector thread, which follows the guest's tick page; due ticks
    /// ride on userspace exits where they can.
    Msi,
    /// The vCPU's LAPIC timer, programmed by the VMM in periodic mode at the scheduler
    /// rate and laid on the host tick's instants.
    LapicTimer,
    /// Only on userspace exits that happen anyway (no injector thread, no kick).
    Ride,
}

impl TickDelivery {
    /// Name on command lines, in configuration and reports.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// Parses a delivery method name.
///
/// ```
/// use paratick_vmm::{parse_delivery, TickDelivery};
///
/// assert_eq!(parse_delivery("lapic-timer").unwrap(), TickDelivery::LapicTimer);
/// assert_eq!(parse_delivery("pigeon").unwrap_err().to_string(), "unknown tick delivery \"pigeon\": use msi, lapic-timer or ride");
/// ```
pub fn parse_delivery(name: &str) -> Result<TickDelivery, ConfigError> {
    name.parse().map_err(|_| ConfigError::Delivery(name.to_string()))
}

/// "a, b or c": the names of `choices`, for an error that lists them.
fn one_of<T: Copy + Into<&'static str>>(choices: &[T]) -> String {
    let names: Vec<&str> = choices.iter().map(|&c| c.into()).collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Longest run accepted, in seconds (a week: daemon VMs run long).
pub const MAX_RUN_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// A VM to run.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Name (for logs and reports).
    pub name: String,
    /// vCPUs (1 to 8).
    pub vcpus: u32,
    /// The guest's tick mode.
    pub mode: TickMode,
    /// The guest's tick rate, in Hz.
    pub hz: u32,
    /// What the guest runs.
    pub workload: Workload,
    /// How much of it.
    pub amount: WorkAmount,
    /// The operator's tick rate for the VM, if set (overrides the guest's requests).
    pub operator_hz: Option<u32>,
    /// Paratick guests: the rate a vCPU asks for while it does not need its scheduler
    /// tick (one runnable task, no sleeper), in Hz (1 to `hz`).
    pub housekeeping_hz: u32,
    /// How paratick ticks are delivered.
    pub delivery: TickDelivery,
    /// Give up (and stop the VM) if the guest has not finished after this long.
    pub deadline: Duration,
    /// Create the VM but let its vCPUs run only at `Vm::resume` (so that the caller can
    /// first register the VM's threads, e.g. with the observer).
    pub start_paused: bool,
}

/// An invalid setting; each names the setting and the accepted values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("vcpus must be 1 to {max}, not {0}", max = MAX_VCPUS)]
    Vcpus(u32),
    /// Guest tick rate out of range.
    #[error("hz must be {TICK_RATE_MIN_HZ} to {TICK_RATE_MAX_HZ}, not {0}")]
    Hz(u32),
    /// Housekeeping rate out of range.
    #[error("housekeeping_hz must be {HOUSEKEEPING_RATE_MIN_HZ} to hz ({hz}), not {value}")]
    Housekeeping {
        /// The value given.
        value: u32,
        /// The guest's tick rate.
        hz: u32,
    },
    /// Unknown delivery method name.
    #[error("unknown tick delivery {0:?}: use {choices}", choices = one_of(TickDelivery::VARIANTS))]
    Delivery(String),
    /// Operator tick rate out of range.
    #[error("the tick rate must be {TICK_RATE_MIN_HZ} to {TICK_RATE_MAX_HZ} Hz, not {0}")]
    TickRate(u32),
    /// No work, or too much.
    #[error("the work must be 1 or more units, or a duration above 0 and up to {MAX_RUN_SECONDS} s")]
    Amount,
    /// Unknown tick mode name.
    #[error("unknown tick mode {0:?}: use {choices}", choices = one_of(TickMode::VARIANTS))]
    Mode(String),
    /// Unknown workload name.
    #[error("unknown workload {0:?}: use {choices}", choices = one_of(&Workload::EVALUATED))]
    Workload(String),
    /// Empty name.
    #[error("a VM needs a name")]
    Name,
}

impl VmConfig {
    /// A configuration with the default deadline and no operator rate.
    ///
    /// ```
    /// use paratick_common::guest::{TickMode, Workload};
    /// use paratick_vmm::{ConfigError, VmConfig, WorkAmount};
    ///
    /// let config = VmConfig::new("web", 2, TickMode::Paratick, 250, Workload::Io, WorkAmount::Seconds(10.0));
    /// assert_eq!(config.validate(), Ok(()));
    /// // Every setting is checked, and the error says what is wrong.
    /// let fast = VmConfig { hz: 5, ..config.clone() };
    /// assert_eq!(fast.validate(), Err(ConfigError::Hz(5)));
    /// assert_eq!(fast.validate().unwrap_err().to_string(), "hz must be 10 to 4000, not 5");
    /// ```
    pub fn new(name: &str, vcpus: u32, mode: TickMode, hz: u32, workload: Workload, amount: WorkAmount) -> VmConfig {
        let deadline = match amount {
            WorkAmount::Seconds(seconds) => Duration::from_secs_f64(seconds.clamp(0.0, MAX_RUN_SECONDS) + 60.0),
            WorkAmount::Units(_) => Duration::from_secs(600),
        };
        VmConfig {
            name: name.to_string(),
            vcpus,
            mode,
            hz,
            workload,
            amount,
            operator_hz: None,
            housekeeping_hz: HOUSEKEEPING_RATE_DEFAULT_HZ,
            delivery: TickDelivery::Msi,
            deadline,
            start_paused: false,
        }
    }

    /// Checks every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::Name);
        }
        if self.vcpus == 0 || self.vcpus as usize > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        check_rate(self.hz).map_err(|_| ConfigError::Hz(self.hz))?;
        if let Some(hz) = self.operator_hz {
            check_rate(hz)?;
        }
        if !(HOUSEKEEPING_RATE_MIN_HZ..=self.hz).contains(&self.housekeeping_hz) {
            return Err(ConfigError::Housekeeping { value: self.housekeeping_hz, hz: self.hz });
        }
        match self.amount {
            WorkAmount::Seconds(s) if s > 0.0 && s <= MAX_RUN_SECONDS => Ok(()),
            WorkAmount::Units(units) if units > 0 => Ok(()),
            _ => Err(ConfigError::Amount),
        }
    }
}

/// Checks an operator tick rate.
pub fn check_rate(hz: u32) -> Result<u32, ConfigError> {
    if (TICK_RATE_MIN_HZ..=TICK_RATE_MAX_HZ).contains(&hz) {
        Ok(hz)
    } else {
        Err(ConfigError::TickRate(hz))
    }
}

/// Parses a tick mode name.
///
/// ```
/// use paratick_common::guest::TickMode;
/// use paratick_vmm::parse_tick_mode;
///
/// assert_eq!(parse_tick_mode("tickless-full").unwrap(), TickMode::TicklessFull);
/// assert!(parse_tick_mode("turbo").unwrap_err().to_string().starts_with("unknown tick mode \"turbo\""));
/// ```
pub fn parse_tick_mode(name: &str) -> Result<TickMode, ConfigError> {
    name.parse().map_err(|_| ConfigError::Mode(name.to_string()))
}

/// Parses a workload name (the evaluated ones, plus the test workloads by name).
pub fn parse_workload(name: &str) -> Result<Workload, ConfigError> {
    name.parse().map_err(|_| ConfigError::Workload(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig::new("t", 2, TickMode::Paratick, 250, Workload::Io, WorkAmount::Seconds(1.0))
    }

    #[test]
    fn every_bad_setting_is_named() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(VmConfig { vcpus: 0, ..config() }.validate(), Err(ConfigError::Vcpus(0)));
        assert_eq!(VmConfig { vcpus: 9, ..config() }.validate(), Err(ConfigError::Vcpus(9)));
        assert_eq!(VmConfig { hz: 5, ..config() }.validate(), Err(ConfigError::Hz(5)));
        assert_eq!(VmConfig { hz: 4001, ..config() }.validate(), Err(ConfigError::Hz(4001)));
        assert_eq!(VmConfig { operator_hz: Some(0), ..config() }.validate(), Err(ConfigError::TickRate(0)));
        assert_eq!(VmConfig { amount: WorkAmount::Units(0), ..config() }.validate(), Err(ConfigError::Amount));
        assert_eq!(VmConfig { amount: WorkAmount::Seconds(-1.0), ..config() }.validate(), Err(ConfigError::Amount));
        assert_eq!(VmConfig { amount: WorkAmount::Seconds(f64::NAN), ..config() }.validate(), Err(ConfigError::Amount));
        assert_eq!(VmConfig { name: " ".into(), ..config() }.validate(), Err(ConfigError::Name));
        assert_eq!(
            VmConfig { housekeeping_hz: 0, ..config() }.validate(),
            Err(ConfigError::Housekeeping { value: 0, hz: 250 })
        );
        assert_eq!(
            VmConfig { housekeeping_hz: 251, ..config() }.validate().unwrap_err().to_string(),
            "housekeeping_hz must be 1 to hz (250), not 251"
        );
        assert_eq!(VmConfig { housekeeping_hz: 250, ..config() }.validate(), Ok(()));
        assert_eq!(ConfigError::TickRate(5000).to_string(), "the tick rate must be 10 to 4000 Hz, not 5000");
    }

    #[test]
    fn names_parse_and_unknown_ones_list_the_choices() {
        assert_eq!(parse_tick_mode("tickless"), Ok(TickMode::Tickless));
        assert_eq!(parse_workload("multithreaded"), Ok(Workload::Multithreaded));
        assert_eq!(parse_workload("bad-requests"), Ok(Workload::BadRequests));
        assert_eq!(
            parse_tick_mode("hz").unwrap_err().to_string(),
            "unknown tick mode \"hz\": use periodic, tickless, paratick, tickless-full or no-timer"
        );
        assert_eq!(parse_tick_mode("no-timer"), Ok(TickMode::NoTimer));
        assert_eq!(parse_delivery("lapic-timer"), Ok(TickDelivery::LapicTimer));
        assert_eq!(
            parse_delivery("irq").unwrap_err().to_string(),
            "unknown tick delivery \"irq\": use msi, lapic-timer or ride"
        );
        assert!(parse_workload("").is_err());
    }
}
