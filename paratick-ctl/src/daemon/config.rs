//! The daemon's TOML configuration (see packaging/paratick.toml, also the embedded
//! default). Unknown keys and bad values are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use paratick_vmm::control::DEFAULT_RUNTIME_DIR as VM_UNIT_RUNTIME_DIR;
use paratick_vmm::{parse_delivery, parse_tick_mode, parse_workload, VmConfig, WorkAmount};
use serde::Deserialize;

use super::supervisor::VmLauncher;

/// The default configuration, embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../../../packaging/paratick.toml");

/// Default run time of a daemon VM.
const DEFAULT_VM_DURATION: &str = "24h";

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    metrics_listen: Option<String>,
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    vm_launcher: Option<String>,
    timer_model: Option<PathBuf>,
    #[serde(default, rename = "vm")]
    vms: Vec<RawVm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    vcpus: Option<u32>,
    mode: String,
    hz: Option<u32>,
    workload: String,
    duration: Option<String>,
    work: Option<u64>,
    tick_rate: Option<u32>,
    housekeeping_hz: Option<u32>,
    delivery: Option<String>,
    autostart: Option<bool>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// Metrics HTTP listen address.
    pub metrics_listen: SocketAddr,
    /// Control socket path.
    pub socket: PathBuf,
    /// Group allowed on the control socket besides root.
    pub socket_group: Option<String>,
    /// How VM processes are started; `None`: detected (`auto`).
    pub vm_launcher: Option<VmLauncher>,
    /// The calibrated exits model (written by `bench`), if there is one.
    pub timer_model: PathBuf,
    /// The VMs.
    pub vms: Vec<VmEntry>,
}

/// One `[[vm]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct VmEntry {
    /// What to run.
    pub config: VmConfig,
    /// Whether to start it with the daemon.
    pub autostart: bool,
}

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type (toml names the key).
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// A bad value.
    #[error("{key}: {message}")]
    Value {
        /// The key, e.g. `vm[1].hz`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn value_error(key: impl Into<String>, message: impl ToString) -> ConfigError {
    ConfigError::Value { key: key.into(), message: message.to_string() }
}

impl DaemonConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        DaemonConfig::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        let metrics_listen = raw.metrics_listen.as_deref().unwrap_or("127.0.0.1:9477");
        let metrics_listen = metrics_listen
            .parse()
            .map_err(|_| value_error("metrics_listen", format!("{metrics_listen:?} is not an address:port")))?;
        let socket = raw.socket.unwrap_or_else(|| PathBuf::from(crate::client::DEFAULT_SOCKET));
        if !socket.is_absolute() {
            return Err(value_error("socket", "must be an absolute path"));
        }
        let mut vms: Vec<VmEntry> = Vec::new();
        for (index, vm) in raw.vms.into_iter().enumerate() {
            let key = |field: &str| format!("vm[{index}].{field}");
            let entry = vm_entry(vm, &key)?;
            if vms.iter().any(|other| other.config.name == entry.config.name) {
                return Err(value_error(key("name"), format!("{:?} is used by another VM", entry.config.name)));
            }
            vms.push(entry);
        }
        let vm_launcher = match raw.vm_launcher.as_deref() {
            None | Some("auto") => None,
            Some(name) => Some(name.parse::<VmLauncher>().map_err(|_| {
                value_error("vm_launcher", format!("{name:?} is not a launcher: use auto, systemd or process"))
            })?),
        };
        if vm_launcher == Some(VmLauncher::Systemd) && socket.parent() != Path::new(VM_UNIT_RUNTIME_DIR).parent() {
            return Err(value_error(
                "vm_launcher",
                format!("systemd VM units keep their sockets in {VM_UNIT_RUNTIME_DIR}: use the default socket"),
            ));
        }
        let timer_model = raw.timer_model.unwrap_or_else(|| PathBuf::from(crate::model::DEFAULT_MODEL_FILE));
        Ok(DaemonConfig { metrics_listen, socket, socket_group: raw.socket_group, vm_launcher, timer_model, vms })
    }

    /// Where the VM processes keep their sockets and end records: `vms/` beside the
    /// control socket.
    pub fn vm_runtime_dir(&self) -> PathBuf {
        self.socket.parent().unwrap_or(Path::new("/")).join("vms")
    }
}

fn vm_entry(vm: RawVm, key: &dyn Fn(&str) -> String) -> Result<VmEntry, ConfigError> {
    if vm.name.is_empty()
        || vm.name.len() > 64
        || !vm.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(value_error(key("name"), "use 1 to 64 letters, digits, '-' and '_' only"));
    }
    let mode = parse_tick_mode(&vm.mode).map_err(|e| value_error(key("mode"), e))?;
    let workload = parse_workload(&vm.workload).map_err(|e| value_error(key("workload"), e))?;
    let amount = match (vm.duration, vm.work) {
        (Some(_), Some(_)) => return Err(value_error(key("work"), "give duration or work, not both")),
        (None, Some(units)) => WorkAmount::Units(units),
        (duration, None) => {
            let text = duration.unwrap_or_else(|| DEFAULT_VM_DURATION.to_string());
            let duration = humantime::parse_duration(&text).map_err(|e| value_error(key("duration"), e))?;
            WorkAmount::Seconds(duration.as_secs_f64())
        }
    };
    let mut config = VmConfig::new(
        &vm.name,
        vm.vcpus.unwrap_or(1),
        mode,
        vm.hz.unwrap_or(paratick_common::abi::TICK_RATE_DEFAULT_HZ),
        workload,
        amount,
    );
    config.operator_hz = vm.tick_rate;
    if let Some(hz) = vm.housekeeping_hz {
        config.housekeeping_hz = hz;
    }
    if let Some(delivery) = &vm.delivery {
        config.delivery = parse_delivery(delivery).map_err(|e| value_error(key("delivery"), e))?;
    }
    config.validate().map_err(|e| {
        let field = match e {
            paratick_vmm::ConfigError::Vcpus(_) => "vcpus",
            paratick_vmm::ConfigError::Hz(_) => "hz",
            paratick_vmm::ConfigError::TickRate(_) => "tick_rate",
            paratick_vmm::ConfigError::Housekeeping { .. } => "housekeeping_hz",
            paratick_vmm::ConfigError::Amount => "duration",
            _ => "name",
        };
        value_error(key(field), e)
    })?;
    Ok(VmEntry { config, autostart: vm.autostart.unwrap_or(true) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid_and_runs_a_tickless_and_a_paratick_vm() {
        let config = DaemonConfig::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(config.metrics_listen, "127.0.0.1:9477".parse().unwrap());
        assert_eq!(config.socket, PathBuf::from("/run/paratick/paratick.sock"));
        let modes: Vec<_> = config.vms.iter().map(|v| (v.config.name.as_str(), v.config.mode.name())).collect();
        assert_eq!(modes, [("tickless", "tickless"), ("paratick", "paratick")]);
        assert!(config.vms.iter().all(|v| v.autostart && v.config.amount == WorkAmount::Seconds(86400.0)));
    }

    fn error_of(text: &str) -> String {
        DaemonConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        assert!(error_of("metrics_port = 1\n").contains("unknown field `metrics_port`"));
        assert!(error_of("[[vm]]\nname = \"a\"\nmode = \"paratick\"\nworkload = \"io\"\ncolour = 1\n")
            .contains("unknown field `colour`"));
        assert_eq!(
            error_of("metrics_listen = \"localhost\"\n"),
            "metrics_listen: \"localhost\" is not an address:port"
        );
        assert_eq!(error_of("socket = \"x.sock\"\n"), "socket: must be an absolute path");
        assert_eq!(
            error_of("vm_launcher = \"docker\"\n"),
            "vm_launcher: \"docker\" is not a launcher: use auto, systemd or process"
        );
        assert_eq!(
            error_of("vm_launcher = \"systemd\"\nsocket = \"/tmp/p.sock\"\n"),
            "vm_launcher: systemd VM units keep their sockets in /run/paratick/vms: use the default socket"
        );
        let config = DaemonConfig::parse("vm_launcher = \"process\"\nsocket = \"/tmp/x/p.sock\"\n").unwrap();
        assert_eq!((config.vm_launcher, config.vm_runtime_dir()), (Some(VmLauncher::Process), "/tmp/x/vms".into()));
        assert_eq!(DaemonConfig::parse("vm_launcher = \"auto\"\n").unwrap().vm_launcher, None);
        let vm = |extra: &str| format!("[[vm]]\nname = \"a\"\nmode = \"paratick\"\nworkload = \"io\"\n{extra}");
        assert_eq!(error_of(&vm("hz = 5\n")), "vm[0].hz: hz must be 10 to 4000, not 5");
        assert_eq!(error_of(&vm("vcpus = 0\n")), "vm[0].vcpus: vcpus must be 1 to 8, not 0");
        assert_eq!(
            error_of(&vm("tick_rate = 9000\n")),
            "vm[0].tick_rate: the tick rate must be 10 to 4000 Hz, not 9000"
        );
        assert!(error_of(&vm("duration = \"soon\"\n")).starts_with("vm[0].duration: "));
        assert_eq!(error_of(&vm("duration = \"1s\"\nwork = 5\n")), "vm[0].work: give duration or work, not both");
        assert!(error_of(&vm("hz = \"fast\"\n")).contains("invalid type"));
        assert!(error_of(&vm("").replace("paratick", "turbo")).starts_with("vm[0].mode: unknown tick mode \"turbo\""));
        assert_eq!(error_of(&format!("{}{}", vm(""), vm(""))), "vm[1].name: \"a\" is used by another VM");
        assert_eq!(
            error_of(&vm("housekeeping_hz = 0\n")),
            "vm[0].housekeeping_hz: housekeeping_hz must be 1 to hz (250), not 0"
        );
        assert_eq!(
            error_of(&vm("delivery = \"pigeon\"\n")),
            "vm[0].delivery: unknown tick delivery \"pigeon\": use msi, lapic-timer or ride"
        );
        let config = DaemonConfig::parse(&vm("delivery = \"lapic-timer\"\nhousekeeping_hz = 10\n")).unwrap();
        assert_eq!(
            (config.vms[0].config.delivery, config.vms[0].config.housekeeping_hz),
            (paratick_vmm::TickDelivery::LapicTimer, 10)
        );
        assert_eq!(
            error_of(&vm("").replace("\"a\"", "\"a b\"")),
            "vm[0].name: use 1 to 64 letters, digits, '-' and '_' only"
        );
    }
}
