//! What operators decided that must outlive the daemon: a tick rate set with
//! `vm set-tick-rate`, and a VM stopped with `vm stop`. Kept in `state.json` under the
//! state directory (`/var/lib/paratick`, systemd's `StateDirectory=`), written whole to a
//! temporary file and renamed over the old one, so that a crash leaves the old state or
//! the new one, never a mix. The format carries its version. The counters
//! (`counters.json`, [`super::counters`]) are kept with the same file helpers.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The state directory when neither the configuration nor systemd names one.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/paratick";

/// The version of the file's format this daemon writes and reads.
const FORMAT_VERSION: u32 = 1;

const FILE_NAME: &str = "state.json";

/// What the operator decided about one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDecisions {
    /// The tick rate set with `vm set-tick-rate` (none: the guest's request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_hz: Option<u32>,
    /// Stopped with `vm stop`, and not started since: not started with the daemon.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    vms: BTreeMap<String, VmDecisions>,
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or renaming failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a state file of a version this daemon knows.
    #[error("{path} is not a state file this daemon can read ({reason}); it was moved to {moved_to} and the daemon starts without it")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// Where it was moved, so that nothing is lost.
        moved_to: PathBuf,
    },
}

/// The operators' decisions, by VM name, and where they are kept.
#[derive(Debug)]
pub struct OperatorState {
    path: PathBuf,
    vms: BTreeMap<String, VmDecisions>,
}

impl OperatorState {
    /// Reads the state kept in `dir` (none yet: empty). A file that cannot be parsed is
    /// moved aside, reported, and the daemon starts with no decisions.
    pub fn load(dir: &Path) -> (OperatorState, Option<StateError>) {
        let path = dir.join(FILE_NAME);
        match read_versioned::<StateFile>(&path, FORMAT_VERSION) {
            Ok(file) => (OperatorState { vms: file.map(|f| f.vms).unwrap_or_default(), path }, None),
            Err(problem) => (OperatorState { path, vms: BTreeMap::new() }, Some(problem)),
        }
    }

    /// The decisions about `vm` (none: the defaults).
    pub fn of(&self, vm: &str) -> VmDecisions {
        self.vms.get(vm).cloned().unwrap_or_default()
    }

    /// Changes the decisions about `vm` and writes the state if they changed.
    pub fn update(&mut self, vm: &str, change: impl FnOnce(&mut VmDecisions)) -> Result<(), StateError> {
        let mut decisions = self.of(vm);
        change(&mut decisions);
        let changed = if decisions == VmDecisions::default() {
            self.vms.remove(vm).is_some()
        } else {
            self.vms.insert(vm.to_string(), decisions.clone()) != Some(decisions)
        };
        if changed {
            self.save()?;
        }
        Ok(())
    }

    /// Forgets every VM that `keep` refuses (removed from the configuration).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) -> Result<(), StateError> {
        let before = self.vms.len();
        self.vms.retain(|name, _| keep(name));
        if self.vms.len() != before {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), StateError> {
        let file = StateFile { version: FORMAT_VERSION, vms: self.vms.clone() };
        write_whole(&self.path, &file, Durability::Synced)
    }
}

/// Whether [`write_whole`] waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The file and its directory are synced: the write survives a crash of the host.
    Synced,
    /// Left to the page cache: it survives the daemon's crash, not the host's.
    Cached,
}

/// Writes `value` as JSON to `path` through a temporary file renamed over it, so that
/// after a crash the file is the old content or the new, never a mix.
pub fn write_whole(path: &Path, value: &impl Serialize, durability: Durability) -> Result<(), StateError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { action, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let mut text = serde_json::to_string_pretty(value).expect("the state serializes");
    text.push('\n');
    let temporary = path.with_extension("json.tmp");
    let mut out = std::fs::File::create(&temporary).map_err(io("cannot create", &temporary))?;
    let synced = |out: &mut std::fs::File| match durability {
        Durability::Synced => out.sync_all(),
        Durability::Cached => Ok(()),
    };
    out.write_all(text.as_bytes()).and_then(|()| synced(&mut out)).map_err(io("cannot write", &temporary))?;
    std::fs::rename(&temporary, path).map_err(io("cannot replace", path))?;
    if durability == Durability::Synced {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", dir))?;
    }
    Ok(())
}

/// Reads a JSON file whose `version` field must be `version`: `None` when there is no
/// file. A file that cannot be parsed, or of another version, is moved aside (to
/// `NAME.json.unreadable`, so that nothing is lost) and reported.
pub fn read_versioned<T: DeserializeOwned>(path: &Path, version: u32) -> Result<Option<T>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { action: "cannot read", path: path.to_path_buf(), source }),
    };
    let parsed = serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string()).and_then(|value| {
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(version) => serde_json::from_value::<T>(value).map_err(|e| e.to_string()),
            Some(v) => Err(format!("format version {v}, this daemon knows {version}")),
            None => Err("no format version".into()),
        }
    });
    parsed.map(Some).map_err(|reason| {
        let moved_to = path.with_extension("json.unreadable");
        match std::fs::rename(path, &moved_to) {
            Ok(()) => StateError::Unreadable { path: path.to_path_buf(), reason, moved_to },
            Err(source) => StateError::Io { action: "cannot move aside", path: path.to_path_buf(), source },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("paratick-state-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn decisions_are_kept_across_loads_and_only_changes_are_written() {
        let dir = temporary_dir("kept");
        let (mut state, problem) = OperatorState::load(&dir);
        assert!(problem.is_none() && state.of("a") == VmDecisions::default());
        assert!(!dir.exists(), "nothing decided, nothing written");
        state.update("a", |d| d.operator_hz = Some(100)).unwrap();
        state.update("b", |d| d.stopped = true).unwrap();
        let text = std::fs::read_to_string(dir.join(FILE_NAME)).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            serde_json::json!({"version": 1, "vms": {"a": {"operator_hz": 100}, "b": {"stopped": true}}})
        );
        let (mut again, problem) = OperatorState::load(&dir);
        assert!(problem.is_none());
        assert_eq!(again.of("a"), VmDecisions { operator_hz: Some(100), stopped: false });
        assert_eq!(again.of("b"), VmDecisions { operator_hz: None, stopped: true });
        // Back to the defaults: the VM leaves the file; removed VMs are forgotten.
        again.update("b", |d| d.stopped = false).unwrap();
        again.retain(|name| name != "a").unwrap();
        assert_eq!(OperatorState::load(&dir).0.vms, BTreeMap::new());
        assert!(!dir.join("state.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreadable_or_newer_file_is_moved_aside_and_reported() {
        for (text, reason) in [
            ("{not json", "key must be a string"),
            (r#"{"version": 2, "vms": {}}"#, "format version 2, this daemon knows 1"),
            (r#"{"version": 1, "vms": {"a": {"colour": 1}}}"#, "unknown field `colour`"),
            (r#"{"vms": {}}"#, "no format version"),
        ] {
            let dir = temporary_dir("unreadable");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(FILE_NAME), text).unwrap();
            let (state, problem) = OperatorState::load(&dir);
            let message = problem.unwrap().to_string();
            assert!(message.contains(reason) && message.contains("state.json.unreadable"), "{message}");
            assert!(state.vms.is_empty());
            assert_eq!(std::fs::read_to_string(dir.join("state.json.unreadable")).unwrap(), text, "nothing is lost");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
