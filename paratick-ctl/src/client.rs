//! The CLI's side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::protocol::{DaemonAnswer, ErrorCode, Request, Response};

/// Why a request to the daemon failed, each with an exit code of its own.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("the daemon is not running (nothing listens on {0}): start it with `systemctl start paratick` or `paratick-ctl daemon`")]
    Unreachable(String),
    /// The socket's mode, or the daemon, refused this user.
    #[error("{0}")]
    PermissionDenied(String),
    /// The daemon refused the request (or did not understand it).
    #[error("{0}")]
    Refused(String),
    /// Talking to the daemon failed midway.
    #[error("{what} {socket}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The socket.
        socket: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon's answer is not one this client understands.
    #[error("the daemon's answer is not understood")]
    Answer(#[source] serde_json::Error),
}

impl ClientError {
    /// Exit code of the CLI: 1 refused, 3 daemon unreachable, 4 permission denied (2 is
    /// clap's, for usage errors).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused(_) | ClientError::Io { .. } | ClientError::Answer(_) => 1,
            ClientError::Unreachable(_) => 3,
            ClientError::PermissionDenied(_) => 4,
        }
    }
}

/// Default control socket path (the daemon's default too).
pub const DEFAULT_SOCKET: &str = "/run/paratick/paratick.sock";

/// Sends one request and returns the daemon's successful response; a failure is an
/// error with the daemon's message.
pub fn request(socket: &Path, request: &Request) -> Result<DaemonAnswer, ClientError> {
    let io = |what| move |source| ClientError::Io { what, socket: socket.display().to_string(), source };
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::Unreachable(socket.display().to_string())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(format!(
            "permission denied on {}: run as root or as a member of the daemon's socket group",
            socket.display()
        )),
        _ => io("cannot connect to")(e),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io("cannot set a timeout on"))?;
    let mut line = serde_json::to_string(request).expect("a request serializes");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io("cannot send the request to"))?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io("no answer from the daemon on"))?;
    let response: Response = serde_json::from_str(&answer).map_err(ClientError::Answer)?;
    match response {
        Response::Refused { code: ErrorCode::PermissionDenied, error } => Err(ClientError::PermissionDenied(error)),
        Response::Refused { error, .. } => Err(ClientError::Refused(error)),
        Response::Done(answer) => Ok(answer),
    }
}
