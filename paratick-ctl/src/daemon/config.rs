//! The daemon's TOML configuration (see packaging/paratick.toml, also the embedded
//! default). Unknown keys and bad values are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use paratick_vmm::control::DEFAULT_RUNTIME_DIR as VM_UNIT_RUNTIME_DIR;
use paratick_vmm::{parse_delivery, parse_tick_mode, parse_workload, VmConfig, WorkAmount};
use serde::Deserialize;

use super::restart::{RestartPolicy, DEFAULT_RESTART_LIMIT};
use super::state::DEFAULT_STATE_DIR;
use super::supervisor::VmLauncher;

/// The default configuration, embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../../../packaging/paratick.toml");

/// Other VMMs' VMs with series of their own unless the configuration says otherwise.
const DEFAULT_OBSERVED_VMS_MAX: usize = 10;
/// The most `observed_vms_max` may be: each VM has a dozen series.
const MAX_OBSERVED_VMS_MAX: usize = 500;

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
    state_dir: Option<PathBuf>,
    observed_vms_max: Option<usize>,
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
    restart: Option<String>,
    restart_limit: Option<u32>,
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
    /// Where the operators' decisions outlive the daemon (`state.json`) and its counters
    /// continue (`counters.json`).
    pub state_dir: PathBuf,
    /// How many VMs of other VMMs get series of their own (the busiest by exits); the
    /// rest are summed as `vm="other"`.
    pub observed_vms_max: usize,
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
    /// Whether to start it again when it fails.
    pub restart: RestartPolicy,
    /// Restarts at most within 10 minutes.
    pub restart_limit: u32,
}

/// A configuration error: one line, naming where in the file and the key where it can.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (the cause is its source).
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    /// A file with no setting at all.
    #[error("it has no settings: an empty file is refused (a daemon on every default, with no VM, is more likely a mistake than a wish); set at least one key, e.g. metrics_listen")]
    Empty,
    /// TOML syntax, an unknown key, a value of the wrong type, or a bad value.
    #[error("{}{}{message}", at.map(|(line, column)| format!("line {line}, column {column}: ")).unwrap_or_default(), key.as_ref().map(|key| format!("{key}: ")).unwrap_or_default())]
    Invalid {
        /// Line and column (from 1) of the key, or of the error where no key is known.
        at: Option<(usize, usize)>,
        /// The key, e.g. `vm[1].hz`.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
}

fn value_error(key: impl Into<String>, message: impl ToString) -> ConfigError {
    ConfigError::Invalid { at: None, key: Some(key.into()), message: message.to_string() }
}

/// Line and column (from 1, in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    // toml's and toml_edit's spans fall on character boundaries.
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

/// The keys of a configuration document with their spans (key start to value end), by
/// name: `metrics_listen`, `vm[1].hz`, and each `vm[N]` table itself.
fn key_spans(doc: &toml_edit::ImDocument<&str>) -> Vec<(String, std::ops::Range<usize>)> {
    let entries = |table: &toml_edit::Table, prefix: &str| -> Vec<(String, std::ops::Range<usize>)> {
        table
            .iter()
            .filter_map(|(name, item)| {
                let start = table.key(name)?.span()?.start;
                Some((format!("{prefix}{name}"), start..item.span().map_or(start, |span| span.end)))
            })
            .collect()
    };
    let mut spans = entries(doc.as_table(), "");
    if let Some(vms) = doc.get("vm").and_then(toml_edit::Item::as_array_of_tables) {
        for (index, table) in vms.iter().enumerate() {
            if let Some(span) = table.span() {
                spans.push((format!("vm[{index}]"), span));
            }
            spans.extend(entries(table, &format!("vm[{index}].")));
        }
    }
    spans
}

impl ConfigError {
    /// The error with its line and column in `text` (and its key, for TOML's errors).
    fn located(self, text: &str) -> ConfigError {
        let ConfigError::Invalid { at: None, key, message } = self else { return self };
        let spans = toml_edit::ImDocument::parse(text).map(|doc| key_spans(&doc)).unwrap_or_default();
        let at = key
            .as_ref()
            .and_then(|key| spans.iter().find(|(name, _)| name == key))
            .map(|(_, span)| line_column(text, span.start));
        ConfigError::Invalid { at, key, message }
    }

    fn from_toml(error: toml::de::Error, text: &str) -> ConfigError {
        let message = error.message().trim().replace('\n', " ");
        let Some(span) = error.span() else { return ConfigError::Invalid { at: None, key: None, message } };
        // The innermost key whose entry holds the error (a `vm[N].key` before its `vm[N]`).
        let spans = toml_edit::ImDocument::parse(text).map(|doc| key_spans(&doc)).unwrap_or_default();
        let key = spans
            .into_iter()
            .filter(|(_, entry)| entry.start <= span.start && span.start < entry.end.max(entry.start + 1))
            .min_by_key(|(_, entry)| entry.end - entry.start)
            .map(|(name, _)| name);
        ConfigError::Invalid { at: Some(line_column(text, span.start)), key, message }
    }
}

impl DaemonConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<DaemonConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(ConfigError::Read)?;
        DaemonConfig::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::parse_unlocated(text).map_err(|e| e.located(text))
    }

    fn parse_unlocated(text: &str) -> Result<DaemonConfig, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::from_toml(e, text))?;
        if table.is_empty() {
            return Err(ConfigError::Empty);
        }
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::from_toml(e, text))?;
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
        let timer_model =
            raw.timer_model.unwrap_or_else(|| PathBuf::from(paratick_observer::model::DEFAULT_MODEL_FILE));
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(value_error("state_dir", "must be an absolute path"));
        }
        let observed_vms_max = raw.observed_vms_max.unwrap_or(DEFAULT_OBSERVED_VMS_MAX);
        if observed_vms_max > MAX_OBSERVED_VMS_MAX {
            return Err(value_error(
                "observed_vms_max",
                format!(
                    "{observed_vms_max} is more series than a scrape should carry: use 0 to {MAX_OBSERVED_VMS_MAX}"
                ),
            ));
        }
        Ok(DaemonConfig {
            metrics_listen,
            socket,
            socket_group: raw.socket_group,
            vm_launcher,
            timer_model,
            state_dir,
            observed_vms_max,
            vms,
        })
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
    let amount_key = if matches!(config.amount, WorkAmount::Units(_)) { "work" } else { "duration" };
    config.validate().map_err(|e| {
        let field = match e {
            paratick_vmm::ConfigError::Vcpus(_) => "vcpus",
            paratick_vmm::ConfigError::Hz(_) => "hz",
            paratick_vmm::ConfigError::TickRate(_) => "tick_rate",
            paratick_vmm::ConfigError::Housekeeping { .. } => "housekeeping_hz",
            paratick_vmm::ConfigError::Amount => amount_key,
            _ => "name",
        };
        value_error(key(field), e)
    })?;
    let restart = match vm.restart.as_deref() {
        None => RestartPolicy::default(),
        Some(text) => text.parse().map_err(|_| {
            value_error(key("restart"), format!("{text:?} is not a restart policy: use \"no\" or \"on-failure\""))
        })?,
    };
    let restart_limit = vm.restart_limit.unwrap_or(DEFAULT_RESTART_LIMIT);
    if restart_limit == 0 {
        return Err(value_error(key("restart_limit"), "must be at least 1 (restart = \"no\" restarts nothing)"));
    }
    Ok(VmEntry { config, autostart: vm.autostart.unwrap_or(true), restart, restart_limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid_and_runs_a_tickless_and_two_paratick_vms() {
        let config = DaemonConfig::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(config.metrics_listen, "127.0.0.1:9477".parse().unwrap());
        assert_eq!(config.socket, PathBuf::from("/run/paratick/paratick.sock"));
        let modes: Vec<_> = config.vms.iter().map(|v| (v.config.name.as_str(), v.config.mode.name())).collect();
        assert_eq!(modes, [("tickless", "tickless"), ("paratick", "paratick"), ("contended", "paratick")]);
        assert!(config.vms.iter().all(|v| v.autostart && v.config.amount == WorkAmount::Seconds(86400.0)));
    }

    fn error_of(text: &str) -> String {
        DaemonConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named_with_their_line_and_column() {
        assert_eq!(
            error_of("# metrics\nmetrics_port = 1\n"),
            "line 2, column 1: metrics_port: unknown field `metrics_port`, expected one of `metrics_listen`, `socket`, \
             `socket_group`, `vm_launcher`, `timer_model`, `state_dir`, `observed_vms_max`, `vm`"
        );
        let vm = |extra: &str| format!("[[vm]]\nname = \"a\"\nmode = \"paratick\"\nworkload = \"io\"\n{extra}");
        assert!(error_of(&vm("colour = 1\n")).starts_with("line 5, column 1: vm[0].colour: unknown field `colour`"));
        assert_eq!(
            error_of("metrics_listen = \"localhost\"\n"),
            "line 1, column 1: metrics_listen: \"localhost\" is not an address:port"
        );
        assert_eq!(error_of("socket = \"x.sock\"\n"), "line 1, column 1: socket: must be an absolute path");
        assert_eq!(
            error_of("vm_launcher = \"docker\"\n"),
            "line 1, column 1: vm_launcher: \"docker\" is not a launcher: use auto, systemd or process"
        );
        assert_eq!(
            error_of("socket = \"/tmp/p.sock\"\n  vm_launcher = \"systemd\"\n"),
            "line 2, column 3: vm_launcher: systemd VM units keep their sockets in /run/paratick/vms: use the default \
             socket"
        );
        let config = DaemonConfig::parse("vm_launcher = \"process\"\nsocket = \"/tmp/x/p.sock\"\n").unwrap();
        assert_eq!((config.vm_launcher, config.vm_runtime_dir()), (Some(VmLauncher::Process), "/tmp/x/vms".into()));
        assert_eq!(DaemonConfig::parse("vm_launcher = \"auto\"\n").unwrap().vm_launcher, None);
        assert_eq!(error_of(&vm("hz = 5\n")), "line 5, column 1: vm[0].hz: hz must be 10 to 4000, not 5");
        assert_eq!(error_of(&vm("vcpus = 0\n")), "line 5, column 1: vm[0].vcpus: vcpus must be 1 to 8, not 0");
        assert_eq!(
            error_of(&vm("tick_rate = 9000\n")),
            "line 5, column 1: vm[0].tick_rate: the tick rate must be 10 to 4000 Hz, not 9000"
        );
        assert!(error_of(&vm("duration = \"soon\"\n")).starts_with("line 5, column 1: vm[0].duration: "));
        assert_eq!(
            error_of(&vm("duration = \"1s\"\nwork = 5\n")),
            "line 6, column 1: vm[0].work: give duration or work, not both"
        );
        assert_eq!(
            error_of(&vm("hz = \"fast\"\n")),
            "line 5, column 6: vm[0].hz: invalid type: string \"fast\", expected u32"
        );
        assert!(error_of(&vm("").replace("paratick", "turbo"))
            .starts_with("line 3, column 1: vm[0].mode: unknown tick mode \"turbo\""));
        assert_eq!(
            error_of(&format!("{}{}", vm(""), vm(""))),
            "line 6, column 1: vm[1].name: \"a\" is used by another VM"
        );
        assert!(error_of("[[vm]]\nname = \"a\"\nworkload = \"io\"\n")
            .starts_with("line 1, column 1: vm[0]: missing field `mode`"));
        assert_eq!(
            error_of(&vm("housekeeping_hz = 0\n")),
            "line 5, column 1: vm[0].housekeeping_hz: housekeeping_hz must be 1 to hz (250), not 0"
        );
        assert_eq!(
            error_of(&vm("delivery = \"pigeon\"\n")),
            "line 5, column 1: vm[0].delivery: unknown tick delivery \"pigeon\": use msi, lapic-timer or ride"
        );
        let config = DaemonConfig::parse(&vm("delivery = \"lapic-timer\"\nhousekeeping_hz = 10\n")).unwrap();
        assert_eq!(
            (config.vms[0].config.delivery, config.vms[0].config.housekeeping_hz),
            (paratick_vmm::TickDelivery::LapicTimer, 10)
        );
        assert_eq!(
            error_of(&vm("restart = \"always\"\n")),
            "line 5, column 1: vm[0].restart: \"always\" is not a restart policy: use \"no\" or \"on-failure\""
        );
        assert!(error_of(&vm("restart_limit = 0\n")).starts_with("line 5, column 1: vm[0].restart_limit: must be"));
        let config = DaemonConfig::parse(&vm("restart = \"on-failure\"\n")).unwrap();
        assert_eq!((config.vms[0].restart, config.vms[0].restart_limit), (RestartPolicy::OnFailure, 5));
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/paratick"));
        assert_eq!(error_of("state_dir = \"state\"\n"), "line 1, column 1: state_dir: must be an absolute path");
        assert_eq!(config.observed_vms_max, 10);
        assert_eq!(DaemonConfig::parse("observed_vms_max = 0\n").unwrap().observed_vms_max, 0);
        assert_eq!(
            error_of("observed_vms_max = 5000\n"),
            "line 1, column 1: observed_vms_max: 5000 is more series than a scrape should carry: use 0 to 500"
        );
        assert_eq!(
            error_of(&vm("").replace("\"a\"", "\"a b\"")),
            "line 2, column 1: vm[0].name: use 1 to 64 letters, digits, '-' and '_' only"
        );
        // Syntax: where, and one line.
        assert_eq!(error_of("metrics_listen = \n"), "line 1, column 18: invalid string expected `\"`, `'`");
        assert!(error_of(&format!("\n{}", vm("work = 0\n"))).starts_with("line 6, column 1: vm[0].work: "));
        assert!(error_of(&vm("duration = \"0s\"\n")).starts_with("line 5, column 1: vm[0].duration: "));
    }

    #[test]
    fn an_empty_file_is_refused_and_every_error_is_one_line() {
        for empty in ["", "\n\n", "# nothing here\n"] {
            assert!(error_of(empty).starts_with("it has no settings: an empty file is refused"), "{empty:?}");
        }
        // Zero VMs is a choice when said so.
        assert!(DaemonConfig::parse("metrics_listen = \"127.0.0.1:9477\"\n").unwrap().vms.is_empty());
        for bad in ["[[vm]\n", "a = = 1\n", "metrics_listen = \"x\"\nmetrics_listen = \"y\"\n", "[[vm]]\nname = 1\n"] {
            let message = error_of(bad);
            assert!(!message.contains('\n') && message.starts_with("line "), "{bad:?}: {message}");
        }
    }

    #[test]
    fn a_missing_file_says_so_once() {
        let error = DaemonConfig::load(Path::new("/nonexistent/paratick.toml")).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(chain, "cannot read it: No such file or directory (os error 2)");
    }
}
