//! The Prometheus rules in packaging/prometheus: valid, and doing what they say
//! (`promtool test rules` over synthetic series, from Debian's prometheus package).

use std::path::Path;
use std::process::Command;

#[test]
fn the_rules_check_and_pass_their_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus");
    for args in [&["check", "rules", "paratick-rules.yml"][..], &["test", "rules", "paratick-rules.test.yml"][..]] {
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
