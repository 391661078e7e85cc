//! Where a VM is in its life. One state machine for every layer: the library's [`Vm`],
//! the VM process (`paratick-vmm serve`), the daemon's supervision and the CLI.
//!
//! ```text
//! Starting ─► Paused ─► Running ─► Stopping ─► Stopped
//!    │           │         ├──────────────────► Finished   (the guest did its work)
//!    └───────────┴─────────┴──────────────────► Failed     (with a one-line reason)
//! ```
//!
//! [`Vm`]: crate::Vm

use serde::{Deserialize, Serialize};

/// A VM's state.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum VmState {
    /// Being created (its process is starting, or KVM objects are being made).
    Starting,
    /// Created, vCPUs not yet let run.
    Paused,
    /// The guest is running.
    Running,
    /// A stop was asked for and is under way.
    Stopping,
    /// Stopped by the operator (or by its supervisor shutting down).
    Stopped,
    /// The guest finished its work.
    Finished,
    /// Failed; the reason goes with the state.
    Failed,
}

impl VmState {
    /// The name in metrics labels, `vm list` and the control protocols.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Whether the VM has ended (it will not run again without a new start).
    pub const fn is_final(self) -> bool {
        matches!(self, VmState::Stopped | VmState::Finished | VmState::Failed)
    }

    /// Whether a VM in this state can be asked to stop.
    pub const fn can_stop(self) -> bool {
        matches!(self, VmState::Paused | VmState::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantArray;

    #[test]
    fn names_are_the_wire_form() {
        for &state in VmState::VARIANTS {
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{}\"", state.name()));
            assert_eq!(serde_json::from_str::<VmState>(&format!("\"{state}\"")).unwrap(), state);
        }
        assert!(serde_json::from_str::<VmState>("\"gone\"").is_err());
        assert_eq!(VmState::VARIANTS.iter().filter(|s| s.is_final()).count(), 3);
    }
}
