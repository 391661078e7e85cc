//! Logging set-up of the Paratick binaries: straight to the journal, with each
//! message's priority, when stderr is connected to it (a systemd service), else to
//! stderr.

use std::str::FromStr;

/// Installs the logger. `default_level` applies unless `RUST_LOG` says otherwise (on
/// stderr, `RUST_LOG` takes env_logger's directives; the journal takes one level).
pub fn init(default_level: log::LevelFilter) {
    if systemd_journal_logger::connected_to_journal() {
        match systemd_journal_logger::JournalLog::new().map(|journal| journal.install()) {
            Ok(Ok(())) => {
                let setting = std::env::var("RUST_LOG").ok();
                let level = setting.as_deref().map(log::LevelFilter::from_str);
                log::set_max_level(match level {
                    Some(Ok(level)) => level,
                    _ => default_level,
                });
                if let (Some(setting), Some(Err(_))) = (setting, level) {
                    log::warn!(
                        "RUST_LOG={setting:?} is not a level (off, error, warn, info, debug or trace); logging at {default_level}"
                    );
                }
                return;
            }
            // Not fatal: the same messages go to stderr, which the journal records too.
            Ok(Err(_)) => eprintln!("cannot install the journal logger: a logger is installed; logging to stderr"),
            Err(e) => eprintln!("cannot open the journal ({e}); logging to stderr"),
        }
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level.as_str())).init();
}
