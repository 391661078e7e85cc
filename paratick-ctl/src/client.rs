//! The CLI's side of the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::protocol::{Request, Response};

/// Default control socket path (the daemon's default too).
pub const DEFAULT_SOCKET: &str = "/run/paratick/paratick.sock";

/// Sends one request and returns the daemon's successful response; a failure is an
/// error with the daemon's message.
pub fn request(socket: &Path, request: &Request) -> Result<Response> {
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "the daemon is not running (nothing listens on {}): start it with `systemctl start paratick` or `paratick-ctl daemon`",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on {}: run as root or as a member of the daemon's socket group",
            socket.display()
        ),
        _ => anyhow::anyhow!("cannot connect to {}: {e}", socket.display()),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).context("cannot send the request")?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).context("no answer from the daemon")?;
    let response: Response = serde_json::from_str(&answer).context("the daemon's answer is not understood")?;
    if !response.ok {
        bail!("{}", response.error.unwrap_or_else(|| "the daemon refused the request".into()));
    }
    Ok(response)
}
