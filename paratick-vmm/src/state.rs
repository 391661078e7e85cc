//! Where a VM is in its life. One state machine for every layer: the library's [`Vm`],
//! the VM process (`paratick-vmm serve`), the daemon's supervision and the CLI.
//!
//! ```text
//! Starting ─► Paused ─► Running ─► Stopping ─► Stopped
//!    │           │         ├──────────────────► Finished   (the guest did its work)
//!    └───────────┴─────────┴──────────────────► Failed     (with a one-line reason)
//! ```
//!
//! [`VmState`] names the states (labels, wire names); [`Lifecycle`] is a VM's life,
//! the reason of a failure inside it, and moves only by [`Lifecycle::transition`].
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

/// A VM's life: its [`VmState`], with the reason inside when it failed. Moves only
/// by [`Lifecycle::transition`]. On the wire it is the state's name and, for a failed
/// VM, its `error`: `{"state": "failed", "error": "guest panicked: …"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "LifecycleWire", try_from = "LifecycleWire")]
pub enum Lifecycle {
    /// See [`VmState::Starting`].
    Starting,
    /// See [`VmState::Paused`].
    Paused,
    /// See [`VmState::Running`].
    Running,
    /// See [`VmState::Stopping`].
    Stopping,
    /// See [`VmState::Stopped`].
    Stopped,
    /// See [`VmState::Finished`].
    Finished,
    /// Failed, and why (one line).
    Failed(String),
}

/// A move [`Lifecycle::transition`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a VM cannot go from {from} to {to}")]
pub struct InvalidTransition {
    /// Where it was.
    pub from: VmState,
    /// Where it was asked to go.
    pub to: VmState,
}

impl Lifecycle {
    /// Its state.
    pub fn state(&self) -> VmState {
        match self {
            Lifecycle::Starting => VmState::Starting,
            Lifecycle::Paused => VmState::Paused,
            Lifecycle::Running => VmState::Running,
            Lifecycle::Stopping => VmState::Stopping,
            Lifecycle::Stopped => VmState::Stopped,
            Lifecycle::Finished => VmState::Finished,
            Lifecycle::Failed(_) => VmState::Failed,
        }
    }

    /// Why it failed, if it did.
    pub fn error(&self) -> Option<&str> {
        match self {
            Lifecycle::Failed(reason) => Some(reason),
            _ => None,
        }
    }

    /// The one way a VM's life moves (see the diagram above): forward while it lives
    /// (a watcher that samples may see a later state without the ones between), and
    /// from an end to a new life (started again, found running, or, for a watcher that
    /// was away, begun and ended unseen: from one end to another). Staying where it is
    /// is no move. Back within a life (running to paused or starting, stopping to
    /// running, an end to stopping) is refused and changes nothing.
    pub fn transition(&mut self, next: Lifecycle) -> Result<(), InvalidTransition> {
        let (from, to) = (self.state(), next.state());
        // Starting, Paused, Running, Stopping, then the ends.
        let rank = |state: VmState| if state.is_final() { 4 } else { state as u8 };
        let allowed =
            from == to || (!from.is_final() && rank(to) > rank(from)) || (from.is_final() && to != VmState::Stopping);
        if !allowed {
            return Err(InvalidTransition { from, to });
        }
        *self = next;
        Ok(())
    }
}

/// How [`Lifecycle`] crosses the wire.
#[derive(Serialize, Deserialize)]
struct LifecycleWire {
    state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<Lifecycle> for LifecycleWire {
    fn from(lifecycle: Lifecycle) -> LifecycleWire {
        let state = lifecycle.state();
        let error = match lifecycle {
            Lifecycle::Failed(reason) => Some(reason),
            _ => None,
        };
        LifecycleWire { state, error }
    }
}

impl TryFrom<LifecycleWire> for Lifecycle {
    type Error = String;

    fn try_from(wire: LifecycleWire) -> Result<Lifecycle, String> {
        Ok(match (wire.state, wire.error) {
            (VmState::Failed, Some(reason)) => Lifecycle::Failed(reason),
            (VmState::Failed, None) => return Err("a failed VM without its error".into()),
            (state, Some(error)) => return Err(format!("a VM {state} with an error ({error})")),
            (VmState::Starting, None) => Lifecycle::Starting,
            (VmState::Paused, None) => Lifecycle::Paused,
            (VmState::Running, None) => Lifecycle::Running,
            (VmState::Stopping, None) => Lifecycle::Stopping,
            (VmState::Stopped, None) => Lifecycle::Stopped,
            (VmState::Finished, None) => Lifecycle::Finished,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantArray;

    #[test]
    fn a_vm_moves_forward_ends_and_begins_again_and_nothing_else() {
        use Lifecycle::*;
        let failed = || Failed("guest panicked".into());
        let mut vm = Starting;
        for next in [Paused, Running, Running, Stopping, Stopped, Starting, Running, failed(), Failed("again".into())] {
            vm.transition(next.clone()).unwrap();
            assert_eq!(vm, next);
        }
        // A new life, found running; a sampled jump forward; an end from anywhere alive.
        vm.transition(Running).unwrap();
        vm.transition(Finished).unwrap();
        let mut starting = Starting;
        starting.transition(failed()).unwrap();
        // A watcher that was away: a life begun and ended unseen.
        vm.transition(failed()).unwrap();
        vm.transition(Stopped).unwrap();
        for (from, to) in [(Running, Paused), (Running, Starting), (Stopping, Running), (Stopped, Stopping)] {
            let mut vm = from.clone();
            let refused = vm.transition(to.clone()).unwrap_err();
            assert_eq!((refused.from, refused.to), (from.state(), to.state()));
            assert_eq!(vm, from, "a refused move changes nothing");
        }
        assert_eq!(
            InvalidTransition { from: VmState::Stopping, to: VmState::Running }.to_string(),
            "a VM cannot go from stopping to running"
        );
    }

    #[test]
    fn the_wire_form_is_the_state_and_a_failures_error() {
        let failed = Lifecycle::Failed("guest panicked: oops".into());
        let wire = serde_json::to_value(&failed).unwrap();
        assert_eq!(wire, serde_json::json!({"state": "failed", "error": "guest panicked: oops"}));
        assert_eq!(serde_json::from_value::<Lifecycle>(wire).unwrap(), failed);
        assert_eq!(serde_json::to_value(Lifecycle::Running).unwrap(), serde_json::json!({"state": "running"}));
        for (bad, why) in [
            (serde_json::json!({"state": "failed"}), "a failed VM without its error"),
            (serde_json::json!({"state": "running", "error": "x"}), "a VM running with an error (x)"),
        ] {
            let error = serde_json::from_value::<Lifecycle>(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{error}");
        }
    }

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
