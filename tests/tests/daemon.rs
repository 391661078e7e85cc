//! End-to-end tests of `paratick-ctl daemon` (real KVM, real eBPF, as root): metrics,
//! the control socket and CLI, a real Prometheus server, systemd readiness and unit,
//! and shutdown on SIGTERM.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use paratick_observer::procfs::process_alive;
use paratick_tests::{
    free_port, kvm_unit_test, metric, one_vm_at_a_time, parse_metrics, process_usage, qemu_args, single_error_line,
    workspace_binary, ProcessUsage, Sample,
};
use serde_json::Value;

/// A paratick VM `a` and a tickless VM `b`, both running the I/O workload on one vCPU.
const TWO_VMS: &str = r#"
[[vm]]
name = "a"
mode = "paratick"
workload = "io"

[[vm]]
name = "b"
mode = "tickless"
workload = "io"
"#;

/// A paratick VM `c` whose vCPU always has two runnable tasks, so it ticks at the
/// scheduler rate (an idle or single-task paratick vCPU takes almost no ticks).
const CONTENDED_VM: &str = r#"
[[vm]]
name = "c"
mode = "paratick"
workload = "contended"
"#;

struct Daemon {
    child: Child,
    /// Whether dropping the daemon ends its VMs and removes its directory.
    owns_dir: bool,
    dir: PathBuf,
    socket: PathBuf,
    metrics: String,
}

impl Daemon {
    /// Starts a daemon on `config` in a new directory of its own.
    fn start(test: &str, config: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("paratick-daemon-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("paratick.toml"), config).unwrap();
        Daemon::start_in(dir)
    }

    /// Starts a daemon on `dir/paratick.toml` with its sockets in `dir`, and waits for
    /// its systemd readiness notification, which names the metrics address.
    fn start_in(dir: PathBuf) -> Daemon {
        Daemon::start_wrapped(dir, &[])
    }

    /// Like `start_in`, with the daemon run by `wrapper` (a command that ends by
    /// exec'ing its arguments, so the child is still the daemon).
    fn start_wrapped(dir: PathBuf, wrapper: &[&str]) -> Daemon {
        // Operators' decisions are kept in the test's directory, not the host's.
        let config_file = dir.join("paratick.toml");
        let config = std::fs::read_to_string(&config_file).unwrap();
        if !config.contains("state_dir") {
            std::fs::write(&config_file, format!("state_dir = \"{}\"\n{config}", dir.join("state").display())).unwrap();
        }
        let _ = std::fs::remove_file(dir.join("notify.sock"));
        let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
        notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let socket = dir.join("control.sock");
        let ctl = workspace_binary("paratick-ctl");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&ctl);
                command
            }
            None => Command::new(&ctl),
        };
        let child = command
            .args(["daemon", "--socket"])
            .arg(&socket)
            .args(["--metrics-listen", "127.0.0.1:0", "--config"])
            .arg(dir.join("paratick.toml"))
            .env("NOTIFY_SOCKET", dir.join("notify.sock"))
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log")).unwrap())
            .spawn()
            .expect("start the daemon");
        // Owned from here: a failed check below ends the daemon and its VMs.
        let mut daemon = Daemon { child, owns_dir: true, dir, socket, metrics: String::new() };
        let mut message = [0u8; 1024];
        // A call with a receive timeout fails with EINTR when the process was stopped and
        // continued meanwhile (signal(7)), as a loaded host may do: asked again.
        let received = loop {
            match notify.recv(&mut message) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                received => break received,
            }
        };
        let len = received.unwrap_or_else(|e| {
            panic!(
                "no readiness notification ({e}): {}",
                std::fs::read_to_string(daemon.dir.join("daemon.log")).unwrap()
            )
        });
        let message = String::from_utf8_lossy(&message[..len]).into_owned();
        assert!(message.starts_with("READY=1\nSTATUS=metrics on http://"), "{message}");
        daemon.metrics = message.split("http://").nth(1).unwrap().split('/').next().unwrap().to_string();
        // Ready means ready: both endpoints answer at once.
        assert!(daemon.scrape().iter().any(|s| s.name == "paratick_build_info"));
        assert!(daemon.ctl(&["status"]).status.success());
        daemon
    }

    fn scrape_text(&self) -> String {
        let mut stream = TcpStream::connect(&self.metrics).expect("connect to the metrics endpoint");
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        body.to_string()
    }

    fn scrape(&self) -> Vec<Sample> {
        parse_metrics(&self.scrape_text()).expect("valid metrics")
    }

    /// `paratick-ctl ARGS --socket SOCKET`.
    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(workspace_binary("paratick-ctl")).args(args).arg("--socket").arg(&self.socket).output().unwrap()
    }

    fn list(&self) -> Vec<Value> {
        let output = self.ctl(&["vm", "list", "--json"]);
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Polls the metrics until `check` holds, for up to `within`; returns the last value.
    fn wait_for(&self, within: Duration, mut check: impl FnMut(&[Sample]) -> bool) -> Vec<Sample> {
        let deadline = Instant::now() + within;
        loop {
            let samples = self.scrape();
            if check(&samples) || Instant::now() >= deadline {
                return samples;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends SIGTERM and returns the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Daemon {
    /// Kills the daemon (SIGKILL) and waits until it is gone; its VMs live on, and
    /// the next daemon started in the directory answers for them.
    fn kill(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.owns_dir = false;
        self.dir.clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.owns_dir {
            return;
        }
        for pid in vm_processes(&self.dir) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The VM processes (`paratick-vmm serve`) of the daemon whose sockets are in `dir`.
fn vm_processes(dir: &Path) -> Vec<u32> {
    paratick_vmm::control::serving_processes(&dir.join("vms"))
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(samples, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?}"))
}

fn effective(samples: &[Sample], vm: &str) -> f64 {
    value(samples, "paratick_vm_tick_rate_hertz", &[("vm", vm), ("source", "effective")])
}

#[test]
fn metrics_show_both_vms_and_their_counters_rise() {
    let _lock = one_vm_at_a_time();
    // The kernel's BPF run statistics on while this test runs, as an operator may set
    // kernel.bpf_stats_enabled: the daemon then exports its programs' runs and run time.
    let _bpf_stats = paratick_observer::enable_bpf_stats().expect("BPF_ENABLE_STATS");
    let daemon = Daemon::start("metrics", TWO_VMS);
    let first = daemon
        .wait_for(Duration::from_secs(5), |s| metric(s, "paratick_vm_guest_ticks_total", &[("vm", "b")]) > Some(0.0));
    std::thread::sleep(Duration::from_millis(1500));
    let second = daemon.scrape();
    // The paratick I/O guest is idle or has one task: it takes at most its housekeeping
    // ticks, so only its presence is checked; the tickless guest ticks while busy.
    assert!(metric(&second, "paratick_vm_ticks_injected_total", &[("vm", "a")]).is_some());
    for (name, vm) in [("paratick_vm_guest_ticks_total", "b"), ("paratick_vm_exits_total", "a")] {
        let labels: &[(&str, &str)] =
            if name == "paratick_vm_exits_total" { &[("vm", vm), ("reason", "halt_exits")] } else { &[("vm", vm)] };
        assert!(value(&second, name, labels) > value(&first, name, labels), "{name}{{vm={vm}}} did not rise");
    }
    let deadline_writes =
        |s: &[Sample]| value(s, "paratick_vm_tick_requests_total", &[("vm", "b"), ("kind", "tsc_deadline")]);
    assert!(deadline_writes(&second) > deadline_writes(&first), "the tickless VM re-arms its timer");
    // The paratick guest asked once, at boot (attributed to its VM by the observer).
    assert_eq!(value(&second, "paratick_vm_tick_requests_total", &[("vm", "a"), ("kind", "paratick")]), 1.0);
    assert_eq!(metric(&second, "paratick_vm_tick_requests_total", &[("vm", "a"), ("kind", "tsc_deadline")]), None);
    assert_eq!(value(&second, "paratick_vm_tick_rate_hertz", &[("vm", "a"), ("source", "requested")]), 250.0);
    assert_eq!(value(&second, "paratick_vm_tick_rate_hertz", &[("vm", "b"), ("source", "requested")]), 0.0);
    assert!(value(&second, "paratick_vm_exits_saved_projected_total", &[("vm", "a")]) > 0.0);
    assert_eq!(value(&second, "paratick_vm_exits_saved_projected_total", &[("vm", "b")]), 0.0);
    assert!(value(&second, "paratick_vm_exits_total", &[("vm", "a"), ("reason", "halt_exits")]) > 0.0);
    assert_eq!(value(&second, "paratick_vm_state", &[("vm", "a"), ("state", "running")]), 1.0);
    let info = [("vm", "a"), ("mode", "paratick"), ("hz", "250"), ("vcpus", "1")];
    assert_eq!(value(&second, "paratick_vm_info", &info), 1.0);
    for counter in ["ticks_ridden", "ticks_skipped_idle", "tick_requests_clamped"] {
        let name = format!("paratick_vm_{counter}_total");
        assert!(metric(&second, &name, &[("vm", "a")]).is_some(), "{name} missing");
    }
    assert_eq!(value(&second, "paratick_observer_up", &[]), 1.0);
    assert_eq!(value(&second, "paratick_observer_tracepoint_attached", &[("tracepoint", "kvm_msr")]), 1.0);
    // What the observer costs: its programs' events (each TSC-deadline write is one
    // kvm_msr event) and, with the statistics on, their runs and run time.
    let msr = [("program", "kvm_msr")];
    let msr_events = |s: &[Sample]| value(s, "paratick_observer_program_events_total", &msr);
    assert!(msr_events(&second) > msr_events(&first), "kvm_msr events rise");
    assert!(msr_events(&second) >= deadline_writes(&second), "every deadline write is a kvm_msr event");
    assert_eq!(value(&second, "paratick_observer_bpf_stats_enabled", &[]), 1.0);
    assert!(value(&second, "paratick_observer_program_runs_total", &msr) > 0.0);
    assert!(value(&second, "paratick_observer_program_run_seconds_total", &msr) > 0.0);
    assert_eq!(metric(&second, "paratick_observer_program_events_total", &[("program", "kvm_emulate_insn")]), None);
    assert_eq!(value(&second, "paratick_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);

    // promtool (Debian's prometheus package) accepts the exposition.
    let text = daemon.scrape_text();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (run `cargo xtask setup`)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(checked.stdout.is_empty() && checked.stderr.is_empty(), "promtool warnings: {checked:?}");
}

#[test]
fn an_operator_tick_rate_takes_effect_within_3_seconds_and_auto_restores_the_guests() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("rate", CONTENDED_VM);
    daemon.wait_for(Duration::from_secs(5), |s| (225.0..=275.0).contains(&effective(s, "c")));
    assert!(daemon.ctl(&["vm", "set-tick-rate", "c", "100"]).status.success());
    let samples = daemon.wait_for(Duration::from_secs(3), |s| (90.0..=110.0).contains(&effective(s, "c")));
    assert!((90.0..=110.0).contains(&effective(&samples, "c")), "effective rate {}", effective(&samples, "c"));
    assert_eq!(value(&samples, "paratick_vm_tick_rate_hertz", &[("vm", "c"), ("source", "configured")]), 100.0);
    let c = daemon.list().into_iter().find(|vm| vm["name"] == "c").unwrap();
    assert_eq!((c["configured_hz"].as_u64(), c["requested_hz"].as_u64()), (Some(100), Some(250)));

    assert!(daemon.ctl(&["vm", "set-tick-rate", "c", "--auto"]).status.success());
    let samples = daemon.wait_for(Duration::from_secs(3), |s| (225.0..=275.0).contains(&effective(s, "c")));
    assert!((225.0..=275.0).contains(&effective(&samples, "c")), "effective rate {}", effective(&samples, "c"));
    assert_eq!(metric(&samples, "paratick_vm_tick_rate_hertz", &[("vm", "c"), ("source", "configured")]), None);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn a_real_prometheus_server_scrapes_both_vms_and_answers_every_dashboard_query_and_rule() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("prometheus", TWO_VMS);
    let port = free_port();
    let config = daemon.dir.join("prometheus.yml");
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    let rules = packaging.join("prometheus/paratick-rules.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{}']\nscrape_configs:\n  - job_name: paratick\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            daemon.metrics
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", daemon.dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (run `cargo xtask setup`)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let vms = loop {
        let answer = http_get(&format!("127.0.0.1:{port}"), "/api/v1/query?query=paratick_vm_ticks_injected_total");
        let vms: Vec<String> = answer
            .and_then(|body| serde_json::from_str::<Value>(&body).ok())
            .map(|json| {
                json["data"]["result"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| r["metric"]["vm"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        if vms.len() == 2 || Instant::now() >= deadline {
            break vms;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut vms = vms;
    vms.sort();
    assert_eq!(vms, ["a", "b"]);

    // Every query of the Grafana dashboard is valid PromQL over what the daemon
    // exports, and has data (but the other VMMs' panel: there are none here). Rates
    // over 1m need two scrapes: a few seconds in, they have them.
    std::thread::sleep(Duration::from_secs(3));
    let query = |expr: &str| -> Value {
        let mut encoded = String::new();
        for byte in expr.bytes() {
            match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => encoded.push(byte as char),
                _ => encoded.push_str(&format!("%{byte:02X}")),
            }
        }
        let body = http_get(&format!("127.0.0.1:{port}"), &format!("/api/v1/query?query={encoded}"))
            .unwrap_or_else(|| panic!("Prometheus refused {expr}"));
        serde_json::from_str(&body).unwrap()
    };
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(packaging.join("grafana/paratick-dashboard.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            // The dashboard's host and VM variables, set to all.
            let expr = target["expr"].as_str().unwrap().replace("$instance", ".*").replace("$vm", ".*");
            let answer = query(&expr);
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            let results = answer["data"]["result"].as_array().unwrap().len();
            assert!(results > 0 || expr.contains("paratick_observed_vm_"), "{expr}: no data");
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} queries");
    // The host and VM variables, and the series they list.
    let variables: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(variables, ["datasource", "instance", "vm"]);
    let vms = query(r#"count by (vm) ({__name__=~"paratick_vm_info|paratick_observed_vm_info"})"#);
    assert_eq!(vms["data"]["result"].as_array().unwrap().len(), 2, "{vms}");
    let hosts = query("count by (instance) (paratick_build_info)");
    assert_eq!(hosts["data"]["result"].as_array().unwrap().len(), 1, "{hosts}");
    // The rules load and evaluate without error.
    let body = http_get(&format!("127.0.0.1:{port}"), "/api/v1/rules").unwrap();
    let rules: Value = serde_json::from_str(&body).unwrap();
    let loaded: Vec<&Value> =
        rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(loaded.len(), 12, "{rules}");
    assert!(loaded.iter().all(|r| r["health"] == "ok" || r["health"] == "unknown"), "{rules}");
    assert!(query("paratick:vm_exits:rate5m")["data"]["result"].as_array().unwrap().len() == 2);
    let _ = prometheus.kill();
    let _ = prometheus.wait();
}

fn http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    // HTTP/1.0: no chunked encoding to undo.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.split_whitespace().nth(1).is_some_and(|code| code == "200").then(|| body.to_string())
}

#[test]
fn every_bad_request_gets_one_line_and_changes_nothing() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("bad", TWO_VMS);
    let before = daemon.list();
    let cases: [(&[&str], &str); 6] = [
        (&["vm", "set-tick-rate", "nope", "100"], "paratick-ctl: unknown VM \"nope\"; known VMs: a, b"),
        (&["vm", "set-tick-rate", "a", "5000"], "paratick-ctl: the tick rate must be 10 to 4000 Hz, not 5000"),
        (
            &["vm", "set-tick-rate", "b", "100"],
            "paratick-ctl: VM b runs a tickless guest, which asks for no ticks: only paratick VMs take a tick rate",
        ),
        (&["vm", "start", "a"], "paratick-ctl: VM a is already running"),
        (&["vm", "stop", "nope"], "paratick-ctl: unknown VM \"nope\"; known VMs: a, b"),
        (&["vm", "start", "zz"], "paratick-ctl: unknown VM \"zz\"; known VMs: a, b"),
    ];
    for (args, message) in cases {
        let output = daemon.ctl(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert_eq!(single_error_line(&output), message, "{args:?}");
    }
    let strip_rates = |vms: Vec<Value>| -> Vec<(Value, Value, Value)> {
        vms.into_iter().map(|vm| (vm["name"].clone(), vm["state"].clone(), vm["configured_hz"].clone())).collect()
    };
    assert_eq!(strip_rates(daemon.list()), strip_rates(before), "a refused request changed state");

    // Usage errors never reach the daemon.
    assert_eq!(daemon.ctl(&["vm", "set-tick-rate", "a"]).status.code(), Some(2));
    assert_eq!(daemon.ctl(&["vm", "set-tick-rate", "a", "100", "--auto"]).status.code(), Some(2));
    assert_eq!(daemon.ctl(&["vm", "set-tick-rate", "a", "fast"]).status.code(), Some(2));

    // Malformed protocol lines get an error answer; the connection stays usable.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    stream
        .write_all(b"{\"cmd\":\"reboot\"}\nnot json\n[1,2]\n{\"cmd\":\"set_tick_rate\",\"vm\":\"a\",\"hz\":\"fast\"}\n{\"cmd\":\"list\"}\n")
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answers = String::new();
    stream.read_to_string(&mut answers).unwrap();
    let answers: Vec<Value> = answers.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), 5);
    assert!(answers[0]["error"].as_str().unwrap().starts_with("bad request: unknown variant `reboot`"));
    assert!(answers[..4].iter().all(|a| a["code"] == "bad_request"), "{answers:?}");
    assert!(answers[1]["error"].as_str().unwrap().starts_with("bad request: "));
    assert!(answers[2]["error"].as_str().unwrap().starts_with("bad request: invalid type"), "{}", answers[2]);
    assert!(answers[3]["error"].as_str().unwrap().starts_with("bad request: invalid type: string \"fast\""));
    assert_eq!(answers[4]["ok"], true);

    // Permission: the socket is 0660 root; an unprivileged user is told what to do.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(workspace_binary("paratick-ctl"))
        .args(["vm", "list", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "permission denied has its own exit code");
    assert!(single_error_line(&output).contains("permission denied on"), "{output:?}");
    assert_eq!(daemon.terminate().code(), Some(0));

    // No daemon: say how to start one.
    let output = Command::new(workspace_binary("paratick-ctl"))
        .args(["status", "--socket", "/nonexistent/paratick.sock"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "an unreachable daemon has its own exit code");
    assert_eq!(
        single_error_line(&output),
        "paratick-ctl: the daemon is not running (nothing listens on /nonexistent/paratick.sock): start it with `systemctl start paratick` or `paratick-ctl daemon`"
    );
}

#[test]
fn bad_configurations_are_refused_in_one_line_naming_the_line_column_and_key() {
    let dir = std::env::temp_dir().join(format!("paratick-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("colour = \"red\"\n", ": line 1, column 1: colour: unknown field `colour`, expected one of"),
        (
            "[[vm]]\nname = \"a\"\nmode = \"paratick\"\nworkload = \"io\"\nhz = 0\n",
            ": line 5, column 1: vm[0].hz: hz must be 10 to 4000, not 0",
        ),
        (
            "\nmetrics_listen = \"everywhere\"\n",
            ": line 2, column 1: metrics_listen: \"everywhere\" is not an address:port",
        ),
        ("[[vm]\n", ": line 1, column 5: "),
        ("# only a comment\n", ": it has no settings: an empty file is refused"),
    ];
    for (config, message) in cases {
        let path = dir.join("bad.toml");
        std::fs::write(&path, config).unwrap();
        let output = Command::new(workspace_binary("paratick-ctl"))
            .args(["daemon", "--socket"])
            .arg(dir.join("never.sock"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{config}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with(&format!("paratick-ctl: invalid configuration {}", path.display())), "{stderr}");
        assert!(stderr.contains(message), "{config}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(!dir.join("never.sock").exists(), "a refused configuration created the socket");
    }
    // A missing file: its cause once.
    let missing = dir.join("missing.toml");
    let output =
        Command::new(workspace_binary("paratick-ctl")).args(["daemon", "--config"]).arg(&missing).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        format!(
            "paratick-ctl: invalid configuration {}: cannot read it: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failing_vm_is_marked_failed_and_the_daemon_keeps_serving() {
    let _lock = one_vm_at_a_time();
    let config = format!("{TWO_VMS}\n[[vm]]\nname = \"c\"\nmode = \"paratick\"\nworkload = \"crash\"\n");
    let daemon = Daemon::start("failing", &config);
    let samples = daemon.wait_for(Duration::from_secs(10), |s| {
        metric(s, "paratick_vm_state", &[("vm", "c"), ("state", "failed")]) == Some(1.0)
    });
    assert_eq!(value(&samples, "paratick_vm_state", &[("vm", "c"), ("state", "failed")]), 1.0);
    assert_eq!(value(&samples, "paratick_vm_state", &[("vm", "a"), ("state", "running")]), 1.0);
    let c = daemon.list().into_iter().find(|vm| vm["name"] == "c").unwrap();
    assert!(c["error"].as_str().unwrap().starts_with("guest panicked: task on vCPU 0: exception #UD"), "{c}");
    // It can be started again and fails again: either before the start is confirmed (the
    // CLI then says why, exit 1) or just after it (the start succeeds, the state follows).
    let output = daemon.ctl(&["vm", "start", "c"]);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(
            stderr.starts_with("paratick-ctl: VM c failed to start: guest panicked: task on vCPU 0: exception #UD"),
            "{stderr}"
        );
    }
    // The list answers from the daemon's state now (the metrics may still show the
    // failure before the start, until the next sample).
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        let c = daemon.list().into_iter().find(|vm| vm["name"] == "c").unwrap();
        if c["state"] == "failed" || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(c["error"].as_str().is_some_and(|e| e.contains("guest panicked: task on vCPU 0: exception #UD")), "{c}");
    assert!(daemon.ctl(&["status"]).status.success());
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn sigterm_under_load_stops_every_vm_process_and_exits_0() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("sigterm", TWO_VMS);
    daemon.wait_for(Duration::from_secs(5), |s| metric(s, "paratick_vm_guest_ticks_total", &[("vm", "b")]) > Some(0.0));
    let pid = daemon.child.id();
    let socket = daemon.socket.clone();
    let vms = vm_processes(&daemon.dir);
    assert_eq!(vms.len(), 2, "one process per VM");
    assert!(vms.iter().all(|&vm| vcpu_fds(vm) == 1), "each VM process has its vCPU");
    assert_eq!(vcpu_fds(pid), 0, "the daemon runs no vCPU of its own");
    // Four busy threads per core beside the VMs while the daemon stops.
    let load = BusyLoad::start(8);
    let status = daemon.terminate();
    load.stop();
    assert_eq!(status.code(), Some(0));
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the process is gone with its threads");
    for vm in vms {
        assert!(!process_alive(vm), "VM process {vm} stopped with the daemon");
    }
    assert!(!socket.exists(), "the control socket is removed");
}

/// The guest ticks VM `name` reports on its own socket (no daemon involved).
fn vm_guest_ticks(dir: &Path, name: &str) -> u64 {
    let socket = paratick_vmm::control::socket_path(&dir.join("vms"), name);
    let reply =
        paratick_vmm::control::request(&socket, &paratick_vmm::control::VmRequest::Status {}, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("VM {name} does not answer: {e}"));
    reply.into_result().expect("an answer").status.expect("a status").counters.guest_ticks.total
}

fn pid_of(daemon: &Daemon, name: &str) -> u64 {
    let vm = daemon.list().into_iter().find(|vm| vm["name"] == name).unwrap();
    vm["pid"].as_u64().unwrap_or_else(|| panic!("VM {name} has no pid: {vm}"))
}

#[test]
fn vms_outlive_a_killed_daemon_and_the_next_daemon_adopts_them_with_their_counters() {
    let _lock = one_vm_at_a_time();
    let config = format!("{CONTENDED_VM}\n[[vm]]\nname = \"b\"\nmode = \"tickless\"\nworkload = \"io\"\n");
    let daemon = Daemon::start("adopt", &config);
    let samples = daemon
        .wait_for(Duration::from_secs(5), |s| metric(s, "paratick_vm_guest_ticks_total", &[("vm", "c")]) > Some(0.0));
    let ticks_exported = value(&samples, "paratick_vm_guest_ticks_total", &[("vm", "c")]);
    let pids = (pid_of(&daemon, "c"), pid_of(&daemon, "b"));
    let dir = daemon.kill();

    // Without a daemon, the VM keeps ticking.
    let at_kill = vm_guest_ticks(&dir, "c");
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm_guest_ticks(&dir, "c") <= at_kill {
        assert!(Instant::now() < deadline, "VM c stopped ticking when its daemon died");
        std::thread::sleep(Duration::from_millis(100));
    }

    let daemon = Daemon::start_in(dir);
    assert_eq!((pid_of(&daemon, "c"), pid_of(&daemon, "b")), pids, "the same VM processes");
    assert!(daemon.list().iter().all(|vm| vm["state"] == "running"), "{:?}", daemon.list());
    let samples = daemon.wait_for(Duration::from_secs(5), |s| {
        metric(s, "paratick_vm_guest_ticks_total", &[("vm", "c")]) > Some(ticks_exported)
    });
    let carried_on = value(&samples, "paratick_vm_guest_ticks_total", &[("vm", "c")]);
    assert!(carried_on > ticks_exported, "the counter carries on: {carried_on} after {ticks_exported}");
    // The adopted VM is controlled as before.
    let output = daemon.ctl(&["vm", "set-tick-rate", "c", "100"]);
    assert!(output.status.success(), "{output:?}");
    let c = daemon.list().into_iter().find(|vm| vm["name"] == "c").unwrap();
    assert_eq!(c["configured_hz"], 100, "{c}");
    assert_eq!(daemon.terminate().code(), Some(0));
    for pid in [pids.0, pids.1] {
        assert!(!process_alive(pid as u32), "VM process {pid} stopped with the daemon");
    }
}

#[test]
fn a_killed_vm_process_is_marked_failed_with_its_exit_status_and_the_others_run_on() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("vmkill", TWO_VMS);
    let a = pid_of(&daemon, "a");
    assert_eq!(kill(Pid::from_raw(a as i32), Signal::SIGKILL), Ok(()));
    let samples = daemon.wait_for(Duration::from_secs(5), |s| {
        metric(s, "paratick_vm_state", &[("vm", "a"), ("state", "failed")]) == Some(1.0)
    });
    assert_eq!(value(&samples, "paratick_vm_state", &[("vm", "a"), ("state", "failed")]), 1.0);
    assert_eq!(value(&samples, "paratick_vm_state", &[("vm", "b"), ("state", "running")]), 1.0);
    let vms = daemon.list();
    let failed = vms.iter().find(|vm| vm["name"] == "a").unwrap();
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("VM process {a} ended without saying how")) && error.contains("SIGKILL"),
        "{error}"
    );
    assert_eq!(failed["pid"], Value::Null);
    // It starts again as a new process.
    assert!(daemon.ctl(&["vm", "start", "a"]).status.success());
    assert_ne!(pid_of(&daemon, "a"), a);
    assert_eq!(daemon.terminate().code(), Some(0));
}

fn vcpu_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("anon_inode:kvm-vcpu:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_systemd_units_verify_cleanly() {
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    let unit = std::fs::read_to_string(packaging.join("paratick.service")).unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("Restart=on-failure") && unit.contains("ProtectSystem=strict")
    );
    assert!(
        unit.contains("NoNewPrivileges=yes") && unit.contains("CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_CHOWN")
    );
    assert!(unit.contains("RuntimeDirectoryPreserve=restart"), "VM sockets survive a restart");
    let vm_unit = std::fs::read_to_string(packaging.join("paratick-vm@.service")).unwrap();
    assert!(vm_unit.contains("StopPropagatedFrom=paratick.service") && !vm_unit.contains("PartOf="));
    // Verified against the binaries we built (the installed paths need not exist here).
    let dir = std::env::temp_dir().join(format!("paratick-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in [("paratick.service", &unit), ("paratick-vm@.service", &vm_unit)] {
        let text = text
            .replace("/usr/local/bin/paratick-ctl", workspace_binary("paratick-ctl").to_str().unwrap())
            .replace("/usr/local/bin/paratick-vmm", workspace_binary("paratick-vmm").to_str().unwrap());
        std::fs::write(dir.join(name), text).unwrap();
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("paratick.service"))
        .arg(dir.join("paratick-vm@test.service"))
        .output()
        .expect("systemd-analyze (run `cargo xtask setup`)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(output.status.success(), "{output:?}");
    // systemd-analyze exits 0 on lines it ignores: any output is a problem.
    assert!(output.stdout.is_empty() && output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn the_control_socket_admits_group_members_by_any_group_and_refuses_long_or_invalid_lines() {
    let _lock = one_vm_at_a_time();
    // No VMs: only the socket is under test.
    let daemon = Daemon::start("socket", "socket_group = \"nogroup\"\n");
    let ctl_as = |groups: &[&str]| {
        Command::new("setpriv")
            .arg("--reuid=65534")
            .args(groups)
            .arg("--")
            .arg(workspace_binary("paratick-ctl"))
            .args(["vm", "list", "--json", "--socket"])
            .arg(&daemon.socket)
            .output()
            .unwrap()
    };
    // A member by a supplementary group passes the socket's 0660 mode and is admitted.
    let member = ctl_as(&["--regid=users", "--groups=nogroup"]);
    assert!(member.status.success(), "{member:?}");
    // So is a member by its primary group.
    let primary = ctl_as(&["--regid=nogroup", "--clear-groups"]);
    assert!(primary.status.success(), "{primary:?}");
    // A non-member does not even reach the daemon's check (the file mode refuses it).
    let stranger = ctl_as(&["--regid=users", "--clear-groups"]);
    assert_eq!(stranger.status.code(), Some(4));
    assert!(single_error_line(&stranger).contains("permission denied"), "{stranger:?}");

    // A 10 MB line without a newline: refused after the limit, in one line, and the
    // connection closed; the daemon goes on answering.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let huge = vec![b'x'; 10 << 20];
    // The daemon closes the connection early: our write may fail, which is fine.
    let _ = stream.write_all(&huge);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let answers: Vec<Value> = answer.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), 1, "{answer:?}");
    assert!(answers[0]["error"].as_str().unwrap().starts_with("bad request: longer than "), "{answer}");

    // Invalid UTF-8 and non-object JSON: an error each, and the connection stays usable.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    stream.write_all(b"{\"cmd\":\"li\xffst\"}\n[1,2]\n{\"cmd\":\"status\"}\n").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answers = String::new();
    stream.read_to_string(&mut answers).unwrap();
    let answers: Vec<Value> = answers.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(answers[0]["error"].as_str().unwrap().starts_with("bad request: "), "{answers:?}");
    assert!(answers[1]["error"].as_str().unwrap().starts_with("bad request: "), "{answers:?}");
    assert_eq!(answers[2]["ok"], true);
    assert!(daemon.ctl(&["status"]).status.success());
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Sends one request line on a new connection and returns the answer line.
fn control_exchange(socket: &Path, request: &[u8]) -> Value {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
}

#[test]
fn the_control_socket_serves_200_concurrent_clients_beside_a_silent_one() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("concurrent", TWO_VMS);
    // Connects and never sends anything.
    let silent = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let socket = daemon.socket.clone();
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || control_exchange(&socket, b"{\"cmd\":\"list\"}\n"))
        })
        .collect();
    for client in clients {
        let answer = client.join().unwrap();
        assert_eq!(answer["ok"], true, "{answer}");
        assert_eq!(answer["vms"].as_array().unwrap().len(), 2);
    }
    drop(silent);
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Sends raw bytes to the metrics endpoint and reads until the server closes.
fn metrics_exchange(address: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn the_metrics_endpoint_serves_100_concurrent_scrapes_beside_a_slow_client_and_garbage() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("scrapes", TWO_VMS);
    // A client that sends a byte a second.
    let mut slow = TcpStream::connect(&daemon.metrics).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let trickle = {
        let mut slow = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for byte in b"GET /metrics HTTP/1.1\r\n" {
                if slow.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let address = daemon.metrics.clone();
    let scrapes: Vec<_> = (0..100)
        .map(|_| {
            let address = address.clone();
            std::thread::spawn(move || {
                metrics_exchange(&address, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            })
        })
        .collect();
    for scrape in scrapes {
        let response = scrape.join().unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        let samples = parse_metrics(body).expect("valid metrics");
        assert!(samples.iter().any(|s| s.name == "paratick_vm_state"));
    }
    // HEAD: the headers of a GET, no body.
    let head = metrics_exchange(&address, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"), "{head:?}");
    assert!(head.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    // Garbage, other methods and paths: refused, and the server goes on.
    let garbage = metrics_exchange(&address, b"\x16\x03\x01\x00\xa5 garbage\r\n\r\n");
    assert!(garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
    let post = metrics_exchange(
        &address,
        b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let other = metrics_exchange(&address, b"GET /admin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    assert!(daemon.scrape().iter().any(|s| s.name == "paratick_build_info"));
    // The slow client is cut off at the header timeout, long before it is done.
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(!trickle.is_finished(), "cut off before it sent its request line");
    drop(slow);
    trickle.join().unwrap();
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start_and_leaves_the_first_alone() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("second", TWO_VMS);
    let output = Command::new(workspace_binary("paratick-ctl"))
        .args(["daemon", "--socket"])
        .arg(&daemon.socket)
        .args(["--metrics-listen", "127.0.0.1:0", "--config"])
        .arg(daemon.dir.join("paratick.toml"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(single_error_line(&output).contains("another daemon is listening on"), "{output:?}");
    assert!(daemon.ctl(&["status"]).status.success(), "the first daemon's socket is intact");
    assert_eq!(daemon.list().len(), 2);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn without_tracefs_the_vms_run_and_the_observer_is_down_with_its_reason_logged_once() {
    let _lock = one_vm_at_a_time();
    let dir = std::env::temp_dir().join(format!("paratick-daemon-notracefs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("paratick.toml"), CONTENDED_VM).unwrap();
    // A mount namespace of its own, where tracefs (and debugfs's copy) are empty.
    let hide = "mount -t tmpfs none /sys/kernel/tracing && mount -t tmpfs none /sys/kernel/debug && exec \"$@\"";
    let daemon =
        Daemon::start_wrapped(dir, &["unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh"]);
    let samples = daemon
        .wait_for(Duration::from_secs(5), |s| metric(s, "paratick_vm_guest_ticks_total", &[("vm", "c")]) > Some(0.0));
    assert_eq!(value(&samples, "paratick_observer_up", &[]), 0.0);
    assert_eq!(value(&samples, "paratick_vm_state", &[("vm", "c"), ("state", "running")]), 1.0);
    assert!(value(&samples, "paratick_vm_guest_ticks_total", &[("vm", "c")]) > 0.0, "the VM runs and ticks");
    let log = std::fs::read_to_string(daemon.dir.join("daemon.log")).unwrap();
    let reasons: Vec<&str> = log.lines().filter(|l| l.contains("observer is unavailable")).collect();
    assert_eq!(reasons.len(), 1, "{log}");
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// The daemon's exits-saved figure is a projection by the exits model of this host; a
/// tickless and a paratick VM doing the same work side by side measure what it
/// projects: the difference of their KVM exit counts.
#[test]
fn the_projected_exits_saved_match_a_measured_tickless_paratick_pair_within_15_percent() {
    let _lock = one_vm_at_a_time();
    let pair =
        |mode: &str| format!("[[vm]]\nname = \"{mode}\"\nmode = \"{mode}\"\nworkload = \"sequential\"\nwork = 80000\n");
    let daemon = Daemon::start("projection", &(pair("tickless") + &pair("paratick")));
    let deadline = Instant::now() + Duration::from_secs(60);
    // The tick rate the host observes of the running tickless VM.
    let mut observed: Vec<f64> = Vec::new();
    let vms = loop {
        let vms = daemon.list();
        if vms.iter().all(|vm| vm["state"] == "finished") {
            break vms;
        }
        let tickless = vms.iter().find(|vm| vm["name"] == "tickless").unwrap();
        if tickless["state"] == "running" && tickless["observed_hz"].as_f64().unwrap() > 0.0 {
            observed.push(tickless["observed_hz"].as_f64().unwrap());
        }
        assert!(Instant::now() < deadline, "the VMs did not finish: {vms:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let vm = |name: &str| vms.iter().find(|vm| vm["name"] == name).unwrap().clone();
    let (tickless, paratick) = (vm("tickless"), vm("paratick"));
    let measured = tickless["exits"].as_f64().unwrap() - paratick["exits"].as_f64().unwrap();
    let projected = paratick["exits_saved"].as_f64().unwrap();
    assert!(measured > 0.0, "paratick saved nothing? {tickless} {paratick}");
    let error = (projected - measured).abs() / measured;
    eprintln!("projected {projected} vs measured {measured} exits saved ({:.1}% off)", error * 100.0);
    assert!(
        error <= 0.15,
        "projected {projected} vs measured {measured} exits saved ({:.1}% off): tickless {tickless}, paratick {paratick}, {}",
        error * 100.0,
        String::from_utf8_lossy(&daemon.ctl(&["status", "--json"]).stdout)
    );
    // A tickless VM shows the tick rate it takes while busy, not 0.
    assert!(!observed.is_empty(), "no observed tick rate while the tickless VM ran");
    assert!(observed.iter().all(|hz| (200.0..=300.0).contains(hz)), "tickless at 250 Hz observed at {observed:?} Hz");
    assert_eq!(tickless["exits_saved"], 0);
}

/// Another VMM's VM: the daemon exports its exits by KVM's own categories (on hosts
/// where kvm_exit does not fire), and drops the series when the process is gone.
#[test]
fn a_third_party_vm_is_exported_by_kvm_exit_category_and_forgotten_when_it_exits() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("observed", "");
    let qemu = qemu_args(&kvm_unit_test("tscdeadline_latency.flat"), "20000000 200");
    // Named as libvirt names its guests.
    let uuid = "4f1c7e1a-9d1b-4c1e-8a40-6f3c2a1b0c9d";
    let mut qemu = Command::new(&qemu[0])
        .args(&qemu[1..])
        .args(["-name", "guest=alpha,debug-threads=on", "-uuid", uuid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (run `cargo xtask setup`)");
    let pid = qemu.id().to_string();
    let exported = |s: &[Sample], reason: &str| {
        metric(s, "paratick_observed_vm_exits_total", &[("pid", &pid), ("reason", reason)])
    };
    let timer = |s: &[Sample], family: &str| metric(s, family, &[("pid", &pid), ("vm", "alpha")]);
    let samples = daemon.wait_for(Duration::from_secs(20), |s| {
        exported(s, "halt_exits") >= Some(10.0)
            && timer(s, "paratick_observed_vm_timer_interrupts_total") >= Some(10.0)
            && timer(s, "paratick_observed_vm_exits_saved_projected_total") > Some(0.0)
            && timer(s, "paratick_observed_vm_tick_rate_hertz") > Some(0.0)
    });
    assert!(qemu.try_wait().unwrap().is_none_or(|status| status.code() == Some(1)), "QEMU failed to run the test");
    let series: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "paratick_observed_vm_exits_total" && s.labels.get("pid") == Some(&pid))
        .collect();
    assert!(exported(&samples, "halt_exits") >= Some(10.0), "{series:?}");
    assert!(series.iter().all(|s| s.labels.get("vm").map(String::as_str) == Some("alpha")), "{series:?}");
    // Its timer overhead, by name: interrupts and TSC-deadline writes counted, timer exits
    // by the model (no kvm_exit here) and never more than its exits, the savings below them.
    let interrupts = timer(&samples, "paratick_observed_vm_timer_interrupts_total").unwrap();
    let writes = timer(&samples, "paratick_observed_vm_timer_writes_total").unwrap();
    let timer_exits = timer(&samples, "paratick_observed_vm_timer_exits_total").unwrap();
    let saved = timer(&samples, "paratick_observed_vm_exits_saved_projected_total").unwrap();
    let all_exits: f64 = series.iter().map(|s| s.value).sum();
    assert!(interrupts >= 10.0 && writes >= interrupts - 2.0, "{interrupts} interrupts, {writes} writes");
    assert!(timer_exits > 0.0 && timer_exits <= all_exits, "{timer_exits} timer exits of {all_exits}");
    assert!(saved > 0.0 && saved <= timer_exits, "{saved} saved of {timer_exits}");
    let info = [("vm", "alpha"), ("pid", pid.as_str()), ("vmm", "qemu"), ("uuid", uuid)];
    assert_eq!(metric(&samples, "paratick_observed_vm_info", &info), Some(1.0), "{series:?}");
    let reasons: Vec<&str> = series.iter().map(|s| s.labels["reason"].as_str()).collect();
    for category in ["halt_exits", "irq_exits", "io_exits", "mmio_exits", "signal_exits", "other_exits"] {
        assert!(reasons.contains(&category), "{category} missing: {reasons:?}");
    }
    assert_eq!(qemu.wait().unwrap().code(), Some(1), "the kvm-unit-test passed");
    let samples = daemon.wait_for(Duration::from_secs(5), |s| exported(s, "halt_exits").is_none());
    assert_eq!(exported(&samples, "halt_exits"), None, "the exited process's series are gone");
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn the_cli_prints_shell_completions_a_man_page_and_json_for_every_change() {
    let ctl = |args: &[&str]| Command::new(workspace_binary("paratick-ctl")).args(args).output().unwrap();
    let bash = ctl(&["completions", "bash"]);
    assert!(bash.status.success() && String::from_utf8_lossy(&bash.stdout).contains("set-tick-rate"), "{bash:?}");
    let man = ctl(&["manpage"]);
    assert!(man.status.success() && String::from_utf8_lossy(&man.stdout).contains(".TH paratick-ctl"), "{man:?}");
    // A page per command, each with its exit statuses; --socket and --json only where
    // they mean something.
    let dir = std::env::temp_dir().join(format!("paratick-man-{}", std::process::id()));
    let written = ctl(&["manpage", "--out-dir", dir.to_str().unwrap()]);
    assert!(written.status.success(), "{written:?}");
    let page = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.1"))).unwrap();
    for name in ["paratick-ctl", "paratick-ctl-observe", "paratick-ctl-daemon", "paratick-ctl-vm-set-tick-rate"] {
        assert!(page(name).contains(".SH \"EXIT STATUS\""), "{name}: {}", page(name));
    }
    assert!(page("paratick-ctl-vm-list").contains("the daemon is not reachable"));
    assert!(page("paratick-ctl-observe").contains("the command's exit status"));
    for (name, socket, json) in [
        ("paratick-ctl-vm-list", true, true),
        ("paratick-ctl-status", true, true),
        ("paratick-ctl-daemon", true, false),
        ("paratick-ctl-observe", false, true),
        ("paratick-ctl-bench", false, false),
        ("paratick-ctl-completions", false, false),
    ] {
        assert_eq!((page(name).contains("\\-\\-socket"), page(name).contains("\\-\\-json")), (socket, json), "{name}");
    }
    // A directory that cannot be made: one line, a failing status, nothing written.
    let refused = ctl(&["manpage", "--out-dir", "/proc/paratick-man"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        "paratick-ctl: cannot create /proc/paratick-man: No such file or directory (os error 2)\n"
    );
    assert!(refused.stdout.is_empty());
    let bench_help = String::from_utf8_lossy(&ctl(&["bench", "--help"]).stdout).to_string();
    assert!(!bench_help.contains("--socket") && !bench_help.contains("--json "), "{bench_help}");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(ctl(&["completions", "tcsh"]).status.code(), Some(2), "an unknown shell is a usage error");

    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("json", CONTENDED_VM);
    let output = daemon.ctl(&["vm", "set-tick-rate", "c", "100", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(answer["done"].as_str().unwrap().starts_with("VM c: scheduler ticks at 100 Hz from now on"), "{answer}");
    let status: Value = serde_json::from_slice(&daemon.ctl(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["protocol"], 1);
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Threads that spin until stopped: a busy host.
struct BusyLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoad {
    fn start(threads: usize) -> BusyLoad {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || while !stop.load(std::sync::atomic::Ordering::Relaxed) {})
            })
            .collect();
        BusyLoad { stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.into_iter().for_each(|t| t.join().unwrap());
    }
}

/// Waits until the daemon's log has a line containing `text`, and returns that line.
fn wait_for_log_line(daemon: &Daemon, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(daemon.dir.join("daemon.log")).unwrap();
        if let Some(line) = log.lines().find(|line| line.contains(text)) {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "no log line with {text:?} within 20 s: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hang_up(daemon: &Daemon) {
    kill(Pid::from_raw(daemon.child.id() as i32), Signal::SIGHUP).unwrap();
}

#[test]
fn sighup_reloads_the_configuration_and_a_bad_file_changes_nothing() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("reload", TWO_VMS);
    let pids = (pid_of(&daemon, "a"), pid_of(&daemon, "b"));
    let config_file = daemon.dir.join("paratick.toml");
    let good = std::fs::read_to_string(&config_file).unwrap();

    // A file that does not load: refused in one line, everything as it was.
    std::fs::write(&config_file, "[[vm]]\nname = \"a\"\nworkload = \"io\"\n").unwrap();
    hang_up(&daemon);
    let refused = wait_for_log_line(&daemon, "reload refused");
    assert!(refused.ends_with("line 1, column 1: vm[0]: missing field `mode`"), "{refused}");
    assert_eq!((pid_of(&daemon, "a"), pid_of(&daemon, "b")), pids);

    // a as it was, b removed, d added.
    let state_line = good.lines().next().unwrap();
    let new = format!(
        "{state_line}\n[[vm]]\nname = \"a\"\nmode = \"paratick\"\nworkload = \"io\"\n\n[[vm]]\nname = \"d\"\nmode = \"tickless\"\nworkload = \"sequential\"\n"
    );
    std::fs::write(&config_file, new).unwrap();
    hang_up(&daemon);
    let reloaded = wait_for_log_line(&daemon, "SIGHUP: reloaded");
    assert!(reloaded.ends_with("added d; removed b; changed (restarted if it ran) none; unchanged a"), "{reloaded}");
    let names: Vec<String> = daemon.list().iter().map(|vm| vm["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["a", "d"]);
    assert_eq!(pid_of(&daemon, "a"), pids.0, "a was not touched");
    assert!(!process_alive(pids.1 as u32), "b's process stopped");
    let samples = daemon.wait_for(Duration::from_secs(10), |s| {
        metric(s, "paratick_vm_state", &[("vm", "d"), ("state", "running")]) == Some(1.0)
    });
    assert_eq!(value(&samples, "paratick_vm_state", &[("vm", "d"), ("state", "running")]), 1.0);
    assert!(samples.iter().all(|s| s.labels.get("vm").map(String::as_str) != Some("b")), "b's series went");
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn operator_rates_and_stops_are_restored_when_the_daemon_starts_again() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("decisions", TWO_VMS);
    let set = daemon.ctl(&["vm", "set-tick-rate", "a", "100"]);
    assert!(set.status.success(), "{set:?}");
    let said = String::from_utf8_lossy(&set.stdout);
    assert!(said.starts_with("VM a: scheduler ticks at 100 Hz from now on"), "{said}");
    assert!(daemon.ctl(&["vm", "stop", "b"]).status.success());
    // SIGTERM stops every VM process: the next daemon starts them from its decisions.
    let dir = daemon.dir.clone();
    let mut daemon = daemon;
    daemon.owns_dir = false;
    assert_eq!(daemon.terminate().code(), Some(0));
    let state: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("state/state.json")).unwrap()).unwrap();
    assert_eq!(state, serde_json::json!({"version": 1, "vms": {"a": {"operator_hz": 100}, "b": {"stopped": true}}}));

    let daemon = Daemon::start_in(dir);
    let list = daemon.list();
    let a = list.iter().find(|vm| vm["name"] == "a").unwrap();
    let b = list.iter().find(|vm| vm["name"] == "b").unwrap();
    assert_eq!((a["state"].as_str(), a["configured_hz"].as_u64()), (Some("running"), Some(100)), "{a}");
    assert_eq!((b["state"].as_str(), b["pid"].as_u64()), (Some("stopped"), None), "{b}");
    let samples = daemon.wait_for(Duration::from_secs(5), |s| {
        metric(s, "paratick_vm_tick_rate_hertz", &[("vm", "a"), ("source", "configured")]) == Some(100.0)
    });
    assert_eq!(value(&samples, "paratick_vm_tick_rate_hertz", &[("vm", "a"), ("source", "configured")]), 100.0);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn a_failing_vm_with_restart_on_failure_is_restarted_up_to_its_limit() {
    let _lock = one_vm_at_a_time();
    let config = "[[vm]]\nname = \"c\"\nmode = \"paratick\"\nworkload = \"crash\"\nrestart = \"on-failure\"\nrestart_limit = 2\n";
    let daemon = Daemon::start("restart", config);
    // Restarts after 1 s and 2 s, then it gives up.
    let gave_up = wait_for_log_line(&daemon, "not restarted again");
    assert!(gave_up.contains("VM c failed after 2 restarts within 10 min"), "{gave_up}");
    let samples = daemon.scrape();
    assert_eq!(value(&samples, "paratick_vm_restarts_total", &[("vm", "c")]), 2.0);
    assert_eq!(value(&samples, "paratick_vm_state", &[("vm", "c"), ("state", "failed")]), 1.0);
    let log = std::fs::read_to_string(daemon.dir.join("daemon.log")).unwrap();
    for restart in ["VM c: restart 1 after its failure", "VM c: restart 2 after its failure"] {
        assert_eq!(log.lines().filter(|l| l.contains(restart)).count(), 1, "{log}");
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Every counter series of a scrape, by name and labels.
fn counter_values(samples: &[Sample]) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|s| s.name.ends_with("_total"))
        .map(|s| (format!("{}{:?}", s.name, s.labels), s.value))
        .collect()
}

#[test]
fn a_daemon_killed_and_restarted_under_load_adopts_both_vms_and_continues_every_counter() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("readopt", TWO_VMS);
    let pids = (pid_of(&daemon, "a"), pid_of(&daemon, "b"));
    // After the first sample, every family the VMs have is there.
    let mut before = counter_values(&daemon.scrape());
    let mut dir = daemon.kill();
    // Two busy threads per core beside the VMs, as a build or a lint run would be.
    let load = BusyLoad::start(4);
    for round in 0..3 {
        // Ready means the VMs are adopted: the first list shows both, as they were.
        let daemon = Daemon::start_in(dir);
        let list = daemon.list();
        assert!(list.iter().all(|vm| vm["state"] == "running"), "round {round}: {list:?}");
        assert_eq!((pid_of(&daemon, "a"), pid_of(&daemon, "b")), pids, "round {round}: the same VM processes");
        // Each series continues where the killed daemon's last scrape left it.
        let after = counter_values(&daemon.scrape());
        let lost: Vec<String> = before
            .iter()
            .filter(|(series, value)| after.get(*series).is_none_or(|now| now < value))
            .map(|(series, value)| format!("{series}: {value} -> {:?}", after.get(series)))
            .collect();
        assert!(lost.is_empty(), "round {round}: counters went down or vanished: {lost:#?}");
        assert!(before.len() > 20, "round {round}: {before:?}");
        before = after;
        dir = daemon.kill();
    }
    load.stop();
    let daemon = Daemon::start_in(dir);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn eight_vms_for_three_minutes_keep_every_counter_monotonic_and_resources_flat() {
    let _lock = one_vm_at_a_time();
    let mut config = String::new();
    for index in 0..8 {
        let mode = if index % 2 == 0 { "paratick" } else { "tickless" };
        config.push_str(&format!("\n[[vm]]\nname = \"soak{index}\"\nmode = \"{mode}\"\nworkload = \"sleep\"\n"));
    }
    let daemon = Daemon::start("soak", &config);
    let vms = vm_processes(&daemon.dir);
    assert_eq!(vms.len(), 8, "one process per VM");
    let usage = || {
        let own = process_usage(daemon.child.id()).expect("the daemon lives");
        let each: Vec<ProcessUsage> =
            vms.iter().map(|&pid| process_usage(pid).expect("every VM process lives")).collect();
        (own, each)
    };
    let started = Instant::now();
    let mut previous = counter_values(&daemon.scrape());
    let (first_daemon, first_vms) = usage();
    let mut settled = None;
    let mut decreases = Vec::new();
    let (mut daemon_max, mut vm_max) = (first_daemon, first_vms.clone());
    while started.elapsed() < Duration::from_secs(180) {
        std::thread::sleep(Duration::from_secs(10));
        let samples = daemon.scrape();
        let now = counter_values(&samples);
        decreases.extend(
            now.iter()
                .filter(|(series, value)| previous.get(*series).is_some_and(|before| *value < before))
                .map(|(series, value)| format!("{series}: {} -> {value}", previous[series])),
        );
        previous = now;
        let failed: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "paratick_vm_state" && s.labels["state"] == "failed" && s.value == 1.0)
            .collect();
        assert!(failed.is_empty(), "a VM failed: {failed:?}");
        let (own, each) = usage();
        // Memory is judged from 30 s on: the first samples fill the observer's maps.
        if settled.is_none() && started.elapsed() >= Duration::from_secs(30) {
            settled = Some((own, each.clone()));
        }
        daemon_max = ProcessUsage {
            rss_kib: daemon_max.rss_kib.max(own.rss_kib),
            fds: daemon_max.fds.max(own.fds),
            threads: daemon_max.threads.max(own.threads),
        };
        for (max, now) in vm_max.iter_mut().zip(&each) {
            *max = ProcessUsage {
                rss_kib: max.rss_kib.max(now.rss_kib),
                fds: max.fds.max(now.fds),
                threads: max.threads.max(now.threads),
            };
        }
    }
    assert!(decreases.is_empty(), "counters went down: {decreases:?}");
    let (settled_daemon, settled_vms) = settled.unwrap();
    // A scrape or a control request in flight holds a descriptor for a moment.
    assert!(daemon_max.fds <= first_daemon.fds + 2, "daemon fds {} then up to {}", first_daemon.fds, daemon_max.fds);
    assert_eq!(daemon_max.threads, first_daemon.threads, "daemon threads");
    assert!(
        daemon_max.rss_kib <= settled_daemon.rss_kib + settled_daemon.rss_kib / 20 + 1024,
        "daemon RSS {} KiB at 30 s, up to {} KiB",
        settled_daemon.rss_kib,
        daemon_max.rss_kib
    );
    for ((first, max), settled) in first_vms.iter().zip(&vm_max).zip(&settled_vms) {
        assert_eq!((max.fds, max.threads), (first.fds, first.threads), "a VM process's fds and threads");
        assert!(max.rss_kib <= settled.rss_kib + 1024, "VM RSS {} KiB at 30 s, up to {}", settled.rss_kib, max.rss_kib);
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn a_client_trickling_a_byte_a_second_for_20_s_and_a_silent_control_client_held_30_s_hold_up_no_one() {
    let _lock = one_vm_at_a_time();
    let daemon = Daemon::start("slowloris", TWO_VMS);
    let address = daemon.metrics.clone();
    // Sends a byte a second for 20 s, connecting again each time it is cut off.
    let trickle = std::thread::spawn(move || {
        let started = Instant::now();
        let mut cut_off = 0;
        while started.elapsed() < Duration::from_secs(20) {
            let mut slow = TcpStream::connect(&address).unwrap();
            for byte in b"GET /metrics HTTP/1.1\r\nHost: t\r\n".iter().cycle() {
                if started.elapsed() >= Duration::from_secs(20) {
                    return cut_off;
                }
                if slow.write_all(&[*byte]).is_err() {
                    cut_off += 1;
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        cut_off
    });
    // Connects to the control socket and says nothing for 30 s.
    let silent = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let started = Instant::now();
    let (mut scrapes, mut lists) = (0, 0);
    while started.elapsed() < Duration::from_secs(30) {
        assert!(daemon.scrape().iter().any(|s| s.name == "paratick_vm_state"), "a scrape beside the slow client");
        scrapes += 1;
        assert_eq!(daemon.list().len(), 2, "the CLI beside the silent client");
        lists += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let cut_off = trickle.join().unwrap();
    // The header timeout (5 s) cuts the trickler off again and again.
    assert!(cut_off >= 2, "the slow client was cut off {cut_off} times in 20 s");
    assert!(scrapes >= 10 && lists >= 10, "{scrapes} scrapes, {lists} lists in 30 s");
    drop(silent);
    assert_eq!(daemon.terminate().code(), Some(0));
}
