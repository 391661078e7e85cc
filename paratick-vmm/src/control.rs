//! The control protocol of a VM process (`paratick-vmm serve`), which runs one VM and
//! answers on a Unix socket of its own, so that the VM outlives whoever started it.
//!
//! One request per connection, one JSON object per line each way:
//! `{"cmd":"status"}`, `{"cmd":"set_tick_rate","hz":100}` (`null`: back to the guest's
//! requests) and `{"cmd":"stop"}` (answered once the VM has stopped, just before the
//! process exits). When the VM ends, however it ends, the process writes a [`VmEnd`]
//! next to its socket, so a supervisor that was away learns how it ended.
//!
//! Files in the runtime directory (default [`DEFAULT_RUNTIME_DIR`]), per VM `NAME`:
//! `NAME.sock` (the socket, mode 0600), `NAME.end.json` (the end record) and, under
//! systemd, `NAME.env` (the unit instance's arguments, written by the daemon).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Counters, Lifecycle, VmConfig, WorkAmount};

/// Where VM processes keep their sockets and end records by default.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/paratick/vms";

/// Longest request or reply line accepted.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// A request to a VM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmRequest {
    /// The VM's state and counters.
    Status {},
    /// Sets the operator's tick rate; `None` returns the VM to its guest's requests.
    SetTickRate {
        /// Rate in Hz, or null.
        hz: Option<u32>,
    },
    /// Stops the VM; the process exits after answering.
    Stop {},
}

/// Why a request was refused, for programs (the `error` text is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a request: malformed JSON, unknown command or field, wrong type, too long.
    BadRequest,
    /// The peer may not use the socket (not root, not in `socket_group`).
    PermissionDenied,
    /// A valid request that was refused: unknown VM, value out of range, wrong state.
    Refused,
    /// The server is shutting down.
    Stopping,
}

/// The answer on a control socket, a VM process's and the daemon's alike: what the
/// request returns, or why it was refused, never both. On the wire
/// `{"ok": true, …what it returns}` or `{"ok": false, "error": "…", "code": "…"}`; a
/// line that says both, or a refusal without its error, is not a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "ReplyWire<T>", try_from = "ReplyWire<T>")]
#[serde(bound(serialize = "T: Serialize + Clone + Default", deserialize = "T: Deserialize<'de> + Default"))]
pub enum Reply<T> {
    /// Done, with what it returns (`T::default()`: nothing).
    Done(T),
    /// Refused.
    Refused {
        /// Why, for programs.
        code: ErrorCode,
        /// Why, in one line.
        error: String,
    },
}

impl<T: Default> Reply<T> {
    /// Done, returning nothing.
    pub fn ok() -> Reply<T> {
        Reply::Done(T::default())
    }

    /// A request refused (a valid one: [`ErrorCode::Refused`]).
    pub fn error(message: impl Into<String>) -> Reply<T> {
        Reply::failure(ErrorCode::Refused, message)
    }

    /// A request that failed for `code`.
    pub fn failure(code: ErrorCode, message: impl Into<String>) -> Reply<T> {
        Reply::Refused { code, error: message.into() }
    }

    /// Whether the request was done.
    pub fn is_done(&self) -> bool {
        matches!(self, Reply::Done(_))
    }

    /// Why it was refused, if it was.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            Reply::Done(_) => None,
            Reply::Refused { error, .. } => Some(error),
        }
    }

    /// What it returns, if it was done.
    pub fn answer(&self) -> Option<&T> {
        match self {
            Reply::Done(answer) => Some(answer),
            Reply::Refused { .. } => None,
        }
    }

    /// What it returns, or why it was refused.
    pub fn into_result(self) -> Result<T, (ErrorCode, String)> {
        match self {
            Reply::Done(answer) => Ok(answer),
            Reply::Refused { code, error } => Err((code, error)),
        }
    }
}

/// How [`Reply`] crosses the wire.
#[derive(Serialize, Deserialize)]
struct ReplyWire<T> {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(flatten)]
    answer: T,
}

impl<T: Default> From<Reply<T>> for ReplyWire<T> {
    fn from(reply: Reply<T>) -> ReplyWire<T> {
        match reply {
            Reply::Done(answer) => ReplyWire { ok: true, error: None, code: None, answer },
            Reply::Refused { code, error } => {
                ReplyWire { ok: false, error: Some(error), code: Some(code), answer: T::default() }
            }
        }
    }
}

impl<T> TryFrom<ReplyWire<T>> for Reply<T> {
    type Error = &'static str;

    fn try_from(wire: ReplyWire<T>) -> Result<Reply<T>, &'static str> {
        match (wire.ok, wire.error) {
            (true, None) => Ok(Reply::Done(wire.answer)),
            (true, Some(_)) => Err("a reply both ok and with an error"),
            // (A VM process of before the codes sends none: refused.)
            (false, Some(error)) => Ok(Reply::Refused { code: wire.code.unwrap_or(ErrorCode::Refused), error }),
            (false, None) => Err("a refusal without its error"),
        }
    }
}

/// What a VM process's reply returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct VmAnswer {
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmProcessStatus>,
}

/// A VM process's answer.
pub type VmReply = Reply<VmAnswer>;

/// A running VM process as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmProcessStatus {
    /// VM name.
    pub name: String,
    /// The VM process's id.
    pub pid: u32,
    /// The VM's state, and why it failed (`state`, `error`).
    #[serde(flatten)]
    pub lifecycle: Lifecycle,
    /// vCPUs halted in KVM now.
    pub halted_vcpus: u32,
    /// Seconds since the VM started.
    pub uptime_s: f64,
    /// The VM's counters.
    pub counters: Counters,
}

/// How a VM process's VM ended, written next to its socket as it exits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmEnd {
    /// VM name.
    pub name: String,
    /// The process's id.
    pub pid: u32,
    /// Stopped, finished or failed (`state`, `error`).
    #[serde(flatten)]
    pub lifecycle: Lifecycle,
    /// The counters at the end, where they could be read.
    pub counters: Option<Counters>,
}

/// Why a VM process could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket (the process is gone, or not yet up).
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The exchange failed (timeout, reset).
    #[error("talking to {}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The answer is not a reply.
    #[error("bad reply from {}: {reason}", path.display())]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// The socket of VM `name` in `runtime_dir`.
pub fn socket_path(runtime_dir: &Path, name: &str) -> PathBuf {
    runtime_dir.join(format!("{name}.sock"))
}

/// The end record of VM `name` in `runtime_dir`.
pub fn end_path(runtime_dir: &Path, name: &str) -> PathBuf {
    runtime_dir.join(format!("{name}.end.json"))
}

/// Reads the end record of VM `name`, if there is one.
pub fn read_end(runtime_dir: &Path, name: &str) -> Option<Result<VmEnd, String>> {
    let path = end_path(runtime_dir, name);
    let text = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("cannot read {}: {e}", path.display()))),
        Ok(text) => text,
    };
    Some(serde_json::from_str(&text).map_err(|e| format!("{} is not an end record: {e}", path.display())))
}

/// Writes an end record atomically (a reader sees all of it or none).
pub fn write_end(runtime_dir: &Path, end: &VmEnd) -> std::io::Result<()> {
    let path = end_path(runtime_dir, &end.name);
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_vec(end).map_err(std::io::Error::other)?)?;
    std::fs::rename(&partial, &path)
}

/// Sends one request to the VM process listening on `socket` and reads its reply; both
/// directions give up after `timeout`.
pub fn request(socket: &Path, request: &VmRequest, timeout: Duration) -> Result<VmReply, ControlError> {
    let io = |source| ControlError::Io { path: socket.to_path_buf(), source };
    let stream =
        UnixStream::connect(socket).map_err(|source| ControlError::Connect { path: socket.to_path_buf(), source })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = Vec::new();
    let read = BufReader::new(&stream).take(MAX_LINE_BYTES as u64).read_until(b'\n', &mut answer).map_err(io)?;
    if read == 0 {
        return Err(ControlError::BadReply { path: socket.to_path_buf(), reason: "closed without a reply".into() });
    }
    serde_json::from_slice(&answer)
        .map_err(|e| ControlError::BadReply { path: socket.to_path_buf(), reason: e.to_string() })
}

/// The processes running `paratick-vmm serve --runtime-dir RUNTIME_DIR` (found by their
/// command lines in /proc, whether or not their sockets answer).
pub fn serving_processes(runtime_dir: &Path) -> Vec<u32> {
    let wanted = runtime_dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let serves = args.get(1) == Some(&&b"serve"[..]);
            let in_dir = args.windows(2).any(|w| w[0] == b"--runtime-dir" && w[1] == wanted);
            (serves && in_dir).then_some(pid)
        })
        .collect()
}

/// The arguments of `paratick-vmm serve` that run `config` (after `serve`; the runtime
/// directory is the caller's to add).
pub fn serve_args(config: &VmConfig) -> Vec<String> {
    let mut args: Vec<String> = [
        "--name",
        &config.name,
        "--vcpus",
        &config.vcpus.to_string(),
        "--mode",
        config.mode.name(),
        "--hz",
        &config.hz.to_string(),
        "--workload",
        config.workload.name(),
        "--housekeeping-hz",
        &config.housekeeping_hz.to_string(),
        "--delivery",
        config.delivery.name(),
        "--deadline",
        &format!("{}ms", config.deadline.as_millis()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match config.amount {
        WorkAmount::Seconds(seconds) => args.extend(["--duration".into(), format!("{}ms", (seconds * 1e3).round())]),
        WorkAmount::Units(units) => args.extend(["--work".into(), units.to_string()]),
    }
    if let Some(hz) = config.operator_hz {
        args.extend(["--tick-rate".into(), hz.to_string()]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let json = serde_json::to_string(&VmRequest::SetTickRate { hz: Some(100) }).unwrap();
        assert_eq!(json, r#"{"cmd":"set_tick_rate","hz":100}"#);
        assert_eq!(serde_json::from_str::<VmRequest>(r#"{"cmd":"stop"}"#).unwrap(), VmRequest::Stop {});
        assert!(serde_json::from_str::<VmRequest>(r#"{"cmd":"stop","now":1}"#).is_err());
        assert_eq!(serde_json::to_string(&VmReply::ok()).unwrap(), r#"{"ok":true}"#);
    }

    #[test]
    fn a_reply_is_an_answer_or_a_refusal_never_both() {
        let refused = VmReply::failure(ErrorCode::BadRequest, "bad request: x");
        let wire = serde_json::to_string(&refused).unwrap();
        assert_eq!(wire, r#"{"ok":false,"error":"bad request: x","code":"bad_request"}"#);
        assert_eq!(serde_json::from_str::<VmReply>(&wire).unwrap(), refused);
        assert_eq!(refused.refusal(), Some("bad request: x"));
        assert!(!refused.is_done() && refused.answer().is_none());
        // A VM process of before the codes: refused.
        let old: VmReply = serde_json::from_str(r#"{"ok":false,"error":"no"}"#).unwrap();
        assert_eq!(old.into_result().unwrap_err(), (ErrorCode::Refused, "no".to_string()));
        for (bad, why) in [
            (r#"{"ok":true,"error":"no"}"#, "a reply both ok and with an error"),
            (r#"{"ok":false}"#, "a refusal without its error"),
            (r#"{"error":"no"}"#, "missing field `ok`"),
        ] {
            let error = serde_json::from_str::<VmReply>(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn end_records_are_written_whole_and_read_back() {
        let dir = std::env::temp_dir().join(format!("paratick-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(read_end(&dir, "a").is_none());
        let end = VmEnd { name: "a".into(), pid: 7, lifecycle: Lifecycle::Finished, counters: None };
        write_end(&dir, &end).unwrap();
        assert_eq!(read_end(&dir, "a").unwrap().unwrap(), end);
        std::fs::write(end_path(&dir, "a"), "{").unwrap();
        assert!(read_end(&dir, "a").unwrap().unwrap_err().contains("is not an end record"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
