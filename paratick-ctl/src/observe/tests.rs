//! `observe`'s session against a fake event source and real processes: what the live
//! table lists, what the final report keeps, and the exit status.

use super::*;
use crate::fake_events::FakeEvents;
use paratick_observer::model::ModelBackend;

fn options(pids: Vec<u32>, command: &[&str]) -> ObserveOptions {
    ObserveOptions {
        pids,
        command: command.iter().map(|s| s.to_string()).collect(),
        duration: Some(Duration::from_millis(350)),
        interval: Duration::from_millis(100),
        live_table: true,
        clear_screen: false,
        svg: false,
    }
}

fn run(events: &mut FakeEvents, options: &ObserveOptions) -> (Observation, String) {
    let model = TimerModel::default_for(ModelBackend::Pvm);
    let mut out = Vec::new();
    let observation = observe(events, &model, options, &AtomicBool::new(false), &mut out).unwrap();
    (observation, String::from_utf8(out).unwrap())
}

#[test]
fn the_live_table_lists_running_vms_by_kvm_counters_and_the_report_keeps_ended_ones() {
    let mut vm = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let pid = vm.id();
    let mut events = FakeEvents { exits: BTreeMap::from([(pid, 500)]), ..FakeEvents::default() };
    let (observation, table) = run(&mut events, &options(vec![pid], &[]));
    // kvm_exit does not fire on this (fake PVM) host: KVM's counters by category (the
    // first interval: the fake's counts do not grow).
    let row = table.lines().find(|line| line.trim_start().starts_with(&pid.to_string())).unwrap_or("");
    assert!(row.contains(&format!("sleep:{pid}")) && row.contains("io_exits="), "{table}");
    assert_eq!(observation.vms.iter().map(|vm| vm.pid).collect::<Vec<_>>(), [pid]);
    assert_eq!(observation.vms[0].kvm_stats.as_ref().map(|k| k.total.exits), Some(500));
    assert_eq!(observation.exit_code(), 0);

    // Ended: no longer in the live table, still in the report of the window.
    vm.kill().unwrap();
    vm.wait().unwrap();
    let (observation, table) = run(&mut events, &options(vec![pid], &[]));
    assert!(table.contains("observe: 0 VM process(es)"), "{table}");
    assert!(!table.lines().any(|line| line.trim_start().starts_with(&pid.to_string())), "{table}");
    assert_eq!(observation.vms.iter().map(|vm| vm.pid).collect::<Vec<_>>(), [pid]);
}

#[test]
fn a_command_is_run_watched_and_its_exit_status_passed_on() {
    let mut events = FakeEvents::default();
    let mut watch = options(vec![], &["sh", "-c", "exit 3"]);
    watch.duration = None;
    let (observation, _) = run(&mut events, &watch);
    let command = observation.command.as_ref().unwrap();
    assert_eq!((command.argv.len(), command.exit_code), (3, Some(3)));
    assert_eq!(observation.exit_code(), 3);
    // Ended by a signal: 128 + the signal, as a shell says.
    let (observation, _) = run(&mut events, &options(vec![], &["sh", "-c", "kill -TERM $$"]));
    assert_eq!(observation.exit_code(), 128 + 15);
}

#[test]
fn the_programs_count_every_process_or_the_chosen_ones_and_a_commands_tree() {
    assert!(matches!(pid_filter(&options(vec![], &[]), 1), PidFilter::All));
    match pid_filter(&options(vec![7], &[]), 1) {
        PidFilter::Pids { pids, follow_forks } => assert_eq!((pids, follow_forks), (vec![7], false)),
        PidFilter::All => panic!("pids chosen"),
    }
    match pid_filter(&options(vec![], &["true"]), 1) {
        PidFilter::Pids { pids, follow_forks } => assert_eq!((pids, follow_forks), (vec![1], true)),
        PidFilter::All => panic!("a command's tree"),
    }
    let error = check_pids(&[std::process::id()]).unwrap_err().to_string();
    assert!(error.contains("is not a KVM process"), "{error}");
    let error = check_pids(&[u32::MAX]).unwrap_err().to_string();
    assert_eq!(error, format!("no process with pid {}", u32::MAX));
}
