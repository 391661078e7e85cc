//! `paratick-ctl daemon`: runs the configured VMs, loads the eBPF observer once for the
//! host, serves Prometheus metrics over HTTP and control requests on a Unix socket, tells
//! systemd when it is ready (Type=notify), reloads its configuration on SIGHUP, and stops
//! every VM on SIGTERM.

pub mod config;
mod counters;
mod manager;
pub use manager::SAMPLE_INTERVAL;
mod metrics;
mod restart;
mod state;
mod supervisor;

use crate::io_error::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};

use crate::protocol::{ErrorCode, Request, Response, MAX_REQUEST_BYTES};
pub use config::{DaemonConfig, DEFAULT_CONFIG};
use manager::{Command, Manager};

/// Command-line overrides of the configuration.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// `--socket`.
    pub socket: Option<PathBuf>,
}

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration file (or the embedded one) is not valid.
    #[error("invalid configuration {}", path.as_ref().map_or("(embedded)".into(), |p| p.display().to_string()))]
    Config {
        /// The file (none: the embedded configuration).
        path: Option<PathBuf>,
        /// What is wrong with it.
        #[source]
        source: config::ConfigError,
    },
    /// `socket_group` names no group, or the lookup failed.
    #[error("socket_group: {0}")]
    Group(String),
    /// Another daemon answers on the control socket.
    #[error("another daemon is listening on {}: stop it first or use --socket", .0.display())]
    SocketInUse(PathBuf),
    /// A file, a socket, a thread or another process (what was being done, and why).
    #[error(transparent)]
    Io(#[from] crate::io_error::IoError),
    /// The manager thread ended or panicked.
    #[error("the manager {0} (see the log above)")]
    Manager(&'static str),
}

type Result<T, E = DaemonError> = std::result::Result<T, E>;

/// How long the daemon takes at most to stop after SIGTERM: below the unit's
/// `TimeoutStopSec=30s`, so that systemd never has to kill it.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// The configuration in `config_file` (else the embedded default), with the overrides.
fn load_config(config_file: Option<&Path>, overrides: &Overrides) -> Result<DaemonConfig> {
    let mut config = match config_file {
        Some(path) => {
            DaemonConfig::load(path).map_err(|source| DaemonError::Config { path: Some(path.to_path_buf()), source })?
        }
        None => DaemonConfig::parse(DEFAULT_CONFIG).map_err(|source| DaemonError::Config { path: None, source })?,
    };
    if let Some(listen) = overrides.metrics_listen {
        config.metrics_listen = listen;
    }
    if let Some(socket) = &overrides.socket {
        config.socket = socket.clone();
    }
    Ok(config)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_file: Option<&Path>, overrides: Overrides) -> Result<()> {
    let config = load_config(config_file, &overrides)?;
    if config.vms.is_empty() {
        log::info!("no VMs configured: the daemon watches the host's KVM VMs only");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("cannot start the async runtime"))?;
    runtime.block_on(serve(config, config_file, overrides))
}

/// Reloads the configuration (SIGHUP): a file that does not load is refused in one
/// line, and the configuration in force stays.
async fn reload(config_file: Option<&Path>, overrides: &Overrides, inbox: &mpsc::Sender<Command>) {
    let Some(path) = config_file else {
        log::warn!("SIGHUP: the daemon runs the embedded default configuration (no --config): nothing to reload");
        return;
    };
    notify_systemd(&[sd_notify::NotifyState::Reloading]);
    match load_config(Some(path), overrides) {
        Err(e) => log::error!("SIGHUP: reload refused, the configuration in force stays: {:#}", anyhow::Error::new(e)),
        Ok(config) => {
            let (reply, summary) = oneshot::channel();
            if inbox.send(Command::Reload(Box::new(config), reply)).is_ok() {
                if let Ok(summary) = summary.await {
                    log::info!("SIGHUP: reloaded {}: {summary}", path.display());
                }
            }
        }
    }
    notify_systemd(&[sd_notify::NotifyState::Ready]);
}

async fn serve(config: DaemonConfig, config_file: Option<&Path>, overrides: Overrides) -> Result<()> {
    // Before anything else: from here on a signal is handled, never the default action
    // (which for SIGHUP would end the daemon and leave its socket behind).
    use tokio::signal::unix::{signal, SignalKind};
    let handled = |kind| signal(kind).map_err(io("cannot install the signal handlers"));
    let mut terminate = handled(SignalKind::terminate())?;
    let mut interrupt = handled(SignalKind::interrupt())?;
    let mut hangup = handled(SignalKind::hangup())?;
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .map_err(io(format!("cannot listen for metrics on {}", config.metrics_listen)))?;
    let metrics_addr = metrics_listener.local_addr().map_err(io("cannot read the metrics address"))?;
    let group = config.socket_group.as_deref().map(group_id).transpose()?;
    let control_listener = bind_control_socket(&config.socket, group)?;
    let metrics_url = format!("http://{metrics_addr}/metrics");

    let (inbox, commands) = mpsc::channel();
    let manager_config = config.clone();
    let url = metrics_url.clone();
    let (built, manager_ready) = oneshot::channel();
    let manager = std::thread::Builder::new()
        .name("manager".into())
        .spawn(move || {
            let mut manager = Manager::new(&manager_config, url);
            let _ = built.send(());
            manager.start_autostart_vms();
            manager.run(commands)
        })
        .map_err(io("cannot start the manager thread"))?;
    // Ready once the observer is loaded (or its failure known) and running VMs are
    // adopted; the VMs to start are started right after (VM units wait for this
    // readiness). Loading the observer takes a CPU second or more, longer on a busy host:
    // requests no longer wait for it behind a readiness already given.
    if manager_ready.await.is_err() {
        return Err(DaemonError::Manager("ended while starting"));
    }

    tokio::spawn(serve_metrics(metrics_listener, inbox.clone()));
    tokio::spawn(serve_control(control_listener, inbox.clone(), group, config.socket_group.clone()));
    let status = format!("metrics on {metrics_url}, control socket {}", config.socket.display());
    notify_systemd(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
    log::info!("paratick daemon ready: {status}");

    loop {
        tokio::select! {
            _ = terminate.recv() => { log::info!("SIGTERM: stopping"); break }
            _ = interrupt.recv() => { log::info!("SIGINT: stopping"); break }
            _ = hangup.recv() => reload(config_file, &overrides, &inbox).await,
        }
    }
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    // Whatever the load, and whatever a VM process or the kernel's detaching of the
    // eBPF programs does, the daemon ends before its unit's stop timeout.
    std::thread::Builder::new()
        .name("stop-deadline".into())
        .spawn(|| {
            std::thread::sleep(SHUTDOWN_DEADLINE);
            log::error!("not stopped within {SHUTDOWN_DEADLINE:?} of SIGTERM: exiting now");
            std::process::exit(1);
        })
        .map_err(io("cannot start the stop-deadline thread"))?;
    let (done, stopped) = oneshot::channel();
    if inbox.send(Command::Shutdown(done)).is_ok() {
        let _ = stopped.await;
    }
    drop(inbox);
    let joined = tokio::task::spawn_blocking(move || manager.join().is_ok()).await;
    if !joined.unwrap_or(false) {
        return Err(DaemonError::Manager("panicked"));
    }
    let _ = std::fs::remove_file(&config.socket);
    log::info!("paratick daemon stopped");
    Ok(())
}

fn group_id(name: &str) -> Result<u32> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(DaemonError::Group(format!("no group named {name:?}"))),
        Err(e) => Err(DaemonError::Group(format!("cannot look up group {name:?}: {e}"))),
    }
}

/// Binds the control socket (mode 0660, group `group`), replacing a stale one.
fn bind_control_socket(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io(format!("cannot remove the stale socket {}", path.display())))?;
    }
    let listener =
        UnixListener::bind(path).map_err(io(format!("cannot create the control socket {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io(format!("cannot set the mode of {}", path.display())))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io(format!("cannot chown {}", path.display())))?;
    }
    Ok(listener)
}

/// How long a metrics client may take to send its request's headers: a client that
/// trickles bytes (or sends none) is cut off, and never holds up the others.
const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Prometheus's endpoint: `GET` or `HEAD /metrics`, each connection served on its own.
async fn serve_metrics(listener: TcpListener, inbox: mpsc::Sender<Command>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: back off rather than spin.
                log::warn!("metrics: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let inbox = inbox.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| metrics_response(request, inbox.clone()));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                log::debug!("metrics connection: {e}");
            }
        });
    }
}

type MetricsBody = http_body_util::Full<hyper::body::Bytes>;

async fn metrics_response(
    request: hyper::Request<hyper::body::Incoming>,
    inbox: mpsc::Sender<Command>,
) -> Result<hyper::Response<MetricsBody>, std::convert::Infallible> {
    use hyper::{Method, StatusCode};
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = hyper::Response::new(MetricsBody::from(body));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
        Ok(response)
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD only\n".into());
    }
    // hyper leaves the body out of a HEAD response (Content-Length is kept).
    let (answer, rendered) = oneshot::channel();
    let body = match inbox.send(Command::Render(answer)) {
        Ok(()) => rendered.await.ok(),
        Err(_) => None,
    };
    match body {
        Some(body) => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body),
        None => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "the daemon is stopping\n".into()),
    }
}

async fn serve_control(
    listener: UnixListener,
    inbox: mpsc::Sender<Command>,
    group: Option<u32>,
    group_name: Option<String>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let inbox = inbox.clone();
        let group_name = group_name.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, inbox, group, group_name).await {
                log::debug!("control connection: {e}");
            }
        });
    }
}

/// How long the daemon discards what a client sends after refusing an over-long line.
const REFUSED_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

async fn serve_client(
    stream: UnixStream,
    inbox: mpsc::Sender<Command>,
    group: Option<u32>,
    group_name: Option<String>,
) -> std::io::Result<()> {
    let credentials = stream.peer_cred()?;
    // A member of the group by a supplementary group passes the socket's 0660 mode too.
    let in_group =
        |gid: u32| -> std::io::Result<bool> { Ok(credentials.gid() == gid || peer_groups(&stream)?.contains(&gid)) };
    let allowed = credentials.uid() == 0 || group.map(in_group).transpose()?.unwrap_or(false);
    let (read, mut write) = stream.into_split();
    if !allowed {
        let who = group_name.map_or_else(|| "root".to_string(), |g| format!("root or group {g}"));
        let refusal = Response::failure(
            ErrorCode::PermissionDenied,
            format!("permission denied: only {who} may control the daemon"),
        );
        return write_response(&mut write, &refusal).await;
    }
    // Newline-delimited requests of at most MAX_REQUEST_BYTES: the codec buffers no
    // more than that of a line. (Not `LinesCodec`: its stream ends at a line that is not
    // UTF-8, and such a line gets an answer like any other bad request here.)
    let codec = AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_REQUEST_BYTES);
    let mut requests = FramedRead::new(read, codec);
    loop {
        let line = match requests.next().await {
            None => return Ok(()),
            Some(Ok(line)) => line,
            Some(Err(AnyDelimiterCodecError::Io(e))) => return Err(e),
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                let refusal = Response::failure(
                    ErrorCode::BadRequest,
                    format!("bad request: longer than {MAX_REQUEST_BYTES} bytes"),
                );
                write_response(&mut write, &refusal).await?;
                write.shutdown().await?;
                // The connection is closed (the rest of the line is not a request).
                // Closing with the client's data still queued would reset it, and the
                // client could lose the refusal: discard the rest (in a fixed buffer,
                // for a bounded time) first.
                let mut reader = requests.into_inner();
                let mut sink = [0u8; 8192];
                let drain = async {
                    while reader.read(&mut sink).await? > 0 {}
                    Ok::<(), std::io::Error>(())
                };
                let _ = tokio::time::timeout(REFUSED_DRAIN_TIME, drain).await;
                return Ok(());
            }
        };
        let response = match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::failure(ErrorCode::BadRequest, format!("bad request: {e}")),
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                match inbox.send(Command::Request(request, reply)) {
                    Ok(()) => answer
                        .await
                        .unwrap_or_else(|_| Response::failure(ErrorCode::Stopping, "the daemon is stopping")),
                    Err(_) => Response::failure(ErrorCode::Stopping, "the daemon is stopping"),
                }
            }
        };
        write_response(&mut write, &response).await?;
    }
}

/// The supplementary groups of the peer of a Unix stream, as they were when it
/// connected (`SO_PEERGROUPS`, Linux 4.13+).
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of gid_t we own; the kernel writes at most
        // `len` bytes and sets `len` to what it wrote (or needs, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(error);
        }
        groups.resize(needed, 0);
    }
}

async fn write_response(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(response).expect("responses serialize");
    line.push('\n');
    write.write_all(line.as_bytes()).await
}

/// Sends state updates to systemd when run as a Type=notify service (`NOTIFY_SOCKET`);
/// nothing otherwise.
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("sd_notify: {e}");
    }
}
