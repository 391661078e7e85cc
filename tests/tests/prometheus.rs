//! The Prometheus rules in packaging/prometheus: valid, and doing what they say
//! (`promtool test rules` over synthetic series, from Debian's prometheus package), and
//! the fleet configuration valid.

use std::path::Path;
use std::process::Command;

#[test]
fn the_rules_check_and_pass_their_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus");
    for args in [
        &["check", "rules", "paratick-rules.yml"][..],
        &["test", "rules", "paratick-rules.test.yml"][..],
        &["check", "config", "prometheus-fleet.yml"][..],
    ] {
        let output =
            Command::new("promtool").args(args).current_dir(&dir).output().expect("promtool (run `cargo xtask setup`)");
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_example_host_list_is_file_sd_json() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus");
    let text = std::fs::read_to_string(dir.join("paratick-hosts.example.json")).unwrap();
    let groups: serde_json::Value = serde_json::from_str(&text).unwrap();
    let targets: Vec<&str> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()))
        .collect();
    assert!(targets.iter().all(|t| t.ends_with(":9477")), "{targets:?}");
}
