//! The control socket protocol: one JSON object per line each way.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"list"}`, `{"cmd":"set_tick_rate","vm":"a","hz":100}`
//! (`"hz":null` returns the VM to its guest's requests), `{"cmd":"start","vm":"a"}`,
//! `{"cmd":"stop","vm":"a"}`. Every response has `ok`; failures carry `error`, one line
//! that says what to do, and `code` ([`ErrorCode`]). A failed request changes nothing.
//! `status` reports the protocol's version ([`PROTOCOL_VERSION`]).

use paratick_vmm::Lifecycle;
use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The protocol's version, in `status`; a change that breaks clients bumps it.
pub const PROTOCOL_VERSION: u32 = 1;

pub use paratick_vmm::control::{ErrorCode, Reply};

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's state. (Empty braces: unit variants would accept unknown fields.)
    Status {},
    /// Every VM.
    List {},
    /// Sets the operator's tick rate of a VM; `hz: None` returns it to the guest's requests.
    SetTickRate {
        /// VM name.
        vm: String,
        /// Rate in Hz, or null.
        hz: Option<u32>,
    },
    /// Starts a VM that is not running.
    Start {
        /// VM name.
        vm: String,
    },
    /// Stops a running VM.
    Stop {
        /// VM name.
        vm: String,
    },
}

/// One VM as `list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// The VM process's id, while it has one.
    pub pid: Option<u32>,
    /// Where the VM is, and why it failed (`state`, `error`).
    #[serde(flatten)]
    pub lifecycle: Lifecycle,
    /// Tick mode.
    pub mode: String,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest's tick rate.
    pub hz: u32,
    /// Rate the guest asks the host for (Hz; 0 = none).
    pub requested_hz: u32,
    /// The operator's rate, if set.
    pub configured_hz: Option<u32>,
    /// Ticks injected per second per ticking vCPU over the last interval.
    pub effective_hz: f64,
    /// Timer interrupts the guest took per second of busy vCPU time (the host's view,
    /// for every mode: a tickless guest's own rate).
    pub observed_hz: f64,
    /// VM exits per second over the last interval (KVM stats).
    pub exits_per_s: f64,
    /// VM exits since the VM started (KVM stats; the last count of a VM that ended).
    pub exits: u64,
    /// Exits saved versus a tickless guest so far: a projection by the exits model of
    /// this host (see `paratick_vm_exits_saved_projected_total`).
    pub exits_saved: u64,
    /// Work units the guest did since the VM started (`paratick_vm_work_units_total`).
    #[serde(default)]
    pub work_units: u64,
    /// `exits` per work unit since the VM started: what a unit of the guest's work costs
    /// in exits, comparable between VMs that did different amounts of work (none before
    /// the first unit).
    #[serde(default)]
    pub exits_per_unit: Option<f64>,
    /// Times the daemon started it again after a failure (`restart = "on-failure"`).
    #[serde(default)]
    pub restarts: u64,
}

/// The daemon as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Version.
    pub version: String,
    /// The control protocol's version ([`PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// Process id.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Metrics URL.
    pub metrics: String,
    /// Control socket path.
    pub socket: String,
    /// Host KVM backend.
    pub backend: String,
    /// `attached`, or why the observer is unavailable.
    pub observer: String,
    /// How VM processes are started: `systemd` (units) or `process`.
    pub vm_launcher: String,
    /// The exits model the projections use now.
    pub exits_model: Option<paratick_observer::model::TimerModel>,
    /// VMs running.
    pub vms_running: usize,
    /// VMs configured.
    pub vms_total: usize,
}

/// What the daemon's reply returns (each field for the request that returns it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DaemonAnswer {
    /// For `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<VmInfo>>,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
    /// What a change did, and when it applies, in words for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<String>,
}

/// The daemon's reply: the same envelope as a VM process's ([`Reply`]).
pub type Response = Reply<DaemonAnswer>;

impl DaemonAnswer {
    /// A change done, said in words.
    pub fn said(what: impl Into<String>) -> Response {
        Reply::Done(DaemonAnswer { done: Some(what.into()), ..DaemonAnswer::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let json = serde_json::to_string(&Request::SetTickRate { vm: "a".into(), hz: Some(100) }).unwrap();
        assert_eq!(json, r#"{"cmd":"set_tick_rate","vm":"a","hz":100}"#);
        let auto: Request = serde_json::from_str(r#"{"cmd":"set_tick_rate","vm":"a","hz":null}"#).unwrap();
        assert_eq!(auto, Request::SetTickRate { vm: "a".into(), hz: None });
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"list"}"#).unwrap(), Request::List {});
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"list","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert_eq!(serde_json::to_string(&Response::ok()).unwrap(), r#"{"ok":true}"#);
        assert_eq!(
            serde_json::to_string(&Response::failure(ErrorCode::PermissionDenied, "no")).unwrap(),
            r#"{"ok":false,"error":"no","code":"permission_denied"}"#
        );
        // Never both, never neither.
        for bad in [r#"{"ok":true,"error":"no"}"#, r#"{"ok":false}"#] {
            let error = serde_json::from_str::<Response>(bad).unwrap_err().to_string();
            assert!(
                error.contains("a reply both ok and with an error") || error.contains("a refusal without its error")
            );
        }
        let said: Response = serde_json::from_str(r#"{"ok":true,"done":"VM a: 100 Hz"}"#).unwrap();
        assert_eq!(said, DaemonAnswer::said("VM a: 100 Hz"));
    }
}
